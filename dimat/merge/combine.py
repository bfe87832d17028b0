"""Combine rules: how aligned models become one model (the step after alignment, ``merge.combine``).

Every rule is a pure function of the aligned state dicts (all in the same unit order), the mixing weights and,
for two rules, per-model payloads that each agent computed on its own data and sent with its snapshot.

Task-vector rules work on updates relative to a *base*: the agent's own model as it posted it for this round,
in the unit order of the merge (``states[base_index]``). A participant's task vector is
``tau_j = state_j - base``; the agent's own task vector is therefore zero. Every such rule returns
``base + scale * (combined update)``.

* ``mean``: the weighted average ``sum_j w_j state_j`` (what plain DIMAT and WA do).
* ``ties``: trim each task vector to its largest ``density`` share of entries by magnitude (per tensor), elect
  each entry's sign as the sign of the weighted sum of the trimmed vectors, and average (weighted) only the
  entries that agree with the elected sign.
* ``dare``: drop each task-vector entry with probability ``drop`` and scale the survivors by ``1 / (1 - drop)``;
  then combine the sparsified vectors by ``mean`` (a weighted sum) or ``ties`` (``dare_then``). The drop is drawn
  from a generator that the caller seeds per (run, round, agent).
* ``consensus``: TALL-mask consensus. ``tau = sum_j w_j tau_j``; participant j's mask keeps the entries where
  ``|tau_j| >= lam * |tau - tau_j|``; an entry of ``tau`` is kept where at least ``k`` masks keep it (k is capped
  at the number of participants other than the base).
* ``fisher``: elementwise ``sum_j w_j (F_j + floor) state_j / sum_j w_j (F_j + floor)``, with ``F_j`` the diagonal
  Fisher of participant j's parameters on its own data (see :mod:`dimat.merge.payload`).
* ``regmean``: per Linear and Conv2d layer, the closed-form least-squares merge
  ``W = (sum_j w_j W_j G_j) (sum_j w_j G_j)^-1`` over the layer's input Gram matrices ``G_j`` (the bias folded
  in as a constant input), whose off-diagonal entries are first scaled by ``alpha``; every other tensor by
  ``mean``.

Only the floating-point tensors named in ``params`` (the model's parameters) are combined by the rule; other
floating-point tensors (BatchNorm running statistics, which the BN reset recomputes anyway) by ``mean``;
integer tensors come from ``states[0]``.

With the ``mean`` rule, the output layer can be combined class by class (:class:`ClassHead`, ``merge.head:
label_counts``): the output unit of class c is ``sum_j w_j n_jc state_j / sum_j w_j n_jc``, with ``n_jc`` the
number of participant j's training samples of class c, so a class's output weights come from the participants
that trained on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["RULES", "PAYLOAD_OF", "CombineOptions", "ClassHead", "combine_states", "ties", "dare_drop",
           "consensus", "fisher_average", "regmean_layer", "weighted_mean", "masked_mean", "class_weighted_mean"]

#: The rule names ``merge.combine`` accepts.
RULES = ("mean", "ties", "dare", "consensus", "fisher", "regmean")
#: Rules that need a payload from every participant, and the payload's kind (see :mod:`dimat.merge.payload`).
PAYLOAD_OF = {"fisher": "fisher", "regmean": "gram"}

#: Ridge added to RegMean's summed Gram matrix, relative to its mean diagonal: an input that never varies (a dead
#: unit) leaves its column undetermined, and the ridge makes that column the weighted mean of the participants'.
REGMEAN_RIDGE = 1e-6


@dataclass(frozen=True)
class CombineOptions:
    """A combine rule and its settings (the ``merge.*`` config keys of the same names).

    Attributes
    ----------
    rule : one of :data:`RULES`.
    combine_scale : lambda, the factor on the combined task vector (ties, dare, consensus).
    ties_density : share of entries ties keeps per task vector and tensor, in (0, 1].
    dare_drop : dare's drop probability, in [0, 1).
    dare_then : ``mean`` or ``ties``: how dare combines the sparsified task vectors.
    consensus_lambda : the TALL-mask threshold lambda (>= 0).
    consensus_k : how many participants' masks must keep an entry (>= 1).
    fisher_floor : added to every Fisher entry before weighting (> 0), so that entries without information fall
        back to the plain weighted mean.
    fisher_samples : the most local samples the Fisher is estimated on (each costs one backward pass).
    regmean_alpha : factor on the off-diagonal entries of every Gram matrix, in [0, 1] (0: diagonal only).
    regmean_max_inputs : the largest Gram matrix regmean computes and sends, in rows (a layer's inputs, times the
        kernel area for a conv, plus one with a bias); larger layers take the weighted mean. None: every layer.
        A Gram matrix is rows² floats per snapshot, so one wide layer (a 4096-input Linear: 67 MB) can cost
        far more than the weights.
    """

    rule: str = "mean"
    combine_scale: float = 1.0
    ties_density: float = 0.2
    dare_drop: float = 0.5
    dare_then: str = "mean"
    consensus_lambda: float = 0.4
    consensus_k: int = 2
    fisher_floor: float = 1e-8
    fisher_samples: int = 256
    regmean_alpha: float = 0.9
    regmean_max_inputs: Optional[int] = None

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"combine option {name} {msg}, got {getattr(self, name)!r}")

        if self.rule not in RULES:
            raise bad("rule", f"must be one of {', '.join(RULES)}")
        if not math.isfinite(self.combine_scale):
            raise bad("combine_scale", "must be finite")
        if not 0 < self.ties_density <= 1:
            raise bad("ties_density", "must be in (0, 1]")
        if not 0 <= self.dare_drop < 1:
            raise bad("dare_drop", "must be in [0, 1)")
        if self.dare_then not in ("mean", "ties"):
            raise bad("dare_then", "must be mean or ties")
        if not (math.isfinite(self.consensus_lambda) and self.consensus_lambda >= 0):
            raise bad("consensus_lambda", "must be >= 0")
        if isinstance(self.consensus_k, bool) or not isinstance(self.consensus_k, int) or self.consensus_k < 1:
            raise bad("consensus_k", "must be an integer >= 1")
        if not (math.isfinite(self.fisher_floor) and self.fisher_floor > 0):
            raise bad("fisher_floor", "must be > 0")
        if isinstance(self.fisher_samples, bool) or not isinstance(self.fisher_samples, int) \
                or self.fisher_samples < 1:
            raise bad("fisher_samples", "must be an integer >= 1")
        if not 0 <= self.regmean_alpha <= 1:
            raise bad("regmean_alpha", "must be in [0, 1]")
        m = self.regmean_max_inputs
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise bad("regmean_max_inputs", "must be an integer >= 1 or None")

    @classmethod
    def from_config(cls, merge_cfg: Mapping[str, object]) -> "CombineOptions":
        """Options from a config's ``merge`` section (key ``combine`` is the rule; the others share their names)."""
        kw = {f.name: merge_cfg[f.name] for f in fields(cls) if f.name != "rule" and f.name in merge_cfg}
        return cls(rule=str(merge_cfg.get("combine", "mean")), **kw)

    @property
    def payload(self) -> Optional[str]:
        """The payload kind this rule needs from every participant (None: none)."""
        return PAYLOAD_OF.get(self.rule)


# ----------------------------------------------------------------------------------------- per-tensor rules
#: Which entries of a participant's tensors join a masked mean (see :func:`masked_mean`): tensor name -> list of
#: ``(axis, vector)``, the vector holding one 0/1 value per index along that axis; an entry's mask is the product
#: of its axes' values, and a tensor the mapping does not name is kept whole.
EntryMask = Mapping[str, Sequence[Tuple[int, torch.Tensor]]]


def entry_mask(t: torch.Tensor, axes: Sequence[Tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The 0/1 mask of ``t``'s entries given per-axis vectors (float64, broadcastable to ``t``)."""
    m = torch.ones((1,) * t.dim(), dtype=torch.float64)
    for axis, vec in axes:
        shape = [1] * t.dim()
        shape[axis] = -1
        m = m * vec.to(torch.float64).view(shape)
    return m


def _masked_sums(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                 masks: Sequence[Optional[Sequence[Tuple[int, torch.Tensor]]]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum_j w_j m_j t_j, sum_j w_j m_j)`` per entry, in float64 (``m_j``: the product of participant j's
    per-axis vectors; no vectors: 1)."""
    num = torch.zeros_like(tensors[0], dtype=torch.float64)
    den = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w, axes in zip(tensors, weights, masks):
        if not w:
            continue
        wm = float(w) * (entry_mask(t, axes) if axes else torch.ones((), dtype=torch.float64))
        num += wm * t.detach().to(torch.float64)
        den += wm
    return num, den


def masked_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                masks: Sequence[Optional[Sequence[Tuple[int, torch.Tensor]]]]) -> torch.Tensor:
    """``sum_j w_j m_j t_j / sum_j w_j m_j`` per entry, in float64: the weighted mean over the participants that
    keep the entry (``masks[j]``: participant j's per-axis vectors, see :data:`EntryMask`; None keeps every
    entry). An entry no participant with a positive weight keeps takes the plain weighted mean."""
    num, den = _masked_sums(tensors, weights, masks)
    kept = den > 0
    if bool(kept.all()):
        return num / den
    return torch.where(kept, num / den.clamp_min(1e-300), weighted_mean(tensors, weights))


@dataclass(frozen=True)
class ClassHead:
    """The output layer for a class-by-class combine (``merge.head: label_counts``).

    Attributes
    ----------
    axes : tensor name -> its class axis (an output Linear's ``weight`` and ``bias``: 0).
    counts : per participant, in the order of the states, its number of training samples per class
        (``[classes]``, finite, >= 0).
    """

    axes: Mapping[str, int]
    counts: Sequence[torch.Tensor]


def class_weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], axis: int,
                        counts: Sequence[torch.Tensor],
                        masks: Optional[Sequence[Optional[Sequence[Tuple[int, torch.Tensor]]]]] = None
                        ) -> torch.Tensor:
    """Class c of the output (index c along ``axis``) is ``sum_j w_j n_jc m_j t_j / sum_j w_j n_jc m_j``, in
    float64: the participants that trained on class c, weighted by their samples of it (``counts[j][c]``) and
    the mixing weights, among those whose entry ``masks`` keeps (``merge.min_corr``). Where no kept participant
    has a sample of the class, the entry is the :func:`masked_mean` without counts."""
    masks = list(masks) if masks is not None else [None] * len(tensors)
    with_counts = [list(m or []) + [(axis, c)] for m, c in zip(masks, counts)]
    num, den = _masked_sums(tensors, weights, with_counts)
    known = den > 0
    if bool(known.all()):
        return num / den
    return torch.where(known, num / den.clamp_min(1e-300), masked_mean(tensors, weights, masks))


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_j w_j t_j`` in float64."""
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights):
        if w:
            acc.add_(t.detach().to(torch.float64), alpha=float(w))
    return acc


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``ceil(density * numel)`` largest-magnitude entries set to 0."""
    k = max(1, math.ceil(density * tau.numel()))
    if k >= tau.numel():
        return tau
    flat = tau.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def ties(taus: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES: trim, elect sign, disjoint weighted mean of the task vectors ``taus`` (float64; no scale applied).

    An entry where no participant agrees with the elected sign (or the elected sign is 0) is 0.
    """
    trimmed = [_trim(t.to(torch.float64), density) for t in taus]
    sign = torch.sign(weighted_mean(trimmed, weights))
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for t, w in zip(trimmed, weights):
        agree = (torch.sign(t) == sign) & (sign != 0)
        num += w * torch.where(agree, t, 0.0)
        den += w * agree.to(torch.float64)
    return torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)


def dare_drop(tau: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry dropped with probability ``drop``, the survivors scaled by ``1 / (1 - drop)``."""
    if drop == 0:
        return tau.to(torch.float64)
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) >= drop
    return torch.where(keep, tau.to(torch.float64) / (1.0 - drop), 0.0)


def consensus(taus: Sequence[torch.Tensor], weights: Sequence[float], lam: float, k: int,
              voters: Sequence[int]) -> torch.Tensor:
    """TALL-mask consensus of the task vectors (float64; no scale applied).

    ``tau = sum_j w_j tau_j``; participant j in ``voters`` keeps entry e where ``|tau_j[e]| >= lam |tau[e] -
    tau_j[e]|``; ``tau`` survives where at least ``min(k, len(voters))`` participants keep it.
    """
    taus = [t.to(torch.float64) for t in taus]
    total = weighted_mean(taus, weights)
    votes = torch.zeros_like(total)
    for j in voters:
        votes += (taus[j].abs() >= lam * (total - taus[j]).abs()).to(torch.float64)
    need = min(k, len(voters))
    return torch.where(votes >= need, total, 0.0) if need > 0 else total


def fisher_average(tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], weights: Sequence[float],
                   floor: float) -> torch.Tensor:
    """``sum_j w_j (F_j + floor) t_j / sum_j w_j (F_j + floor)``, elementwise (float64)."""
    num = torch.zeros_like(tensors[0], dtype=torch.float64)
    den = torch.zeros_like(num)
    for t, f, w in zip(tensors, fishers, weights):
        if w:
            fw = w * (f.detach().to(torch.float64).clamp_min(0) + floor)
            num += fw * t.detach().to(torch.float64)
            den += fw
    return num / den


def regmean_layer(weights_: Sequence[torch.Tensor], biases: Optional[Sequence[torch.Tensor]],
                  grams: Sequence[torch.Tensor], w: Sequence[float], alpha: float):
    """RegMean for one layer: ``W = (sum_j w_j W_j G_j)(sum_j w_j G_j)^-1`` with off-diagonals scaled by ``alpha``.

    ``weights_[j]`` is ``[out, ...]`` (flattened to ``[out, n]``); with ``biases`` the Gram matrices are
    ``(n + 1) x (n + 1)``, the last row and column being the constant input that multiplies the bias. Returns
    ``(weight, bias or None)`` in float64, the weight in its original shape.
    """
    shape = weights_[0].shape
    mats = []
    for j, wt in enumerate(weights_):
        m = wt.detach().to(torch.float64).reshape(shape[0], -1)
        if biases is not None:
            m = torch.cat([m, biases[j].detach().to(torch.float64)[:, None]], 1)
        mats.append(m)
    n = mats[0].shape[1]
    lhs = torch.zeros(n, n, dtype=torch.float64)
    rhs = torch.zeros(n, shape[0], dtype=torch.float64)
    for m, g, wj in zip(mats, grams, w):
        if not wj:
            continue
        g = g.detach().to(torch.float64)
        if g.shape != (n, n):
            raise ValueError(f"a Gram matrix has shape {tuple(g.shape)}, the layer needs {(n, n)}")
        diag = torch.diag(torch.diagonal(g))
        g = alpha * g + (1 - alpha) * diag
        lhs += wj * g
        rhs += wj * (g @ m.T)
    ridge = REGMEAN_RIDGE * float(torch.diagonal(lhs).mean().clamp_min(0)) + 1e-12
    rhs += ridge * weighted_mean([m.T for m in mats], w)
    lhs += ridge * torch.eye(n, dtype=torch.float64)
    out = torch.linalg.solve(lhs, rhs).T
    if biases is not None:
        return out[:, :-1].reshape(shape), out[:, -1]
    return out.reshape(shape), None


# ------------------------------------------------------------------------------------------ whole states
def combine_states(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    options: CombineOptions,
    base_index: int = 0,
    params: Optional[Collection[str]] = None,
    payloads: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
    gram_layers: Optional[Mapping[str, bool]] = None,
    generator: Optional[torch.Generator] = None,
    masks: Optional[Sequence[Optional[EntryMask]]] = None,
    head: Optional[ClassHead] = None,
) -> Dict[str, torch.Tensor]:
    """Combine aligned state dicts with ``options.rule``.

    Parameters
    ----------
    states : the participants' state dicts, all in one unit order (aligned).
    weights : mixing weights, one per state (already normalised).
    options : the rule and its settings.
    base_index : the participant whose state is the base of the task vectors (the agent's own model).
    params : names of the tensors the rule applies to (the model's parameters); None: every floating tensor.
    payloads : per participant, aligned like ``states``: for ``fisher`` parameter name -> Fisher diagonal; for
        ``regmean`` layer name -> Gram matrix. Required for those two rules.
    gram_layers : for ``regmean``, layer name -> whether the layer has a bias (its weight is ``<layer>.weight``).
    generator : the random source of ``dare`` (seed it per run, round and agent).
    masks : optional, per participant, the entries it contributes (:data:`EntryMask`; None: all), from
        ``merge.min_corr``: each tensor is then the :func:`masked_mean`. Rule ``mean`` only.
    head : optional, the output layer's tensors and every participant's samples per class: those tensors are
        then the :func:`class_weighted_mean` (``merge.head: label_counts``). Rule ``mean`` only.

    Returns
    -------
    A new state dict, each tensor in the dtype of ``states[0]``'s.
    """
    if len(states) != len(weights) or not states:
        raise ValueError(f"got {len(states)} states and {len(weights)} weights")
    if not 0 <= base_index < len(states):
        raise ValueError(f"base_index {base_index} is not a participant (0..{len(states) - 1})")
    rule = options.rule
    if options.payload is not None:
        if payloads is None or len(payloads) != len(states):
            raise ValueError(f"combine rule {rule!r} needs one payload per participant")
    if rule == "dare" and generator is None:
        raise ValueError("combine rule 'dare' needs a seeded generator")
    masks = list(masks) if masks is not None and any(masks) else None
    if masks is not None:
        if rule != "mean":
            raise ValueError(f"entry masks (merge.min_corr) combine by the masked mean: rule 'mean' only, got "
                             f"{rule!r}")
        if len(masks) != len(states):
            raise ValueError(f"got {len(masks)} masks for {len(states)} states")
    if head is not None:
        if rule != "mean":
            raise ValueError(f"a class-by-class output layer (merge.head label_counts) combines by the mean: rule "
                             f"'mean' only, got {rule!r}")
        if len(head.counts) != len(states):
            raise ValueError(f"got {len(head.counts)} class counts for {len(states)} states")
    ref = states[0]
    names = [n for n, t in ref.items() if t.is_floating_point() and (params is None or n in params)]
    out: Dict[str, torch.Tensor] = {}
    for name, t0 in ref.items():
        if not t0.is_floating_point():
            out[name] = t0.detach().clone()
        elif head is not None and name in head.axes:
            out[name] = class_weighted_mean([s[name] for s in states], weights, head.axes[name], head.counts,
                                            [m.get(name) if m else None for m in masks] if masks else None
                                            ).to(t0.dtype)
        elif masks is not None and any(m and name in m for m in masks):
            out[name] = masked_mean([s[name] for s in states], weights,
                                    [m.get(name) if m else None for m in masks]).to(t0.dtype)
        elif name not in names or rule == "mean":
            out[name] = weighted_mean([s[name] for s in states], weights).to(t0.dtype)
    if rule == "mean":
        return out
    if rule == "regmean":
        out.update(_regmean(states, weights, options, names, payloads, gram_layers or {}))
    for name in names:
        if name in out:
            continue
        t0 = ref[name]
        tensors = [s[name] for s in states]
        if rule == "fisher":
            merged = fisher_average(tensors, [p[name] for p in payloads], weights, options.fisher_floor)
        elif rule == "regmean":  # not a layer with a Gram matrix: plain mean
            merged = weighted_mean(tensors, weights)
        else:
            base = states[base_index][name].detach().to(torch.float64)
            taus = [t.detach().to(torch.float64) - base for t in tensors]
            merged = base + options.combine_scale * _task_update(taus, weights, options, base_index, generator)
        out[name] = merged.to(t0.dtype)
    return {name: out[name] for name in ref}


def _task_update(taus: List[torch.Tensor], weights: Sequence[float], o: CombineOptions, base_index: int,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
    voters = [j for j in range(len(taus)) if j != base_index and weights[j] > 0]
    if o.rule == "ties":
        return ties(taus, weights, o.ties_density)
    if o.rule == "consensus":
        return consensus(taus, weights, o.consensus_lambda, o.consensus_k, voters)
    # dare: the base's own task vector is zero; the others are dropped and rescaled
    dropped = [dare_drop(t, o.dare_drop, generator) if j in voters else t for j, t in enumerate(taus)]
    if o.dare_then == "ties":
        return ties(dropped, weights, o.ties_density)
    return weighted_mean(dropped, weights)


def _regmean(states, weights, o: CombineOptions, names, payloads, layers: Mapping[str, bool]):
    out: Dict[str, torch.Tensor] = {}
    for layer, has_bias in layers.items():
        wname, bname = f"{layer}.weight", f"{layer}.bias"
        if wname not in names or any(layer not in p for p in payloads):
            continue
        bias = [s[bname] for s in states] if has_bias else None
        w, b = regmean_layer([s[wname] for s in states], bias, [p[layer] for p in payloads], weights,
                             o.regmean_alpha)
        out[wname] = w.to(states[0][wname].dtype)
        if b is not None:
            out[bname] = b.to(states[0][bname].dtype)
    return out


# ------------------------------------------------------------------------------------------ the merge hook
def make_hook(
    options: CombineOptions,
    base_index: int,
    params: Collection[str],
    payloads: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
    gram_layers: Optional[Mapping[str, bool]] = None,
    generator: Optional[torch.Generator] = None,
    distances: Optional[Dict[int, float]] = None,
    moved: Optional[Dict[int, float]] = None,
    head: Optional[ClassHead] = None,
):
    """A combine hook for the merge operators (:data:`dimat.merge.operators.CombineFn`).

    It permutes each participant's payload like its weights, combines with :func:`combine_states` (``head``: the
    output layer class by class) and, when the
    dicts are given, records per participant index the relative distance between the combined parameters and the
    participant's aligned parameters (``distances``) and the share of its units that alignment moved (``moved``).
    Payloads are given in the participants' own unit order.
    """
    from dimat.merge import payload as payload_mod
    from dimat.merge import telemetry

    kind = options.payload

    def hook(aligned, weights, perms_per_model, spec, masks=None):
        aligned_payloads = None
        if kind is not None:
            if payloads is None:
                raise ValueError(f"combine rule {options.rule!r} needs the participants' payloads")
            # permuting a payload reads only tensor shapes of its model's state, which every participant shares
            aligned_payloads = [payloads[0]] + [
                payload_mod.permute(kind, p, s, spec, perms)
                for p, s, perms in zip(payloads[1:], aligned[1:], perms_per_model)
            ]
        out = combine_states(aligned, weights, options, base_index, params, aligned_payloads, gram_layers,
                             generator, masks, head)
        if distances is not None:
            for j, s in enumerate(aligned):
                distances[j] = telemetry.distance(out, s, params)
        if moved is not None and spec is not None:
            sizes = {g: spec.groups[g].size for g in spec.permutable}
            for j, perms in enumerate(perms_per_model, start=1):
                moved[j] = telemetry.units_moved(perms, sizes)
        return out

    return hook

