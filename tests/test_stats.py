"""dimat.merge.stats: pair statistics from both sides of an edge (pooling, the message, its validation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dimat import merge
from dimat.merge import stats


def _stats_of(a: np.ndarray, b: np.ndarray, batch: int) -> stats.CrossStats:
    st = stats.CrossStats(a.shape[1])
    for i in range(0, len(a), batch):
        st.update(torch.from_numpy(a[i:i + batch]), torch.from_numpy(b[i:i + batch]))
    return st


def test_pooled_statistics_equal_those_of_the_concatenated_data():
    rng = np.random.default_rng(0)
    # Two agents, skewed data of different sizes: agent 0 sees 70 samples, agent 1 sees 30 with another mean.
    x0, y0 = rng.normal(1.0, 2.0, (70, 3)), rng.normal(-1.0, 1.0, (70, 3))
    x1, y1 = rng.normal(5.0, 0.5, (30, 3)), rng.normal(3.0, 3.0, (30, 3))
    mine = _stats_of(x0, y0, 16)  # a = my model's units, b = the neighbour's
    theirs = _stats_of(y1, x1, 7)  # the neighbour's side: a = its model (y), b = mine (x)
    pooled = stats.pool([mine], [theirs])[0]
    x, y = np.concatenate([x0, x1]), np.concatenate([y0, y1])
    # by hand: the moments of the 100 samples together
    mx, my = x.mean(0), y.mean(0)
    assert pooled.n == 100
    np.testing.assert_allclose(pooled.mean_a.numpy(), mx, rtol=1e-12)
    np.testing.assert_allclose(pooled.mean_b.numpy(), my, rtol=1e-12)
    np.testing.assert_allclose(pooled.m2_a.numpy(), ((x - mx) ** 2).sum(0), rtol=1e-10)
    np.testing.assert_allclose(pooled.m2_b.numpy(), ((y - my) ** 2).sum(0), rtol=1e-10)
    np.testing.assert_allclose(pooled.cross.numpy(), (x - mx).T @ (y - my), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(pooled.correlation().numpy(),
                               np.corrcoef(x.T, y.T)[:3, 3:], rtol=1e-9, atol=1e-12)
    # the inputs are not changed by pooling
    np.testing.assert_allclose(mine.mean_a.numpy(), x0.mean(0), rtol=1e-12)


def test_message_round_trip_is_float32_and_oriented():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(50, 4)) + 2
    st = _stats_of(a, b, 10)
    msg = stats.encode_pair_stats([st, _stats_of(a[:, :2], b[:, :2], 10)])
    assert sorted(msg) == sorted(f"site{k}.{f}" for k in range(2)
                                 for f in ("n", "mean_a", "mean_b", "m2_a", "m2_b", "cross"))
    assert msg["site0.cross"].dtype == torch.float32 and msg["site0.cross"].shape == (4, 4)
    nbytes = sum(t.numel() * t.element_size() for t in msg.values())
    assert nbytes == sum(4 * (c * c + 4 * c) + 8 for c in (4, 2))  # the size the docs give
    back = stats.decode_pair_stats(msg, [4, 2])
    assert back[0].n == 50 and back[0].cross.dtype == torch.float64
    np.testing.assert_allclose(back[0].cross.numpy(), st.cross.numpy(), rtol=1e-6)
    t = back[0].transposed()
    np.testing.assert_allclose(t.cross.numpy(), st.cross.numpy().T, rtol=1e-6)
    np.testing.assert_allclose(t.mean_a.numpy(), st.mean_b.numpy(), rtol=1e-6)


def _bad(msg, key, value):
    out = dict(msg)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


@pytest.mark.parametrize("change,why", [
    (lambda m: _bad(m, "site0.cross", None), "missing"),
    (lambda m: _bad(m, "site2.n", torch.tensor(3)), "unexpected"),
    (lambda m: _bad(m, "site1.cross", torch.zeros(3, 3)), "shape"),
    (lambda m: _bad(m, "site0.mean_a", torch.zeros(4, dtype=torch.float64)), "float32"),
    (lambda m: _bad(m, "site0.cross", torch.full((4, 4), float("nan"))), "NaN"),
    (lambda m: _bad(m, "site1.mean_b", torch.tensor([1.0, float("inf")])), "NaN or Inf"),
    (lambda m: _bad(m, "site0.n", torch.tensor(0)), ">= 1"),
    (lambda m: _bad(m, "site0.n", torch.tensor(2.0)), "int64"),
    (lambda m: _bad(m, "site0.m2_a", -torch.ones(4)), "negative"),
    (lambda m: [1, 2], "dict"),
])
def test_malformed_messages_are_refused(change, why):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20, 4))
    msg = stats.encode_pair_stats([_stats_of(a, a, 5), _stats_of(a[:, :2], a[:, :2], 5)])
    stats.decode_pair_stats(msg, [4, 2])  # the good one passes
    with pytest.raises(ValueError, match=why):
        stats.decode_pair_stats(change(msg), [4, 2])
    with pytest.raises(ValueError, match="sites"):
        stats.decode_pair_stats(msg, [4])  # a model with other sites


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def test_both_sides_merge_equals_a_merge_on_both_datasets():
    """Pooling what each agent measured on its own data is activation matching on the two datasets together."""
    g = torch.Generator().manual_seed(0)
    d0 = [torch.randn(16, 5, generator=g) + 2 for _ in range(3)]  # skewed: another mean on each side
    d1 = [torch.randn(16, 5, generator=g) * 2 - 1 for _ in range(2)]
    m0, m1 = _net(0), _net(1)
    mine = merge.pair_statistics([m0, m1], d0)[0]
    theirs = stats.decode_pair_stats(stats.encode_pair_stats(merge.pair_statistics([m1, m0], d1)[0]),
                                     [8, 6])
    pooled = stats.pool(mine, theirs)
    assert [st.n for st in pooled] == [80, 80]
    # repair=False: REPAIR's targets are measured on the batches given, which differ on purpose
    both = merge.activation_match([m0, m1], [0.5, 0.5], d0, pair_stats={1: pooled}, repair=False)
    together = merge.activation_match([m0, m1], [0.5, 0.5], d0 + d1, repair=False)
    one_sided = merge.activation_match([m0, m1], [0.5, 0.5], d0, repair=False)
    for k, v in together.state_dict().items():
        torch.testing.assert_close(both.state_dict()[k], v)
    # the given statistics were used: they change the outcome here
    assert any(not torch.equal(both.state_dict()[k], v) for k, v in one_sided.state_dict().items())


def test_pair_stats_are_checked_against_the_models_sites():
    d = [torch.randn(8, 5)]
    m0, m1 = _net(0), _net(1)
    st = merge.pair_statistics([m0, m1], d)[0]
    with pytest.raises(ValueError, match="activation sites"):
        merge.activation_match([m0, m1], [0.5, 0.5], d, pair_stats={1: st[:1]})
    with pytest.raises(ValueError, match="not aligned"):
        merge.activation_match([m0, m1], [0.5, 0.5], d, pair_stats={2: st})
