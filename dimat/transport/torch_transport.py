"""torch.distributed transport: neighbour-only point-to-point exchange over gloo (CPU) or nccl (CUDA).

Every agent is one rank of one process group. ``post(r, snapshot)`` sends the snapshot as one flat uint8 payload
(laid out as :func:`dimat.transport.wire.pack` lays it out), behind a 32-byte prefix carrying the round, the
architecture fingerprint, the payload size and the segment size; each in-neighbour's payload arrives in a buffer
of the same size. Nothing is gathered over ranks that are not neighbours.
Besides snapshots, a round may carry small messages on named lanes (``post_messages`` / ``collect_messages``,
gloo only), each addressed to one neighbour, on tags of their own.

On gloo the prefix goes first, as a message of its own, then the payload in segments of :data:`SEGMENT_BYTES`.
A segment that lies inside one contiguous CPU tensor sent in its own dtype (most of a large model's segments) is
sent straight from the model's memory, without a copy (:func:`dimat.transport.wire.range_view`); the others
(spanning two tensors or padding, compressed, non-contiguous) are packed into the send buffer one at a time, each
sent (``isend``) before the next is packed, so the copies overlap the transfer. ``collect`` receives each segment
into its place and waits for everything, the sends included: **do not modify the snapshot's tensors between
``post(r)`` and ``collect(r)``** (the round loop does not; it trains after merging). The receiver reads a
neighbour's payload size and segment size from its prefix, so a neighbour with another model (another size) is
received and refused instead of breaking the exchange (gloo aborts the process on a message longer than the
buffer posted for it). On nccl (GPU buffers, where packing is cheap and unmatched sends may deadlock)
``collect`` runs one ``batch_isend_irecv`` of whole buffers, and every rank must hold the same architecture.

The exchange is synchronous: every rank must call ``collect(r)`` for the same rounds. A rank that dies or stalls
makes its neighbours' ``collect`` fail once the process group's timeout (``timeout_s``) passes, and the process
group cannot be used after that: **this backend stops on a dead rank**. Use the gRPC transport
(:mod:`dimat.transport.grpc_transport`) when agents may fail; it skips a missing neighbour for the round.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from dimat.transport import wire
from dimat.transport.base import Snapshot, Transport

log = logging.getLogger("dimat.transport")

#: Bytes before the payload in every flat buffer, four int64 fields: the round, the first 8 bytes of the
#: fingerprint, the payload's size and the sender's segment size.
PREFIX_BYTES = 32
#: The prefix bytes that must equal mine: the round and the fingerprint.
_MATCH_BYTES = 16

#: Bytes per gloo message (a multiple of every item size). Smaller segments overlap packing and sending sooner
#: but cost more messages: at 4 MiB a 400 MiB snapshot is 100 messages per neighbour.
SEGMENT_BYTES = 4 << 20

#: Tags of message lanes (post_messages): far above any snapshot segment's tag, so that a neighbour's next
#: snapshot, posted while I still receive its message, can never be matched to a message receive.
MESSAGE_TAG = 1 << 24
#: Largest message header (manifest) and payload accepted on a lane, in bytes; a larger one is drained and refused.
MAX_MESSAGE_HEADER = 4 << 20
MAX_MESSAGE_BYTES = 1 << 30

#: torchrun's environment variables; all four present means "initialise from the environment".
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TorchTransport(Transport):
    """One rank's neighbour exchange over an existing or new torch.distributed process group.

    Parameters
    ----------
    rank : this agent's rank (must equal the process-group rank).
    neighbors : ranks whose snapshots I collect (the topology's ``neighbors(rank)``).
    send_to : ranks I send to; default ``neighbors`` (undirected graphs).
    world_size, master_addr, master_port : explicit rendezvous; default torchrun's WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT environment variables. Ignored when a default process group already exists.
    backend : ``"gloo"`` or ``"nccl"``; default nccl when ``device`` is CUDA, else gloo.
    device : where buffers live; default ``cuda:LOCAL_RANK`` for nccl, else CPU.
    timeout_s : process-group timeout in seconds: the longest a ``collect`` waits for a neighbour.
    compress : None, ``"fp16"`` or ``"bf16"``: cast float32/float64 tensors for the wire.
    segment_bytes : bytes per gloo message that I send (a positive multiple of 8; default :data:`SEGMENT_BYTES`).
        Receivers follow the size each sender's prefix declares, so ranks may differ.
    reuse_buffers : receive into the same buffers every round, which saves allocating and page-faulting one
        payload per neighbour per round (about a third of the time of a loopback exchange). The snapshots
        ``collect`` returns then stay valid only until the next ``collect``: merge them (or clone them) before
        that, as the round loop does. False: fresh buffers every round.
    round_peers : a time-varying topology's ``round -> (neighbours, send_to)``; ``neighbors`` and ``send_to``
        then cover every round. Every rank derives the same graphs from the schedule, so each round's sends and
        receives still match.
    """

    def __init__(
        self,
        rank: int,
        neighbors: Sequence[int],
        *,
        send_to: Optional[Sequence[int]] = None,
        world_size: Optional[int] = None,
        master_addr: Optional[str] = None,
        master_port: Optional[int] = None,
        backend: Optional[str] = None,
        device: Optional[torch.device | str] = None,
        timeout_s: float = 60.0,
        compress: Optional[str] = None,
        segment_bytes: int = SEGMENT_BYTES,
        reuse_buffers: bool = True,
        round_peers: Optional[Callable[[int], Tuple[Sequence[int], Sequence[int]]]] = None,
    ):
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not (isinstance(segment_bytes, int) and segment_bytes > 0 and segment_bytes % wire.ALIGN == 0):
            raise ValueError(f"segment_bytes must be a positive multiple of {wire.ALIGN}, got {segment_bytes!r}")
        if compress not in wire.COMPRESS:
            raise ValueError(f"compress must be one of None, 'fp16', 'bf16', got {compress!r}")
        self.rank = int(rank)
        self.neighbors: List[int] = sorted({int(j) for j in neighbors} - {self.rank})
        self.send_to: List[int] = sorted({int(j) for j in (neighbors if send_to is None else send_to)} - {self.rank})
        self.round_peers = round_peers
        self.compress = None if compress == "none" else compress
        self.timeout_s = float(timeout_s)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rejected: List[tuple] = []
        self._owns_group = False
        if backend is None:
            backend = "nccl" if (device is not None and torch.device(device).type == "cuda") else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            self._init_group(backend, world_size, master_addr, master_port)
        self.backend = dist.get_backend()
        if dist.get_rank() != self.rank:
            raise ValueError(f"rank {self.rank} given, but this process is rank {dist.get_rank()} of the group")
        n = dist.get_world_size()
        bad = [j for j in self.neighbors + self.send_to if not 0 <= j < n]
        if bad:
            raise ValueError(f"neighbour rank(s) {bad} outside the process group of {n} ranks")
        self.reuse_buffers = bool(reuse_buffers)
        self.segment_bytes = segment_bytes
        self._segmented = self.backend == "gloo"
        self._recv: Dict[int, torch.Tensor] = {}
        self._layout: Optional[wire.Layout] = None
        self._send_buf: Optional[torch.Tensor] = None
        self._sends: List[dist.Work] = []  # gloo: this round's segment sends, started by post
        self._posted: Optional[int] = None
        self._closed = False
        self._message_sends: List[Tuple[dist.Work, Tuple[torch.Tensor, ...]]] = []  # (work, buffers it reads)
        self._message_layouts: Dict[str, wire.Layout] = {}  # lane -> the layout of my first message on it

    def _init_group(self, backend: str, world_size: Optional[int], addr: Optional[str],
                    port: Optional[int]) -> None:
        env = os.environ
        world_size = int(world_size if world_size is not None else env.get("WORLD_SIZE", 0))
        addr = addr or env.get("MASTER_ADDR")
        port = int(port if port is not None else env.get("MASTER_PORT", 0))
        if "RANK" in env and int(env["RANK"]) != self.rank:
            raise ValueError(f"rank {self.rank} given, but the environment says RANK={env['RANK']}")
        if not (world_size and addr and port):
            raise ValueError("torch transport needs world_size, master_addr and master_port, or torchrun's "
                             f"environment ({', '.join(_ENV)})")
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=self.timeout_s))
        self._owns_group = True
        log.info("rank %d: joined a %s process group of %d at %s:%d", self.rank, backend, world_size, addr, port)

    # ------------------------------------------------------------------------------------------ Transport API
    def post(self, round: int, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Start sending my round-``round`` snapshot (gloo) or pack it into the send buffer (nccl).

        On gloo the sends read the snapshot's own tensors where they can (no copy): do not modify them until
        ``collect(round)`` returns, which waits for the sends.
        """
        self._check_open()
        # Not adaptive: every rank must derive the same buffer size from the architecture alone.
        layout = wire.layout_of(snapshot, self.compress, adaptive=False)
        if self._layout is None or layout != self._layout:
            if self._layout is not None:
                wire.check_against(layout, self._layout)  # raises: the architecture changed
            self._layout = layout
            self._send_buf = _zeros(PREFIX_BYTES + layout.payload_bytes, self.device)
        assert self._send_buf is not None
        self._wait_sends(round)  # an earlier post's segments must be out before the buffer is rewritten
        self._send_buf[:PREFIX_BYTES].copy_(_prefix(int(round), layout.fingerprint, layout.payload_bytes,
                                                    self.segment_bytes))
        if self._segmented:
            if self.send_to_at(round):  # a rank that only receives has nothing to pack
                self._pack_and_send(snapshot, layout, round)
        else:
            wire.pack(snapshot, layout, out=self._send_buf[PREFIX_BYTES:])
        self._posted = int(round)

    def _pack_and_send(self, snapshot: Mapping[str, torch.Tensor], layout: wire.Layout, round: int) -> None:
        assert self._send_buf is not None
        payload = self._send_buf[PREFIX_BYTES:]
        flat: Dict[str, torch.Tensor] = {}
        # Casting (compression) is fast only as one multi-threaded torch copy, so it packs everything first.
        # Otherwise a segment inside one tensor is sent from the tensor itself, and the others are packed one by
        # one, each sent while the next is packed (the copy of a 64 MiB snapshot was ~0.2 of its gloo transfer).
        cast = any(e.wire_dtype != e.dtype for e in layout.entries)
        try:
            if cast:
                wire.pack(snapshot, layout, out=payload)
            send_to = self.send_to_at(round)
            self._sends += [dist.isend(self._send_buf[:PREFIX_BYTES], j, tag=0) for j in send_to]
            for k, (start, end) in enumerate(_segments(layout.payload_bytes, self.segment_bytes), start=1):
                src = None if cast else wire.range_view(snapshot, layout, start, end)
                if src is None:
                    if not cast:
                        wire.pack_range(snapshot, layout, payload, start, end, flat)
                    src = payload[start:end]
                self._sends += [dist.isend(src, j, tag=k) for j in send_to]
        except Exception as e:
            raise self._failed(round, e) from e

    def collect(self, round: int) -> Dict[int, Snapshot]:
        """Exchange round-``round`` buffers with the neighbours (every rank must call this for the same round).

        Raises
        ------
        ValueError : ``round`` was not posted first.
        RuntimeError : the exchange failed or timed out (a neighbour died): the process group is unusable.
        """
        self._check_open()
        if self._posted != int(round) or self._send_buf is None or self._layout is None:
            raise ValueError(f"rank {self.rank}: collect({round}) before post({round}); every rank posts, then collects")
        size = self._send_buf.numel()
        send_to = self.send_to_at(round)
        recv = {j: self._recv.get(j) if self.reuse_buffers else None for j in self.neighbors_at(round)}
        recv = {j: b if b is not None and b.numel() == size else torch.empty(size, dtype=torch.uint8,
                                                                             device=self.device)
                for j, b in recv.items()}
        if self.reuse_buffers:
            self._recv = dict(recv)
        refused: Dict[int, str] = {}
        try:
            if self._segmented:
                refused = self._receive_segments(recv, round)
            else:
                ops = [dist.P2POp(dist.isend, self._send_buf, j) for j in send_to]
                ops += [dist.P2POp(dist.irecv, buf, j) for j, buf in recv.items()]
                for req in dist.batch_isend_irecv(ops) if ops else []:
                    req.wait()
        except Exception as e:
            raise self._failed(round, e) from e
        self.bytes_sent += self._layout.payload_bytes * len(send_to)
        expect = _prefix(int(round), self._layout.fingerprint, 0, 0)[:_MATCH_BYTES].to(self.device)
        out: Dict[int, Snapshot] = {}
        for j, buf in recv.items():
            self.bytes_received += size - PREFIX_BYTES
            try:
                if j in refused:
                    raise wire.WireError(refused[j])
                if not torch.equal(buf[:_MATCH_BYTES], expect):
                    raise wire.WireError("round or architecture fingerprint differs from mine")
                snap = wire.unpack(buf[PREFIX_BYTES:], self._layout)
                if not self._segmented:  # segments were checked as they arrived
                    wire.check_finite(snap)
            except wire.WireError as e:
                log.warning("rank %d: refused round %d from %d: %s", self.rank, round, j, e)
                self.rejected.append((int(round), j, str(e)))
                continue
            out[j] = snap
        return out

    # ---------------------------------------------------------------------------------------------- messages
    @property
    def supports_messages(self) -> bool:  # type: ignore[override]
        """Messages travel as CPU buffers: gloo only (nccl would need them on the GPU)."""
        return self.backend == "gloo"

    def post_messages(self, round: int, lane: str, messages: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Start sending ``messages[j]`` to every rank ``j`` I send to in ``round``, and an empty message to those
        without one: every rank must call this and :meth:`collect_messages` for the same rounds and lanes, so
        that sends and receives stay matched. Each message is a 32-byte prefix (round, lane, header and payload
        sizes), its manifest (a :mod:`~dimat.transport.wire` header) and its payload, uncompressed."""
        self._check_open()
        if self.backend != "gloo":
            raise RuntimeError(f"rank {self.rank}: messages need the gloo backend (CPU buffers), not "
                               f"{self.backend}")
        self._wait_message_sends(round)
        lane_id = _lane_id(lane)
        try:
            for j in self.send_to_at(round):
                msg = messages.get(j)
                head, payload = b"", torch.empty(0, dtype=torch.uint8)
                if msg:
                    layout = wire.layout_of(msg)
                    known = self._message_layouts.setdefault(lane, layout)
                    if layout.fingerprint != known.fingerprint:
                        wire.check_against(layout, known)  # raises WireError naming the difference
                    head = wire.encode_header(wire.make_header(self.rank, int(round), layout, receiver=j,
                                                               lane=lane))
                    payload = wire.pack(msg, layout)
                prefix = _message_prefix(int(round), lane_id, len(head), payload.numel())
                header = torch.frombuffer(bytearray(head), dtype=torch.uint8) if head else torch.empty(
                    0, dtype=torch.uint8)
                works = [dist.isend(prefix, j, tag=MESSAGE_TAG)]
                if head:
                    works += [dist.isend(header, j, tag=MESSAGE_TAG + 1), dist.isend(payload, j, tag=MESSAGE_TAG + 2)]
                    self.bytes_sent += payload.numel()
                self._message_sends += [(w, (prefix, header, payload)) for w in works]
        except Exception as e:
            raise self._failed(round, e) from e

    def collect_messages(self, round: int, lane: str, senders: Sequence[int]) -> Dict[int, Snapshot]:
        """Receive every in-neighbour's round-``round`` message on ``lane`` (all of them, to stay in step) and
        return those from ``senders`` that are non-empty and valid: the round and lane as expected, the manifest
        within the size limits and equal to my own message's on the lane (when I sent one), finite values.
        Refusals are logged and recorded in :attr:`rejected`.

        Raises RuntimeError when the exchange fails or times out (as :meth:`collect`)."""
        self._check_open()
        lane_id = _lane_id(lane)
        wanted = {int(j) for j in senders}
        out: Dict[int, Snapshot] = {}
        try:
            for j in self.neighbors_at(round):
                prefix = torch.empty(PREFIX_BYTES, dtype=torch.uint8)
                dist.irecv(prefix, j, tag=MESSAGE_TAG).wait()
                got_round, got_lane, head_n, size = _message_sizes(prefix)
                if head_n == 0:
                    continue  # nothing for me this round
                if head_n > MAX_MESSAGE_HEADER or size > MAX_MESSAGE_BYTES:
                    # gloo can only take a message whole, into a buffer of its size: not received, the exchange
                    # is out of step, so stop loudly
                    raise RuntimeError(f"rank {self.rank}: rank {j} announced a {lane} message of {head_n} + "
                                       f"{size} bytes, over the limits ({MAX_MESSAGE_HEADER} + "
                                       f"{MAX_MESSAGE_BYTES}); the exchange cannot go on")
                head = self._receive(j, head_n, MESSAGE_TAG + 1)
                payload = self._receive(j, size, MESSAGE_TAG + 2)
                try:
                    if got_round != int(round) or got_lane != lane_id:
                        raise wire.WireError(f"message of round {got_round} on another lane or round (expected "
                                             f"round {round}, lane {lane!r})")
                    header = wire.decode_frame(bytes(head.numpy()))
                    if not hasattr(header, "tensors") or header.lane != lane or header.sender != j:
                        raise wire.WireError("message without a valid header for this lane and sender")
                    layout = wire.check_header(header, self._message_layouts.get(lane), MAX_MESSAGE_BYTES)
                    if layout.payload_bytes != size:
                        raise wire.WireError(f"payload of {size} bytes, the manifest declares {layout.payload_bytes}")
                    wire.check_finite_range(payload, layout, 0, size)
                    msg = wire.unpack(payload, layout)
                except wire.WireError as e:
                    log.warning("rank %d: refused %s message of round %d from %d: %s", self.rank, lane, round, j, e)
                    self.rejected.append((int(round), j, f"{lane}: {e}"))
                    continue
                self.bytes_received += size
                if j in wanted:
                    out[j] = msg
            self._wait_message_sends(round)
        except RuntimeError:
            raise
        except Exception as e:
            raise self._failed(round, e) from e
        return out

    def _receive(self, sender: int, nbytes: int, tag: int) -> torch.Tensor:
        """``nbytes`` from ``sender``, one message."""
        buf = torch.empty(nbytes, dtype=torch.uint8)
        dist.irecv(buf, sender, tag=tag).wait()
        return buf

    def _wait_message_sends(self, round: int) -> None:
        sends, self._message_sends = self._message_sends, []
        try:
            for w, _ in sends:
                w.wait()
        except Exception as e:
            raise self._failed(round, e) from e

    def close(self) -> None:
        """Destroy the process group if this transport created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"rank {self.rank}: transport is closed")

    def _receive_segments(self, recv: Mapping[int, torch.Tensor], round: int) -> Dict[int, str]:
        """Receive every neighbour's prefix, then its payload segment by segment, checking each arrived segment
        for non-finite values while the later ones are still in flight; returns the refusal reason per neighbour.

        A payload of another size than mine is received into one scratch segment and thrown away, so that the
        sender's messages are all matched and the exchange stays in step.
        """
        assert self._layout is not None
        own = self._layout.payload_bytes
        heads = {j: dist.irecv(buf[:PREFIX_BYTES], j, tag=0) for j, buf in recv.items()}
        works: Dict[int, List[Tuple[Tuple[int, int], dist.Work]]] = {}
        refused: Dict[int, str] = {}
        for j, buf in recv.items():
            heads[j].wait()
            size, seg = _sizes(buf[:PREFIX_BYTES])
            if not (seg > 0 and seg % wire.ALIGN == 0):
                raise RuntimeError(f"rank {self.rank}: rank {j} sent a prefix with segment size {seg}")
            if size != own:
                refused[j] = f"payload of {size} bytes, mine has {own} (another model)"
                self._drain(j, size, seg)
                continue
            payload = buf[PREFIX_BYTES:]
            works[j] = [((a, b), dist.irecv(payload[a:b], j, tag=k))
                        for k, (a, b) in enumerate(_segments(size, seg), start=1)]
        for j, parts in works.items():
            payload = recv[j][PREFIX_BYTES:]
            for (a, b), w in parts:
                w.wait()
                if j not in refused:
                    try:
                        wire.check_finite_range(payload, self._layout, a, b)
                    except wire.WireError as e:
                        refused[j] = str(e)
        self._wait_sends(round)
        return refused

    def _drain(self, sender: int, size: int, segment_bytes: int) -> None:
        scratch = torch.empty(min(size, segment_bytes), dtype=torch.uint8)
        for k, (a, b) in enumerate(_segments(size, segment_bytes), start=1):
            dist.irecv(scratch[:b - a], sender, tag=k).wait()

    def _wait_sends(self, round: int) -> None:
        sends, self._sends = self._sends, []
        try:
            for w in sends:
                w.wait()
        except Exception as e:
            raise self._failed(round, e) from e

    def _failed(self, round: int, e: Exception) -> RuntimeError:
        return RuntimeError(
            f"rank {self.rank}: torch.distributed exchange of round {round} failed ({type(e).__name__}: {e}); a "
            "dead or stalled rank stops this backend: use the grpc transport for fault tolerance")


def _zeros(nbytes: int, device: torch.device) -> torch.Tensor:
    """A zeroed flat uint8 buffer. On the CPU it comes from calloc (numpy), whose pages take memory only once
    written: on gloo the segments sent straight from the model are never written into the send buffer."""
    if device.type == "cpu":
        return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8))
    return torch.zeros(nbytes, dtype=torch.uint8, device=device)


def _segments(size: int, segment_bytes: int) -> List[Tuple[int, int]]:
    """``(start, end)`` byte ranges of a buffer of ``size`` bytes, ``segment_bytes`` at most each."""
    return [(a, min(a + segment_bytes, size)) for a in range(0, size, segment_bytes)]


def _prefix(round: int, fingerprint: bytes, payload_bytes: int, segment_bytes: int) -> torch.Tensor:
    raw = (round.to_bytes(8, "little", signed=True) + fingerprint[:8] + payload_bytes.to_bytes(8, "little")
           + segment_bytes.to_bytes(8, "little"))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _lane_id(lane: str) -> int:
    """A lane's 8-byte id in message prefixes (the first 8 bytes of the SHA-256 of its name)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(lane.encode()).digest()[:8], "little", signed=True)


def _message_prefix(round: int, lane_id: int, header_bytes: int, payload_bytes: int) -> torch.Tensor:
    raw = (round.to_bytes(8, "little", signed=True) + lane_id.to_bytes(8, "little", signed=True)
           + header_bytes.to_bytes(8, "little") + payload_bytes.to_bytes(8, "little"))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _message_sizes(prefix: torch.Tensor) -> Tuple[int, int, int, int]:
    """Round, lane id, header bytes and payload bytes of a message prefix."""
    raw = bytes(prefix.numpy())
    return (int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:16], "little", signed=True),
            int.from_bytes(raw[16:24], "little"), int.from_bytes(raw[24:32], "little"))


def _sizes(prefix: torch.Tensor) -> Tuple[int, int]:
    """The payload size and segment size a prefix declares."""
    raw = bytes(prefix.cpu().numpy())
    return int.from_bytes(raw[16:24], "little"), int.from_bytes(raw[24:32], "little")


def from_env(neighbors: Sequence[int], **kw) -> TorchTransport:
    """A transport for this torchrun worker: rank from RANK, the rest from the environment."""
    if "RANK" not in os.environ:
        raise ValueError("not under torchrun: RANK is not set")
    return TorchTransport(int(os.environ["RANK"]), neighbors, **kw)
