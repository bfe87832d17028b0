"""In-process transport: every agent lives in one Python process and shares one mailbox.

Snapshots are cloned on ``post`` so that an agent mutating its model after posting (local training) cannot change
what its neighbours receive for that round (Jacobi-style rounds: everyone merges the round-r pre-merge snapshots).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from dimat.transport.base import Snapshot, Transport, snapshot_nbytes


class Mailbox:
    """Shared store of posted snapshots: ``(round, sender) -> snapshot``. Old rounds are dropped as rounds advance."""

    def __init__(self) -> None:
        self._posts: Dict[tuple, Snapshot] = {}
        self._messages: Dict[tuple, Snapshot] = {}  # (round, lane, sender, receiver) -> message

    def put(self, round: int, sender: int, snapshot: Snapshot) -> None:
        self._posts[(round, sender)] = snapshot
        for key in [k for k in self._posts if k[0] < round - 1]:
            del self._posts[key]

    def get(self, round: int, sender: int) -> Snapshot | None:
        return self._posts.get((round, sender))

    def put_message(self, round: int, lane: str, sender: int, receiver: int, message: Snapshot) -> None:
        """Store a message of ``lane`` addressed to ``receiver`` (older rounds are dropped as rounds advance)."""
        self._messages[(round, lane, sender, receiver)] = message
        for key in [k for k in self._messages if k[0] < round - 1]:
            del self._messages[key]

    def get_message(self, round: int, lane: str, sender: int, receiver: int) -> Snapshot | None:
        return self._messages.get((round, lane, sender, receiver))


class InProcTransport(Transport):
    """One agent's view of a shared :class:`Mailbox`.

    Parameters
    ----------
    rank : this agent's index.
    neighbors : ranks this agent receives from (not including itself).
    mailbox : the mailbox shared by all agents of the run.
    send_to : ranks that read this agent's snapshots (default ``neighbors``: a symmetric graph); only counted.
    round_peers : a time-varying topology's ``round -> (neighbours, send_to)`` (see :class:`Transport`).
    """

    def __init__(self, rank: int, neighbors: Sequence[int], mailbox: Mailbox,
                 send_to: Optional[Sequence[int]] = None,
                 round_peers: Optional[Callable[[int], Tuple[Sequence[int], Sequence[int]]]] = None):
        self.rank = rank
        self.neighbors: List[int] = [int(j) for j in neighbors if int(j) != rank]
        self.send_to: List[int] = (list(self.neighbors) if send_to is None
                                   else [int(j) for j in send_to if int(j) != rank])
        self.round_peers = round_peers
        self.mailbox = mailbox
        self.bytes_sent = 0
        self.bytes_received = 0

    def post(self, round: int, snapshot: Mapping[str, torch.Tensor]) -> None:
        frozen = {k: v.detach().clone() for k, v in snapshot.items()}
        self.mailbox.put(round, self.rank, frozen)
        # Count what a real network would carry: one copy per agent that reads it this round.
        self.bytes_sent += snapshot_nbytes(frozen) * len(self.send_to_at(round))

    def collect(self, round: int) -> Dict[int, Snapshot]:
        got: Dict[int, Snapshot] = {}
        for j in self.neighbors_at(round):
            snap = self.mailbox.get(round, j)
            if snap is not None:
                got[j] = snap
                self.bytes_received += snapshot_nbytes(snap)
        return got

    supports_messages = True

    def post_messages(self, round: int, lane: str, messages: Mapping[int, Snapshot]) -> None:
        """Store a clone of each message for its receiver (who validates what it collects)."""
        out = set(self.send_to_at(round))
        for j, msg in messages.items():
            if int(j) not in out:
                continue
            frozen = {k: v.detach().clone() for k, v in msg.items()}
            self.mailbox.put_message(round, lane, self.rank, int(j), frozen)
            self.bytes_sent += snapshot_nbytes(frozen)

    def collect_messages(self, round: int, lane: str, senders: Sequence[int]) -> Dict[int, Snapshot]:
        got: Dict[int, Snapshot] = {}
        allowed = set(self.neighbors_at(round))
        for j in senders:
            msg = self.mailbox.get_message(round, lane, int(j), self.rank) if int(j) in allowed else None
            if msg is not None:
                got[int(j)] = msg
                self.bytes_received += snapshot_nbytes(msg)
        return got


def make_inproc(neighbors: Sequence[Sequence[int]], schedule: Optional[object] = None) -> List[InProcTransport]:
    """One transport per agent over a fresh shared mailbox; ``neighbors[i]`` are agent i's neighbours.

    ``schedule``: a time-varying topology (:class:`dimat.schedule.Schedule`); each round's peers then come from
    it (``neighbors`` should then be each agent's potential neighbours).
    """
    box = Mailbox()
    send_to = [[k for k, nb in enumerate(neighbors) if i in nb and k != i] for i in range(len(neighbors))]
    return [InProcTransport(i, nb, box, send_to=send_to[i],
                            round_peers=schedule.round_peers(i) if schedule is not None else None)
            for i, nb in enumerate(neighbors)]
