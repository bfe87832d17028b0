"""Process management for one-process-per-agent runs: ports, peers file, pid files, waiting, metrics aggregation.

``dimat launch`` uses this module to start N local ``dimat agent`` processes; nothing here knows about models,
merges or transports beyond the command line of ``dimat agent``. Layout of a launch directory ``OUT``::

    OUT/config.yaml             the resolved config every agent runs (written by the launcher)
    OUT/peers.json              {"peers": {"0": "127.0.0.1:PORT", ...}}        (gRPC)
    OUT/keys/agent-K.keys.yaml  per-agent credentials (mode 0600) for the gRPC agents, unless the config names
                                a secret or credentials (transport.secret_file, credentials_file) or
                                $DIMAT_SECRET is set
    OUT/pids/agent-K.pid        the pid of agent K (rewritten by an agent restarted with --resume)
    OUT/pids/agent-K.exit       agent K's exit status, written by the agent as it exits (absent if it was killed)
    OUT/logs/agent-K.log        agent K's stdout and stderr
    OUT/metrics/agent-K.jsonl   agent K's metrics lines, one per line written as its rounds finish
    OUT/metrics.jsonl           every agent's lines, appended by the launcher as they appear (watch it grow);
                                at the end rewritten sorted as ``dimat run`` writes it
    OUT/checkpoints/agent-K.pt  agent K's last complete round

Every wait here has a deadline: ports are probed with bound sockets, processes are polled, and stopping an agent
escalates from SIGTERM to SIGKILL after ``grace`` seconds.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from dimat.errors import UserError

#: Exit status of an agent whose server or rendezvous could not bind its port (the launcher retries with new
#: ports). 75 is EX_TEMPFAIL from sysexits.h: "try again later".
EXIT_PORT_IN_USE = 75

#: Seconds between two polls of the agents and of their metrics files.
POLL_S = 0.2


# --------------------------------------------------------------------------------------------------- ports


def free_ports(n: int, host: str = "127.0.0.1") -> List[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago.

    All ``n`` probe sockets are held open together so the kernel cannot hand out the same port twice; they are
    closed before returning, so another process may still take one before our agent binds it (the caller
    retries when an agent exits with :data:`EXIT_PORT_IN_USE`).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def is_addr_in_use(exc: BaseException) -> bool:
    """Whether ``exc`` (from a socket bind, a gRPC server start or a torch.distributed store) means "port taken"."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return True
    text = str(exc).lower()
    return "address already in use" in text or "failed to bind" in text or "errno 98" in text


# --------------------------------------------------------------------------------------------------- peers file


def write_peers(path: Path | str, peers: Mapping[int, str]) -> None:
    """Write a peers file: ``{"peers": {"0": "host:port", ...}}`` (ranks as strings, since JSON keys are)."""
    body = {"peers": {str(int(r)): str(a) for r, a in sorted(peers.items())}}
    _atomic_write(Path(path), json.dumps(body, indent=2) + "\n")


def read_peers(path: Path | str, n: Optional[int] = None) -> Dict[int, str]:
    """Read and validate a peers file; returns ``{rank: "host:port"}``.

    Accepts ``{"peers": {...}}`` or the bare mapping. Ranks must be 0..N-1 without gaps, each address
    ``host:port`` with a port in 1..65535. ``n``, when given, is the number of agents the config expects.

    Raises
    ------
    UserError naming the file and the offending field.
    """
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: peers file not found") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: cannot read peers file: {e}") from None
    table = raw.get("peers", raw) if isinstance(raw, dict) else None
    if not isinstance(table, dict) or not table:
        raise UserError(f"{p}: field 'peers': expected a non-empty mapping rank -> \"host:port\"")
    peers: Dict[int, str] = {}
    for key, addr in table.items():
        try:
            rank = int(key)
        except (TypeError, ValueError):
            raise UserError(f"{p}: field 'peers': rank {key!r} is not an integer") from None
        peers[rank] = _check_address(p, rank, addr)
    expected = list(range(len(peers)))
    if sorted(peers) != expected:
        raise UserError(f"{p}: field 'peers': ranks must be 0..{len(peers) - 1}, got {sorted(peers)}")
    if n is not None and len(peers) != n:
        raise UserError(f"{p}: field 'peers': {len(peers)} peers for a config with {n} agents")
    return peers


def _check_address(path: Path, rank: int, addr: object) -> str:
    where = f"{path}: field 'peers.{rank}'"
    if not isinstance(addr, str) or ":" not in addr:
        raise UserError(f"{where}: expected \"host:port\", got {addr!r}")
    host, _, port = addr.rpartition(":")
    if not host:
        raise UserError(f"{where}: missing host in {addr!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"{where}: port must be 1..65535, got {port!r}")
    return addr


# --------------------------------------------------------------------------------------------------- per-agent files


def pid_path(out_dir: Path | str, rank: int) -> Path:
    return Path(out_dir) / "pids" / f"agent-{rank}.pid"


def exit_path(out_dir: Path | str, rank: int) -> Path:
    return Path(out_dir) / "pids" / f"agent-{rank}.exit"


def log_path(out_dir: Path | str, rank: int) -> Path:
    return Path(out_dir) / "logs" / f"agent-{rank}.log"


def agent_metrics_path(out_dir: Path | str, rank: int) -> Path:
    return Path(out_dir) / "metrics" / f"agent-{rank}.jsonl"


def write_pid_file(out_dir: Path | str, rank: int, pid: Optional[int] = None) -> Path:
    """Record ``pid`` (default: this process) as agent ``rank``'s and forget any previous exit status."""
    p = pid_path(out_dir, rank)
    p.parent.mkdir(parents=True, exist_ok=True)
    exit_path(out_dir, rank).unlink(missing_ok=True)
    _atomic_write(p, f"{os.getpid() if pid is None else pid}\n")
    return p


def write_exit_file(out_dir: Path | str, rank: int, status: int) -> None:
    """Record agent ``rank``'s exit status (called by the agent itself, so a killed agent leaves none)."""
    p = exit_path(out_dir, rank)
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(p, f"{int(status)}\n")


def read_pid_file(out_dir: Path | str, rank: int) -> Optional[int]:
    try:
        return int(pid_path(out_dir, rank).read_text().strip())
    except (OSError, ValueError):
        return None


def read_exit_file(out_dir: Path | str, rank: int) -> Optional[int]:
    try:
        return int(exit_path(out_dir, rank).read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child of someone else stays a zombie until reaped; it is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- metrics


class MetricsFollower:
    """Copies complete new lines of ``OUT/metrics/agent-*.jsonl`` into ``OUT/metrics.jsonl`` as they appear.

    Each agent owns its file (no two writers share a file, even across hosts on a network file system); the
    follower keeps a byte offset per file and only copies lines that end in a newline, so a line being written
    is picked up whole on a later :meth:`poll`.

    An agent restarted with ``--resume`` first rewrites its file without the records of rounds after its
    checkpoint (a new file, so a new inode), then appends. The follower notices the new inode and carries on
    after the lines it already copied; records of the rounds the agent lost stay in ``metrics.jsonl`` (the
    per-agent file, which the summary is computed from, no longer has them).
    """

    def __init__(self, out_dir: Path | str, ranks: Iterable[int], fresh: bool = True):
        self.out_dir = Path(out_dir)
        self.ranks = list(ranks)
        self.target = self.out_dir / "metrics.jsonl"
        self._inode: Dict[int, Optional[int]] = {r: None for r in self.ranks}
        self._offset: Dict[int, int] = {r: 0 for r in self.ranks}
        self._copied: Dict[int, List[bytes]] = {r: [] for r in self.ranks}  # lines copied so far, per agent
        self.lines = 0
        if fresh:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.target.write_text("")

    def poll(self) -> List[dict]:
        """Append what is new; returns the records appended (a line that is not JSON is copied, not returned)."""
        chunks: List[bytes] = []
        for r in self.ranks:
            chunk = self._new_lines(r)
            if chunk:
                chunks.append(chunk)
        if not chunks:
            return []
        blob = b"".join(chunks)
        with open(self.target, "ab") as f:
            f.write(blob)
        self.lines += blob.count(b"\n")
        return [rec for rec in map(_parse_line, blob.splitlines()) if rec is not None]

    def _new_lines(self, rank: int) -> bytes:
        try:
            with open(agent_metrics_path(self.out_dir, rank), "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self._inode[rank]:
                    self._reopen(rank, inode, f.read())
                f.seek(self._offset[rank])
                data = f.read()
        except FileNotFoundError:
            return b""
        end = data.rfind(b"\n") + 1
        self._offset[rank] += end
        self._copied[rank].extend(data[:end].splitlines())
        return data[:end]

    def _reopen(self, rank: int, inode: int, content: bytes) -> None:
        """Skip the lines of a (re)created file that were already copied: its prefix of records equal to ours."""
        lines = content[:content.rfind(b"\n") + 1].splitlines(keepends=True)
        copied = self._copied[rank]
        k = 0
        while k < min(len(lines), len(copied)) and _parse_line(lines[k]) == _parse_line(copied[k]):
            k += 1
        self._inode[rank], self._offset[rank] = inode, sum(len(x) for x in lines[:k])
        del copied[k:]


def _parse_line(line: bytes) -> Optional[dict]:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


# --------------------------------------------------------------------------------------------------- processes


@dataclass
class AgentProcess:
    """One agent started (or adopted) by the launcher.

    ``popen`` is the child we started; after the agent is restarted by someone else (``dimat agent --resume``
    writes a new pid file) the launcher follows the new pid, whose exit status it reads from the exit file.
    """

    rank: int
    popen: Optional[subprocess.Popen]
    pid: int
    log: Path
    returncode: Optional[int] = None
    restarts: int = 0

    def alive(self) -> bool:
        if self.popen is not None and self.popen.pid == self.pid:
            return self.popen.poll() is None
        return pid_alive(self.pid)


def spawn_agent(rank: int, argv: Sequence[str], out_dir: Path | str, env: Optional[Mapping[str, str]] = None
                ) -> AgentProcess:
    """Start ``argv`` as agent ``rank`` with stdout/stderr in ``OUT/logs/agent-K.log``; writes its pid file."""
    log = log_path(out_dir, rank)
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log, "ab") as f:
        popen = subprocess.Popen(list(argv), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=full_env, start_new_session=True)
    write_pid_file(out_dir, rank, popen.pid)
    return AgentProcess(rank, popen, popen.pid, log)


def stop_agents(agents: Iterable[AgentProcess], grace: float = 5.0) -> None:
    """SIGTERM every live agent, then SIGKILL whichever is still alive after ``grace`` seconds."""
    live = [a for a in agents if a.alive()]
    for a in live:
        _signal(a.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(a.alive() for a in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for a in live:
        if a.alive():
            _signal(a.pid, signal.SIGKILL)
    for a in live:
        if a.popen is not None:
            try:
                a.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class WaitResult:
    """How the agents ended: ``returncodes[rank]`` (negative: killed by that signal; None: a restarted agent that
    died without writing its exit file, i.e. it was killed)."""

    returncodes: Dict[int, Optional[int]] = field(default_factory=dict)
    timed_out: bool = False
    port_in_use: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes.values())

    def failed(self) -> List[int]:
        return sorted(r for r, rc in self.returncodes.items() if rc != 0)


def wait_agents(
    agents: Sequence[AgentProcess],
    out_dir: Path | str,
    timeout: Optional[float] = None,
    fail_fast: bool = False,
    on_poll: Optional[Callable[[], None]] = None,
) -> WaitResult:
    """Wait until every agent has exited (or ``timeout`` seconds passed), following restarted agents.

    An agent that dies is not given up on while any other agent still runs: if it is restarted (``dimat agent
    --resume`` writes a new pid into ``OUT/pids/agent-K.pid``) the new process is followed, and its exit status
    is the one reported.

    Parameters
    ----------
    agents : the agents to wait for.
    out_dir : the launch directory (its pid and exit files).
    timeout : seconds; on expiry every live agent is stopped and ``timed_out`` is set. None: wait as long as
        the agents run (each of their rounds is bounded by the transport's deadline).
    fail_fast : stop all agents as soon as one fails. Right for torch.distributed, whose collectives would block
        the others until the process-group timeout; wrong for gRPC, whose agents carry on without a dead peer
        and may see it rejoin.
    on_poll : called after every poll (the launcher copies metrics lines there).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    result = WaitResult()
    running = {a.rank: True for a in agents}
    while True:
        for a in agents:
            if _follow_restart(a, out_dir):
                running[a.rank] = True
            if not running[a.rank] or a.alive():
                continue
            running[a.rank] = False
            a.returncode = result.returncodes[a.rank] = _exit_status(a, out_dir)
            result.port_in_use |= a.returncode == EXIT_PORT_IN_USE
            # A port clash is a start-up failure that the caller retries as a whole: stop everyone at once.
            if a.returncode != 0 and (fail_fast or a.returncode == EXIT_PORT_IN_USE):
                _stop_rest(agents, running, out_dir, result, grace=5.0)
                break
        if on_poll:
            on_poll()
        if not any(running.values()):
            return result
        if deadline is not None and time.monotonic() > deadline:
            result.timed_out = True
            _stop_rest(agents, running, out_dir, result, grace=5.0)
            if on_poll:
                on_poll()
            return result
        time.sleep(POLL_S)


def _stop_rest(agents: Sequence[AgentProcess], running: Dict[int, bool], out_dir: Path | str, result: WaitResult,
               grace: float) -> None:
    rest = [a for a in agents if running[a.rank]]
    stop_agents(rest, grace=grace)
    for a in rest:
        running[a.rank] = False
        a.returncode = result.returncodes[a.rank] = _exit_status(a, out_dir)


def _follow_restart(a: AgentProcess, out_dir: Path | str) -> bool:
    """If agent ``a`` was restarted (a new live pid in its pid file), follow the new process."""
    pid = read_pid_file(out_dir, a.rank)
    if pid is None or pid == a.pid or not pid_alive(pid):
        return False
    if a.popen is not None and a.popen.pid == a.pid and a.popen.poll() is None:
        return False  # our child still runs: the pid file is stale
    a.pid = pid
    a.returncode = None
    a.restarts += 1
    return True


def _exit_status(a: AgentProcess, out_dir: Path | str) -> Optional[int]:
    if a.popen is not None and a.popen.pid == a.pid:
        return a.popen.wait(timeout=5.0)
    return read_exit_file(out_dir, a.rank)  # None: it died without saying (SIGKILL)


# --------------------------------------------------------------------------------------------------- argv / env


def agent_argv(config: Path | str, rank: int, transport: str, out_dir: Path | str,
               peers: Optional[Path | str] = None, resume: bool = False,
               python: str = sys.executable, join: bool = False) -> List[str]:
    """The command line of one ``dimat agent`` process (``join``: a new machine joining from a neighbour)."""
    argv = [python, "-m", "dimat", "agent", str(config), "--rank", str(rank), "--transport", transport,
            "--out", str(out_dir)]
    if peers is not None:
        argv += ["--peers", str(peers)]
    if resume:
        argv.append("--resume")
    if join:
        argv.append("--join")
    return argv


#: Environment variables through which torchrun (and torch.distributed's env:// rendezvous) describe a job.
_DISTRIBUTED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                     "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


def torch_env(rank: int, world_size: int, master_port: int, master_addr: str = "127.0.0.1",
              base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment torchrun would give rank ``rank`` of a one-node job (read by ``init_process_group``)."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
               GROUP_RANK="0", MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    # Several gloo processes on a few cores: one intra-op thread each, or they oversubscribe the machine.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def tail(path: Path | str, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist), to show why an agent failed."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------------- launch


@dataclass
class LaunchResult:
    """What :func:`launch` did: the agents' exit statuses, the summary it wrote, the attempts port clashes cost."""

    out_dir: Path
    transport: str
    wait: WaitResult
    summary: Optional[dict]
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.wait.ok


def check_multiprocess(cfg: Mapping) -> None:
    """UserError unless ``cfg`` can run one process per agent (the merge methods can; the step-level gossip
    baselines and the centralised bound run only in ``dimat run``)."""
    from dimat import gossip

    method = cfg["merge"]["method"]
    if gossip.handles(method):
        raise UserError(f"merge.method: {method!r} exchanges models every local step and runs only in 'dimat run'; "
                        f"one process per agent runs the merge methods (dimat, wm, wa, none)")


def launch(
    cfg: Mapping,
    transport: str,
    out_dir: Path | str,
    timeout: Optional[float] = None,
    resume: bool = False,
    port_attempts: int = 3,
    host: str = "127.0.0.1",
    echo: Callable[[str], None] = print,
) -> LaunchResult:
    """Run ``cfg`` as ``cfg["agents"]`` local ``dimat agent`` processes over ``transport`` and wait for them.

    Writes ``OUT/config.yaml`` (the config every agent reads), ``OUT/peers.json`` (gRPC) and the per-agent
    files listed in the module docstring, copies metrics lines into ``OUT/metrics.jsonl`` while the agents run,
    and writes ``OUT/summary.json`` (the fields of ``dimat run``'s) at the end.

    Parameters
    ----------
    cfg : a resolved config (:func:`dimat.config.load_config`).
    transport : ``grpc`` or ``torch`` (torch.distributed over gloo).
    out_dir : the run folder.
    timeout : seconds to wait for the agents before stopping them (None: as long as they run).
    resume : start every agent with ``--resume`` (continue from its checkpoint).
    port_attempts : start-ups to try when an agent finds its port taken (ports are probed, then released).
    host : address the gRPC servers / the torch rendezvous bind (local agents only).
    echo : where progress lines go.
    """
    from dimat.config import Config, dump
    from dimat.build import check_run_dir, prepare

    if transport not in ("grpc", "torch"):
        raise UserError(f"--transport must be grpc or torch, got {transport!r}")
    out = Path(out_dir)
    n = int(cfg["agents"])
    plain = Config.wrap(cfg).to_dict()
    plain["out"] = str(out)
    plain["transport"] = dict(plain["transport"], name=transport)
    keys = _credentials_dir(plain, out) if transport == "grpc" else None
    if keys is not None:
        plain["transport"]["credentials_file"] = str(keys / "agent-{rank}.keys.yaml")
    # Input errors surface here once, not N times in N agents' logs; and a finished run is never overwritten.
    check_multiprocess(plain)
    prepare(plain)
    check_run_dir(Config.wrap(plain), out, resume)
    out.mkdir(parents=True, exist_ok=True)
    if keys is not None and not (keys / f"agent-{n - 1}.keys.yaml").exists():
        from dimat.transport.identity import write_credentials

        write_credentials(keys, n)  # a fresh master key, used for these files and forgotten
    config_path = out / "config.yaml"
    _atomic_write(config_path, dump(plain))

    t0 = time.monotonic()
    for attempt in range(1, port_attempts + 1):
        agents = _start(config_path, transport, n, out, resume, host)
        echo(f"dimat launch: {n} agents over {transport}, pids {[a.pid for a in agents]}, logs in {out / 'logs'}")
        follower = MetricsFollower(out, range(n))
        progress = _Progress(n, int(cfg["rounds"]), echo)
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))

        def on_poll() -> None:
            progress.update(follower.poll())

        try:
            waited = wait_agents(agents, out, timeout=remaining, fail_fast=(transport == "torch"), on_poll=on_poll)
        except BaseException:  # Ctrl-C or SIGTERM: the agents run in their own sessions, so stop them here
            stop_agents(agents)
            raise
        if not (waited.port_in_use and attempt < port_attempts):
            break
        echo(f"dimat launch: a port was taken before an agent could bind it; retrying with new ports "
             f"(attempt {attempt + 1} of {port_attempts})")
        if not resume:
            _clear_outputs(out, n)  # agents that did start may have finished a round; this is a fresh run
    wall_s = time.monotonic() - t0
    summary = write_summary(out, plain, wall_s, with_summary=waited.ok)
    for rank in waited.failed():
        echo(f"dimat launch: agent {rank} exited with status {waited.returncodes[rank]}; last lines of "
             f"{log_path(out, rank)}:\n{tail(log_path(out, rank))}")
    if waited.timed_out:
        echo(f"dimat launch: stopped the agents after the {timeout:g} s timeout")
    return LaunchResult(out, transport, waited, summary, attempt)


def _clear_outputs(out: Path, n: int) -> None:
    """Remove the agents' metrics and checkpoints (before starting a fresh run again)."""
    from dimat import checkpoint

    for k in range(n):
        agent_metrics_path(out, k).unlink(missing_ok=True)
        for prev in (False, True):
            checkpoint.path_for(out / "checkpoints", k, prev=prev).unlink(missing_ok=True)


def _credentials_dir(cfg: Mapping, out: Path) -> Optional[Path]:
    """Where a launch keeps generated per-agent gRPC credentials, or None when the user gave a secret or
    credentials (config or environment).

    Local agents listen on ports that any local user could connect to; with credentials only the agents of this
    run (and whoever can read the run folder's 0600 key files, e.g. an agent restarted with --resume) can post,
    each only as itself (see dimat/transport/identity.py).
    """
    from dimat.transport import SECRET_ENV

    t = cfg["transport"]
    if t.get("secret_file") or t.get("credentials_file") or os.environ.get(SECRET_ENV):
        return None
    return out.resolve() / "keys"


def _start(config_path: Path, transport: str, n: int, out: Path, resume: bool, host: str) -> List[AgentProcess]:
    # A launcher started from inside a torchrun/SLURM job must not hand that job's ranks to its own agents.
    base = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_VARS}
    # N agent processes share the machine's cores: one intra-op thread each, or they oversubscribe it.
    base.setdefault("OMP_NUM_THREADS", "1")
    if transport == "grpc":
        peers_file = out / "peers.json"
        write_peers(peers_file, {k: f"{host}:{p}" for k, p in enumerate(free_ports(n, host))})
        return [spawn_agent(k, agent_argv(config_path, k, "grpc", out, peers_file, resume), out, base)
                for k in range(n)]
    port = free_ports(1, host)[0]
    return [spawn_agent(k, agent_argv(config_path, k, "torch", out, None, resume), out,
                        torch_env(k, n, port, host, base)) for k in range(n)]


def write_summary(out_dir: Path | str, cfg: Mapping, wall_s: float, with_summary: bool = True) -> Optional[dict]:
    """Write the run's final ``metrics.jsonl`` and ``summary.json`` from the per-agent metrics files.

    ``metrics.jsonl`` grew in the order the agents wrote their records; it is replaced (atomically) by every
    agent's records sorted as ``dimat run`` writes them, without the records an agent dropped when it resumed
    from an earlier checkpoint. ``summary.json`` is written only ``with_summary`` (a run that did not finish has
    none, as with ``dimat run``). Returns the summary (None when not written or no agent wrote a record).
    """
    from dimat.metrics import atomic_write_text, read_metrics, summarize

    out = Path(out_dir)
    paths = [agent_metrics_path(out, k) for k in range(int(cfg["agents"]))]
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    records = read_metrics(paths)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if not with_summary:
        return None
    summary = summarize(records, cfg["merge"]["method"], int(cfg["agents"]), int(cfg["rounds"]), wall_s)
    coverage = _coverage(out, cfg)
    if coverage is not None:
        summary["merge_coverage"] = coverage
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def coverage_path(out_dir: Path | str, rank: int) -> Path:
    """Where agent ``rank`` records the merge's coverage of the model (written once, at its start)."""
    return Path(out_dir) / "metrics" / f"coverage-{rank}.json"


def write_coverage(out_dir: Path | str, rank: int, record: Optional[dict]) -> None:
    """Record the coverage an agent derived at its start (nothing when its method aligns nothing)."""
    from dimat.metrics import atomic_write_text

    if record is None:
        return
    p = coverage_path(out_dir, rank)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(record) + "\n")


def _coverage(out_dir: Path, cfg: Mapping) -> Optional[dict]:
    """The merge's coverage as the agents recorded it at their start (the lowest rank that wrote one; every agent
    derives it from the same model). None when the method aligns nothing."""
    for k in range(int(cfg["agents"])):
        p = coverage_path(out_dir, k)
        if p.exists():
            return json.loads(p.read_text())
    return None


class _Progress:
    """Prints one line per round once every agent has reported that round's merge."""

    def __init__(self, n: int, rounds: int, echo: Callable[[str], None]):
        self.n, self.rounds, self.echo = n, rounds, echo
        self.done: Dict[int, Dict[int, float]] = {}
        self.printed: set = set()

    def update(self, records: Iterable[dict]) -> None:
        for rec in records:
            if rec.get("phase") == "merge" and rec.get("test_acc") is not None:
                self.done.setdefault(rec.get("round"), {})[rec.get("agent")] = rec["test_acc"]
        for r, accs in sorted(self.done.items()):
            if r not in self.printed and len(accs) == self.n:
                self.printed.add(r)
                mean = sum(accs.values()) / len(accs)
                self.echo(f"round {r + 1}/{self.rounds}: mean test accuracy after merge {mean:.4f}")
