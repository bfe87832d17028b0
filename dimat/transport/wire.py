"""The snapshot wire format: manifest, fingerprint, payload layout, authentication, chunk framing and validation.

Pure functions and small records shared by the gRPC transport (which streams the payload in chunks) and the
torch.distributed transport (which sends it as one flat buffer). Nothing here opens a socket.

A snapshot (a ``state_dict``) becomes

* a **manifest**: one :class:`Entry` per tensor in state_dict order (name, dtype, shape, wire dtype, byte offset
  and byte count in the payload);
* a **payload**: the tensors' raw bytes laid end to end, each starting at a multiple of :data:`ALIGN` bytes
  (zero padding between them), optionally cast to float16/bfloat16 on the wire (``compress``);
* a **fingerprint**: SHA-256 over the ordered ``(name, dtype, shape)`` triples, i.e. the architecture;
* a **digest** of the payload (BLAKE3, :data:`PAYLOAD_HASH`), which travels after it in a signed trailer.

The receiver checks the declared manifest against its own model's manifest and recomputes the layout from it
*before* allocating anything (:func:`check_header`), writes the chunks into one preallocated buffer
(:class:`Assembler`), checks the exact byte count and the hash, views the tensors out of that buffer without
copying (:func:`unpack`) and refuses non-finite values (:func:`check_finite`). Every refusal raises
:class:`WireError` whose message is the logged reason.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import hmac
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import blake3
import numpy as np
import torch

from dimat.transport._proto import dimat_pb2 as pb

#: Every tensor starts at a multiple of this many payload bytes, so that it can be viewed in place as any dtype.
ALIGN = 8

#: dtypes a snapshot may hold, by their wire name (torch's name without the ``torch.`` prefix).
DTYPES: Dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}

#: Values of ``compress`` (None: full precision) -> wire dtype of floating tensors.
COMPRESS = {None: None, "none": None, "fp16": torch.float16, "bf16": torch.bfloat16}

_FP16_MAX = float(torch.finfo(torch.float16).max)

#: The payload digest a sender takes (named in the signed header, ``payload_hash``). BLAKE3: a cryptographic hash
#: like SHA-256, about 2.6x faster on one core of the development machine (400 MiB in 0.089 s against 0.234 s for
#: OpenSSL's SHA-256 with the SHA extensions); with SHA-256 the hash was 40-50 % of each side's CPU per snapshot.
PAYLOAD_HASH = "blake3"

#: Payload hashes a receiver accepts, by name -> a new hasher. ``""`` is what agents older than the header's
#: ``payload_hash`` field sent: SHA-256. Each gives a 32-byte digest. (blake3's ``update`` releases the GIL for
#: large inputs, as hashlib's does.)
PAYLOAD_HASHES: Dict[str, Callable[[], object]] = {
    "blake3": blake3.blake3,
    "sha256": hashlib.sha256,
    "": hashlib.sha256,
}


def payload_hasher(name: str = PAYLOAD_HASH):
    """A new hasher for the payload hash ``name`` (a key of :data:`PAYLOAD_HASHES`); WireError for others."""
    try:
        return PAYLOAD_HASHES[name]()
    except KeyError:
        raise WireError(f"unsupported payload hash {name!r} (accepted: "
                        f"{', '.join(n for n in PAYLOAD_HASHES if n)})") from None


class WireError(ValueError):
    """A snapshot (or its header) was refused; the message is the reason that gets logged."""


class AuthError(WireError):
    """Wrong or missing shared secret, replayed nonce or stale timestamp."""


# ------------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Entry:
    """One tensor of a snapshot and where its bytes lie in the payload.

    Attributes
    ----------
    name : state_dict key.
    dtype : dtype name in the model (a key of :data:`DTYPES`).
    shape : tensor shape.
    wire_dtype : dtype name of the bytes on the wire (differs from ``dtype`` only when compressed).
    offset : first payload byte of this tensor.
    nbytes : payload bytes of this tensor (numel times the wire dtype's item size).
    """

    name: str
    dtype: str
    shape: Tuple[int, ...]
    wire_dtype: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Layout:
    """A snapshot's manifest and payload size: everything needed to pack or unpack its payload."""

    entries: Tuple[Entry, ...]
    payload_bytes: int

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 over the ordered ``(name, dtype, shape)`` triples (independent of compression)."""
        return fingerprint(self.entries)

    @functools.cached_property
    def _ends(self) -> List[int]:
        return [e.offset + e.nbytes for e in self.entries]

    def entries_in(self, start: int, end: int) -> Iterator[Entry]:
        """The entries with payload bytes in ``start`` to ``end``, in order (a bisection, not a scan)."""
        for i in range(bisect.bisect_right(self._ends, start), len(self.entries)):
            e = self.entries[i]
            if e.offset >= end:
                return
            if e.nbytes:
                yield e

    @property
    def full_bytes(self) -> int:
        """Payload bytes of this manifest without compression (the receiver's bound on a declared size)."""
        return lay_out([(e.name, e.dtype, e.shape, e.dtype) for e in self.entries]).payload_bytes


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; ValueError for dtypes a snapshot cannot carry (complex, quantized...)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent; supported: {', '.join(DTYPES)}") from None


def itemsize(name: str) -> int:
    return torch.empty((), dtype=DTYPES[name]).element_size()


def lay_out(specs: Sequence[Tuple[str, str, Sequence[int], str]]) -> Layout:
    """The layout of tensors given as ``(name, dtype, shape, wire_dtype)``: aligned offsets, end to end."""
    entries: List[Entry] = []
    pos = 0
    for name, dtype, shape, wire in specs:
        shape = tuple(int(s) for s in shape)
        numel = 1
        for s in shape:
            numel *= s
        pos = _align(pos)
        nbytes = numel * itemsize(wire)
        entries.append(Entry(name, dtype, shape, wire, pos, nbytes))
        pos += nbytes
    return Layout(tuple(entries), pos)


def _wire_dtype(t: torch.Tensor, compress: Optional[torch.dtype], adaptive: bool) -> torch.dtype:
    """float32/float64 tensors go as ``compress``; with ``adaptive``, a tensor that float16 cannot hold
    (|x| > 65504) stays exact rather than arriving as infinities."""
    if compress is None or t.dtype not in (torch.float32, torch.float64):
        return t.dtype
    if adaptive and compress == torch.float16 and t.numel() and float(t.detach().abs().max()) > _FP16_MAX:
        return t.dtype
    return compress


def layout_of(snapshot: Mapping[str, torch.Tensor], compress: Optional[str] = None,
              adaptive: bool = True) -> Layout:
    """The layout of a snapshot; ``compress`` is None, ``"fp16"`` or ``"bf16"``.

    ``adaptive=False`` makes the layout depend on names, dtypes and shapes only (not on values), for transports
    whose receivers size their buffers in advance.

    Raises
    ------
    ValueError : a value that is not a tensor, an unsupported dtype or compression.
    """
    if compress not in COMPRESS:
        raise ValueError(f"compress must be one of None, 'fp16', 'bf16', got {compress!r}")
    wire = COMPRESS[compress]
    specs = []
    for name, t in snapshot.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"snapshot entry {name!r} is a {type(t).__name__}, not a tensor")
        specs.append((name, dtype_name(t.dtype), tuple(t.shape), dtype_name(_wire_dtype(t, wire, adaptive))))
    return lay_out(specs)


def fingerprint(entries: Sequence[Entry]) -> bytes:
    """SHA-256 over the ordered ``(name, dtype, shape)`` triples of a manifest: the architecture's identity."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.name}\0{e.dtype}\0{','.join(map(str, e.shape))}\n".encode())
    return h.digest()


# ------------------------------------------------------------------------------------------- pack / unpack
def tensor_views(snapshot: Mapping[str, torch.Tensor], layout: Layout) -> List[Tuple[int, memoryview]]:
    """``(offset, bytes)`` of each tensor as it goes on the wire, without copying where it can.

    A contiguous CPU tensor whose wire dtype is its own dtype is viewed in place; any other (compressed,
    non-contiguous, on an accelerator) is converted into a new CPU tensor first.
    """
    out = []
    for e in layout.entries:
        t = snapshot[e.name].detach()
        wire = DTYPES[e.wire_dtype]
        if t.device.type != "cpu" or t.dtype != wire or not t.is_contiguous():
            t = t.to(device="cpu", dtype=wire).contiguous()
        out.append((e.offset, _bytes_of(t)))
    return out


def _bytes_of(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    # A uint8 view of the same storage: numpy cannot represent bfloat16, bytes are bytes.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def iter_payload(pieces: Sequence[Tuple[int, memoryview]], payload_bytes: int,
                 chunk_bytes: int) -> Iterator[memoryview]:
    """The payload as consecutive chunks of ``chunk_bytes`` (the last may be shorter), padding included.

    Pieces larger than a chunk are sliced without copying; small neighbouring tensors are joined into one chunk.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    buf = bytearray()
    for mv in _with_padding(pieces, payload_bytes):
        i, n = 0, len(mv)
        while i < n:
            if not buf and n - i >= chunk_bytes:
                yield mv[i:i + chunk_bytes]
                i += chunk_bytes
                continue
            take = min(chunk_bytes - len(buf), n - i)
            buf += mv[i:i + take]
            i += take
            if len(buf) == chunk_bytes:
                yield memoryview(bytes(buf))
                buf = bytearray()
    if buf:
        yield memoryview(bytes(buf))


def _with_padding(pieces: Sequence[Tuple[int, memoryview]], payload_bytes: int) -> Iterator[memoryview]:
    pos = 0
    for offset, mv in pieces:
        if offset > pos:
            yield memoryview(bytes(offset - pos))
        yield mv
        pos = offset + len(mv)
    if payload_bytes > pos:
        yield memoryview(bytes(payload_bytes - pos))


def payload_digest(pieces: Sequence[Tuple[int, memoryview]], payload_bytes: int, hash: str = PAYLOAD_HASH) -> bytes:
    """The digest (``hash``: a key of :data:`PAYLOAD_HASHES`) of the payload that :func:`iter_payload` yields
    (padding included), computed without joining it."""
    h = payload_hasher(hash)
    for mv in _with_padding(pieces, payload_bytes):
        h.update(mv)
    return h.digest()


class StreamHash:
    """The digest of one payload, taken as its chunks go out and shared by every stream that sends it.

    Streams to several neighbours (and retries) send the same chunks in the same order; whichever stream is
    furthest ahead hashes a chunk, the others skip it, so the payload is hashed once however many receivers it
    has, and no stream waits for the hash before its first byte. A stream that reaches the end has passed every
    offset, so the hash is complete by then (:meth:`digest`).
    """

    def __init__(self, hash: str = PAYLOAD_HASH) -> None:
        self.name = hash  # the header's payload_hash
        self._hash = payload_hasher(hash)
        self.position = 0  # payload bytes hashed so far
        self._lock = threading.Lock()

    def update(self, offset: int, chunk: Union[bytes, memoryview]) -> None:
        """Hash ``chunk`` (payload bytes from ``offset``) if it is the next one not hashed yet."""
        if offset != self.position:
            return
        with self._lock:
            if offset == self.position:
                self._hash.update(chunk)
                self.position += len(chunk)

    def digest(self, payload_bytes: int) -> bytes:
        """The digest, once all ``payload_bytes`` went through :meth:`update`."""
        with self._lock:
            if self.position != payload_bytes:
                raise RuntimeError(f"hashed {self.position} of {payload_bytes} payload bytes")
            return self._hash.copy().digest()


def pack(snapshot: Mapping[str, torch.Tensor], layout: Layout,
         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The payload as one flat uint8 tensor (``out`` is reused when given: same size, uint8, any device)."""
    if out is None:
        out = torch.zeros(layout.payload_bytes, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.numel() != layout.payload_bytes:
        raise ValueError(f"out must be uint8 with {layout.payload_bytes} elements, got {out.dtype} {out.numel()}")
    for e in layout.entries:
        if e.nbytes:
            _view(out, e).copy_(snapshot[e.name].detach())
    return out


def pack_range(snapshot: Mapping[str, torch.Tensor], layout: Layout, out: torch.Tensor, start: int, end: int,
               flat: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write payload bytes ``start`` to ``end`` into ``out`` (the whole payload buffer), as :func:`pack` would.

    ``start`` and ``end`` must fall on item boundaries of the tensors they cut (any multiple of 8 does). ``flat``
    caches each tensor's flattened form between calls, so that packing a non-contiguous tensor segment by
    segment flattens it once; pass the same dict for every range of one snapshot.
    """
    if start % ALIGN or (end % ALIGN and end != layout.payload_bytes):
        raise ValueError(f"range {start}..{end} is not on {ALIGN}-byte boundaries")
    flat = {} if flat is None else flat
    for e in layout.entries_in(start, end):
        lo, hi = max(start, e.offset), min(end, e.offset + e.nbytes)
        if e.name not in flat:
            flat[e.name] = snapshot[e.name].detach().reshape(-1)
        src, wire = flat[e.name], DTYPES[e.wire_dtype]
        if src.device.type == "cpu" and out.device.type == "cpu" and src.dtype == wire:
            # numpy copies on the calling thread; a torch copy of one segment would wake the intra-op thread
            # pool, whose spinning threads then compete with the transport's own I/O threads for the cores.
            np.copyto(out[lo:hi].numpy(), src.view(torch.uint8)[lo - e.offset:hi - e.offset].numpy())
        else:  # a cast (compression) or another device: torch (numpy casts float32 to float16 ~10x slower)
            size = itemsize(e.wire_dtype)
            out.narrow(0, lo, hi - lo).view(wire).copy_(src[(lo - e.offset) // size:(hi - e.offset) // size])


def range_view(snapshot: Mapping[str, torch.Tensor], layout: Layout, start: int,
               end: int) -> Optional[torch.Tensor]:
    """Payload bytes ``start`` to ``end`` as a flat uint8 view of the tensor that holds them (no copy), or None.

    A view exists when the range lies inside one tensor's bytes and that tensor goes on the wire as it is in
    memory: a contiguous CPU tensor in its own dtype (not compressed). Otherwise (a range over two tensors or
    padding, a cast, another device, a non-contiguous tensor) pack it with :func:`pack_range`. A transport that
    sends such a view reads the model's memory until the send completes.
    """
    if start >= end:
        return None
    i = bisect.bisect_right(layout._ends, start)
    if i >= len(layout.entries):
        return None
    e = layout.entries[i]
    if not (e.offset <= start and end <= e.offset + e.nbytes):
        return None
    t = snapshot[e.name].detach()
    if t.device.type != "cpu" or t.dtype != DTYPES[e.wire_dtype] or not t.is_contiguous():
        return None
    return t.reshape(-1).view(torch.uint8)[start - e.offset:end - e.offset]


def _view(buffer: torch.Tensor, e: Entry) -> torch.Tensor:
    return buffer.narrow(0, e.offset, e.nbytes).view(DTYPES[e.wire_dtype]).view(e.shape)


def unpack(buffer: torch.Tensor, layout: Layout) -> Dict[str, torch.Tensor]:
    """Tensors viewed out of a flat uint8 payload; only compressed tensors are copied (cast back to their dtype)."""
    if buffer.numel() != layout.payload_bytes:
        raise WireError(f"payload has {buffer.numel()} bytes, manifest says {layout.payload_bytes}")
    out: Dict[str, torch.Tensor] = {}
    for e in layout.entries:
        if e.nbytes == 0:
            t = torch.empty(e.shape, dtype=DTYPES[e.dtype], device=buffer.device)
        else:
            t = _view(buffer, e)
            if e.wire_dtype != e.dtype:
                t = t.to(DTYPES[e.dtype])
        out[e.name] = t
    return out


def check_finite(snapshot: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`WireError` naming the first floating tensor with a NaN or an infinity."""
    for name, t in snapshot.items():
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            raise WireError(f"tensor {name!r} has non-finite values")


def check_finite_range(payload: torch.Tensor, layout: Layout, start: int, end: int) -> None:
    """:func:`check_finite` over payload bytes ``start`` to ``end`` only (item boundaries, as :func:`pack_range`)
    of a payload in CPU memory.

    Lets a receiver check each part of a payload as it arrives. Compressed tensors are checked in their wire dtype,
    which is finite exactly where the cast back is.
    """
    for e in layout.entries_in(start, end):
        lo, hi = max(start, e.offset), min(end, e.offset + e.nbytes)
        wire = DTYPES[e.wire_dtype]
        if wire.is_floating_point and not _all_finite_np(payload[lo:hi].numpy(), wire):
            raise WireError(f"tensor {e.name!r} has non-finite values")


#: numpy's names for the wider floats (checked on the calling thread: see pack_range for why not torch).
_NUMPY_FLOATS = {torch.float64: np.float64, torch.float32: np.float32}

#: Exponent bits of the 16-bit floats: all ones means an infinity or a NaN.
_EXPONENT_16 = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def _all_finite_np(raw: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether the bytes ``raw`` hold only finite ``dtype`` values, computed by numpy on the calling thread."""
    if dtype in _EXPONENT_16:
        mask = _EXPONENT_16[dtype]
        return not bool(np.any((raw.view(np.uint16) & mask) == mask))
    a = raw.view(_NUMPY_FLOATS[dtype])
    with np.errstate(over="ignore", invalid="ignore"):  # a sum is fast; only one that overflows needs the exact check
        return bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all())


def _all_finite(t: torch.Tensor) -> bool:
    # A NaN or an infinity anywhere makes the sum non-finite, and a sum is ~15x faster than isfinite().all();
    # only a sum that overflows (finite values adding up past the dtype's range) needs the exact check.
    acc = t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()
    return bool(torch.isfinite(acc)) or bool(torch.isfinite(t).all())


# ------------------------------------------------------------------------------------------------- headers
def entries_to_pb(layout: Layout) -> List[pb.TensorEntry]:
    return [pb.TensorEntry(name=e.name, dtype=e.dtype, shape=list(e.shape), wire_dtype=e.wire_dtype,
                           offset=e.offset, nbytes=e.nbytes) for e in layout.entries]


def make_header(sender: int, round: int, layout: Layout, key: Optional[bytes] = None, receiver: int = -1,
                now: Optional[float] = None, payload_hash: str = PAYLOAD_HASH, lane: str = "") -> pb.SnapshotHeader:
    """The first frame of a snapshot stream to ``receiver``; signed with a fresh nonce when ``key`` is given (the
    key of the (sender, receiver) pair, or the cluster's shared secret). The payload's digest is not in it: it
    follows the payload in the trailer (:func:`make_trailer`); the header names its algorithm (``payload_hash``)."""
    h = pb.SnapshotHeader(sender=sender, receiver=receiver, round=round, fingerprint=layout.fingerprint,
                          tensors=entries_to_pb(layout), payload_bytes=layout.payload_bytes,
                          payload_hash=payload_hash, lane=lane)
    if key is not None:
        h.auth.CopyFrom(sign(key, header_auth_fields(h), now=now))
    return h


def header_auth_fields(h: pb.SnapshotHeader) -> bytes:
    """What a snapshot header's HMAC protects: sender, receiver, round, fingerprint, payload size, the manifest,
    the payload hash's name when one is given (a header without it signs what older agents signed), and the lane
    of a message."""
    manifest = hashlib.sha256()
    for e in h.tensors:
        manifest.update(f"{e.name}\0{e.dtype}\0{','.join(map(str, e.shape))}\0{e.wire_dtype}\0"
                        f"{e.offset}\0{e.nbytes}\n".encode())
    fields = [b"snapshot", str(h.sender).encode(), str(h.receiver).encode(), str(h.round).encode(),
              h.fingerprint.hex().encode(), str(h.payload_bytes).encode(), manifest.hexdigest().encode()]
    if h.payload_hash:
        fields.append(b"hash=" + h.payload_hash.encode())
    if h.lane:  # a message lane's name is signed too (a snapshot's fields are unchanged)
        fields.append(b"lane=" + h.lane.encode())
    return b"|".join(fields)


def _trailer_message(h: pb.SnapshotHeader, digest: bytes) -> bytes:
    # Chained to the header's own HMAC, which covers its nonce: a trailer cannot be moved onto another stream.
    return b"dimat-v1|trailer|" + h.auth.hmac.hex().encode() + b"|" + digest.hex().encode()


def make_trailer(h: pb.SnapshotHeader, digest: bytes, key: Optional[bytes] = None) -> pb.SnapshotTrailer:
    """The last frame of a snapshot stream: the payload's digest, signed (chained to ``h``) when ``key`` is given."""
    t = pb.SnapshotTrailer(payload_digest=digest)
    if key is not None:
        t.hmac = hmac.new(key, _trailer_message(h, digest), hashlib.sha256).digest()
    return t


def verify_trailer(h: pb.SnapshotHeader, t: pb.SnapshotTrailer, key: Optional[bytes]) -> None:
    """Raise :class:`AuthError` unless ``t`` was signed with ``key`` for header ``h`` (no-op when ``key`` is None),
    :class:`WireError` when the digest is not 32 bytes long."""
    if len(t.payload_digest) != 32:
        raise WireError(f"payload digest in the trailer has {len(t.payload_digest)} bytes, not 32")
    if key is None:
        return
    expect = hmac.new(key, _trailer_message(h, t.payload_digest), hashlib.sha256).digest()
    if not hmac.compare_digest(expect, t.hmac):
        raise AuthError("trailer HMAC does not match the header's key")


def status_auth_fields(sender: int, receiver: int = -1) -> bytes:
    return b"|".join([b"status", str(sender).encode(), str(receiver).encode()])


def _auth_message(fields: bytes, timestamp_ms: int, nonce: bytes) -> bytes:
    return b"dimat-v1|" + fields + b"|" + str(timestamp_ms).encode() + b"|" + nonce.hex().encode()


def sign(key: bytes, fields: bytes, now: Optional[float] = None) -> pb.Auth:
    """HMAC-SHA256 over ``fields``, a timestamp and a fresh 16-byte nonce."""
    ts = int((time.time() if now is None else now) * 1000)
    nonce = os.urandom(16)
    mac = hmac.new(key, _auth_message(fields, ts, nonce), hashlib.sha256).digest()
    return pb.Auth(timestamp_ms=ts, nonce=nonce, hmac=mac)


#: Where a :class:`Verifier` gets the key a claimed sender must have signed with: one shared secret (bytes), or
#: a function of the sender's rank (per-agent credentials; it raises :class:`AuthError` for an unknown rank).
KeySource = Union[bytes, Callable[[int], bytes]]


class Verifier:
    """Checks HMACs, refusing replays and stamps outside a clock-skew window.

    Parameters
    ----------
    keys : the shared secret, or ``key_for(sender)`` giving the key of the (sender, me) pair; with per-agent keys
        a header signed by agent 3 that claims to come from agent 2 fails the check, as 3 does not hold 2's key.
    max_skew_s : seconds a stamp may differ from this machine's clock (both ways); nonces are remembered this
        long, so a replay inside the window is refused too.
    """

    def __init__(self, keys: KeySource, max_skew_s: float = 300.0):
        self._key_for: Callable[[int], bytes] = (lambda sender: keys) if isinstance(keys, bytes) else keys
        self.per_agent = not isinstance(keys, bytes)
        self.max_skew_s = max_skew_s
        self._seen: Dict[bytes, float] = {}
        self._lock = threading.Lock()

    def key_for(self, sender: int) -> bytes:
        """The key ``sender`` must sign with (AuthError for a rank without one)."""
        return self._key_for(sender)

    def verify(self, fields: bytes, auth: Optional[pb.Auth], sender: int = -1, now: Optional[float] = None) -> None:
        """Raise :class:`AuthError` unless ``auth`` is a fresh, valid HMAC of ``fields`` by ``sender``'s key."""
        if auth is None or not auth.hmac:
            raise AuthError("missing authentication")
        key = self.key_for(sender)
        expect = hmac.new(key, _auth_message(fields, auth.timestamp_ms, auth.nonce), hashlib.sha256)
        if not hmac.compare_digest(expect.digest(), auth.hmac):
            if self.per_agent:
                raise AuthError(f"HMAC does not match agent {sender}'s key: a wrong key, or another agent "
                                f"posting as {sender} (impersonation)")
            raise AuthError("wrong shared secret (HMAC mismatch)")
        now = time.time() if now is None else now
        if abs(auth.timestamp_ms / 1000.0 - now) > self.max_skew_s:
            raise AuthError(f"timestamp {auth.timestamp_ms} ms is more than {self.max_skew_s} s from this clock")
        if len(auth.nonce) < 8:
            raise AuthError("nonce shorter than 8 bytes")
        with self._lock:
            for n in [n for n, t in self._seen.items() if t < now - self.max_skew_s]:
                del self._seen[n]
            if auth.nonce in self._seen:
                raise AuthError("replayed nonce (a copy of an earlier stream)")
            self._seen[auth.nonce] = now


# -------------------------------------------------------------------------------------------------- checks
def layout_from_header(h: pb.SnapshotHeader) -> Layout:
    """The layout a header declares, after checking that it is self-consistent (no allocation yet).

    Every entry must name a supported dtype and wire dtype, a wire dtype that only narrows a floating dtype,
    non-negative dimensions, and exactly the offset and byte count that :func:`lay_out` gives.
    """
    specs = []
    names = set()
    for e in h.tensors:
        if e.name in names:
            raise WireError(f"manifest names tensor {e.name!r} twice")
        names.add(e.name)
        if e.dtype not in DTYPES or e.wire_dtype not in DTYPES:
            raise WireError(f"tensor {e.name!r}: unsupported dtype {e.dtype!r} / wire dtype {e.wire_dtype!r}")
        if e.wire_dtype != e.dtype and not (e.dtype in ("float32", "float64")
                                            and e.wire_dtype in ("float16", "bfloat16")):
            raise WireError(f"tensor {e.name!r}: wire dtype {e.wire_dtype} cannot carry {e.dtype}")
        if any(s < 0 for s in e.shape):
            raise WireError(f"tensor {e.name!r}: negative dimension in shape {tuple(e.shape)}")
        specs.append((e.name, e.dtype, tuple(e.shape), e.wire_dtype))
    layout = lay_out(specs)
    for got, want in zip(h.tensors, layout.entries):
        if got.offset != want.offset or got.nbytes != want.nbytes:
            raise WireError(f"tensor {got.name!r}: declared offset/nbytes {got.offset}/{got.nbytes}, "
                            f"layout gives {want.offset}/{want.nbytes}")
    if h.payload_bytes != layout.payload_bytes:
        raise WireError(f"declared payload of {h.payload_bytes} bytes, manifest adds up to {layout.payload_bytes}")
    if layout.fingerprint != h.fingerprint:
        raise WireError("declared fingerprint does not match the manifest")
    return layout


def check_against(layout: Layout, expected: Layout) -> None:
    """Raise :class:`WireError` unless ``layout`` describes the same architecture as ``expected`` (my model)."""
    if layout.fingerprint == expected.fingerprint:
        return
    mine = {e.name: e for e in expected.entries}
    theirs = {e.name: e for e in layout.entries}
    for name, e in theirs.items():
        m = mine.get(name)
        if m is None:
            raise WireError(f"unexpected tensor {name!r} (not in my model)")
        if m.shape != e.shape:
            raise WireError(f"tensor {name!r}: shape {e.shape}, my model has {m.shape}")
        if m.dtype != e.dtype:
            raise WireError(f"tensor {name!r}: dtype {e.dtype}, my model has {m.dtype}")
    missing = [n for n in mine if n not in theirs]
    if missing:
        raise WireError(f"missing tensor {missing[0]!r} ({len(missing)} missing)")
    raise WireError("tensors are in a different order than in my model")


def check_header(h: pb.SnapshotHeader, expected: Optional[Layout], max_payload_bytes: int) -> Layout:
    """Everything a receiver checks before allocating: consistency, size bounds, my architecture."""
    if h.payload_bytes > max_payload_bytes:
        raise WireError(f"declared payload of {h.payload_bytes} bytes exceeds the limit of {max_payload_bytes}")
    payload_hasher(h.payload_hash)  # a hash this agent cannot check is refused before anything is allocated
    layout = layout_from_header(h)
    if expected is not None:
        check_against(layout, expected)
    return layout


class Assembler:
    """Receives one payload chunk by chunk into one preallocated buffer, hashing and checking values as it goes.

    Each chunk is copied once, from the transport's message into its place in the buffer (the only copy on the
    receiving side), hashed while it is still in the cache, and every tensor range that is complete is checked
    for non-finite values in place, with numpy on the calling thread. ``finish`` then only compares the digest.

    Parameters
    ----------
    layout : the (checked) layout the header declared.
    buffer : a flat uint8 CPU tensor of ``layout.payload_bytes`` to fill (e.g. from a :class:`BufferPool`);
        default: a new one.
    hash : the payload hash the header names (a key of :data:`PAYLOAD_HASHES`).
    """

    def __init__(self, layout: Layout, buffer: Optional[torch.Tensor] = None, hash: str = PAYLOAD_HASH):
        self.layout = layout
        if buffer is None:
            buffer = torch.empty(layout.payload_bytes, dtype=torch.uint8)
        elif buffer.dtype != torch.uint8 or buffer.numel() != layout.payload_bytes or buffer.device.type != "cpu":
            raise ValueError(f"buffer must be a CPU uint8 tensor of {layout.payload_bytes} elements")
        self.buffer = buffer
        self._np = self.buffer.numpy()
        self._hash = payload_hasher(hash)
        self.received = 0
        self.checked = 0  # payload bytes checked for finite values

    def add(self, chunk: Union[bytes, memoryview]) -> None:
        """Append ``chunk``: WireError when it runs past the declared size or completes a non-finite value."""
        n = len(chunk)
        if self.received + n > self.layout.payload_bytes:
            raise WireError(f"payload longer than the declared {self.layout.payload_bytes} bytes")
        src = np.frombuffer(chunk, dtype=np.uint8)
        self._hash.update(src)
        self._np[self.received:self.received + n] = src
        self.received += n
        upto = self.received if self.received == self.layout.payload_bytes else self.received // ALIGN * ALIGN
        if upto > self.checked:  # any multiple of ALIGN is an item boundary of every tensor
            check_finite_range(self.buffer, self.layout, self.checked, upto)
            self.checked = upto

    def finish(self, digest: bytes) -> Dict[str, torch.Tensor]:
        """The snapshot (views of the buffer), after checking the byte count and the ``digest`` (from the trailer)."""
        if self.received != self.layout.payload_bytes:
            raise WireError(f"payload of {self.received} bytes, shorter than the declared "
                            f"{self.layout.payload_bytes}")
        if not hmac.compare_digest(self._hash.digest(), digest):
            raise WireError("payload digest does not match the trailer")
        return unpack(self.buffer, self.layout)


class BufferPool:
    """Receive buffers reused across snapshots, each handed out again only when no tensor still uses it.

    A fresh buffer costs a page fault per 4 KiB page when first written, which on a virtual machine can take longer
    than receiving the bytes (about 1 s per 400 MiB measured on the 2-core development VM). A buffer is free when
    nothing but the pool refers to its numpy array: the tensors viewed out of it (and any view of those) keep the
    array alive through their storage, so a snapshot still held by anyone, the inbox included, is never
    overwritten.

    Parameters
    ----------
    capacity : buffers kept at most; beyond that, buffers are allocated fresh and not kept.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._arrays: List[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 CPU tensor of ``nbytes`` (contents undefined)."""
        with self._lock:
            stale = None
            for i in range(len(self._arrays)):
                # 2 = the list and getrefcount's own argument: no tensor's storage holds the array any more.
                if sys.getrefcount(self._arrays[i]) == 2:
                    if self._arrays[i].nbytes == nbytes:
                        return torch.from_numpy(self._arrays[i])
                    stale = i
            if stale is not None:
                del self._arrays[stale]  # a free buffer of another size: make room for this size
            arr = np.empty(nbytes, dtype=np.uint8)
            if len(self._arrays) < self.capacity:
                self._arrays.append(arr)
            return torch.from_numpy(arr)

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool (free or in use)."""
        with self._lock:
            return sum(a.nbytes for a in self._arrays)


# ------------------------------------------------------------------------------------------------- framing
# A chunk Frame is field 2 (bytes) of a oneof: tag 0x12, a varint length, the bytes. Encoding and decoding it by
# hand saves two copies of every chunk compared with building protobuf messages; the bytes on the wire are the
# same, so stock protobuf clients and servers interoperate (tests/test_proto.py checks both ways).
_CHUNK_TAG = 0x12


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_chunk(data: Union[bytes, memoryview]) -> bytes:
    """A serialized ``Frame(chunk=data)``."""
    return b"".join((bytes((_CHUNK_TAG,)), _varint(len(data)), data))


def encode_header(h: pb.SnapshotHeader) -> bytes:
    """A serialized ``Frame(header=h)``."""
    return pb.Frame(header=h).SerializeToString()


def encode_trailer(t: pb.SnapshotTrailer) -> bytes:
    """A serialized ``Frame(trailer=t)``."""
    return pb.Frame(trailer=t).SerializeToString()


def decode_frame(raw: bytes) -> Union[memoryview, pb.SnapshotHeader, pb.SnapshotTrailer]:
    """A chunk (a view into ``raw``, not a copy), a header or a trailer; WireError for anything else."""
    if raw and raw[0] == _CHUNK_TAG:
        n, shift, i = 0, 0, 1
        while i < len(raw) and i < 11:
            b = raw[i]
            n |= (b & 0x7F) << shift
            shift += 7
            i += 1
            if not b & 0x80:
                if i + n == len(raw):
                    return memoryview(raw)[i:]
                break
    try:
        frame = pb.Frame.FromString(raw)
    except Exception as e:  # protobuf's DecodeError type differs between implementations
        raise WireError(f"undecodable frame: {e}") from None
    kind = frame.WhichOneof("kind")
    if kind == "chunk":
        return memoryview(frame.chunk)
    if kind == "header":
        return frame.header
    if kind == "trailer":
        return frame.trailer
    raise WireError("empty frame")


__all__ = [
    "ALIGN", "DTYPES", "COMPRESS", "WireError", "AuthError", "Entry", "Layout", "lay_out", "layout_of",
    "fingerprint", "tensor_views", "iter_payload", "payload_digest", "PAYLOAD_HASH", "PAYLOAD_HASHES",
    "payload_hasher", "pack", "pack_range", "range_view", "unpack", "check_finite", "check_finite_range",
    "make_header", "header_auth_fields", "make_trailer", "verify_trailer", "status_auth_fields", "sign", "Verifier",
    "KeySource", "layout_from_header", "check_against", "check_header", "Assembler", "BufferPool", "StreamHash",
    "encode_chunk", "encode_header", "encode_trailer", "decode_frame", "dtype_name",
]
