"""The step-level gossip loop: rules over real transports, round records, unequal partitions, resume, centralised."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dimat import gossip
from dimat.baselines import CDSGD, SGP
from dimat.config import resolve
from dimat.errors import UserError
from dimat.loop import Agent
from dimat.node import Node
from dimat.build import prepare
from dimat.runner import run
from dimat.topology import Topology
from dimat.transport.base import snapshot_nbytes
from dimat.transport.inproc import make_inproc

A = np.array([[1.0, -2.0], [4.0, 0.0], [-2.0, 5.0]])
X0 = np.array([[0.0, 0.0], [3.0, 1.0], [-1.0, 2.0]])
PI = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])


class Vec(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


def quadratic(model, target):
    return 0.5 * ((model.w - target) ** 2).sum()


def quadratic_agents(topo: Topology):
    transports = make_inproc([topo.neighbors(k) for k in range(topo.num_agents)])
    agents = []
    for k, tr in enumerate(transports):
        model = Vec(X0[k])
        node = Node(model, topo, k, tr, batches=None, method="none")
        empty = (torch.zeros(0), torch.zeros(0))
        agents.append(Agent(k, node, empty, empty, empty, make_optimizer=None, generator=torch.Generator()))
    return agents, transports


def run_quadratics(rule, topo, lr, steps, comm_every=1):
    agents, transports = quadratic_agents(topo)
    states = gossip.rule_states(topo, range(3))
    opts = [torch.optim.SGD(a.model.parameters(), lr=lr) for a in agents]
    streams = [itertools.repeat(torch.tensor(A[k])) for k in range(3)]
    stats = gossip.gossip_steps(agents, rule, states, opts, streams, 0, steps, comm_every, loss_fn=quadratic)
    return np.stack([a.model.w.detach().numpy() for a in agents]), stats, states, transports


def test_cdsgd_over_inproc_transports_matches_the_hand_computation():
    topo = Topology(np.ones((3, 3)), PI)
    lr = 0.1
    got, stats, _, transports = run_quadratics(CDSGD(), topo, lr, 3)
    x = X0.copy()
    for _ in range(3):
        x = PI @ x - lr * (x - A)
    np.testing.assert_allclose(got, x, atol=1e-12)
    nbytes = 2 * 8  # one float64 vector of 2 entries per message
    assert [s.bytes_received for s in stats] == [3 * 2 * nbytes] * 3  # 3 steps x 2 neighbours
    assert [s.steps for s in stats] == [3, 3, 3]
    assert all(s.received == {j for j in range(3) if j != k} and not s.missing for k, s in enumerate(stats))


def test_sgp_over_a_directed_graph_debiases_to_the_consensus_optimum():
    # 0 -> 1, 1 -> 2, 2 -> 0, 0 -> 2: C[i][j] = 1 when i receives from j. Rows uniform (SGP ignores pi's values).
    c = np.array([[1, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # asymmetric weights are legal, and the point of this test
        topo = Topology(c, c / c.sum(1, keepdims=True))
    states = gossip.rule_states(topo, range(3))
    assert [s.out_degree for s in states] == [2, 1, 1]
    got, _, states, _ = run_quadratics(SGP(), topo, 0.02, 1000)
    # With push-sum weights the stationary point is within O(lr) of the team optimum mean(a_i) for every agent.
    assert np.abs(got - A.mean(0)).max() < 0.1
    assert sum(s.ps_weight for s in states) == pytest.approx(3.0)  # mass is conserved when nothing is lost


def test_comm_every_exchanges_once_per_that_many_steps():
    topo = Topology(np.ones((3, 3)), PI)
    lr = 0.1
    got, stats, _, _ = run_quadratics(CDSGD(), topo, lr, 6, comm_every=3)
    x = X0.copy()
    for t in range(6):
        x = (PI @ x if (t + 1) % 3 == 0 else x) - lr * (x - A)
    np.testing.assert_allclose(got, x, atol=1e-12)
    assert stats[0].bytes_received == 2 * 2 * 16  # 2 exchanges x 2 neighbours x 16 bytes


def test_gossip_steps_rejects_comm_every_below_1():
    topo = Topology(np.ones((3, 3)), PI)
    agents, _ = quadratic_agents(topo)
    with pytest.raises(ValueError, match="comm_every"):
        gossip.gossip_steps(agents, CDSGD(), gossip.rule_states(topo, range(3)), [], [], 0, 1, comm_every=0)


# --------------------------------------------------------------------------------------------- whole runs
def tiny(method, **kw):
    cfg = {"agents": 3, "rounds": 2, "topology": "ring", "model": {"name": "mlp", "width": 0.25},
           "train": {"epochs": 1, "batch_size": 64}, "merge": {"method": method}}
    for k, v in kw.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return resolve(cfg)


def test_unequal_partitions_make_every_agent_exchange_equally_often():
    cfg = tiny("cdsgd", data={"partition": "dirichlet:0.3"}, train={"batch_size": 200})
    setup = prepare(cfg)
    sizes = [len(p[0]) for p in setup.parts]
    assert len(set(sizes)) > 1
    transports = make_inproc([setup.topology.neighbors(k) for k in range(3)])
    agents = gossip.build_agents(cfg, setup, transports)
    states = gossip.rule_states(setup.topology, range(3))
    gossip._use_rule_optimizer(agents, gossip.make_rule(cfg), cfg)
    stats = gossip.run_gossip_round(agents, CDSGD(), states, 0, cfg, writer=None)
    expect = -(-max(sizes) // 200)  # the largest partition's batches per epoch
    assert [s.steps for s in stats] == [expect] * 3
    msg = snapshot_nbytes(agents[0].model.state_dict())
    assert [s.bytes_received for s in stats] == [expect * 2 * msg] * 3


def test_a_gossip_run_writes_the_dimat_records(tmp_path):
    summary = run(tiny("sgp", train={"lr": 0.01}), tmp_path / "sgp", quiet=True)
    recs = [json.loads(line) for line in open(tmp_path / "sgp" / "metrics.jsonl")]
    assert {(r["round"], r["phase"]) for r in recs} == {(0, "merge"), (0, "train"), (1, "merge")}
    train = [r for r in recs if r["phase"] == "train"]
    assert all(r["comm_bytes"] > 0 and r["train_s"] > 0 and r["merge_s"] > 0 for r in train)
    assert all(r["received"] == sorted({0, 1, 2} - {r["agent"]}) and r["missing"] == [] for r in train)
    assert summary["method"] == "sgp" and len(summary["per_agent_acc"]) == 3
    assert 0.3 < summary["final_mean_acc"] <= 1.0  # digits learn well above chance (0.1) in 2 epochs


def test_centralised_is_one_agent_on_the_union_of_the_partitions(tmp_path):
    cfg = tiny("centralised")
    setup = prepare(cfg)
    agents = gossip.build_agents(cfg, setup, [None] * 3)
    assert len(agents) == 1 and len(agents[0].train[1]) == sum(len(p[0]) for p in setup.parts)
    summary = run(cfg, tmp_path / "c", quiet=True)
    assert summary["agents"] == 1 and len(summary["per_agent_acc"]) == 1


def test_resumed_gossip_run_equals_an_uninterrupted_one(tmp_path):
    cfg = tiny("sgp", rounds=3, train={"pretrain_epochs": 1, "keep_optimizer_state": True, "batch_size": 200})
    full = run(cfg, tmp_path / "full", quiet=True)
    assert run(cfg, tmp_path / "cut", quiet=True, stop_after_round=0) is None
    resumed = run(cfg, tmp_path / "cut", resume=True, quiet=True)
    assert resumed["per_agent_acc"] == full["per_agent_acc"]


def test_cdmsgd_switches_to_nesterov_sgd_after_pretraining(tmp_path):
    cfg = tiny("cdmsgd", train={"pretrain_epochs": 1}, gossip={"lr": 0.05})
    setup = prepare(cfg)
    agents = gossip.build_agents(cfg, setup, make_inproc([setup.topology.neighbors(k) for k in range(3)]))
    assert isinstance(agents[0].make_optimizer(agents[0].model), torch.optim.Adam)  # pretraining: the config's
    gossip._use_rule_optimizer(agents, gossip.make_rule(cfg), cfg)
    opt = agents[0].make_optimizer(agents[0].model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["lr"] == 0.05


@pytest.mark.parametrize("key, value, msg", [
    ("gossip.comm_every", 0, "comm_every"),
    ("gossip.momentum", 1.0, "momentum"),
    ("gossip.lr", -0.1, "gossip.lr"),
    ("merge.method", "sgpp", "cdsgd"),
])
def test_bad_gossip_config_is_a_user_error(key, value, msg):
    with pytest.raises(UserError, match=msg):
        resolve({"agents": 3}, [f"{key}={value}"])


def test_every_gossip_method_is_a_valid_config_method():
    for m in gossip.METHODS:
        assert resolve({"merge": {"method": m}})["merge"]["method"] == m


def test_an_agent_without_data_takes_no_gradient_step_but_still_mixes():
    topo = Topology(np.ones((3, 3)), PI)
    agents, _ = quadratic_agents(topo)
    states = gossip.rule_states(topo, range(3))
    opts = [torch.optim.SGD(a.model.parameters(), lr=0.1) for a in agents]
    streams = [itertools.repeat(torch.tensor(A[0])), itertools.repeat(torch.tensor(A[1])), itertools.repeat(None)]
    stats = gossip.gossip_steps(agents, CDSGD(), states, opts, streams, 0, 1, loss_fn=quadratic)
    g = X0 - A
    g[2] = 0  # agent 2 has no data
    expect = PI @ X0 - 0.1 * g
    np.testing.assert_allclose(np.stack([a.model.w.detach().numpy() for a in agents]), expect, atol=1e-12)
    assert [s.steps for s in stats] == [1, 1, 0] and stats[2].received == {0, 1}
