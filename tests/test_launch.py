"""Tests of dimat/launcher.py and the `dimat launch` / `dimat agent` command lines (process management with small
stand-in processes; the real multi-process runs are at the end of this file and in test_fault.py/test_torchrun.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dimat import launcher
from dimat.cli import main as cli_main
from dimat.commands.agent import resolve_rank, resolve_transport
from dimat.errors import UserError

PY = sys.executable


# ------------------------------------------------------------------------------------------------ ports


def test_free_ports_are_distinct_and_bindable():
    ports = launcher.free_ports(8)
    assert len(set(ports)) == 8
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_free_ports_rejects_negative():
    with pytest.raises(ValueError):
        launcher.free_ports(-1)


def test_is_addr_in_use_recognises_bind_errors():
    with socket.socket() as a:
        a.bind(("127.0.0.1", 0))
        a.listen()
        with socket.socket() as b, pytest.raises(OSError) as info:
            b.bind(("127.0.0.1", a.getsockname()[1]))
    assert launcher.is_addr_in_use(info.value)
    assert launcher.is_addr_in_use(RuntimeError("Failed to bind to address 127.0.0.1:5000"))
    assert not launcher.is_addr_in_use(RuntimeError("connection refused"))


# ------------------------------------------------------------------------------------------------ peers file


def test_peers_round_trip(tmp_path):
    p = tmp_path / "peers.json"
    launcher.write_peers(p, {1: "10.0.0.2:7001", 0: "10.0.0.1:7000"})
    assert json.loads(p.read_text()) == {"peers": {"0": "10.0.0.1:7000", "1": "10.0.0.2:7001"}}
    assert launcher.read_peers(p, n=2) == {0: "10.0.0.1:7000", 1: "10.0.0.2:7001"}


def test_peers_bare_mapping_and_ipv6(tmp_path):
    p = tmp_path / "peers.json"
    p.write_text(json.dumps({"0": "[::1]:7000", "1": "host-b:7000"}))
    assert launcher.read_peers(p) == {0: "[::1]:7000", 1: "host-b:7000"}


@pytest.mark.parametrize(
    "body, match",
    [
        ("{not json", "cannot read peers file"),
        ("[1, 2]", "field 'peers'"),
        ('{"peers": {}}', "non-empty mapping"),
        ('{"peers": {"a": "h:1"}}', "rank 'a' is not an integer"),
        ('{"peers": {"0": "h:1", "2": "h:2"}}', r"ranks must be 0..1"),
        ('{"peers": {"0": "nohostport"}}', "peers.0"),
        ('{"peers": {"0": ":7000"}}', "missing host"),
        ('{"peers": {"0": "h:0"}}', "port must be 1..65535"),
        ('{"peers": {"0": "h:99999"}}', "port must be 1..65535"),
        ('{"peers": {"0": 7000}}', "peers.0"),
    ],
)
def test_peers_bad_input(tmp_path, body, match):
    p = tmp_path / "peers.json"
    p.write_text(body)
    with pytest.raises(UserError, match=match) as info:
        launcher.read_peers(p)
    assert str(p) in str(info.value)


def test_peers_missing_file_and_wrong_count(tmp_path):
    with pytest.raises(UserError, match="not found"):
        launcher.read_peers(tmp_path / "nope.json")
    p = tmp_path / "peers.json"
    launcher.write_peers(p, {0: "h:1", 1: "h:2"})
    with pytest.raises(UserError, match="2 peers for a config with 4 agents"):
        launcher.read_peers(p, n=4)


# ------------------------------------------------------------------------------------------------ metrics follower


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(text)


def test_follower_copies_only_complete_lines_as_they_appear(tmp_path):
    f = launcher.MetricsFollower(tmp_path, range(2))
    assert f.poll() == [] and (tmp_path / "metrics.jsonl").read_text() == ""
    a0, a1 = launcher.agent_metrics_path(tmp_path, 0), launcher.agent_metrics_path(tmp_path, 1)
    _append(a0, '{"round": 0, "agent": 0}\n{"round": 1, "ag')
    _append(a1, '{"round": 0, "agent": 1}\n')
    got = f.poll()
    assert sorted(r["agent"] for r in got) == [0, 1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    _append(a0, 'ent": 0}\n')
    assert f.poll() == [{"round": 1, "agent": 0}]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"round": 0, "agent": 0}, {"round": 0, "agent": 1}, {"round": 1, "agent": 0}]
    assert f.poll() == []


def test_follower_survives_an_agent_rewriting_its_file_on_resume(tmp_path):
    f = launcher.MetricsFollower(tmp_path, [0])
    p = launcher.agent_metrics_path(tmp_path, 0)
    _append(p, "".join(json.dumps({"round": r, "agent": 0}) + "\n" for r in range(3)))
    assert len(f.poll()) == 3
    # The resumed agent keeps rounds 0..1 in a new file (atomic replace), then appends round 3.
    tmp = p.with_name("tmp")
    tmp.write_text("".join(json.dumps({"round": r, "agent": 0}) + "\n" for r in range(2)))
    os.replace(tmp, p)
    _append(p, json.dumps({"round": 3, "agent": 0}) + "\n")
    assert f.poll() == [{"round": 3, "agent": 0}]
    rounds = [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]


def test_follower_fresh_truncates_target(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("old\n")
    launcher.MetricsFollower(tmp_path, [0])
    assert (tmp_path / "metrics.jsonl").read_text() == ""


# ------------------------------------------------------------------------------------------------ processes


def _sleeper(seconds: float, code: int = 0) -> list:
    return [PY, "-c", f"import time, sys; time.sleep({seconds}); sys.exit({code})"]


def test_spawn_writes_pid_and_log_and_wait_collects_status(tmp_path):
    agents = [launcher.spawn_agent(0, [PY, "-c", "print('hello from 0')"], tmp_path),
              launcher.spawn_agent(1, _sleeper(0.3, 3), tmp_path)]
    assert launcher.read_pid_file(tmp_path, 0) == agents[0].pid
    res = launcher.wait_agents(agents, tmp_path, timeout=30)
    assert res.returncodes == {0: 0, 1: 3}
    assert not res.ok and res.failed() == [1] and not res.timed_out
    assert "hello from 0" in launcher.log_path(tmp_path, 0).read_text()


def test_wait_times_out_and_stops_agents(tmp_path):
    agents = [launcher.spawn_agent(k, _sleeper(60), tmp_path) for k in range(2)]
    t0 = time.monotonic()
    res = launcher.wait_agents(agents, tmp_path, timeout=0.5)
    assert res.timed_out and not res.ok
    assert time.monotonic() - t0 < 20
    assert all(not a.alive() for a in agents)
    assert res.returncodes == {0: -signal.SIGTERM, 1: -signal.SIGTERM}


def test_fail_fast_stops_the_others(tmp_path):
    agents = [launcher.spawn_agent(0, _sleeper(0.1, 1), tmp_path), launcher.spawn_agent(1, _sleeper(60), tmp_path)]
    res = launcher.wait_agents(agents, tmp_path, timeout=30, fail_fast=True)
    assert res.returncodes[0] == 1 and res.returncodes[1] == -signal.SIGTERM
    assert not agents[1].alive()


def test_without_fail_fast_the_others_run_on(tmp_path):
    agents = [launcher.spawn_agent(0, _sleeper(0.0, 1), tmp_path), launcher.spawn_agent(1, _sleeper(0.6), tmp_path)]
    res = launcher.wait_agents(agents, tmp_path, timeout=30, fail_fast=False)
    assert res.returncodes == {0: 1, 1: 0}


def test_port_clash_stops_everyone(tmp_path):
    agents = [launcher.spawn_agent(0, _sleeper(0.0, launcher.EXIT_PORT_IN_USE), tmp_path),
              launcher.spawn_agent(1, _sleeper(60), tmp_path)]
    res = launcher.wait_agents(agents, tmp_path, timeout=30)
    assert res.port_in_use and not agents[1].alive()


def test_wait_follows_an_agent_restarted_through_its_pid_file(tmp_path):
    """Agent 1 is killed; a replacement (not our child) writes the pid file and exits 0: the launcher reports 0."""
    agents = [launcher.spawn_agent(0, _sleeper(1.5), tmp_path), launcher.spawn_agent(1, _sleeper(60), tmp_path)]
    os.kill(agents[1].pid, signal.SIGKILL)
    script = (f"import time; from dimat import launcher; launcher.write_pid_file({str(tmp_path)!r}, 1); "
              f"time.sleep(0.8); launcher.write_exit_file({str(tmp_path)!r}, 1, 0)")
    replacement = subprocess.Popen([PY, "-c", script])
    try:
        res = launcher.wait_agents(agents, tmp_path, timeout=30)
    finally:
        replacement.wait(timeout=30)
    assert res.returncodes == {0: 0, 1: 0}
    assert agents[1].restarts == 1 and agents[1].pid == replacement.pid


def test_killed_replacement_reports_unknown_status(tmp_path):
    agents = [launcher.spawn_agent(0, _sleeper(1.0), tmp_path), launcher.spawn_agent(1, _sleeper(60), tmp_path)]
    os.kill(agents[1].pid, signal.SIGKILL)
    script = f"import time; from dimat import launcher; launcher.write_pid_file({str(tmp_path)!r}, 1); time.sleep(60)"
    replacement = subprocess.Popen([PY, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while launcher.read_pid_file(tmp_path, 1) != replacement.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let the launcher adopt it
        replacement.kill()
        res = launcher.wait_agents(agents, tmp_path, timeout=30)
    finally:
        replacement.kill()
        replacement.wait(timeout=30)
    assert res.returncodes[0] == 0 and res.returncodes[1] in (None, -signal.SIGKILL)
    assert not res.ok


def test_stop_agents_escalates_to_sigkill(tmp_path):
    stubborn = [PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('ready', flush=True); time.sleep(60)"]
    a = launcher.spawn_agent(0, stubborn, tmp_path)
    deadline = time.monotonic() + 20
    while "ready" not in launcher.log_path(tmp_path, 0).read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.stop_agents([a], grace=0.3)
    assert a.popen.returncode == -signal.SIGKILL


def test_pid_and_exit_files(tmp_path):
    launcher.write_exit_file(tmp_path, 3, 0)
    launcher.write_pid_file(tmp_path, 3, 12345)
    assert launcher.read_pid_file(tmp_path, 3) == 12345
    assert launcher.read_exit_file(tmp_path, 3) is None  # a new pid forgets the old exit status
    launcher.write_exit_file(tmp_path, 3, 7)
    assert launcher.read_exit_file(tmp_path, 3) == 7
    assert launcher.read_pid_file(tmp_path, 9) is None


def test_agent_argv_and_torch_env():
    argv = launcher.agent_argv("c.yaml", 2, "grpc", "out", "out/peers.json", resume=True)
    assert argv[1:] == ["-m", "dimat", "agent", "c.yaml", "--rank", "2", "--transport", "grpc", "--out", "out",
                        "--peers", "out/peers.json", "--resume"]
    env = launcher.torch_env(2, 4, 29500, base={})
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "4" and env["MASTER_PORT"] == "29500"
    assert env["MASTER_ADDR"] == "127.0.0.1"


def test_tail(tmp_path):
    p = tmp_path / "x.log"
    p.write_text("".join(f"line {i}\n" for i in range(100)))
    assert launcher.tail(p, 2) == "line 98\nline 99"
    assert launcher.tail(tmp_path / "missing") == ""


# ------------------------------------------------------------------------------------------------ CLI arguments


def test_resolve_rank():
    assert resolve_rank(3, env={}) == 3
    assert resolve_rank(None, env={"RANK": "2"}) == 2
    assert resolve_rank(2, env={"RANK": "2"}) == 2
    with pytest.raises(UserError, match="disagrees"):
        resolve_rank(1, env={"RANK": "2"})
    with pytest.raises(UserError, match="--rank K"):
        resolve_rank(None, env={})
    with pytest.raises(UserError, match="not an integer"):
        resolve_rank(None, env={"RANK": "x"})
    with pytest.raises(UserError, match=">= 0"):
        resolve_rank(-1, env={})


def test_resolve_transport():
    assert resolve_transport("grpc", "torch", env={}) == "grpc"
    assert resolve_transport(None, "inproc", env={"TORCHELASTIC_RUN_ID": "x"}) == "torch"
    assert resolve_transport(None, "grpc", env={}) == "grpc"
    with pytest.raises(UserError, match="--transport grpc or --transport torch"):
        resolve_transport(None, "inproc", env={})


def _config(tmp_path: Path, **extra) -> Path:
    body = {"agents": 2, "rounds": 1, "data": {"dataset": "synthetic"}, "model": {"width": 0.1},
            "merge": {"method": "wa"}}
    body.update(extra)
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(body))
    return p


def test_launch_needs_a_multiprocess_transport(tmp_path, capsys):
    assert cli_main(["launch", str(_config(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    assert "--transport grpc or --transport torch" in capsys.readouterr().err


@pytest.mark.parametrize("flags, match", [(["--agents", "0"], "--agents must be >= 1"),
                                          (["--timeout", "0"], "--timeout must be > 0"),
                                          (["--set", "nokey=1"], "unknown key")])
def test_launch_bad_flags(tmp_path, capsys, flags, match):
    rc = cli_main(["launch", str(_config(tmp_path)), "--transport", "grpc", "--out", str(tmp_path / "o")] + flags)
    assert rc == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o" / "pids").exists()


def test_agent_bad_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    rc = cli_main(["agent", str(_config(tmp_path)), "--rank", "5", "--transport", "grpc", "--out", str(tmp_path / "o")])
    assert rc == 2 and "out of range" in capsys.readouterr().err
    assert launcher.read_exit_file(tmp_path / "o", 5) == 2


def test_agent_grpc_without_peers(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    rc = cli_main(["agent", str(_config(tmp_path)), "--rank", "0", "--transport", "grpc", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--peers FILE" in capsys.readouterr().err


def test_agent_refuses_a_run_folder_of_another_config(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.yaml").write_text("agents: 2\nrounds: 7\n")
    peers = tmp_path / "peers.json"
    launcher.write_peers(peers, {0: "127.0.0.1:1", 1: "127.0.0.1:2"})
    rc = cli_main(["agent", str(_config(tmp_path)), "--rank", "0", "--transport", "grpc", "--out", str(out),
                   "--peers", str(peers)])
    assert rc == 2 and "every agent must run the same config" in capsys.readouterr().err


def test_agent_resume_needs_a_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    peers = tmp_path / "peers.json"
    launcher.write_peers(peers, {0: "127.0.0.1:1", 1: "127.0.0.1:2"})
    rc = cli_main(["agent", str(_config(tmp_path)), "--rank", "0", "--transport", "grpc", "--out", str(tmp_path / "o"),
                   "--peers", str(peers), "--resume"])
    assert rc == 2 and "no run to resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real launches

TINY = {
    "agents": 5,  # the launches below pass --agents 3
    "rounds": 2,
    "topology": "ring",
    "seed": 3,
    "data": {"dataset": "synthetic:train=600,test=150"},
    "model": {"name": "mlp", "width": 0.25},
    "train": {"epochs": 1},
    "merge": {"method": "dimat"},
    "transport": {"deadline_s": 30},
}
SAME = ("round", "agent", "phase", "test_acc", "test_loss", "local_test_acc", "train_loss", "received", "missing")


def _run(args, timeout=150):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same intra-op threads in the reference and the agents
    env.pop("RANK", None)
    return subprocess.run([PY, "-m", "dimat"] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=env)


def _simulate(cfg: Path, out: Path, agents: int) -> None:
    """`dimat run` of ``cfg`` with ``agents`` agents into ``out``, with one intra-op thread as in the agents
    (OMP_NUM_THREADS=1): the thread count changes float sums."""
    import torch

    from dimat.config import load_config
    from dimat.runner import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_config(cfg, [f"agents={agents}"]), out, quiet=True)
    finally:
        torch.set_num_threads(threads)


def _launch(cfg: Path, transport: str, agents: int, out: Path) -> subprocess.CompletedProcess:
    """`dimat launch` of ``cfg``; fails the test with the agents' log tails when it does not exit 0."""
    proc = _run(["launch", str(cfg), "--transport", transport, "--agents", str(agents), "--out", str(out),
                 "--timeout", "120"])
    assert proc.returncode == 0, proc.stdout + "\n".join(launcher.tail(launcher.log_path(out, k))
                                                          for k in range(agents))
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config and its `dimat run` (in-process) records."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = d / "tiny.yaml"
    cfg.write_text(json.dumps(TINY))
    from dimat.metrics import read_metrics

    _simulate(cfg, d / "ref", 3)
    return cfg, read_metrics([d / "ref" / "metrics.jsonl"]), json.loads((d / "ref" / "summary.json").read_text())


@pytest.mark.parametrize("transport", ["grpc", "torch"])
def test_launch_reproduces_dimat_run(tiny, tmp_path, transport):
    from dimat.metrics import read_metrics

    cfg, ref, ref_summary = tiny
    out = tmp_path / "out"
    proc = _launch(cfg, transport, 3, out)
    assert "round 2/2" in proc.stdout
    for k in range(3):
        assert launcher.read_pid_file(out, k) and launcher.read_exit_file(out, k) == 0
        assert launcher.log_path(out, k).exists()
    if transport == "grpc":
        assert sorted(launcher.read_peers(out / "peers.json", n=3)) == [0, 1, 2]
        # Generated per-agent credentials, readable by the owner only, that every agent used.
        assert all((out / f"keys/agent-{k}.keys.yaml").stat().st_mode & 0o777 == 0o600 for k in range(3))
        assert f"credentials_file: {(out / 'keys').resolve()}/agent-{{rank}}.keys.yaml" in (
            out / "config.yaml").read_text()
        assert not any("no shared secret" in launcher.log_path(out, k).read_text() for k in range(3))
    # Same seeds, same data order, every snapshot in time: the very same numbers as the simulation.
    got = read_metrics([out / "metrics.jsonl"])
    assert [{k: r.get(k) for k in SAME} for r in got] == [{k: r.get(k) for k in SAME} for r in ref]
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "wall_s"} == {k: v for k, v in ref_summary.items()
                                                                  if k != "wall_s"}
    # The coverage comes from what the agents derived at their start (the launcher loads no data).
    assert summary["merge_coverage"] == ref_summary["merge_coverage"] == json.loads(
        launcher.coverage_path(out, 0).read_text())


@pytest.mark.parametrize("transport", ["grpc", "torch"])
def test_shared_basis_tags_travel_between_processes(tmp_path, transport):
    # On a ring of 4 the agents' basis tags differ after round 0 (0, 0, 1, 0), so round 1's merges depend on the
    # tags that arrived with the snapshots: the launch matches the simulation only if they travelled intact.
    from dimat.metrics import read_metrics

    cfg = tmp_path / "shared.yaml"
    cfg.write_text(json.dumps(dict(TINY, rounds=3, merge={"method": "dimat", "basis": "shared"})))
    _simulate(cfg, tmp_path / "ref", 4)
    out = tmp_path / "out"
    _launch(cfg, transport, 4, out)
    got, ref = (read_metrics([d / "metrics.jsonl"]) for d in (out, tmp_path / "ref"))
    assert [{k: r.get(k) for k in SAME} for r in got] == [{k: r.get(k) for k in SAME} for r in ref]


@pytest.mark.slow
@pytest.mark.parametrize("transport, basis", [("grpc", "own"), ("torch", "own"), ("grpc", "shared"),
                                              ("torch", "shared")])
def test_stats_from_both_sides_travel_between_processes(tmp_path, transport, basis):
    """merge.stats both: the second message of every round crosses between processes, and the launch gives the
    simulation's very numbers. Under basis own every edge pools both sides' statistics every round; under shared
    only round 0 aligns (3 agents, all neighbours: tag 0 reaches everyone at once), and later rounds send none."""
    from dimat.metrics import read_metrics

    cfg = tmp_path / "both.yaml"
    cfg.write_text(json.dumps(dict(TINY, merge={"method": "dimat", "stats": "both", "basis": basis})))
    _simulate(cfg, tmp_path / "ref", 3)
    out = tmp_path / "out"
    _launch(cfg, transport, 3, out)
    got, ref = (read_metrics([d / "metrics.jsonl"]) for d in (out, tmp_path / "ref"))
    keys = SAME + ("stats_bytes", "stats_both", "stats_fallback", "stats_unused")
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys} for r in ref]
    merges = [r for r in got if r["phase"] == "merge"]
    assert merges and all(r["stats_fallback"] == [] for r in merges)
    if basis == "own":
        assert all(len(r["stats_both"]) == 2 and r["stats_bytes"] > 0 for r in merges)
    else:
        first = {r["agent"]: r for r in merges if r["round"] == 0}
        assert first[0]["stats_both"] == [1, 2] and first[1]["stats_both"] == [0] and first[2]["stats_both"] == [0]
        assert all(r["stats_bytes"] == 0 and r["stats_both"] == [] for r in merges if r["round"] > 0)


def test_launch_refuses_a_finished_run_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert cli_main(["launch", str(_config(tmp_path)), "--transport", "grpc", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert not (out / "pids").exists()


def test_gossip_baselines_are_refused(tmp_path, capsys):
    cfg = _config(tmp_path, merge={"method": "cdsgd"})
    assert cli_main(["launch", str(cfg), "--transport", "grpc", "--out", str(tmp_path / "o")]) == 2
    assert "runs only in 'dimat run'" in capsys.readouterr().err
    assert cli_main(["agent", str(cfg), "--rank", "0", "--transport", "torch", "--out", str(tmp_path / "o")]) == 2
    assert "runs only in 'dimat run'" in capsys.readouterr().err


@pytest.mark.slow
def test_torch_launch_killed_then_resumed_reproduces_dimat_run(tiny, tmp_path):
    """A torch launch loses an agent after round 1 (the whole job stops); `launch --resume` finishes it, and the
    records equal an uninterrupted `dimat run` (checkpoints restore model, optimizer and RNG)."""
    import torch

    from dimat.metrics import read_metrics

    cfg = tmp_path / "long.yaml"
    cfg.write_text(json.dumps(dict(TINY, agents=3, rounds=4, train={"epochs": 3})))
    ref = _run(["run", str(cfg), "--out", str(tmp_path / "ref"), "-q"])
    assert ref.returncode == 0, ref.stdout
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = subprocess.Popen([PY, "-m", "dimat", "launch", str(cfg), "--transport", "torch", "--out", str(out),
                               "--timeout", "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        ckpt = out / "checkpoints" / "agent-1.pt"
        deadline = time.monotonic() + 90
        while True:
            try:
                if torch.load(ckpt, map_location="cpu", weights_only=True)["round"] >= 1:
                    break
            except Exception:  # not written yet, or being replaced
                pass
            # "Killed after round 1" is the premise of this test: never kill anyway when it was not reached.
            assert time.monotonic() < deadline, "agent 1 never wrote its round-1 checkpoint within 90 s"
            assert launch.poll() is None, "the launch ended before agent 1 wrote its round-1 checkpoint"
            time.sleep(0.02)
        os.kill(launcher.read_pid_file(out, 1), signal.SIGKILL)
        text, _ = launch.communicate(timeout=120)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    assert launch.returncode == 1 and "--resume" in text and not (out / "summary.json").exists()
    again = _run(["launch", str(out / "config.yaml"), "--transport", "torch", "--out", str(out), "--resume",
                  "--timeout", "120"])
    assert again.returncode == 0, again.stdout
    got = read_metrics([out / "metrics.jsonl"])
    want = read_metrics([tmp_path / "ref" / "metrics.jsonl"])
    assert [{k: r.get(k) for k in SAME} for r in got] == [{k: r.get(k) for k in SAME} for r in want]


# ------------------------------------------------------------------------------------------------ launch/ scripts

REPO = Path(__file__).resolve().parents[1]
START_AGENTS = REPO / "launch" / "grpc-cluster" / "start-agents.sh"


def test_start_agents_script_dry_run():
    env = dict(os.environ, DRY_RUN="1", REMOTE_DIR="/opt/dimat")
    proc = subprocess.run(["bash", str(START_AGENTS), "launch/grpc-cluster/cluster.yaml",
                           "launch/grpc-cluster/peers.json", "runs/c"], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    for k, host in enumerate("abcd"):
        assert f"node-{host}.example.org" in lines[k] and f"--rank {k} --transport grpc" in lines[k]
        assert "--resume" not in lines[k]
    env.update(RANKS="2", RESUME="1")
    proc = subprocess.run(["bash", str(START_AGENTS), "launch/grpc-cluster/cluster.yaml",
                           "launch/grpc-cluster/peers.json", "runs/c"], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert proc.stdout.count("\n") == 1 and "node-c.example.org" in proc.stdout and "--rank 2" in proc.stdout
    assert "--resume" in proc.stdout


def test_start_agents_script_bad_peers(tmp_path):
    peers = tmp_path / "peers.json"
    peers.write_text('{"peers": {"0": "a:1", "2": "b:1"}}')
    proc = subprocess.run(["bash", str(START_AGENTS), "c.yaml", str(peers)], env=dict(os.environ, DRY_RUN="1"),
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert proc.returncode != 0 and "ranks must be 0..1" in proc.stderr


@pytest.mark.slow
def test_start_agents_script_runs_a_local_cluster(tmp_path):
    """start-agents.sh with an 'ssh' that runs the command here: 3 standalone agents on 127.0.0.1 from a peers
    file, authenticated with a secret file, finish their rounds."""
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text('#!/bin/sh\nshift\nexec /bin/sh -c "$1"\n')
    fake_ssh.chmod(0o755)
    (tmp_path / "secret.txt").write_text("s3cret\n")
    (tmp_path / "secret.txt").chmod(0o600)
    cfg = dict(TINY, agents=3, transport={"name": "grpc", "deadline_s": 30, "secret_file": "secret.txt"})
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    launcher.write_peers(tmp_path / "peers.json", {k: f"127.0.0.1:{p}" for k, p in enumerate(launcher.free_ports(3))})
    env = dict(os.environ, SSH=str(fake_ssh), REMOTE_DIR=str(tmp_path), PYTHON=PY, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(START_AGENTS), "c.yaml", "peers.json", "out"], env=env, text=True, cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert proc.stdout.count("starting agent") == 3, proc.stdout
    assert proc.returncode == 0, proc.stdout
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(launcher.read_exit_file(out, k) is None for k in range(3)):
        time.sleep(0.2)
    logs = "\n".join(launcher.tail(launcher.log_path(out, k)) for k in range(3))
    assert [launcher.read_exit_file(out, k) for k in range(3)] == [0, 0, 0], logs
    assert "no shared secret" not in logs
    from dimat.metrics import read_metrics

    recs = read_metrics([launcher.agent_metrics_path(out, k) for k in range(3)])
    assert all(len(r["received"]) == 2 for r in recs if r["phase"] == "merge")


def test_agent_bad_transport_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    peers = tmp_path / "peers.json"
    launcher.write_peers(peers, {0: "127.0.0.1:1", 1: "127.0.0.1:2"})
    rc = cli_main(["agent", str(_config(tmp_path)), "--rank", "0", "--transport", "grpc", "--out", str(tmp_path / "o"),
                   "--peers", str(peers), "--set", f"transport.secret_file={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "transport (grpc)" in err and "missing" in err


def test_agent_port_taken_exits_for_a_retry(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        peers = tmp_path / "peers.json"
        launcher.write_peers(peers, {0: f"127.0.0.1:{s.getsockname()[1]}", 1: "127.0.0.1:2"})
        rc = cli_main(["agent", str(_config(tmp_path)), "--rank", "0", "--transport", "grpc", "--out",
                       str(tmp_path / "o"), "--peers", str(peers)])
    assert rc == launcher.EXIT_PORT_IN_USE and "cannot listen" in capsys.readouterr().err
    assert launcher.read_exit_file(tmp_path / "o", 0) == launcher.EXIT_PORT_IN_USE


def test_sigterm_to_launch_stops_its_agents(tiny, tmp_path):
    cfg, _, _ = tiny
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([PY, "-m", "dimat", "launch", str(cfg), "--transport", "grpc", "--agents", "2",
                             "--out", str(out), "--set", "rounds=50"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(launcher.read_pid_file(out, k) for k in range(2)):
            time.sleep(0.05)
        pids = [launcher.read_pid_file(out, k) for k in range(2)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all(p and not launcher.pid_alive(p) for p in pids)


@pytest.mark.slow
def test_launch_retries_when_a_port_is_taken(tmp_path, monkeypatch):
    """The first probe hands out a port that another program holds: agent 0 cannot bind, the launcher starts
    everyone again on new ports and the run finishes."""
    from dimat.config import load_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        real = launcher.free_ports
        calls = []

        def first_taken(n, host="127.0.0.1"):
            calls.append(n)
            ports = real(n, host)
            return [taken.getsockname()[1]] + ports[1:] if len(calls) == 1 else ports

        monkeypatch.setattr(launcher, "free_ports", first_taken)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        cfg = load_config(_config(tmp_path), ["merge.method=dimat"])
        result = launcher.launch(cfg, "grpc", tmp_path / "out", timeout=120, echo=lambda line: None)
    assert result.ok and result.attempts == 2, result.wait
    assert result.summary is not None and None not in result.summary["per_agent_acc"]


def test_agents_do_not_inherit_an_outer_jobs_ranks(tmp_path, monkeypatch):
    """`dimat launch` run inside a torchrun job: its agents get their own ranks, not the job's."""
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "outer")
    seen = []

    def record(rank, argv, out, env):
        seen.append(env)
        return launcher.AgentProcess(rank, None, os.getpid(), Path("log"))

    monkeypatch.setattr(launcher, "spawn_agent", record)
    launcher._start(tmp_path / "c.yaml", "grpc", 2, tmp_path, False, "127.0.0.1")
    launcher._start(tmp_path / "c.yaml", "torch", 2, tmp_path, False, "127.0.0.1")
    assert [e.get("RANK") for e in seen] == [None, None, "0", "1"]
    assert not any("TORCHELASTIC_RUN_ID" in e for e in seen)


def test_agent_world_size_must_match_agents(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc = cli_main(["agent", str(_config(tmp_path)), "--transport", "torch", "--out", str(tmp_path / "o")])
    assert rc == 2 and "WORLD_SIZE=3" in capsys.readouterr().err
