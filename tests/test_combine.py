"""merge.combine: each rule against a hand computation, the payloads (Fisher, Gram matrices), their permutation,
their transport inside snapshots (inproc, gRPC, torch.distributed wire format), validation, and the config keys."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dimat.config import resolve
from dimat.errors import UserError
from dimat.merge import payload, structure
from dimat.merge.combine import CombineOptions, combine_states, consensus, dare_drop, regmean_layer, ties
from dimat.node import Node, with_basis_tag
from dimat.topology import Topology
from dimat.transport import wire
from dimat.transport.inproc import make_inproc

T = torch.tensor


def _opts(rule, **kw):
    return CombineOptions(rule=rule, **kw)


# ------------------------------------------------------------------------------------------------- rules
def test_mean_is_the_weighted_sum_and_integers_come_from_the_first_state():
    a = {"w": T([1.0, 2.0]), "n": T(3)}
    b = {"w": T([3.0, 6.0]), "n": T(9)}
    out = combine_states([a, b], [0.25, 0.75], _opts("mean"))
    assert torch.allclose(out["w"], T([2.5, 5.0])) and int(out["n"]) == 3


def test_ties_trims_elects_the_sign_and_averages_the_agreeing_entries():
    # own model (base, index 0) has the zero task vector; neighbours' task vectors by hand:
    base = T([10.0, 10.0, 10.0, 10.0])
    tau1 = T([1.0, -2.0, 0.5, 3.0])
    tau2 = T([-1.5, -1.0, 2.0, 0.1])
    w = [0.5, 0.25, 0.25]
    # density 0.5 keeps 2 of 4 entries: tau1 -> [0, -2, 0, 3], tau2 -> [-1.5, 0, 2, 0]
    # weighted sum .25*(...) = [-0.375, -0.5, 0.5, 0.75]: signs [-, -, +, +]; one agreeing entry each
    out = combine_states([{"w": base}, {"w": base + tau1}, {"w": base + tau2}], w,
                         _opts("ties", ties_density=0.5))
    assert torch.allclose(out["w"], base + T([-1.5, -2.0, 2.0, 3.0]))
    # density 1: entry 0 has two agreeing entries -> their weighted mean; entry 1 one; scale 0.5 halves it
    t1, t2 = T([1.0, -2.0]), T([3.0, 1.0])  # sum .25*[4, -1]: signs [+, -]
    got = ties([torch.zeros(2), t1, t2], w, 1.0)
    assert torch.allclose(got, T([2.0, -2.0], dtype=torch.float64))
    out = combine_states([{"w": torch.zeros(2)}, {"w": t1}, {"w": t2}], w,
                         _opts("ties", ties_density=1.0, combine_scale=0.5))
    assert torch.allclose(out["w"], T([1.0, -1.0]))


def test_dare_drops_and_rescales_reproducibly():
    tau = torch.arange(1.0, 201.0)
    g = torch.Generator().manual_seed(5)
    d = dare_drop(tau, 0.75, g)
    kept = d != 0
    assert torch.allclose(d[kept], tau[kept].double() / 0.25)  # survivors scaled by 1 / (1 - p)
    assert 0.1 < kept.double().mean() < 0.4  # about 1 - p of the entries survive
    again = dare_drop(tau, 0.75, torch.Generator().manual_seed(5))
    assert torch.equal(d, again)
    # whole-state rule: base + w1 * dropped(tau1) (the base's own task vector is 0 and is never dropped)
    base = torch.zeros(200)
    out = combine_states([{"w": base}, {"w": tau}], [0.5, 0.5], _opts("dare", dare_drop=0.75),
                         generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out["w"], (0.5 * d).float())
    # drop 0 with mean is plain averaging
    out = combine_states([{"w": base}, {"w": tau}], [0.5, 0.5], _opts("dare", dare_drop=0.0),
                         generator=torch.Generator())
    assert torch.allclose(out["w"], 0.5 * tau)
    with pytest.raises(ValueError, match="generator"):
        combine_states([{"w": base}, {"w": tau}], [0.5, 0.5], _opts("dare"))


def test_consensus_keeps_entries_enough_participants_agree_on():
    tau1, tau2 = T([1.0, 1.0, -1.0]), T([1.0, -3.0, 0.1])
    w = [0.5, 0.25, 0.25]
    # tau = [.5, -.5, -.225]; lambda 1: mask1 = [1, 0, 1] (1 >= .5, 1 < 1.5, 1 >= .775); mask2 = [1, 1, 0]
    taus = [torch.zeros(3), tau1, tau2]
    assert torch.allclose(consensus(taus, w, 1.0, 2, [1, 2]), T([0.5, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(consensus(taus, w, 1.0, 1, [1, 2]), T([0.5, -0.5, -0.225], dtype=torch.float64))
    base = T([1.0, 1.0, 1.0])
    out = combine_states([{"w": base}, {"w": base + tau1}, {"w": base + tau2}], w,
                         _opts("consensus", consensus_lambda=1.0, consensus_k=2))
    assert torch.allclose(out["w"], base + T([0.5, 0.0, 0.0]))
    # k is capped at the number of other participants: one neighbour alone decides
    out = combine_states([{"w": base}, {"w": base + tau1}], [0.5, 0.5],
                         _opts("consensus", consensus_lambda=1.0, consensus_k=2))
    assert torch.allclose(out["w"], base + 0.5 * tau1)  # |tau1| >= |0.5 tau1 - tau1| everywhere


def test_fisher_weights_each_entry_by_its_fisher():
    a, b = {"w": T([1.0, 2.0])}, {"w": T([3.0, 4.0])}
    fa, fb = {"w": T([1.0, 0.0])}, {"w": T([3.0, 0.0])}
    out = combine_states([a, b], [0.5, 0.5], _opts("fisher"), payloads=[fa, fb])
    # entry 0: (.5*1*1 + .5*3*3) / (.5*1 + .5*3) = 2.5; entry 1: no information -> the plain mean 3
    assert torch.allclose(out["w"], T([2.5, 3.0]))


def test_regmean_solves_the_weighted_least_squares_by_hand():
    w1, w2 = T([[1.0, 0.0]]), T([[0.0, 1.0]])
    g1, g2 = T([[2.0, 1.0], [1.0, 1.0]]), torch.eye(2)
    # alpha .5: G1 -> [[2, .5], [.5, 1]]; sum wG = [[1.5, .25], [.25, 1]]; sum wWG = [1, .75]
    # W = [1, .75] inv(...) = [.8125, .875] / 1.4375
    got, bias = regmean_layer([w1, w2], None, [g1, g2], [0.5, 0.5], 0.5)
    assert bias is None
    assert torch.allclose(got, T([[0.8125, 0.875]], dtype=torch.float64) / 1.4375, atol=1e-5)
    # alpha 0 (diagonal only): per-input weighted means, weights w_j G_j[c, c]
    got, _ = regmean_layer([w1, w2], None, [g1, g2], [0.5, 0.5], 0.0)
    assert torch.allclose(got, T([[2 / 3, 0.5]], dtype=torch.float64), atol=1e-5)


def test_regmean_of_least_squares_solutions_is_the_pooled_least_squares():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(3, 4, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, 4, generator=g, dtype=torch.float64) * s for n, s in ((50, 1.0), (150, 3.0))]
    ys = [x @ truth.T + 0.3 * torch.randn(x.shape[0], 3, generator=g, dtype=torch.float64) for x in xs]
    sols = [torch.linalg.lstsq(x, y).solution.T for x, y in zip(xs, ys)]
    grams = [x.T @ x / x.shape[0] for x in xs]
    got, _ = regmean_layer(sols, None, grams, [0.25, 0.75], 1.0)  # weights = sample shares
    pooled = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    assert torch.allclose(got, pooled, atol=1e-5)


def test_regmean_in_a_state_folds_the_bias_and_averages_other_tensors():
    s = [{"fc.weight": T([[1.0, 2.0]]), "fc.bias": T([1.0]), "bn.running_mean": T([0.0])},
         {"fc.weight": T([[3.0, 0.0]]), "fc.bias": T([-1.0]), "bn.running_mean": T([2.0])}]
    grams = [{"fc": torch.eye(3)}, {"fc": torch.eye(3)}]  # identity Grams: plain averaging of weight and bias
    out = combine_states(s, [0.5, 0.5], _opts("regmean", regmean_alpha=1.0), params={"fc.weight", "fc.bias"},
                         payloads=grams, gram_layers={"fc": True})
    assert torch.allclose(out["fc.weight"], T([[2.0, 1.0]]), atol=1e-5)
    assert torch.allclose(out["fc.bias"], T([0.0]), atol=1e-5)
    assert torch.allclose(out["bn.running_mean"], T([1.0]))


def test_task_vector_rules_leave_buffers_to_the_mean():
    s = [{"w": T([0.0, 0.0]), "rm": T([0.0])}, {"w": T([1.0, -1.0]), "rm": T([4.0])}]
    out = combine_states(s, [0.5, 0.5], _opts("ties", ties_density=1.0), params={"w"})
    assert torch.allclose(out["w"], T([1.0, -1.0])) and torch.allclose(out["rm"], T([2.0]))


@pytest.mark.parametrize("bad", [dict(rule="avg"), dict(ties_density=0.0), dict(dare_drop=1.0),
                                 dict(dare_then="x"), dict(consensus_k=0), dict(fisher_floor=0.0),
                                 dict(regmean_alpha=1.5), dict(combine_scale=math.inf),
                                 dict(regmean_max_inputs=0), dict(regmean_max_inputs=2.5)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match="combine option"):
        CombineOptions(**bad)


# ----------------------------------------------------------------------------------------------- payloads
def test_input_gram_of_a_conv_by_hand():
    conv = nn.Conv2d(1, 1, 1)
    x = T([[[[1.0, 2.0], [3.0, 4.0]]]])
    g = payload.input_grams(conv, [x])
    # rows [x, 1] over the 4 pixels: [[30, 10], [10, 4]] / 4
    assert torch.allclose(g[""], T([[7.5, 2.5], [2.5, 1.0]]))
    assert payload.template("gram", conv)[""].shape == (2, 2)


def test_fisher_of_a_linear_model_by_hand():
    m = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(m.weight)  # p = [.5, .5]; grad of log p_y = (e_y - p) x^T
    x, y = T([[1.0, 2.0], [2.0, 0.0]]), T([0, 1])
    f = payload.fisher_diag(m, [(x, y)])
    g1 = T([[0.5, 1.0], [-0.5, -1.0]])
    g2 = T([[-1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(f["weight"], (g1 ** 2 + g2 ** 2) / 2)
    assert torch.allclose(payload.fisher_diag(m, [(x, y)], max_samples=1)["weight"], g1 ** 2)
    with pytest.raises(ValueError, match="label"):
        payload.fisher_diag(m, [x])


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["fisher", "gram"])
def test_a_payload_permutes_like_the_weights(kind):
    """The payload of a permuted model equals the permuted payload of the model (exactly the same function)."""
    m = _mlp(0)
    spec = structure.derive(m, torch.randn(2, 4))
    perms = structure.random_perms(spec, torch.Generator().manual_seed(1))
    assert perms
    moved = _mlp(0)
    moved.load_state_dict(structure.apply_permutation(m.state_dict(), spec, perms))
    data = _batches()
    expect = payload.compute(kind, moved, data)
    got = payload.permute(kind, payload.compute(kind, m, data), m.state_dict(), spec, perms)
    assert set(got) == set(expect)
    for n in got:
        assert torch.allclose(got[n], expect[n], atol=1e-5, rtol=1e-4), n


def test_payload_encode_split_and_check():
    pl = {"0": torch.ones(5, 5), "2": torch.ones(7, 7)}
    snap = {"0.weight": torch.zeros(6, 4), **payload.encode("gram", pl)}
    rest, found = payload.split(snap)
    assert list(rest) == ["0.weight"] and set(found["gram"]) == {"0", "2"}
    payload.check(found["gram"], pl, "gram", "agent 1")
    with pytest.raises(ValueError, match="agent 1.*carries no"):
        payload.check(None, pl, "gram", "agent 1")
    with pytest.raises(ValueError, match="lacks tensor '2'"):
        payload.check({"0": pl["0"]}, pl, "gram", "agent 1")
    with pytest.raises(ValueError, match="shape"):
        payload.check({"0": pl["0"], "2": torch.ones(6, 6)}, pl, "gram", "agent 1")
    with pytest.raises(ValueError, match="not finite"):
        payload.check({"0": pl["0"], "2": torch.full((7, 7), math.nan)}, pl, "gram", "agent 1")
    with pytest.raises(ValueError, match="unexpected"):
        payload.check({**pl, "9": pl["0"]}, pl, "gram", "agent 1")


# ----------------------------------------------------------------------------------------------- in a round
def _nodes(rule, method="dimat", n=3, opts=None, **kw):
    topo = Topology.build("ring", n)
    ts = make_inproc([topo.neighbors(k) for k in range(n)])
    return [Node(_mlp(k), topo, k, ts[k], _batches(seed=k), method=method, stat_batches=2,
                 combine=CombineOptions(rule=rule, **(opts or {})), **kw) for k in range(n)]


def test_regmean_max_inputs_leaves_wider_layers_to_the_mean_and_off_the_wire():
    # _mlp's layers have Gram matrices of 5, 7 and 6 rows (inputs plus the bias): a cap of 6 leaves out the
    # middle one. In a round of plain averaging (wa, so no alignment) the capped layer is the exact weighted mean,
    # the other the least-squares merge, and the payload is only the kept Gram matrix.
    model = _mlp(0)
    assert {n: payload._gram_size(m) for n, m in payload.gram_layers(model).items()} == {"0": 5, "2": 7, "4": 6}
    assert set(payload.gram_layers(model, 6)) == {"0", "4"} == set(payload.template("gram", model, 6))
    assert set(payload.input_grams(model, _batches(), 1, max_size=6)) == {"0", "4"}
    full, capped, mean = (_nodes(r, method="wa", n=2, opts=o) for r, o in
                          (("regmean", None), ("regmean", {"regmean_max_inputs": 6}), ("mean", None)))
    for ns in (full, capped, mean):
        for nd in ns:
            nd.post(0)
    res_full, res_capped = full[0].merge_round(0), capped[0].merge_round(0)
    mean[0].merge_round(0)
    assert res_full.comm_bytes - res_capped.comm_bytes == 2 * 7 * 7 * 4  # one 7x7 float32 matrix, each way
    got, lsq, avg = (ns[0].model.state_dict() for ns in (capped, full, mean))
    torch.testing.assert_close(got["2.weight"], avg["2.weight"])
    torch.testing.assert_close(got["0.weight"], lsq["0.weight"])
    assert not torch.allclose(got["0.weight"], avg["0.weight"])


@pytest.mark.parametrize("rule", ["fisher", "regmean"])
def test_payload_travels_in_the_snapshot_is_counted_and_merges(rule):
    plain = _nodes("mean", head="mean")  # no class counts: the rule's payload is the only extra
    withp = _nodes(rule)
    for ns in (plain, withp):
        for nd in ns:
            nd.post(0)
    res_plain = [nd.merge_round(0) for nd in plain]
    res = [nd.merge_round(0) for nd in withp]
    kind = CombineOptions(rule=rule).payload
    extra = sum(t.numel() * 4 for t in payload.template(kind, withp[0].model).values())
    for a, b in zip(res_plain, res):
        assert b.received == a.received and b.comm_bytes == a.comm_bytes + extra * 2 * len(b.received)
        assert b.telemetry["edges"] and all(math.isfinite(e["dist"]) for e in b.telemetry["edges"].values())
    for a, b in zip(plain, withp):  # a different rule gives a different (finite) model
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.isfinite(t).all() for t in sb.values())
        assert any(not torch.allclose(sa[k], sb[k]) for k in sa)
        assert not any(k.startswith(payload.PREFIX) for k in sb)


def test_a_neighbour_payload_with_nan_is_refused_naming_the_sender():
    ns = _nodes("fisher")
    for nd in ns:
        nd.post(0)
    key = next(k for k in ns[1].transport.mailbox.get(0, 1) if k.startswith(payload.PREFIX))
    ns[1].transport.mailbox.get(0, 1)[key].fill_(math.nan)
    with pytest.raises(ValueError, match="agent 1.*not finite"):
        ns[0].merge_round(0)


def test_dare_is_seeded_per_run_round_and_agent():
    def merged(seed, r):
        ns = _nodes("dare", combine_seed=seed)
        for nd in ns:
            nd.post(r)
        ns[0].merge_round(r)
        return ns[0].model.state_dict()["0.weight"].clone()

    a, b, c = merged(1, 0), merged(1, 0), merged(1, 1)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, merged(2, 0))


def test_payload_survives_the_wire_format():
    """Every multi-process transport packs snapshots with the wire layout: payload names, shapes and values
    survive, a layout without the payload is refused, and a NaN payload fails the finite check."""
    nd = _nodes("regmean")[0]
    snap = {**nd.model.state_dict(), **payload.encode("gram", payload.compute("gram", nd.model, nd.batches))}
    layout = wire.layout_of(snap)
    back = wire.unpack(wire.pack(snap, layout), layout)
    assert all(torch.equal(back[k], snap[k]) for k in snap)
    with pytest.raises(wire.WireError, match="missing tensor"):
        wire.check_against(wire.layout_of(nd.model.state_dict()), layout)
    bad = dict(snap)
    bad[next(k for k in snap if k.startswith(payload.PREFIX))] = torch.full_like(back[next(iter(
        k for k in snap if k.startswith(payload.PREFIX)))], math.nan)
    with pytest.raises(wire.WireError):
        wire.check_finite(bad)


def test_payload_crosses_grpc_against_the_run_template():
    from dimat.transport.grpc_transport import GrpcTransport

    nodes = _nodes("fisher", n=2)
    template = with_basis_tag({**nodes[0].model.state_dict(),  # basis shared (the default): snapshots carry a tag
                               **payload.encode("fisher", payload.template("fisher", nodes[0].model))}, 0)
    ts = [GrpcTransport(k, [1 - k], {1 - k: "127.0.0.1:1"}, listen="127.0.0.1:0", deadline_s=5.0,
                        secret="s", template=template) for k in range(2)]
    try:
        for t in ts:
            t.peers.update({u.rank: u.address for u in ts})
        for nd, t in zip(nodes, ts):
            nd.transport = t
            nd._bytes_mark = (0, 0)
        for nd in nodes:
            nd.post(0)
        res = [nd.merge_round(0) for nd in nodes]
        assert all(r.received == [1 - k] for k, r in enumerate(res))
        assert all(t.rejected_count == 0 for t in ts)
        assert res[0].bytes_received == wire.layout_of(template).payload_bytes
    finally:
        for t in ts:
            t.close()


# ------------------------------------------------------------------------------------------------ config
def test_config_keys_reach_the_node_and_bad_values_name_the_key():
    cfg = resolve({"merge": {"combine": "ties", "ties_density": 0.5, "combine_scale": 0.8}})
    o = CombineOptions.from_config(cfg["merge"])
    assert (o.rule, o.ties_density, o.combine_scale) == ("ties", 0.5, 0.8)
    for data, key in (({"merge": {"combine": "avg"}}, "merge.combine"),
                      ({"merge": {"dare_drop": 1.0}}, "merge.dare_drop"),
                      ({"merge": {"consensus_k": 0}}, "merge.consensus_k")):
        with pytest.raises(UserError, match=f"run.yaml: key '{key}'"):
            resolve(data, where="run.yaml")


# ------------------------------------------------------------------------- torch.distributed, two processes
def _torch_worker(rank, port, q):
    import traceback

    torch.set_num_threads(1)
    try:
        from dimat.transport.torch_transport import TorchTransport

        t = TorchTransport(rank, [1 - rank], world_size=2, master_addr="127.0.0.1", master_port=port,
                           timeout_s=30)
        try:
            nd = Node(_mlp(rank), Topology.build("ring", 2), rank, t, _batches(seed=rank), method="dimat",
                      stat_batches=2, combine=CombineOptions(rule="regmean"))
            res = nd.merge_round(0)
            q.put((rank, ({k: v.tolist() for k, v in nd.model.state_dict().items()}, res.received,
                          res.comm_bytes)))
        finally:
            t.close()
    except BaseException:
        q.put((rank, "error: " + traceback.format_exc()))


@pytest.mark.slow  # two spawned processes: about 45 s on a busy 2-core machine
def test_payload_crosses_torch_distributed_and_merges_as_in_process():
    import queue
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_torch_worker, args=(r, port, q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(2):
            rank, value = q.get(timeout=90)
            assert not (isinstance(value, str) and value.startswith("error")), value
            got[rank] = value
    except queue.Empty:
        pytest.fail("a torch.distributed rank did not answer in time")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    # the same two agents in process
    topo = Topology.build("ring", 2)
    ts = make_inproc([topo.neighbors(k) for k in range(2)])
    ns = [Node(_mlp(k), topo, k, ts[k], _batches(seed=k), method="dimat", stat_batches=2,
               combine=CombineOptions(rule="regmean")) for k in range(2)]
    for nd in ns:
        nd.post(0)
    res = [nd.merge_round(0) for nd in ns]
    for k in range(2):
        state, received, comm = got[k]
        # the wire counts aligned tensor offsets: the same tensors, payload included, plus padding
        assert received == [1 - k] and 0 <= comm - res[k].comm_bytes <= 2 * wire.ALIGN * (len(state) + 6)
        for name, t in ns[k].model.state_dict().items():
            assert torch.allclose(torch.tensor(state[name], dtype=t.dtype), t, atol=1e-5), name


# ----------------------------------------------------------------- masked mean (merge.min_corr's combine step)
def test_masked_mean_by_hand():
    from dimat.merge.combine import masked_mean
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    c = torch.tensor([[9.0, 10.0], [11.0, 12.0]])
    # b leaves row 1 out; c leaves column 0 out
    masks = [None, [(0, torch.tensor([1.0, 0.0]))], [(1, torch.tensor([0.0, 1.0]))]]
    got = masked_mean([a, b, c], [0.5, 0.25, 0.25], masks)
    want = torch.tensor([
        [(0.5 * 1 + 0.25 * 5) / 0.75, (0.5 * 2 + 0.25 * 6 + 0.25 * 10) / 1.0],
        [3.0, (0.5 * 4 + 0.25 * 12) / 0.75],
    ], dtype=torch.float64)
    assert torch.allclose(got, want)
    # no masks: the weighted mean; an entry nobody with weight keeps: the weighted mean too
    assert torch.allclose(masked_mean([a, b], [0.5, 0.5], [None, None]), (a + b).double() / 2)
    none = masked_mean([a, b], [0.0, 1.0], [None, [(0, torch.tensor([0.0, 1.0]))]])
    assert torch.allclose(none, b.double())


def test_combine_states_with_masks_is_the_masked_mean_and_mean_only():
    s0 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    s1 = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    masks = [None, {"w": [(0, torch.tensor([0.0, 1.0]))]}]
    out = combine_states([s0, s1], [0.5, 0.5], CombineOptions(), masks=masks)
    assert torch.allclose(out["w"], torch.tensor([1.0, 4.0])) and int(out["n"]) == 3
    assert torch.allclose(combine_states([s0, s1], [0.5, 0.5], CombineOptions(), masks=[None, None])["w"],
                          torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match="rule 'mean' only, got 'ties'"):
        combine_states([s0, s1], [0.5, 0.5], CombineOptions(rule="ties"), masks=masks)


# ------------------------------------------------------------ the output layer class by class (merge.head)
def test_class_weighted_mean_by_hand():
    from dimat.merge.combine import class_weighted_mean
    # a 3-class output layer (rows = classes, 2 inputs); participant 0 saw classes 0 and 1, participant 1 classes
    # 1 and 2, participant 2 none of them
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    b = torch.tensor([[7.0, 8.0], [9.0, 10.0], [11.0, 12.0]])
    c = torch.tensor([[13.0, 14.0], [15.0, 16.0], [17.0, 18.0]])
    counts = [torch.tensor([4.0, 2.0, 0.0]), torch.tensor([0.0, 6.0, 3.0]), torch.zeros(3)]
    w = [0.5, 0.25, 0.25]
    got = class_weighted_mean([a, b, c], w, 0, counts)
    row1 = (0.5 * 2 * a[1] + 0.25 * 6 * b[1]) / (0.5 * 2 + 0.25 * 6)
    want = torch.stack([a[0], row1, b[2]]).double()
    assert torch.allclose(got, want)
    # a bias (one axis) the same way; a class nobody has samples of: the plain weighted mean
    bias = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]), torch.tensor([7.0, 8.0, 9.0])]
    got = class_weighted_mean(bias, w, 0, [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]),
                                           torch.zeros(3)])
    mean2 = 0.5 * 3 + 0.25 * 6 + 0.25 * 9
    assert torch.allclose(got, torch.tensor([1.0, 5.0, mean2], dtype=torch.float64))
    # with min_corr's unit masks: participant 1 leaves input 0 out, so class 2's entry there has no kept
    # participant with samples of it and falls back to the masked mean of the others (a and c)
    masks = [None, [(1, torch.tensor([0.0, 1.0]))], None]
    got = class_weighted_mean([a, b, c], w, 0, counts, masks)
    assert torch.allclose(got[2, 0], torch.tensor((0.5 * 5 + 0.25 * 17) / 0.75, dtype=torch.float64))
    assert torch.allclose(got[2, 1], torch.tensor(12.0, dtype=torch.float64))
    assert torch.allclose(got[0], a[0].double())


def test_combine_states_with_a_class_head_and_mean_only():
    from dimat.merge.combine import ClassHead
    s0 = {"h.weight": torch.tensor([[1.0], [2.0]]), "h.bias": torch.tensor([1.0, 2.0]), "x": torch.tensor([0.0])}
    s1 = {"h.weight": torch.tensor([[3.0], [4.0]]), "h.bias": torch.tensor([3.0, 4.0]), "x": torch.tensor([2.0])}
    head = ClassHead({"h.weight": 0, "h.bias": 0}, [torch.tensor([5.0, 0.0]), torch.tensor([0.0, 5.0])])
    out = combine_states([s0, s1], [0.5, 0.5], CombineOptions(), head=head)
    assert torch.equal(out["h.weight"], torch.tensor([[1.0], [4.0]]))
    assert torch.equal(out["h.bias"], torch.tensor([1.0, 4.0])) and torch.equal(out["x"], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="rule 'mean' only, got 'fisher'"):
        combine_states([s0, s1], [0.5, 0.5], CombineOptions(rule="fisher"), payloads=[{}, {}], head=head)
    with pytest.raises(ValueError, match="2 class counts for 3 states"):
        combine_states([s0, s1, s1], [0.4, 0.3, 0.3], CombineOptions(), head=head)
