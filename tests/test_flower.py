"""Tests for dimat.flower: the server-side aggregation (no flwr needed) and the FedAvg subclass (flwr needed)."""

from __future__ import annotations

import copy
import importlib
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dimat import flower, merge
from dimat.flower import ModelAggregator, ndarrays_to_state, state_to_ndarrays



# --------------------------------------------------------------------------------------------------- fixtures
def make_model(seed: int) -> nn.Module:
    """A small MLP with BatchNorm whose running statistics are not the defaults (so buffers are checked too)."""
    torch.manual_seed(seed)
    # Every hidden Linear is followed by BatchNorm, so the merge's BN reset is the whole repair (no REPAIR rescaling).
    m = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10), nn.BatchNorm1d(10), nn.ReLU(),
                      nn.Linear(10, 3))
    with torch.no_grad():
        m.train()
        for _ in range(3):
            m(torch.randn(64, 6) * 2 + 0.5)
    return m.eval()


def permuted(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with both hidden layers' units shuffled: the same function, different weights."""
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    p1, p2 = torch.randperm(16, generator=g), torch.randperm(10, generator=g)
    with torch.no_grad():
        m[0].weight.copy_(m[0].weight[p1])
        m[0].bias.copy_(m[0].bias[p1])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(m[1], name).copy_(getattr(m[1], name)[p1])
        m[3].weight.copy_(m[3].weight[p2][:, p1])
        m[3].bias.copy_(m[3].bias[p2])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(m[4], name).copy_(getattr(m[4], name)[p2])
        m[6].weight.copy_(m[6].weight[:, p2])
    return m


CALIBRATION = [torch.randn(64, 6, generator=torch.Generator().manual_seed(i)) * 2 + 0.5 for i in range(3)]


def as_model(arrays) -> nn.Module:
    m = make_model(0)
    m.load_state_dict(ndarrays_to_state(m, arrays))
    return m


def max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> None:
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def results_of(models, counts):
    return [(state_to_ndarrays(m), n) for m, n in zip(models, counts)]


# ------------------------------------------------------------------------------------------------ wire format
def test_wire_format_round_trip_keeps_buffers_and_dtypes():
    m = make_model(1)
    arrays = state_to_ndarrays(m)
    assert len(arrays) == len(m.state_dict())  # BN running stats and num_batches_tracked included
    state = ndarrays_to_state(make_model(2), arrays)
    for k, v in m.state_dict().items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def test_wire_format_casts_float64_arrays_to_the_template_dtype():
    m = make_model(1)
    arrays = [a.astype(np.float64) if a.dtype == np.float32 else a for a in state_to_ndarrays(m)]
    state = ndarrays_to_state(m, arrays)
    assert state["0.weight"].dtype == torch.float32


def test_wire_format_rejects_wrong_count_and_shape():
    m = make_model(1)
    arrays = state_to_ndarrays(m)
    with pytest.raises(ValueError, match="client 3 sent 15 arrays.*16 state_dict entries"):
        ndarrays_to_state(m, arrays[:-1], "client 3")
    arrays[0] = arrays[0][:, :5]
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(16, 5\).*expects \(16, 6\)"):
        ndarrays_to_state(m, arrays)


def test_wire_format_by_name_accepts_any_order_and_rejects_missing_or_unknown_names():
    m = make_model(1)
    named = dict(reversed(list(m.state_dict().items())))
    state = ndarrays_to_state(make_model(2), {k: v.numpy() for k, v in named.items()})
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items()) and list(state) == list(m.state_dict())
    del named["4.running_var"]
    with pytest.raises(ValueError, match="client has no array '4.running_var'"):
        ndarrays_to_state(m, named)
    with pytest.raises(ValueError, match="unknown array 'extra'"):
        ndarrays_to_state(m, {**m.state_dict(), "extra": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------ aggregation
@pytest.mark.parametrize("method", ["dimat", "wa"])
def test_identical_clients_give_that_client_back(method):
    m = make_model(3)
    agg = ModelAggregator(make_model(0), calibration=CALIBRATION, method=method, reset_bn=False)
    out = as_model(agg.aggregate(results_of([m, m, m], [10, 20, 30])))
    assert_same_weights(out, m, atol=1e-6)


def test_permuted_copies_give_the_model_back_with_activation_matching_but_not_with_fedavg():
    m = make_model(4)
    clients = [m, permuted(m, 1), permuted(m, 2)]
    x = torch.cat(CALIBRATION)
    with torch.no_grad():
        for c in clients[1:]:  # the test fixture really is a re-parameterisation
            torch.testing.assert_close(c(x), m(x), rtol=0, atol=1e-5)
    agg = ModelAggregator(make_model(0), CALIBRATION, reset_bn=False)
    dimat_out = as_model(agg.aggregate(results_of(clients, [5, 5, 5])))
    assert_same_weights(dimat_out, m, atol=1e-5)
    fedavg_out = as_model(ModelAggregator(make_model(0)).aggregate(results_of(clients, [5, 5, 5])))
    assert max_diff(fedavg_out, m) > 0.05
    with torch.no_grad():  # averaging unaligned units also changes the function
        assert float((fedavg_out(x) - m(x)).abs().max()) > 0.05


def test_permuted_copies_with_bn_reset_give_the_model_with_recomputed_statistics():
    m = make_model(4)
    out = as_model(ModelAggregator(make_model(0), CALIBRATION).aggregate(results_of([m, permuted(m, 1)], [3, 3])))
    expected = merge.reset_bn_stats(copy.deepcopy(m), CALIBRATION)
    assert_same_weights(out, expected, atol=1e-5)
    assert not torch.allclose(expected[1].running_mean, m[1].running_mean)  # the reset did change something


def test_reference_is_the_client_with_most_examples():
    m = make_model(5)
    clients = [permuted(m, 1), m, permuted(m, 2)]
    agg = ModelAggregator(make_model(0), CALIBRATION, reset_bn=False)
    out = as_model(agg.aggregate(results_of(clients, [2, 9, 4])))
    assert_same_weights(out, m, atol=1e-5)


def test_aggregation_is_the_merge_operator_on_the_reference_first_with_example_counts():
    def plain(seed):  # no BatchNorm: the operator's REPAIR rescaling runs too
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3))

    clients = [plain(20), plain(21), plain(22)]
    out = ModelAggregator(plain(0), CALIBRATION, stat_batches=2).aggregate(results_of(clients, [3, 7, 5]))
    expected = merge.activation_match([clients[1], clients[0], clients[2]], [7, 3, 5], CALIBRATION, stat_batches=2)
    for got, want in zip(out, state_to_ndarrays(expected)):
        np.testing.assert_array_equal(got, want)


def test_min_corr_is_the_operators_threshold_and_reports_the_units_kept():
    def plain(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3))

    clients = [plain(30), plain(31), plain(32)]  # unrelated inits: few units match
    agg = ModelAggregator(plain(0), CALIBRATION, min_corr=0.6)
    out = agg.aggregate(results_of(clients, [3, 7, 5]))
    report = {}
    expected = merge.activation_match([clients[1], clients[0], clients[2]], [7, 3, 5], CALIBRATION, min_corr=0.6,
                                      report=report)
    for got, want in zip(out, state_to_ndarrays(expected)):
        np.testing.assert_array_equal(got, want)
    assert agg.last_report["kept"] == [report[1]["kept"], report[2]["kept"]]
    assert all(0.0 <= k < 1.0 for k in agg.last_report["kept"])
    # above every correlation no other client's unit joins: the hidden layers are the reference's
    agg = ModelAggregator(plain(0), CALIBRATION, min_corr=1.5, reset_bn=False)
    alone = plain(0)
    alone.load_state_dict(ndarrays_to_state(alone, agg.aggregate(results_of(clients, [3, 7, 5]))))
    assert agg.last_report["kept"] == [0.0, 0.0]
    for i in (0, 2):
        torch.testing.assert_close(alone[i].weight, clients[1][i].weight, rtol=0, atol=1e-6)


def _plain(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3))


def test_head_label_counts_combines_the_output_layer_class_by_class():
    # wa (no alignment): every hidden layer is the weighted mean; output row c is sum_j w_j n_jc row_jc / sum ...
    clients = [_plain(40), _plain(41), _plain(42)]
    counts = [[5, 0, 1], [0, 4, 1], [0, 0, 0.5]]
    weights = [3, 7, 5]
    agg = ModelAggregator(_plain(0), CALIBRATION, method="wa", head="label_counts")
    out = _plain(0)
    out.load_state_dict(ndarrays_to_state(out, agg.aggregate(
        [(state_to_ndarrays(m), w, c) for m, w, c in zip(clients, weights, counts)])))
    assert agg.last_report["head"] == "label_counts"
    with torch.no_grad():
        for i in (0, 2):
            want = sum(w * m[i].weight for w, m in zip(weights, clients)) / sum(weights)
            torch.testing.assert_close(out[i].weight, want, rtol=0, atol=1e-6)
        for c in range(3):
            den = sum(w * n[c] for w, n in zip(weights, counts))
            for name in ("weight", "bias"):
                want = sum(w * n[c] * getattr(m[4], name)[c] for w, n, m in zip(weights, counts, clients)) / den
                torch.testing.assert_close(getattr(out[4], name)[c], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[4].weight[0], clients[0][4].weight[0], rtol=0, atol=1e-6)  # only client 0 has 0


def test_head_label_counts_with_activation_matching_is_the_operator_with_the_class_head():
    from dimat.merge import combine
    from dimat.merge.head import output_layer

    clients = [_plain(50), _plain(51), _plain(52)]
    counts = [[5.0, 0, 1], [0, 4, 1], [1, 1, 6]]
    agg = ModelAggregator(_plain(0), CALIBRATION, head="label_counts", stat_batches=2)
    got = agg.aggregate([(state_to_ndarrays(m), w, c) for m, w, c in zip(clients, [3, 7, 5], counts)])
    layer, _ = output_layer(_plain(0), CALIBRATION[0])
    order = [1, 0, 2]  # the reference (most examples) first
    hook = combine.make_hook(combine.CombineOptions(), 0, {n for n, _ in _plain(0).named_parameters()},
                             head=combine.ClassHead(layer.axes, [torch.tensor(counts[i], dtype=torch.float64)
                                                                 for i in order]))
    want = merge.activation_match([clients[i] for i in order], [7, 3, 5], CALIBRATION, stat_batches=2, combine=hook)
    plain_mean = ModelAggregator(_plain(0), CALIBRATION, stat_batches=2).aggregate(
        results_of(clients, [3, 7, 5]))
    for g, w in zip(got, state_to_ndarrays(want)):
        np.testing.assert_array_equal(g, w)
    assert not np.allclose(got[-2], plain_mean[-2])  # the output weight differs from the mean's


def test_head_label_counts_lifts_min_corr_for_clients_that_share_no_class_with_the_reference():
    clients = [_plain(60), _plain(61), _plain(62)]  # unrelated inits: min_corr leaves units out
    counts = [[5.0, 0, 0], [0, 4, 1], [2, 0, 3]]    # client 1 (the reference) shares no class with client 0
    results = [(state_to_ndarrays(m), w, c) for m, w, c in zip(clients, [3, 7, 5], counts)]
    agg = ModelAggregator(_plain(0), CALIBRATION, head="label_counts", min_corr=0.6)
    got = agg.aggregate(results)
    assert agg.last_report["min_corr_off"] == [0] and agg.last_report["kept"][0] == 1.0
    assert agg.last_report["kept"][1] < 1.0
    from dimat.merge import combine
    from dimat.merge.head import output_layer

    layer, _ = output_layer(_plain(0), CALIBRATION[0])
    order = [1, 0, 2]
    hook = combine.make_hook(combine.CombineOptions(), 0, {n for n, _ in _plain(0).named_parameters()},
                             head=combine.ClassHead(layer.axes, [torch.tensor(counts[i], dtype=torch.float64)
                                                                 for i in order]))
    want = merge.activation_match([clients[i] for i in order], [7, 3, 5], CALIBRATION, min_corr=[None, 0.6],
                                  combine=hook)
    for g, w in zip(got, state_to_ndarrays(want)):
        np.testing.assert_array_equal(g, w)
    everyone = ModelAggregator(_plain(0), CALIBRATION, head="label_counts", min_corr=0.6, min_corr_scope="all")
    everyone.aggregate(results)
    assert "min_corr_off" not in everyone.last_report and everyone.last_report["kept"][0] < 1.0
    with pytest.raises(ValueError, match="min_corr_scope must be one of"):
        ModelAggregator(_plain(0), CALIBRATION, min_corr_scope="none")


@pytest.mark.parametrize("bad", [None, [1.0, 2.0], [1.0, -1.0, 2.0], [0, 0, 0], [1.0, float("nan"), 1.0], "1,2,3",
                                 [[1, 2, 3]]])
def test_head_label_counts_without_valid_counts_averages_the_layer_loudly(bad, caplog):
    clients = [_plain(40), _plain(41)]
    agg = ModelAggregator(_plain(0), CALIBRATION, method="wa", head="label_counts")
    results = [(state_to_ndarrays(clients[0]), 3, [1.0, 2.0, 3.0]), (state_to_ndarrays(clients[1]), 5, bad)]
    if bad is None:
        results[1] = results[1][:2]
    with caplog.at_level("WARNING"):
        got = agg.aggregate(results)
    assert "client 1 sent no valid class counts" in caplog.text
    assert agg.last_report["head"] == "mean"
    mean = ModelAggregator(_plain(0), CALIBRATION, method="wa").aggregate(results_of(clients, [3, 5]))
    for g, w in zip(got, mean):
        np.testing.assert_array_equal(g, w)


def test_head_label_counts_needs_calibration_and_a_plain_output_layer():
    with pytest.raises(ValueError, match="head must be one of mean, label_counts"):
        ModelAggregator(_plain(0), CALIBRATION, head="counts")
    with pytest.raises(ValueError, match="finds the output layer by running the model on a calibration batch"):
        ModelAggregator(_plain(0), None, method="wa", head="label_counts")

    class Scaled(nn.Module):  # the logits are scaled after the last Linear: no row per class to combine
        def __init__(self):
            super().__init__()
            self.net = _plain(0)

        def forward(self, x):
            return self.net(x) * 2.0

    with pytest.raises(ValueError, match="needs an output layer to combine class by class"):
        ModelAggregator(Scaled(), CALIBRATION, head="label_counts")


def test_bn_repair_mix_takes_the_clients_running_statistics():
    m = make_model(12)
    clients = [m, permuted(m, 1)]
    out = as_model(ModelAggregator(make_model(0), CALIBRATION, bn_repair="mix").aggregate(results_of(clients, [3, 3])))
    # two copies of one model: the mixture is that model's statistics and the merge collapses nothing
    torch.testing.assert_close(out[1].running_mean, m[1].running_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1].running_var, m[1].running_var, rtol=1e-4, atol=1e-5)
    local = as_model(ModelAggregator(make_model(0), CALIBRATION).aggregate(results_of(clients, [3, 3])))
    assert not torch.allclose(local[1].running_mean, m[1].running_mean, atol=1e-3)  # a reset on the calibration


def test_without_calibration_falls_back_to_weighted_average_by_example_counts():
    a, b = make_model(6), make_model(7)
    agg = ModelAggregator(make_model(0))
    assert agg.method == "wa"
    out = agg.aggregate(results_of([a, b], [30, 10]))
    for got, (k, va) in zip(out, a.state_dict().items()):
        vb = b.state_dict()[k]
        if va.is_floating_point():
            np.testing.assert_allclose(got, (0.75 * va.double() + 0.25 * vb.double()).numpy(), rtol=0, atol=1e-6)
        else:  # integer buffers come from the reference client (most examples)
            assert got == va.numpy()


def test_default_method_is_activation_matching_when_calibration_is_given():
    assert ModelAggregator(make_model(0), CALIBRATION).method == "dimat"
    assert ModelAggregator(make_model(0), CALIBRATION, method="wa").method == "wa"


def test_model_factory_and_single_tensor_calibration_are_accepted():
    agg = ModelAggregator(lambda: make_model(0), calibration=torch.cat(CALIBRATION), method="wa")
    assert isinstance(agg.template, nn.Module) and len(agg.calibration) == 1
    m = make_model(8)
    out = as_model(agg.aggregate(results_of([m, m], [1, 1])))
    expected = merge.reset_bn_stats(copy.deepcopy(m), [torch.cat(CALIBRATION)])
    assert_same_weights(out, expected, atol=1e-6)


def test_aggregation_does_not_modify_the_client_arrays():
    m = make_model(9)
    results = results_of([m, permuted(m, 3)], [1, 1])
    before = [[a.copy() for a in arrays] for arrays, _ in results]
    ModelAggregator(make_model(0), CALIBRATION).aggregate(results)
    for (arrays, _), old in zip(results, before):
        assert all(np.array_equal(a, b) for a, b in zip(arrays, old))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model=42), "nn.Module or a factory"),
        (dict(model=lambda: 42), "factory returned a int"),
        (dict(calibration=iter(CALIBRATION)), "one-shot iterator"),
        (dict(calibration=5), "iterable of batches"),
        (dict(method="nope"), "unknown merge method 'nope'"),
        (dict(stat_batches=0), "stat_batches must be a positive int"),
        (dict(min_corr=0.5, method="wa"), "min_corr acts on activation matching"),
        (dict(min_corr=float("nan"), calibration=CALIBRATION), "min_corr must be a finite number"),
        (dict(min_corr="0.5", calibration=CALIBRATION), "min_corr must be a finite number"),
        (dict(bn_repair="global"), "bn_repair must be one of local, mix"),
        (dict(bn_repair="mix", calibration=None, method="wa"), "bn_repair 'mix' measures the merge on calibration"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    kwargs = {"model": make_model(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        ModelAggregator(**kwargs)


def test_activation_matching_without_calibration_is_an_error():
    with pytest.raises(ValueError, match="needs calibration batches"):
        ModelAggregator(make_model(0), method="dimat")


@pytest.mark.parametrize(
    "counts, match",
    [
        ([1, -1], "client 1 reported num_examples=-1"),
        ([0, 0], "num_examples=0"),
        ([1, float("nan")], "num_examples=nan"),
        ([1, "3"], "num_examples='3'"),
        ([True, 1], "client 0 reported num_examples=True"),
    ],
)
def test_bad_example_counts(counts, match):
    m = make_model(0)
    with pytest.raises(ValueError, match=match):
        ModelAggregator(make_model(0)).aggregate(results_of([m, m], counts))


def test_no_results_and_wrong_architecture_are_errors():
    agg = ModelAggregator(make_model(0))
    with pytest.raises(ValueError, match="no client results"):
        agg.aggregate([])
    other = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="client 1 sent 2 arrays"):
        agg.aggregate([(state_to_ndarrays(make_model(1)), 1), (state_to_ndarrays(other), 1)])


def test_missing_flwr_gives_an_install_hint(monkeypatch):
    # None in sys.modules makes `import flwr...` raise ImportError; submodules another test imported already
    # would otherwise be found without their parent being looked at
    for name in [m for m in list(sys.modules) if m == "flwr" or m.startswith("flwr.")] + ["flwr"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(flower, "_CLASSES", {})
    with pytest.raises(ImportError, match=r"pip install 'dimat\[flower\]'"):
        flower.DimatFedAvg
    with pytest.raises(ImportError, match=r"dimat\[flower\]"):
        flower.MessageDimatFedAvg
    with pytest.raises(AttributeError):
        flower.NoSuchThing


# ------------------------------------------------------------------------------------ the flwr FedAvg subclass
@pytest.fixture
def fl():
    return pytest.importorskip("flwr", reason="flwr not installed (see dimat.flower.FLOWER_HINT)")


def fit_results(models, counts, cids=None, class_counts=None):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.client_proxy import ClientProxy

    class Proxy(ClientProxy):  # only .cid is used by aggregate_fit
        get_properties = get_parameters = fit = evaluate = reconnect = None

    cids = cids or [str(i) for i in range(len(models))]
    extra = [{} if c is None else {"class-counts": c} for c in (class_counts or [None] * len(models))]
    return [
        (Proxy(cid), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(state_to_ndarrays(m)), n,
                            {"loss": float(n), **x}))
        for cid, m, n, x in zip(cids, models, counts, extra)
    ]


def parameters_model(parameters) -> nn.Module:
    from flwr.common import parameters_to_ndarrays

    return as_model(parameters_to_ndarrays(parameters))


def test_strategy_is_a_fedavg(fl):
    from flwr.server.strategy import FedAvg

    s = flower.DimatFedAvg(model=make_model(0), min_fit_clients=3, fraction_evaluate=0.0)
    assert isinstance(s, FedAvg) and s.min_fit_clients == 3 and s.aggregator.method == "wa"


def test_strategy_aggregate_fit_identical_and_permuted_clients(fl):
    from flwr.server.strategy import FedAvg

    m = make_model(10)
    s = flower.DimatFedAvg(model=make_model(0), calibration=CALIBRATION, reset_bn=False)
    params, _ = s.aggregate_fit(1, fit_results([m, m, m], [4, 4, 4]), [])
    assert_same_weights(parameters_model(params), m, atol=1e-6)

    clients = [m, permuted(m, 1), permuted(m, 2)]
    results = fit_results(clients, [4, 4, 4])
    params, _ = s.aggregate_fit(1, results, [])
    assert_same_weights(parameters_model(params), m, atol=1e-5)
    fedavg_params, _ = FedAvg().aggregate_fit(1, fit_results(clients, [4, 4, 4]), [])
    assert max_diff(parameters_model(fedavg_params), m) > 0.05


def test_strategy_result_does_not_depend_on_arrival_order(fl):
    m = make_model(11)
    clients = [m, permuted(m, 1), permuted(m, 2)]
    s = flower.DimatFedAvg(model=make_model(0), calibration=CALIBRATION)
    results = fit_results(clients, [4, 4, 4])
    first, _ = s.aggregate_fit(2, results, [])
    random.Random(0).shuffle(results)
    second, _ = s.aggregate_fit(2, results, [])
    assert first.tensors == second.tensors


def test_strategy_failures_and_metrics_follow_fedavg(fl):
    m = make_model(12)
    s = flower.DimatFedAvg(model=make_model(0), accept_failures=False)
    assert s.aggregate_fit(1, fit_results([m, m], [1, 1]), [RuntimeError("client lost")]) == (None, {})
    assert s.aggregate_fit(1, [], []) == (None, {})
    s = flower.DimatFedAvg(
        model=make_model(0), fit_metrics_aggregation_fn=lambda ms: {"loss": sum(n * d["loss"] for n, d in ms)}
    )
    _, metrics = s.aggregate_fit(1, fit_results([m, m], [1, 3]), [])
    assert metrics == {"loss": 10.0}


def test_strategy_without_calibration_is_fedavg(fl):
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    clients, counts = [make_model(13), make_model(14), make_model(15)], [10, 30, 20]
    ours, _ = flower.DimatFedAvg(model=make_model(0)).aggregate_fit(1, fit_results(clients, counts), [])
    theirs, _ = FedAvg().aggregate_fit(1, fit_results(clients, counts), [])
    for name, a, b in zip(make_model(0).state_dict(), parameters_to_ndarrays(ours), parameters_to_ndarrays(theirs)):
        if name.endswith("num_batches_tracked"):  # FedAvg averages this counter into a float; we keep an int
            assert a.dtype == np.int64
            continue
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)


def replies(models, counts, node_ids=None, error_for=(), class_counts=None):
    from flwr.common import ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict

    out = []
    for i, (m, n) in enumerate(zip(models, counts)):
        extra = {} if class_counts is None or class_counts[i] is None else {"class-counts": class_counts[i]}
        nid = (node_ids or list(range(10, 10 + len(models))))[i]
        md = Metadata(run_id=1, message_id=f"m{i}", src_node_id=nid, dst_node_id=0, reply_to_message_id=f"q{i}",
                      group_id="1", created_at=0.0, ttl=60.0, message_type="train")
        if i in error_for:
            out.append(Message(metadata=md, error=Error(code=0, reason="client crashed")))
        else:
            content = RecordDict({"arrays": ArrayRecord(m.state_dict()),
                                  "metrics": MetricRecord({"num-examples": n, "loss": float(n), **extra})})
            out.append(Message(metadata=md, content=content))
    return out


def test_message_strategy_identical_and_permuted_clients(fl):
    pytest.importorskip("flwr.serverapp.strategy")
    from flwr.serverapp.strategy import FedAvg

    m = make_model(16)
    s = flower.MessageDimatFedAvg(model=make_model(0), calibration=CALIBRATION, reset_bn=False)
    assert isinstance(s, FedAvg)
    arrays, metrics = s.aggregate_train(1, replies([m, m], [3, 5]))
    out = make_model(0)
    out.load_state_dict(arrays.to_torch_state_dict())
    assert_same_weights(out, m, atol=1e-6)
    assert metrics["loss"] == pytest.approx((3 * 3 + 5 * 5) / 8)  # FedAvg's weighted metric average

    clients = [permuted(m, 1), m, permuted(m, 2)]
    arrays, _ = s.aggregate_train(1, replies(clients, [4, 4, 4], node_ids=[7, 3, 9]))  # node 3 is the reference
    out.load_state_dict(arrays.to_torch_state_dict())
    assert_same_weights(out, m, atol=1e-5)
    fedavg, _ = FedAvg().aggregate_train(1, replies(clients, [4, 4, 4], node_ids=[7, 3, 9]))
    out.load_state_dict(fedavg.to_torch_state_dict())
    assert max_diff(out, m) > 0.05


def test_strategies_read_the_class_counts_from_the_client_metrics(fl, caplog):
    pytest.importorskip("flwr.serverapp.strategy")
    from flwr.common import parameters_to_ndarrays

    clients = [_plain(40), _plain(41), _plain(42)]
    counts = [[5.0, 0.0, 1.0], [0.0, 4.0, 1.0], [2.0, 2.0, 2.0]]
    agg = ModelAggregator(_plain(0), CALIBRATION, method="wa", head="label_counts")
    want = agg.aggregate([(state_to_ndarrays(m), n, c) for m, n, c in zip(clients, [3, 7, 5], counts)])
    legacy = flower.DimatFedAvg(model=_plain(0), calibration=CALIBRATION, method="wa", head="label_counts")
    params, _ = legacy.aggregate_fit(1, fit_results(clients, [3, 7, 5], class_counts=counts), [])
    message = flower.MessageDimatFedAvg(model=_plain(0), calibration=CALIBRATION, method="wa", head="label_counts")
    arrays, _ = message.aggregate_train(1, replies(clients, [3, 7, 5], class_counts=counts))
    for got in (parameters_to_ndarrays(params), [t.numpy() for t in arrays.to_torch_state_dict().values()]):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
    assert legacy.merge_log[-1]["head"] == message.merge_log[-1]["head"] == "label_counts"
    # Flower refuses replies whose metrics differ in keys; a client with negative counts: the layer is averaged,
    # loudly, and so is a legacy client without the metric
    with caplog.at_level("WARNING"):
        message.aggregate_train(2, replies(clients, [3, 7, 5], class_counts=[counts[0], [1.0, -1.0, 0.0], counts[2]]))
    assert message.merge_log[-1]["head"] == "mean" and "client 1 sent no valid class counts" in caplog.text
    legacy.aggregate_fit(2, fit_results(clients, [3, 7, 5], class_counts=[counts[0], counts[1], None]), [])
    assert legacy.merge_log[-1]["head"] == "mean" and "client 2 sent no valid class counts" in caplog.text


def test_message_strategy_skips_error_replies(fl):
    pytest.importorskip("flwr.serverapp.strategy")
    a, b = make_model(17), make_model(18)
    s = flower.MessageDimatFedAvg(model=make_model(0))
    arrays, _ = s.aggregate_train(1, replies([a, b], [1, 1], error_for=(1,)))
    out = make_model(0)
    out.load_state_dict(arrays.to_torch_state_dict())
    assert_same_weights(out, a, atol=1e-6)  # only the healthy client's model is left
    assert s.aggregate_train(1, replies([a], [1], error_for=(0,))) == (None, None)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower" / "run.py"


def test_flower_example_runs_to_completion(fl, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("flower_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    history = mod.main(["--clients", "3", "--rounds", "2", "--epochs", "1", "--strategy", "both"])
    out = capsys.readouterr().out
    assert "DimatFedAvg(dimat):" in out and "FedAvg:" in out
    for name, accs in history.items():
        assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs), (name, accs)
