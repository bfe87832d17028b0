"""Transports move model snapshots between neighbours; they know nothing about merges.

One interface (:class:`dimat.transport.base.Transport`), several implementations chosen by name:
``inproc`` (all agents in one process), ``grpc`` (one process per agent, fault tolerant) and
``torch`` (torch.distributed point-to-point, gloo or nccl).
"""

from dimat.transport.base import Snapshot, Transport

__all__ = ["Snapshot", "Transport"]
