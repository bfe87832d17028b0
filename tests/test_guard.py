"""Alignment guards: the identity prior and the keep-margin group test, alone and inside activation matching."""

import pytest
import torch
from torch import nn

from dimat.merge import activation_match, structure
from dimat.merge.guard import guarded_match

T = torch.tensor


def test_identity_prior_keeps_units_unless_the_gain_exceeds_lambda():
    c = T([[0.5, 0.6], [0.6, 0.5]], dtype=torch.float64)
    assert guarded_match(c, c).tolist() == [1, 0]  # swapping gains 0.1 per unit
    assert guarded_match(c, c, identity_prior=0.05).tolist() == [1, 0]  # gain 0.1 > lambda 0.05
    assert guarded_match(c, c, identity_prior=0.2).tolist() == [0, 1]  # gain 0.1 < lambda 0.2


def test_keep_margin_keeps_the_whole_group_unless_matching_beats_the_diagonal():
    c = T([[0.5, 0.6, 0.0], [0.6, 0.5, 0.0], [0.0, 0.0, 0.9]], dtype=torch.float64)
    # matched mean (0.6 + 0.6 + 0.9) / 3 = 0.7; diagonal (0.5 + 0.5 + 0.9) / 3 = 0.633: gain 0.0667
    assert guarded_match(c, c, keep_margin=0.05).tolist() == [1, 0, 2]
    assert guarded_match(c, c, keep_margin=0.1).tolist() == [0, 1, 2]


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 5, generator=g) for _ in range(3)]


def test_a_permuted_copy_is_found_and_reported_whatever_the_guards():
    a = _mlp(0)
    spec = structure.derive(a, torch.randn(2, 5))
    perms = structure.random_perms(spec, torch.Generator().manual_seed(3))
    b = _mlp(0)
    b.load_state_dict(structure.apply_permutation(a.state_dict(), spec, perms))
    for kw in ({}, {"identity_prior": 0.3}, {"keep_margin": 0.2}):
        report = {}
        m = activation_match([a, b], [0.5, 0.5], _data(), report=report, **kw)
        for k, v in a.state_dict().items():  # aligned exactly: the average is the model itself
            assert torch.allclose(m.state_dict()[k], v, atol=1e-5), (kw, k)
        assert report[1]["corr_after"] == pytest.approx(1.0, abs=1e-6)
        assert report[1]["corr_before"] < 0.5 and report[1]["moved"] > 0.5


def test_models_in_one_basis_are_not_moved_by_the_guards():
    a = _mlp(0)
    b = _mlp(0)
    torch.manual_seed(10)
    with torch.no_grad():  # the same basis plus noise: plain matching swaps some units for a small gain
        for p in b.parameters():
            p.add_(0.3 * torch.randn_like(p))
    plain = {}
    activation_match([a, b], [0.5, 0.5], _data(), report=plain)
    assert plain[1]["moved"] > 0 and plain[1]["corr_after"] - plain[1]["corr_before"] < 0.05
    for kw in ({"keep_margin": 0.05}, {"identity_prior": 0.1}):
        report = {}
        activation_match([a, b], [0.5, 0.5], _data(), report=report, **kw)
        assert report[1]["moved"] == 0.0 and report[1]["corr_after"] == report[1]["corr_before"], kw


def test_bad_guard_values_are_refused():
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(ValueError, match="identity_prior"):
        activation_match([a, b], [0.5, 0.5], _data(), identity_prior=-1.0)
    with pytest.raises(ValueError, match="keep_margin"):
        activation_match([a, b], [0.5, 0.5], _data(), keep_margin=float("nan"))


def test_node_forwards_the_guards_to_dimat_and_refuses_them_elsewhere():
    from dimat.node import Node
    from dimat.topology import Topology
    from dimat.transport.inproc import make_inproc

    topo = Topology.build("ring", 2)
    ts = make_inproc([topo.neighbors(k) for k in range(2)])
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in _data()]
    ns = [Node(_mlp(k), topo, k, ts[k], data, identity_prior=0.2, keep_margin=0.1) for k in range(2)]
    seen = {}

    def spy(models, weights, **kw):
        seen.update(kw)
        return activation_match(models, weights, **kw)

    ns[0].merge_fn = spy
    for n in ns:
        n.post(0)
    res = ns[0].merge_round(0)
    assert seen["identity_prior"] == 0.2 and seen["keep_margin"] == 0.1 and seen["min_corr"] == Node.MIN_CORR
    assert set(res.telemetry["edges"]["1"]) == {"dist", "moved", "corr_before", "corr_after", "kept"}
    with pytest.raises(ValueError, match="identity_prior, keep_margin and min_corr act on activation matching"):
        Node(_mlp(0), topo, 0, ts[0], data, method="wa", keep_margin=0.1)
