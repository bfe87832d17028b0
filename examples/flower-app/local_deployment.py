"""Run a Flower App on a throw-away local deployment: one SuperLink, N SuperNodes, `flwr run --stream`.

Everything binds 127.0.0.1 on free ports, the Flower config (SuperLink connection) lives in a fresh FLWR_HOME
under the work directory, and every process started here is stopped at the end, also on errors and timeouts.
With ``--tls`` a self-signed CA and a server certificate for 127.0.0.1 are generated first (``cryptography``, which
flwr depends on) and SuperLink, SuperNodes and the CLI talk TLS; otherwise everything runs ``--insecure``.

    python examples/flower-app/local_deployment.py                         # 3 SuperNodes, insecure
    python examples/flower-app/local_deployment.py --tls --run-config "num-server-rounds=3 strategy='dimat'"

These are the commands it runs (PORT: the SuperLink's HTTP port, Q_k: each SuperNode's own runtime port):

    flower-superlink --insecure --host 127.0.0.1 --port PORT --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:PORT --port Q_k --node-config "partition-id=k num-partitions=N"
    flwr run APP local-deployment --stream [--run-config ...]    # with FLWR_HOME/config.toml naming PORT

The app's Python dependencies (torch, dimat) must be importable in this environment: the SuperLink and the
SuperNodes run the ServerApp and the ClientApps in subprocesses of the same Python, and runtime dependency
installation (``uv sync``, needs the network) is off.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

APP = Path(__file__).resolve().parent
CONNECTION = "local-deployment"


# ------------------------------------------------------------------------------------------------ certificates
def make_certificates(out: Path) -> Dict[str, Path]:
    """A self-signed CA and a server certificate (SAN 127.0.0.1, localhost) signed by it; PEM paths by role."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dimat test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": out / "ca.pem", "cert": out / "server.pem", "key": out / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


# ------------------------------------------------------------------------------------------------ deployment
def free_ports(n: int) -> List[int]:
    """``n`` distinct ports that were free on 127.0.0.1 a moment ago (all held open together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, each a subprocess with its log file in ``workdir``."""

    workdir: Path
    supernodes: int = 3
    tls: bool = False
    port: int = 0
    node_ports: List[int] = field(default_factory=list)
    procs: List[subprocess.Popen] = field(default_factory=list)
    certs: Dict[str, Path] = field(default_factory=dict)

    @property
    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        # flwr's CLIs (and the SuperLink's own `flower-superexec`) are found on PATH: use this Python's first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["FLWR_HOME"] = str(self.workdir / "flwr-home")
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"  # no network: skip Flower's check for a newer release
        env.setdefault("PYTHONUNBUFFERED", "1")
        # One torch thread per app process: the ServerApp and every ClientApp are processes of their own on the
        # same cores, and OpenMP workers of several processes spinning against each other slow small models a lot.
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self, startup_timeout: float = 120.0) -> None:
        """Start everything and wait (at most ``startup_timeout`` s) until every SuperNode has registered."""
        if self.supernodes < 1:
            raise ValueError(f"supernodes must be >= 1, got {self.supernodes}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, *self.node_ports = free_ports(1 + self.supernodes)
        security = ["--insecure"]
        if self.tls:
            self.certs = make_certificates(self.workdir / "certs")
        self.write_flower_config()
        if self.tls:
            security = ["--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
                        "--ssl-ca-certfile", str(self.certs["ca"])]
        self._spawn("superlink", ["flower-superlink", *security, "--host", "127.0.0.1", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])
        node_security = ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]
        for k, q in enumerate(self.node_ports):
            self._spawn(f"supernode{k}", [
                "flower-supernode", *node_security, "--superlink", f"127.0.0.1:{self.port}", "--port", str(q),
                "--max-wait-time", str(int(startup_timeout)),
                "--node-config", f"partition-id={k} num-partitions={self.supernodes}",
            ])
        self._wait_registered(startup_timeout)

    def write_flower_config(self) -> Path:
        """FLWR_HOME/config.toml with one SuperLink connection (the default), as `flwr run` reads it."""
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.port}"']
        lines += [f'root-certificates = "{self.certs["ca"]}"'] if self.tls else ["insecure = true"]
        path = home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _spawn(self, name: str, cmd: Sequence[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        # Own session: stop() can signal the process and whatever it started (SuperExec, app subprocesses).
        self.procs.append(subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           cwd=self.workdir, start_new_session=True))
        log.close()

    def _wait_registered(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p, name in zip(self.procs, self.names):
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {p.returncode} while starting; see "
                                       f"{self.workdir / (name + '.log')}:\n{self.tail(name)}")
            log = (self.workdir / "superlink.log").read_text(errors="replace")
            if log.count("Activated node_id=") >= self.supernodes:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.supernodes} SuperNodes did not register with the SuperLink within {timeout:.0f} s;"
                           f" see the logs in {self.workdir}")

    @property
    def names(self) -> List[str]:
        return ["superlink"] + [f"supernode{k}" for k in range(len(self.procs) - 1)]

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """A `flwr` CLI command against this deployment (its FLWR_HOME), bounded by ``timeout`` seconds."""
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.workdir, capture_output=True, text=True,
                              timeout=timeout)

    def run_app(self, app: Path = APP, run_config: Optional[str] = None, timeout: float = 600.0) -> Dict:
        """`flwr run APP local-deployment --stream`: returns the run's id, status and the streamed log."""
        args = ["run", str(app), CONNECTION, "--stream"]
        if run_config:
            args += ["--run-config", run_config]
        t = time.monotonic()
        try:
            out = self.flwr(*args, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"flwr run did not finish within {timeout:.0f} s") from e
        text = out.stdout + out.stderr
        if out.returncode != 0:
            raise RuntimeError(f"flwr run failed (exit {out.returncode}):\n{text[-3000:]}")
        started = re.search(r"Successfully started run (\d+)", text)
        if not started:
            raise RuntimeError(f"flwr run printed no run id:\n{text[-3000:]}")
        run_id = started.group(1)
        listing = self.flwr("list", CONNECTION, "--run-id", run_id, "--format", "json")
        try:
            (run,) = [r for r in json.loads(listing.stdout)["runs"] if str(r["run-id"]) == run_id]
        except (ValueError, KeyError) as e:
            raise RuntimeError(f"flwr list did not describe run {run_id}: {listing.stdout}{listing.stderr}") from e
        return {"run_id": run_id, "status": run["status"], "log": text, "seconds": time.monotonic() - t}

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every process group started here, SIGKILL what is left after ``timeout`` s, then sweep up
        app processes (SuperExec, flwr-serverapp/clientapp) that put themselves in sessions of their own."""
        for p in self.procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait(timeout=5)
        ports = [self.port, *self.node_ports]
        deadline = time.monotonic() + timeout
        while _processes_using(ports) and time.monotonic() < deadline:
            time.sleep(0.5)  # SuperExec notices its parent is gone and exits by itself within seconds
        for pid in _processes_using(ports):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "Deployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _processes_using(ports: Sequence[int]) -> List[int]:
    """Live processes whose command line names one of our 127.0.0.1 ports (the app runtimes started for us)."""
    # The address is a whole argument (NUL-terminated in /proc/PID/cmdline): port 4000 must not match 40001.
    needles = [f"127.0.0.1:{p}\0".encode() for p in ports if p]
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().split(") ", 1)[1][:1]
        except OSError:
            continue
        if state != "Z" and any(n in cmd for n in needles):
            found.append(int(d.name))
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--app", type=Path, default=APP, help="the Flower App's directory (default: this one)")
    p.add_argument("--supernodes", type=int, default=3)
    p.add_argument("--tls", action="store_true", help="self-signed certificates instead of --insecure")
    p.add_argument("--run-config", default=None, help="flwr run --run-config overrides, e.g. \"strategy='dimat'\"")
    p.add_argument("--workdir", type=Path, default=None, help="logs, certificates and FLWR_HOME (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the run may take")
    args = p.parse_args(argv)
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dimat-flower-"))
    print(f"work directory (logs, FLWR_HOME): {workdir}", flush=True)
    with Deployment(workdir, args.supernodes, args.tls) as d:
        print(f"SuperLink on 127.0.0.1:{d.port} ({'TLS' if args.tls else 'insecure'}), "
              f"{args.supernodes} SuperNodes registered", flush=True)
        res = d.run_app(args.app, args.run_config, args.timeout)
    print(res["log"])
    print(f"run {res['run_id']}: {res['status']} after {res['seconds']:.0f} s")
    return 0 if "completed" in res["status"] else 1


if __name__ == "__main__":
    sys.exit(main())
