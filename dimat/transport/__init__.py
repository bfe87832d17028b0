"""Transports move model snapshots between neighbours; they know nothing about merges.

One interface (:class:`dimat.transport.base.Transport`), several implementations chosen by name:
``inproc`` (all agents in one process), ``grpc`` (one process per agent, fault tolerant) and
``torch`` (torch.distributed point-to-point, gloo or nccl). :func:`create` builds one from a config section.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from dimat.transport.base import Snapshot, Transport

__all__ = ["Snapshot", "Transport", "TRANSPORTS", "create", "make_transport"]

#: Transport names accepted by :func:`create` (the config's ``transport.name``).
TRANSPORTS = ("inproc", "grpc", "torch")

#: Config keys (``transport.<key>``) passed straight to the gRPC transport's constructor.
_GRPC_KEYS = ("listen", "compress", "deadline_s", "connect_timeout_s", "retry_initial_s", "retry_max_s",
              "retry_multiplier", "chunk_bytes", "max_snapshot_bytes", "max_header_bytes", "max_clock_skew_s",
              "inbox_rounds", "sync", "staleness")
#: Config keys passed to the torch.distributed transport (``timeout_s`` defaults to ``deadline_s``).
_TORCH_KEYS = ("backend", "timeout_s", "compress", "world_size", "master_addr", "master_port", "reuse_buffers",
               "segment_bytes")

#: Environment variable holding the shared secret when the config names neither ``secret`` nor ``secret_file``.
SECRET_ENV = "DIMAT_SECRET"


def create(name: str, rank: int, topology: Any = None, transport_cfg: Optional[Mapping[str, Any]] = None, *,
           neighbors: Optional[Sequence[int]] = None, send_to: Optional[Sequence[int]] = None,
           peers: Optional[Mapping[int, str]] = None, template: Any = None, mailbox: Any = None,
           serve_state: bool = False) -> Transport:
    """One agent's transport.

    Parameters
    ----------
    name : ``"inproc"``, ``"grpc"`` or ``"torch"``.
    rank : this agent's rank.
    topology : a :class:`dimat.topology.Topology` (or anything with ``neighbors(i)``, ``num_agents`` and
        ``peers``); not needed when ``neighbors`` (and for gRPC ``peers``) are given. A time-varying
        :class:`dimat.schedule.Schedule`: the transport connects to every agent this one exchanges with in some
        round and follows the schedule round by round (for gRPC, ``peers`` must give all their addresses).
    transport_cfg : the config's ``transport`` section. Keys used: ``deadline_s`` (all); for grpc ``listen``,
        ``compress``, ``credentials_file`` (per-agent keys, ``{rank}`` replaced by ``rank``; see
        :mod:`dimat.transport.identity`) or ``secret`` / ``secret_file`` (else the ``DIMAT_SECRET`` environment
        variable),
        ``tls_cert``, ``tls_key``, ``tls_ca``, ``tls_client_auth``, ``tls_server_name`` and the limits and
        backoff of :class:`~dimat.transport.grpc_transport.GrpcTransport`; for torch ``backend``,
        ``timeout_s`` (default ``deadline_s``), ``compress`` and the explicit rendezvous (``world_size``,
        ``master_addr``, ``master_port``; default torchrun's environment). Other keys are ignored.
    neighbors, send_to : override the topology's in- and out-neighbours of ``rank``.
    peers : rank -> ``"host:port"`` (grpc), overriding ``topology.peers``.
    template : my model's snapshot, so that the gRPC transport validates snapshots arriving before my first post.
    mailbox : the shared :class:`~dimat.transport.inproc.Mailbox` (inproc).
    serve_state : grpc: give my latest posted snapshot to a neighbour that joins (state transfer).

    Raises
    ------
    ValueError : unknown name, missing neighbours or addresses, bad settings.
    """
    cfg: Dict[str, Any] = {k: v for k, v in dict(transport_cfg or {}).items() if v is not None}
    round_peers = None
    if topology is not None and hasattr(topology, "round_peers"):  # a time-varying topology (dimat.schedule)
        if not topology.is_static:
            round_peers = topology.round_peers(rank)
        # Set up once for every agent this one may exchange with in some round; each round then uses its own.
        neighbors = topology.potential_neighbors(rank) if neighbors is None else neighbors
        send_to = topology.potential_out_neighbors(rank) if send_to is None else send_to
        topology = topology.union()
    if neighbors is None:
        if topology is None:
            raise ValueError("give a topology or neighbors")
        neighbors = topology.neighbors(rank)
    if send_to is None and topology is not None:
        send_to = out_neighbors(topology, rank)
    if cfg.get("sync") is False and name != "grpc":
        raise ValueError(f"transport.sync: false (asynchronous rounds) needs the grpc transport, not {name!r}")
    if name == "inproc":
        from dimat.transport.inproc import InProcTransport, Mailbox

        if mailbox is None or not isinstance(mailbox, Mailbox):
            raise ValueError("the inproc transport needs the run's shared mailbox (mailbox=Mailbox())")
        return InProcTransport(rank, neighbors, mailbox, send_to=send_to, round_peers=round_peers)
    if name == "grpc":
        from dimat.transport.grpc_transport import GrpcTransport

        if peers is None:
            peers = getattr(topology, "peers", None)
        if not peers:
            raise ValueError("the grpc transport needs every neighbour's address (peers)")
        kw = {k: cfg[k] for k in _GRPC_KEYS if k in cfg}
        credentials = _credentials(cfg, rank)
        secret = _secret(cfg, environment=credentials is None)
        return GrpcTransport(rank, neighbors, peers, send_to=send_to, template=template, secret=secret,
                             credentials=credentials, tls=_tls(cfg), round_peers=round_peers,
                             serve_state=serve_state, **kw)
    if name == "torch":
        from dimat.transport.torch_transport import TorchTransport

        kw = {k: cfg[k] for k in _TORCH_KEYS if k in cfg}
        kw.setdefault("timeout_s", cfg.get("deadline_s", 60.0))
        return TorchTransport(rank, neighbors, send_to=send_to, round_peers=round_peers, **kw)
    raise ValueError(f"unknown transport {name!r}; choose one of {', '.join(TRANSPORTS)}")


def make_transport(name: str, cfg: Mapping[str, Any], *, rank: int, topology: Any,
                   peers: Optional[Mapping[int, str]] = None, **kw: Any) -> Transport:
    """:func:`create` from a whole run config (uses its ``transport`` section)."""
    return create(name, rank, topology, cfg.get("transport") or {}, peers=peers, **kw)


def out_neighbors(topology: Any, rank: int) -> List[int]:
    """Ranks that list ``rank`` among their neighbours: where ``rank`` sends its snapshot."""
    return [k for k in range(topology.num_agents) if k != rank and rank in topology.neighbors(k)]


def _credentials(cfg: Mapping[str, Any], rank: int):
    """Per-agent credentials from ``credentials_file`` (``{rank}`` replaced), or None."""
    if not cfg.get("credentials_file"):
        return None
    if cfg.get("secret") or cfg.get("secret_file"):
        raise ValueError("transport.credentials_file and a shared secret (transport.secret / secret_file) are both "
                         "set: give one")
    from dimat.transport.identity import credentials_path, load_credentials

    return load_credentials(credentials_path(cfg["credentials_file"], rank), rank)


def _secret(cfg: Mapping[str, Any], environment: bool = True) -> Optional[bytes]:
    if cfg.get("secret"):
        return str(cfg["secret"]).encode()
    if cfg.get("secret_file"):
        path = Path(cfg["secret_file"])
        try:
            secret = path.read_bytes().strip()
        except OSError as e:
            raise ValueError(f"transport.secret_file {path}: {e.strerror}") from None
        if not secret:
            raise ValueError(f"transport.secret_file {path} is empty")
        return secret
    env = os.environ.get(SECRET_ENV) if environment else None  # per-agent credentials replace it
    return env.encode() if env else None


def _tls(cfg: Mapping[str, Any]):
    keys = ("tls_cert", "tls_key", "tls_ca")
    given = [k for k in keys if cfg.get(k)]
    if not given:
        return None
    if len(given) != len(keys):
        raise ValueError(f"TLS needs all of {', '.join('transport.' + k for k in keys)}; got only {given}")
    from dimat.transport.grpc_transport import TLSConfig

    return TLSConfig(cfg["tls_cert"], cfg["tls_key"], cfg["tls_ca"], client_auth=bool(cfg.get("tls_client_auth")),
                     server_name=cfg.get("tls_server_name"))
