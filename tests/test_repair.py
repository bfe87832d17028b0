"""dimat.merge.repair's BatchNorm repair ``mix`` (``merge.bn_repair``): the participants' mixture statistics with a
locally measured variance-collapse correction, against hand computations; and its wiring (operators, Node,
config, ``dimat run``)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from dimat import merge
from dimat.cli import main
from dimat.config import UserError, resolve
from dimat.merge import repair
from dimat.models import CNN
from dimat.node import Node

OPERATORS = [merge.activation_match, merge.weight_match, merge.average]


def _state(mean, var):
    return {"bn.running_mean": torch.tensor(mean), "bn.running_var": torch.tensor(var)}


def test_mixture_stats_of_two_layers_by_hand():
    a, b = _state([1.0, 2.0], [1.0, 1.0]), _state([3.0, 6.0], [4.0, 0.0])
    mean, var = repair.mixture_stats([a, b], [0.25, 0.75], ["bn"])["bn"]
    # mean = 0.25 m_a + 0.75 m_b; var = sum w (v + m^2) - mean^2: the spread of the means counts
    assert torch.allclose(mean, torch.tensor([2.5, 5.0], dtype=torch.float64))
    assert torch.allclose(var, torch.tensor([0.25 * 2 + 0.75 * 13 - 6.25, 0.25 * 5 + 0.75 * 36 - 25.0],
                                            dtype=torch.float64))
    # a participant with weight 0 contributes nothing
    mean0, var0 = repair.mixture_stats([a, b], [1.0, 0.0], ["bn"])["bn"]
    assert torch.equal(mean0, a["bn.running_mean"].double()) and torch.equal(var0, a["bn.running_var"].double())


class LinBN(nn.Module):
    """x (1 feature) -> Linear(1, 2, no bias) -> BatchNorm1d(2): the pre-BN variance is w^2 Var(x) exactly."""

    def __init__(self, w, mean, var, momentum=0.1):
        super().__init__()
        self.fc = nn.Linear(1, 2, bias=False)
        self.bn = nn.BatchNorm1d(2, momentum=momentum)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(w).view(2, 1))
            self.bn.running_mean.copy_(torch.tensor(mean))
            self.bn.running_var.copy_(torch.tensor(var))
            self.bn.num_batches_tracked.fill_(7)

    def forward(self, x):
        return self.bn(self.fc(x))


def _skewed_batches(shift, scale, n=3):
    g = torch.Generator().manual_seed(0)
    return [shift + scale * torch.randn(40, 1, generator=g) for _ in range(n)]


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (5.0, 0.1)])
def test_collapse_correction_on_a_tiny_model_by_hand(shift, scale):
    a = LinBN([1.0, 2.0], [0.0, 1.0], [2.0, 3.0])
    b = LinBN([3.0, 1.0], [2.0, 1.0], [2.0, 5.0])
    # merged weight (2, 1.5): pre-BN variance 4 s^2 and 2.25 s^2; endpoints' weighted mean 0.5 (1 + 9) s^2 and
    # 0.5 (4 + 1) s^2, so the collapse ratio is (0.8, 0.9) whatever the local data's mean and spread s are
    ratio = torch.tensor([0.8, 0.9], dtype=torch.float64)
    mix_mean = torch.tensor([1.0, 1.0], dtype=torch.float64)
    mix_var = torch.tensor([0.5 * 2 + 0.5 * 6 - 1.0, 0.5 * 4 + 0.5 * 6 - 1.0], dtype=torch.float64)
    merged = merge.average([a, b], [0.5, 0.5], batches=_skewed_batches(shift, scale), reset_bn=True,
                           bn_repair="mix")
    assert torch.allclose(merged.bn.running_mean.double(), mix_mean, atol=1e-6)
    assert torch.allclose(merged.bn.running_var.double(), mix_var * ratio, rtol=1e-5)
    assert int(merged.bn.num_batches_tracked) == 7  # the agent's own counter
    # the plain reset describes the local data instead: its mean follows the shift
    local = merge.average([a, b], [0.5, 0.5], batches=_skewed_batches(shift, scale), reset_bn=True)
    assert torch.allclose(local.bn.running_mean, torch.tensor([2.0, 1.5]) * shift, atol=0.1 + 0.5 * scale)


def test_ratio_is_one_for_dead_channels():
    t = repair.BNTarget(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                        torch.tensor([4.0, 0.0], dtype=torch.float64))
    assert torch.allclose(t.ratio(torch.tensor([1.0, 3.0])), torch.tensor([0.25, 1.0], dtype=torch.float64))


def _cnn(seed, warm_shift):
    torch.manual_seed(seed)
    m = CNN(10, width=0.25, in_channels=1, image_size=8)
    m.train()
    with torch.no_grad():  # running statistics of "its own data"
        for _ in range(4):
            m(warm_shift + torch.randn(32, 1, 8, 8))
    return m.eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 1, 8, 8, generator=g) for _ in range(2)]


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("op", OPERATORS, ids=lambda f: f.__name__)
def test_identical_pair_comes_out_unchanged(op):
    a = _cnn(0, 1.0)
    merged = op([a, copy.deepcopy(a)], [0.5, 0.5], batches=_batches(), reset_bn=True, bn_repair="mix")
    for k, v in a.state_dict().items():
        assert torch.allclose(merged.state_dict()[k].double(), v.double(), atol=1e-5), k
    # the local reset would move them: the mix keeps what the participants brought
    local = op([a, copy.deepcopy(a)], [0.5, 0.5], batches=_batches(), reset_bn=True)
    assert not torch.allclose(local.features[1].running_mean, a.features[1].running_mean, atol=1e-2)


@pytest.mark.parametrize("op", [merge.activation_match, merge.weight_match], ids=lambda f: f.__name__)
def test_running_statistics_are_permuted_with_the_units(op):
    """A permuted copy is the same function: aligned back, its BatchNorm buffers must land on the right units."""
    a = _cnn(0, 1.0)
    x = torch.randn(4, 1, 8, 8)
    spec, _ = merge.spec_for(a, x)
    b = copy.deepcopy(a)
    b.load_state_dict(merge.apply_permutation(a.state_dict(), spec, merge.random_perms(spec, torch.Generator().manual_seed(3))))
    assert not torch.equal(b.features[1].running_mean, a.features[1].running_mean)
    merged = op([a, b], [0.5, 0.5], batches=_batches(), reset_bn=True, bn_repair="mix")
    for k, v in a.state_dict().items():
        assert torch.allclose(merged.state_dict()[k].double(), v.double(), atol=1e-4), k


@pytest.mark.parametrize("op", OPERATORS, ids=lambda f: f.__name__)
def test_mix_on_different_models_is_finite_and_leaves_inputs_alone(op):
    a, b = _cnn(0, 1.0), _cnn(1, -1.0)
    a.train()  # a model in train mode stays in train mode, its buffers untouched
    a.features[4].momentum = None  # cumulative-average BatchNorm
    before = [_bn_buffers(m) for m in (a, b)]
    merged = op([a, b], [0.3, 0.7], batches=_batches(), reset_bn=True, bn_repair="mix")
    for m, buf in zip((a, b), before):
        for k, v in _bn_buffers(m).items():
            assert torch.equal(v, buf[k]), k
    assert a.training and all(mod.training for mod in a.modules())
    assert merged.training and merged.features[4].momentum is None and merged.features[1].momentum == 0.1
    for k, v in merged.state_dict().items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    # the means are the participants' mixture (the first BatchNorm reads a convolution of the raw input, whose
    # alignment is by units; the mixture of the aligned means has the mixture's sum over units)
    mix_sum = 0.3 * a.features[1].running_mean.sum() + 0.7 * b.features[1].running_mean.sum()
    assert math.isclose(float(merged.features[1].running_mean.sum()), float(mix_sum), rel_tol=1e-4, abs_tol=1e-5)
    assert int(merged.features[1].num_batches_tracked) == int(a.features[1].num_batches_tracked)


def test_models_without_batchnorm_are_unaffected():
    torch.manual_seed(0)
    mk = lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))  # noqa: E731
    a, b = mk(), mk()
    batches = [torch.randn(16, 6) for _ in range(2)]
    for op in OPERATORS:
        m1 = op([a, b], [0.5, 0.5], batches=batches, reset_bn=True, bn_repair="mix")
        m0 = op([a, b], [0.5, 0.5], batches=batches, reset_bn=True)
        for k, v in m0.state_dict().items():
            assert torch.equal(m1.state_dict()[k], v), (op.__name__, k)


@pytest.mark.parametrize("op", OPERATORS, ids=lambda f: f.__name__)
def test_bad_bn_repair_is_refused(op):
    a = _cnn(0, 0.0)
    with pytest.raises(ValueError, match="bn_repair must be one of local, mix, got 'global'"):
        op([a, copy.deepcopy(a)], [0.5, 0.5], batches=_batches(), bn_repair="global")
    with pytest.raises(ValueError, match="bn_batches must be an integer >= 1"):
        op([a, copy.deepcopy(a)], [0.5, 0.5], batches=_batches(), bn_batches=0)


def test_node_refuses_a_bad_bn_repair():
    with pytest.raises(ValueError, match="bn_repair must be one of local, mix"):
        Node(nn.Linear(2, 2), [[0.5, 0.5], [0.5, 0.5]], 0, None, None, method="none", bn_repair="both")
    with pytest.raises(ValueError, match="set bn_refresh=True"):
        Node(nn.Linear(2, 2), [[0.5, 0.5], [0.5, 0.5]], 0, None, None, method="none", bn_repair="mix")
    with pytest.raises(ValueError, match="give batches"):
        Node(nn.Linear(2, 2), [[0.5, 0.5], [0.5, 0.5]], 0, _Capture(), None, method="wa", bn_refresh=True)


def test_refresh_is_the_cumulative_average_of_batch_statistics():
    m = LinBN([1.0, -2.0], [9.0, 9.0], [9.0, 9.0], momentum=0.1)
    m.train()
    batches = _skewed_batches(3.0, 2.0)
    assert repair.refresh_bn_stats(m, batches) == 3
    pre = [m.fc(x).detach() for x in batches]
    # a cumulative average (momentum None) of each batch's mean and unbiased variance
    assert torch.allclose(m.bn.running_mean, torch.stack([p.mean(0) for p in pre]).mean(0), atol=1e-5)
    assert torch.allclose(m.bn.running_var, torch.stack([p.var(0) for p in pre]).mean(0), rtol=1e-5)
    assert m.training and m.bn.momentum == 0.1 and int(m.bn.num_batches_tracked) == 3
    assert repair.refresh_bn_stats(nn.Linear(1, 1), batches) == 0  # no BatchNorm: nothing to do
    with pytest.raises(ValueError, match="no batches"):
        repair.refresh_bn_stats(m, [])


class _Capture:
    """A transport that keeps what is posted and delivers nothing."""

    bytes_sent = bytes_received = 0

    def __init__(self):
        self.posted = {}

    def post(self, r, state):
        self.posted[r] = {k: v.clone() for k, v in state.items()}

    def collect(self, r):
        return {}


def test_node_posts_refreshed_statistics():
    batches = _skewed_batches(3.0, 2.0)
    for refresh in (False, True):
        m = LinBN([1.0, -2.0], [9.0, 9.0], [9.0, 9.0])
        t = _Capture()
        Node(m, [[0.5, 0.5], [0.5, 0.5]], 0, t, batches, method="wa", bn_refresh=refresh,
             bn_repair="mix" if refresh else "local", stat_batches=2).merge_round(0)
        sent = t.posted[0]["bn.running_mean"]
        if refresh:  # two batches of the skewed local data through the current weights: mean (3, -6)
            pre = torch.cat([m.fc(x) for x in batches[:2]]).detach()
            assert torch.allclose(sent, pre.mean(0), atol=1e-5) and torch.equal(sent, m.bn.running_mean)
        else:
            assert torch.equal(sent, torch.tensor([9.0, 9.0]))


@pytest.mark.parametrize("sets,needles", [
    (["merge.bn_repair=global"], ["key 'merge.bn_repair'", "local, mix", "'global'"]),
    (["merge.bn_repair=mix", "merge.bn_refresh=true", "merge.reset_bn=false"],
     ["key 'merge.bn_repair'", "merge.reset_bn is false"]),
    (["merge.bn_repair=mix"], ["key 'merge.bn_repair'", "set merge.bn_refresh true"]),
    (["merge.bn_refresh=maybe"], ["merge.bn_refresh"]),
])
def test_config_validation_names_the_field(sets, needles):
    with pytest.raises(UserError) as e:
        resolve({}, sets, where="run.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(("run.yaml: ", "--set: "))
    for needle in needles:
        assert needle in msg, msg
    assert resolve({}, ["merge.bn_repair=mix", "merge.bn_refresh=true"]).merge.bn_repair == "mix"
    assert resolve({}).merge.bn_repair == "local" and resolve({}).merge.bn_refresh is False


RUN = """\
agents: 3
threads: 1
rounds: 2
topology: ring
data: {dataset: digits, partition: "dirichlet:0.3"}
model: {name: cnn, width: 0.25}
train: {epochs: 1, batch_size: 50}
merge: {stat_batches: 2, bn_repair: mix, bn_refresh: true}
"""


@pytest.mark.parametrize("sets", [["merge.method=dimat"], ["merge.method=wa", "merge.bn_batches=2"]],
                         ids=["dimat", "wa-bn_batches"])
def test_dimat_run_on_digits_with_mix(tmp_path, capsys, sets):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(RUN)
    out = tmp_path / "run"
    args = ["run", str(cfg), "--out", str(out), "-q"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["per_agent_acc"]) == 3
    assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in summary["per_agent_acc"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    merges = [r for r in rows if r.get("phase") == "merge" and r.get("agent", 0) >= 0]
    assert merges and all(math.isfinite(r["test_acc"]) and math.isfinite(r["test_loss"]) for r in merges)


# ------------------------------------------------------------------------ restore_norms (merge.restore_norms)
class _Branches(nn.Module):
    """conv_a feeds a BatchNorm only; conv_b feeds a BatchNorm and a residual sum; conv_c no BatchNorm; lin's
    output is returned; conv_d is read by two BatchNorms (both scale-free)."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_c = nn.Conv2d(4, 4, 1)
        self.conv_d, self.bn_d1, self.bn_d2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.lin = nn.Linear(4, 5)

    def forward(self, x):
        a = torch.relu(self.bn_a(self.conv_a(x)))
        b = self.conv_b(a)
        h = torch.relu(self.bn_b(b)) + b  # conv_b's output is also read by the sum
        h = self.conv_c(h)
        d = self.conv_d(h)
        h = self.bn_d1(d) + self.bn_d2(d)
        return self.lin(h.mean((2, 3)))


def test_normalised_layers_are_those_only_a_batchnorm_reads():
    model = _Branches()
    names = ["conv_a", "conv_b", "conv_c", "conv_d", "lin"]
    assert repair.normalised_layers(model, names, torch.randn(2, 3, 8, 8)) == ["conv_a", "conv_d"]
    cnn = CNN(10, width=0.25)
    layers = [n for n, m in cnn.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert repair.normalised_layers(cnn, layers, torch.randn(2, 3, 32, 32)) == [
        "features.0", "features.3", "features.7", "features.10"]


def test_restore_unit_norms_by_hand():
    lin = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
        lin[0].bias.copy_(torch.tensor([2.0, 4.0]))
    a = {"0.weight": torch.tensor([[3.0, 4.0], [0.0, 1.0]])}  # row norms 5, 1
    b = {"0.weight": torch.tensor([[1.0, 0.0], [0.0, 3.0]])}  # row norms 1, 3
    factors = repair.restore_unit_norms(lin, ["0"], [a, b], [0.25, 0.75])
    # targets: 0.25 * 5 + 0.75 * 1 = 2 and 0.25 * 1 + 0.75 * 3 = 2.5; current norms 1 and 0.5: factors 2 and 5
    assert torch.allclose(lin[0].weight, torch.tensor([[2.0, 0.0], [0.0, 2.5]]))
    assert torch.allclose(lin[0].bias, torch.tensor([4.0, 20.0]))
    assert factors == {"0": pytest.approx(3.5)}
    # a participant with weight 0 does not count; a zero row stays zero
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    repair.restore_unit_norms(lin, ["0"], [a, b], [1.0, 0.0])
    assert torch.equal(lin[0].weight, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


def _two_cnns():
    torch.manual_seed(0)
    a = CNN(10, width=0.25)
    torch.manual_seed(1)
    b = CNN(10, width=0.25)
    x = torch.randn(48, 3, 32, 32)
    return a, b, x, [x[:24], x[24:]]


@pytest.mark.parametrize("op", OPERATORS, ids=lambda f: f.__name__)
def test_restore_norms_keeps_the_function_and_restores_the_norms(op):
    a, b, x, batches = _two_cnns()
    kw = {"repair": True} if op is merge.average else {}
    plain = op([a, b], [0.5, 0.5], batches, reset_bn=True, **kw).eval()
    restored = op([a, b], [0.5, 0.5], batches, reset_bn=True, restore_norms=True, **kw).eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), restored(x), atol=1e-4)
    sa, sb, sp, sr = (m.state_dict() for m in (a, b, plain, restored))
    for name in ["features.0", "features.3", "features.7", "features.10"]:
        key = name + ".weight"
        # unit i gets 0.5 |a_i| + 0.5 |b_p(i)| for the permutation p that aligned b: what is left over after
        # a's half is b's half in some order
        rest = 2 * sr[key].flatten(1).norm(dim=1) - sa[key].flatten(1).norm(dim=1)
        assert torch.allclose(rest.sort().values, sb[key].flatten(1).norm(dim=1).sort().values, atol=1e-5)
        if op is not merge.average:  # aligned or not, two different inits average to a shorter unit
            assert sp[key].norm() < 0.9 * sr[key].norm()
    # the layers no BatchNorm reads are left to the combine step and REPAIR
    for key in ["classifier.3.weight"]:
        assert torch.equal(sp[key], sr[key])


@pytest.mark.parametrize("op", OPERATORS, ids=lambda f: f.__name__)
def test_restore_norms_needs_batches_and_a_bool(op):
    a, b, _, batches = _two_cnns()
    with pytest.raises(ValueError, match="restore_norms needs batches"):
        op([a, b], [0.5, 0.5], None, restore_norms=True, example_input=batches[0]) if op is merge.weight_match \
            else op([a, b], [0.5, 0.5], None, restore_norms=True)
    with pytest.raises(ValueError, match="restore_norms must be true or false"):
        op([a, b], [0.5, 0.5], batches, restore_norms="yes")


def test_restore_norms_leaves_a_model_without_batchnorm_alone():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batches = [torch.randn(16, 4)]
    plain = merge.average([a, b], [0.5, 0.5], batches, reset_bn=True)
    with pytest.warns(UserWarning, match="restore_norms: no conv/linear layer of Sequential"):
        restored = merge.average([a, b], [0.5, 0.5], batches, reset_bn=True, restore_norms=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, restored.state_dict()[k]), k


def test_node_refuses_restore_norms_without_a_bn_reset():
    mix = [[0.5, 0.5], [0.5, 0.5]]
    x = [torch.randn(4, 3, 32, 32)]
    with pytest.raises(ValueError, match="restore_norms rescales weights"):
        Node(CNN(10, width=0.25), mix, 0, _Capture(), x, reset_bn=False, restore_norms=True)
    with pytest.raises(ValueError, match="restore_norms rescales weights"):
        Node(CNN(10, width=0.25), mix, 0, _Capture(), None, restore_norms=True)
    with pytest.raises(ValueError, match="restore_norms must be True or False"):
        Node(CNN(10, width=0.25), mix, 0, _Capture(), x, restore_norms=1)
    assert Node(CNN(10, width=0.25), mix, 0, _Capture(), x, restore_norms=True).restore_norms is True


@pytest.mark.parametrize("sets,needles", [
    (["merge.restore_norms=true", "merge.method=cdsgd"], ["key 'merge.restore_norms'", "dimat, wa or wm"]),
    (["merge.restore_norms=true", "merge.reset_bn=false"], ["key 'merge.restore_norms'", "merge.reset_bn true"]),
    (["merge.restore_norms=1"], ["merge.restore_norms", "true/false"]),
])
def test_restore_norms_config_validation_names_the_field(sets, needles):
    with pytest.raises(UserError) as e:
        resolve({}, sets, where="run.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_dimat_run_on_digits_with_restore_norms(tmp_path, capsys, monkeypatch):
    calls = []
    real = merge.operators.restore_unit_norms
    monkeypatch.setattr(merge.operators, "restore_unit_norms", lambda *a: calls.append(a[1]) or real(*a))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(RUN.replace("merge: {stat_batches: 2, bn_repair: mix, bn_refresh: true}",
                               "merge: {stat_batches: 2, restore_norms: true}"))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "-q"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    merges = [r for r in rows if r.get("phase") == "merge" and r.get("agent", 0) >= 0]
    assert len(merges) == 6 and all(math.isfinite(r["test_acc"]) for r in merges)
    # every merge of every agent rescaled the cnn's four BatchNorm-fed convolutions
    assert len(calls) == 6 and all(c == ["features.0", "features.3", "features.7", "features.10"] for c in calls)
