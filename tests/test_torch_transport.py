"""torch.distributed transport: neighbour-only exchange among spawned gloo ranks, refusals, bad input.

Each test spawns a few processes on 127.0.0.1 with a free port and a short process-group timeout; results come
back through a queue read with a timeout, so a hung rank fails the test instead of hanging it.
"""

import os
import queue
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dimat.transport.torch_transport import TorchTransport

RING4 = {0: [1, 3], 1: [0, 2], 2: [1, 3], 3: [2, 0]}
TIMEOUT_S = 20


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snap(rank, r):
    g = torch.Generator().manual_seed(100 * r + rank)
    return {"w": torch.randn(20, 7, generator=g), "b": torch.randn(7, generator=g).double(),
            "n": torch.tensor(rank * 10 + r)}


def _worker(rank, world, port, scenario, q):
    torch.set_num_threads(1)
    try:
        run = _SCENARIOS[scenario]
        extra = (q,) if scenario == "dead" else ()
        q.put((rank, run(rank, world, port, *extra)))
    except BaseException:
        q.put((rank, "error: " + traceback.format_exc()))


def _plain(snapshots):
    """Tensors as (dtype, nested lists): tensors shared through a queue die with the process that sent them."""
    return {j: {k: (str(v.dtype), v.tolist()) for k, v in s.items()} for j, s in snapshots.items()}


def _exchange(rank, world, port, **kw):
    """Rounds 0-1 exact, round 2 in fp16 over the same group, round 3 with a NaN from rank 1 (in its last float)."""
    t = TorchTransport(rank, RING4[rank], world_size=world, master_addr="127.0.0.1", master_port=port,
                       timeout_s=TIMEOUT_S, **kw)
    try:
        out = []
        for r in range(2):
            t.post(r, _snap(rank, r))
            out.append(_plain(t.collect(r)))
        sent, received = t.bytes_sent, t.bytes_received
        half = TorchTransport(rank, RING4[rank], timeout_s=TIMEOUT_S, compress="fp16", **kw)  # reuses the group
        half.post(2, _snap(rank, 2))
        out.append(_plain(half.collect(2)))
        bad = _snap(rank, 3)
        if rank == 1:
            bad["w"][-1, -1] = float("nan")
        t.post(3, bad)
        nan_round = (sorted(t.collect(3)), list(t.rejected))
        half.close()
        return out, sent, received, half.bytes_received, nan_round
    finally:
        t.close()


def _from_env(rank, world, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from dimat.transport import create

    t = create("torch", rank, None, {"deadline_s": TIMEOUT_S, "backend": "gloo"}, neighbors=[1 - rank])
    try:
        t.post(3, _snap(rank, 3))
        got = t.collect(3)
        return sorted(got), dist.get_backend(), t.timeout_s
    finally:
        t.close()


def _exchange_in_small_segments(rank, world, port):
    """The same, in 64-byte gloo messages: every snapshot spans a dozen segments, the NaN lies in a late one."""
    return _exchange(rank, world, port, segment_bytes=64)


DEAD_TIMEOUT_S = 5


def _neighbour_dies(rank, world, port, q):
    """Round 0 goes through; then rank 1 exits without a word and rank 0 tries round 1."""
    t = TorchTransport(rank, [1 - rank], world_size=world, master_addr="127.0.0.1", master_port=port,
                       timeout_s=DEAD_TIMEOUT_S)
    t.post(0, _snap(rank, 0))
    first = sorted(t.collect(0))
    if rank == 1:
        q.put((rank, first))
        q.close()
        q.join_thread()
        os._exit(0)
    time.sleep(0.5)  # rank 1 is gone
    start = time.monotonic()
    try:
        t.post(1, _snap(rank, 1))
        t.collect(1)
        error = None
    except RuntimeError as e:
        error = str(e)
    return first, error, time.monotonic() - start


def _other_models(rank, world, port):
    """Rank 0 keeps one model. Rank 1 sends, in turn: the same byte size in other shapes (round 0), rank 0's model
    in other segment sizes (round 1), a larger model (rounds 2 and 3); each with a new transport on the group."""
    def model(kind):
        m = {"w": torch.full((20, 7), float(rank)), "b": torch.ones(7, dtype=torch.float64), "n": torch.tensor(0)}
        if kind == "transposed":
            m["w"] = torch.ones(7, 20)
        if kind == "larger":
            m["extra"] = torch.ones(100)
        return m

    plan = {0: ("transposed", 64), 1: ("same", 40), 2: ("larger", 64), 3: ("larger", 64)}
    got = {}
    for r, (kind, seg) in plan.items():
        if rank == 0:
            kind, seg = "same", 64
        t = TorchTransport(rank, [1 - rank], world_size=world, master_addr="127.0.0.1", master_port=port,
                           timeout_s=DEAD_TIMEOUT_S, segment_bytes=seg)
        t.post(r, model(kind))
        got[r] = {j: float(snap["w"].sum()) for j, snap in t.collect(r).items()}
        got[r]["rejected"] = [reason for _, _, reason in t.rejected]
    return got


def _msg(rank, to, r):
    g = torch.Generator().manual_seed(1000 * r + 10 * rank + to)
    return {"site0.cross": torch.randn(6, 6, generator=g), "site0.n": torch.tensor(7 + rank)}


def _messages(rank, world, port):
    """Ring of three, lane messages addressed per receiver. Round 0: exact. Round 1: rank 1's message to rank 0
    holds a NaN. Round 2: rank 2 sends rank 0 nothing (an empty message keeps the exchange in step). Round 3:
    rank 2 sends another shape."""
    ring = {0: [1, 2], 1: [0, 2], 2: [0, 1]}
    t = TorchTransport(rank, ring[rank], world_size=world, master_addr="127.0.0.1", master_port=port,
                       timeout_s=TIMEOUT_S)
    try:
        out = {}
        for r in range(4):
            t.post(r, _snap(rank, r))
            t.collect(r)
            msgs = {j: _msg(rank, j, r) for j in ring[rank]}
            if r == 1 and rank == 1:
                msgs[0]["site0.cross"][2, 2] = float("nan")
            if r == 2 and rank == 2:
                del msgs[0]
            lane = t
            if r == 3 and rank == 2:  # a transport of its own (on the same group): t refuses to send other shapes
                msgs = {j: {"site0.cross": torch.zeros(5, 5), "site0.n": torch.tensor(1)} for j in ring[rank]}
                lane = TorchTransport(rank, ring[rank], timeout_s=TIMEOUT_S)
            lane.post_messages(r, "pair_stats", msgs)
            got = lane.collect_messages(r, "pair_stats", ring[rank])
            out[r] = {j: (m["site0.cross"].tolist(), int(m["site0.n"])) for j, m in got.items()}
        return out, [reason for _, _, reason in t.rejected], t.supports_messages
    finally:
        t.close()


_SCENARIOS = {"messages": _messages, "exchange": _exchange, "segments": _exchange_in_small_segments, "env": _from_env,
              "dead": _neighbour_dies, "models": _other_models}


def _spawn(scenario, world):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, scenario, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, value = q.get(timeout=TIMEOUT_S + 40)
            assert not (isinstance(value, str) and value.startswith("error")), value
            results[rank] = value
    except queue.Empty:
        pytest.fail(f"ranks {sorted(set(range(world)) - set(results))} did not answer in time")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


@pytest.mark.parametrize("scenario", ["exchange", "segments"])
def test_ring_of_four_exchanges_with_neighbours_only_exact_fp16_and_refuses_nan(scenario):
    results = _spawn(scenario, 4)
    for rank, (rounds, sent, received, half_received, (nan_got, nan_rejected)) in results.items():
        for r in (0, 1):
            assert sorted(rounds[r]) == sorted(RING4[rank])
            for j, s in rounds[r].items():
                for k, v in _snap(j, r).items():
                    assert s[k] == (str(v.dtype), v.tolist()), (rank, r, j, k)
        for j, s in rounds[2].items():
            want = _snap(j, 2)
            assert s["b"][0] == "torch.float64" and s["n"][1] == j * 10 + 2
            torch.testing.assert_close(torch.tensor(s["w"][1]), want["w"], atol=1e-2, rtol=1e-2)
        assert sent == received > 0 and 0 < half_received < received / 2
        if 1 in RING4[rank]:  # neighbours of the NaN sender drop it with a reason, keep the other neighbour
            assert nan_got == sorted(set(RING4[rank]) - {1})
            assert nan_rejected[-1][:2] == (3, 1) and "non-finite" in nan_rejected[-1][2]
        else:
            assert nan_got == sorted(RING4[rank]) and not nan_rejected


def test_a_neighbour_that_dies_stops_the_exchange_with_a_clear_error_within_the_timeout():
    results = _spawn("dead", 2)
    assert results[1] == [0]
    first, error, seconds = results[0]
    assert first == [1]
    assert error is not None and "round 1 failed" in error and "use the grpc transport" in error
    assert seconds < DEAD_TIMEOUT_S + 10


def test_other_models_are_refused_with_a_reason_and_the_exchange_stays_in_step():
    results = _spawn("models", 2)
    for rank in (0, 1):
        got = results[rank]
        assert got[0] == {"rejected": ["round or architecture fingerprint differs from mine"]}  # same bytes
        assert got[1] == {1 - rank: 140.0 * (1 - rank), "rejected": []}  # other segment sizes: received exactly
        for r in (2, 3):  # another byte count: received in full, refused, and the next round still goes
            assert list(got[r]) == ["rejected"] and "another model" in got[r]["rejected"][0]


def test_initialised_from_torchrun_environment_through_create():
    results = _spawn("env", 2)
    assert results[0] == ([1], "gloo", TIMEOUT_S) and results[1] == ([0], "gloo", TIMEOUT_S)


def test_bad_input_without_a_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="world_size, master_addr and master_port"):
        TorchTransport(0, [1])
    with pytest.raises(ValueError, match="backend"):
        TorchTransport(0, [1], backend="mpi")
    with pytest.raises(ValueError, match="timeout_s"):
        TorchTransport(0, [1], timeout_s=0)
    for bad in (0, 12, 64.0):
        with pytest.raises(ValueError, match="segment_bytes must be a positive multiple of 8"):
            TorchTransport(0, [1], segment_bytes=bad)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3"):
        TorchTransport(0, [1], world_size=4, master_addr="127.0.0.1", master_port=1)


def test_lane_messages_are_addressed_validated_and_keep_the_exchange_in_step():
    results = _spawn("messages", 3)
    for rank, (out, rejected, supported) in results.items():
        assert supported
        others = [j for j in range(3) if j != rank]
        assert sorted(out[0]) == others
        for j, (cross, n) in out[0].items():  # what j addressed to me
            assert cross == _msg(j, rank, 0)["site0.cross"].tolist() and n == 7 + j
    out, rejected, _ = results[0]
    assert sorted(out[1]) == [2] and sorted(out[2]) == [1] and sorted(out[3]) == [1]
    assert any("non-finite" in r for r in rejected) and any("shape" in r for r in rejected)
    assert all(sorted(results[k][0][r]) == [j for j in range(3) if j != k] for k in (1, 2) for r in range(3))
    # round 3: rank 2's other shape is refused by both; rank 2 in turn refuses theirs (not its own layout)
    assert sorted(results[1][0][3]) == [0] and sorted(results[2][0][3]) == []
    # the round after a refusal still exchanges: every rank finished all four rounds
    assert all(sorted(out) == [0, 1, 2, 3] for out, _, _ in results.values())
