"""Several hosts on one machine (issue 13, item 6): every "host" is a network namespace with its own address on a
private subnet that exists only inside this test, joined by veth pairs to a bridge in a "switch" namespace.

* two hosts run ``torchrun --nnodes 2`` with a c10d rendezvous and the gloo transport;
* three hosts run gRPC agents (``dimat agent`` with a peers file of the namespaces' addresses);
* a host's link goes down for two deadlines and up again; the run ends and every agent finishes every round.

Needs root and ``ip netns`` (CI runs as root); elsewhere the tests skip with one line. Every namespace (and with it
every veth end and the bridge) is deleted afterwards, whatever happened; names carry a random tag so that runs at
the same time do not collide. Nothing listens outside the namespaces: the hosts' addresses exist only in them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from dimat import launcher
from dimat.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

#: the tiny run every test uses: synthetic data, a quarter-width MLP, one local epoch
TINY = {
    "data": {"dataset": "synthetic:train=600,test=150"},
    "model": {"name": "mlp", "width": 0.25},
    "train": {"epochs": 1},
    "threads": 1,
}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20,
                          check=check)


def _netns_unavailable() -> Optional[str]:
    """Why namespaces cannot be made here (one line), or None."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"dmprobe{secrets.token_hex(3)}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"'ip netns add' is not permitted here ({(res.stderr.strip().splitlines() or ['?'])[0]})"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """``n`` namespaces ``host k`` at ``10.<a>.<b>.(k+1)/24``, each one veth pair away from a bridge that lives in a
    switch namespace of its own (nothing is added to the machine's own network namespace)."""

    def __init__(self, n: int):
        self.tag = secrets.token_hex(3)  # 6 hex digits: interface names stay within 15 characters
        self.switch = f"dm{self.tag}sw"
        self.names = [f"dm{self.tag}h{k}" for k in range(n)]
        # The subnet only exists inside these namespaces; a random one still keeps logs of parallel runs apart.
        a, b = 10 + secrets.randbelow(200), secrets.randbelow(250)
        self.addrs = [f"10.{a}.{b}.{k + 1}" for k in range(n)]
        self.ifname = [f"v{k}{self.tag}" for k in range(n)]  # the host end
        self._port = [f"p{k}{self.tag}" for k in range(n)]  # the switch end
        self.procs: List[subprocess.Popen] = []

    def create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for k, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            _ip("link", "add", self.ifname[k], "netns", ns, "type", "veth", "peer", "name", self._port[k],
                "netns", self.switch)
            _ip("-n", self.switch, "link", "set", self._port[k], "master", "br0")
            _ip("-n", self.switch, "link", "set", self._port[k], "up")
            _ip("-n", ns, "addr", "add", f"{self.addrs[k]}/24", "dev", self.ifname[k])
            _ip("-n", ns, "link", "set", self.ifname[k], "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def link(self, k: int, up: bool) -> None:
        """Cut (or restore) host k's cable at the switch: its packets go nowhere, its own interface stays as it is."""
        _ip("-n", self.switch, "link", "set", self._port[k], "up" if up else "down")

    def popen(self, k: int, argv: Sequence[str], log: Path, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        """Start ``argv`` inside host k (``ip netns exec`` execs it: the Popen is the process itself)."""
        f = open(log, "w")
        p = subprocess.Popen(["ip", "netns", "exec", self.names[k], *argv], stdout=f, stderr=subprocess.STDOUT,
                             env=env, cwd=str(log.parent), start_new_session=True)
        f.close()
        self.procs.append(p)
        return p

    def destroy(self) -> None:
        for p in self.procs:  # a namespace lives on while a process is in it
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.names + [self.switch]:  # deleting a namespace deletes its veth ends and the bridge
            _ip("netns", "del", ns, check=False)


@pytest.fixture
def hosts():
    """``hosts(n)`` makes n namespaced hosts; all are deleted at teardown, even after a failure."""
    why = _netns_unavailable()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")
    made: List[Hosts] = []

    def _make(n: int) -> Hosts:
        h = Hosts(n)
        made.append(h)
        h.create()
        return h

    yield _make
    for h in made:
        h.destroy()
    left = _ip("netns", "list", check=False).stdout
    assert not any(h.tag in left for h in made), f"namespaces left behind: {left}"


def _env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _wait(procs: Sequence[subprocess.Popen], timeout: float) -> List[Optional[int]]:
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    return [p.poll() for p in procs]


def _logs(paths: Sequence[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{launcher.tail(p, 30)}" for p in paths if p.exists())


def _merges(outs: Sequence[Path], n: int) -> List[dict]:
    recs = read_metrics([launcher.agent_metrics_path(out, k) for out in outs for k in range(n)
                         if launcher.agent_metrics_path(out, k).exists()])
    return [r for r in recs if r["phase"] == "merge"]


def test_without_ip_the_tests_say_why_in_one_line(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    why = _netns_unavailable()
    assert why == "the 'ip' command (iproute2) is not installed"


# ---------------------------------------------------------------------------------------------- torchrun
def test_torchrun_two_nodes_in_two_namespaces(hosts, tmp_path):
    """torchrun --nnodes 2 --nproc-per-node 1, c10d rendezvous at host 0's address, gloo between the hosts. The
    topology alternates between a ring and no edges at all, so the torch transport also follows a schedule."""
    h = hosts(2)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps(dict(TINY, agents=2, rounds=3, topology=["ring", "disconnected"],
                                   transport={"deadline_s": 30})))
    endpoint = f"{h.addrs[0]}:29400"  # a port of host 0's own network stack, where nothing else runs
    logs, procs, outs = [], [], []
    for k in range(2):
        out = tmp_path / f"node{k}"  # each host has a run folder of its own, as on separate machines
        env = dict(_env(), GLOO_SOCKET_IFNAME=h.ifname[k])  # gloo: the host's veth, not what the host name gives
        argv = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"dimat-{h.tag}",
                "--rdzv-conf", f"is_host={'1' if k == 0 else '0'},join_timeout=60", "--local-addr", h.addrs[k],
                "-m", "dimat", "agent", str(cfg), "--transport", "torch", "--out", str(out)]
        logs.append(tmp_path / f"node{k}.log")
        outs.append(out)
        procs.append(h.popen(k, argv, logs[-1], env))
    codes = _wait(procs, 150)
    assert codes == [0, 0], _logs(logs)
    merges = _merges(outs, 2)
    assert sorted((r["agent"], r["round"]) for r in merges) == [(k, r) for k in range(2) for r in range(3)]
    # Rounds 0 and 2 exchange across the hosts; round 1 has no edges.
    assert all(r["received"] == ([] if r["round"] == 1 else [1 - r["agent"]]) and not r["missing"] for r in merges)
    assert all((r["comm_bytes"] == 0) == (r["round"] == 1) for r in merges)
    # One agent per host, and each host's folder holds only its own agent's records.
    assert [{r["agent"] for r in _merges([out], 2)} for out in outs] in ([{0}, {1}], [{1}, {0}])


# ---------------------------------------------------------------------------------------------- gRPC
def _grpc_agents(h: Hosts, tmp_path: Path, cfg: dict, per_host: int, port: int = 7100):
    """Start cfg["agents"] gRPC agents, agent k on host k // per_host, from one peers file of host addresses."""
    n = cfg["agents"]
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))
    peers = tmp_path / "peers.json"
    launcher.write_peers(peers, {k: f"{h.addrs[k // per_host]}:{port + k}" for k in range(n)})
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(16))
    secret.chmod(0o600)
    procs, logs, outs = [], [], []
    for k in range(n):
        out = tmp_path / f"host{k // per_host}"
        argv = [PY, "-m", "dimat", "agent", str(path), "--rank", str(k), "--transport", "grpc", "--peers",
                str(peers), "--out", str(out), "--set", f"transport.secret_file={secret}"]
        logs.append(tmp_path / f"agent-{k}.log")
        outs.append(out)
        procs.append(h.popen(k // per_host, argv, logs[-1], _env()))
    return procs, logs, sorted(set(outs))


def test_grpc_agents_over_three_namespaces(hosts, tmp_path):
    """Three gRPC agents, one per host, on the one-peer exponential schedule: round 0 agent i merges agent i + 1's
    snapshot, round 1 agent i + 2's, so each round's peers differ and every snapshot crosses between hosts."""
    h = hosts(3)
    cfg = dict(TINY, agents=3, rounds=2, topology="one-peer-exponential", transport={"deadline_s": 30})
    procs, logs, outs = _grpc_agents(h, tmp_path, cfg, per_host=1)
    codes = _wait(procs, 150)
    assert codes == [0] * 3, _logs(logs)
    merges = _merges(outs, 3)
    assert sorted((r["agent"], r["round"]) for r in merges) == [(k, r) for k in range(3) for r in range(2)]
    assert all(r["received"] == [(r["agent"] + 2 ** r["round"]) % 3] and not r["missing"] for r in merges)


def test_a_partition_of_two_deadlines_is_survived_and_healed(hosts, tmp_path):
    """Three hosts, one agent each, on a ring (everyone is everyone's neighbour). Host 2's link goes down during
    the run for two deadlines, then comes back. Every agent runs to the last round; while cut off, host 2 merges
    nothing and the others merge without it; once healed, snapshots cross between host 2 and the others again.

    It asks only what any round protocol must do: end, reach the last round, and heal. A protocol may let an
    agent skip rounds to catch up with its neighbours, so the rounds in between are not required. A protocol that
    stops waiting for a neighbour after one missed deadline runs the other rounds of the cut at the speed of
    training, so the run has enough rounds, and enough training per round, to go on after the link is back: about
    0.4 s a round on an idle 2-core machine, so the cut spans about 10 of the 40 rounds. (With 3000 samples a round
    took 0.1 s and host 2 ran alone to its last round before the link came back.)"""
    h = hosts(3)
    deadline = 2.0
    rounds = 40
    cfg = dict(TINY, agents=3, rounds=rounds, topology="ring", transport={"deadline_s": deadline},
               data={"dataset": "synthetic:train=12000,test=150"}, train={"epochs": 10})
    procs, logs, outs = _grpc_agents(h, tmp_path, cfg, per_host=1)
    try:
        _wait_for_round(outs, 3, 1, timeout=90)  # every agent has merged round 1: the run is under way
        h.link(2, up=False)
        cut = time.monotonic()
        time.sleep(2 * deadline)
        h.link(2, up=True)
        healed = time.monotonic()
    finally:
        h.link(2, up=True)
    codes = _wait(procs, 200)
    assert codes == [0, 0, 0], _logs(logs)
    merges = _merges(outs, 3)
    by = {(r["agent"], r["round"]): r for r in merges}
    for k in range(3):  # every agent ran to the end, in order
        mine = [r["round"] for r in merges if r["agent"] == k]
        assert mine == sorted(set(mine)) and mine[-1] == rounds - 1 and mine[:2] == [0, 1], (k, mine)
    # Cut off: a round after round 1 (every agent had merged round 1 before the cut) in which host 2 got nothing.
    cut_off = [r for r in range(2, rounds) if (2, r) in by and by[(2, r)]["missing"] == [0, 1]]
    assert cut_off, "host 2 was never cut off from both neighbours"
    assert any(2 in by[(k, r)]["missing"] for k in (0, 1) for r in range(2, rounds) if (k, r) in by)
    # Healed: after the cut, a snapshot crossed between host 2 and the others again.
    crossed = [(r["agent"], r["round"]) for r in merges if r["round"] > cut_off[0]
               and (2 in r["received"] if r["agent"] != 2 else r["received"])]
    assert crossed, "no snapshot crossed between host 2 and the others after the partition:\n" + _logs(logs)
    assert healed - cut >= 2 * deadline


def _wait_for_round(outs: Sequence[Path], n: int, r: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = {(m["agent"]) for m in _merges(outs, n) if m["round"] >= r}
        if len(done) == n:
            return
        time.sleep(0.2)
    raise AssertionError(f"agents did not reach round {r} within {timeout} s")
