"""Gradient-gossip baselines: the update rules of CDSGD, CDMSGD, D-PSGD and SGP over parameter tensors.

Every rule is one small class with two hooks that the step loop in :mod:`dimat.gossip` calls around one
exchange (post, then collect) of the agents' messages:

* ``message(x, d, st)``: the snapshot agent i posts this step;
* ``combine(x, d, st, own, received)``: agent i's new model from its own message and its in-neighbours' messages;

and ``local(x, d, st)`` for the steps between exchanges (``comm_every > 1``). The arguments are plain tensor
dicts, so a rule can be checked by hand:

* ``x`` is the agent's model (its ``state_dict`` after the forward pass that produced the gradient): the point
  at which the gradient was taken. BatchNorm running statistics are part of ``x`` and are mixed exactly like
  parameters (they are the statistics of the mixed model's inputs); integer buffers (``num_batches_tracked``)
  stay local.
* ``d`` is the local optimizer's displacement for that gradient, ``d = x_after_step - x`` for every parameter
  (``-lr * g`` for plain SGD; tensors absent from ``d``, i.e. buffers, do not move). Computing the step with a
  torch optimizer keeps a rule independent of the optimizer: with ``sgd`` the rules are the textbook ones.
* ``st`` is the agent's :class:`RuleState` (its row of pi, its out-degree, its push-sum weight).

With ``pi`` the mixing matrix (row i: the weights agent i gives itself and its in-neighbours, renormalised over
the messages that arrived):

* CDSGD, combine-then-adapt (Jiang et al. 2017): ``x_i <- sum_j pi_ij x_j + d_i`` (``d_i = -lr g_i(x_i)``).
* CDMSGD: CDSGD whose displacement comes from SGD with a Nesterov momentum buffer
  (``b <- mu b + g``, ``d = -lr (g + mu b)``), whatever optimizer the config names.
* D-PSGD, adapt-then-combine (what the DIMAT reference calls SGP): ``x_i <- sum_j pi_ij (x_j + d_j)``.
* SGP, stochastic gradient push (Assran et al. 2019): agent i keeps a numerator ``u_i`` and a push-sum weight
  ``w_i``; its model is the de-biased ``z_i = u_i / w_i`` (gradients are taken there). Each exchange it pushes
  ``(u_i + d_i) / (m_i + 1)`` and ``w_i / (m_i + 1)`` to each of its ``m_i`` out-neighbours and keeps one share;
  it then sums the shares it holds: ``u_i <- sum`` of numerators, ``w_i <- sum`` of weights. The mixing is
  column-stochastic (uniform over out-neighbours and self), so directed graphs work and a lost message only
  loses mass, which the de-biasing absorbs. The weight travels inside the snapshot under
  :data:`PUSH_SUM_KEY`, so every transport carries it.

:data:`RULES` maps config names to rule classes; :func:`get` builds one. :class:`Local` (plain local steps, no
exchange) is the rule of the ``centralised`` bound's single agent. A new method is one subclass of :class:`Rule`
that overrides ``message`` / ``combine`` (and ``optimizer`` if the method prescribes one), added to :data:`RULES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, Mapping, Optional, Type

import torch

from dimat.train import make_optimizer

__all__ = [
    "PUSH_SUM_KEY",
    "RuleState",
    "Rule",
    "CDSGD",
    "CDMSGD",
    "DPSGD",
    "SGP",
    "Local",
    "RULES",
    "get",
    "mix",
]

Tensors = Dict[str, torch.Tensor]

#: Snapshot entry that carries an SGP message's push-sum weight (a 0-d float64 tensor).
PUSH_SUM_KEY = "__push_sum_weight__"


@dataclass
class RuleState:
    """What a rule knows about one agent beyond its tensors.

    Attributes
    ----------
    rank : the agent's index.
    weights : ``{j: pi[rank][j]}`` over the agent itself and its in-neighbours (the row of the mixing matrix).
    out_degree : number of agents that receive this agent's messages (self excluded); SGP splits its mass over
        ``out_degree + 1`` shares.
    ps_weight : SGP's push-sum weight ``w_i`` (1 at the start; other rules leave it at 1).
    """

    rank: int
    weights: Dict[int, float]
    out_degree: int = 0
    ps_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.rank not in self.weights:
            raise ValueError(f"weights must include the agent's own rank {self.rank}, got ranks {sorted(self.weights)}")
        for j, w in self.weights.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"mixing weight for rank {j} is {w}; weights must be finite and non-negative")
        if self.out_degree < 0:
            raise ValueError(f"out_degree must be >= 0, got {self.out_degree}")


# ------------------------------------------------------------------------------------------- tensor helpers
def _is_mixed(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def step(x: Mapping[str, torch.Tensor], d: Mapping[str, torch.Tensor], scale: float = 1.0) -> Tensors:
    """``x + scale * d`` for the tensors in ``d``; every other tensor of ``x`` is copied unchanged."""
    return {k: (v + d[k] * scale if k in d else v.clone()) for k, v in x.items()}


def mix(own_rank: int, states: Mapping[int, Mapping[str, torch.Tensor]], weights: Mapping[int, float]) -> Tensors:
    """Weighted average of floating-point tensors over ``states`` (rank -> tensors), weights renormalised.

    Ranks in ``weights`` without a state (a neighbour whose message did not arrive) are left out, and the weights
    of the others renormalised to sum to 1; a state from a rank not in ``weights`` is a ValueError. Integer
    tensors are taken from ``states[own_rank]``. Accumulated in float32 (float64 for float64 tensors; a step-level
    mix runs every step, where float64 would double its cost), returned in each tensor's own dtype.
    """
    unknown = [j for j in states if j not in weights]
    if unknown:
        raise ValueError(f"received a message from rank {unknown[0]}, which is not an in-neighbour")
    ranks = [j for j in states if weights[j] > 0]
    total = sum(weights[j] for j in ranks)
    if total <= 0:  # a zero self-weight and no neighbour arrived: keep the own model
        ranks, total = [own_rank], 1.0
        weights = {own_rank: 1.0}
    own = states[own_rank]
    out: Tensors = {}
    for k, t0 in own.items():
        if not _is_mixed(t0):
            out[k] = t0.clone()
            continue
        dtype = torch.float64 if t0.dtype == torch.float64 else torch.float32
        acc = torch.zeros_like(t0, dtype=dtype)
        for j in ranks:
            acc.add_(states[j][k].to(dtype), alpha=weights[j] / total)
        out[k] = acc.to(t0.dtype)
    return out


# ----------------------------------------------------------------------------------------------------- rules
class Rule:
    """One gradient-gossip method. Subclasses set ``name`` and override the hooks they change.

    The default hooks describe a rule that never communicates (local SGD steps ``x + d``).
    """

    name: ClassVar[str] = "local"
    #: False for a rule that never exchanges anything (the loop then posts nothing).
    communicates: ClassVar[bool] = False

    def optimizer(self, params, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """The local optimizer whose steps become the displacement ``d`` (the config's one by default)."""
        return make_optimizer(name, params, lr, weight_decay)

    def message(self, x: Tensors, d: Tensors, st: RuleState) -> Tensors:
        """The snapshot to post this step (``x`` for combine-then-adapt)."""
        return {k: v.clone() for k, v in x.items()}

    def combine(self, x: Tensors, d: Tensors, st: RuleState, own: Tensors, received: Mapping[int, Tensors]) -> Tensors:
        """The new model from the own message ``own`` and the in-neighbours' messages ``received``."""
        return self.local(x, d, st)

    def local(self, x: Tensors, d: Tensors, st: RuleState) -> Tensors:
        """A step without communication."""
        return step(x, d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Local(Rule):
    """Local training only: plain optimizer steps, no exchange (the ``centralised`` run's single agent)."""

    name = "local"


class CDSGD(Rule):
    """Combine-then-adapt: ``x_i <- sum_j pi_ij x_j + d_i(x_i)``; the gradient is taken at the unmixed ``x_i``."""

    name = "cdsgd"
    communicates = True

    def combine(self, x, d, st, own, received):
        return step(mix(st.rank, {st.rank: own, **received}, st.weights), d)


class CDMSGD(CDSGD):
    """CDSGD with a Nesterov momentum buffer: ``b <- mu b + g``, ``x_i <- sum_j pi_ij x_j - lr (g + mu b)``.

    Parameters
    ----------
    momentum : the buffer's decay ``mu`` (0 < mu < 1).
    """

    name = "cdmsgd"

    def __init__(self, momentum: float = 0.9):
        if not 0 < momentum < 1:
            raise ValueError(f"CDMSGD momentum must be in (0, 1), got {momentum}")
        self.momentum = float(momentum)

    def optimizer(self, params, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        # The method is defined by its Nesterov buffer, so it ignores the configured optimizer's kind (not its lr).
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, nesterov=True, weight_decay=weight_decay)

    def __repr__(self) -> str:
        return f"CDMSGD(momentum={self.momentum})"


class DPSGD(Rule):
    """Adapt-then-combine: ``x_i <- sum_j pi_ij (x_j + d_j)``; every agent steps, then mixes the stepped models."""

    name = "dpsgd"
    communicates = True

    def message(self, x, d, st):
        return step(x, d)

    def combine(self, x, d, st, own, received):
        return mix(st.rank, {st.rank: own, **received}, st.weights)


class SGP(Rule):
    """Stochastic gradient push: push-sum numerators and weights, column-stochastic, de-biased models.

    ``x`` is the de-biased model ``z = u / w``; the numerator is ``u = w z``. A message holds
    ``(u + d) / (m + 1)`` and, under :data:`PUSH_SUM_KEY`, ``w / (m + 1)``, with ``m`` the out-degree.
    """

    name = "sgp"
    communicates = True

    def message(self, x, d, st):
        share = 1.0 / (st.out_degree + 1)
        msg = {k: ((v * st.ps_weight + d.get(k, 0)) * share if _is_mixed(v) else v.clone()) for k, v in x.items()}
        msg[PUSH_SUM_KEY] = torch.tensor(st.ps_weight * share, dtype=torch.float64)
        return msg

    def combine(self, x, d, st, own, received):
        msgs = [own] + [received[j] for j in sorted(received)]
        for j, m in received.items():
            if PUSH_SUM_KEY not in m:
                raise ValueError(f"SGP message from rank {j} has no push-sum weight ({PUSH_SUM_KEY!r})")
        weight = sum(float(m[PUSH_SUM_KEY]) for m in msgs)
        if not weight > 0:
            raise ValueError(f"agent {st.rank}: push-sum weight is {weight}; it must stay positive")
        st.ps_weight = weight
        out: Tensors = {}
        for k, v in x.items():
            if not _is_mixed(v):
                out[k] = v.clone()
                continue
            dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
            acc = torch.zeros_like(v, dtype=dtype)
            for m in msgs:
                acc.add_(m[k].to(dtype))
            out[k] = (acc / weight).to(v.dtype)
        return out

    def local(self, x, d, st):
        # Numerator step u + d, seen through the de-biasing: z + d / w.
        return step(x, d, 1.0 / st.ps_weight)


#: config name -> rule class (the methods ``merge.method`` may name besides the merge operators)
RULES: Dict[str, Type[Rule]] = {"cdsgd": CDSGD, "cdmsgd": CDMSGD, "dpsgd": DPSGD, "sgp": SGP}

#: the config methods (``merge.method``) run by the step-level loop of :mod:`dimat.gossip`: the rules and the
#: centralised bound (one model trained on the union of the partitions)
STEP_METHODS = tuple(sorted(RULES)) + ("centralised",)


def get(name: str, momentum: Optional[float] = None) -> Rule:
    """A new rule registered under ``name`` (see :data:`RULES`); ValueError listing the valid names.

    Parameters
    ----------
    momentum : CDMSGD's Nesterov momentum (default 0.9); ignored by the other rules.
    """
    try:
        cls = RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown gossip method {name!r}; choose one of {', '.join(sorted(RULES))}") from None
    if cls is CDMSGD and momentum is not None:
        return CDMSGD(momentum)
    return cls()
