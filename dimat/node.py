"""The embedding API: one agent's merge round, for users who keep full control of their own training.

A :class:`Node` wraps the user's model, the communication graph, the agent's rank, a transport and an iterable of
local batches. ``node.merge_round(r)`` posts the model's round-r snapshot, collects the neighbours' round-r
snapshots, merges them with the configured operator and loads the result **in place** into ``node.model`` (the
same parameter tensors, so an optimizer built on ``node.model.parameters()`` stays valid)::

    node = dimat.Node(model, topology, rank, transport, batches=my_batches, method="dimat")
    for r in range(rounds):
        result = node.merge_round(r)        # exchange + merge, model updated in place
        train_for_a_while(model, optimizer)  # the user's own loop

The in-process runner, ``dimat agent`` and ``dimat launch`` all run their rounds through this class.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dimat import merge as merge_ops
from dimat.transport.base import Transport

__all__ = ["Node", "MergeResult", "BASIS_KEY", "with_basis_tag"]

log = logging.getLogger(__name__)

#: Snapshot entry that carries the sender's basis tag when ``basis="shared"``: an int64 scalar, the rank whose
#: unit order the sender's model descends from. It travels like any tensor and never reaches a model.
BASIS_KEY = "__dimat_basis__"


def with_basis_tag(state: Dict[str, torch.Tensor], tag: int) -> Dict[str, torch.Tensor]:
    """``state`` plus the :data:`BASIS_KEY` entry (a new dict; the tensors are shared, not copied)."""
    return {**state, BASIS_KEY: torch.tensor(int(tag), dtype=torch.int64)}


@dataclass
class MergeResult:
    """What one merge round did.

    Attributes
    ----------
    round : the round number.
    received : ranks whose round-r snapshot arrived and was merged.
    missing : neighbour ranks whose snapshot did not arrive in time (their weight was redistributed).
    weights : rank -> mixing weight used (own rank included; sums to 1).
    merge_s : seconds spent building neighbour models and merging (including the BatchNorm reset).
    comm_s : seconds spent posting and collecting snapshots.
    bytes_sent, bytes_received : payload bytes the transport counted since the previous merge round (or since the
        node was built) up to the end of this round's collect. Transports that send and receive in the background
        (gRPC) count a transfer when it completes, so per-round figures are attributed at collect time.
    """

    round: int
    received: List[int] = field(default_factory=list)
    missing: List[int] = field(default_factory=list)
    weights: Dict[int, float] = field(default_factory=dict)
    merge_s: float = 0.0
    comm_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def comm_bytes(self) -> int:
        """Bytes sent plus bytes received this round."""
        return self.bytes_sent + self.bytes_received


def mixing_matrix(topology: Any) -> np.ndarray:
    """The N x N mixing matrix pi of a topology object (attribute ``pi``) or of an array-like."""
    pi = getattr(topology, "pi", topology)
    pi = np.asarray(pi, dtype=np.float64)
    if pi.ndim != 2 or pi.shape[0] != pi.shape[1]:
        raise ValueError(f"the topology's mixing matrix must be square, got shape {pi.shape}")
    return pi


class Node:
    """One agent of a decentralized merge-and-train run.

    Parameters
    ----------
    model : the agent's model; merges are loaded into it in place.
    topology : a :class:`dimat.topology.Topology` (its ``neighbors(rank)`` and ``pi``), or an N x N mixing
        matrix, in which case the neighbours are the ranks j != rank with ``pi[rank][j] > 0``.
    rank : this agent's index in the topology.
    transport : moves snapshots (:class:`dimat.transport.base.Transport`); unused when ``method="none"``.
    batches : re-iterable of local ``(input, target)`` batches (or input tensors) for activation statistics and
        the BatchNorm reset.
    method : merge operator name from :data:`dimat.merge.METHODS` (``dimat``, ``wa``, ``wm``), or ``none`` for
        local training only (no exchange at all).
    stat_batches : number of batches for activation statistics (None: all of ``batches``).
    reset_bn : recompute BatchNorm statistics of the merged model on local batches (no-op without BatchNorm).
    bn_batches : None (default): the operator does the reset itself, on the ``stat_batches`` batches (``dimat``
        then also applies its REPAIR variance correction to layers without BatchNorm). An int: the operator does
        no reset and the node recomputes BatchNorm statistics on that many batches (no REPAIR correction).
    basis : whose units the neighbours are aligned to. ``"own"`` (DIMAT as published): the agent's own model, so
        every agent keeps a basis of its own and every round needs a fresh, lossy alignment of every neighbour.
        ``"shared"``: every model carries a basis tag, the rank whose unit order it descends from (at first its
        own rank), sent with its snapshot. A merge takes as reference the participant with the lowest tag (this
        agent's own model when its tag is that low), aligns only the models whose tag differs, averages those
        that carry the reference's tag as they are, and gives the result that tag. The lowest rank's basis spreads
        one hop per round; once every agent carries it, a merge is the operator with identity permutations: the
        weighted average, then the statistics repair the operator does (the BatchNorm reset, and for ``dimat`` and
        ``wm`` REPAIR's correction of layers no BatchNorm follows), i.e. ``merge.average(..., reset_bn=True,
        repair=True)``; for ``wa``, the average plus the BatchNorm reset.
        The weights, the data the statistics are computed on (the agent's own batches) and where the result goes
        do not change. A snapshot without a valid tag is aligned, as under ``"own"``.
    """

    BASES = ("own", "shared")

    def __init__(
        self,
        model: nn.Module,
        topology: Any,
        rank: int,
        transport: Optional[Transport],
        batches: Optional[Iterable[Any]],
        method: str = "dimat",
        stat_batches: Optional[int] = None,
        bn_batches: Optional[int] = None,
        reset_bn: bool = True,
        basis: str = "own",
    ):
        if basis not in self.BASES:
            raise ValueError(f"basis must be one of {', '.join(self.BASES)}, got {basis!r}")
        pi = mixing_matrix(topology)
        if not 0 <= rank < len(pi):
            raise ValueError(f"rank {rank} is outside the topology's {len(pi)} agents")
        self.model = model
        self.topology = topology
        self.rank = int(rank)
        self.pi_row = pi[rank]
        if hasattr(topology, "neighbors"):  # a Topology: its connectivity decides, even where a weight is 0
            self.neighbors: List[int] = list(topology.neighbors(self.rank))
        else:
            self.neighbors = [j for j in range(len(pi)) if j != rank and pi[rank][j] > 0]
        self.method = method
        self.merge_fn = None if method == "none" else merge_ops.get(method)
        if self.merge_fn is not None and transport is None:
            raise ValueError(f"method {method!r} exchanges models: give a transport")
        self.transport = transport
        self.batches = batches
        self.stat_batches = stat_batches
        self.bn_batches = bn_batches
        self.reset_bn = reset_bn
        self.basis = basis
        self.basis_tag = self.rank  # under "shared": whose unit order self.model is in (see `basis`)
        self._posted: Optional[int] = None
        self._post_s = 0.0  # seconds of the last post
        # Byte counters at the end of the previous round: gRPC counts bytes in background threads as transfers
        # complete, so a round's bytes are the counters' growth between collects, not their change during a call.
        self._bytes_mark = (transport.bytes_sent, transport.bytes_received) if transport is not None else (0, 0)

    # ----------------------------------------------------------------------------------------------- exchange
    def post(self, r: int) -> None:
        """Send the model's current weights as this agent's round-``r`` snapshot (once per round)."""
        if self.merge_fn is None or self._posted == r:
            return
        t0 = time.perf_counter()
        state = self.model.state_dict()
        if self.basis == "shared":
            state = with_basis_tag(state, self.basis_tag)
        self.transport.post(r, state)
        self._post_s = time.perf_counter() - t0
        self._posted = r

    def merge_round(self, r: int) -> MergeResult:
        """Exchange round-``r`` snapshots with the neighbours and merge them into ``self.model`` in place.

        Posts first unless :meth:`post` was already called for ``r``. The own model's weight and the weights of
        the snapshots that arrived are taken from ``pi[rank]`` and renormalised to sum to 1. When no neighbour
        snapshot arrived, the model is left unchanged.
        """
        result = MergeResult(round=r, weights={self.rank: 1.0})
        if self.merge_fn is None:
            return result
        self.post(r)
        t0 = time.perf_counter()
        snapshots = self.transport.collect(r)
        result.comm_s = self._post_s + time.perf_counter() - t0
        mark = (self.transport.bytes_sent, self.transport.bytes_received)
        result.bytes_sent, result.bytes_received = mark[0] - self._bytes_mark[0], mark[1] - self._bytes_mark[1]
        self._bytes_mark = mark
        result.received = sorted(j for j in snapshots if j in self.neighbors)
        result.missing = [j for j in self.neighbors if j not in snapshots]
        ranks = [self.rank] + result.received
        raw = [float(self.pi_row[j]) for j in ranks]
        total = sum(raw)
        if total <= 0:  # e.g. a zero self-weight and no neighbour arrived: keep what we have
            raw, total = [1.0] * len(ranks), float(len(ranks))
        result.weights = {j: w / total for j, w in zip(ranks, raw)}
        if not result.received:
            return result
        t0 = time.perf_counter()
        self._merge(ranks, snapshots, result.weights)
        result.merge_s = time.perf_counter() - t0
        return result

    # -------------------------------------------------------------------------------------------------- merge
    def _neighbor_model(self, snapshot: Dict[str, torch.Tensor]) -> nn.Module:
        # load_state_dict copies into the clone's own tensors: the received snapshot is never written to.
        m = copy.deepcopy(self.model)
        m.load_state_dict({k: v for k, v in snapshot.items() if k != BASIS_KEY})
        return m

    def _tag_of(self, rank: int, snapshot: Dict[str, torch.Tensor]) -> Optional[int]:
        """The basis tag a neighbour's snapshot carries; None (align it) when it has none or an invalid one."""
        t = snapshot.get(BASIS_KEY)
        if t is None:
            return None
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.is_floating_point() or t.is_complex() \
                or not 0 <= int(t) < len(self.pi_row):
            log.warning("agent %d: the basis tag from agent %d is not a rank of this topology; aligning it",
                        self.rank, rank)
            return None
        return int(t)

    def _order(self, ranks: Sequence[int], snapshots: Dict[int, Dict[str, torch.Tensor]]
               ) -> tuple[List[int], List[int], int]:
        """Participants with the reference first, the positions (>= 1) already in the reference's basis, and the
        reference's tag (the merged model's)."""
        if self.basis != "shared":
            return list(ranks), [], self.basis_tag
        tags = {j: self.basis_tag if j == self.rank else self._tag_of(j, snapshots[j]) for j in ranks}
        ref = min(t for t in tags.values() if t is not None)  # own tag is always valid
        # The reference's holder: this agent if it carries the reference tag, else the lowest such rank.
        order = sorted(ranks, key=lambda j: (tags[j] != ref, j != self.rank, j))
        return order, [i for i, j in enumerate(order) if i > 0 and tags[j] == ref], ref

    @torch.no_grad()
    def _merge(self, ranks: Sequence[int], snapshots: Dict[int, Dict[str, torch.Tensor]],
               weights: Dict[int, float]) -> None:
        # The operator aligns every model to the first one it is given.
        order, same, tag = self._order(ranks, snapshots)
        models = [self.model if j == self.rank else self._neighbor_model(snapshots[j]) for j in order]
        own_reset = self.reset_bn and self.bn_batches is not None  # a separate batch budget for the BN reset
        kw = {"same_basis": same} if same else {}
        merged = self.merge_fn(models, [weights[j] for j in order], batches=self.batches,
                               reset_bn=self.reset_bn and not own_reset, stat_batches=self.stat_batches, **kw)
        if own_reset and self.batches is not None:
            merge_ops.reset_bn_stats(merged, self.batches, self.bn_batches)
        self.model.load_state_dict(merged.state_dict())
        self.basis_tag = tag  # only once the merged model is in place
