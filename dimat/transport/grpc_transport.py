"""gRPC transport: one process per agent, each serving on its own host:port; the fault-tolerant transport.

Each agent runs a ``dimat.v1.Peer`` server (proto/dimat.proto) plus the standard ``grpc.health.v1.Health``
service. ``post(r, snapshot)`` returns at once; background threads stream the snapshot to every neighbour
(header, raw bytes in chunks of about 1 MiB hashed as they go, then the digest in a trailer), retrying with
exponential backoff until the round's deadline. Incoming snapshots are authenticated (an HMAC with the key of the
(sender, me) pair from per-agent credentials, or with a shared secret), validated (manifest against my model,
exact byte count, BLAKE3 digest, finite values) and kept in an inbox by ``(round, sender)``, where an arrived snapshot
is never replaced; ``collect(r)`` waits until every
neighbour's round-r snapshot is there or the deadline passes. A neighbour that is down, late or sends something
invalid is skipped for that round, with a logged reason (logger ``dimat.transport``) and an entry in
:attr:`GrpcTransport.rejected`.

Memory: the sender streams straight from the snapshot's tensors (no copy unless compressing or the tensor is
not a contiguous CPU tensor), the receiver writes each payload into one preallocated buffer (reused once nothing
refers to the snapshot it held) and views the tensors out of it. So a process holds its model, plus one
payload-sized buffer per neighbour snapshot it holds at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dimat.transport import wire
from dimat.transport._proto import dimat_pb2 as pb
from dimat.transport._proto import dimat_pb2_grpc as pb_grpc
from dimat.transport.base import Snapshot, Transport
from dimat.transport.identity import Credentials

log = logging.getLogger("dimat.transport")

#: Fully qualified gRPC service name of the peer service (also reported by the health service).
SERVICE = pb.DESCRIPTOR.services_by_name["Peer"].full_name
_SEND_METHOD = f"/{SERVICE}/SendSnapshot"
_FETCH_METHOD = f"/{SERVICE}/FetchState"
#: Health-service name an agent reports SERVING once it is ready for its first round (the start-up barrier).
READY_SERVICE = f"{SERVICE}.rounds"

#: Status codes after which another attempt cannot succeed (the peer refused what we sent, not the network).
_PERMANENT = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.CANCELLED}

#: How the inbox's refusal of a snapshot that came after its round was collected begins (the sender then knows
#: that the receiver is alive and ahead of it, not down).
_LATE = "late: "
#: A send's outcomes (the result of its future).
DELIVERED, REFUSED_LATE, UNDELIVERED = "delivered", "refused late", "undelivered"
#: What a liveness check found (besides a Status reply): failed twice (unreachable), or no answer in time.
_NOBODY, _SILENT = "unreachable", "no answer"


class Rejection(NamedTuple):
    """A snapshot (or call) this agent refused: ``round`` and ``sender`` are -1 when not known yet."""

    round: int
    sender: int
    reason: str


@dataclass(frozen=True)
class TLSConfig:
    """Certificate files (PEM) for TLS, and for mutual TLS when ``client_auth`` is set.

    Attributes
    ----------
    cert, key : this agent's certificate chain and private key (served, and shown to peers under mTLS).
    ca : the CA that signed the peers' certificates (verifies servers; under mTLS, clients too).
    client_auth : mutual TLS: the server demands and verifies a client certificate signed by ``ca``.
    server_name : the name to expect in peers' certificates instead of the host in their address (e.g. when
        every agent's certificate is issued for one common name); None: the address's host.
    """

    cert: Union[str, Path]
    key: Union[str, Path]
    ca: Union[str, Path]
    client_auth: bool = False
    server_name: Optional[str] = None

    def _read(self, which: str) -> bytes:
        path = Path(getattr(self, which))
        try:
            return path.read_bytes()
        except OSError as e:
            raise ValueError(f"TLS {which} file {path}: {e.strerror}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self._read("key"), self._read("cert"))],
                                           root_certificates=self._read("ca") if self.client_auth else None,
                                           require_client_auth=self.client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if self.client_auth:
            return grpc.ssl_channel_credentials(self._read("ca"), self._read("key"), self._read("cert"))
        return grpc.ssl_channel_credentials(self._read("ca"))


class _Inbox:
    """Validated snapshots by ``(round, sender)``, with a condition variable for ``collect``.

    Snapshots of rounds at or below the last collected round are refused (late); an arrived (round, sender) is
    never replaced; future rounds are kept (a fast neighbour may post r+1 before I collect r), up to ``max_rounds``
    rounds past my current one (later ones are postponed: the sender retries). Before my first post or collect
    my current round is unknown (a restarted agent rejoins at its neighbours' round): then the newest
    ``max_rounds`` rounds per sender are kept.
    """

    def __init__(self, max_rounds: int):
        self.max_rounds = max_rounds
        self.floor = -1  # last collected round
        self.closed = False
        self._items: Dict[Tuple[int, int], Tuple[Snapshot, wire.Layout]] = {}
        self._cond = threading.Condition()

    def admit(self, round: int, sender: int, current: int = -1) -> Optional[Tuple[str, bool]]:
        """Why a round-``round`` snapshot from ``sender`` cannot be stored now, and whether it may be later
        (True: the sender should try again); None when it can. ``current``: the round this agent is in (its
        latest post), when it is past the last collected one."""
        with self._cond:
            return self._why_not(round, sender, current)

    def _why_not(self, round: int, sender: int, current: int) -> Optional[Tuple[str, bool]]:
        if round <= self.floor:
            return f"{_LATE}round {round} arrived after round {self.floor} was collected", False
        if (round, sender) in self._items:
            # A snapshot that arrived is final: a second one for the same round (a replay with a fresh nonce, a
            # second process claiming the rank) must not replace what a merge may already be about to use.
            return f"overwrite: round {round} from {sender} has already arrived", False
        # At most max_rounds rounds past the one I am in (the round after the last collected, or the one I
        # posted last, e.g. after a restart). A window of rounds rather than a count per sender: two rounds'
        # streams may arrive in either order, and the earlier round must never be the one turned away.
        base = max(self.floor, current - 1)
        if base < 0 and current < 0:
            return None  # no round yet (just started, or rejoining): the newest rounds are kept (see put)
        if round > base + self.max_rounds:
            return (f"ahead: round {round} is more than inbox_rounds={self.max_rounds} rounds past round "
                    f"{base + 1}; try again once round {round - self.max_rounds} is collected"), True
        return None

    def put(self, round: int, sender: int, snap: Snapshot, layout: wire.Layout,
            current: int = -1) -> Optional[Tuple[str, bool]]:
        """Store a snapshot; why it was not stored (and whether to try again), or None."""
        with self._cond:
            why = self._why_not(round, sender, current)
            if why is not None:
                return why
            self._items[(round, sender)] = (snap, layout)
            if self.floor < 0 and current < 0:
                # Before my first round I do not know which rounds I will need: a restarted agent rejoins at its
                # neighbours' current round, so keep their newest max_rounds rounds.
                mine = sorted(r for r, s in self._items if s == sender)
                for r in mine[:-self.max_rounds]:
                    del self._items[(r, sender)]
                    log.info("inbox: dropped round %d from %d (kept its newest %d rounds: no round of mine yet)",
                             r, sender, self.max_rounds)
            self._cond.notify_all()
        return None

    def wait(self, round: int, senders: Sequence[int], deadline: float) -> Dict[int, Tuple[Snapshot, wire.Layout]]:
        """The ``senders``' round-``round`` items once all are in, at ``deadline`` (time.monotonic) or on close."""
        with self._cond:
            while True:
                got = {s: self._items[(round, s)] for s in senders if (round, s) in self._items}
                left = deadline - time.monotonic()
                if len(got) == len(senders) or left <= 0 or self.closed:
                    return got
                self._cond.wait(timeout=left)

    def has(self, round: int, sender: int) -> bool:
        with self._cond:
            return (round, sender) in self._items

    def rounds_from(self, sender: int) -> List[int]:
        """The rounds of ``sender`` held now (round protocol: who is in step, how far ahead the neighbours are)."""
        with self._cond:
            return sorted(r for r, s in self._items if s == sender)

    def freshest(self, senders: Sequence[int], oldest: int) -> Dict[int, Tuple[int, Snapshot, wire.Layout]]:
        """Asynchronous rounds: each sender's newest item of round ``oldest`` or later, with its round."""
        with self._cond:
            best: Dict[int, Tuple[int, Snapshot, wire.Layout]] = {}
            for (r, s), (snap, layout) in self._items.items():
                if s in senders and r >= oldest and (s not in best or r > best[s][0]):
                    best[s] = (r, snap, layout)
            return best

    def drop_through(self, round: int) -> None:
        with self._cond:
            self.floor = max(self.floor, round)
            for key in [k for k in self._items if k[0] <= round]:
                del self._items[key]

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class _Outgoing:
    """One posted snapshot: its layout, its bytes (views), its running hash, its deadline and its in-flight calls."""

    def __init__(self, round: int, layout: wire.Layout, pieces, deadline: float, detached: bool = False,
                 lane: str = ""):
        self.round = round
        self.lane = lane  # "" for a snapshot, else the message lane
        # detached: the pieces are a private copy of the payload, so the sends may outlive collect(round) (the
        # model changes after it); they stop at their deadline or when a newer round is posted.
        self.detached = detached
        self.layout = layout
        self.pieces = pieces
        self.hash = wire.StreamHash()  # taken by the streams as the bytes go, once for all neighbours
        self.deadline = deadline
        self.cancelled = threading.Event()
        self.calls: Dict[int, grpc.Future] = {}
        self.futures: List[Future] = []
        self.lock = threading.Lock()

    def cancel(self) -> None:
        self.cancelled.set()
        with self.lock:
            for call in self.calls.values():
                call.cancel()


class _Lane:
    """One message lane: its inbox, the layout accepted on it (from my first message; None until then), my
    messages in flight by round and each round's deadline."""

    def __init__(self, inbox_rounds: int):
        self.inbox = _Inbox(inbox_rounds)
        self.expected: Optional[wire.Layout] = None
        self.outgoing: Dict[int, List[_Outgoing]] = {}
        self.deadline: Dict[int, float] = {}


class GrpcTransport(Transport):
    """One agent's gRPC endpoint: a server for its in-neighbours' snapshots and clients to its out-neighbours.

    Parameters
    ----------
    rank : this agent's rank.
    neighbors : ranks whose snapshots I collect (the topology's ``neighbors(rank)``).
    peers : rank -> ``"host:port"`` for (at least) every rank in ``send_to``, and my own unless ``listen`` is
        given.
    send_to : ranks I send my snapshot to; default ``neighbors`` (undirected graphs). For a directed graph, the
        ranks ``k`` that list me among their neighbours.
    listen : ``"host:port"`` to serve on; default ``peers[rank]``. Port 0 picks a free port (see
        :attr:`address`).
    template : my model's snapshot (or its :class:`~dimat.transport.wire.Layout`): incoming snapshots must have
        exactly its tensor names, dtypes and shapes. Default: learnt from my first ``post``; snapshots that arrive
        before that are checked when collected.
    secret : shared secret (str or bytes). Every snapshot and Status call must carry an HMAC made with it;
        wrong or missing gets UNAUTHENTICATED. It proves membership only: any holder can claim any rank.
    credentials : per-agent credentials (:mod:`dimat.transport.identity`), instead of ``secret``: snapshots and
        Status calls are signed with the key of the (sender, receiver) pair, looked up by the rank the sender
        claims, so holding another agent's credentials is not enough to post as a third. Their ``rank`` must be
        ``rank``. Neither: no authentication (logged as a warning).
    tls : certificates for TLS / mTLS; None: plaintext.
    compress : None, ``"fp16"`` or ``"bf16"``: cast float32/float64 tensors for the wire (cast back on receipt).
    deadline_s : seconds (from ``post(r)``, or from ``collect(r)`` when not posted) that a round's sends retry
        and that ``collect(r)`` waits for the neighbours' snapshots.
    connect_timeout_s : seconds one connection attempt may take (gRPC's minimum connect timeout), and the
        default timeout of :meth:`peer_status`.
    retry_initial_s, retry_max_s, retry_multiplier : exponential backoff between attempts to send to one
        neighbour (seconds, seconds, factor); the first two also bound gRPC's reconnection backoff, so a
        neighbour that comes up late is reached within ``retry_max_s`` of it listening.
    chunk_bytes : payload bytes per stream message (about 1 MiB).
    max_snapshot_bytes : largest payload accepted, checked before allocating anything.
    max_header_bytes : largest header accepted (the manifest grows with the number of tensors).
    max_clock_skew_s : how far a signed timestamp may be from this clock; nonces are remembered this long.
    inbox_rounds : rounds kept per sender ahead of the last collected round; a sender further ahead is told to
        try again (UNAVAILABLE, so it retries within its deadline) rather than have an earlier round dropped.
    max_workers : server threads (concurrent incoming calls); default ``2 * len(neighbors) + 4``.
    round_peers : a time-varying topology's ``round -> (neighbours, send_to)``; ``neighbors``, ``send_to`` and
        ``peers`` then cover every round (every agent this one may ever exchange with), and each round sends to,
        accepts from and waits for that round's peers only.
    sync : True (default): rounds in step with the round protocol (see :meth:`collect`): ``collect(r)`` waits for
        the neighbours that are up, at most ``deadline_s`` (one more for a late neighbour that a liveness check
        finds alive and working on the round); a neighbour given up is not waited for again until a background
        probe finds it in step. False: asynchronous rounds: ``collect(r)`` never waits
        and returns each neighbour's freshest snapshot of round ``r - staleness`` or later.
    staleness : asynchronous rounds: the oldest snapshot merged is ``staleness`` rounds old (>= 0).
    probe_interval_s : seconds between two probes (health check, then Status) of a neighbour that is not waited
        for; default ``min(1, deadline_s / 4)``.
    serve_state : keep a private copy of each posted snapshot: sends then go on after ``collect`` returns (to a
        neighbour that is down or behind, until the round's deadline or my next post), and a neighbour that
        (re)joins can fetch it as my state (:meth:`fetch_state`). Costs one copy of the model per post; always on
        with ``sync=False``.

    Attributes
    ----------
    address : ``host:port`` actually bound.
    rejected : recent :class:`Rejection` records (what was refused and why), newest last.
    rejected_count : total refusals since construction.
    down : neighbours not waited for now (they missed a deadline and no probe has found them in step since).
    snapshot_rounds : sender -> round of each snapshot the last :meth:`collect` returned (its age is the
        collected round minus this; always 0 with ``sync=True``).
    """

    def __init__(
        self,
        rank: int,
        neighbors: Sequence[int],
        peers: Mapping[int, str],
        *,
        send_to: Optional[Sequence[int]] = None,
        listen: Optional[str] = None,
        template: Union[Mapping[str, torch.Tensor], wire.Layout, None] = None,
        secret: Union[str, bytes, None] = None,
        credentials: Optional[Credentials] = None,
        tls: Optional[TLSConfig] = None,
        compress: Optional[str] = None,
        deadline_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 2.0,
        retry_multiplier: float = 2.0,
        chunk_bytes: int = 1 << 20,
        max_snapshot_bytes: int = 16 << 30,
        max_header_bytes: int = 4 << 20,
        max_clock_skew_s: float = 300.0,
        inbox_rounds: int = 2,
        max_workers: Optional[int] = None,
        round_peers: Optional[Callable[[int], Tuple[Sequence[int], Sequence[int]]]] = None,
        sync: bool = True,
        staleness: int = 1,
        probe_interval_s: Optional[float] = None,
        serve_state: bool = False,
    ):
        self.rank = int(rank)
        self.round_peers = round_peers
        self.neighbors: List[int] = sorted({int(j) for j in neighbors} - {self.rank})
        self.send_to: List[int] = sorted({int(j) for j in (neighbors if send_to is None else send_to)} - {self.rank})
        self.peers: Dict[int, str] = {int(k): str(v) for k, v in peers.items()}
        missing = [j for j in self.send_to if j not in self.peers]
        if missing:
            raise ValueError(f"no address for neighbour(s) {missing} in peers")
        if listen is None:
            if self.rank not in self.peers:
                raise ValueError(f"no address to listen on: give listen= or peers[{self.rank}]")
            listen = self.peers[self.rank]
        _check_positive(deadline_s=deadline_s, connect_timeout_s=connect_timeout_s, retry_initial_s=retry_initial_s,
                        retry_max_s=retry_max_s, chunk_bytes=chunk_bytes, max_snapshot_bytes=max_snapshot_bytes,
                        max_header_bytes=max_header_bytes, max_clock_skew_s=max_clock_skew_s,
                        inbox_rounds=inbox_rounds)
        if retry_multiplier < 1:
            raise ValueError(f"retry_multiplier must be >= 1, got {retry_multiplier}")
        if compress not in wire.COMPRESS:
            raise ValueError(f"compress must be one of None, 'fp16', 'bf16', got {compress!r}")
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and not secret:
            raise ValueError("secret must not be empty (use None for no authentication)")
        if credentials is not None:
            if secret is not None:
                raise ValueError("give a shared secret or per-agent credentials, not both")
            if credentials.rank != self.rank:
                raise ValueError(f"credentials {credentials.source} belong to agent {credentials.rank}, "
                                 f"not to agent {self.rank}")
        if not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0:
            raise ValueError(f"staleness must be an integer >= 0 rounds, got {staleness!r}")
        if probe_interval_s is not None:
            _check_positive(probe_interval_s=probe_interval_s)
        self.sync = bool(sync)
        self.staleness = int(staleness)
        self.probe_interval_s = float(probe_interval_s or min(1.0, deadline_s / 4))
        self.serve_state = bool(serve_state) or not self.sync
        self.compress = None if compress == "none" else compress
        self.deadline_s = float(deadline_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.retry_initial_s = float(retry_initial_s)
        self.retry_max_s = float(retry_max_s)
        self.retry_multiplier = float(retry_multiplier)
        self.chunk_bytes = int(chunk_bytes)
        self.max_snapshot_bytes = int(max_snapshot_bytes)
        self.max_header_bytes = int(max_header_bytes)
        # Explicit limits: a chunk frame is chunk_bytes plus a few bytes of protobuf framing, so gRPC's 4 MiB
        # default would refuse exactly-4-MiB chunks.
        self.max_message_bytes = max(self.chunk_bytes, self.max_header_bytes) + 1024
        self._secret = secret
        self._credentials = credentials
        keys: Optional[wire.KeySource] = credentials.key_for if credentials is not None else secret
        self._verifier = wire.Verifier(keys, max_clock_skew_s) if keys is not None else None
        self._tls = tls
        self._expected: Optional[wire.Layout] = (
            template if isinstance(template, wire.Layout) or template is None else wire.layout_of(template))

        self.bytes_sent = 0
        self.bytes_received = 0
        self.rejected: Deque[Rejection] = collections.deque(maxlen=1000)
        self.rejected_count = 0
        self.latest_posted = -1
        self._lock = threading.Lock()
        self._closed = False
        self._inbox = _Inbox(inbox_rounds)
        # Enough buffers for every snapshot the inbox may hold, one being merged and one arriving, per neighbour.
        self._pool = wire.BufferPool(len(self.neighbors) * (inbox_rounds + 2))
        self._outgoing: Dict[int, _Outgoing] = {}
        self._round_deadline: Dict[int, float] = {}
        self._lanes: Dict[str, _Lane] = {}  # message lanes (post_messages), created on first use
        self._channels: Dict[int, grpc.Channel] = {}
        # Round protocol (see collect): neighbours not waited for, what probes learnt, my latest offered state.
        self.down: Dict[int, float] = {}  # rank -> time.monotonic() it was marked down
        self._down_round: Dict[int, int] = {}  # rank -> the round it missed
        self._answering: Dict[int, bool] = {}  # rank -> whether its last probe got a health answer
        self._wake = threading.Event()  # probe at once (a neighbour was just marked down)
        self._peer_posted: Dict[int, int] = {}  # rank -> latest posted round its Status reported
        self._postponed: Dict[int, int] = {}  # rank -> latest round of its that my inbox postponed (too far ahead)
        self._collected = -1
        self.snapshot_rounds: Dict[int, int] = {}
        self._offer: Optional[_Outgoing] = None
        self._stop = threading.Event()
        # Liveness checks of neighbours whose snapshot, or my send to whom, is still missing half a deadline before
        # it (see _wait_in_step and _wait_sends).
        self._checker = ThreadPoolExecutor(max_workers=max(1, len(self.neighbors) + len(self.send_to)),
                                           thread_name_prefix=f"dimat-check-{self.rank}")
        # Two rounds' sends may overlap (a neighbour still receiving round r when I post r+1).
        self._senders = ThreadPoolExecutor(max_workers=max(1, 4 * len(self.send_to)),
                                           thread_name_prefix=f"dimat-send-{self.rank}")
        if keys is None:
            log.warning("agent %d: no shared secret or credentials: snapshots are accepted from anyone who can "
                        "connect", self.rank)

        self._server = grpc.server(ThreadPoolExecutor(max_workers=max_workers or 2 * len(self.neighbors) + 4,
                                                      thread_name_prefix=f"dimat-serve-{self.rank}"),
                                   # no SO_REUSEPORT: a second agent on a taken port must fail, not share it
                                   options=self._options() + [("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            # request_deserializer=None: SendSnapshot frames arrive as raw bytes and are decoded by wire.decode_frame,
            # which views chunk bytes in place instead of copying them into a protobuf message.
            "SendSnapshot": grpc.stream_unary_rpc_method_handler(
                self._on_snapshot, response_serializer=pb.SendReply.SerializeToString),
            "Status": grpc.unary_unary_rpc_method_handler(
                self._on_status, request_deserializer=pb.StatusRequest.FromString,
                response_serializer=pb.StatusReply.SerializeToString),
            "FetchState": grpc.unary_stream_rpc_method_handler(
                self._on_fetch_state, request_deserializer=pb.StatusRequest.FromString),
        }),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        try:
            if tls is None:
                port = self._server.add_insecure_port(listen)
            else:
                port = self._server.add_secure_port(listen, tls.server_credentials())
        except RuntimeError as e:
            port, why = 0, f": {e}"
        else:
            why = " (address in use or not local?)"
        if port == 0:
            self._senders.shutdown(wait=False)
            self._checker.shutdown(wait=False)
            raise ValueError(f"agent {self.rank}: cannot listen on {listen}{why}")
        self.address = f"{listen.rsplit(':', 1)[0]}:{port}"
        self._server.start()
        for name in ("", SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._health.set(READY_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)  # until mark_ready()
        self._prober = threading.Thread(target=self._probe_loop, name=f"dimat-probe-{self.rank}", daemon=True)
        self._prober.start()
        log.info("agent %d: serving on %s (%s, %s)", self.rank, self.address, "TLS" if tls else "plaintext",
                 "per-agent credentials" if credentials else "shared secret" if secret else "no secret")

    # ------------------------------------------------------------------------------------------ Transport API
    def post(self, round: int, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Start sending my round-``round`` snapshot to ``send_to``; returns at once.

        The payload is hashed as it streams (once for all neighbours) and the digest follows it. Do not modify the
        tensors until ``collect(round)`` returns: it also waits (within the deadline) for these sends to finish;
        a tensor changed under a send in flight fails the receiver's hash check and is dropped, never merged.
        """
        self._check_open()
        round = int(round)
        layout = wire.layout_of(snapshot, self.compress)
        full = layout if self.compress is None else wire.layout_of(snapshot)
        if self._expected is None:
            self._expected = full
        elif full.fingerprint != self._expected.fingerprint:
            wire.check_against(full, self._expected)  # raises WireError naming the difference
        pieces = wire.tensor_views(snapshot, layout)
        if self.serve_state:
            pieces = _private_copy(pieces, layout.payload_bytes)
        deadline = time.monotonic() + self.deadline_s
        out = _Outgoing(round, layout, pieces, deadline, detached=self.serve_state)
        with self._lock:
            self._round_deadline[round] = deadline
            if self.serve_state:
                self._offer = out
            # Sends of older rounds go on until their own deadline (or until the receiver calls them late), except
            # detached ones, which only a neighbour that is down or behind still receives: the new round
            # supersedes them (and they would hold sender threads for a full deadline each).
            for r, o in list(self._outgoing.items()):
                if r < round and o.detached:
                    self._outgoing.pop(r).cancel()
            if round in self._outgoing:
                self._outgoing[round].cancel()
            self._outgoing[round] = out
            self.latest_posted = max(self.latest_posted, round)
            out.futures = [self._senders.submit(self._send_loop, j, out) for j in self.send_to_at(round)]

    # ---------------------------------------------------------------------------------------------- messages
    supports_messages = True
    #: Largest message accepted on a lane (bytes of payload).
    max_message_bytes_lane = 1 << 30
    #: Lanes a peer may open (names are short identifiers).
    max_lanes = 8

    def post_messages(self, round: int, lane: str, messages: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Start sending ``messages[j]`` to each ``j`` I send to in round ``round``, on ``lane``; returns at once.

        Each message is its own stream, addressed to its receiver (signed with our pair's key, the lane included),
        sent uncompressed from a private copy, retried until ``deadline_s`` after this call. All messages of a
        lane must share one layout (tensor names, dtypes, shapes): the first one posted becomes what this agent
        accepts on the lane. Messages of older rounds still in flight on the lane are cancelled."""
        self._check_open()
        round = int(round)
        state = self._lane(lane)
        out_to = set(self.send_to_at(round))
        deadline = time.monotonic() + self.deadline_s
        sends: List[_Outgoing] = []
        for j, msg in sorted(messages.items()):
            if int(j) not in out_to:
                log.info("agent %d: no %s message to %d in round %d: not an out-neighbour", self.rank, lane, j,
                         round)
                continue
            layout = wire.layout_of(msg)
            with self._lock:
                if state.expected is None:
                    state.expected = layout
            if layout.fingerprint != state.expected.fingerprint:
                wire.check_against(layout, state.expected)  # raises WireError naming the difference
            pieces = _private_copy(wire.tensor_views(msg, layout), layout.payload_bytes)
            out = _Outgoing(round, layout, pieces, deadline, detached=True, lane=lane)
            sends.append(out)
            out.futures = [self._senders.submit(self._send_loop, int(j), out)]
        with self._lock:
            for r in [r for r in state.outgoing if r < round]:
                for o in state.outgoing.pop(r):
                    o.cancel()
            state.outgoing.setdefault(round, []).extend(sends)
            state.deadline[round] = deadline

    def collect_messages(self, round: int, lane: str, senders: Sequence[int]) -> Dict[int, Snapshot]:
        """The round-``round`` messages on ``lane`` from ``senders`` (neighbours of this round) that arrived and
        passed validation, waiting at most until ``deadline_s`` after my :meth:`post_messages` of this round on
        the lane (or after this call). Afterwards, this round's messages on the lane are refused as late."""
        self._check_open()
        round = int(round)
        state = self._lane(lane)
        allowed = set(self.neighbors_at(round))
        wanted = [int(j) for j in senders if int(j) in allowed]
        with self._lock:
            deadline = state.deadline.get(round, time.monotonic() + self.deadline_s)
        got = state.inbox.wait(round, wanted, deadline)
        state.inbox.drop_through(round)
        out: Dict[int, Snapshot] = {}
        for j, (msg, layout) in got.items():
            if state.expected is not None and layout.fingerprint != state.expected.fingerprint:
                try:  # arrived before I knew the lane's layout
                    wire.check_against(layout, state.expected)
                except wire.WireError as e:
                    self._reject(round, j, f"{lane} message: {e}", "collect_messages")
                    continue
            out[j] = msg
        for j in wanted:
            if j not in got:
                log.warning("agent %d: no %s message from %d for round %d by the deadline", self.rank, lane, j, round)
        return out

    def _lane(self, name: str) -> "_Lane":
        """The state of message lane ``name`` (created on first use); WireError for a bad name or too many."""
        with self._lock:
            lane = self._lanes.get(name)
            if lane is None:
                if not (0 < len(name) <= 64 and name.replace("_", "").isalnum() and name.isascii()):
                    raise wire.WireError(f"bad message lane name {name[:70]!r}")
                if len(self._lanes) >= self.max_lanes:
                    raise wire.WireError(f"message lane {name!r}: already {self.max_lanes} lanes open")
                lane = self._lanes[name] = _Lane(self._inbox.max_rounds)
            return lane

    def collect(self, round: int) -> Dict[int, Snapshot]:
        """Neighbours' round-``round`` snapshots that arrived and passed validation before the deadline.

        Round protocol (``sync=True``): waits until every neighbour that is up delivered or the deadline passes
        (``deadline_s`` after ``post(round)``, or after this call if ``round`` was not posted), then until my own
        round-``round`` sends to them finish (same deadline). Half a deadline before the deadline, a neighbour
        still missing gets a liveness check (:meth:`_wait_in_step`): unreachable, it is given up at once; silent,
        at the deadline; alive and working on this round, it is waited for up to one more deadline; past this
        round, not waited for further. A neighbour given up is marked down (:attr:`down`) and is not waited for
        in later rounds (its snapshot is taken if it is in already); it is waited for again once a snapshot of
        this round or later from it is in, or a background probe finds it up and in step. So a dead, frozen or
        cut-off neighbour costs at most one deadline in total. Afterwards snapshots for this round or older are
        refused as late.

        Asynchronous rounds (``sync=False``): returns at once, with each neighbour's freshest snapshot of round
        ``round - staleness`` or later (:attr:`snapshot_rounds` says which round each is).
        """
        self._check_open()
        round = int(round)
        if not self.sync:
            return self._collect_async(round)
        with self._lock:
            deadline = self._round_deadline.get(round, time.monotonic() + self.deadline_s)
        waited, not_waited = self._split_neighbours(round)
        got, nobody, ahead = self._wait_in_step(round, waited, deadline)
        if not_waited:
            got.update(self._inbox.wait(round, not_waited, time.monotonic()))  # whatever is in already
        with self._lock:
            behind = any(j not in self.down for j in not_waited)  # a neighbour has posted a later round
        if not waited and not got and not behind:
            got.update(self._wait_any_answering(round, not_waited, deadline))
        self._mark_down(round, nobody, "unreachable (a liveness check failed twice)")
        self._mark_down(round, [j for j in waited if j not in got and j not in nobody and j not in ahead])
        with self._lock:
            out = self._outgoing.get(round)
            down = set(self.down)
        unreached = []  # out-neighbours my round-`round` send did not reach by the deadline
        if out is not None:
            sends = {peer: f for peer, f in zip(self.send_to_at(round), out.futures)
                     if peer not in not_waited and peer not in down}  # a detached send goes on by itself
            for peer, outcome in self._wait_sends(sends, deadline).items():
                # Refused as late: the peer collected the round without me; it is alive and ahead, and my next
                # round's split does not wait for it (it has posted a later round), so it is not marked down.
                if outcome != DELIVERED and outcome != REFUSED_LATE:
                    unreached.append(peer)
        # A neighbour that died after posting this round: its snapshot is in, but my send to it does not arrive;
        # marked down too (after a liveness check finds it unreachable, or at the deadline), once.
        self._mark_down(round, unreached, "did not receive my snapshot by the deadline")
        self._inbox.drop_through(round)
        self._collected = round
        with self._lock:
            for r in [r for r in self._round_deadline if r <= round]:
                del self._round_deadline[r]
            # Sends that read the model's tensors stop now (they change once I return). Detached ones (a private
            # copy) stay in _outgoing until my next post supersedes them: dropped from it here, a send to a dead
            # neighbour would hold a sender thread for its whole deadline, round after round, until the threads
            # ran out and the sends to live neighbours queued behind them (a stall of the whole ring, measured).
            for r in [r for r, o in self._outgoing.items() if r <= round and not o.detached]:
                self._outgoing.pop(r).cancel()
        result = self._checked(round, {s: (round, snap, layout) for s, (snap, layout) in got.items()})
        missing = [j for j in self.neighbors_at(round) if j not in result]
        if missing:
            log.info("agent %d round %d: no snapshot from %s", self.rank, round, missing)
        return result

    def _checked(self, round: int, got: Mapping[int, Tuple[int, Snapshot, wire.Layout]]) -> Dict[int, Snapshot]:
        """The snapshots that fit my model (those that arrived before I knew it are checked now)."""
        result: Dict[int, Snapshot] = {}
        rounds: Dict[int, int] = {}
        for sender, (r, snap, layout) in sorted(got.items()):
            if self._expected is not None and layout.fingerprint != self._expected.fingerprint:
                try:  # arrived before I knew my own model: check it now
                    wire.check_against(layout, self._expected)
                except wire.WireError as e:
                    self._reject(r, sender, str(e), "collect")
                    continue
            result[sender], rounds[sender] = snap, r
        self.snapshot_rounds = rounds
        return result

    def _collect_async(self, round: int) -> Dict[int, Snapshot]:
        """Asynchronous rounds: never waits; each neighbour's freshest snapshot at most ``staleness`` rounds old."""
        oldest = round - self.staleness
        neighbors = self.neighbors_at(round)
        got = self._inbox.freshest(neighbors, oldest)
        # Keep what a later collect may still use (rounds after `oldest`); older rounds are refused from now on.
        self._inbox.drop_through(oldest)
        self._collected = max(self._collected, round)
        with self._lock:  # sends run on (private copies) until their deadline or my next post
            for r in [r for r in self._round_deadline if r <= round]:
                del self._round_deadline[r]
        result = self._checked(round, got)
        if len(result) < len(neighbors):
            log.info("agent %d round %d: no snapshot of round %d or later from %s", self.rank, round, oldest,
                     [j for j in neighbors if j not in result])
        return result

    # ------------------------------------------------------------------------------------------ round protocol
    def _split_neighbours(self, round: int) -> Tuple[List[int], List[int]]:
        """(waited for, not waited for) in ``round``. A down neighbour whose snapshot of ``round`` or later is in
        is in step again (it posted the round I am collecting) and is waited for from now on. A neighbour that has
        already posted a later round is not waited for (nor marked down): it collected ``round`` without me, so its
        round-``round`` snapshot is in already or will not come; I am behind and catch up by not waiting."""
        ahead = set()
        neighbors = self.neighbors_at(round)
        for j in neighbors:
            rounds = self._inbox.rounds_from(j)
            if j in self.down and any(r >= round for r in rounds):
                self._readmit(j, f"its round-{max(rounds)} snapshot arrived")
            with self._lock:
                probed = self._peer_posted.get(j, -1)
            if any(r > round for r in rounds) or probed > round:  # a probe saw it post a later round
                ahead.add(j)
        with self._lock:
            skip = set(self.down) | ahead
        return [j for j in neighbors if j not in skip], [j for j in neighbors if j in skip]

    def _wait_in_step(self, round: int, waited: Sequence[int], deadline: float
                      ) -> Tuple[Dict[int, Tuple[Snapshot, wire.Layout]], List[int], List[int]]:
        """The ``waited`` neighbours' round-``round`` snapshots: wait until all are in, or until the deadline for
        those that a liveness check does not find alive and in step. Also returns those given up before the
        deadline because they are unreachable, and those a check found past this round (not waited for further).

        Half a deadline before it, each neighbour still missing is asked for its Status (one call, bounded by the
        deadline). One that is unreachable (UNAVAILABLE twice, 0.25 s apart: killed, restarting, or a new
        connection that cannot be made) is given up at once; one that does not answer by the deadline (frozen, or
        cut off on a connection that was up) costs the deadline. One
        that answers and has posted round ``round - 1`` or later is working on this round: it is late because it
        waited for its own neighbours (a dead agent's neighbours post their next round up to a deadline late), so
        it is waited for up to one more deadline instead of being marked down for a near miss, which would put the
        two agents out of step and spread the lag as a cascade of near misses (see docs/transport.md)."""
        check_at = deadline - self.deadline_s / 2
        grace = deadline + self.deadline_s
        checks: Dict[int, Future] = {}
        checked_at: Dict[int, float] = {}
        extended: List[int] = []
        while True:
            now = time.monotonic()
            if now >= check_at:
                for j in waited:
                    if self._inbox.has(round, j):
                        continue
                    # Past the deadline, one waited for further is checked again every quarter deadline: it may
                    # have skipped ahead meanwhile (following a neighbour of its own that is further on).
                    again = j in extended and checks[j].done() and now - checked_at[j] >= self.deadline_s / 4
                    if j not in checks or again:
                        checks[j] = self._checker.submit(self._check_alive, j, deadline if not again else grace)
                        checked_at[j] = now
            outcome = {j: f.result() for j, f in checks.items() if f.done()}
            # Not waited for any more: unreachable ones, and those that have posted a later round (they collected
            # this one without me: their snapshot of it is in, or will not come; I am behind, see _split_neighbours).
            ahead = [j for j in waited if not isinstance(outcome.get(j), (str, type(None)))
                     and outcome[j].latest_posted_round > round and not self._inbox.has(round, j)]
            want = [j for j in waited if outcome.get(j) != _NOBODY and j not in ahead]
            if now >= deadline:  # those in, those found in step, and those whose check has not ended yet
                want = [j for j in want if self._inbox.has(round, j) or j not in outcome
                        or not isinstance(outcome[j], str) and outcome[j].latest_posted_round >= round - 1]
                late = [j for j in want if j in outcome and j not in extended and not self._inbox.has(round, j)]
                if late:
                    extended += late
                    log.warning("agent %d round %d: %s late but alive and in step (Status: posted round %s); "
                                "waited for up to one more deadline", self.rank, round, late,
                                [outcome[j].latest_posted_round for j in late])
            # Wake for the next event: the checks' start, the deadline, the grace's end, or a check's outcome.
            until = check_at if now < check_at else deadline if now < deadline else grace
            if len(outcome) < len(checks):
                until = min(until, now + 0.05)
            for j in extended:  # the next repeated check (a check still running wakes the loop every 50 ms)
                until = min(until, max(now + 0.05, checked_at[j] + self.deadline_s / 4))
            got = self._inbox.wait(round, want, until)
            if len(got) == len(want) or time.monotonic() >= grace or self._closed:
                return got, sorted(j for j in waited if outcome.get(j) == _NOBODY and j not in got), ahead

    def _wait_sends(self, sends: Mapping[int, Future], deadline: float) -> Dict[int, str]:
        """Each send's outcome (DELIVERED, REFUSED_LATE, UNDELIVERED), waiting at most until the deadline (and a
        second for a send's own cleanup). As for snapshots, a send still running half a deadline before it gets
        a liveness check of its peer, and one whose peer is unreachable is not waited for further (it goes on,
        and ends at its deadline or with my next post)."""
        check_at = deadline - self.deadline_s / 2
        checks: Dict[int, Future] = {}
        outcomes: Dict[int, str] = {}
        while len(outcomes) < len(sends):
            now = time.monotonic()
            for peer, f in sends.items():
                if peer in outcomes:
                    continue
                if f.done():
                    try:
                        outcomes[peer] = f.result()
                    except Exception:  # a send that broke; it is cancelled with its round
                        outcomes[peer] = UNDELIVERED
                elif peer in checks and checks[peer].done() and checks[peer].result() == _NOBODY:
                    outcomes[peer] = UNDELIVERED
                elif now >= deadline + 1.0 or self._closed:
                    outcomes[peer] = UNDELIVERED
                elif now >= check_at and peer not in checks:
                    checks[peer] = self._checker.submit(self._check_alive, peer, deadline)
            if len(outcomes) < len(sends):
                pending = [f for p, f in sends.items() if p not in outcomes]
                wait_futures(pending, timeout=0.05 if checks or now >= check_at else max(0.0, check_at - now),
                             return_when=FIRST_COMPLETED)
        return outcomes

    def _check_alive(self, peer: int, until: float) -> Union[pb.StatusReply, str]:
        """A liveness check of ``peer`` (Status, retried once after a failure), at most until ``until``
        (time.monotonic): its reply, ``_NOBODY`` (failed twice: unreachable) or ``_SILENT`` (no answer in time)."""
        refused = 0
        while not self._closed:
            left = until - time.monotonic()
            if left <= 0:
                return _SILENT
            try:
                # A fresh connection each attempt: the shared channel may be waiting out gRPC's reconnect backoff
                # after a broken connection (a peer that was frozen, or restarted), and would fail at once.
                channel = self._new_channel(peer)
            except ValueError:  # no address for it (an in-neighbour only): no check
                return _SILENT
            try:
                reply = self._ask_status(peer, left, channel)
            except wire.AuthError:  # no key for it: no check
                return _SILENT
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return _SILENT
                refused += 1
                if refused >= 2:
                    return _NOBODY
                self._stop.wait(min(0.25, left))
                continue
            finally:
                channel.close()
            with self._lock:
                self._peer_posted[peer] = max(self._peer_posted.get(peer, -1), int(reply.latest_posted_round))
            return reply
        return _SILENT

    def _wait_any_answering(self, round: int, candidates: Sequence[int], deadline: float
                            ) -> Dict[int, Tuple[Snapshot, wire.Layout]]:
        """Every neighbour is down: wait (at most until ``deadline``) for the first round-``round`` snapshot of one
        whose health check answers (or that has not been probed yet), instead of running ahead alone after a
        cascade of near misses. Dead or frozen neighbours do not answer, so they cost nothing here."""
        while time.monotonic() < deadline and not self._closed:
            with self._lock:
                alive = [j for j in candidates if self._answering.get(j, True)]
            if not alive or self.round_hint() > round:  # none alive, or one is ahead: I am behind, not ahead
                return {}
            got = self._inbox.wait(round, alive, min(deadline, time.monotonic() + 0.05))
            if got:
                return got
        return {}

    def _mark_down(self, round: int, missed: Sequence[int], why: str = "missed the deadline") -> None:
        if not missed:
            return
        with self._lock:
            for j in missed:
                if j not in self.down:
                    self.down[j], self._down_round[j] = time.monotonic(), round
                    self._answering.pop(j, None)
        self._wake.set()  # probe them now: whether they answer decides _wait_any_answering
        log.warning("agent %d round %d: %s %s; not waited for until a probe finds them in step", self.rank, round,
                    list(missed), why)

    def _readmit(self, peer: int, why: str) -> None:
        with self._lock:
            was = self.down.pop(peer, None)
        if was is not None:
            log.warning("agent %d: neighbour %d is back (%s, after %.1f s): waited for again", self.rank, peer, why,
                        time.monotonic() - was)

    def _probe_loop(self) -> None:
        """Every ``probe_interval_s``: probe each neighbour that is down (in this background thread only)."""
        while not self._stop.is_set():
            self._wake.wait(self.probe_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                down = list(self.down)
            for j in down:
                if self._stop.is_set():
                    return
                try:
                    self._probe(j)
                except Exception as e:  # a probe must never kill the thread (e.g. a channel closed under it)
                    log.debug("agent %d: probe of %d failed: %r", self.rank, j, e)

    def _probe(self, peer: int) -> bool:
        """Health check, then Status: admit ``peer`` when it serves and has posted the round it missed (or a later
        one) and at most one round before my latest post. So a neighbour that was merely late is admitted at the
        first probe (it posted that round, too late), before this agent can run ahead of it; one that is frozen,
        cut off or restarting is admitted once it has caught up (it skips ahead to its neighbours' round), even
        when it had posted the round it missed before it stopped; one that answers but posts nothing (hung) never
        is. True when admitted."""
        if self._closed:
            return False
        timeout = min(self.connect_timeout_s, max(self.probe_interval_s, 0.5))
        channel = self._channel(peer)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                              timeout=timeout)
        except grpc.RpcError:
            self._answering[peer] = False
            return False
        self._answering[peer] = reply.status == health_pb2.HealthCheckResponse.SERVING
        if not self._answering[peer]:
            return False
        try:
            status = self._ask_status(peer, timeout)
        except (grpc.RpcError, wire.AuthError):
            return False
        posted = int(status.latest_posted_round)
        with self._lock:
            self._peer_posted[peer] = posted
            missed = self._down_round.get(peer, -1)
            mine = self.latest_posted
        # In step: it has posted the round it missed and is at most one round behind mine (a neighbour frozen
        # after posting the round it missed is not in step until it has skipped ahead).
        if posted >= max(missed, mine - 1, 0):
            self._readmit(peer, f"probe: it posted round {posted}, it had missed round {missed}, I am at {mine}")
            return True
        return False

    def mark_ready(self) -> None:
        """Tell neighbours (through the health service, :data:`READY_SERVICE`) that I am ready for my rounds."""
        self._health.set(READY_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def wait_ready(self, timeout_s: float) -> List[int]:
        """Start-up barrier: :meth:`mark_ready`, then wait until every neighbour is ready too, at most
        ``timeout_s`` seconds. Neighbours still not ready are marked down (returned, logged): they cost no
        deadline and are waited for once a probe finds them in step. Without the barrier, agents that start a few
        seconds apart would miss each other's first round and the late ones would skip ahead."""
        self.mark_ready()
        end = time.monotonic() + timeout_s
        waiting = list(self.neighbors)
        while waiting and time.monotonic() < end:
            for j in list(waiting):
                try:
                    reply = health_pb2_grpc.HealthStub(self._channel(j)).Check(
                        health_pb2.HealthCheckRequest(service=READY_SERVICE),
                        timeout=max(0.05, min(self.connect_timeout_s, end - time.monotonic())))
                except grpc.RpcError:
                    continue
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    waiting.remove(j)
            if waiting:
                self._stop.wait(min(self.probe_interval_s, max(0.0, end - time.monotonic())))
        if waiting:
            log.warning("agent %d: neighbours %s not ready after %.0f s; starting without them", self.rank, waiting,
                        timeout_s)
            self._mark_down(-1, waiting)
        return waiting

    def wait_for_round(self, round: int, timeout_s: float) -> bool:
        """Wait until a neighbour has posted ``round`` or a later one (its snapshot is in my inbox), at most
        ``timeout_s`` seconds. An agent that joins a running run calls it before its first post, so that its first
        deadline starts when its neighbours' round does, not a training period earlier."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not self._closed:
            if self.round_hint() >= round:
                return True
            self._stop.wait(0.02)
        return self.round_hint() >= round

    def round_hint(self) -> int:
        """The latest round any neighbour has posted, as far as I know (-1: none): from the snapshots in my
        inbox and from probes. An agent about to run an earlier round is behind and may skip ahead to it."""
        rounds = [r for j in self.neighbors for r in self._inbox.rounds_from(j)]
        with self._lock:  # a probe's answer is a lower bound on where that neighbour is now, up or down
            rounds += list(self._peer_posted.values()) + list(self._postponed.values())
        return max(rounds, default=-1)

    # ------------------------------------------------------------------------------------------ state transfer
    def fetch_state(self, peer: int, timeout_s: Optional[float] = None) -> Optional[Tuple[int, Snapshot]]:
        """Neighbour ``peer``'s latest posted snapshot and its round (state transfer, for an agent that joins
        without a checkpoint), authenticated and validated like any snapshot. None (logged) when it cannot be had
        within ``timeout_s`` (default ``deadline_s``): the peer is down, refuses, or has posted nothing yet."""
        self._check_open()
        req = pb.StatusRequest(sender=self.rank, receiver=int(peer))
        try:
            key = self._key_for(peer)
        except wire.AuthError as e:
            log.warning("agent %d: cannot ask %d for its state: %s", self.rank, peer, e)
            return None
        if key is not None:
            req.auth.CopyFrom(wire.sign(key, wire.status_auth_fields(self.rank, int(peer))))
        call = self._channel(peer).unary_stream(_FETCH_METHOD, request_serializer=pb.StatusRequest.SerializeToString,
                                                response_deserializer=None)
        round = -1
        try:
            frames = call(req, timeout=timeout_s or self.deadline_s, wait_for_ready=True)
            header = wire.decode_frame(next(frames, b""))
            if not isinstance(header, pb.SnapshotHeader):
                raise wire.WireError("the state does not start with a header")
            round = int(header.round)
            if int(header.sender) != peer or int(header.receiver) != self.rank:
                raise wire.WireError(f"asked agent {peer} for its state, the answer is from agent {header.sender} "
                                     f"to agent {header.receiver}")
            trailer_key = None
            if self._verifier is not None:
                try:
                    self._verifier.verify(wire.header_auth_fields(header),
                                          header.auth if header.HasField("auth") else None, peer)
                except wire.AuthError as e:
                    raise wire.WireError(f"unauthenticated: {e}") from None
                trailer_key = self._verifier.key_for(peer)
            layout = wire.check_header(header, self._expected, self.max_snapshot_bytes)
            snap = self._receive_payload(frames, header, layout, trailer_key)
        except grpc.RpcError as e:
            log.warning("agent %d: state of %d not fetched: %s %s", self.rank, peer, e.code().name, e.details())
            return None
        except wire.WireError as e:
            self._reject(round, peer, f"state transfer: {e}", "fetch_state")
            return None
        with self._lock:
            self.bytes_received += layout.payload_bytes
        return round, snap

    def _on_fetch_state(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        sender = self._check_request(request, context, "FetchState")
        with self._lock:
            offer = self._offer
        if offer is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "no state to give: nothing posted yet" if self.serve_state else "state transfer is off")
        try:
            key = self._key_for(sender)
        except wire.AuthError as e:
            self._reject(-1, sender, f"FetchState: {e}", context.peer())
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no key for this agent")
        digest, offset = wire.StreamHash(), 0  # this stream's own hash: the offer's sends may be anywhere
        header = wire.make_header(self.rank, offer.round, offer.layout, key, receiver=sender,
                                  payload_hash=digest.name)
        yield wire.encode_header(header)
        for chunk in wire.iter_payload(offer.pieces, offer.layout.payload_bytes, self.chunk_bytes):
            digest.update(offset, chunk)
            offset += len(chunk)
            yield wire.encode_chunk(chunk)
        yield wire.encode_trailer(wire.make_trailer(header, digest.digest(offset), key))
        with self._lock:
            self.bytes_sent += offer.layout.payload_bytes
        log.info("agent %d: gave my round-%d state to agent %d", self.rank, offer.round, sender)

    def close(self) -> None:
        """Stop serving, cancel sends in flight, close channels. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            outs = list(self._outgoing.values())
            self._outgoing.clear()
            self._offer = None
            lanes = list(self._lanes.values())
        for lane in lanes:
            lane.inbox.close()
            outs += [o for sends in lane.outgoing.values() for o in sends]
        self._stop.set()
        self._wake.set()
        for out in outs:
            out.cancel()
        self._inbox.close()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace=0.5).wait(5.0)
        self._senders.shutdown(wait=True, cancel_futures=True)
        self._checker.shutdown(wait=True, cancel_futures=True)
        self._prober.join(timeout=2 * self.connect_timeout_s + 1.0)
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for ch in channels:
            ch.close()

    # ------------------------------------------------------------------------------------------------ queries
    @property
    def latest_collected(self) -> int:
        """The last round collected (-1 before the first)."""
        return self._collected

    def peer_status(self, peer: int, timeout_s: Optional[float] = None) -> Optional[pb.StatusReply]:
        """Ask neighbour ``peer`` for its rank and latest posted/collected rounds (e.g. to rejoin after a restart).

        Returns None (logged) when it cannot be reached within ``timeout_s`` (default ``connect_timeout_s``) or
        refuses.
        """
        self._check_open()
        try:
            return self._ask_status(peer, timeout_s or self.connect_timeout_s)
        except wire.AuthError as e:
            log.warning("agent %d: cannot ask %d for its Status: %s", self.rank, peer, e)
            return None
        except grpc.RpcError as e:
            log.info("agent %d: Status of %d failed: %s %s", self.rank, peer, e.code().name, e.details())
            return None

    def _ask_status(self, peer: int, timeout_s: float, channel: Optional[grpc.Channel] = None) -> pb.StatusReply:
        """Status of ``peer``, signed with the key of our pair (wire.AuthError when my credentials hold none)."""
        req = pb.StatusRequest(sender=self.rank, receiver=int(peer))
        key = self._key_for(peer)
        if key is not None:
            req.auth.CopyFrom(wire.sign(key, wire.status_auth_fields(self.rank, int(peer))))
        return pb_grpc.PeerStub(channel or self._channel(peer)).Status(req, timeout=timeout_s)

    # ------------------------------------------------------------------------------------------------ sending
    def _send_loop(self, peer: int, out: _Outgoing) -> str:
        """Send ``out`` to ``peer``, retrying until its deadline: DELIVERED, REFUSED_LATE (the peer collected the
        round without it: alive and ahead) or UNDELIVERED."""
        delay = self.retry_initial_s
        attempts = 0
        last = "no attempt"
        while not out.cancelled.is_set() and not self._closed:
            remaining = out.deadline - time.monotonic()
            if remaining <= 0:
                break
            attempts += 1
            try:
                ok, retry, last = self._send_once(peer, out, remaining)
            except wire.AuthError as e:  # my credentials hold no key for this peer: no attempt can succeed
                ok, retry, last = False, False, str(e)
            if ok:
                return DELIVERED
            if not retry:
                log.warning("agent %d: round %d to %d not delivered: %s", self.rank, out.round, peer, last)
                return REFUSED_LATE if last.startswith(f"refused: {_LATE}") else UNDELIVERED
            sleep = min(delay, max(0.0, out.deadline - time.monotonic()))
            out.cancelled.wait(sleep)
            delay = min(delay * self.retry_multiplier, self.retry_max_s)
        if not out.cancelled.is_set() and not self._closed:
            log.warning("agent %d: round %d to %d not delivered by the deadline after %d attempt(s): %s",
                        self.rank, out.round, peer, attempts, last)
        return UNDELIVERED

    def _send_once(self, peer: int, out: _Outgoing, remaining: float) -> Tuple[bool, bool, str]:
        """One attempt: (delivered, worth retrying, what happened)."""
        channel = self._channel(peer)
        key = self._key_for(peer)
        header = wire.make_header(self.rank, out.round, out.layout, key, receiver=peer, payload_hash=out.hash.name,
                                  lane=out.lane)
        call = channel.stream_unary(_SEND_METHOD, request_serializer=None,
                                    response_deserializer=pb.SendReply.FromString)
        with out.lock:
            if out.cancelled.is_set():
                return False, False, "cancelled"
            # wait_for_ready: a neighbour that is not up yet is waited for (gRPC reconnects with the backoff set
            # in _options) instead of failing the call at once.
            fut = call.future(self._frames(header, out, key), timeout=max(0.001, out.deadline - time.monotonic()),
                              wait_for_ready=True)
            out.calls[peer] = fut
        try:
            reply = fut.result()
        except grpc.RpcError as e:
            code = e.code()
            return False, code not in _PERMANENT, f"{code.name}: {e.details()}"
        except grpc.FutureCancelledError:
            return False, False, "cancelled"
        finally:
            with out.lock:
                out.calls.pop(peer, None)
        if not reply.accepted:
            return False, False, f"refused: {reply.reason}"
        with self._lock:
            self.bytes_sent += out.layout.payload_bytes
        return True, False, "delivered"

    def _frames(self, header: pb.SnapshotHeader, out: _Outgoing, key: Optional[bytes]) -> Iterator[bytes]:
        """Header, chunks (hashed as they go), trailer with the digest: the stream of one attempt."""
        yield wire.encode_header(header)
        offset = 0
        for chunk in wire.iter_payload(out.pieces, out.layout.payload_bytes, self.chunk_bytes):
            if out.cancelled.is_set():
                return
            out.hash.update(offset, chunk)
            offset += len(chunk)
            yield wire.encode_chunk(chunk)
        yield wire.encode_trailer(wire.make_trailer(header, out.hash.digest(offset), key))

    def _key_for(self, peer: int) -> Optional[bytes]:
        """The key my messages to ``peer`` are signed with (None: no authentication)."""
        if self._credentials is not None:
            return self._credentials.key_for(peer)
        return self._secret

    def _channel(self, peer: int) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(peer)
            if ch is None:
                ch = self._channels[peer] = self._new_channel(peer)
            return ch

    def _new_channel(self, peer: int) -> grpc.Channel:
        if peer not in self.peers:
            raise ValueError(f"no address for agent {peer}")
        opts = self._options()
        if self._tls is None:
            return grpc.insecure_channel(self.peers[peer], options=opts)
        if self._tls.server_name:
            opts.append(("grpc.ssl_target_name_override", self._tls.server_name))
        return grpc.secure_channel(self.peers[peer], self._tls.channel_credentials(), options=opts)

    def _options(self) -> List[Tuple[str, int]]:
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                # gRPC uses the "min reconnect backoff" as the minimum time one connection attempt may take.
                ("grpc.min_reconnect_backoff_ms", int(self.connect_timeout_s * 1000)),
                ("grpc.initial_reconnect_backoff_ms", int(self.retry_initial_s * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(self.retry_max_s * 1000))]

    # ---------------------------------------------------------------------------------------------- receiving
    def _on_snapshot(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> pb.SendReply:
        peer = context.peer()
        round, sender = -1, -1
        stalled = threading.Event()
        watchdog = None

        def refuse(reason: str) -> pb.SendReply:
            self._reject(round, sender, reason, peer)
            return pb.SendReply(accepted=False, reason=reason)

        try:
            raw = next(frames, None)
            if raw is None:  # gRPC also ends the stream this way when a frame exceeds max_message_bytes
                return refuse(f"no header: empty stream, or a frame over the {self.max_message_bytes}-byte limit")
            if len(raw) > self.max_header_bytes:
                return refuse(f"header of {len(raw)} bytes exceeds the limit of {self.max_header_bytes}")
            header = wire.decode_frame(raw)
            if not isinstance(header, pb.SnapshotHeader):
                return refuse("stream does not start with a header")
            round, sender = int(header.round), int(header.sender)
            key = self._authenticate(header, context)
            lane = self._lane(header.lane) if header.lane else None  # None: a snapshot
            inbox = self._inbox if lane is None else lane.inbox
            why = self._admit(header, inbox)
            if why is not None:
                reason, retry = why
                if retry:  # not a refusal: the sender tries again within its deadline
                    log.info("agent %d: round %d from %d postponed: %s", self.rank, round, sender, reason)
                    with self._lock:  # an authenticated neighbour has posted that round: I am behind (round_hint)
                        self._postponed[sender] = max(self._postponed.get(sender, -1), round)
                    context.abort(grpc.StatusCode.UNAVAILABLE, reason)
                return refuse(reason)
            expected = self._expected if lane is None else lane.expected
            layout = wire.check_header(header, expected, self.max_snapshot_bytes if lane is None
                                       else self.max_message_bytes_lane)
            # A sender that stops sending (without a deadline of its own) must not hold a server thread forever.
            watchdog = threading.Timer(self.deadline_s, lambda: (stalled.set(), context.cancel()))
            watchdog.daemon = True
            watchdog.start()
            snap = self._receive_payload(frames, header, layout, key, pooled=lane is None)
        except wire.WireError as e:
            # A cancelled stream (by its client, or by the watchdog) may also just end, without its trailer.
            if stalled.is_set():
                return refuse(self._cut_off_reason())
            if not context.is_active():
                return refuse(f"stream broken: the peer cancelled or went away ({e})")
            return refuse(str(e))
        except Exception as e:
            if context.code() is not None:  # context.abort() above: let gRPC end the call with that status
                raise
            if stalled.is_set():
                return refuse(self._cut_off_reason())
            # The stream itself broke: the peer went away, or gRPC refused a message over max_message_bytes.
            return refuse(f"stream broken ({type(e).__name__}{': ' + str(e) if str(e) else ''}): the peer went "
                          f"away or sent a frame over the {self.max_message_bytes}-byte limit")
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if self._closed:
            context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
        why = inbox.put(round, sender, snap, layout, self.latest_posted)
        if why is not None:  # another stream for the same round and sender got there first
            return refuse(why[0])
        with self._lock:
            self.bytes_received += layout.payload_bytes
        log.debug("agent %d: round %d from %d accepted (%d bytes)", self.rank, round, sender, layout.payload_bytes)
        return pb.SendReply(accepted=True)

    def _cut_off_reason(self) -> str:
        return f"payload not complete {self.deadline_s:g} s (deadline_s) after its header: the stream was cancelled"

    def _authenticate(self, header: pb.SnapshotHeader, context: grpc.ServicerContext) -> Optional[bytes]:
        """Check the header's HMAC against the key of the sender it claims (aborting the call with UNAUTHENTICATED
        and a logged reason when it fails); the key the trailer must be signed with, None without keys."""
        if self._verifier is None:
            return None
        sender = int(header.sender)
        try:
            self._verifier.verify(wire.header_auth_fields(header), header.auth if header.HasField("auth") else None,
                                  sender)
            return self._verifier.key_for(sender)
        except wire.AuthError as e:
            self._reject(int(header.round), sender, f"unauthenticated: {e}", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "authentication failed")
            raise  # not reached: abort raises

    def _admit(self, header: pb.SnapshotHeader, inbox: "_Inbox") -> Optional[Tuple[str, bool]]:
        """Whether an authenticated header may deliver a payload now: (reason, try again later) or None."""
        sender, round = int(header.sender), int(header.round)
        if header.receiver != self.rank:
            return f"addressed to agent {header.receiver}, this is agent {self.rank}", False
        if sender not in self.neighbors_at(round):
            return f"sender {sender} is not a neighbour of agent {self.rank} in round {round}", False
        return inbox.admit(round, sender, self.latest_posted)

    def _receive_payload(self, frames: Iterator[bytes], header: pb.SnapshotHeader, layout: wire.Layout,
                         key: Optional[bytes], pooled: bool = True) -> Snapshot:
        """Chunks into one buffer (pooled for snapshots; hashed and value-checked as they come), then the signed
        trailer."""
        asm = wire.Assembler(layout, self._pool.get(layout.payload_bytes) if pooled else None,
                             hash=header.payload_hash)
        trailer = None
        for raw in frames:
            frame = wire.decode_frame(raw)
            if trailer is not None:
                raise wire.WireError("a frame after the trailer")
            if isinstance(frame, memoryview):
                asm.add(frame)
            elif isinstance(frame, pb.SnapshotTrailer):
                trailer = frame
            else:
                raise wire.WireError("a second header inside the payload")
        if trailer is None:
            raise wire.WireError(f"stream ended without a trailer after {asm.received} of "
                                 f"{layout.payload_bytes} payload bytes")
        try:
            wire.verify_trailer(header, trailer, key)
        except wire.AuthError as e:
            raise wire.WireError(f"unauthenticated trailer: {e}") from None
        return asm.finish(trailer.payload_digest)

    def _check_request(self, request: pb.StatusRequest, context: grpc.ServicerContext, call: str) -> int:
        """The sender of a Status or FetchState request, once it is signed with the key of the rank it claims and
        comes from a neighbour addressed to me; otherwise the call is aborted with a logged reason."""
        sender = int(request.sender)
        if self._verifier is not None:
            try:
                self._verifier.verify(wire.status_auth_fields(sender, int(request.receiver)),
                                      request.auth if request.HasField("auth") else None, sender)
            except wire.AuthError as e:
                self._reject(-1, sender, f"unauthenticated {call} call: {e}", context.peer())
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "authentication failed")
        if request.receiver != self.rank or (sender not in self.neighbors and sender not in self.send_to):
            why = (f"{call} call addressed to agent {request.receiver}" if request.receiver != self.rank
                   else f"{call} call from {sender}, not a neighbour of agent {self.rank}")
            self._reject(-1, sender, why, context.peer())
            context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        return sender

    def _on_status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        self._check_request(request, context, "Status")
        return pb.StatusReply(rank=self.rank, latest_posted_round=self.latest_posted,
                              latest_collected_round=self.latest_collected,
                              fingerprint=self._expected.fingerprint if self._expected is not None else b"")

    def _reject(self, round: int, sender: int, reason: str, where: str) -> None:
        log.warning("agent %d: refused round %d from %d (%s): %s", self.rank, round, sender, where, reason)
        with self._lock:
            self.rejected.append(Rejection(round, sender, reason))
            self.rejected_count += 1

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"agent {self.rank}: transport is closed")


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def _private_copy(pieces: Sequence[Tuple[int, memoryview]], payload_bytes: int) -> List[Tuple[int, memoryview]]:
    """The payload as one new buffer (padding zero), so that it no longer changes with the model."""
    data = bytearray(payload_bytes)
    for offset, mv in pieces:
        data[offset:offset + len(mv)] = mv
    return [(0, memoryview(data))]
