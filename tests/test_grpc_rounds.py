"""gRPC round protocol (issue 13): a dead, frozen or behind neighbour costs one deadline in total, probes admit it
again, sends outlive collect for a neighbour that is behind, asynchronous rounds, and state transfer.

In-process transports on free 127.0.0.1 ports; every wait is bounded by a short deadline. The multi-process
acceptance runs (8 agents, SIGKILL / restart / SIGSTOP) are in tests/test_fault.py.
"""

import socket
import threading
import time

import pytest
import torch

from dimat.transport.grpc_transport import GrpcTransport

SECRET = "correct horse battery staple"
DEADLINE = 2.0
FAST = dict(retry_initial_s=0.05, retry_max_s=0.2, connect_timeout_s=1.0, probe_interval_s=0.2)


def _snap(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(32, 17, generator=g), "n": torch.tensor(seed, dtype=torch.int64)}


@pytest.fixture
def make():
    made = []

    def _make(rank, neighbors, peers, **kw):
        kw.setdefault("deadline_s", DEADLINE)
        kw.setdefault("secret", SECRET)
        for k, v in FAST.items():
            kw.setdefault(k, v)
        t = GrpcTransport(rank, neighbors, dict(peers), listen=kw.pop("listen", "127.0.0.1:0"), **kw)
        made.append(t)
        return t

    yield _make
    for t in made:
        t.close()


def _line(make, **kw):
    """Agents 0 - 1 - 2 on a line, all knowing each other's addresses."""
    a = make(0, [1], {1: "127.0.0.1:1"}, **kw)
    b = make(1, [0, 2], {0: a.address, 2: "127.0.0.1:1"}, **kw)
    c = make(2, [1], {1: b.address}, **kw)
    a.peers[1], b.peers[2] = b.address, c.address
    return a, b, c


def _round(r, agents):
    for t in agents:
        t.post(r, _snap(10 * r + t.rank))
    got, seconds = {}, {}
    for t in agents:
        t0 = time.monotonic()
        got[t.rank] = sorted(t.collect(r))
        seconds[t.rank] = time.monotonic() - t0
    return got, seconds


def _until(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _pair(make, **kw):
    """Agents 0 and 1, each the other's only neighbour, with each other's addresses (agent 0 is made first, so
    its table gets agent 1's address once agent 1 exists)."""
    a = make(0, [1], {1: "127.0.0.1:1"}, **kw)
    b = make(1, [0], {0: a.address}, **kw)
    a.peers[1] = b.address
    return a, b


def test_a_dead_neighbour_costs_one_deadline_in_total_and_a_restart_is_admitted_within_two_rounds(make):
    a, b, c = _line(make, serve_state=True)
    assert _round(0, [a, b, c])[0] == {0: [1], 1: [0, 2], 2: [1]}
    address = a.address
    a.close()
    got, seconds = _round(1, [b, c])
    # What it costs: half a deadline, then a liveness check that finds nothing listening (refused twice, 0.25 s
    # apart), within the one deadline.
    assert got == {1: [2], 2: [1]} and DEADLINE / 2 <= seconds[1] < DEADLINE, seconds
    assert set(b.down) == {0}
    for r in (2, 3, 4):
        got, seconds = _round(r, [b, c])
        assert got == {1: [2], 2: [1]} and seconds[1] < DEADLINE / 2, (r, seconds)  # not waited for again
    assert set(b.down) == {0}  # the probes find nobody there
    back = make(0, [1], {1: b.address}, listen=address, serve_state=True)
    merged = []
    for r in (5, 6, 7):
        got, seconds = _round(r, [back, b, c])
        merged.append((got[0], got[1]))
    assert merged[-1] == ([1], [0, 2]), merged
    assert any(0 in g1 for _, g1 in merged[:2]), merged  # agent 1 merged the restarted agent 0 within two rounds
    assert not b.down


def test_a_neighbour_that_is_late_but_alive_and_in_step_is_waited_for_beyond_the_deadline(make):
    """A neighbour that answers its Status and has posted the previous round is working on this one: it is late
    because it waited for its own neighbours (a dead agent's neighbours post up to a deadline late). It is waited
    for up to one more deadline, not marked down for a near miss."""
    a, b = _pair(make)
    _round(0, [a, b])
    b.post(1, _snap(11))
    late = threading.Timer(1.3 * DEADLINE, lambda: a.post(1, _snap(10)))
    late.start()
    t0 = time.monotonic()
    got = b.collect(1)
    seconds = time.monotonic() - t0
    late.join()
    assert sorted(got) == [0] and 1.2 * DEADLINE < seconds < 2 * DEADLINE and not b.down, (seconds, b.down)
    assert sorted(a.collect(1)) == [1]


def test_a_late_neighbour_that_skips_ahead_meanwhile_is_not_waited_for_further(make):
    """Waited for past the deadline (it answered, in step), the neighbour skips ahead instead (following a
    neighbour of its own that is further on): a repeated check finds it past the round, the wait ends within a
    quarter deadline or so, and it is not marked down."""
    a, b = _pair(make)
    _round(0, [a, b])
    b.post(1, _snap(11))
    skip = threading.Timer(1.2 * DEADLINE, lambda: a.post(2, _snap(20)))
    skip.start()
    t0 = time.monotonic()
    got = b.collect(1)
    seconds = time.monotonic() - t0
    skip.join()
    assert got == {} and 1.2 * DEADLINE < seconds < 1.7 * DEADLINE and not b.down, (seconds, b.down)


def test_a_neighbour_that_does_not_answer_costs_at_most_the_deadline_and_one_that_is_hung_at_most_two(make):
    """Frozen or cut off: the liveness check gets no answer (here a socket that accepts connections and never
    speaks: gRPC gives up on the handshake), so the neighbour costs at most the deadline. Hung (it answers, but posts nothing): it looks in step
    once, then costs at most one more deadline and is marked down."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        b = make(1, [0], {0: f"127.0.0.1:{silent.getsockname()[1]}"})
        b.post(0, _snap(1))
        t0 = time.monotonic()
        assert b.collect(0) == {}
        seconds = time.monotonic() - t0
        assert DEADLINE / 2 <= seconds < DEADLINE + 0.5 and set(b.down) == {0}, seconds
    finally:
        silent.close()
    a = make(0, [2], {2: "127.0.0.1:1"})
    c = make(2, [0], {0: a.address})
    a.peers[2] = c.address
    _round(0, [a, c])
    c.post(1, _snap(21))  # agent 0 answers its Status but never posts round 1
    t0 = time.monotonic()
    assert c.collect(1) == {}
    seconds = time.monotonic() - t0
    assert DEADLINE * 1.9 <= seconds < 2 * DEADLINE + 0.5 and set(c.down) == {0}, seconds


def test_a_neighbour_that_is_behind_still_receives_and_learns_where_the_others_are(make):
    """The reverted attempt (9f39610) cancelled every send to a neighbour it did not wait for as soon as its own
    collect returned, so a restarted agent that was behind received nothing, stayed behind and was never waited
    for. Here agent 1 does not wait for agent 0, but its round-r send goes on after collect(r) (a private copy
    of the payload) and reaches agent 0 when it comes up; agent 0's round_hint says where agent 1 is."""
    a, b = _pair(make, serve_state=True)
    _round(0, [a, b])
    address = a.address
    a.close()
    _round(1, [b])  # the one deadline
    assert set(b.down) == {0}
    b.post(2, _snap(21))
    t0 = time.monotonic()
    assert b.collect(2) == {} and time.monotonic() - t0 < DEADLINE / 2
    # Agent 0 comes back after agent 1's collect(2) returned, behind (its last round was 0).
    back = make(0, [1], {1: b.address}, listen=address)
    _until(lambda: back.round_hint() == 2, DEADLINE, "agent 1's round-2 snapshot at the restarted agent 0")
    back.post(2, _snap(20))  # the agent skips ahead to round 2 (dimat.agent_main._catch_up)
    got = back.collect(2)
    assert sorted(got) == [1] and torch.equal(got[1]["w"], _snap(21)["w"])


def test_a_neighbour_that_answers_but_is_behind_is_not_waited_for_until_it_is_in_step(make):
    """Health alone does not admit: a neighbour that serves but has not posted recent rounds (frozen and resumed,
    or still starting up) would cost a deadline per round if it were waited for."""
    a, b = _pair(make)
    _round(0, [a, b])
    for r in (1, 2):  # agent 0 serves but posts nothing: frozen, partitioned, or slow to come back
        b.post(r, _snap(r))
        b.collect(r)
    assert set(b.down) == {0}
    time.sleep(4 * FAST["probe_interval_s"])
    assert set(b.down) == {0}  # probed (it answers), but its latest round is 0 while agent 1 is at 2
    a.post(3, _snap(30))  # caught up (skipped ahead)
    _until(lambda: not b.down, DEADLINE, "the probe to admit agent 0")
    b.post(3, _snap(31))
    t0 = time.monotonic()
    assert sorted(b.collect(3)) == [0] and time.monotonic() - t0 < DEADLINE / 2


def test_a_neighbour_that_is_ahead_is_not_waited_for_nor_marked_down(make):
    """Agent 1 collected round 3 without agent 0 and posted round 4: agent 0, one round behind, takes agent 1's
    round-3 snapshot at once and catches up by not waiting."""
    a, b = _pair(make)
    b.post(3, _snap(13))
    b.post(4, _snap(14))
    _until(lambda: a._inbox.rounds_from(1) == [3, 4], DEADLINE, "agent 1's rounds 3 and 4 at agent 0")
    a.post(3, _snap(3))
    t0 = time.monotonic()
    got = a.collect(3)
    assert sorted(got) == [1] and time.monotonic() - t0 < DEADLINE / 2 and not a.down
    assert a._inbox.rounds_from(1) == [4]  # nothing of round 4 from agent 1 is lost
    b.post(6, _snap(16))  # agent 1 is past round 5 (its round-5 snapshot never came): not waited for either
    a.post(5, _snap(5))  # round 6 is admitted within inbox_rounds of the round agent 0 is in (postponed before)
    _until(lambda: 6 in a._inbox.rounds_from(1), DEADLINE, "agent 1's round 6 at agent 0")
    t0 = time.monotonic()
    assert a.collect(5) == {} and time.monotonic() - t0 < DEADLINE / 2 and not a.down


def test_asynchronous_collect_never_waits_and_takes_the_freshest_snapshot_within_the_staleness(make):
    a, b = _pair(make, sync=False, staleness=1)
    assert a.serve_state  # sends must outlive collect when nobody waits for them
    for r in (0, 1, 2):
        b.post(r, _snap(100 + r))
        b.collect(r)
    _until(lambda: 2 in a._inbox.rounds_from(1), DEADLINE, "agent 1's round 2 at agent 0")
    a.post(3, _snap(3))
    t0 = time.monotonic()
    got = a.collect(3)
    assert time.monotonic() - t0 < 0.5
    assert sorted(got) == [1] and torch.equal(got[1]["w"], _snap(102)["w"]) and a.snapshot_rounds == {1: 2}
    a.post(4, _snap(4))
    got = a.collect(4)  # round 2 is now 2 rounds old: beyond the staleness bound
    assert got == {} and a.snapshot_rounds == {}


def test_asynchronous_rounds_record_each_snapshots_age(make):
    from torch import nn

    from dimat.node import Node

    a, b = _pair(make, sync=False, staleness=2)
    models = [nn.Linear(4, 3), nn.Linear(4, 3)]
    nodes = [Node(m, [[0.5, 0.5], [0.5, 0.5]], k, t, batches=None, method="wa") for k, (m, t) in
             enumerate(zip(models, (a, b)))]
    nodes[1].post(0)
    _until(lambda: 0 in a._inbox.rounds_from(1), DEADLINE, "agent 1's round 0 at agent 0")
    res = nodes[0].merge_round(1)
    assert res.received == [1] and res.ages == [1]


def test_fetch_state_gives_the_latest_posted_snapshot_and_its_round(make):
    a = make(0, [1], {1: "127.0.0.1:1"}, serve_state=True)
    b = make(1, [0], {0: a.address})
    a.peers[1] = b.address
    assert b.fetch_state(0, timeout_s=DEADLINE) is None  # nothing posted yet: FAILED_PRECONDITION, logged
    snap = _snap(7)
    a.post(3, snap)
    snap["w"].add_(1.0)  # the model moves on after the post (a merge, training): the state is what was posted
    got = b.fetch_state(0, timeout_s=DEADLINE)
    assert got is not None
    round, state = got
    assert round == 3 and torch.equal(state["w"], _snap(7)["w"]) and int(state["n"]) == 7


@pytest.mark.parametrize("who", ["wrong secret", "not a neighbour"])
def test_fetch_state_is_refused_without_the_secret_or_to_a_stranger(make, who):
    a = make(0, [1], {1: "127.0.0.1:1"}, serve_state=True)
    a.post(0, _snap(0))
    if who == "wrong secret":
        asker = make(1, [0], {0: a.address}, secret="wrong")
    else:
        asker = make(5, [0], {0: a.address})
    assert asker.fetch_state(0, timeout_s=DEADLINE) is None
    assert a.rejected and ("unauthenticated" in a.rejected[-1].reason if who == "wrong secret"
                           else "not a neighbour" in a.rejected[-1].reason)


def test_round_protocol_settings_are_checked(make):
    with pytest.raises(ValueError, match="staleness"):
        make(0, [1], {1: "127.0.0.1:1"}, staleness=-1)
    with pytest.raises(ValueError, match="probe_interval_s"):
        make(0, [1], {1: "127.0.0.1:1"}, probe_interval_s=0)


def test_wait_for_round_returns_when_a_neighbour_posts_it_or_at_the_timeout(make):
    a = make(0, [1], {1: "127.0.0.1:1"})
    b = make(1, [0], {0: a.address})
    t0 = time.monotonic()
    assert not a.wait_for_round(4, 0.3) and 0.25 < time.monotonic() - t0 < DEADLINE
    b.post(4, _snap(4))
    assert a.wait_for_round(4, DEADLINE)
