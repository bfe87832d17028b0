"""The snapshot wire format: layout, packing, chunking, headers, authentication and every refusal."""

import time

import pytest
import torch

from dimat.transport import wire
from dimat.transport._proto import dimat_pb2 as pb


def _snapshot():
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "bn.running_mean": torch.randn(4, generator=g, dtype=torch.float64),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 5),
        "half": torch.randn(9, generator=g).half(),
        "bf": torch.randn(5, generator=g).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "idx": torch.arange(3, dtype=torch.int32),
        "fc.weight": torch.randn(10, 36, generator=g).t(),  # not contiguous
    }


def _roundtrip(snap, compress=None, chunk_bytes=64):
    layout = wire.layout_of(snap, compress)
    pieces = wire.tensor_views(snap, layout)
    header = wire.make_header(3, 5, layout, b"k", receiver=4)
    checked = wire.check_header(header, wire.layout_of(snap), max_payload_bytes=1 << 20)
    asm = wire.Assembler(checked)
    running, offset = wire.StreamHash(), 0
    for c in wire.iter_payload(pieces, layout.payload_bytes, chunk_bytes):
        running.update(offset, c)
        offset += len(c)
        asm.add(wire.decode_frame(wire.encode_chunk(c)))
    trailer = wire.decode_frame(wire.encode_trailer(wire.make_trailer(header, running.digest(offset), b"k")))
    wire.verify_trailer(header, trailer, b"k")
    assert trailer.payload_digest == wire.payload_digest(pieces, layout.payload_bytes)
    return layout, asm.finish(trailer.payload_digest)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_roundtrip_is_exact_for_every_dtype_and_chunk_size(chunk_bytes):
    snap = _snapshot()
    layout, out = _roundtrip(snap, chunk_bytes=chunk_bytes)
    assert list(out) == list(snap)
    for k, v in snap.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        assert torch.equal(out[k], v), k
    assert all(e.offset % wire.ALIGN == 0 for e in layout.entries)


def test_pack_matches_chunked_stream_and_unpack_views_without_copy():
    snap = _snapshot()
    layout = wire.layout_of(snap)
    flat = wire.pack(snap, layout)
    stream = b"".join(bytes(c) for c in wire.iter_payload(wire.tensor_views(snap, layout), layout.payload_bytes, 10))
    assert bytes(flat.numpy()) == stream
    out = wire.unpack(flat, layout)
    assert out["conv.weight"].data_ptr() == flat.data_ptr() + layout.entries[0].offset


@pytest.mark.parametrize("compress,dtype,tol", [("fp16", torch.float16, 1e-2), ("bf16", torch.bfloat16, 5e-2)])
def test_compression_casts_floats_only_and_back(compress, dtype, tol):
    snap = _snapshot()
    layout, out = _roundtrip(snap, compress)
    wires = {e.name: e.wire_dtype for e in layout.entries}
    assert wires["conv.weight"] == wire.dtype_name(dtype)
    assert wires["bn.num_batches_tracked"] == "int64" and wires["half"] == "float16"
    assert layout.payload_bytes < wire.layout_of(snap).payload_bytes
    for k, v in snap.items():
        assert out[k].dtype == v.dtype
        if v.is_floating_point():
            torch.testing.assert_close(out[k].float(), v.float(), atol=tol, rtol=tol)
        else:
            assert torch.equal(out[k], v)


def test_fp16_keeps_tensors_it_cannot_hold_exact():
    snap = {"big": torch.tensor([1e6, -3.0]), "small": torch.tensor([1.0, 2.0])}
    layout, out = _roundtrip(snap, "fp16")
    assert [e.wire_dtype for e in layout.entries] == ["float32", "float16"]
    assert torch.equal(out["big"], snap["big"])
    fixed = wire.layout_of(snap, "fp16", adaptive=False)
    assert [e.wire_dtype for e in fixed.entries] == ["float16", "float16"]


def test_fingerprint_depends_on_architecture_not_values_or_compression():
    a = _snapshot()
    b = {k: v + 1 if v.is_floating_point() else v.clone() for k, v in a.items()}
    assert wire.layout_of(a).fingerprint == wire.layout_of(b).fingerprint == wire.layout_of(a, "bf16").fingerprint
    c = dict(a, **{"conv.weight": torch.zeros(4, 3, 3, 2)})
    assert wire.layout_of(c).fingerprint != wire.layout_of(a).fingerprint


def test_bad_snapshots_are_refused_by_layout_of():
    with pytest.raises(ValueError, match="not a tensor"):
        wire.layout_of({"x": [1, 2]})
    with pytest.raises(ValueError, match="cannot be sent"):
        wire.layout_of({"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="compress"):
        wire.layout_of({"x": torch.zeros(2)}, "int8")
    with pytest.raises(ValueError, match="chunk_bytes"):
        list(wire.iter_payload([], 0, 0))


# ------------------------------------------------------------------------------------------------ headers
def _header(snap, **changes):
    layout = wire.layout_of(snap)
    h = wire.make_header(1, 0, layout)
    for k, v in changes.items():
        setattr(h, k, v)
    return h


def test_header_inconsistencies_are_refused():
    snap = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    mine = wire.layout_of(snap)
    assert wire.check_header(_header(snap), mine, 1 << 20) == mine

    cases = []
    h = _header(snap, payload_bytes=mine.payload_bytes + 8)
    cases.append((h, "manifest adds up"))
    h = _header(snap)
    h.tensors[0].shape[:] = [4, 3]
    cases.append((h, "fingerprint"))
    h = _header(snap)
    h.tensors[1].offset += 8
    cases.append((h, "offset"))
    h = _header(snap)
    h.tensors[0].dtype = "complex64"
    cases.append((h, "unsupported dtype"))
    h = _header(snap)
    h.tensors[1].wire_dtype = "float64"
    cases.append((h, "cannot carry"))
    h = _header(snap)
    h.tensors[1].name = "w"
    cases.append((h, "twice"))
    h = _header(snap)
    h.tensors[0].shape[:] = [-3, -4]
    cases.append((h, "negative"))
    for h, reason in cases:
        with pytest.raises(wire.WireError, match=reason):
            wire.check_header(h, mine, 1 << 20)
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.check_header(_header(snap), mine, 10)


@pytest.mark.parametrize("theirs,reason", [
    ({"w": torch.zeros(4, 3), "b": torch.zeros(4)}, "shape"),
    ({"w": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(4)}, "dtype"),
    ({"w": torch.zeros(3, 4)}, "missing tensor 'b'"),
    ({"w": torch.zeros(3, 4), "b": torch.zeros(4), "x": torch.zeros(1)}, "unexpected tensor 'x'"),
    ({"b": torch.zeros(4), "w": torch.zeros(3, 4)}, "order"),
])
def test_other_architectures_are_refused(theirs, reason):
    mine = wire.layout_of({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
    with pytest.raises(wire.WireError, match=reason):
        wire.check_header(_header(theirs), mine, 1 << 20)


def _digest(data: bytes, hash: str = wire.PAYLOAD_HASH) -> bytes:
    return wire.payload_digest([(0, memoryview(data))], len(data), hash)


def test_assembler_refuses_long_short_wrong_hash_and_nan():
    snap = {"w": torch.ones(16)}
    layout = wire.layout_of(snap)
    good = bytes(wire.pack(snap, layout).numpy())
    digest = _digest(good)

    asm = wire.Assembler(layout)
    asm.add(good)
    with pytest.raises(wire.WireError, match="longer"):
        asm.add(b"x")

    asm = wire.Assembler(layout)
    asm.add(good[:-4])
    with pytest.raises(wire.WireError, match="shorter"):
        asm.finish(digest)

    asm = wire.Assembler(layout)
    asm.add(good[:-1] + b"\x00")
    with pytest.raises(wire.WireError, match="digest does not match"):
        asm.finish(digest)

    asm = wire.Assembler(layout)  # the right bytes, hashed with another algorithm than the header names
    asm.add(good)
    with pytest.raises(wire.WireError, match="digest does not match"):
        asm.finish(_digest(good, "sha256"))

    bad = {"w": torch.ones(16)}
    bad["w"][3] = float("nan")
    asm = wire.Assembler(layout)
    with pytest.raises(wire.WireError, match="non-finite"):  # found in place, as the chunk arrives
        asm.add(bytes(wire.pack(bad, layout).numpy()))


def test_assembler_checks_values_in_place_chunk_by_chunk_whatever_the_cut():
    """A NaN is found in the chunk that completes it, even when chunks cut values in half; and not before."""
    snap = {"a": torch.ones(5, dtype=torch.float64), "h": torch.ones(7).half(), "b": torch.ones(9)}
    snap["b"][8] = float("inf")
    layout = wire.layout_of(snap)
    data = bytes(wire.pack(snap, layout).numpy())
    bad_end = layout.entries[2].offset + layout.entries[2].nbytes
    for cut in (1, 3, 5, 8):
        asm = wire.Assembler(layout)
        with pytest.raises(wire.WireError, match="'b' has non-finite"):
            for i in range(0, len(data), cut):
                asm.add(data[i:i + cut])
        assert bad_end - 8 < asm.received <= bad_end + cut  # refused as soon as the bad value was whole


def test_assembler_fills_a_given_buffer_and_refuses_a_wrong_one():
    layout = wire.layout_of({"w": torch.ones(4)})
    buf = torch.empty(16, dtype=torch.uint8)
    asm = wire.Assembler(layout, buf)
    asm.add(bytes(wire.pack({"w": torch.ones(4)}, layout).numpy()))
    out = asm.finish(_digest(bytes(buf.numpy())))
    assert out["w"].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # a view, not a copy
    with pytest.raises(ValueError, match="16 elements"):
        wire.Assembler(layout, torch.empty(8, dtype=torch.uint8))


def test_buffer_pool_reuses_a_buffer_only_when_no_tensor_refers_to_it():
    pool = wire.BufferPool(2)
    a = pool.get(64)
    view = a[8:16].view(torch.float32)  # a snapshot's tensor viewed out of the buffer
    ptr = a.data_ptr()
    del a
    b = pool.get(64)
    assert b.data_ptr() != ptr  # the first buffer is still in use through the view
    del view
    c = pool.get(64)
    assert c.data_ptr() == ptr  # now it is free: reused
    d = pool.get(64)  # both pooled buffers busy, capacity reached: a fresh, unpooled one
    assert d.data_ptr() not in (ptr, b.data_ptr()) and pool.nbytes == 128
    del b, c, d
    e = pool.get(32)  # another size: a free buffer of the old size makes room
    assert e.numel() == 32 and pool.nbytes <= 128


@pytest.mark.parametrize("name", ["blake3", "sha256"])
def test_stream_hash_is_taken_once_by_whichever_stream_leads(name):
    import hashlib

    import blake3

    data = bytes(range(256)) * 10
    h = wire.StreamHash(name)
    chunks = [(i, data[i:i + 100]) for i in range(0, len(data), 100)]
    for off, c in chunks[:5]:  # stream A gets halfway, then stops (cancelled)
        h.update(off, c)
    for off, c in chunks:  # stream B, from the start: skips what A hashed, takes over at A's position
        h.update(off, c)
    reference = {"blake3": blake3.blake3, "sha256": hashlib.sha256}[name]
    assert h.digest(len(data)) == reference(data).digest()
    with pytest.raises(RuntimeError, match="hashed"):
        wire.StreamHash().digest(10)


# ------------------------------------------------------------------------------------------------- auth
def test_hmac_verifies_and_refuses_wrong_secret_tampering_replay_and_stale_stamps():
    snap = {"w": torch.ones(4)}
    layout = wire.layout_of(snap)
    h = wire.make_header(1, 2, layout, b"right", receiver=0)
    v = wire.Verifier(b"right", max_skew_s=60)
    v.verify(wire.header_auth_fields(h), h.auth)
    with pytest.raises(wire.AuthError, match="replayed"):
        v.verify(wire.header_auth_fields(h), h.auth)

    wrong = wire.make_header(1, 2, layout, b"wrong", receiver=0)
    with pytest.raises(wire.AuthError, match="wrong shared secret"):
        v.verify(wire.header_auth_fields(wrong), wrong.auth)

    for field, value in (("round", 3), ("receiver", 5), ("sender", 4)):
        tampered = wire.make_header(1, 2, layout, b"right", receiver=0)
        setattr(tampered, field, value)
        with pytest.raises(wire.AuthError, match="HMAC"):
            v.verify(wire.header_auth_fields(tampered), tampered.auth)

    old = wire.make_header(1, 2, layout, b"right", receiver=0, now=time.time() - 3600)
    with pytest.raises(wire.AuthError, match="timestamp"):
        v.verify(wire.header_auth_fields(old), old.auth)

    with pytest.raises(wire.AuthError, match="missing"):
        v.verify(wire.header_auth_fields(h), None)
    with pytest.raises(wire.AuthError, match="missing"):
        v.verify(wire.header_auth_fields(h), pb.Auth())


def test_per_agent_keys_bind_the_signature_to_the_claimed_sender():
    from dimat.transport.identity import derive

    master = b"m" * 32
    me, three = derive(master, 0, range(4)), derive(master, 3, range(4))
    v = wire.Verifier(me.key_for)
    layout = wire.layout_of({"w": torch.ones(4)})
    honest = wire.make_header(3, 0, layout, three.key_for(0), receiver=0)
    v.verify(wire.header_auth_fields(honest), honest.auth, sender=3)
    forged = wire.make_header(2, 0, layout, three.key_for(0), receiver=0)  # 3's key, claiming to be 2
    with pytest.raises(wire.AuthError, match="agent 2's key.*impersonation"):
        v.verify(wire.header_auth_fields(forged), forged.auth, sender=2)
    # 3's key with agent 2 does not help either: it is the key of the pair (2, 3), not (2, 0)
    forged = wire.make_header(2, 0, layout, three.key_for(2), receiver=0)
    with pytest.raises(wire.AuthError, match="impersonation"):
        v.verify(wire.header_auth_fields(forged), forged.auth, sender=2)
    with pytest.raises(wire.AuthError, match="no key for agent 9"):
        v.verify(wire.header_auth_fields(honest), honest.auth, sender=9)


def test_trailer_is_chained_to_its_header():
    layout = wire.layout_of({"w": torch.ones(4)})
    h1 = wire.make_header(1, 0, layout, b"k", receiver=0)
    h2 = wire.make_header(1, 0, layout, b"k", receiver=0)
    t = wire.make_trailer(h1, bytes(32), b"k")
    wire.verify_trailer(h1, t, b"k")
    with pytest.raises(wire.AuthError, match="trailer"):
        wire.verify_trailer(h2, t, b"k")  # moved onto another stream
    with pytest.raises(wire.AuthError, match="trailer"):
        wire.verify_trailer(h1, wire.make_trailer(h1, bytes(32), b"other"), b"k")
    with pytest.raises(wire.WireError, match="5 bytes, not 32"):
        wire.verify_trailer(h1, wire.make_trailer(h1, b"short", b"k"), b"k")
    wire.verify_trailer(h1, wire.make_trailer(h1, bytes(32)), None)  # no key: only the digest's form


# ------------------------------------------------------------------------------------------- payload hash
def test_the_header_names_the_payload_hash_and_signs_it():
    layout = wire.layout_of({"w": torch.ones(4)})
    h = wire.make_header(1, 0, layout, b"k", receiver=0)
    assert h.payload_hash == wire.PAYLOAD_HASH == "blake3"
    v = wire.Verifier(b"k")
    v.verify(wire.header_auth_fields(h), h.auth, sender=1)
    h.payload_hash = "sha256"  # changed in transit: the HMAC no longer matches
    with pytest.raises(wire.AuthError, match="HMAC mismatch"):
        v.verify(wire.header_auth_fields(h), h.auth, sender=1)


@pytest.mark.parametrize("name", ["md5", "blake2b", "BLAKE3", "sha256 "])
def test_a_payload_hash_the_receiver_does_not_check_is_refused_before_allocating(name):
    layout = wire.layout_of({"w": torch.ones(4)})
    h = wire.make_header(1, 0, layout, b"k", receiver=0, payload_hash=name)
    with pytest.raises(wire.WireError, match="unsupported payload hash"):
        wire.check_header(h, layout, 1 << 20)
    with pytest.raises(wire.WireError, match="unsupported payload hash"):
        wire.StreamHash(name)


def test_a_stream_from_an_agent_before_the_payload_hash_field_is_checked_with_sha256():
    """Older agents sent no payload_hash and a SHA-256 digest, and signed the header without the field."""
    import hashlib

    snap = {"w": torch.arange(6, dtype=torch.float32)}
    layout = wire.layout_of(snap)
    h = wire.make_header(1, 0, layout, receiver=0, payload_hash="")
    h.auth.CopyFrom(wire.sign(b"k", wire.header_auth_fields(h)))
    assert b"hash=" not in wire.header_auth_fields(h)  # the message older agents signed
    wire.Verifier(b"k").verify(wire.header_auth_fields(h), h.auth, sender=1)
    data = bytes(wire.pack(snap, layout).numpy())
    asm = wire.Assembler(wire.check_header(h, layout, 1 << 20), hash=h.payload_hash)
    asm.add(data)
    trailer = wire.make_trailer(h, hashlib.sha256(data).digest(), b"k")
    wire.verify_trailer(h, trailer, b"k")
    assert torch.equal(asm.finish(trailer.payload_digest)["w"], snap["w"])
    asm = wire.Assembler(layout, hash="")  # and a BLAKE3 digest does not pass as the SHA-256
    asm.add(data)
    with pytest.raises(wire.WireError, match="digest does not match"):
        asm.finish(_digest(data))


# ---------------------------------------------------------------------------------------------- framing
def test_hand_framed_chunks_equal_protobuf_frames_both_ways():
    for n in (0, 1, 127, 128, 300, 1 << 20):
        data = bytes(range(256)) * (n // 256) + bytes(n % 256)
        enc = wire.encode_chunk(memoryview(data))
        assert enc == pb.Frame(chunk=data).SerializeToString()
        assert bytes(wire.decode_frame(pb.Frame(chunk=data).SerializeToString())) == data
    h = _header({"w": torch.ones(2)})
    assert wire.decode_frame(wire.encode_header(h)) == h
    with pytest.raises(wire.WireError, match="empty frame"):
        wire.decode_frame(b"")
    with pytest.raises(wire.WireError, match="undecodable"):
        wire.decode_frame(b"\x0a\xff\xff")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_finds_one_bad_value_in_every_float_dtype(dtype, bad):
    t = torch.ones(1000, dtype=dtype)
    t[617] = bad
    with pytest.raises(wire.WireError, match="'x' has non-finite"):
        wire.check_finite({"ok": torch.ones(3), "x": t})


def test_check_finite_accepts_large_values_whose_sum_overflows():
    wire.check_finite({"f32": torch.full((10,), 3e38), "f16": torch.full((10,), 60000.0).half(),
                       "ints": torch.tensor([2 ** 62, 2 ** 62])})


def _ranges(total, step):
    return [(a, min(a + step, total)) for a in range(0, total, step)]


@pytest.mark.parametrize("compress", [None, "fp16", "bf16"])
@pytest.mark.parametrize("step", [8, 24, 64, 1 << 20])
def test_pack_range_piece_by_piece_equals_pack(compress, step):
    snap = _snapshot()
    layout = wire.layout_of(snap, compress)
    whole = wire.pack(snap, layout)
    pieces = torch.zeros(layout.payload_bytes, dtype=torch.uint8)  # padding: zero, as in a buffer pack makes
    flat = {}
    for start, end in _ranges(layout.payload_bytes, step):
        wire.pack_range(snap, layout, pieces, start, end, flat)
    assert torch.equal(pieces, whole)
    assert flat["fc.weight"].is_contiguous()  # the non-contiguous tensor was flattened once, then reused


def test_pack_range_writes_only_its_range_and_refuses_cut_items():
    snap = {"a": torch.arange(8, dtype=torch.float64), "b": torch.arange(4, dtype=torch.float32)}
    layout = wire.layout_of(snap)
    out = torch.zeros(layout.payload_bytes, dtype=torch.uint8)
    wire.pack_range(snap, layout, out, 16, 40)
    got = out[:64].view(torch.float64)
    assert got.tolist() == [0, 0, 2, 3, 4, 0, 0, 0]
    with pytest.raises(ValueError, match="8-byte boundaries"):
        wire.pack_range(snap, layout, out, 4, 16)
    with pytest.raises(ValueError, match="8-byte boundaries"):
        wire.pack_range(snap, layout, out, 0, 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_check_finite_range_finds_a_bad_value_only_in_the_range_holding_it(dtype):
    snap = {"ints": torch.arange(6), "ok": torch.ones(50, dtype=dtype), "x": torch.ones(1000, dtype=dtype)}
    snap["x"][617] = float("nan")
    layout = wire.layout_of(snap)
    payload = wire.pack(snap, layout)
    x = next(e for e in layout.entries if e.name == "x")
    bad_byte = x.offset + 617 * snap["x"].element_size()
    step = 64
    flagged = []
    for start, end in _ranges(layout.payload_bytes, step):
        try:
            wire.check_finite_range(payload, layout, start, end)
        except wire.WireError as e:
            assert "'x' has non-finite" in str(e)
            flagged.append(start)
    assert flagged == [bad_byte // step * step]
    wire.check_finite_range(payload, layout, 0, x.offset)  # everything before x is finite


def test_check_finite_range_accepts_large_values_whose_sum_overflows():
    snap = {"f32": torch.full((10,), 3e38), "f64": torch.full((4,), 1.7e308, dtype=torch.float64),
            "f16": torch.full((6,), torch.finfo(torch.float16).max, dtype=torch.float16),
            "bf16": torch.full((6,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16),
            "tiny": torch.full((3,), torch.finfo(torch.float16).tiny / 4, dtype=torch.float16)}  # subnormal
    layout = wire.layout_of(snap)
    wire.check_finite_range(wire.pack(snap, layout), layout, 0, layout.payload_bytes)


def test_entries_in_gives_the_tensors_a_byte_range_touches():
    snap = {"a": torch.zeros(3), "empty": torch.zeros(0), "b": torch.zeros(2, dtype=torch.float64),
            "c": torch.zeros(5, dtype=torch.int8)}
    layout = wire.layout_of(snap)
    offsets = {e.name: (e.offset, e.offset + e.nbytes) for e in layout.entries}

    def names(start, end):
        return [e.name for e in layout.entries_in(start, end)]

    assert names(0, layout.payload_bytes) == ["a", "b", "c"]
    assert names(0, 1) == ["a"]
    assert names(offsets["a"][1] - 1, offsets["b"][0] + 1) == ["a", "b"]
    assert names(offsets["b"][0], offsets["b"][1]) == ["b"]
    assert names(offsets["c"][0], layout.payload_bytes) == ["c"]
    assert names(layout.payload_bytes, layout.payload_bytes + 8) == []


# ------------------------------------------------------------------------------------------ views for sends
def test_range_view_is_the_tensors_own_memory_only_inside_one_tensor_sent_as_it_is():
    snap = {"a": torch.arange(10, dtype=torch.float32), "b": torch.arange(6, dtype=torch.float64),
            "t": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), "z": torch.zeros(0)}
    layout = wire.layout_of(snap)
    a, b, t = layout.entries[:3]
    v = wire.range_view(snap, layout, 8, 24)  # floats 2..5 of "a"
    assert v is not None and v.dtype == torch.uint8 and v.numel() == 16
    assert v.data_ptr() == snap["a"].data_ptr() + 8  # no copy
    assert bytes(v.numpy()) == bytes(wire.pack(snap, layout)[8:24].numpy())
    assert wire.range_view(snap, layout, b.offset, b.offset + b.nbytes) is not None  # all of "b"
    assert wire.range_view(snap, layout, 32, b.offset + 8) is None  # over a's end, the padding and b
    assert wire.range_view(snap, layout, t.offset, t.offset + 8) is None  # not contiguous: pack it
    assert wire.range_view(snap, layout, 8, 8) is None
    assert wire.range_view(snap, layout, layout.payload_bytes, layout.payload_bytes + 8) is None
    half = wire.layout_of(snap, "fp16")
    assert wire.range_view(snap, half, 0, 8) is None  # cast on the wire: pack it
