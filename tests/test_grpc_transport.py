"""gRPC transport: exchange, compression, deadlines, rejoin support, and the security acceptance tests.

Every server binds 127.0.0.1 on a free port (port 0), every wait is bounded by a short deadline, and every
transport is closed in a fixture's teardown.
"""

import logging
import shutil
import subprocess
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dimat.transport import create, wire
from dimat.transport._proto import dimat_pb2 as pb
from dimat.transport.grpc_transport import SERVICE, GrpcTransport, TLSConfig

SECRET = "correct horse battery staple"
DEADLINE = 3.0


def _snap(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 33, generator=g) * scale, "b": torch.randn(33, generator=g),
            "n": torch.tensor(seed, dtype=torch.int64)}


@pytest.fixture
def make():
    """Builds transports on free 127.0.0.1 ports and closes them all afterwards."""
    made = []

    def _make(rank, neighbors, peers=None, **kw):
        kw.setdefault("deadline_s", DEADLINE)
        kw.setdefault("secret", SECRET)
        kw.setdefault("send_to", [j for j in neighbors if j in (peers or {})])  # receive-only without addresses
        t = GrpcTransport(rank, neighbors, dict(peers or {}), listen=kw.pop("listen", "127.0.0.1:0"), **kw)
        made.append(t)
        return t

    yield _make
    for t in made:
        t.close()


def _mesh(make, n, **kw):
    """n transports, fully connected, each knowing the others' real addresses."""
    ts = [make(i, [j for j in range(n) if j != i], {j: "127.0.0.1:1" for j in range(n)}, **kw) for i in range(n)]
    addrs = {t.rank: t.address for t in ts}
    for t in ts:
        t.peers.update(addrs)
    return ts


def test_three_agents_exchange_exact_snapshots_over_rounds(make):
    ts = _mesh(make, 3)
    for r in range(2):
        snaps = [_snap(10 * r + i) for i in range(3)]
        for t, s in zip(ts, snaps):
            t.post(r, s)
        for t in ts:
            got = t.collect(r)
            assert sorted(got) == [j for j in range(3) if j != t.rank]
            for j, s in got.items():
                for k in s:
                    assert torch.equal(s[k], snaps[j][k])
    payload = wire.layout_of(_snap(0)).payload_bytes
    assert all(t.bytes_sent == t.bytes_received == 2 * 2 * payload for t in ts)
    assert all(t.rejected_count == 0 for t in ts)


@pytest.mark.parametrize("compress", ["fp16", "bf16"])
def test_compressed_exchange_halves_bytes_and_restores_dtypes(make, compress):
    a, b = _mesh(make, 2, compress=compress)
    s = _snap(1)
    a.post(0, s)
    b.post(0, _snap(2))
    got = b.collect(0)[0]
    a.collect(0)
    assert got["w"].dtype == torch.float32 and got["n"].dtype == torch.int64 and int(got["n"]) == 1
    torch.testing.assert_close(got["w"], s["w"], atol=2e-2, rtol=2e-2)
    assert b.bytes_received < wire.layout_of(s).payload_bytes * 0.6


def test_a_neighbour_that_is_down_is_skipped_within_the_deadline(make):
    a, b = _mesh(make, 2, deadline_s=1.0)
    a.neighbors.append(2)
    a.send_to.append(2)
    a.peers[2] = "127.0.0.1:9"  # nothing listens there (discard port, refused)
    t0 = time.monotonic()
    a.post(0, _snap(0))
    b.post(0, _snap(1))
    got = a.collect(0)
    assert sorted(got) == [1]
    assert time.monotonic() - t0 < 1.0 + 10  # bounded by the deadline, not hanging (generous slack)
    assert sorted(b.collect(0)) == [0]


def test_a_neighbour_that_starts_late_still_gets_the_snapshot(make):
    a = make(0, [1], {1: "127.0.0.1:0"}, deadline_s=8.0, retry_initial_s=0.05, retry_max_s=0.2)
    # Reserve a port for b by starting and closing a server on it, then start b a moment after a posts.
    probe = make(5, [], {})
    port = probe.address.rsplit(":", 1)[1]
    probe.close()
    a.peers[1] = f"127.0.0.1:{port}"
    a.post(0, _snap(0))
    time.sleep(0.5)
    b = make(1, [0], {0: a.address}, listen=f"127.0.0.1:{port}", deadline_s=8.0)
    b.post(0, _snap(1))
    assert sorted(b.collect(0)) == [0]
    assert sorted(a.collect(0)) == [1]


def test_future_rounds_are_kept_and_late_rounds_refused(make):
    a, b = _mesh(make, 2)
    b.post(0, _snap(0))
    b.post(1, _snap(1))  # fast neighbour: round 1 before I collected round 0
    a.post(0, _snap(5))
    assert int(a.collect(0)[1]["n"]) == 0
    a.post(1, _snap(6))
    got1 = a.collect(1)
    assert int(got1[1]["n"]) == 1
    b.collect(0)
    b.collect(1)
    # A round-1 snapshot arriving after round 1 was collected is late and refused.
    b.post(1, _snap(7))
    deadline = time.monotonic() + DEADLINE
    while not any("late" in rej.reason for rej in a.rejected) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any(rej.round == 1 and "late" in rej.reason for rej in a.rejected)


def test_status_reports_rounds_and_needs_the_secret(make):
    a, b = _mesh(make, 2)
    a.post(0, _snap(0))
    b.post(0, _snap(1))
    a.collect(0)
    s = b.peer_status(0)
    assert (s.rank, s.latest_posted_round, s.latest_collected_round) == (0, 0, 0)
    assert s.fingerprint == wire.layout_of(_snap(0)).fingerprint
    intruder = make(1, [0], {0: a.address}, secret="wrong")
    assert intruder.peer_status(0) is None
    assert any("unauthenticated Status" in rej.reason for rej in a.rejected)


def test_health_answers_without_the_secret(make):
    a = make(0, [], {})
    with grpc.insecure_channel(a.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert reply.ListFields() == [(health_pb2.HealthCheckResponse.DESCRIPTOR.fields_by_name["status"],
                                           health_pb2.HealthCheckResponse.SERVING)]


def test_bad_arguments_are_refused(make):
    with pytest.raises(ValueError, match="no address for neighbour"):
        GrpcTransport(0, [1], {}, listen="127.0.0.1:0")
    with pytest.raises(ValueError, match="listen"):
        GrpcTransport(0, [], {})
    with pytest.raises(ValueError, match="deadline_s"):
        GrpcTransport(0, [], {}, listen="127.0.0.1:0", deadline_s=0)
    with pytest.raises(ValueError, match="compress"):
        GrpcTransport(0, [], {}, listen="127.0.0.1:0", compress="fp8")
    with pytest.raises(ValueError, match="secret"):
        GrpcTransport(0, [], {}, listen="127.0.0.1:0", secret="")
    a = make(0, [], {})
    with pytest.raises(ValueError, match="cannot listen"):
        GrpcTransport(1, [], {}, listen=a.address)
    a.post(0, _snap(0))
    with pytest.raises(wire.WireError, match="shape"):
        a.post(1, {"w": torch.zeros(3), "b": torch.zeros(33), "n": torch.tensor(0)})
    a.close()
    with pytest.raises(RuntimeError, match="closed"):
        a.post(2, _snap(0))


def test_create_builds_grpc_from_a_topology_and_config(tmp_path, make):
    class Topo:  # the three members create() uses
        num_agents = 2
        peers = {0: "127.0.0.1:0", 1: "127.0.0.1:0"}

        def neighbors(self, i):
            return [1 - i]

    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    t = create("grpc", 0, Topo(), {"name": "grpc", "deadline_s": 2.0, "compress": "bf16",
                                   "secret_file": str(secret_file)})
    try:
        assert (t.neighbors, t.send_to, t.deadline_s, t.compress) == ([1], [1], 2.0, "bf16")
        assert t._secret == SECRET.encode()
    finally:
        t.close()
    with pytest.raises(ValueError, match="unknown transport"):
        create("carrier-pigeon", 0, Topo(), {})
    with pytest.raises(ValueError, match="TLS needs all"):
        create("grpc", 0, Topo(), {"tls_cert": "c.pem"})
    with pytest.raises(ValueError, match="empty"):
        (tmp_path / "empty").write_text("")
        create("grpc", 0, Topo(), {"secret_file": str(tmp_path / "empty")})


def test_config_keys_reach_the_transport(tmp_path, monkeypatch):
    from dimat.config import load_config
    from dimat.errors import UserError
    from dimat.transport import make_transport

    class Topo:
        num_agents = 2
        peers = {0: "127.0.0.1:0", 1: "127.0.0.1:0"}

        def neighbors(self, i):
            return [1 - i]

    monkeypatch.setenv("DIMAT_SECRET", "from-env")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("transport:\n  name: grpc\n  compress: fp16\n  deadline_s: 7\n")
    t = make_transport("grpc", load_config(cfg_path), rank=1, topology=Topo())
    try:
        assert (t.compress, t.deadline_s, t._secret) == ("fp16", 7.0, b"from-env")
    finally:
        t.close()
    cfg_path.write_text("transport:\n  compress: int4\n")
    with pytest.raises(UserError, match="transport.compress"):
        load_config(cfg_path)


def test_directed_graph_sends_to_out_neighbours_and_collects_from_in_neighbours(make):
    from dimat.transport import out_neighbors

    class Directed:  # 0 -> 1 -> 2 -> 0: agent i uses the model of agent i-1
        num_agents = 3

        def neighbors(self, i):
            return [(i - 1) % 3]

    topo = Directed()
    assert [out_neighbors(topo, i) for i in range(3)] == [[1], [2], [0]]
    placeholder = {j: "127.0.0.1:1" for j in range(3)}  # real addresses are known once all listen
    ts = [make(i, topo.neighbors(i), placeholder, send_to=out_neighbors(topo, i)) for i in range(3)]
    for t in ts:
        t.peers.update({u.rank: u.address for u in ts})
    for t in ts:
        t.post(0, _snap(t.rank))
    for t in ts:
        got = t.collect(0)
        assert list(got) == topo.neighbors(t.rank) and int(got[(t.rank - 1) % 3]["n"]) == (t.rank - 1) % 3


def test_status_of_a_peer_that_is_down_is_none_within_the_timeout(make):
    a = make(0, [1], {1: "127.0.0.1:9"})
    t0 = time.monotonic()
    assert a.peer_status(1, timeout_s=0.5) is None
    assert time.monotonic() - t0 < 10


# ----------------------------------------------------------------------------------------------- security
def _raw_send(address, frames, timeout=DEADLINE):
    """Send already-encoded frames as a hostile or broken peer would; returns the reply or the RpcError."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.stream_unary(f"/{SERVICE}/SendSnapshot", request_serializer=None,
                               response_deserializer=pb.SendReply.FromString)
        try:
            return call(iter(frames), timeout=timeout)
        except grpc.RpcError as e:
            return e


def _frames(snap, sender=1, round=0, secret=SECRET, payload=None, header_edit=None, chunk=100, receiver=0,
            key=None, trailer=True):
    """The frames of one snapshot stream, signed with ``key`` (bytes) or the shared ``secret`` (str)."""
    layout = wire.layout_of(snap)
    data = bytes(wire.pack(snap, layout).numpy()) if payload is None else payload
    h = wire.make_header(sender, round, layout, receiver=receiver)
    if header_edit is not None:
        header_edit(h)
    key = key if key is not None else secret.encode() if secret is not None else None
    if key is not None:
        h.auth.CopyFrom(wire.sign(key, wire.header_auth_fields(h)))
    frames = [wire.encode_header(h)] + [wire.encode_chunk(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    if trailer:
        good = bytes(wire.pack(snap, layout).numpy())
        named = h.payload_hash if h.payload_hash in wire.PAYLOAD_HASHES else wire.PAYLOAD_HASH
        digest = wire.payload_digest([(0, memoryview(good))], len(good), named)
        frames.append(wire.encode_trailer(wire.make_trailer(h, digest, key)))
    return frames


@pytest.fixture
def victim(make):
    """Agent 0 expecting snapshots shaped like _snap from neighbours 1 and 2."""
    return make(0, [1, 2], {}, template=_snap(0), deadline_s=1.0)


@pytest.mark.parametrize("secret,what", [("wrong", "wrong shared secret"), (None, "missing")])
def test_wrong_or_missing_secret_is_unauthenticated_logged_and_never_merged(victim, caplog, secret, what):
    caplog.set_level(logging.WARNING, logger="dimat.transport")
    evil = _snap(1, scale=1000.0)
    err = _raw_send(victim.address, _frames(evil, secret=secret))
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert victim.rejected[-1].sender == 1 and what in victim.rejected[-1].reason
    assert any(what in r.getMessage() for r in caplog.records)
    good = _snap(1)
    assert _raw_send(victim.address, _frames(good, sender=1)).accepted
    victim.post(0, _snap(0))
    got = victim.collect(0)
    assert torch.equal(got[1]["w"], good["w"])  # the genuine one, not the intruder's


def test_a_transport_with_the_wrong_secret_is_refused(make):
    a = make(0, [1], {}, template=_snap(0), deadline_s=1.5)
    b = make(1, [0], {0: a.address}, secret="not the secret", deadline_s=1.5)
    b.post(0, _snap(1))
    a.post(0, _snap(0))
    assert a.collect(0) == {}
    assert any("unauthenticated" in r.reason for r in a.rejected)


def _sha256(snap):
    import hashlib

    return hashlib.sha256(bytes(wire.pack(snap, wire.layout_of(snap)).numpy())).digest()


def _with_trailer_digest(frames, digest):
    """The stream with its trailer replaced by a validly signed one carrying ``digest``."""
    return frames[:-1] + [wire.encode_trailer(wire.make_trailer(wire.decode_frame(frames[0]), digest,
                                                                SECRET.encode()))]


def _edit_shape(h):
    h.tensors[0].shape[:] = [33, 64]


BAD = {
    "wrong shape": (lambda s: _frames({"w": torch.zeros(33, 64), "b": s["b"], "n": s["n"]}), "shape"),
    "short byte count": (lambda s: _frames(s, payload=bytes(wire.pack(s, wire.layout_of(s)).numpy())[:-8]),
                         "shorter"),
    "long byte count": (lambda s: _frames(s, payload=bytes(wire.pack(s, wire.layout_of(s)).numpy()) + b"\0" * 8),
                        "longer"),
    "bad hash": (lambda s: _frames(s, payload=b"\x01" + bytes(wire.pack(s, wire.layout_of(s)).numpy())[1:]),
                 "digest does not match"),
    "digest by another hash than the header names": (lambda s: _with_trailer_digest(_frames(s), _sha256(s)),
                                                     "digest does not match"),
    "unsupported payload hash": (lambda s: _frames(s, header_edit=lambda h: setattr(h, "payload_hash", "md5")),
                                 "unsupported payload hash 'md5'"),
    "NaN values": (lambda s: _frames(dict(s, w=s["w"].clone().fill_(float("nan")))), "non-finite"),
    "oversized header": (lambda s: _frames(s, header_edit=lambda h: h.tensors.add(name="x" * (70 << 10))),
                         "exceeds the limit"),
    "not a neighbour": (lambda s: _frames(s, sender=7), "not a neighbour"),
    "declared size over the limit": (lambda s: _frames(s, header_edit=lambda h: setattr(h, "payload_bytes", 1 << 40)),
                                     "exceeds the limit"),
    "no header": (lambda s: [wire.encode_chunk(b"abc")], "does not start with a header"),
    "second header inside the payload": (lambda s: (lambda f: f[:3] + [f[0]] + f[3:])(_frames(s)),
                                         "second header inside the payload"),
    "no trailer": (lambda s: _frames(s, trailer=False), "without a trailer"),
    "frame after the trailer": (lambda s: _frames(s) + [wire.encode_chunk(b"\0" * 8)], "after the trailer"),
    "trailer signed with another key": (lambda s: _frames(s)[:-1] + [wire.encode_trailer(wire.make_trailer(
        wire.decode_frame(_frames(s)[0]), bytes(32), b"another key"))], "unauthenticated trailer"),
    "addressed to another agent": (lambda s: _frames(s, receiver=2), "addressed to agent 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_snapshots_are_refused_with_a_reason_and_the_round_completes(make, caplog, case):
    caplog.set_level(logging.WARNING, logger="dimat.transport")
    victim = make(0, [1, 2], {}, template=_snap(0), max_header_bytes=64 << 10)
    build, reason = BAD[case]
    reply = _raw_send(victim.address, build(_snap(1)))
    assert not isinstance(reply, grpc.RpcError), reply
    assert not reply.accepted and reason in reply.reason
    assert reason in victim.rejected[-1].reason
    assert any(reason in r.getMessage() for r in caplog.records)
    # The round still completes with what was valid: neighbour 2's genuine snapshot, and nothing from 1.
    assert _raw_send(victim.address, _frames(_snap(2), sender=2)).accepted
    victim.deadline_s = 0.5
    got = victim.collect(0)
    assert sorted(got) == [2] and torch.equal(got[2]["w"], _snap(2)["w"])


def test_a_frame_over_the_message_limit_is_refused_by_grpc_and_logged(make):
    victim = make(0, [1], {}, template=_snap(0), max_header_bytes=16 << 10, chunk_bytes=16 << 10)
    frames = _frames(_snap(1), header_edit=lambda h: h.tensors.add(name="x" * (200 << 10)))
    err = _raw_send(victim.address, frames)
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    deadline = time.monotonic() + DEADLINE
    while not victim.rejected and time.monotonic() < deadline:
        time.sleep(0.02)
    # gRPC either ends the request stream or raises in it; both are refusals that name the limit
    assert f"{victim.max_message_bytes}-byte limit" in victim.rejected[-1].reason


def test_close_wakes_a_waiting_collect(make):
    a = make(0, [1], {}, deadline_s=30.0)
    threading.Timer(0.3, a.close).start()
    t0 = time.monotonic()
    assert a.collect(0) == {}
    assert time.monotonic() - t0 < 20  # woken by close, not by the 30 s deadline


def test_snapshots_before_my_first_post_are_checked_at_collect(make, caplog):
    a = make(0, [1, 2], {})  # no template: it learns its model at post
    assert _raw_send(a.address, _frames({"w": torch.zeros(2)}, sender=2)).accepted
    assert _raw_send(a.address, _frames(_snap(1), sender=1)).accepted
    a.post(0, _snap(0))
    got = a.collect(0)
    assert sorted(got) == [1]
    assert any(r.sender == 2 and "shape (2,), my model has (64, 33)" in r.reason for r in a.rejected)


def test_a_stream_from_an_agent_before_the_payload_hash_field_is_accepted(victim):
    """No payload_hash in the header (nor in what it signs) and a SHA-256 digest: what older agents send."""
    good = _snap(1)
    frames = _frames(good, header_edit=lambda h: setattr(h, "payload_hash", ""))
    assert wire.decode_frame(frames[-1]).payload_digest == _sha256(good)
    assert _raw_send(victim.address, frames).accepted
    victim.post(0, _snap(0))
    assert torch.equal(victim.collect(0)[1]["w"], good["w"])


def test_a_stock_protobuf_stream_is_understood(victim):
    """Wire compatibility: Frames serialised by protobuf itself (not our hand framing) are accepted."""
    s = _snap(1)
    frames = [pb.Frame.FromString(f) for f in _frames(s)]
    with grpc.insecure_channel(victim.address) as ch:
        from dimat.transport._proto import dimat_pb2_grpc

        reply = dimat_pb2_grpc.PeerStub(ch).SendSnapshot(iter(frames), timeout=DEADLINE)
    assert reply.accepted


def test_exactly_4_mib_chunks_pass_the_explicit_message_limits(make):
    big = {"w": torch.randn(3 << 20)}  # 12 MiB
    a = make(0, [1], {}, chunk_bytes=4 << 20)
    b = make(1, [0], {0: a.address}, chunk_bytes=4 << 20)
    b.post(0, big)
    got = a.collect(0)
    assert torch.equal(got[1]["w"], big["w"])


# ---------------------------------------------------------------------------- identity, replay, overwrite
MASTER = b"cluster master key for the tests"


def _cred(rank, n=4):
    from dimat.transport.identity import derive

    return derive(MASTER, rank, range(n))


def _wait_for(pred, timeout=DEADLINE):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


_IMPERSONATOR = """
import sys, grpc
from dimat.transport import wire
from dimat.transport.identity import load_credentials
from dimat.transport.grpc_transport import SERVICE
from dimat.transport._proto import dimat_pb2 as pb
import torch
cred = load_credentials(sys.argv[1], 3)  # valid credentials of agent 3
g = torch.Generator().manual_seed(99)
snap = {"w": torch.randn(64, 33, generator=g) * 1000, "b": torch.randn(33, generator=g), "n": torch.tensor(2)}
layout = wire.layout_of(snap)
data = bytes(wire.pack(snap, layout).numpy())
for key in (cred.key_for(0), cred.key_for(2)):  # its own key with the victim, and its key with agent 2
    h = wire.make_header(2, 0, layout, key, receiver=0)  # claims to be agent 2
    frames = [wire.encode_header(h), wire.encode_chunk(data),
              wire.encode_trailer(wire.make_trailer(h, wire.payload_digest([(0, data)], len(data)), key))]
    with grpc.insecure_channel(sys.argv[2]) as ch:
        call = ch.stream_unary(f"/{SERVICE}/SendSnapshot", request_serializer=None,
                               response_deserializer=pb.SendReply.FromString)
        try:
            print("accepted" if call(iter(frames), timeout=10).accepted else "refused")
        except grpc.RpcError as e:
            print(e.code().name)
"""


def test_a_process_with_rank_3_credentials_posting_as_rank_2_is_refused_logged_and_never_merged(
        make, tmp_path, caplog):
    import os
    import sys

    from dimat.transport.identity import write_credentials

    caplog.set_level(logging.WARNING, logger="dimat.transport")
    files = write_credentials(tmp_path, 4, master=MASTER)
    victim = make(0, [2, 3], {}, secret=None, credentials=_cred(0), template=_snap(0), deadline_s=1.0)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", _IMPERSONATOR, str(files[3]), victim.address], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["UNAUTHENTICATED", "UNAUTHENTICATED"], proc.stderr
    assert [r.sender for r in victim.rejected] == [2, 2]
    assert all("impersonation" in r.reason for r in victim.rejected)
    assert sum("agent 2's key" in r.getMessage() for r in caplog.records) == 2  # one log line per attempt
    # The genuine agent 2 still gets through, and only its snapshot is merged.
    real = make(2, [0], {0: victim.address}, secret=None, credentials=_cred(2))
    real.post(0, _snap(2))
    victim.post(0, _snap(0))
    got = victim.collect(0)
    assert sorted(got) == [2] and torch.equal(got[2]["w"], _snap(2)["w"])


def test_two_agents_with_credentials_exchange_and_peer_status(make):
    a = make(0, [1], {1: "127.0.0.1:1"}, secret=None, credentials=_cred(0))
    b = make(1, [0], {0: a.address}, secret=None, credentials=_cred(1))
    a.peers[1] = b.address
    a.post(0, _snap(0))
    b.post(0, _snap(1))
    assert torch.equal(a.collect(0)[1]["w"], _snap(1)["w"])
    assert torch.equal(b.collect(0)[0]["w"], _snap(0)["w"])
    assert b.peer_status(0).latest_collected_round == 0
    with pytest.raises(ValueError, match="belong to agent 1"):
        GrpcTransport(0, [], {}, listen="127.0.0.1:0", credentials=_cred(1))
    with pytest.raises(ValueError, match="not both"):
        GrpcTransport(0, [], {}, listen="127.0.0.1:0", credentials=_cred(0), secret="s")


def test_a_replayed_stream_is_refused_logged_and_merged_once(victim, caplog):
    caplog.set_level(logging.WARNING, logger="dimat.transport")
    frames = _frames(_snap(1), sender=1)
    assert _raw_send(victim.address, frames).accepted
    again = _raw_send(victim.address, frames)  # a recorded copy of the same stream, sent again
    assert isinstance(again, grpc.RpcError) and again.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "replayed" in victim.rejected[-1].reason
    assert any("replayed" in r.getMessage() for r in caplog.records)
    victim.post(0, _snap(0))
    got = victim.collect(0)
    assert sorted(got) == [1] and torch.equal(got[1]["w"], _snap(1)["w"])
    # The same stream after the round was collected: refused too (its nonce is still remembered).
    assert isinstance(_raw_send(victim.address, frames), grpc.RpcError)


def test_an_arrived_snapshot_is_never_overwritten(victim, caplog):
    caplog.set_level(logging.WARNING, logger="dimat.transport")
    assert _raw_send(victim.address, _frames(_snap(1), sender=1)).accepted
    # A second, validly signed stream for the same round and sender (fresh nonce), carrying other values.
    reply = _raw_send(victim.address, _frames(_snap(5, scale=1000.0), sender=1))
    assert not reply.accepted and "overwrite" in reply.reason
    assert victim.rejected[-1][:2] == (0, 1) and "already arrived" in victim.rejected[-1].reason
    assert any("overwrite" in r.getMessage() for r in caplog.records)
    victim.post(0, _snap(0))
    got = victim.collect(0)
    assert torch.equal(got[1]["w"], _snap(1)["w"])  # the first one, untouched


def test_two_senders_claiming_one_rank_deliver_one_whole_snapshot(make):
    a = make(0, [1], {}, template=_snap(0), deadline_s=DEADLINE)
    twins = [make(1, [0], {0: a.address}, secret=SECRET) for _ in range(2)]  # e.g. a restart beside the original
    snaps = [_snap(10), _snap(11)]
    for t, snap in zip(twins, snaps):
        t.post(0, snap)
    assert _wait_for(lambda: any("overwrite" in r.reason for r in a.rejected))  # the second: refused, logged
    a.post(0, _snap(0))
    got = a.collect(0)
    assert list(got) == [1]
    assert any(torch.equal(got[1]["w"], s["w"]) for s in snaps)  # the first, whole, not a mixture
    assert sum(r.sender == 1 for r in a.rejected) == 1


def test_a_client_that_cancels_mid_payload_leaves_nothing_and_the_round_goes_on(victim, caplog):
    caplog.set_level(logging.WARNING, logger="dimat.transport")
    frames = _frames(_snap(1), sender=1, chunk=1000)
    stalled = threading.Event()

    def stream():
        yield from frames[:3]  # header and two chunks of nine
        stalled.set()
        time.sleep(1.0)  # cancelled meanwhile
        yield from frames[3:]

    with grpc.insecure_channel(victim.address) as ch:
        call = ch.stream_unary(f"/{SERVICE}/SendSnapshot", request_serializer=None,
                               response_deserializer=pb.SendReply.FromString)
        fut = call.future(stream(), timeout=DEADLINE)
        assert stalled.wait(DEADLINE)
        time.sleep(0.1)
        fut.cancel()
    # Depending on when the cancel reaches the server, gRPC reports a broken stream or just ends it early.
    cut = ("stream broken", "stream ended without a trailer")
    assert _wait_for(lambda: any(c in r.reason for r in victim.rejected for c in cut))
    assert victim.rejected[-1].sender == 1 and victim._inbox.admit(0, 1) is None  # nothing stored for (0, 1)
    assert any(c in r.getMessage() for r in caplog.records for c in cut)
    # The same round from the same sender is still welcome, and is what gets merged.
    assert _raw_send(victim.address, _frames(_snap(1), sender=1)).accepted
    victim.post(0, _snap(0))
    assert torch.equal(victim.collect(0)[1]["w"], _snap(1)["w"])


def test_a_client_that_stalls_mid_payload_is_cut_off_after_the_deadline(make):
    victim = make(0, [1], {}, template=_snap(0), deadline_s=1.0)
    frames = _frames(_snap(1), sender=1, chunk=1000)
    release = threading.Event()

    def stream():
        yield from frames[:3]
        release.wait(20)  # stalls, and the call has no deadline of its own

    t0 = time.monotonic()
    with grpc.insecure_channel(victim.address) as ch:
        call = ch.stream_unary(f"/{SERVICE}/SendSnapshot", request_serializer=None,
                               response_deserializer=pb.SendReply.FromString)
        fut = call.future(stream())
        assert _wait_for(lambda: any("not complete" in r.reason for r in victim.rejected), timeout=10)
        assert time.monotonic() - t0 < 8
        release.set()
        with pytest.raises(grpc.RpcError):
            fut.result(timeout=10)


def test_rounds_beyond_inbox_rounds_wait_their_turn_instead_of_evicting_earlier_ones(make, caplog):
    caplog.set_level(logging.INFO, logger="dimat.transport")
    a = make(0, [1], {}, template=_snap(0), inbox_rounds=2, deadline_s=DEADLINE)
    a.post(0, _snap(0))  # agent 0 is in round 0: rounds 0 and 1 fit, round 2 must wait
    for r in (1, 0):  # in either order: both are within the window
        assert _raw_send(a.address, _frames(_snap(r), sender=1, round=r)).accepted
    early = _raw_send(a.address, _frames(_snap(2), sender=1, round=2))
    assert isinstance(early, grpc.RpcError) and early.code() == grpc.StatusCode.UNAVAILABLE  # try again later
    assert "inbox_rounds=2" in early.details() and not a.rejected
    assert any("postponed" in r.getMessage() for r in caplog.records)
    assert int(a.collect(0)[1]["n"]) == 0  # round 0 was kept (it used to be evicted by round 2)
    assert _raw_send(a.address, _frames(_snap(2), sender=1, round=2)).accepted  # room now
    # End to end: a sender three rounds ahead gets every round through, by retrying within its deadline.
    b = make(1, [0], {0: a.address}, retry_max_s=0.2)
    c = make(0, [1], {}, template=_snap(0), inbox_rounds=1, deadline_s=DEADLINE)
    b.peers[0] = c.address
    c.post(0, _snap(0))  # before b's streams arrive: an agent with no round yet keeps each sender's newest only
    for r in range(3):
        b.post(r, _snap(r))
    for r in range(3):
        if r:
            c.post(r, _snap(0))
        assert int(c.collect(r)[1]["n"]) == r


def test_before_its_first_round_an_agent_keeps_each_senders_newest_rounds(make):
    """A restarted agent does not know yet which round it will rejoin at: its neighbours' latest are kept."""
    a = make(0, [1], {}, template=_snap(0), inbox_rounds=2, deadline_s=1.0)
    for r in (5, 6, 7):
        assert _raw_send(a.address, _frames(_snap(r), sender=1, round=r)).accepted
    a.post(6, _snap(0))  # rejoins at round 6
    assert int(a.collect(6)[1]["n"]) == 6
    a.post(7, _snap(0))
    assert int(a.collect(7)[1]["n"]) == 7


def test_status_from_a_non_neighbour_is_refused_and_logged(make, caplog):
    caplog.set_level(logging.WARNING, logger="dimat.transport")
    a = make(0, [1], {})
    stranger = make(5, [0], {0: a.address})  # holds the shared secret, but 0 does not know it as a neighbour
    assert stranger.peer_status(0) is None
    assert a.rejected[-1].sender == 5 and "not a neighbour" in a.rejected[-1].reason
    assert any("not a neighbour" in r.getMessage() for r in caplog.records)
    friend = make(1, [0], {0: a.address})
    assert friend.peer_status(0).rank == 0
    # With per-agent credentials, a rank without a key of its own with 0 cannot even authenticate.
    b = make(0, [1], {}, secret=None, credentials=_cred(0, n=2))
    outsider = make(3, [0], {0: b.address}, secret=None, credentials=_cred(3))
    assert outsider.peer_status(0) is None
    assert "no key for agent 3" in b.rejected[-1].reason
    # ... and an agent whose credentials hold no key for a peer says so instead of calling it.
    keyless = make(1, [0, 5], {0: b.address, 5: "127.0.0.1:9"}, secret=None, credentials=_cred(1), deadline_s=0.5)
    assert keyless.peer_status(5) is None
    keyless.post(0, _snap(1))
    assert keyless.collect(0) == {}


# ------------------------------------------------------------------------------------------------------ TLS
def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA and one certificate for 127.0.0.1 (server and client use) made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=dimat test CA", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "agent.key", "-out", "agent.csr",
             "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", "agent.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "agent.pem", "-days", "1", "-extfile", "ext.cnf", cwd=d)
    # A second, unrelated CA for the "stranger" certificate.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.pem",
             "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", cwd=d)
    return d


@pytest.mark.parametrize("client_auth", [False, True])
def test_tls_and_mtls_exchange(make, certs, client_auth):
    tls = TLSConfig(certs / "agent.pem", certs / "agent.key", certs / "ca.pem", client_auth=client_auth)
    a = make(0, [1], {}, tls=tls)
    b = make(1, [0], {0: a.address}, tls=tls)
    b.post(0, _snap(1))
    assert torch.equal(a.collect(0)[1]["w"], _snap(1)["w"])


def test_mtls_refuses_a_client_certificate_from_another_ca(make, certs):
    tls = TLSConfig(certs / "agent.pem", certs / "agent.key", certs / "ca.pem", client_auth=True)
    a = make(0, [1], {}, tls=tls, deadline_s=1.0)
    stranger = TLSConfig(certs / "other.pem", certs / "other.key", certs / "ca.pem", client_auth=True)
    b = make(1, [0], {0: a.address}, tls=stranger, deadline_s=1.0)
    b.post(0, _snap(1))
    assert a.collect(0) == {}
    with grpc.insecure_channel(a.address) as ch:  # plaintext cannot talk to a TLS server at all
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0)


def test_tls_files_missing_is_a_clear_error(tmp_path):
    tls = TLSConfig(tmp_path / "nope.pem", tmp_path / "nope.key", tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="nope.key"):
        GrpcTransport(0, [], {}, listen="127.0.0.1:0", tls=tls)


# ------------------------------------------------------------------------------------------------- 400 MB
@pytest.mark.slow
def test_a_400_mb_snapshot_crosses_between_two_processes_under_3x_memory():
    """Acceptance: 100M float32 parameters between two agent processes, peak RSS < 3x payload in each.

    Each process is fresh (spawned); the receiver holds its own 400 MB model (the template it validates
    against) as a real agent does. Peak RSS is VmHWM, torch and gRPC themselves included.
    """
    from dimat.bench.transport import measure

    mib = 100e6 * 4 / (1 << 20)  # 381.5 MiB = 400 MB
    row = measure("grpc", mib, repeats=1)
    payload_mib = mib
    print(f"400 MB over gRPC: {row['gbps']:.2f} Gbit/s, peak RSS sender {row['peak_rss_mib_sender']:.0f} MiB, "
          f"receiver {row['peak_rss_mib_receiver']:.0f} MiB (payload {payload_mib:.0f} MiB)")
    assert row["peak_rss_mib_sender"] < 3 * payload_mib
    assert row["peak_rss_mib_receiver"] < 3 * payload_mib


# ------------------------------------------------------------------------------------- message lanes
def _msg(seed, c=5):
    g = torch.Generator().manual_seed(seed)
    return {"site0.cross": torch.randn(c, c, generator=g), "site0.n": torch.tensor(10 + seed)}


def test_messages_travel_on_their_own_lane_addressed_to_each_receiver(make):
    ts = _mesh(make, 3)
    for t in ts:
        t.post(0, _snap(t.rank))
    for t in ts:
        t.collect(0)
    sent_before = [t.bytes_sent for t in ts]
    for t in ts:  # each agent sends each neighbour a message of its own
        t.post_messages(0, "pair_stats", {j: _msg(10 * t.rank + j) for j in range(3) if j != t.rank})
    for t in ts:
        got = t.collect_messages(0, "pair_stats", [j for j in range(3) if j != t.rank])
        assert sorted(got) == [j for j in range(3) if j != t.rank]
        for j, m in got.items():  # what j addressed to me, nothing else
            assert torch.equal(m["site0.cross"], _msg(10 * j + t.rank)["site0.cross"])
            assert int(m["site0.n"]) == 10 + 10 * j + t.rank
    size = wire.layout_of(_msg(0)).payload_bytes
    end = time.monotonic() + 2.0  # a send is counted when its reply comes back, on a background thread
    while time.monotonic() < end and not all(t.bytes_sent - b == 2 * size for t, b in zip(ts, sent_before)):
        time.sleep(0.02)
    assert [t.bytes_sent - b for t, b in zip(ts, sent_before)] == [2 * size] * 3
    assert all(t.rejected_count == 0 for t in ts)
    # the lane's round is over: a late message is refused
    ts[1].post_messages(0, "pair_stats", {0: _msg(1)})
    time.sleep(0.5)
    assert any("late" in r.reason for r in ts[0].rejected)


def test_bad_messages_are_refused_and_the_others_arrive(make, caplog):
    caplog.set_level(logging.WARNING, logger="dimat.transport")
    victim = make(0, [1, 2], {}, deadline_s=1.0)
    # agent 0 learns the lane's layout from its own message
    victim.post_messages(0, "pair_stats", {})  # sends nothing: no out-neighbours here
    lane = victim._lane("pair_stats")
    lane.expected = wire.layout_of(_msg(0))

    def send(msg, sender, **kw):
        return _raw_send(victim.address, _frames(msg, sender=sender, header_edit=lambda h: setattr(h, "lane",
                                                                                                  "pair_stats"),
                                                 **kw))

    assert not send({"site0.cross": torch.zeros(4, 4), "site0.n": torch.tensor(1)}, 1).accepted  # wrong shape
    nan = _msg(1)
    nan["site0.cross"][0, 0] = float("nan")
    assert not send(nan, 1).accepted  # NaN
    assert isinstance(send(_msg(1), 1, secret="another secret"), grpc.RpcError)  # unauthenticated
    reasons = " | ".join(r.reason for r in victim.rejected)
    assert "shape" in reasons and "non-finite" in reasons and "unauthenticated" in reasons
    assert send(_msg(2), 2).accepted
    bad_lane = _raw_send(victim.address, _frames(_msg(2), sender=2, header_edit=lambda h: setattr(h, "lane", "x y")))
    assert not bad_lane.accepted and "lane" in bad_lane.reason
    got = victim.collect_messages(0, "pair_stats", [1, 2])
    assert sorted(got) == [2] and torch.equal(got[2]["site0.cross"], _msg(2)["site0.cross"])
    # snapshots are not messages: the snapshot inbox holds nothing
    assert victim._inbox.rounds_from(2) == []


def test_a_lane_signature_cannot_be_moved_to_snapshots(make):
    """The lane is signed: a message re-labelled as a snapshot (or the reverse) fails authentication."""
    victim = make(0, [1], {}, template=_msg(0))
    frames = _frames(_msg(1), header_edit=lambda h: setattr(h, "lane", "pair_stats"))
    h = wire.decode_frame(frames[0])
    h.lane = ""
    reply = _raw_send(victim.address, [wire.encode_header(h)] + frames[1:])
    assert isinstance(reply, grpc.RpcError) and reply.code() == grpc.StatusCode.UNAUTHENTICATED
