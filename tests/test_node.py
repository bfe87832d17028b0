"""dimat.Node: one agent's merge round over a transport, loaded in place."""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest
import torch
from torch import nn

import dimat
from dimat import merge
from dimat.merge.combine import CombineOptions
from dimat.node import MergeResult, Node
from dimat.topology import Topology
from dimat.transport.base import Transport
from dimat.transport.inproc import make_inproc


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g) * 3 + 1, torch.zeros(16, dtype=torch.long)) for _ in range(n)]


def state(m: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def nodes(topo: Topology, make=mlp, method="wa", **kw):
    ts = make_inproc([topo.neighbors(k) for k in range(topo.num_agents)])
    return [Node(make(k), topo, k, ts[k], batches(seed=k), method=method, **kw) for k in range(topo.num_agents)]


def test_exported_from_package():
    assert dimat.Node is Node and dimat.MergeResult is MergeResult


def test_merge_is_jacobi_weighted_and_in_place():
    topo = Topology.build("ring", 4)
    ns = nodes(topo)
    before = [state(n.model) for n in ns]
    params = [list(n.model.parameters()) for n in ns]
    for n in ns:
        n.post(0)
    results = [n.merge_round(0) for n in ns]  # agent 1 merges after agent 0 changed: must still see its round-0 post
    for k, (n, res) in enumerate(zip(ns, results)):
        assert res.received == topo.neighbors(k) and res.missing == []
        assert res.weights == pytest.approx(topo.weights(k))
        for name, t in n.model.state_dict().items():
            expect = sum(w * before[j][name].double() for j, w in topo.weights(k).items())
            torch.testing.assert_close(t.double(), expect, atol=1e-6, rtol=0)
        # the same parameter objects: an optimizer built before the merge still updates the model
        assert all(p is q for p, q in zip(params[k], n.model.parameters()))
        assert res.comm_bytes > 0 and res.merge_s >= 0 and res.comm_s >= 0


def test_merge_round_posts_once_when_not_posted():
    topo = Topology.build("fc", 2)
    ns = nodes(topo)
    ns[0].post(3)
    ns[0].post(3)  # a second post of the same round is ignored
    sent = ns[0].transport.bytes_sent
    ns[1].merge_round(3)  # posts itself, then collects agent 0's snapshot
    res = ns[0].merge_round(3)
    assert ns[0].transport.bytes_sent == sent
    assert res.received == [1]


def test_received_snapshots_are_not_written_to():
    topo = Topology.build("fc", 3)
    ns = nodes(topo, make=bn_net)
    for n in ns:
        n.post(0)
    box = ns[0].transport.mailbox
    posted = {j: state_of(box.get(0, j)) for j in range(3)}
    for n in ns:
        n.merge_round(0)
    for j in range(3):
        for name, t in box.get(0, j).items():
            assert torch.equal(t, posted[j][name])


def state_of(snap):
    return {k: v.clone() for k, v in snap.items()}


class Lossy(Transport):
    """Delivers only the snapshots of the given senders (the others are 'down')."""

    def __init__(self, rank, snaps):
        self.rank, self.snaps, self.posted = rank, snaps, []
        self.bytes_sent = self.bytes_received = 0

    def post(self, round, snapshot):
        self.posted.append(round)

    def collect(self, round):
        return dict(self.snaps)


def test_missing_neighbour_weights_are_renormalised():
    topo = Topology.build("fc", 3)  # pi[0] = 1/3 each
    own, other = mlp(0), mlp(1)
    node = Node(own, topo, 0, Lossy(0, {2: state(other)}), batches(), method="wa")
    before = state(own)
    res = node.merge_round(0)
    assert res.received == [2] and res.missing == [1]
    assert res.weights == pytest.approx({0: 0.5, 2: 0.5})
    for name, t in own.state_dict().items():
        torch.testing.assert_close(t, (before[name] + state(other)[name]) / 2)


def test_nothing_arrived_leaves_model_unchanged():
    topo = Topology.build("ring", 3)
    m = mlp(0)
    before = state(m)
    res = Node(m, topo, 0, Lossy(0, {}), batches(), method="wa").merge_round(0)
    assert res.received == [] and res.missing == [1, 2] and res.weights == {0: 1.0}
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_snapshot_from_a_non_neighbour_is_ignored():
    topo = Topology.build("ring", 5)  # 0's neighbours: 1 and 4
    m = mlp(0)
    res = Node(m, topo, 0, Lossy(0, {2: state(mlp(2))}), batches(), method="wa").merge_round(0)
    assert res.received == [] and res.missing == [1, 4]


def test_method_none_exchanges_nothing():
    topo = Topology.build("ring", 3)
    t = Lossy(0, {1: state(mlp(1))})
    m = mlp(0)
    before = state(m)
    res = Node(m, topo, 0, t, batches(), method="none").merge_round(0)
    assert t.posted == [] and res.comm_bytes == 0 and res.received == []
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    Node(mlp(0), topo, 0, None, None, method="none").merge_round(0)  # no transport needed


def test_bn_statistics_are_recomputed_on_local_batches():
    topo = Topology.build("fc", 2)
    ns = nodes(topo, make=bn_net, bn_batches=2)
    for n in ns:
        n.post(0)
    ns[0].merge_round(0)
    merged = ns[0].model
    # reference: the same weights, BN statistics averaged over the first 2 local batches
    ref = bn_net(0)
    ref.load_state_dict(merged.state_dict())
    merge.reset_bn_stats(ref, ns[0].batches, 2)
    bn = merged[1]
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean)
    torch.testing.assert_close(bn.running_var, ref[1].running_var)
    assert bn.momentum == 0.1  # the layer's normal momentum is back for local training
    feats = torch.cat([merged[0](x) for x, _ in ns[0].batches[:2]])
    torch.testing.assert_close(bn.running_mean, feats.mean(0).detach(), atol=1e-5, rtol=0)


def test_bn_reset_can_be_turned_off():
    topo = Topology.build("fc", 2)
    ns = nodes(topo, make=bn_net, reset_bn=False)
    states = [state(n.model) for n in ns]
    for n in ns:
        n.post(0)
    ns[0].merge_round(0)
    avg = (states[0]["1.running_mean"] + states[1]["1.running_mean"]) / 2
    torch.testing.assert_close(ns[0].model[1].running_mean, avg)


def test_bad_construction():
    topo = Topology.build("ring", 3)
    with pytest.raises(ValueError, match="rank 3"):
        Node(mlp(0), topo, 3, None, None, method="none")
    with pytest.raises(ValueError, match="give a transport"):
        Node(mlp(0), topo, 0, None, None, method="wa")
    with pytest.raises(ValueError, match="unknown merge method"):
        Node(mlp(0), topo, 0, Lossy(0, {}), None, method="magic")


def test_a_plain_mixing_matrix_works_as_topology():
    pi = np.array([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.25, 0.75]])
    node = Node(mlp(0), pi, 1, Lossy(1, {}), None, method="wa")
    assert node.neighbors == [0, 2]


def test_by_default_the_operator_resets_bn_on_the_stat_batches():
    topo = Topology.build("fc", 2)
    ns = nodes(topo, make=bn_net, stat_batches=3)
    for n in ns:
        n.post(0)
    ns[0].merge_round(0)
    ref = bn_net(0)
    ref.load_state_dict(ns[0].model.state_dict())
    merge.reset_bn_stats(ref, ns[0].batches, 3)
    torch.testing.assert_close(ns[0].model[1].running_mean, ref[1].running_mean)
    ref2 = bn_net(0)
    ref2.load_state_dict(ns[0].model.state_dict())
    merge.reset_bn_stats(ref2, ns[0].batches, 1)
    assert not torch.allclose(ns[0].model[1].running_mean, ref2[1].running_mean)


def _hidden_permuted(m: nn.Module, perm: torch.Tensor) -> nn.Module:
    """A copy of an mlp() whose 6 hidden units are reordered by the test itself (same function)."""
    c = mlp(0)
    with torch.no_grad():
        c[0].weight.copy_(m[0].weight[perm])
        c[0].bias.copy_(m[0].bias[perm])
        c[2].weight.copy_(m[2].weight[:, perm])
        c[2].bias.copy_(m[2].bias)
    return c


@pytest.mark.parametrize("basis", ["own", "shared"])
def test_basis_decides_whose_units_the_merge_keeps(basis):
    # Agent 1 holds a hand-permuted copy of agent 0's model: both merges give the same function, but only
    # basis="shared" leaves agent 1 in agent 0's units (tag 0 is the lowest); "own" (DIMAT as published) keeps
    # agent 1's.
    topo = Topology.build("fc", 2)
    ts = make_inproc([topo.neighbors(k) for k in range(2)])
    a = mlp(0)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    b = _hidden_permuted(a, perm)
    probe = batches(2, seed=7)
    ns = [Node(m, topo, k, ts[k], probe, method="dimat", reset_bn=False, basis=basis) for k, m in enumerate([a, b])]
    a0, b0 = state(a), state(b)
    for n in ns:
        n.post(0)
    for n in ns:
        n.merge_round(0)
    x = probe[0][0]
    for n in ns:
        torch.testing.assert_close(n.model(x), mlp(0)(x), rtol=1e-4, atol=1e-5)
    expect_1 = a0 if basis == "shared" else b0
    for name, t in ns[1].model.state_dict().items():
        torch.testing.assert_close(t, expect_1[name], rtol=1e-5, atol=1e-6)
    for name, t in ns[0].model.state_dict().items():  # agent 0 is the lowest rank either way
        torch.testing.assert_close(t, a0[name], rtol=1e-5, atol=1e-6)


def test_unknown_basis_is_refused():
    with pytest.raises(ValueError, match="basis must be one of own, shared"):
        Node(mlp(0), Topology.build("ring", 3), 0, None, None, method="none", basis="theirs")


# --------------------------------------------------------------------------------------------- basis tags
def _count_alignments(monkeypatch):
    """Count the models activation matching computes statistics for (the neighbours it aligns)."""
    from dimat.merge import stats

    calls = []
    real = stats.collect_pair_stats

    def counting(models, *a, **k):
        calls.append(len(models) - 1)
        return real(models, *a, **k)

    monkeypatch.setattr(stats, "collect_pair_stats", counting)
    return calls


def _ring_round(ns, r):
    for n in ns:
        n.post(r)
    return [n.merge_round(r) for n in ns]


def test_shared_basis_tags_spread_from_the_lowest_rank_and_stop_the_alignments(monkeypatch):
    topo = Topology.build("ring", 5)
    ts = make_inproc([topo.neighbors(k) for k in range(5)])
    ns = [Node(bn_net(k), topo, k, ts[k], batches(3, seed=k), method="dimat", basis="shared") for k in range(5)]
    calls = _count_alignments(monkeypatch)
    # Round 0: everyone aligns both neighbours; agents 0, 1 and 4 see tag 0, agents 2 and 3 the tags 1 and 2.
    # Round 1: agent 1 aligns agent 2's model, agents 2 and 3 align two models each, agent 4 aligns agent 3's.
    expected_tags = [[0, 0, 1, 2, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    expected_aligned = [2 * 5, 1 + 2 + 2 + 1, 0]
    for r, (tags, aligned) in enumerate(zip(expected_tags, expected_aligned)):
        calls.clear()
        _ring_round(ns, r)
        assert [n.basis_tag for n in ns] == tags, r
        assert sum(calls) == aligned, r


def deep_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("make", [bn_net, deep_mlp])
def test_shared_basis_merge_of_same_tag_models_is_the_average_with_its_repair(make):
    # Two agents already in basis 0: the merge averages them as they are, then repairs the statistics as the
    # operator does (BatchNorm reset; REPAIR for deep_mlp's hidden layers), even though activation matching on
    # these batches would pick some other permutation of two unrelated models.
    topo = Topology.build("fc", 2)
    ts = make_inproc([topo.neighbors(k) for k in range(2)])
    probe = batches(2, seed=3)
    ns = [Node(make(k), topo, k, ts[k], probe, method="dimat", basis="shared") for k in range(2)]
    for n in ns:
        n.basis_tag = 0
    models = [ns[0].model, ns[1].model]
    want = merge.average(models, [0.5, 0.5], batches=probe, reset_bn=True, repair=True)
    aligned = merge.activation_match(models, [0.5, 0.5], batches=probe)
    assert any(not torch.equal(a, b) for a, b in zip(want.state_dict().values(), aligned.state_dict().values()))
    no_repair = merge.average(models, [0.5, 0.5], batches=probe, reset_bn=True)
    differs = any(not torch.allclose(a, b) for a, b in zip(want.state_dict().values(), no_repair.state_dict().values()))
    assert differs == (make is deep_mlp)  # the average plus a BN reset alone is not the merge there
    _ring_round(ns, 0)
    for name, t in want.state_dict().items():
        torch.testing.assert_close(ns[0].model.state_dict()[name], t)
        torch.testing.assert_close(ns[1].model.state_dict()[name], t)


def test_a_starting_basis_tag_skips_the_alignment_from_the_first_round(monkeypatch):
    # Agents given one starting tag (one shared init) never align; a tag outside the topology is refused.
    topo = Topology.build("ring", 3)
    ts = make_inproc([topo.neighbors(k) for k in range(3)])
    ns = [Node(bn_net(0), topo, k, ts[k], batches(2, seed=k), method="dimat", basis="shared", basis_tag=0)
          for k in range(3)]
    calls = _count_alignments(monkeypatch)
    _ring_round(ns, 0)
    assert sum(calls) == 0 and [n.basis_tag for n in ns] == [0, 0, 0]
    for bad in (3, -1, 0.5):
        with pytest.raises(ValueError, match="basis_tag"):
            Node(bn_net(0), topo, 0, ts[0], batches(2), method="dimat", basis="shared", basis_tag=bad)


class _Tamper(Transport):
    """Wraps a transport and rewrites the basis tag of every snapshot it delivers."""

    def __init__(self, inner, tag):
        self.inner, self.tag = inner, tag

    def post(self, round, snapshot):
        self.inner.post(round, snapshot)

    def collect(self, round):
        from dimat.node import BASIS_KEY

        out = {}
        for j, snap in self.inner.collect(round).items():
            snap = {k: v for k, v in snap.items() if k != BASIS_KEY}
            if self.tag is not None:
                snap[BASIS_KEY] = self.tag
            out[j] = snap
        return out

    bytes_sent = property(lambda self: self.inner.bytes_sent)
    bytes_received = property(lambda self: self.inner.bytes_received)


@pytest.mark.parametrize("tag", [None, torch.tensor(-1), torch.tensor(7), torch.tensor(0.0), torch.tensor([0, 0])])
def test_a_snapshot_without_a_valid_tag_is_aligned(monkeypatch, caplog, tag):
    topo = Topology.build("fc", 2)
    ts = make_inproc([topo.neighbors(k) for k in range(2)])
    probe = batches(2, seed=3)
    n0 = Node(bn_net(1), topo, 0, _Tamper(ts[0], tag), probe, method="dimat", basis="shared")
    n1 = Node(bn_net(2), topo, 1, ts[1], probe, method="dimat", basis="shared")
    n0.basis_tag = n1.basis_tag = 0  # same tag on both sides: a valid tag would skip the alignment
    calls = _count_alignments(monkeypatch)
    n1.post(0)
    with caplog.at_level("WARNING"):
        n0.merge_round(0)
    assert calls == [1]
    assert n0.basis_tag == 0
    assert (tag is None) == ("basis tag" not in caplog.text)


def test_checkpoints_keep_the_basis_tag(tmp_path):
    from dimat.loop import agent_state, restore_agent

    topo = Topology.build("ring", 3)
    ts = make_inproc([topo.neighbors(k) for k in range(3)])
    ns = [Node(bn_net(k), topo, k, ts[k], batches(2, seed=k), method="dimat", basis="shared") for k in range(3)]
    _ring_round(ns, 0)

    class A:  # the two fields agent_state / restore_agent read besides the model
        def __init__(self, node):
            self.node, self.rank, self.optimizer = node, node.rank, None
            self.generator = torch.Generator()
            self.model = node.model

    saved = agent_state(A(ns[2]), 0)
    assert saved["basis_tag"] == ns[2].basis_tag == 0
    fresh = Node(bn_net(9), topo, 2, ts[2], None, method="dimat", basis="shared")
    assert fresh.basis_tag == 2
    restore_agent(A(fresh), saved)
    assert fresh.basis_tag == 0


# ------------------------------------------------------------------------------------------- stats="both"
def deep(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def _run_both(topo, tamper=None, basis="own", tags=None, **kw):
    """One round of stats="both" over in-process transports; ``tamper(mailbox)`` may change the messages
    between phase 2's post and the merge; ``tags``: the agents' basis tags under ``basis="shared"``."""
    ts = make_inproc([topo.neighbors(k) for k in range(topo.num_agents)])
    ns = [Node(deep(k), topo, k, ts[k], batches(seed=k), method="dimat", stats="both", basis=basis, **kw)
          for k in range(topo.num_agents)]
    for n, tag in zip(ns, tags or []):
        n.basis_tag = tag
    for n in ns:
        n.post(0)
    for n in ns:
        n.gather(0)
    if tamper is not None:
        tamper(ts[0].mailbox)
    return ns, [n.merge_round(0) for n in ns]


def test_stats_both_aligns_each_edge_on_both_sides_data():
    topo = Topology.build("ring", 3)
    before = [state(deep(k)) for k in range(3)]
    ns, res = _run_both(topo)
    for k, r in enumerate(res):
        assert r.stats_both == topo.neighbors(k) and r.stats_fallback == {}
        # one message to each neighbour and one from each: 2 sites (8 and 6 units), float32 moments
        size = sum(4 * (c * c + 4 * c) + 8 for c in (8, 6))
        assert r.stats_bytes == 2 * len(topo.neighbors(k)) * size
        assert r.comm_bytes >= r.stats_bytes
    # agent 0's merge equals activation matching of its models on the statistics of both agents' batches: for
    # neighbour j, the pair's statistics on agent 0's batches pooled with those on agent j's batches
    m = [deep(k) for k in range(3)]
    for k in range(3):
        m[k].load_state_dict(before[k])
    pooled = {}
    for pos, j in enumerate([1, 2], start=1):
        mine = merge.pair_statistics([m[0], m[j]], batches(seed=0))[0]
        theirs = merge.pair_statistics([m[j], m[0]], batches(seed=j))[0]
        st = merge.stats
        pooled[pos] = st.pool(mine, st.decode_pair_stats(st.encode_pair_stats(theirs), [8, 6]))
    ref = merge.activation_match(m, [1 / 3] * 3, batches(seed=0), pair_stats=pooled, min_corr=ns[0].min_corr)
    for name, t in ns[0].model.state_dict().items():
        torch.testing.assert_close(t, ref.state_dict()[name])


def _pooled(m, i, j, sizes=(8, 6)):
    """The statistics of the pair (m[i], m[j]) on agent i's batches pooled with those agent j sends i."""
    st = merge.stats
    mine = merge.pair_statistics([m[i], m[j]], batches(seed=i))[0]
    theirs = merge.pair_statistics([m[j], m[i]], batches(seed=j))[0]
    return st.pool(mine, st.decode_pair_stats(st.encode_pair_stats(theirs), list(sizes)))


def test_stats_both_with_a_shared_basis_pools_the_pair_with_the_reference():
    """basis shared, tags = ranks: agent 0 holds the reference and aligns both neighbours on pooled statistics;
    agent 1 (and 2) is aligned to agent 0's basis on its pair's pooled statistics turned around, and aligns its
    other neighbour to agent 0 on its own data: that neighbour's statistics arrive but are not used."""
    topo = Topology.build("ring", 3)
    m = [deep(k) for k in range(3)]
    ns, res = _run_both(topo, basis="shared", tags=[0, 1, 2])
    assert (res[0].stats_both, res[0].stats_unused) == ([1, 2], [])
    assert (res[1].stats_both, res[1].stats_unused) == ([0], [2])
    assert (res[2].stats_both, res[2].stats_unused) == ([0], [1])
    assert all(r.stats_fallback == {} for r in res) and [n.basis_tag for n in ns] == [0, 0, 0]
    w = [1 / 3] * 3
    want0 = merge.activation_match(m, w, batches(seed=0), min_corr=ns[0].min_corr,
                                   pair_stats={1: _pooled(m, 0, 1), 2: _pooled(m, 0, 2)})
    want1 = merge.activation_match(m, w, batches(seed=1), min_corr=ns[1].min_corr,
                                   pair_stats={1: [s.transposed() for s in _pooled(m, 1, 0)]})
    for n, want in ((ns[0], want0), (ns[1], want1)):
        for name, t in n.model.state_dict().items():
            torch.testing.assert_close(t, want.state_dict()[name])
    # the pooled statistics matter: agent 1 aligned on its own data alone gives another model here
    own1 = merge.activation_match(m, w, batches(seed=1), min_corr=ns[1].min_corr)
    assert any(not torch.allclose(t, own1.state_dict()[k]) for k, t in ns[1].model.state_dict().items())


def test_stats_both_with_a_declined_adoption_aligns_the_neighbours_to_the_own_basis():
    """adopt_min_acc 1.0 declines every neighbour's basis: each agent is its merge's reference, so every pair's
    pooled statistics are used, as under basis own."""
    topo = Topology.build("ring", 3)
    m = [deep(k) for k in range(3)]
    ns, res = _run_both(topo, basis="shared", tags=[0, 1, 2], adopt_min_acc=1.0)
    assert [n.basis_tag for n in ns] == [0, 1, 2]
    assert all(r.stats_both == topo.neighbors(k) and r.stats_unused == [] for k, r in enumerate(res))
    want = merge.activation_match([m[1], m[0], m[2]], [1 / 3] * 3, batches(seed=1), min_corr=ns[1].min_corr,
                                  pair_stats={1: _pooled(m, 1, 0), 2: _pooled(m, 1, 2)})
    for name, t in ns[1].model.state_dict().items():
        torch.testing.assert_close(t, want.state_dict()[name])


def test_stats_both_with_a_shared_basis_sends_nothing_between_agents_of_one_basis():
    """Agents 0 and 1 carry one tag: no merge aligns them to each other, so they exchange no statistics (and
    average as they are); each still exchanges them with agent 2, whose tag differs."""
    topo = Topology.build("ring", 3)
    size = sum(4 * (c * c + 4 * c) + 8 for c in (8, 6))
    ns, res = _run_both(topo, basis="shared", tags=[0, 0, 2])
    assert [r.stats_bytes for r in res] == [2 * size, 2 * size, 4 * size]
    assert (res[0].stats_both, res[1].stats_both, res[1].stats_unused) == ([2], [2], [])
    assert (res[2].stats_both, res[2].stats_unused) == ([0], [1])  # agent 2 aligns itself to 0, and 1 is in 0's basis
    _, res = _run_both(topo, basis="shared", tags=[0, 0, 0])
    assert all(r.stats_bytes == 0 and r.stats_both == [] and r.stats_unused == [] for r in res)


def test_stats_both_missing_or_bad_message_falls_back_loudly(caplog):
    topo = Topology.build("ring", 3)

    def tamper(box):
        # agent 1's message to 0 goes missing; agent 2's to 0 holds a NaN
        del box._messages[(0, "pair_stats", 1, 0)]
        bad = dict(box._messages[(0, "pair_stats", 2, 0)])
        bad["site0.cross"] = bad["site0.cross"].clone()
        bad["site0.cross"][0, 0] = float("nan")
        box._messages[(0, "pair_stats", 2, 0)] = bad

    with caplog.at_level("WARNING", logger="dimat.node"):
        ns, res = _run_both(topo, tamper)
    assert res[0].stats_both == [] and sorted(res[0].stats_fallback) == [1, 2]
    assert "did not arrive" in res[0].stats_fallback[1] and "NaN" in res[0].stats_fallback[2]
    assert "neighbour 1 on my data only" in caplog.text and "neighbour 2 on my data only" in caplog.text
    assert all(torch.isfinite(t).all() for t in ns[0].model.state_dict().values())
    # the other agents were not affected
    assert res[1].stats_both == [0, 2] and res[2].stats_both == [0, 1]
    # a wrong-shape message is refused too
    def reshape(box):
        bad = dict(box._messages[(0, "pair_stats", 1, 0)])
        bad["site1.cross"] = torch.zeros(5, 5)
        box._messages[(0, "pair_stats", 1, 0)] = bad

    _, res = _run_both(topo, reshape)
    assert list(res[0].stats_fallback) == [1] and "shape" in res[0].stats_fallback[1]


def test_stats_both_needs_a_transport_with_messages():
    topo = Topology.build("ring", 3)
    with pytest.raises(ValueError, match="Lossy does not"):
        Node(deep(0), topo, 0, Lossy(0, {}), batches(), method="dimat", stats="both", basis="own")
    with pytest.raises(ValueError, match="method 'dimat' only"):
        Node(deep(0), topo, 0, make_inproc([[1], [0]])[0], batches(), method="wa", stats="both")
    asynchronous = make_inproc([[1], [0]])[0]
    asynchronous.sync = False
    with pytest.raises(ValueError, match="synchronous rounds"):
        Node(deep(0), topo, 0, asynchronous, batches(), stats="both", basis="own")
    with pytest.raises(ValueError, match="stats must be"):
        Node(deep(0), topo, 0, make_inproc([[1], [0]])[0], batches(), stats="all")


def test_stats_both_over_grpc_between_two_real_transports():
    """Two agents in threads, each with its own gRPC transport on 127.0.0.1 (free ports): the second message
    crosses, both edges are aligned on both sides' statistics, and its bytes are counted."""
    import threading

    from dimat.transport.grpc_transport import GrpcTransport

    topo = Topology.build("fc", 2)
    ts = [GrpcTransport(k, [1 - k], {1 - k: "127.0.0.1:1"}, listen="127.0.0.1:0", secret="s", deadline_s=20.0)
          for k in range(2)]
    try:
        for t in ts:
            t.peers[1 - t.rank] = ts[1 - t.rank].address
        ns = [Node(deep(k), topo, k, ts[k], batches(seed=k), method="dimat", stats="both", basis="own") for k in range(2)]
        # Derive the groups once here: torch's tracing is not thread-safe (real agents are processes).
        merge.pair_statistics([deep(0), deep(1)], batches())
        res = [None, None]

        def go(k):
            res[k] = ns[k].merge_round(0)

        threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert all(r is not None for r in res), "a round did not finish"
        size = sum(4 * (c * c + 4 * c) + 8 for c in (8, 6))
        for k, r in enumerate(res):
            assert r.stats_both == [1 - k] and r.stats_fallback == {}
            assert r.stats_bytes == 2 * size
            assert r.bytes_received >= size  # the message is in comm_bytes (sends are counted as replies come)
        assert all(t.rejected_count == 0 for t in ts)
    finally:
        for t in ts:
            t.close()


# ------------------------------------------------------------------------------- adopting a neighbour's basis
def _always_predicts(cls: int, seed: int) -> nn.Module:
    """An mlp() whose output layer makes it predict class ``cls`` on every input."""
    m = mlp(seed)
    with torch.no_grad():
        m[2].weight.zero_()
        m[2].bias.copy_(torch.nn.functional.one_hot(torch.tensor(cls), 3).float() * 10)
    return m


def _pair_round(models, labels, **kw):
    """Agents 0 and 1 (fc) whose local batches are labelled ``labels[k]``; one dimat round, shared basis."""
    topo = Topology.build("fc", 2)
    ts = make_inproc([topo.neighbors(k) for k in range(2)])
    data = [[(x, torch.full((16,), labels[k], dtype=torch.long)) for x, _ in batches(2, seed=k)] for k in range(2)]
    ns = [Node(m, topo, k, ts[k], data[k], method="dimat", reset_bn=False, basis="shared", min_corr=None, **kw)
          for k, m in enumerate(models)]
    own1 = state(ns[1].model)
    results = _ring_round(ns, 0)
    return ns, results, own1


def test_a_basis_whose_model_scores_at_chance_on_local_data_is_not_adopted(caplog):
    # agent 0's model always answers class 0; agent 1's data are all class 1: it scores 0 there, below chance (1/3)
    ns, results, own1 = _pair_round([_always_predicts(0, 0), mlp(1)], [0, 1], adopt_min_acc="auto")
    assert ns[1].basis_tag == 1 and ns[0].basis_tag == 0
    check = results[1].telemetry["adopt"]
    assert check == {"from": 0, "acc": 0.0, "min_acc": pytest.approx(1 / 3), "adopted": False}
    assert "adopt" not in results[0].telemetry  # agent 0 holds the lowest tag: nothing to adopt
    # agent 1 aligned agent 0's model to its own units: the merge is the same as under basis="own"
    topo = Topology.build("fc", 2)
    ts = make_inproc([topo.neighbors(k) for k in range(2)])
    data = [[(x, torch.full((16,), k, dtype=torch.long)) for x, _ in batches(2, seed=k)] for k in range(2)]
    own = [Node(m, topo, k, ts[k], data[k], method="dimat", reset_bn=False, basis="own", min_corr=None)
           for k, m in enumerate([_always_predicts(0, 0), mlp(1)])]
    _ring_round(own, 0)
    for name, t in ns[1].model.state_dict().items():
        torch.testing.assert_close(t, own[1].model.state_dict()[name])


def test_a_basis_whose_model_beats_chance_is_adopted_and_none_always_adopts():
    ns, results, _ = _pair_round([_always_predicts(1, 0), mlp(1)], [0, 1], adopt_min_acc="auto")
    assert ns[1].basis_tag == 0 and results[1].telemetry["adopt"]["adopted"] is True
    assert results[1].telemetry["adopt"]["acc"] == 1.0
    ns, results, _ = _pair_round([_always_predicts(0, 0), mlp(1)], [0, 1])  # the default: None, no check
    assert ns[1].basis_tag == 0 and "adopt" not in results[1].telemetry
    ns, results, _ = _pair_round([_always_predicts(1, 0), mlp(1)], [0, 1], adopt_min_acc=1.0)  # 1.0 is not > 1.0
    assert ns[1].basis_tag == 1 and results[1].telemetry["adopt"]["min_acc"] == 1.0


def test_the_adoption_check_is_skipped_with_a_warning_without_labels(caplog):
    topo = Topology.build("fc", 2)
    ts = make_inproc([topo.neighbors(k) for k in range(2)])
    ns = [Node(mlp(k), topo, k, ts[k], [x for x, _ in batches(2, seed=k)], method="dimat", basis="shared",
               adopt_min_acc="auto") for k in range(2)]
    with caplog.at_level("WARNING"):
        results = _ring_round(ns, 0)
        _ring_round(ns, 1)
    assert ns[1].basis_tag == 0 and "adopt" not in results[1].telemetry
    assert sum("adopting neighbours' bases unchecked" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("bad", [1.5, -0.1, "chance", True])
def test_bad_adopt_min_acc_is_refused(bad):
    with pytest.raises(ValueError, match="adopt_min_acc must be an accuracy in"):
        Node(mlp(0), Topology.build("ring", 3), 0, None, None, method="none", adopt_min_acc=bad)


@pytest.mark.parametrize("sets, needle", [
    (["merge.adopt_min_acc=1.5"], "must be an accuracy in [0, 1]"),
    (["merge.adopt_min_acc=chance"], "null or auto"),
    (["merge.adopt_min_acc=0.2", "merge.basis=own"], "merge.basis shared"),
    (["merge.adopt_min_acc=0.2", "merge.method=wa"], "merge.method dimat or wm"),
])
def test_adopt_min_acc_config_is_checked(sets, needle):
    from dimat.config import UserError, resolve
    with pytest.raises(UserError) as e:
        resolve({}, sets, where="run.yaml")
    assert needle in str(e.value) and "merge.adopt_min_acc" in str(e.value) and "\n" not in str(e.value)
    assert resolve({}, ["merge.adopt_min_acc=auto"]).merge.adopt_min_acc == "auto"
    assert resolve({}).merge.adopt_min_acc is None


# ------------------------------------------------------------------------------------- head="label_counts"
def labelled(labels, seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)
    return [(torch.randn(len(labels), 4, generator=g), y) for _ in range(n)]


def _head_pair(labels=([0, 0], [1, 2]), make=mlp, method="wa", tamper=None, counts=(None, None), **kw):
    topo = Topology.build("fc", 2)
    ts = make_inproc([[1], [0]])
    ns = [Node(make(k), topo, k, ts[k], labelled(labels[k], seed=k), method=method, label_counts=counts[k], **kw)
          for k in range(2)]
    before = [state(n.model) for n in ns]
    for n in ns:
        n.post(0)
    if tamper is not None:
        tamper(ts[0].mailbox)
    return ns, [n.merge_round(0) for n in ns], before


def test_label_counts_take_each_class_of_the_output_layer_from_the_agents_that_saw_it():
    ns, res, before = _head_pair(head="label_counts")
    assert all(r.telemetry["head"] == "label_counts" for r in res)
    for n in ns:
        got = n.model.state_dict()
        # class 0 only agent 0 saw (4 samples), classes 1 and 2 only agent 1: their rows come whole from them
        for c, owner in ((0, 0), (1, 1), (2, 1)):
            torch.testing.assert_close(got["2.weight"][c], before[owner]["2.weight"][c])
            torch.testing.assert_close(got["2.bias"][c], before[owner]["2.bias"][c])
        torch.testing.assert_close(got["0.weight"], (before[0]["0.weight"] + before[1]["0.weight"]) / 2)
    # the counts travel with the snapshot: 3 float64 values more than a merge without them, each way
    _, plain, _ = _head_pair(head="mean")
    assert [r.comm_bytes - p.comm_bytes for r, p in zip(res, plain)] == [2 * 3 * 8, 2 * 3 * 8]
    assert "head" not in plain[0].telemetry


def test_label_counts_default_for_dimat_only_and_given_counts_win():
    assert Node.resolve_head("auto", "dimat", "mean") == "label_counts"
    assert Node.resolve_head("auto", "dimat", "fisher") == "mean" == Node.resolve_head("auto", "wa", "mean")
    # counts given to the node replace those of its batches: agent 0 says it saw class 2 only
    ns, res, before = _head_pair(head="label_counts", counts=([0, 0, 12], None))
    got = ns[1].model.state_dict()["2.weight"]
    # class 2: agent 0's 12 against agent 1's 2 (its batches: labels 1, 2 twice); class 1: agent 1 alone;
    # class 0: nobody, the plain mean
    torch.testing.assert_close(got[2], (12 * before[0]["2.weight"][2] + 2 * before[1]["2.weight"][2]) / 14)
    torch.testing.assert_close(got[1], before[1]["2.weight"][1])
    torch.testing.assert_close(got[0], (before[0]["2.weight"][0] + before[1]["2.weight"][0]) / 2)


@pytest.mark.parametrize("basis", ["shared", "own"])
def test_min_corr_leaves_out_only_units_of_participants_that_share_a_class_with_the_reference(basis):
    # Disjoint classes: the reference saw none of the other's classes, so every unit joins (as min_corr None);
    # overlapping classes: min_corr leaves the poorly matched units out (unrelated inits: some are).
    def final(labels, min_corr):
        ns, res, _ = _head_pair(labels=labels, method="dimat", head="label_counts", min_corr=min_corr,
                                basis=basis, stat_batches=2)
        return [state(n.model) for n in ns], res

    disjoint, overlap = ([0, 0], [1, 2]), ([0, 1], [1, 2])
    got, res = final(disjoint, 0.7)
    want, _ = final(disjoint, None)
    for g, w in zip(got, want):
        for k in g:
            torch.testing.assert_close(g[k], w[k])
    # the aligned participant: under "shared" agent 0's basis is the reference of both merges, under "own" each
    # agent's own
    assert [r.telemetry["min_corr_off"] for r in res] == ([[1], [1]] if basis == "shared" else [[1], [0]])
    assert all("kept" not in e for r in res for e in r.telemetry["edges"].values())
    ns, scoped, _ = _head_pair(labels=disjoint, method="dimat", head="label_counts", min_corr=0.7, basis=basis,
                               stat_batches=2, min_corr_scope="all")  # as before the rule: units are left out
    assert any(not torch.allclose(state(n.model)[k], w[k]) for n, w in zip(ns, want) for k in w)
    assert all("min_corr_off" not in r.telemetry for r in scoped)
    with pytest.raises(ValueError, match="min_corr_scope must be one of shared_classes, all"):
        _head_pair(method="dimat", min_corr_scope="some")
    got, res = final(overlap, 0.7)
    want, _ = final(overlap, None)
    assert any(not torch.allclose(g[k], w[k]) for g, w in zip(got, want) for k in g)
    assert all("min_corr_off" not in r.telemetry for r in res)
    assert any("kept" in e for r in res for e in r.telemetry["edges"].values())


def test_min_corr_scope_config_is_checked():
    from dimat.config import UserError, resolve
    with pytest.raises(UserError) as e:
        resolve({}, ["merge.min_corr_scope=everyone"], where="run.yaml")
    assert "merge.min_corr_scope" in str(e.value) and "shared_classes, all" in str(e.value)
    assert resolve({}).merge.min_corr_scope == "shared_classes"
    assert resolve({}, ["merge.min_corr_scope=all"]).merge.min_corr_scope == "all"


def test_min_corr_by_classes_by_hand():
    from dimat.merge.head import min_corr_by_classes

    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert min_corr_by_classes(0.7, [t(3, 0, 0), t(0, 5, 1), t(1, 0, 0), t(0, 0, 0.5)]) == ([None, 0.7, None], [1, 3])
    assert min_corr_by_classes(0.7, [t(3, 1, 0), t(0, 5, 1), t(1, 0, 0)]) == (0.7, [])  # nobody lifted: the scalar


def test_bad_class_counts_from_a_neighbour_average_the_layer_loudly(caplog):
    def tamper(box):
        for key, snap in list(box._posts.items()):
            if key[1] == 1:  # agent 1's snapshot: negative counts
                box._posts[key] = {**snap, "__dimat_payload__.labels.counts": torch.tensor([-1.0, 2.0, 2.0],
                                                                                          dtype=torch.float64)}

    with caplog.at_level("WARNING", logger="dimat.node"):
        ns, res, before = _head_pair(head="label_counts", tamper=tamper)
    assert res[0].telemetry["head"] == "mean" and res[1].telemetry["head"] == "label_counts"
    assert "class counts of agent 1 are missing or invalid" in caplog.text
    torch.testing.assert_close(ns[0].model.state_dict()["2.weight"],
                               (before[0]["2.weight"] + before[1]["2.weight"]) / 2)


class _Scaled(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x))) * 2.0


def test_label_counts_on_a_model_without_a_plain_output_layer_warn_once_and_average(caplog):
    with caplog.at_level("WARNING", logger="dimat.node"):
        ns, res, before = _head_pair(make=_Scaled, head="label_counts")
        ns[0].post(1)
        ns[0].merge_round(1)
    assert caplog.text.count("agent 0: head label_counts: no nn.Linear layer returns") == 1
    assert all("head" in r.telemetry and r.telemetry["head"] == "mean" for r in res)
    torch.testing.assert_close(ns[1].model.state_dict()["out.weight"],
                               (before[0]["out.weight"] + before[1]["out.weight"]) / 2)


def test_unlabelled_batches_send_zero_counts_and_neighbours_average(caplog):
    with caplog.at_level("WARNING", logger="dimat.node"):
        ns, res, _ = _head_pair(labels=([0, 0], [1.5, 2.5]), head="label_counts")
    assert "agent 1: head label_counts: the local batches carry no labels in 0..2" in caplog.text
    assert [r.telemetry["head"] for r in res] == ["mean", "mean"]


@pytest.mark.parametrize("kw, match", [
    ({"head": "classes"}, "head must be one of"),
    ({"head": "label_counts", "combine": CombineOptions(rule="fisher")}, "combine rule 'mean' only"),
    ({"label_counts": [1.0, -1.0]}, "label_counts must be"),
    ({"label_counts": [0.0, 0.0]}, "label_counts must be"),
    ({"label_counts": [[1.0]]}, "label_counts must be"),
])
def test_bad_head_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Node(mlp(0), Topology.build("fc", 2), 0, make_inproc([[1], [0]])[0], batches(), **kw)


@pytest.mark.parametrize("method,basis,rule,head,opts", [
    ("dimat", "shared", "mean", "auto", {}),              # class counts and a basis tag
    ("dimat", "own", "fisher", "auto", {}),               # a payload, no tag, no counts
    ("dimat", "shared", "regmean", "mean", {"regmean_max_inputs": 5}),
    ("wa", "shared", "mean", "label_counts", {}),         # counts, no tag: plain averaging permutes nothing
    ("wm", "shared", "mean", "mean", {}),
])
def test_the_template_snapshot_has_the_layout_a_node_posts(method, basis, rule, head, opts):
    """The gRPC run template (`dimat agent`) checks every arriving snapshot against it: it must hold exactly the
    entries, shapes and dtypes a node of the same settings posts."""
    from dimat.transport import wire

    topo = Topology.build("ring", 3)
    posted = {}
    nd = nodes(topo, method=method, basis=basis, combine=CombineOptions(rule=rule, **opts), head=head,
               stat_batches=2)[0]
    nd.transport.post = lambda r, s: posted.update(s)
    nd.post(0)
    template = Node.template_snapshot(mlp(7), batches()[0][0][:2], method, basis,
                                      CombineOptions(rule=rule, **opts), head)
    assert wire.layout_of(template) == wire.layout_of(posted)
    assert ("__dimat_basis__" in template) == (basis == "shared" and method != "wa")
