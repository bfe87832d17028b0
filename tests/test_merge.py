"""Tests for dimat.merge: identity merges of hand-permuted copies, WA/DIMAT/WM agreement, BN reset, bad input.

The permuted copies are made by this file's own code (per architecture, written out by hand), never by dimat, so
an error in the derived groups cannot hide behind the same error in the permutation used to test it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dimat import merge, models
from dimat.merge import matching, operators, repair, stats


# --------------------------------------------------------------------------- hand-written permutations
def _perm(n, gen):
    p = torch.randperm(n, generator=gen)
    return torch.roll(p, 1) if n > 1 and bool((p == torch.arange(n)).all()) else p


@torch.no_grad()
def _out(layer, p):
    layer.weight.copy_(layer.weight[p])
    if getattr(layer, "bias", None) is not None:
        layer.bias.copy_(layer.bias[p])


@torch.no_grad()
def _bn(bn, p):
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.copy_(t[p])


@torch.no_grad()
def _in(layer, p, block=1):
    idx = (p[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
    layer.weight.copy_(layer.weight[:, idx])


def _chain(convs, bns, p_in, p_out, gen):
    """Permute a conv-BN chain: every inner output gets a fresh permutation, the last one gets ``p_out``."""
    p = p_in
    for k, (conv, bn) in enumerate(zip(convs, bns)):
        _in(conv, p)
        p = p_out if k == len(convs) - 1 else _perm(conv.out_channels, gen)
        _out(conv, p)
        _bn(bn, p)


def _permute_resnet(m, gen):
    s = _perm(m.conv1.out_channels, gen)
    _out(m.conv1, s)
    _bn(m.bn1, s)
    for block in m.layers:
        convs = [c for c in (block.conv1, block.conv2, getattr(block, "conv3", None)) if c is not None]
        bns = [b for b in (block.bn1, block.bn2, getattr(block, "bn3", None)) if b is not None]
        s_out = s if isinstance(block.shortcut, nn.Identity) else _perm(convs[-1].out_channels, gen)
        if not isinstance(block.shortcut, nn.Identity):
            _in(block.shortcut[0], s)
            _out(block.shortcut[0], s_out)
            _bn(block.shortcut[1], s_out)
        _chain(convs, bns, s, s_out, gen)
        s = s_out
    _in(m.fc, s)


def _permute_sequential_convs(features, gen):
    """Conv-BN-ReLU stacks (cnn, vgg16): returns the permutation of the last conv."""
    p = None
    layers = list(features)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            if p is not None:
                _in(layer, p)
            p = _perm(layer.out_channels, gen)
            _out(layer, p)
            _bn(layers[i + 1], p)
    return p


def _permute_zoo(name, m, gen):
    if name == "mlp":
        p1, p2 = _perm(m.fc1.out_features, gen), _perm(m.fc2.out_features, gen)
        _out(m.fc1, p1), _in(m.fc2, p1), _out(m.fc2, p2), _in(m.fc3, p2)
    elif name == "cnn":
        p = _permute_sequential_convs(m.features, gen)
        fc1, fc2 = m.classifier[1], m.classifier[3]
        _in(fc1, p, block=fc1.in_features // len(p))
        q = _perm(fc1.out_features, gen)
        _out(fc1, q), _in(fc2, q)
    elif name == "vgg16":
        _in(m.classifier, _permute_sequential_convs(m.features, gen))
    else:
        _permute_resnet(m, gen)


# ------------------------------------------------------------------------------------ user-style models
class UserMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x))

    def permute(self, gen):
        p, q = _perm(20, gen), _perm(16, gen)
        _out(self.body[0], p), _in(self.body[2], p), _out(self.body[2], q), _in(self.head, q)


class UserConvFlat(nn.Module):
    """Conv features flattened straight into a Linear: channel c owns inputs [c*HW, (c+1)*HW)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(nn.functional.dropout(torch.relu(self.fc1(x)), 0.5, self.training))

    def permute(self, gen):
        p, q, r = _perm(8, gen), _perm(6, gen), _perm(12, gen)
        _out(self.c1, p), _bn(self.bn1, p), _in(self.c2, p), _out(self.c2, q)
        _in(self.fc1, q, block=16), _out(self.fc1, r), _in(self.fc2, r)


class UserResidual(nn.Module):
    """A residual block with a 1x1 conv-BN projection shortcut (8 -> 12 channels), then global pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bnb = nn.BatchNorm2d(12)
        self.proj = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = nn.functional.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bna(self.a(x)))
        y = self.bnb(self.b(y))
        y = torch.relu(y + self.proj(x))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))

    def permute(self, gen):
        s, p, t = _perm(8, gen), _perm(12, gen), _perm(12, gen)
        _out(self.stem, s), _bn(self.bn0, s), _in(self.a, s), _in(self.proj[0], s)
        _out(self.a, p), _bn(self.bna, p), _in(self.b, p)
        _out(self.b, t), _bn(self.bnb, t), _out(self.proj[0], t), _bn(self.proj[1], t), _in(self.fc, t)


# ------------------------------------------------------------------------------------------------ fixtures
ZOO = {
    "mlp": (dict(in_channels=1, image_size=8), (1, 8, 8)),
    "cnn": (dict(in_channels=1, image_size=8), (1, 8, 8)),
    "vgg16": (dict(width=0.25, image_size=16), (3, 16, 16)),
    "resnet20": (dict(image_size=16), (3, 16, 16)),
    "resnet50": (dict(width=0.125, image_size=16), (3, 16, 16)),
}
USER = {
    "user_mlp": (UserMLP, (12,)),
    "user_conv_flat": (UserConvFlat, (3, 8, 8)),
    "user_residual": (UserResidual, (3, 8, 8)),
}


@torch.no_grad()
def _randomise_bn(model, gen):
    """Give BatchNorm layers non-trivial statistics so that mis-aligned merges show in the logits."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def _pair(kind):
    """Model A (eval mode), a hand-permuted copy B, batches, and a probe input."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    if kind in ZOO:
        kw, shape = ZOO[kind]
        a = models.build(kind, 10, **kw)
    else:
        cls, shape = USER[kind]
        a = cls()
    _randomise_bn(a, gen)
    a.eval()
    b = copy.deepcopy(a)
    if kind in ZOO:
        _permute_zoo(kind, b, gen)
    else:
        b.permute(gen)
    batches = [(torch.randn(24, *shape, generator=gen), torch.zeros(24, dtype=torch.long)) for _ in range(3)]
    probe = torch.randn(16, *shape, generator=gen)
    return a, b, batches, probe


def _rel(y, ref):
    return float((y - ref).abs().max() / ref.abs().max())


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------------------ identity merges
@pytest.mark.parametrize("kind", list(ZOO) + list(USER))
def test_activation_match_undoes_a_hand_made_permutation(kind):
    a, b, batches, probe = _pair(kind)
    ya = _logits(a, probe)
    assert _rel(_logits(b, probe), ya) < 1e-5  # the hand permutation is a true symmetry
    merged = merge.activation_match([a, b], [0.5, 0.5], batches, reset_bn=False)
    assert _rel(_logits(merged, probe), ya) < 1e-4
    # not vacuous: plain averaging of the same pair changes the function
    assert _rel(_logits(merge.average([a, b], [0.5, 0.5]), probe), ya) > 1e-2


@pytest.mark.parametrize("kind", ["cnn", "resnet20", "user_residual"])
def test_weight_match_undoes_a_hand_made_permutation(kind):
    a, b, batches, probe = _pair(kind)
    merged = merge.weight_match([a, b], [0.5, 0.5], batches, reset_bn=False)
    assert _rel(_logits(merged, probe), _logits(a, probe)) < 1e-4


def test_three_models_with_uneven_weights():
    a, b, batches, probe = _pair("user_conv_flat")
    c = copy.deepcopy(a)
    c.permute(torch.Generator().manual_seed(99))
    merged = merge.activation_match([a, b, c], [2, 1, 1], batches, reset_bn=False)
    assert _rel(_logits(merged, probe), _logits(a, probe)) < 1e-4


@pytest.mark.parametrize("kind", ["resnet20", "user_conv_flat", "mlp"])
def test_average_equals_activation_match_with_identity_permutations(kind, monkeypatch):
    # resnet20: BatchNorm only; user_conv_flat: BatchNorm and corrected layers; mlp: corrected layers only
    a, b, batches, _ = _pair(kind)
    monkeypatch.setattr(matching, "match", lambda corr: torch.arange(corr.shape[0]))
    for reset, fix in ((False, False), (True, False), (True, True)):
        wa = merge.average([a, b], [0.3, 0.7], batches=batches, reset_bn=reset, repair=fix).state_dict()
        am = merge.activation_match([a, b], [0.3, 0.7], batches, reset_bn=reset, repair=fix).state_dict()
        assert wa.keys() == am.keys()
        for k in wa:
            assert torch.allclose(wa[k], am[k], rtol=1e-6, atol=1e-7), (k, reset, fix)
    # with corrected layers, REPAIR is more than the average: average's default (repair off) differs
    plain = merge.average([a, b], [0.3, 0.7], batches=batches, reset_bn=True).state_dict()
    am = merge.activation_match([a, b], [0.3, 0.7], batches, reset_bn=True).state_dict()
    same = all(torch.allclose(plain[k], am[k], rtol=1e-6, atol=1e-7) for k in plain)
    assert same == (kind == "resnet20")


@pytest.mark.parametrize("method", ["dimat", "wm"])
def test_same_basis_models_are_averaged_as_they_are(method):
    # A: the basis; B: a hand-permuted copy (aligned back); C: another copy declared to share A's basis, so it is
    # averaged unaligned even though it too is permuted. The merge is then the average of A, A and C as they are.
    a, b, batches, probe = _pair("user_conv_flat")
    c = copy.deepcopy(a)
    c.permute(torch.Generator().manual_seed(99))
    fn = merge.get(method)
    got = fn([a, b, c], [1, 1, 1], batches=batches, reset_bn=False, same_basis=[2]).state_dict()
    want = merge.average([a, a, c], [1, 1, 1]).state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    # and without the declaration C is aligned too, which restores A's function
    merged = fn([a, b, c], [1, 1, 1], batches=batches, reset_bn=False)
    assert _rel(_logits(merged, probe), _logits(a, probe)) < 1e-4


@pytest.mark.parametrize("bad", [[0], [3], [-1], [1.0], [True]])
@pytest.mark.parametrize("method", ["dimat", "wm", "wa"])
def test_same_basis_must_name_neighbour_indices(method, bad):
    a, b, batches, _ = _pair("user_mlp")
    with pytest.raises(ValueError, match="same_basis"):
        merge.get(method)([a, b, a], [1, 1, 1], batches=batches, reset_bn=False, same_basis=bad)


def test_average_is_the_weighted_mean_and_integer_buffers_come_from_model_0():
    a, b, _, _ = _pair("cnn")
    b.features[1].num_batches_tracked.fill_(5)
    m = merge.get("wa")([a, b], [1, 3])
    sa, sb, sm = a.state_dict(), b.state_dict(), m.state_dict()
    for k, v in sm.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.25 * sa[k] + 0.75 * sb[k], atol=1e-6), k
        else:
            assert torch.equal(v, sa[k]), k
    assert m is not a and m is not b


# ----------------------------------------------------------------------------------------- side effects
@pytest.mark.parametrize("method", sorted(merge.METHODS))
def test_inputs_are_never_mutated(method):
    a, b, batches, _ = _pair("resnet20")
    a.train()
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    merged = merge.get(method)([a, b], [0.5, 0.5], batches=batches, reset_bn=True, stat_batches=2)
    for m, sd in zip((a, b), before):
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert a.training and not b.training  # modes restored
    assert merged is not a and merged is not b
    bns = [m for m in merged.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.momentum == 0.1 for bn in bns)


def test_reset_bn_stats_is_the_cumulative_average_and_restores_momentum():
    model = UserConvFlat()
    model.bn1.momentum = 0.3
    model.eval()
    batches = [torch.randn(10, 3, 8, 8) for _ in range(4)]
    merge.reset_bn_stats(model, batches, num_batches=3)
    with torch.no_grad():
        pre = torch.cat([model.c1(x) for x in batches[:3]])
    assert torch.allclose(model.bn1.running_mean, pre.mean((0, 2, 3)), atol=1e-5)
    batch_vars = torch.stack([model.c1(x).detach().var((0, 2, 3)) for x in batches[:3]])
    assert torch.allclose(model.bn1.running_var, batch_vars.mean(0), rtol=1e-4, atol=1e-6)
    assert model.bn1.momentum == 0.3 and not model.training


def test_groups_are_derived_once_per_architecture(monkeypatch):
    a, b, batches, _ = _pair("user_mlp")
    operators._SPEC_CACHE.clear()
    calls = []
    real = operators.structure.derive
    monkeypatch.setattr(operators.structure, "derive", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):
        merge.activation_match([a, b], [0.5, 0.5], batches, reset_bn=False)
    assert len(calls) == 1


def test_repair_plan_is_made_once_per_architecture(monkeypatch):
    a, b, batches, _ = _pair("user_conv_flat")
    operators._PLAN_CACHE.clear()
    calls = []
    real = operators.repair_plan
    monkeypatch.setattr(operators, "repair_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):
        merge.activation_match([a, b], [0.5, 0.5], batches, reset_bn=True)
    assert len(calls) == 1


def test_dead_units_give_no_nan():
    a, b, batches, probe = _pair("user_mlp")
    with torch.no_grad():
        a.body[0].bias[:5] = -1e3  # five units that never fire
    st = stats.CrossStats(4)
    x = torch.randn(50, 4)
    x[:, 1] = 0.0
    st.update(x, x.clone())
    corr = st.correlation()
    assert torch.isfinite(corr).all() and corr[1].abs().sum() == 0 and corr[0, 0] == pytest.approx(1.0)
    merged = merge.activation_match([a, b], [0.5, 0.5], batches, reset_bn=False)
    assert all(torch.isfinite(v).all() for v in merged.state_dict().values())


def test_streaming_statistics_match_numpy():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 5, generator=gen) * 3 + 10
    b = a @ torch.randn(5, 5, generator=gen) + torch.randn(300, 5, generator=gen)
    st = stats.CrossStats(5)
    for i in range(0, 300, 70):
        st.update(a[i:i + 70], b[i:i + 70])
    ref = np.corrcoef(a.double().numpy().T, b.double().numpy().T)[:5, 5:]
    assert np.allclose(st.correlation().numpy(), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bad input
def _bad_models():
    a, b, batches, _ = _pair("cnn")
    return a, b, batches


@pytest.mark.parametrize("method", sorted(merge.METHODS))
def test_bad_inputs_raise_value_error(method):
    fn = merge.get(method)
    a, b, batches = _bad_models()

    def call(models, weights=(0.5, 0.5), bt=batches):
        return fn(models, list(weights), batches=bt, reset_bn=True)

    with pytest.raises(ValueError, match="model 1 has a different architecture"):
        call([a, models.build("mlp", 10, in_channels=1, image_size=8)])
    with pytest.raises(ValueError, match=r"model 1: tensor 'features.0.weight' has shape"):
        call([a, models.build("cnn", 10, width=0.5, in_channels=1, image_size=8)])
    for bad in (float("nan"), float("inf")):
        c = copy.deepcopy(b)
        with torch.no_grad():
            c.classifier[1].bias[3] = bad
        with pytest.raises(ValueError, match=r"model 1: tensor 'classifier.1.bias' contains NaN or Inf"):
            call([a, c])
    with pytest.raises(ValueError, match="got 3 weights for 2 models"):
        call([a, b], (0.2, 0.3, 0.5))
    with pytest.raises(ValueError, match="weight 1 .* non-negative"):
        call([a, b], (1.5, -0.5))
    with pytest.raises(ValueError, match="sum to 0"):
        call([a, b], (0, 0))
    with pytest.raises(ValueError, match="non-empty sequence"):
        call([])
    with pytest.raises(ValueError, match="batches is empty"):
        call([a, b], bt=[])
    with pytest.raises(ValueError, match="re-iterable"):
        call([a, b], bt=iter(batches))


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ValueError, match="dimat, wa, wm"):
        merge.get("fedavg")


def test_registered_methods_share_the_common_call():
    a, b, batches, _ = _pair("user_mlp")
    for name, fn in merge.METHODS.items():
        out = fn([a, b], [0.5, 0.5], batches=batches, reset_bn=False, stat_batches=1, same_basis=[1])
        assert isinstance(out, UserMLP), name


# -------------------------------------------------------------------------------- trained models (digits)
def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[idx[:1400]], y[idx[:1400]], x[idx[1400:]], y[idx[1400:]]


def _train_cnn(seed, xtr, ytr, epochs=3):
    torch.manual_seed(seed)
    m = models.build("cnn", 10, in_channels=1, image_size=8)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    m.train()
    for _ in range(epochs):
        order = torch.randperm(len(xtr))
        for i in range(0, len(order), 64):
            j = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(m(xtr[j]), ytr[j]).backward()
            opt.step()
    return m


def _accuracy(m, x, y):
    return float((_logits(m, x).argmax(1) == y).float().mean()) * 100


@pytest.fixture(scope="module")
def digits_pair():
    """Two cnn models trained independently (seeds 1 and 2, 3 epochs) on the digits training split."""
    xtr, ytr, xte, yte = _digits()
    return xtr, ytr, xte, yte, _train_cnn(1, xtr, ytr), _train_cnn(2, xtr, ytr)


def test_activation_match_beats_average_on_independently_trained_cnns(digits_pair):
    xtr, ytr, xte, yte, a, b = digits_pair
    ends = [_accuracy(m, xte, yte) for m in (a, b)]
    assert min(ends) > 90
    batches = [(xtr[i:i + 128], ytr[i:i + 128]) for i in range(0, len(xtr), 128)]
    wa = _accuracy(merge.average([a, b], [0.5, 0.5]), xte, yte)
    dimat = _accuracy(merge.activation_match([a, b], [0.5, 0.5], batches, reset_bn=True), xte, yte)
    assert dimat >= wa + 10, (ends, wa, dimat)
    assert dimat >= 0.85 * sum(ends) / 2, (ends, dimat)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet20", "user_mlp", "user_conv_flat", "user_residual"])
def test_the_correlations_alone_recover_the_permutation(kind, monkeypatch):
    # the parameter tie-break only separates units that never fire; these models have none on the batches
    monkeypatch.setattr(matching, "TIE_BREAK", 0.0)
    a, b, batches, probe = _pair(kind)
    merged = merge.activation_match([a, b], [0.5, 0.5], batches, reset_bn=False)
    assert _rel(_logits(merged, probe), _logits(a, probe)) < 1e-4


def test_repair_gives_unbatchnormed_layers_the_endpoints_statistics(digits_pair):
    xtr, ytr, xte, yte, a, b = digits_pair
    batches = [xtr[i:i + 200] for i in range(0, 1400, 200)]
    fc1 = "classifier.1"
    candidates = [n for n, _ in repair.repair_layers(a, merge.spec_for(a, batches[0])[0])]
    steps = repair.plan(a, candidates, batches[0][:2])
    assert steps.layers == {fc1: 1}  # measured after the BN reset ...
    assert set(steps.bns.values()) == {0} and set(steps.followed_by_bn) == set(candidates) - {fc1}  # ... of these
    plain = merge.activation_match([a, b], [0.5, 0.5], batches, reset_bn=True, repair=False)
    fixed = merge.activation_match([a, b], [0.5, 0.5], batches, reset_bn=True, repair=True)
    # the endpoints' per-unit spread (units matched by sorting, which is permutation-free)
    ends = [repair.endpoint_stats(m, [fc1], batches)[fc1][1].sort().values for m in (a, b)]
    target = (ends[0] + ends[1]) / 2
    got = {k: repair.endpoint_stats(m, [fc1], batches)[fc1][1].sort().values for k, m in
           (("plain", plain), ("fixed", fixed))}
    def off(v):
        return float((v - target).abs().mean() / target.mean())

    assert off(got["plain"]) > 0.2  # averaging (and the BN reset upstream) changes the spread of fc1's units
    assert off(got["fixed"]) < 0.05
    assert _accuracy(fixed, xte, yte) >= _accuracy(plain, xte, yte) - 1


class StackedRepair(nn.Module):
    """Corrected layers behind a BatchNorm (c2), behind dropout (fc1) and behind other corrected layers (fc2)."""

    def __init__(self, p_drop):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.drop = nn.Dropout(p_drop)
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = self.drop(nn.functional.max_pool2d(torch.relu(self.c2(x)), 2))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


@pytest.mark.parametrize("p_drop", [0.5, 0.0])
def test_repaired_layers_have_the_target_statistics_in_the_finished_model(p_drop, monkeypatch):
    # Identity permutations, so the targets are simply the weighted endpoint statistics of each layer. The
    # finished model, run as it will be used (eval mode), must give every corrected layer exactly those.
    monkeypatch.setattr(matching, "match", lambda corr: torch.arange(corr.shape[0]))
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    a, b = StackedRepair(p_drop), StackedRepair(p_drop)
    for m in (a, b):
        _randomise_bn(m, gen)
    batches = [torch.randn(16, 3, 8, 8, generator=gen) for _ in range(4)]
    merged = merge.activation_match([a, b], [0.25, 0.75], batches, reset_bn=True, repair=True)
    layers = ["c2", "fc1", "fc2"]
    ends = [repair.endpoint_stats(m, layers, batches) for m in (a, b)]
    got = repair.endpoint_stats(merged, layers, batches)
    for name in layers:
        for k in (0, 1):  # mean, std
            target = 0.25 * ends[0][name][k] + 0.75 * ends[1][name][k]
            assert torch.allclose(got[name][k], target, rtol=1e-4, atol=1e-4 * float(target.abs().max())), name
    # and the BatchNorm holds the statistics of its input in the finished model
    with torch.no_grad():
        pre = torch.cat([merged.c1(x) for x in batches])
    assert torch.allclose(merged.bn.running_mean, pre.mean((0, 2, 3)), atol=1e-5)


class AliasNet(nn.Module):
    """One activation read by a conv and, through a flatten view of the same storage, by a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4 + 4, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        a = torch.relu(self.c2(h)).mean((2, 3))
        return self.fc(torch.cat([h.flatten(1), a], 1))


class TinyTransformer(nn.Module):
    """A pre-norm transformer block on 4 tokens: no BatchNorm anywhere, LayerNorm before attention and MLP."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, dim)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.3), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x).mean(1))


def test_repair_corrects_every_permuted_layer_of_a_layernorm_network():
    torch.manual_seed(0)
    a, b = TinyTransformer(), TinyTransformer()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 4, 6, generator=gen) for _ in range(3)]
    spec = merge.spec_for(a, batches[0])[0]
    candidates = [n for n, _ in repair.repair_layers(a, spec)]
    steps = repair.plan(a, candidates, batches[0][:2])
    assert set(steps.layers) == {"embed", "q", "k", "v", "proj", "mlp.0", "mlp.3"} and not steps.bns
    assert steps.layers["proj"] > steps.layers["v"] > steps.layers["embed"] and steps.layers["mlp.3"] == 4
    # identity permutations (average with REPAIR is activation_match's code path without the alignment)
    merged = merge.average([a, b], [0.5, 0.5], batches=batches, reset_bn=True, repair=True)
    plain = merge.average([a, b], [0.5, 0.5], batches=batches, reset_bn=True)
    ends = [repair.endpoint_stats(m, list(steps.layers), batches) for m in (a, b)]
    got, before = (repair.endpoint_stats(m, list(steps.layers), batches) for m in (merged, plain))
    for name in steps.layers:
        target = (ends[0][name][1] + ends[1][name][1]) / 2
        assert torch.allclose(got[name][1], target, rtol=1e-4), name
        assert torch.allclose(got[name][0], (ends[0][name][0] + ends[1][name][0]) / 2, atol=1e-4), name
    assert float((before["mlp.3"][1] / ((ends[0]["mlp.3"][1] + ends[1]["mlp.3"][1]) / 2)).mean()) < 0.9  # collapse


# Where each group's activations are read, written out by hand for the reference below: the group of a layer's
# output units -> the layers that consume them, the columns of the consumer's input they occupy and the number of
# consecutive entries per unit (a flattened C x 4 x 4 map gives each channel 16).
_HAND_SITES = {
    "UserConvFlat": {"c1.weight": [("c2", None, 1)], "c2.weight": [("fc1", None, 16)],
                     "fc1.weight": [("fc2", None, 1)]},
    "AliasNet": {"c1.weight": [("c2", None, 1), ("fc", slice(0, 96), 16)], "c2.weight": [("fc", slice(96, 100), 1)]},
}


def _hand_features(model, consumer, cols, block, xs):
    """The consumer's inputs, captured by a forward pre-hook, as a numpy [samples, units] matrix."""
    seen = []
    handle = model.get_submodule(consumer).register_forward_pre_hook(lambda m, a: seen.append(a[0].numpy().copy()))
    try:
        model.eval()
        with torch.no_grad():
            for x in xs:
                model(x)
    finally:
        handle.remove()
    v = np.concatenate(seen).astype(np.float64)
    if v.ndim == 4:  # N x C x H x W: every pixel of every image is a sample of each channel
        return v.transpose(0, 2, 3, 1).reshape(-1, v.shape[1])
    v = v[:, cols] if cols is not None else v
    units = v.shape[1] // block
    return v.reshape(len(v), units, block).transpose(0, 2, 1).reshape(-1, units)


@pytest.mark.parametrize("bmm_limit", [4_000_000, 0])
@pytest.mark.parametrize("net", [UserConvFlat, AliasNet])
def test_collected_correlations_match_numpy_at_every_site(bmm_limit, net, monkeypatch):
    # The reference uses nothing of dimat's statistics code: forward hooks on the consuming layers and numpy.
    monkeypatch.setattr(stats._BatchMoments, "_BMM_LIMIT", bmm_limit)  # both layouts of the cross products
    torch.manual_seed(0)
    a, b = net(), net()
    for m in (a, b):
        _randomise_bn(m, torch.Generator().manual_seed(3))
    side = 4 if net is AliasNet else 8
    xs = [torch.randn(20, 3, side, side) for _ in range(3)]
    spec, graph = merge.spec_for(a, xs[0])
    corr = stats.collect_correlations([a, b], spec, graph, xs, spec.permutable)[0]
    hand = _HAND_SITES[net.__name__]
    group_of = {ax.tensor: gi for gi in spec.permutable for ax in spec.groups[gi].axes if ax.axis == 0}
    assert sorted(group_of[t] for t in hand) == sorted(spec.permutable)
    for tensor, sites in hand.items():
        refs = []
        for consumer, cols, block in sites:
            fa, fb = (_hand_features(m, consumer, cols, block, xs) for m in (a, b))
            with np.errstate(invalid="ignore", divide="ignore"):
                ref = np.corrcoef(fa.T, fb.T)[: fa.shape[1], fa.shape[1]:]
            refs.append(np.nan_to_num(ref, nan=0.0))  # numpy gives NaN for a dead unit, dimat gives 0
        assert np.allclose(corr[group_of[tensor]].numpy(), np.mean(refs, 0), atol=1e-5), tensor


@pytest.mark.parametrize("layout", ["rows", "bmm", "cols"])
def test_batch_moments_build_nothing_larger_than_the_samples(layout, monkeypatch):
    # Per-unit sums of squares need O(samples x units) memory; a units x units product appears only in cross().
    from torch.overrides import TorchFunctionMode

    class Largest(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.numel = max(self.numel, out.numel())
            return out

    units = 300
    monkeypatch.setattr(stats._BatchMoments, "_BMM_LIMIT", 10**9 if layout == "bmm" else 0)
    shape = (8, units) if layout == "rows" else (2, units, 2, 2)
    value = torch.randn(*shape)
    site = _site(units)
    with Largest() as spy:
        m = stats._BatchMoments(value, site)
    assert m.mode == layout
    assert spy.numel <= value.numel(), spy.numel  # 8 samples x 300 units, not 300 x 300
    ref = _units_matrix(value)
    assert torch.allclose(m.m2.double(), ((ref - ref.mean(0)) ** 2).sum(0), rtol=1e-4)


def _site(units):
    from dimat.merge.structure import Site

    return Site(node="x", dim=1, offset=0, units=units)


def _units_matrix(value):
    """[samples, units] by hand: units on dim 1, every other dimension a sample."""
    return value.double().movedim(1, -1).reshape(-1, value.shape[1])


def test_weight_match_without_batches_uses_an_example_or_an_earlier_derivation():
    a, b, batches, probe = _pair("user_residual")
    operators._SPEC_CACHE.clear()
    with pytest.raises(ValueError, match="needs batches or an example_input"):
        merge.weight_match([a, b], [0.5, 0.5])
    m1 = merge.weight_match([a, b], [0.5, 0.5], example_input=probe[:2], reset_bn=False)
    m2 = merge.weight_match([a, b], [0.5, 0.5])  # the groups derived above are reused; no BN reset
    for m in (m1, m2):
        assert _rel(_logits(m, probe), _logits(a, probe)) < 1e-4


def test_channels_last_fast_path_gives_the_same_merge(monkeypatch):
    a, b, batches, probe = _pair("resnet20")
    merge.spec_for(a, batches[0][0])
    assert operators._channels_last(a, batches[0][0])  # resnet20 accepts channels-last inputs
    fast = merge.activation_match([a, b], [0.4, 0.6], batches, reset_bn=True).state_dict()
    monkeypatch.setattr(operators, "_channels_last", lambda model, example: False)
    slow = merge.activation_match([a, b], [0.4, 0.6], batches, reset_bn=True).state_dict()
    for k in fast:
        assert torch.allclose(fast[k].float(), slow[k].float(), rtol=1e-4, atol=1e-5), k
    assert not operators._accepts_channels_last(UserConvFlat(), torch.randn(2, 3, 8, 8))  # x.view(n, -1) raises


# ------------------------------------------------------------------- min_corr: poorly matched units stay out
def _mlp_and_corrupted_copy():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(32, 6), nn.ReLU(), nn.Linear(6, 3))  # 6 nearly uncorrelated features
    other = copy.deepcopy(ref)
    with torch.no_grad():
        other[0].weight[2] = -ref[0].weight[2]  # unit 2 now fires where ref's unit 2 is silent: correlation < 0
        other[0].bias[2] = -ref[0].bias[2]
        other[2].weight[:, 2] = torch.randn(3)
    p = torch.tensor([3, 5, 0, 1, 4, 2])  # hide it among the others, by hand
    _out(other[0], p)
    with torch.no_grad():
        other[2].weight.copy_(other[2].weight[:, p])
    return ref, other, [torch.randn(256, 32) for _ in range(2)]


def test_min_corr_leaves_a_unit_that_does_not_match_out_of_the_mean():
    ref, other, batches = _mlp_and_corrupted_copy()
    report = {}
    merged = merge.activation_match([ref, other], [0.5, 0.5], batches, repair=False, min_corr=0.5, report=report)
    # every other unit is the same feature in both models, and the corrupted one is the reference's alone
    for (k, v), (_, r) in zip(merged.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(v, r, atol=1e-6), k
    assert report[1]["kept"] == pytest.approx(5 / 6)
    plain = merge.activation_match([ref, other], [0.5, 0.5], batches, repair=False)
    assert not torch.allclose(plain[0].weight[2], ref[0].weight[2])  # averaged with its opposite
    assert torch.allclose(plain[0].weight[[0, 1, 3, 4, 5]], ref[0].weight[[0, 1, 3, 4, 5]], atol=1e-6)
    # below every correlation: the plain merge; above 1: no aligned neighbour contributes
    low = merge.activation_match([ref, other], [0.5, 0.5], batches, repair=False, min_corr=-2.0)
    for (k, v), (_, w) in zip(low.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(v, w), k
    report = {}
    alone = merge.activation_match([ref, other], [0.5, 0.5], batches, repair=False, min_corr=1.5, report=report)
    assert torch.allclose(alone[2].weight, ref[2].weight) and report[1]["kept"] == 0.0


def test_min_corr_keeps_repairs_targets_the_mean_of_every_participant():
    # min_corr decides which weights form a unit; REPAIR's target for the unit stays the weighted mean of the
    # participants' matched units' statistics on the local batches (leaving the neighbour out of the targets too
    # was measured worse: docs/merge.md, "Measured on digits")
    ref, other, batches = _mlp_and_corrupted_copy()
    merged = merge.activation_match([ref, other], [0.5, 0.5], batches, repair=True, reset_bn=True, min_corr=0.5)
    x = torch.cat(batches)
    with torch.no_grad():
        pre_ref, pre_merged = ref[0](x)[:, 2], merged[0](x)[:, 2]
    # the corrupted copy's unit is the reference's unit negated: mean -m, same std, so the target is (0, std)
    assert abs(float(pre_merged.mean())) < 1e-3 * float(pre_ref.std())
    assert float(pre_merged.std()) == pytest.approx(float(pre_ref.std()), rel=1e-2)
    assert float(pre_ref.mean()) ** 2 > 1e-2 * float(pre_ref.var())  # so the rescaling did move the unit


def test_min_corr_averages_models_of_the_same_basis_whole():
    ref, other, batches = _mlp_and_corrupted_copy()
    merged = merge.activation_match([ref, other], [0.5, 0.5], batches, repair=False, min_corr=1.5, same_basis=[1])
    want = merge.average([ref, other], [0.5, 0.5])
    for (k, v), (_, w) in zip(merged.state_dict().items(), want.state_dict().items()):
        assert torch.allclose(v, w), k


def test_min_corr_per_model_thresholds():
    ref, other, batches = _mlp_and_corrupted_copy()
    third = copy.deepcopy(other)
    models, w = [ref, other, third], [0.4, 0.3, 0.3]

    def run(min_corr):
        report = {}
        return merge.activation_match(models, w, batches, min_corr=min_corr, report=report).state_dict(), report

    (same, rep_same), (scalar, rep_scalar) = run([0.5, 0.5]), run(0.5)
    assert all(torch.equal(same[k], scalar[k]) for k in same) and rep_same == rep_scalar
    (none, _), (all_none, rep_none) = run(None), run([None, None])
    assert all(torch.equal(none[k], all_none[k]) for k in none)
    assert all("kept" not in r for r in rep_none.values())
    mixed, rep_mixed = run([0.5, None])
    assert "kept" in rep_mixed[1] and "kept" not in rep_mixed[2]
    assert any(not torch.equal(mixed[k], scalar[k]) for k in mixed)
    with pytest.raises(ValueError, match="2 thresholds for 1 aligned models"):
        merge.activation_match([ref, other], [0.5, 0.5], batches, min_corr=[0.5, 0.5])
    with pytest.raises(ValueError, match="min_corr must be a finite number or None"):
        merge.activation_match([ref, other], [0.5, 0.5], batches, min_corr=[float("nan")])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", True])
def test_min_corr_must_be_a_finite_number(bad):
    ref, other, batches = _mlp_and_corrupted_copy()
    with pytest.raises(ValueError, match="min_corr must be a finite number or None"):
        merge.activation_match([ref, other], [0.5, 0.5], batches, min_corr=bad)


@pytest.mark.parametrize("sets,needle", [
    (["merge.min_corr=0.5", "merge.method=wa"], "acts on activation matching (merge.method dimat)"),
    (["merge.min_corr=0.5", "merge.combine=ties"], "merge.combine mean only, got 'ties'"),
    (["merge.min_corr=.nan"], "must be finite"),
    (["merge.min_corr=high"], "merge.min_corr"),
])
def test_min_corr_config_is_checked(sets, needle):
    from dimat.config import UserError, resolve
    with pytest.raises(UserError) as e:
        resolve({}, sets, where="run.yaml")
    assert needle in str(e.value) and "merge.min_corr" in str(e.value) and "\n" not in str(e.value)
    assert resolve({}, ["merge.min_corr=0.4"]).merge.min_corr == 0.4


def test_node_refuses_min_corr_for_a_method_that_does_not_match():
    from dimat.node import Node
    from dimat.transport.inproc import make_inproc
    t = make_inproc([[1], [0]])[0]
    with pytest.raises(ValueError, match="min_corr act on activation matching; method 'wa'"):
        Node(nn.Linear(2, 2), [[0.5, 0.5], [0.5, 0.5]], 0, t, [torch.randn(4, 2)], method="wa", min_corr=0.5)


def test_a_run_with_min_corr_reports_the_share_of_units_kept(tmp_path, capsys):
    import json
    from dimat.cli import main
    cfg = tmp_path / "run.yaml"
    cfg.write_text("agents: 3\nthreads: 1\nrounds: 2\ntopology: ring\nmerge: {basis: own, min_corr: 0.3}\n"
                   "data: {dataset: digits, partition: iid}\nmodel: {name: mlp}\ntrain: {epochs: 1}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    merges = [r for r in rows if r.get("phase") == "merge" and r.get("agent", -1) >= 0]
    assert len(merges) == 6
    kept = [e["kept"] for r in merges for e in r["edges"].values()]
    assert len(kept) == 12 and all(0.0 <= k <= 1.0 for k in kept) and min(kept) < 1.0  # some units left out
    assert all(r["units_kept"] == pytest.approx(sum(e["kept"] for e in r["edges"].values()) / 2) for r in merges)


def test_min_corr_auto_is_the_default_for_dimat_with_the_mean_rule_only():
    from dimat.config import resolve
    from dimat.merge.combine import CombineOptions
    from dimat.node import Node
    from dimat.transport.inproc import make_inproc
    assert resolve({}).merge.min_corr == "auto"
    for sets in (["merge.method=wa"], ["merge.combine=ties"], ["merge.min_corr=null", "merge.method=wm"]):
        resolve({}, sets)  # the default, or null, is fine with any method and rule
    t = make_inproc([[1], [0]])[0]
    mix, x = [[0.5, 0.5], [0.5, 0.5]], [torch.randn(4, 2)]
    assert Node(nn.Linear(2, 2), mix, 0, t, x).min_corr == Node.MIN_CORR
    assert Node(nn.Linear(2, 2), mix, 0, t, x, min_corr=None).min_corr is None
    assert Node(nn.Linear(2, 2), mix, 0, t, x, method="wa").min_corr is None
    assert Node(nn.Linear(2, 2), mix, 0, t, x, combine=CombineOptions(rule="ties")).min_corr is None
    with pytest.raises(ValueError, match="min_corr must be a number, None or 'auto'"):
        Node(nn.Linear(2, 2), mix, 0, t, x, min_corr="high")
    with pytest.raises(ValueError, match="combine rule 'mean' only, got 'ties'"):
        Node(nn.Linear(2, 2), mix, 0, t, x, min_corr=0.5, combine=CombineOptions(rule="ties"))
