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
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from dimat import merge as merge_ops
from dimat.merge import combine as combine_mod
from dimat.merge import head as head_mod
from dimat.merge import payload as payload_mod
from dimat.merge import stats as stats_mod
from dimat.transport.base import Transport, snapshot_nbytes

__all__ = ["Node", "MergeResult", "BASIS_KEY", "STATS_LANE", "with_basis_tag"]

log = logging.getLogger(__name__)

#: Payload kind of the class counts sent under ``head="label_counts"`` (snapshot entry
#: ``__dimat_payload__.labels.counts``, float64 ``[classes]``).
LABELS_KIND = "labels"

#: Snapshot entry that carries the sender's basis tag when ``basis="shared"``: an int64 scalar, the rank whose
#: unit order the sender's model descends from. It travels like any tensor and never reaches a model.
BASIS_KEY = "__dimat_basis__"


#: The transport lane of the second message of a round under ``stats="both"``: per neighbour, the activation
#: statistics of the pair (my model, its model) on my data (:func:`dimat.merge.stats.encode_pair_stats`).
STATS_LANE = "pair_stats"


def with_basis_tag(state: Dict[str, torch.Tensor], tag: int) -> Dict[str, torch.Tensor]:
    """``state`` plus the :data:`BASIS_KEY` entry (a new dict; the tensors are shared, not copied)."""
    return {**state, BASIS_KEY: torch.tensor(int(tag), dtype=torch.int64)}


def compose_snapshot(state: Dict[str, torch.Tensor], payload: Optional[Tuple[str, Dict[str, torch.Tensor]]] = None,
                     counts: Optional[torch.Tensor] = None, tag: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """What a snapshot holds, in one place for :meth:`Node.post` and :meth:`Node.template_snapshot`: the model's
    ``state``, then the combine rule's ``payload`` (kind, tensors), the class ``counts`` (float64 ``[classes]``)
    and the basis ``tag``; each None part is left out. A new dict; the tensors are shared, not copied."""
    if payload is not None:
        state = {**state, **payload_mod.encode(*payload)}
    if counts is not None:
        state = {**state, **payload_mod.encode(LABELS_KIND, {"counts": counts})}
    return state if tag is None else with_basis_tag(state, tag)


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
    telemetry : merge telemetry (empty when nothing was merged): ``edges``, neighbour rank -> ``dist`` (relative
        L2 distance between the merged parameters and the neighbour's aligned parameters, before the BatchNorm
        reset), ``moved`` (share of the neighbour's units that alignment moved) and, for ``dimat``,
        ``corr_before`` / ``corr_after`` (mean correlation of the units in place, then of the matched units);
        and the means of these over the edges: ``consensus_dist``, ``units_moved``, ``align_corr_before``,
        ``align_corr_after``.
    ages : for each rank in ``received``, how many rounds old its snapshot was (round minus the snapshot's round;
        always 0 in synchronous rounds, up to the staleness bound in asynchronous ones, negative when the
        neighbour is ahead).
    stats_both : under ``stats="both"``, the neighbours whose pair with this agent was aligned on statistics
        pooled from both agents' data.
    stats_fallback : under ``stats="both"``, neighbour rank -> why its edge was aligned on my data only (its
        statistics message did not arrive in time, or was refused).
    stats_unused : under ``stats="both"`` with ``basis="shared"``, the neighbours whose statistics arrived valid
        but were not needed: the merge aligned no model of that pair to the other (the reference was a third
        agent's basis, or the adoption check changed the reference).
    stats_bytes : under ``stats="both"``, bytes of pair-statistics messages I posted (one per receiver) plus those
        I received this round (also counted in ``bytes_sent`` / ``bytes_received``).
    """

    round: int
    received: List[int] = field(default_factory=list)
    missing: List[int] = field(default_factory=list)
    weights: Dict[int, float] = field(default_factory=dict)
    merge_s: float = 0.0
    comm_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    telemetry: Dict[str, Any] = field(default_factory=dict)
    ages: List[int] = field(default_factory=list)
    stats_both: List[int] = field(default_factory=list)
    stats_fallback: Dict[int, str] = field(default_factory=dict)
    stats_unused: List[int] = field(default_factory=list)
    stats_bytes: int = 0

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
    topology : a :class:`dimat.topology.Topology` (its ``neighbors(rank)`` and ``pi``), an N x N mixing
        matrix, in which case the neighbours are the ranks j != rank with ``pi[rank][j] > 0``, or a
        :class:`dimat.schedule.Schedule`, whose round-r graph round r uses (:meth:`graph_at`; the transport must
        follow the same schedule). :attr:`neighbors` is then every agent this one merges in some round.
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
    bn_repair : how ``reset_bn`` sets the merged BatchNorm statistics (:data:`dimat.merge.repair.BN_REPAIRS`).
        ``"local"``: recomputed on the local batches. ``"mix"``: the mixture of the aligned participants' own
        running statistics, its variance corrected by the collapse ratio measured on local batches, so that a
        skewed local split does not set the merged model's normalisation (see ``activation_match``'s
        ``bn_repair``). With ``bn_batches`` set, the operator does this on ``bn_batches`` batches, without REPAIR.
        ``"mix"`` reads the statistics the snapshots carry, so it needs ``bn_refresh``.
    bn_refresh : before posting a snapshot, re-estimate the model's BatchNorm running statistics in place on the
        local batches (``bn_batches``, else ``stat_batches``; :func:`dimat.merge.repair.refresh_bn_stats`), so that
        the snapshot's statistics describe its current weights on its owner's data rather than an exponential
        average over the last training steps. Activation matching runs the models in eval mode, so it sees them
        too. The seconds count in the round's ``merge_s``.
    basis : whose units the neighbours are aligned to. ``"own"`` (DIMAT as published): the agent's own model, so
        every agent keeps a basis of its own and every round needs a fresh, lossy alignment of every neighbour.
        ``"shared"`` (the default: it ended higher than ``"own"`` in every comparison in docs/benchmarks.md,
        docs/merge.md and docs/run-results.md): every model carries a basis tag, the rank whose unit order it
        descends from (at first its own rank), sent with its snapshot. A merge takes as reference the
        participant with the lowest tag (this agent's own model when its tag is that low), aligns only the models
        whose tag differs, averages those that carry the reference's tag as they are, and gives the result that
        tag. The lowest rank's basis spreads one hop per round; once every agent carries it, a merge is the
        operator with identity permutations: the weighted average, then the statistics repair the operator does
        (the BatchNorm reset, and for ``dimat`` and ``wm`` REPAIR's correction of layers no BatchNorm follows),
        i.e. ``merge.average(..., reset_bn=True, repair=True)``. Only the aligning methods (:attr:`ALIGNING`)
        send tags; ``wa`` never permutes, so the basis changes nothing there.
        The weights, the data the statistics are computed on (the agent's own batches) and where the result goes
        do not change. A snapshot without a valid tag is aligned, as under ``"own"``.
    basis_tag : under ``basis="shared"``, the tag the model starts with (None: this agent's rank). Agents that
        start from one initialisation already share a unit order: give them all the same tag (the runners give 0 to
        every agent when ``model.init`` is ``same``), and their merges never align, which is the plain
        weighted average plus the statistics repair. Models from different initialisations must keep distinct
        tags, or they are averaged unaligned.
    combine : how aligned models are combined (:class:`dimat.merge.combine.CombineOptions`; None: the weighted
        mean). Rules that need a payload (``fisher``, ``regmean``) compute it on ``stat_batches`` local batches
        at post time and send it inside the snapshot under reserved names.
    combine_seed : the run's seed; ``dare`` draws its drops from a generator seeded by (seed, round, rank).
    identity_prior, keep_margin : alignment guards of ``dimat`` (see :mod:`dimat.merge.guard`).
    min_corr : ``dimat`` only: a neighbour's unit joins the average only where its matched correlation reaches
        this (None: every unit is averaged, as published; see ``activation_match``'s ``min_corr``). The
        telemetry's edges then carry ``kept``, the share of that neighbour's units that did. ``"auto"`` (the
        default): :attr:`MIN_CORR` for ``dimat`` with the ``mean`` combine rule, None otherwise. With class counts
        (``head="label_counts"``) it applies only to a participant that shares a class with the merge's
        reference: a reference that never saw any of the participant's classes has no feature of them to keep in
        place of the participant's units, so all of them join (:func:`dimat.merge.head.min_corr_by_classes`); the
        telemetry lists such aligned participants in ``min_corr_off``. ``min_corr_scope="all"`` applies it to every
        participant, as before this rule.
    adopt_min_acc : under ``basis="shared"``, when a merge's reference is a neighbour's basis (a lower tag than
        this agent's), the model that holds it must first reach this accuracy on the local batches
        (``stat_batches`` of them, in eval mode), or the agent keeps its own basis for the merge: it aligns the
        others to its own model instead, and its tag does not change. Adopting a basis, with ``min_corr``,
        replaces most of this agent's units by that model's, which is only worth it when that model knows
        something of this agent's data; on label-disjoint splits it scores nothing here and adopting it throws
        the agent's own classes away. ``"auto"``: chance, 1 / the number of outputs of a model that returns
        ``[batch, classes]`` logits for integer labels; the check is skipped (the basis adopted, with one warning)
        for models or batches without them. None (the default): always adopt; the check won on one benchmark and
        lost on another (docs/merge.md, "Keeping one's own basis"). The telemetry carries ``adopt`` (the holder's
        rank and accuracy, the threshold and whether it was adopted) for every merge it checked.
    head : how the output layer (the ``nn.Linear`` that returns the logits, found by running the model once) is
        combined. ``"mean"``: like every other layer. ``"label_counts"``: class by class, the row and bias of class
        c weighted by each participant's mixing weight times its number of samples of class c (a class nobody has
        samples of: the mean; see :func:`dimat.merge.combine.class_weighted_mean`); every snapshot then carries
        this agent's samples per class (C float64 values, which reveal its label distribution). ``"auto"``
        (default): ``"label_counts"`` for ``method="dimat"`` with the ``mean`` rule, else ``"mean"``. A model
        without such a layer, or a neighbour's missing or invalid counts, average the layer with a warning; the
        telemetry carries ``head``.
    label_counts : this agent's samples per class (for ``head="label_counts"``); None (default): counted once over
        all of ``batches`` (integer labels in the batches' second element).
    min_corr_scope : ``"shared_classes"`` (default): with class counts, ``min_corr`` leaves out units only of the
        participants that share a class with the merge's reference (see ``min_corr``); ``"all"``: of every
        participant.
    restore_norms : after combining, give every unit of a conv/linear layer that only a BatchNorm reads the mean
        weight norm it had in the participants, so that the merged model trains at their effective step size
        (see ``activation_match``'s ``restore_norms``). Needs ``reset_bn`` and ``batches``.
    stats : whose data ``dimat`` aligns a neighbour on. ``"own"`` (as published): activation statistics on this
        agent's batches only. ``"both"``: a second, small message per round (transport lane :data:`STATS_LANE`):
        each agent computes, on its own batches, the statistics of the pair (its model, the neighbour's snapshot)
        for every neighbour whose snapshot arrived (the same pair statistics it aligns on itself, computed once),
        and sends each neighbour its pair's; each side then aligns on the two sides' statistics pooled (weighted
        by sample counts). Only moments of activations travel (per activation site of C units: C x C
        cross-moments plus 4 C moments, float32), never inputs or labels. An edge whose message does not arrive
        or is refused is aligned on this agent's statistics alone, with a warning and an entry in
        :attr:`MergeResult.stats_fallback`. Under ``basis="shared"`` the pair statistics are computed and sent
        only for neighbours whose basis tag differs from this agent's (one of the two may then be aligned to the
        other), and pooled statistics are used for the one pair of the merge that involves this agent and its
        reference: this model aligned to a neighbour's basis, or a neighbour aligned to this model's; the other
        neighbours are aligned to the reference on this agent's statistics. Needs ``method="dimat"`` and a
        transport with messages (``supports_messages``). Several nodes in one process: call :meth:`post` on all, then
        :meth:`gather` on all, then :meth:`merge_round` (as :func:`dimat.loop.run_round` does).
    """

    BASES = ("own", "shared")
    STATS = ("own", "both")
    HEADS = ("auto", "mean", "label_counts")
    #: Methods whose merges permute units, so that under ``basis="shared"`` their snapshots carry basis tags.
    ALIGNING = ("dimat", "wm")
    #: Values of ``min_corr_scope`` (:data:`dimat.merge.head.MIN_CORR_SCOPES`).
    MIN_CORR_SCOPES = head_mod.MIN_CORR_SCOPES

    #: What ``min_corr="auto"`` means for ``dimat`` with the ``mean`` combine rule (docs/merge.md, "Averaging only
    #: the units that match").
    MIN_CORR = 0.7

    @classmethod
    def resolve_head(cls, head: str, method: str, rule: str) -> str:
        """The output-layer combine a node with ``method`` and combine ``rule`` uses: ``"auto"`` is
        ``"label_counts"`` for ``dimat`` with ``mean`` and ``"mean"`` otherwise; ``"label_counts"`` needs the
        ``mean`` rule and a merging method (ValueError)."""
        if head not in cls.HEADS:
            raise ValueError(f"head must be one of {', '.join(cls.HEADS)}, got {head!r}")
        if head == "auto":
            return "label_counts" if method == "dimat" and rule == "mean" else "mean"
        if head == "label_counts" and (rule != "mean" or method == "none"):
            raise ValueError(f"head 'label_counts' combines the output layer class by class within the mean: "
                             f"a merging method with combine rule 'mean' only, got method {method!r}, rule {rule!r}")
        return head

    @classmethod
    def sends_tag(cls, basis: str, method: str) -> bool:
        """Whether a node's snapshots carry its basis tag: under ``basis="shared"``, for the methods that permute
        units (plain averaging sends none under either basis)."""
        return basis == "shared" and method in cls.ALIGNING

    @classmethod
    def template_snapshot(cls, model: nn.Module, example: torch.Tensor, method: str, basis: str,
                          combine: combine_mod.CombineOptions, head: str) -> Dict[str, torch.Tensor]:
        """A snapshot with the layout a node of these settings posts (values irrelevant: zeros for the payload
        and class counts, tag 0), for a transport that checks every snapshot's manifest before allocating
        anything. ``example``: one input batch, to find the output layer as :meth:`post` does."""
        kind = combine.payload
        payload = None if kind is None else (kind, payload_mod.template(kind, model, combine.regmean_max_inputs))
        counts = None
        if method != "none" and cls.resolve_head(head, method, combine.rule) == "label_counts":
            layer, _ = head_mod.output_layer(model, example)  # counts only where the layer is found, as in post
            if layer is not None:
                counts = torch.zeros(layer.classes, dtype=torch.float64)
        return compose_snapshot(model.state_dict(), payload, counts, 0 if cls.sends_tag(basis, method) else None)

    @classmethod
    def resolve_min_corr(cls, min_corr: Union[float, str, None], method: str, rule: str) -> Optional[float]:
        """The threshold a node with ``method`` and combine ``rule`` uses: ``"auto"`` is :attr:`MIN_CORR` for
        ``dimat`` with ``mean`` and None otherwise; a number needs the ``mean`` rule (ValueError)."""
        if isinstance(min_corr, str):
            if min_corr != "auto":
                raise ValueError(f"min_corr must be a number, None or 'auto', got {min_corr!r}")
            return cls.MIN_CORR if method == "dimat" and rule == "mean" else None
        if min_corr is not None and rule != "mean":
            raise ValueError(f"min_corr leaves poorly matched units out of the mean: combine rule 'mean' only, got "
                             f"{rule!r}")
        return min_corr

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
        basis: str = "shared",
        combine: Optional[combine_mod.CombineOptions] = None,
        combine_seed: int = 0,
        identity_prior: float = 0.0,
        keep_margin: Optional[float] = None,
        bn_repair: str = "local",
        bn_refresh: bool = False,
        stats: str = "own",
        basis_tag: Optional[int] = None,
        restore_norms: bool = False,
        min_corr: Union[float, str, None] = "auto",
        adopt_min_acc: Union[float, str, None] = None,
        head: str = "auto",
        min_corr_scope: str = "shared_classes",
        label_counts: Optional[Sequence[float]] = None,
    ):
        if stats not in self.STATS:
            raise ValueError(f"stats must be one of {', '.join(self.STATS)}, got {stats!r}")
        if stats == "both":
            if method != "dimat":
                raise ValueError(f"stats='both' pools activation statistics for matching: method 'dimat' only, "
                                 f"got {method!r}")
            if transport is not None and not getattr(transport, "supports_messages", False):
                raise ValueError(f"stats='both' needs a transport that carries a second message per round, and "
                                 f"{type(transport).__name__} does not (supports_messages is false)")
            if getattr(transport, "sync", True) is False:
                raise ValueError("stats='both' needs synchronous rounds: both sides' statistics must be of the "
                                 "same round's models (the transport has sync=False)")
        if basis not in self.BASES:
            raise ValueError(f"basis must be one of {', '.join(self.BASES)}, got {basis!r}")
        # A time-varying topology (a dimat.schedule.Schedule) gives each round its own graph; see graph_at.
        self.schedule = topology if hasattr(topology, "round_peers") else None
        pi = mixing_matrix(topology.at(0) if self.schedule is not None else topology)
        if not 0 <= rank < len(pi):
            raise ValueError(f"rank {rank} is outside the topology's {len(pi)} agents")
        self.model = model
        self.topology = topology
        self.rank = int(rank)
        self.pi_row = pi[rank]
        if self.schedule is not None:
            self.neighbors: List[int] = list(self.schedule.potential_neighbors(self.rank))
        elif hasattr(topology, "neighbors"):  # a Topology: its connectivity decides, even where a weight is 0
            self.neighbors = list(topology.neighbors(self.rank))
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
        merge_ops.operators.check_bn_repair(bn_repair)
        if bn_repair == "mix" and not bn_refresh:
            raise ValueError("bn_repair 'mix' mixes the running statistics the snapshots carry: set bn_refresh=True "
                             "so that they describe the current weights (not a stale training average)")
        if bn_refresh and batches is None and method != "none":
            raise ValueError("bn_refresh re-estimates BatchNorm statistics on local batches: give batches")
        self.bn_repair = bn_repair
        self.bn_refresh = bool(bn_refresh)
        self.basis = basis
        # Tags only matter where a merge permutes units; plain averaging (wa) sends none under either basis.
        self._tagged = self.sends_tag(basis, method)
        if basis_tag is not None and not (isinstance(basis_tag, (int, np.integer)) and 0 <= basis_tag < len(pi)):
            raise ValueError(f"basis_tag must be a rank of the topology's {len(pi)} agents, got {basis_tag!r}")
        # under "shared": whose unit order self.model is in (see `basis`)
        self.basis_tag = self.rank if basis_tag is None else int(basis_tag)
        self.combine = combine or combine_mod.CombineOptions()
        self.combine_seed = int(combine_seed)
        min_corr = self.resolve_min_corr(min_corr, method, self.combine.rule)
        self.min_corr = min_corr
        self._guards = {"identity_prior": float(identity_prior), "keep_margin": keep_margin, "min_corr": min_corr}
        if method != "dimat" and (identity_prior or keep_margin is not None or min_corr is not None):
            raise ValueError(f"identity_prior, keep_margin and min_corr act on activation matching; method "
                             f"{method!r} has none")
        if not isinstance(restore_norms, bool):
            raise ValueError(f"restore_norms must be True or False, got {restore_norms!r}")
        if restore_norms and (not reset_bn or batches is None) and self.merge_fn is not None:
            raise ValueError("restore_norms rescales weights that a BatchNorm normalises: it needs reset_bn=True "
                             "and batches, so that the statistics are recomputed after it")
        self.restore_norms = restore_norms
        if adopt_min_acc is not None and adopt_min_acc != "auto" and (
                isinstance(adopt_min_acc, (bool, str)) or not isinstance(adopt_min_acc, (int, float))
                or not 0.0 <= float(adopt_min_acc) <= 1.0):
            raise ValueError(f"adopt_min_acc must be an accuracy in [0, 1], None or 'auto', got {adopt_min_acc!r}")
        self.adopt_min_acc = adopt_min_acc
        head_mod.check_min_corr_scope(min_corr_scope)
        self.min_corr_scope = min_corr_scope
        self._adopt_unchecked_warned = False
        self.head = self.resolve_head(head, method, self.combine.rule)
        if label_counts is not None:
            label_counts = torch.as_tensor(label_counts, dtype=torch.float64)
            if not head_mod.counts_ok(label_counts):
                raise ValueError("label_counts must be a vector of samples per class: finite, >= 0, not all 0")
        self._label_counts = label_counts
        self._output: Optional[head_mod.OutputLayer] = None  # found at the first post under head label_counts
        self._output_checked = False
        self.stats = stats
        # The round in progress, from gather(): its snapshots, seconds collecting, the neighbour models and my pair
        # statistics for them, stats bytes posted and seconds computing them.
        self._gathered: Optional[tuple] = None  # (round, snapshots, comm_s, models, pair stats, bytes, stats_s)
        self._payload: Optional[Dict[str, torch.Tensor]] = None  # this round's own payload (in own unit order)
        self._payload_s = 0.0
        self._posted: Optional[int] = None
        self._post_s = 0.0  # seconds of the last post
        # Byte counters at the end of the previous round: gRPC counts bytes in background threads as transfers
        # complete, so a round's bytes are the counters' growth between collects, not their change during a call.
        self._bytes_mark = (transport.bytes_sent, transport.bytes_received) if transport is not None else (0, 0)

    def graph_at(self, r: int) -> tuple[List[int], np.ndarray]:
        """Round ``r``'s neighbours of this agent and its row of the mixing matrix (the same every round for a
        static topology)."""
        if self.schedule is None:
            return self.neighbors, self.pi_row
        g = self.schedule.at(r)
        return g.neighbors(self.rank), g.pi[self.rank]

    # ----------------------------------------------------------------------------------------------- exchange
    def post(self, r: int) -> None:
        """Send the model's current weights as this agent's round-``r`` snapshot (once per round)."""
        if self.merge_fn is None or self._posted == r:
            return
        self._payload_s = 0.0
        if self.bn_refresh:  # before the payload: it may read the statistics
            t0 = time.perf_counter()
            n = self.bn_batches if self.bn_batches is not None else self.stat_batches
            merge_ops.repair.refresh_bn_stats(self.model, lambda: merge_ops.iter_inputs(self.batches, n))
            self._payload_s = time.perf_counter() - t0
        kind = self.combine.payload
        if kind is not None:  # computed before the clock of the exchange starts: merge work, not communication
            t0 = time.perf_counter()
            self._payload = payload_mod.compute(kind, self.model, self.batches, self.stat_batches,
                                                self.combine.fisher_samples, self.combine.regmean_max_inputs)
            self._payload_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        state = compose_snapshot(self.model.state_dict(), None if kind is None else (kind, self._payload),
                                 self._class_counts(), self.basis_tag if self._tagged else None)
        self.transport.post(r, state)
        self._post_s = time.perf_counter() - t0
        self._posted = r

    def gather(self, r: int) -> None:
        """Phase 1 of round ``r`` (posts first if needed): collect the neighbours' round-``r`` snapshots. Under
        ``stats="both"`` also compute, on my batches, the pair statistics (my model, each neighbour that arrived)
        and post each neighbour its pair's (phase 2). Once per round; :meth:`merge_round` calls it when needed."""
        if self.merge_fn is None or (self._gathered is not None and self._gathered[0] == r):
            return
        self.post(r)
        t0 = time.perf_counter()
        snapshots = self.transport.collect(r)
        comm_s = self._post_s + time.perf_counter() - t0
        models: Dict[int, nn.Module] = {}
        pair: Dict[int, list] = {}
        sent, stats_s = 0, 0.0  # stats_s: seconds computing pair statistics (merge work, counted in merge_s)
        if self.stats == "both":
            neighbors, _ = self.graph_at(r)
            ranks = sorted(j for j in snapshots if j in neighbors and self._may_align(snapshots[j]))
            messages: Dict[int, Dict[str, torch.Tensor]] = {}
            if ranks and self.batches is not None:
                t1 = time.perf_counter()
                models = {j: self._neighbor_model(snapshots[j]) for j in ranks}
                per = merge_ops.pair_statistics([self.model] + [models[j] for j in ranks], self.batches,
                                                self.stat_batches)
                stats_s = time.perf_counter() - t1
                if per and per[0]:  # a model without activation sites has nothing to align on either side
                    pair = dict(zip(ranks, per))
                    messages = {j: stats_mod.encode_pair_stats(pair[j]) for j in ranks}
            # Posted every round, even empty: a synchronous transport keeps its sends and receives matched.
            t1 = time.perf_counter()
            self.transport.post_messages(r, STATS_LANE, messages)
            comm_s += time.perf_counter() - t1
            sent = sum(snapshot_nbytes(m) for m in messages.values())
        self._gathered = (r, snapshots, comm_s, models, pair, sent, stats_s)

    def merge_round(self, r: int) -> MergeResult:
        """Exchange round-``r`` snapshots with the neighbours and merge them into ``self.model`` in place.

        Posts and gathers first unless :meth:`post` / :meth:`gather` were already called for ``r``. The own
        model's weight and the weights of the snapshots that arrived are taken from ``pi[rank]`` and renormalised
        to sum to 1. When no neighbour snapshot arrived, the model is left unchanged.
        """
        result = MergeResult(round=r, weights={self.rank: 1.0})
        if self.merge_fn is None:
            return result
        self.gather(r)
        _, snapshots, result.comm_s, models, pair, sent, stats_s = self._gathered
        self._gathered = None
        neighbors, pi_row = self.graph_at(r)
        result.received = sorted(j for j in snapshots if j in neighbors)
        result.missing = [j for j in neighbors if j not in snapshots]
        pair_stats = None
        if self.stats == "both":
            t0 = time.perf_counter()
            pair_stats = self._pool_stats(r, pair, result)
            result.comm_s += time.perf_counter() - t0
            result.stats_bytes += sent
        mark = (self.transport.bytes_sent, self.transport.bytes_received)
        result.bytes_sent, result.bytes_received = mark[0] - self._bytes_mark[0], mark[1] - self._bytes_mark[1]
        self._bytes_mark = mark
        rounds = getattr(self.transport, "snapshot_rounds", None) or {}  # transports with asynchronous rounds
        result.ages = [r - int(rounds.get(j, r)) for j in result.received]
        ranks = [self.rank] + result.received
        raw = [float(pi_row[j]) for j in ranks]
        total = sum(raw)
        if total <= 0:  # e.g. a zero self-weight and no neighbour arrived: keep what we have
            raw, total = [1.0] * len(ranks), float(len(ranks))
        result.weights = {j: w / total for j, w in zip(ranks, raw)}
        if not result.received:
            return result
        t0 = time.perf_counter()
        result.telemetry = self._merge(ranks, snapshots, result.weights, r, models, pair_stats)
        result.merge_s = time.perf_counter() - t0 + self._payload_s + stats_s
        if pair_stats is not None:
            used = set(result.telemetry.pop("stats_used", ()))
            result.stats_unused = [j for j in result.stats_both if j not in used]
            result.stats_both = [j for j in result.stats_both if j in used]
        return result

    def _class_counts(self) -> Optional[torch.Tensor]:
        """Under ``head="label_counts"``: this agent's samples per class, sent with every snapshot (found once:
        the output layer, then the counts given or counted over all the local batches). None, with
        one warning, where the model has no output layer to combine class by class. An agent whose labels cannot
        be counted sends zeros (its neighbours then average the layer, with a warning), so that every snapshot
        of the run keeps one layout."""
        if self.head != "label_counts" or self.merge_fn is None:
            return None
        if not self._output_checked:
            self._output_checked = True
            why = "no local batches to run the model on"
            if self.batches is not None:
                example = next(merge_ops.iter_inputs(self.batches, 1))
                device = next((t.device for t in self.model.parameters()), torch.device("cpu"))
                self._output, why = head_mod.output_layer(self.model, example.to(device))
            if self._output is None:
                log.warning("agent %d: head label_counts: %s; the output layer is averaged like the others",
                            self.rank, why)
                return None
            classes = self._output.classes
            counts = self._label_counts
            if counts is None and self.batches is not None:
                counts = head_mod.count_labels(self.batches, classes)
            if counts is None or counts.numel() != classes or float(counts.sum()) <= 0:
                log.warning("agent %d: head label_counts: %s; sending no class counts (the neighbours average the "
                            "output layer)", self.rank,
                            "the local batches carry no labels in 0..%d" % (classes - 1) if counts is None
                            else f"{counts.numel()} class counts for an output layer of {classes} classes"
                            if counts.numel() != classes else "no sample counted")
                counts = torch.zeros(classes, dtype=torch.float64)
            self._label_counts = counts
        return None if self._output is None else self._label_counts

    def _class_head(self, order: Sequence[int], snapshots: Dict[int, Dict[str, torch.Tensor]],
                    r: int) -> Optional[combine_mod.ClassHead]:
        """The participants' class counts for a class-by-class output layer, or None (the layer averaged, with a
        warning) when a participant's are missing, of the wrong size, negative, non-finite or all zero."""
        own = self._class_counts()
        if own is None:
            return None
        counts = []
        for j in order:
            c = own if j == self.rank else payload_mod.split(snapshots[j])[1].get(LABELS_KIND, {}).get("counts")
            if not head_mod.counts_ok(c) or tuple(c.shape) != tuple(own.shape):
                log.warning("agent %d, round %d: head label_counts: the class counts of agent %d are missing or "
                            "invalid; averaging the output layer in this merge", self.rank, r, j)
                return None
            counts.append(c.to(torch.float64))
        return combine_mod.ClassHead(self._output.axes, counts)

    def _may_align(self, snapshot: Dict[str, torch.Tensor]) -> bool:
        """Whether a merge may align this agent's model and the snapshot's to each other: always under
        ``basis="own"``; under ``"shared"`` unless the snapshot carries this agent's tag (an invalid tag: yes)."""
        if not self._tagged:
            return True
        t = snapshot.get(BASIS_KEY)
        return not (isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point()
                    and not t.is_complex() and int(t) == self.basis_tag)

    def _pool_stats(self, r: int, pair: Dict[int, list], result: MergeResult) -> Dict[int, list]:
        """Phase 2's receiving side: per neighbour with my pair statistics, those pooled with the ones it sent,
        or mine alone (logged, in ``result.stats_fallback``) when its message is missing or refused."""
        got = self.transport.collect_messages(r, STATS_LANE, sorted(pair))
        pooled: Dict[int, list] = {}
        for j, mine in pair.items():
            msg = got.get(j)
            if msg is None:
                why = "its statistics message did not arrive in time"
            else:
                result.stats_bytes += snapshot_nbytes(msg)
                try:
                    theirs = stats_mod.decode_pair_stats(msg, [st.mean_a.numel() for st in mine])
                    pooled[j] = stats_mod.pool(mine, theirs)
                    result.stats_both.append(j)
                    continue
                except ValueError as e:
                    why = f"its statistics message was refused: {e}"
            log.warning("agent %d, round %d: aligning neighbour %d on my data only (stats both): %s",
                        self.rank, r, j, why)
            result.stats_fallback[j] = why
            pooled[j] = mine
        return pooled

    # -------------------------------------------------------------------------------------------------- merge
    def _neighbor_model(self, snapshot: Dict[str, torch.Tensor]) -> nn.Module:
        # load_state_dict copies into the clone's own tensors: the received snapshot is never written to.
        m = copy.deepcopy(self.model)
        m.load_state_dict({k: v for k, v in payload_mod.split(snapshot)[0].items() if k != BASIS_KEY})
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

    def _order(self, ranks: Sequence[int], snapshots: Dict[int, Dict[str, torch.Tensor]],
               ref: Optional[int] = None) -> tuple[List[int], List[int], int]:
        """Participants with the reference first, the positions (>= 1) already in the reference's basis, and the
        reference's tag (the merged model's): the lowest valid tag, or ``ref``."""
        if not self._tagged:
            return list(ranks), [], self.basis_tag
        tags = {j: self.basis_tag if j == self.rank else self._tag_of(j, snapshots[j]) for j in ranks}
        if ref is None:
            ref = min(t for t in tags.values() if t is not None)  # own tag is always valid
        # The reference's holder: this agent if it carries the reference tag, else the lowest such rank.
        order = sorted(ranks, key=lambda j: (tags[j] != ref, j != self.rank, j))
        return order, [i for i, j in enumerate(order) if i > 0 and tags[j] == ref], ref

    def _combine_hook(self, order: Sequence[int], snapshots: Dict[int, Dict[str, torch.Tensor]], r: int,
                      dist: Dict[int, float], moved: Dict[int, float],
                      class_head: Optional[combine_mod.ClassHead] = None):
        """The operator's combine step: this agent's rule, base and payloads (validated), for participants
        ``order``."""
        kind = self.combine.payload
        payloads = None
        if kind is not None:
            payloads = []
            for j in order:
                if j == self.rank:
                    payloads.append(self._payload)
                    continue
                got = payload_mod.split(snapshots[j])[1].get(kind)
                payload_mod.check(got, self._payload, kind, f"agent {j}")
                payloads.append(got)
        gen = None
        if self.combine.rule == "dare":
            seed = np.random.SeedSequence([self.combine_seed, int(r) + 1, self.rank]).generate_state(2)
            gen = torch.Generator().manual_seed(int(seed[0]) << 32 | int(seed[1]))
        layers = None
        if kind == "gram":
            grams = payload_mod.gram_layers(self.model, self.combine.regmean_max_inputs)
            layers = {n: m.bias is not None for n, m in grams.items()}
        params = {n for n, _ in self.model.named_parameters()}
        return combine_mod.make_hook(self.combine, list(order).index(self.rank), params, payloads, layers, gen,
                                     distances=dist, moved=moved, head=class_head)

    @torch.no_grad()
    def _merge(self, ranks: Sequence[int], snapshots: Dict[int, Dict[str, torch.Tensor]],
               weights: Dict[int, float], r: int = 0, built: Optional[Dict[int, nn.Module]] = None,
               pair_stats: Optional[Dict[int, list]] = None) -> Dict[str, Any]:
        # The operator aligns every model to the first one it is given.
        order, same, tag = self._order(ranks, snapshots)
        built = dict(built or {})
        adopt = None
        if tag != self.basis_tag and self.adopt_min_acc is not None:
            if order[0] not in built:
                built[order[0]] = self._neighbor_model(snapshots[order[0]])
            adopt = self._adoption_check(order[0], built[order[0]], tag)
            if adopt is not None and not adopt["adopted"]:
                order, same, tag = self._order(ranks, snapshots, ref=self.basis_tag)
        models = [self.model if j == self.rank else built[j] if j in built else self._neighbor_model(snapshots[j])
                  for j in order]
        own_reset = self.reset_bn and self.bn_batches is not None  # a separate batch budget for the BN reset
        kw: Dict[str, Any] = {"same_basis": same} if same else {}
        if self.restore_norms:
            kw["restore_norms"] = True
        if self.bn_repair != "local":  # needs the aligned participants: the operator does it, on bn_batches
            kw["bn_repair"] = self.bn_repair
            if own_reset:
                kw.update(bn_batches=self.bn_batches, repair=False)
                own_reset = False
        dist: Dict[int, float] = {}
        moved: Dict[int, float] = {}
        align: Dict[int, Dict[str, float]] = {}
        given: Dict[int, list] = {}
        class_head = self._class_head(order, snapshots, r) if self.head == "label_counts" else None
        min_corr_off: List[int] = []
        if self.method == "dimat":
            kw.update(self._guards, report=align)
            if self.min_corr is not None and class_head is not None and self.min_corr_scope == "shared_classes":
                kw["min_corr"], lifted = head_mod.min_corr_by_classes(self.min_corr, class_head.counts)
                min_corr_off = [order[pos] for pos in lifted if pos not in same]
            given = self._pair_stats_for(order, same, weights, pair_stats or {})
            if given:
                kw["pair_stats"] = given
        kw["combine"] = self._combine_hook(order, snapshots, r, dist, moved, class_head)
        merged = self.merge_fn(models, [weights[j] for j in order], batches=self.batches,
                               reset_bn=self.reset_bn and not own_reset, stat_batches=self.stat_batches, **kw)
        if own_reset and self.batches is not None:
            merge_ops.reset_bn_stats(merged, self.batches, self.bn_batches)
        self.model.load_state_dict(merged.state_dict())
        self.basis_tag = tag  # only once the merged model is in place
        telemetry = _telemetry(order, self.rank, dist, moved, align)
        if adopt is not None:
            telemetry["adopt"] = adopt
        if self.head == "label_counts":
            telemetry["head"] = "label_counts" if class_head is not None else "mean"
        if min_corr_off:
            telemetry["min_corr_off"] = min_corr_off
        if pair_stats is not None:  # merge_round takes it out of the telemetry again
            telemetry["stats_used"] = [order[0] if order[pos] == self.rank else order[pos] for pos in given]
        return telemetry

    def _pair_stats_for(self, order: Sequence[int], same: Sequence[int], weights: Dict[int, float],
                        pooled: Dict[int, list]) -> Dict[int, list]:
        """The operator's ``pair_stats`` (position -> statistics of the pair (reference, that position)) from the
        pooled statistics of my pairs (neighbour -> statistics of (me, neighbour)): every aligned neighbour's when
        I hold the reference; mine, turned around, when I am aligned to a neighbour's basis."""
        out: Dict[int, list] = {}
        ref = order[0]
        for pos, j in enumerate(order):
            if pos == 0 or pos in same or weights[j] <= 0:
                continue
            if ref == self.rank and j in pooled:
                out[pos] = pooled[j]
            elif j == self.rank and ref in pooled:
                out[pos] = [st.transposed() for st in pooled[ref]]
        return out

    @torch.no_grad()
    def _adoption_check(self, holder: int, model: nn.Module, tag: int) -> Optional[Dict[str, Any]]:
        """Whether the neighbour basis held by ``holder`` (its ``model``) is adopted (see ``adopt_min_acc``):
        ``{"from": holder, "acc": ..., "min_acc": ..., "adopted": ...}``, or None where the local batches or
        the model's output give no accuracy (the basis is then adopted, with a warning the first time)."""
        acc, classes = _accuracy(model, self.batches, self.stat_batches)
        if acc is None:
            if not self._adopt_unchecked_warned:
                log.warning("agent %d: adopt_min_acc: the local batches have no integer labels or the model does "
                            "not return [batch, classes] logits; adopting neighbours' bases unchecked", self.rank)
                self._adopt_unchecked_warned = True
            return None
        threshold = 1.0 / classes if self.adopt_min_acc == "auto" else float(self.adopt_min_acc)
        adopted = acc > threshold
        if not adopted:
            log.info("agent %d: keeping its own basis: agent %d's model (basis %d) scores %.3f on its data, "
                     "threshold %.3f", self.rank, holder, tag, acc, threshold)
        return {"from": int(holder), "acc": acc, "min_acc": threshold, "adopted": bool(adopted)}


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Optional[Iterable[Any]], limit: Optional[int]
              ) -> tuple[Optional[float], int]:
    """Top-1 accuracy of ``model`` (eval mode, restored after) on the first ``limit`` ``(input, label)`` batches,
    and its number of outputs; ``(None, 0)`` when a batch has no integer labels or the output is not
    ``[batch, classes]``."""
    if batches is None:
        return None, 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = total = classes = 0
    with stats_mod.eval_mode(model):
        for i, b in enumerate(batches):
            if limit is not None and i >= limit:
                break
            y = head_mod.batch_labels(b)
            if y is None:
                return None, 0
            out = model(b[0].to(device))
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != y.shape[0]:
                return None, 0
            classes = out.shape[1]
            correct += int((out.argmax(1).cpu() == y.cpu()).sum())
            total += int(y.shape[0])
    return (correct / total if total else None), classes


def _telemetry(order: Sequence[int], own: int, dist: Dict[int, float], moved: Dict[int, float],
               align: Dict[int, Dict[str, float]]) -> Dict[str, Any]:
    """Per-edge telemetry keyed by neighbour rank, and its means over the edges (see :class:`MergeResult`)."""
    edges: Dict[str, Dict[str, float]] = {}
    for pos, j in enumerate(order):
        if j == own:
            continue
        e: Dict[str, float] = {}
        if pos in dist:
            e["dist"] = dist[pos]
        e["moved"] = align[pos]["moved"] if pos in align else moved.get(pos, 0.0)
        if pos in align:
            e["corr_before"], e["corr_after"] = align[pos]["corr_before"], align[pos]["corr_after"]
            if "kept" in align[pos]:
                e["kept"] = align[pos]["kept"]
        edges[str(j)] = e
    out: Dict[str, Any] = {"edges": edges}
    for key, name in (("dist", "consensus_dist"), ("moved", "units_moved"), ("corr_before", "align_corr_before"),
                      ("corr_after", "align_corr_after"), ("kept", "units_kept")):
        vals = [e[key] for e in edges.values() if key in e and e[key] == e[key]]
        if vals:
            out[name] = sum(vals) / len(vals)
    return out
