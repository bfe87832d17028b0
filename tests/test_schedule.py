"""Time-varying topologies (dimat/schedule.py): the graphs of each kind, their mixing, bad input, and a round that
follows the round's graph in the Node and in the inproc and gRPC transports."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
import torch

from dimat.cli import main as cli_main
from dimat.errors import UserError
from dimat.node import Node
from dimat.schedule import Schedule, product_spectral_gap
from dimat.topology import Topology
from dimat.transport import create
from dimat.transport.inproc import Mailbox, make_inproc


# ---------------------------------------------------------------------------------------------- the kinds
@pytest.mark.parametrize("n", [2, 5, 8, 16])
def test_one_peer_exponential_talks_to_one_peer_at_hop_two_to_the_round(n):
    s = Schedule.one_peer_exponential(n)
    tau = max(1, math.ceil(math.log2(n)))
    assert s.period == tau and s.is_static == (tau == 1)
    for r in range(2 * tau + 1):
        g = s.at(r)
        for i in range(n):
            j = (i + 2 ** (r % tau)) % n
            assert g.neighbors(i) == [j]
            assert g.weights(i) == {i: 0.5, j: 0.5}
            assert s.out_neighbors(i, r) == [(i - 2 ** (r % tau)) % n]
        assert g.is_doubly_stochastic()


@pytest.mark.parametrize("n", [4, 8, 16])
def test_one_peer_exponential_averages_exactly_over_a_period_for_powers_of_two(n):
    s = Schedule.one_peer_exponential(n)
    p = s.mixing_product(s.period, start=3)  # any tau consecutive rounds
    assert np.allclose(p, np.full((n, n), 1.0 / n), atol=1e-12)
    assert product_spectral_gap(p) == pytest.approx(1.0)


def test_one_peer_exponential_of_six_mixes_but_not_exactly():
    s = Schedule.one_peer_exponential(6)
    p = s.mixing_product(s.period)
    assert s.period == 3
    assert np.allclose(p.sum(axis=0), 1) and np.allclose(p.sum(axis=1), 1)  # the average is kept
    assert 0 < product_spectral_gap(p) < 1


@pytest.mark.parametrize("n", [2, 7, 16])
def test_random_matching_pairs_every_agent_once_per_round(n):
    s = Schedule.random_matching(n, seed=3)
    assert s.period is None and not s.is_static
    pairs = set()
    for r in range(6):
        g = s.at(r)
        degs = [g.degree(i) for i in range(n)]
        assert sorted(degs) == ([0] if n % 2 else []) + [1] * (n - n % 2)
        assert g.is_symmetric() and g.is_doubly_stochastic()
        for i in range(n):
            for j in g.neighbors(i):
                assert g.weights(i) == {i: 0.5, j: 0.5}
                pairs.add((min(i, j), max(i, j)))
            if not g.neighbors(i):
                assert g.weights(i) == {i: 1.0}
    if n > 2:
        assert len({tuple(map(tuple, Schedule.random_matching(n, 3).at(r).connectivity)) for r in range(6)}) > 1


def test_random_matching_is_a_function_of_seed_and_round_only():
    a, b = Schedule.random_matching(16, seed=5), Schedule.random_matching(16, seed=5)
    late_first = [b.at(r) for r in (9, 3, 0)]  # another process may ask for the rounds in another order
    assert [a.at(r) for r in (9, 3, 0)] == late_first
    assert Schedule.random_matching(16, seed=6).at(0) != a.at(0)
    assert a.potential_neighbors(4) == [j for j in range(16) if j != 4]


def test_a_list_is_cycled_by_round(tmp_path):
    ring = Topology.build("ring", 4)
    ring.save(tmp_path / "ring.json")
    s = Schedule.from_spec([str(tmp_path / "ring.json"), "fc"], 4)
    assert s.period == 2 and s.name == "cycle of ring.json, fc"
    assert [s.at(r).graph_type for r in range(5)] == ["ring", "fc", "ring", "fc", "ring"]
    assert s.potential_neighbors(0) == [1, 2, 3]
    # entry k of a list draws with seed + k: two 'random' entries are two graphs
    r2 = Schedule.from_spec(["random", "random"], 12, seed=1)
    assert r2.at(0) != r2.at(1)
    assert Schedule.from_spec(["ring"], 4).is_static


def test_static_kinds_and_files_stay_static(tmp_path):
    s = Schedule.from_spec("ring", 5)
    assert s.is_static and s.at(7) == Topology.build("ring", 5) and s.union() == Topology.build("ring", 5)
    assert product_spectral_gap(s.at(0).pi) == pytest.approx(s.at(0).spectral_gap())


def test_union_keeps_the_files_peers(tmp_path):
    peers = {str(k): f"10.0.0.{k + 1}:7000" for k in range(4)}
    for name, kind in (("a.json", "ring"), ("b.json", "fc")):
        d = Topology.build(kind, 4).to_dict()
        d["peers"] = peers
        (tmp_path / name).write_text(json.dumps(d))
    s = Schedule.from_spec([str(tmp_path / "a.json"), str(tmp_path / "b.json")], 4)
    assert s.union().peers == {k: f"10.0.0.{k + 1}:7000" for k in range(4)}


def test_a_union_that_leaves_agents_apart_is_reported_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = Schedule.from_spec(["disconnected", "disconnected"], 3)
        caught.clear()  # each entry's own warning
        s.union()
        s.union()
    assert [str(w.message) for w in caught] == [
        "topology schedule 'cycle of disconnected, disconnected': the union of all rounds: the graph is "
        "disconnected (3 components)"]
    assert "union of all rounds: DISCONNECTED (3 components)" in s.describe()


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec,match", [
    ("nonsense", "unknown topology kind 'nonsense'.*one-peer-exponential, random-matching"),
    ([], "at least one entry"),
    (["ring", 3], "entry 1 of the topology list must be a topology kind or file"),
    (["ring", "random-matching"], "entry 1 of the topology list: 'random-matching' is a schedule itself"),
    (["ring", "missing.json"], "entry 1 of the topology list: missing.json: no such topology file"),
    (7, "must be a kind, a file or a list"),
])
def test_bad_specs_are_one_line_errors(spec, match):
    with pytest.raises(UserError, match=match) as e:
        Schedule.from_spec(spec, 4)
    assert "\n" not in str(e.value)


def test_a_list_entry_of_another_size_is_named(tmp_path):
    Topology.build("ring", 3).save(tmp_path / "three.json")
    with pytest.raises(UserError, match=r"entry 1 of the topology list: .*three.json: field 'num_agents'"):
        Schedule.from_spec(["ring", str(tmp_path / "three.json")], 4)


def test_files_with_different_peers_are_refused(tmp_path):
    for name, port in (("a.json", 7000), ("b.json", 7001)):
        d = Topology.build("ring", 2).to_dict()
        d["peers"] = {"0": f"h:{port}", "1": f"h:{port}"}
        (tmp_path / name).write_text(json.dumps(d))
    with pytest.raises(UserError, match="different 'peers'"):
        Schedule.from_spec([str(tmp_path / "a.json"), str(tmp_path / "b.json")], 2)


@pytest.mark.parametrize("kind", ["one-peer-exponential", "random-matching"])
def test_bad_agent_counts(kind):
    with pytest.raises(UserError, match="integer >= 1"):
        Schedule.from_spec(kind, 0)


def test_negative_round():
    with pytest.raises(ValueError, match="negative"):
        Schedule.random_matching(4).at(-1)


# ---------------------------------------------------------------------------------------------- the round
def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_nodes_merge_with_the_rounds_graph_only():
    n = 6
    sched = Schedule.random_matching(n, seed=2)
    ts = make_inproc([sched.potential_neighbors(k) for k in range(n)], sched)
    nodes = [Node(_model(k), sched, k, ts[k], batches=None, method="wa", reset_bn=False) for k in range(n)]
    size = sum(p.numel() * 4 for p in nodes[0].model.state_dict().values())
    for r in range(3):
        before = [{k: v.clone() for k, v in nd.model.state_dict().items()} for nd in nodes]
        sent = [t.bytes_sent for t in ts]
        for nd in nodes:
            nd.post(r)
        results = [nd.merge_round(r) for nd in nodes]
        g = sched.at(r)
        for i, (nd, res) in enumerate(zip(nodes, results)):
            (j,) = g.neighbors(i)
            assert res.received == [j] and res.missing == [] and res.weights == {i: 0.5, j: 0.5}
            for key, v in nd.model.state_dict().items():
                assert torch.allclose(v, (before[i][key] + before[j][key]) / 2)
            assert ts[i].bytes_sent - sent[i] == size  # one copy: only the round's partner reads it
            assert res.bytes_received == size


def test_directed_schedule_counts_what_each_agent_sends():
    sched = Schedule.one_peer_exponential(4)
    ts = make_inproc([sched.potential_neighbors(k) for k in range(4)], sched)
    snap = {"w": torch.ones(10)}
    for r in range(2):
        for t in ts:
            t.post(r, snap)
        for i, t in enumerate(ts):
            assert list(t.collect(r)) == [(i + 2 ** r) % 4]
    assert all(t.bytes_sent == t.bytes_received == 2 * 40 for t in ts)


def test_create_builds_transports_that_follow_a_schedule():
    sched = Schedule.random_matching(4, seed=0)
    box = Mailbox()
    t = create("inproc", 1, sched, {}, mailbox=box)
    assert t.neighbors == [0, 2, 3] and t.round_peers is not None
    assert t.neighbors_at(5) == sched.neighbors(1, 5) and t.send_to_at(5) == sched.out_neighbors(1, 5)
    static = create("inproc", 1, Schedule.from_spec("ring", 4), {}, mailbox=box)
    assert static.round_peers is None and static.neighbors == [0, 2]


def test_grpc_under_a_schedule_needs_the_address_of_every_potential_peer():
    sched = Schedule.random_matching(4, seed=0)
    with pytest.raises(ValueError, match=r"no address for neighbour\(s\) \[2, 3\]"):
        create("grpc", 0, sched, {"listen": "127.0.0.1:0"}, peers={0: "127.0.0.1:1", 1: "127.0.0.1:2"})


def test_grpc_follows_the_schedule_and_refuses_a_sender_outside_the_rounds_graph():
    from dimat.transport.grpc_transport import GrpcTransport

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'disconnected' is, on purpose
        sched = Schedule.cycle([Topology.build("disconnected", 3), Topology.build("fc", 3)], "off-on")
    ts = []
    try:
        for k in range(3):
            ts.append(GrpcTransport(k, sched.potential_neighbors(k), {j: "127.0.0.1:1" for j in range(3)},
                                    send_to=sched.potential_out_neighbors(k), listen="127.0.0.1:0",
                                    deadline_s=2.0, secret="s", round_peers=sched.round_peers(k)))
        for t in ts:
            t.peers.update({u.rank: u.address for u in ts})
        snap = {"w": torch.arange(6, dtype=torch.float32)}
        for r in range(2):  # round 0: nobody exchanges; round 1: everyone
            for t in ts:
                t.post(r, snap)
            for t in ts:
                got = t.collect(r)
                assert sorted(got) == ([] if r == 0 else [j for j in range(3) if j != t.rank])
        assert all(t.rejected_count == 0 for t in ts)
        # A snapshot for round 2 (disconnected again) from a potential neighbour is refused: not this round's peer.
        ts[0].send_to = [1]
        ts[0].round_peers = None  # act as a sender that ignores the schedule
        ts[0].post(2, snap)
        end = time.monotonic() + 5
        while not ts[1].rejected_count and time.monotonic() < end:
            time.sleep(0.02)
        assert [why.reason for why in ts[1].rejected] == ["sender 0 is not a neighbour of agent 1 in round 2"]
        assert ts[1].collect(2) == {}
    finally:
        for t in ts:
            t.close()


# ---------------------------------------------------------------------------------------------- config and CLI
def test_config_takes_a_schedule_or_a_list(tmp_path):
    from dimat.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("agents: 4\nrounds: 2\ntopology: [ring, fc]\n")
    assert load_config(cfg)["topology"] == ["ring", "fc"]
    assert load_config(cfg, ["topology=random-matching"])["topology"] == "random-matching"
    cfg.write_text("agents: 4\nrounds: 2\ntopology: [ring, 3]\n")
    with pytest.raises(UserError, match=r"c.yaml: key 'topology' entry 1 must be a topology kind or file"):
        load_config(cfg)
    cfg.write_text("agents: 4\nrounds: 2\ntopology: {schedule: x}\n")
    with pytest.raises(UserError, match=r"c.yaml: key 'topology' must be a string or a list"):
        load_config(cfg)


def test_run_refuses_a_schedule_for_gossip_baselines_and_a_bad_list_entry(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("agents: 4\nrounds: 2\ntopology: random-matching\nmerge: {method: dpsgd}\n"
                   "data: {dataset: 'synthetic:train=80,test=20'}\n")
    assert cli_main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c.yaml: topology: random-matching" in err and "needs a static topology" in err
    assert cli_main(["run", str(cfg), "--out", str(tmp_path / "o"), "--set", "merge.method=dimat",
                     "--set", "topology=[ring, nope.json]"]) == 2
    err = capsys.readouterr().err
    assert "c.yaml: topology: entry 1 of the topology list: nope.json: no such topology file" in err
    assert not (tmp_path / "o").exists()


def test_run_with_a_schedule_merges_with_each_rounds_partner(tmp_path):
    from dimat.config import load_config
    from dimat.metrics import read_metrics
    from dimat.runner import run

    cfg = load_config(None, ["agents=4", "rounds=3", "topology=random-matching", "topology_seed=4",
                             "data.dataset=synthetic:train=160,test=40", "model.width=0.25", "train.epochs=1"])
    run(cfg, tmp_path / "o", quiet=True)
    sched = Schedule.random_matching(4, seed=4)
    merges = [r for r in read_metrics([tmp_path / "o" / "metrics.jsonl"]) if r["phase"] == "merge"]
    assert len(merges) == 12
    for rec in merges:
        assert rec["received"] == sched.neighbors(rec["agent"], rec["round"]) and rec["missing"] == []


def test_topology_show_describes_a_schedule(capsys, tmp_path):
    assert cli_main(["topology", "show", "one-peer-exponential", "--agents", "8"]) == 0
    out = capsys.readouterr().out
    assert "period: 3" in out and "spectral gap of the product (1 - |lambda_2|): 1.000000" in out
    assert "round 2: " in out and "      0  self 0.5, 4: 0.5" in out
    assert cli_main(["topology", "show", "random-matching", "-n", "16", "--rounds", "16", "--show-rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "product of 16 mixing matrices" in out and "round 0: " in out and "round 1: " not in out
    Topology.build("ring", 4).save(tmp_path / "ring.json")
    assert cli_main(["topology", "show", str(tmp_path / "ring.json"), "fc"]) == 0
    assert "cycle of ring.json, fc" in capsys.readouterr().out
    assert cli_main(["topology", "show", "random-matching"]) == 2
    assert "give --agents N" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["grpc", "torch"])
def test_launch_on_a_directed_schedule_reproduces_dimat_run(tmp_path, transport):
    """4 agent processes on the one-peer exponential schedule (directed in round 0, hop 2 in round 1) compute what
    the in-process simulation computes, over gRPC and over torch.distributed."""
    import os
    import subprocess
    import sys

    from dimat.config import load_config
    from dimat.metrics import read_metrics
    from dimat.runner import run

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"agents": 4, "rounds": 3, "topology": "one-peer-exponential", "threads": 1,
                               "data": {"dataset": "synthetic:train=400,test=100"},
                               "model": {"name": "mlp", "width": 0.25}, "train": {"epochs": 1},
                               "transport": {"deadline_s": 30}}))
    run(load_config(cfg), tmp_path / "ref", quiet=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "dimat", "launch", str(cfg), "--transport", transport, "--out",
                           str(tmp_path / "out"), "--timeout", "150"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=200, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    keys = ("round", "agent", "phase", "test_acc", "received", "missing")
    ref_recs, got_recs = (read_metrics([tmp_path / d / "metrics.jsonl"]) for d in ("ref", "out"))
    ref = [{k: r.get(k) for k in keys} for r in ref_recs]
    got = [{k: r.get(k) for k in keys} for r in got_recs]
    assert got == ref
    # comm_bytes counts what the transport moved since the previous merge: on a directed schedule an agent may
    # already receive its next round's snapshot from a neighbour that runs ahead, so only each agent's total
    # over the run must agree with the simulation.
    totals = [{a: sum(r["comm_bytes"] or 0 for r in recs if r["agent"] == a) for a in range(4)}
              for recs in (ref_recs, got_recs)]
    assert totals[0] == totals[1]
    assert [r["received"] for r in got if r["phase"] == "merge" and r["agent"] == 0] == [[1], [2], [1]]
