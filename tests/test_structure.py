"""Tests for dimat.merge.structure: derived groups, the invariance self-test, freezing, apply_permutation, describe."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from dimat import models
from dimat.merge.structure import (
    INVARIANCE_TOL,
    AxisSlice,
    PermutationSpec,
    apply_permutation,
    check_invariance,
    derive,
    random_perms,
)

# zoo model -> (build kwargs, example input shape); small widths and inputs keep the suite fast
ZOO = {
    "mlp": (dict(in_channels=1, image_size=8), (2, 1, 8, 8)),
    "cnn": (dict(in_channels=1, image_size=8), (2, 1, 8, 8)),
    "vgg16": (dict(width=0.25, image_size=16), (2, 3, 16, 16)),
    "resnet20": (dict(image_size=16), (2, 3, 16, 16)),
    "resnet50": (dict(width=0.125, image_size=16), (2, 3, 16, 16)),
}


def _zoo(name):
    kw, shape = ZOO[name]
    torch.manual_seed(0)
    return models.build(name, 10, **kw), torch.randn(*shape)


def _group_of(spec: PermutationSpec, tensor: str, axis: int):
    hits = [g for g in spec.groups for a in g.axes if a.tensor == tensor and a.axis == axis]
    assert len(hits) == 1, f"{tensor}[{axis}] is in {len(hits)} groups"
    return hits[0]


@pytest.fixture(scope="module")
def zoo_specs():
    out = {}
    for name in ZOO:
        model, x = _zoo(name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the zoo must derive without any warning
            out[name] = (model, x, derive(model, x))
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_only_logits_are_frozen_and_self_test_passes(zoo_specs, name):
    model, x, spec = zoo_specs[name]
    frozen = [g for g in spec.groups if g.frozen]
    assert len(frozen) == 1 and "network output" in frozen[0].frozen
    last = [m for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert frozen[0].size == last.out_features == 10
    errors = check_invariance(model, spec, x, seed=3)
    assert set(errors) == set(spec.permutable) and spec.permutable
    assert max(errors.values()) < INVARIANCE_TOL


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "resnet50", "cnn"])
def test_every_conv_output_is_permuted(zoo_specs, name):
    model, _, spec = zoo_specs[name]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for n in convs:
        assert _group_of(spec, f"{n}.weight", 0).permutable, n


def test_resnet20_residual_stream_is_one_group_per_stage(zoo_specs):
    model, _, spec = zoo_specs["resnet20"]
    stream = _group_of(spec, "conv1.weight", 0)
    # the stem, every block output of stage 1 and the inputs of stage 2's first block share one permutation
    names = {a.tensor for a in stream.axes}
    assert {"layers.0.conv2.weight", "layers.2.conv2.weight", "layers.3.shortcut.0.weight"} <= names
    assert stream.size == 16 and len(stream.sites) == 4
    last = _group_of(spec, "fc.weight", 1)
    assert last is _group_of(spec, "layers.6.shortcut.0.weight", 0) and last.size == 64
    assert len(spec.permutable) == 3 + 9  # three residual streams and one inner group per block


def test_cnn_flatten_gives_each_channel_its_block(zoo_specs):
    model, _, spec = zoo_specs["cnn"]
    g = _group_of(spec, "classifier.1.weight", 1)
    (ax,) = [a for a in g.axes if a.tensor == "classifier.1.weight"]
    assert ax.block == 2 * 2 and ax.units == 64 and g is _group_of(spec, "features.10.weight", 0)


def test_describe_lists_size_axes_and_sites(zoo_specs):
    _, _, spec = zoo_specs["cnn"]
    text = spec.describe()
    assert "group 3 [features.10] size 64, permuted" in text
    assert "classifier.1.weight[axis 1 block 4]" in text
    assert "input of classifier.1" in text
    assert "FROZEN: reaches the network output" in text


class ConcatNet(nn.Module):
    """Two conv branches concatenated along channels, then a conv: torch.cat keeps one segment per branch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        x = torch.relu(self.c(x)).mean((2, 3))
        return self.fc(x)


def test_cat_is_split_into_segments():
    model, x = ConcatNet(), torch.randn(2, 3, 8, 8)
    spec = derive(model, x)
    ga, gb = _group_of(spec, "a.weight", 0), _group_of(spec, "b.weight", 0)
    assert ga.permutable and gb.permutable and ga is not gb
    assert AxisSlice("c.weight", 1, 0, 4) in ga.axes and AxisSlice("c.weight", 1, 4, 6) in gb.axes
    assert AxisSlice("bn.running_var", 0, 4, 6) in gb.axes
    assert _group_of(spec, "c.weight", 0).permutable  # the mean over H, W keeps c's channels
    assert max(check_invariance(model, spec, x).values()) < INVARIANCE_TOL


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(torch.relu(self.pw(x)).mean((2, 3)))


def test_depthwise_conv_moves_with_its_input():
    model, x = GroupedNet(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = derive(model, x)
    g = _group_of(spec, "conv.weight", 0)
    assert g.permutable and g is _group_of(spec, "dw.weight", 0) and AxisSlice("pw.weight", 1, 0, 8) in g.axes
    assert _group_of(spec, "pw.weight", 0).permutable
    assert max(check_invariance(model, spec, x).values()) < INVARIANCE_TOL


class GroupedConvNet(nn.Module):
    """A grouped conv (groups=2): channels move in blocks, and inside a block one permutation for all blocks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grp = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.grp(torch.relu(self.conv(x)))).mean((2, 3)))


def test_grouped_conv_is_block_structured():
    model, x = GroupedConvNet(), torch.randn(2, 3, 8, 8)
    spec = derive(model, x)
    gin, gout = _group_of(spec, "conv.weight", 0), _group_of(spec, "grp.weight", 0)
    assert gin.permutable and gout.permutable
    assert [f.units for f in gin.factors] == [2, 4] and [f.units for f in gout.factors] == [2, 3]
    assert gin.factors[0].key == gout.factors[0].key  # the blocks move together on both sides
    assert max(check_invariance(model, spec, x).values()) < INVARIANCE_TOL


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h, _ = self.attn(h, h, h)
        return self.out(torch.relu(self.mid(h)))


def test_multihead_attention_heads_are_structured():
    model, x = AttentionNet(), torch.randn(2, 5, 4)
    spec = derive(model, x)
    assert _group_of(spec, "inp.weight", 0).permutable  # the stream into and out of the attention
    q = next(g for g in spec.groups for a in g.axes if a == AxisSlice("attn.in_proj_weight", 0, 0, 8))
    v = next(g for g in spec.groups for a in g.axes if a == AxisSlice("attn.in_proj_weight", 0, 16, 8))
    assert [f.units for f in q.factors] == [2, 4] and q.factors[0].key == v.factors[0].key  # heads shared
    assert q.factors[1].key != v.factors[1].key  # Q/K and V/O each have their own within-head permutation
    assert AxisSlice("attn.in_proj_weight", 0, 8, 8) in q.axes and AxisSlice("attn.out_proj.weight", 1, 0, 8) in v.axes
    assert _group_of(spec, "mid.weight", 0).permutable
    assert spec.coverage().fraction == 1.0
    assert max(check_invariance(model, spec, x).values()) < INVARIANCE_TOL


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).tolist()  # leaves torch: nothing to record


def test_untraceable_model_warns_and_permutes_nothing():
    with pytest.warns(UserWarning, match="cannot trace"):
        spec = derive(Untraceable(), torch.randn(2, 4))
    assert spec.groups == () and spec.permutable == []
    cov = spec.coverage()  # nothing aligned is 0%, not a vacuous 100%
    assert cov.fraction == 0.0 and cov.frozen[0][0] == "the whole model" and "cannot trace" in cov.frozen[0][1]


class ScaledNet(nn.Module):
    """A learned per-channel scale used through broadcasting, and a reshape that splits channels into two halves
    that are averaged: the halves may be swapped, and the units inside them moved together."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x)) * self.scale
        h = torch.relu(self.conv2(h))
        n, c, hh, ww = h.shape
        h = h.view(n, 2, c // 2, hh, ww).mean(1)  # the mean over the halves is symmetric
        return self.fc(h.mean((2, 3)))


def test_broadcast_parameter_is_permuted_and_channel_split_is_structured():
    model, x = ScaledNet(), torch.randn(2, 3, 8, 8)
    spec = derive(model, x)
    g = _group_of(spec, "conv.weight", 0)
    assert g.permutable and AxisSlice("scale", 0, 0, 6) in g.axes
    g2 = _group_of(spec, "conv2.weight", 0)
    assert g2.permutable and [f.units for f in g2.factors] == [2, 2]
    assert max(check_invariance(model, spec, x).values()) < INVARIANCE_TOL


class ChannelShuffle(nn.Module):
    """A channel shuffle (ShuffleNet) interleaves two blocks of channels into a Linear: structured, not frozen."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        n, c, hh, ww = h.shape
        h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        return self.fc(h.mean((2, 3)))


def test_channel_shuffle_passes_the_self_test():
    model, x = ChannelShuffle(), torch.randn(2, 3, 8, 8)
    spec = derive(model, x)
    assert max(check_invariance(model, spec, x).values()) < INVARIANCE_TOL
    assert _group_of(spec, "conv.weight", 0).permutable


def test_self_test_catches_a_wrong_group(zoo_specs):
    model, x, spec = zoo_specs["cnn"]
    gi = spec.permutable[1]
    g = spec.groups[gi]
    broken = PermutationSpec(
        groups=tuple(
            type(g)(size=g.size, axes=tuple(a for a in g.axes if "running_var" not in a.tensor), sites=g.sites)
            if i == gi else h
            for i, h in enumerate(spec.groups)
        )
    )
    assert check_invariance(model, broken, x, groups=[gi])[gi] > 1e-3


def test_apply_permutation_roundtrip_and_bad_size(zoo_specs):
    model, _, spec = zoo_specs["resnet20"]
    sd = model.state_dict()
    perms = random_perms(spec, torch.Generator().manual_seed(1))
    permuted = apply_permutation(sd, spec, perms)
    assert not torch.equal(permuted["conv1.weight"], sd["conv1.weight"])
    back = apply_permutation(permuted, spec, {i: torch.argsort(p) for i, p in perms.items()})
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert torch.equal(model.state_dict()["conv1.weight"], sd["conv1.weight"])  # input not modified
    with pytest.raises(ValueError, match="group 0"):
        apply_permutation(sd, spec, {0: torch.arange(3)})


def test_derive_does_not_touch_the_model():
    model, x = _zoo("cnn")
    model.train()
    before = copy.deepcopy(model.state_dict())
    derive(model, x)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class NormMLP(nn.Module):
    """Linear layers with BatchNorm1d, LayerNorm, Dropout and a Conv1d stem over a sequence, pooled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm1d(6)
        self.fc1 = nn.Linear(6 * 5, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 12)
        self.ln = nn.LayerNorm(12)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = nn.functional.silu(self.bn0(self.conv(x))).flatten(1)
        h = torch.relu(self.bn1(self.fc1(h)))
        return self.out(self.drop(torch.tanh(self.ln(self.fc2(h)))))


def test_batchnorm1d_layernorm_conv1d_flatten():
    model, x = NormMLP(), torch.randn(4, 2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = derive(model, x)
    assert len(spec.permutable) == 3
    assert AxisSlice("fc1.weight", 1, 0, 6, 5) in _group_of(spec, "conv.weight", 0).axes
    assert AxisSlice("bn1.running_var", 0, 0, 16) in _group_of(spec, "fc1.weight", 0).axes
    assert AxisSlice("ln.weight", 0, 0, 12) in _group_of(spec, "fc2.weight", 0).axes
    assert max(check_invariance(model, spec, x).values()) < INVARIANCE_TOL
