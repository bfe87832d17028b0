"""The transport interface shared by the in-process runner, the multi-process agents and the embedding API."""

from __future__ import annotations

import abc
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

#: A model snapshot: the agent's ``state_dict`` (tensor name -> tensor). Received snapshots are immutable inputs:
#: never write into them.
Snapshot = Dict[str, torch.Tensor]


class Transport(abc.ABC):
    """Moves round-r snapshots between an agent and its neighbours.

    A round is two calls, so that an in-process runner can post every agent's snapshot before any agent collects:

    1. ``post(r, snapshot)``: start delivering my round-r snapshot to my neighbours (may return before delivery).
    2. ``collect(r)``: return ``{sender_rank: snapshot}`` for the neighbours' round-r snapshots that arrived
       before the round's deadline (my own snapshot is not included). A neighbour that is down, late, or sent an
       invalid snapshot is simply absent; the caller renormalises its mixing weights over what arrived.

    Attributes
    ----------
    rank : this agent's index in the topology.
    bytes_sent, bytes_received : running totals of payload bytes (for metrics).
    neighbors, send_to : the ranks I collect from and send to; under a time-varying topology, every rank I may
        collect from or send to in some round.
    round_peers : None for a static topology; else ``round -> (neighbours, send_to)`` of that round (from
        :meth:`dimat.schedule.Schedule.round_peers`), which ``post`` and ``collect`` follow.
    """

    rank: int
    bytes_sent: int = 0
    bytes_received: int = 0
    neighbors: List[int] = []
    send_to: List[int] = []
    round_peers: Optional[Callable[[int], Tuple[Sequence[int], Sequence[int]]]] = None

    def neighbors_at(self, round: int) -> List[int]:
        """Ranks whose round-``round`` snapshots I collect."""
        if self.round_peers is None:
            return self.neighbors
        return sorted(int(j) for j in self.round_peers(int(round))[0] if int(j) != self.rank)

    def send_to_at(self, round: int) -> List[int]:
        """Ranks my round-``round`` snapshot goes to."""
        if self.round_peers is None:
            return self.send_to
        return sorted(int(j) for j in self.round_peers(int(round))[1] if int(j) != self.rank)

    @abc.abstractmethod
    def post(self, round: int, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Start sending ``snapshot`` (round ``round``) to every neighbour."""

    @abc.abstractmethod
    def collect(self, round: int) -> Dict[int, Snapshot]:
        """Neighbours' round-``round`` snapshots that arrived in time, keyed by sender rank."""

    #: Whether :meth:`post_messages` / :meth:`collect_messages` work (a second, small message per round).
    supports_messages: bool = False

    def post_messages(self, round: int, lane: str, messages: Mapping[int, Snapshot]) -> None:
        """Start sending ``messages[j]`` (a dict of tensors) to each neighbour ``j`` on ``lane``, for ``round``.

        Messages travel apart from snapshots (their own lane: one per round and sender, each receiver gets only
        what is addressed to it) and are checked like snapshots (finite values; on networked transports: size
        limits, authentication, the layout of my own message on that lane). Ranks I do not send to in this
        round are skipped. Call after ``post(round)``."""
        raise NotImplementedError(f"{type(self).__name__} does not carry messages besides snapshots")

    def collect_messages(self, round: int, lane: str, senders: Sequence[int]) -> Dict[int, Snapshot]:
        """The round-``round`` messages on ``lane`` addressed to me from ``senders`` that arrived before the
        round's deadline, keyed by sender (absent: late, down or refused)."""
        raise NotImplementedError(f"{type(self).__name__} does not carry messages besides snapshots")

    def close(self) -> None:
        """Release sockets, servers and process groups. Idempotent."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def snapshot_nbytes(snapshot: Mapping[str, torch.Tensor]) -> int:
    """Payload size of a snapshot in bytes (sum of tensor storage actually used)."""
    return sum(t.numel() * t.element_size() for t in snapshot.values())
