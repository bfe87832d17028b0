"""The merge core: combine an agent's model with its neighbours' models into one new model.

It knows nothing about transports. One module each, in the order a merge runs:

* :mod:`dimat.merge.structure`: the permutation groups, derived from a trace of the model and checked by an
  invariance self-test (:func:`derive`, :class:`PermutationSpec`, :func:`apply_permutation`);
* :mod:`dimat.merge.stats`: streaming activation statistics at each group's sites (and, for statistics from
  both sides of an edge, their encoding as a message and their pooling);
* :mod:`dimat.merge.matching`: linear assignment (activation or weight matching);
* :mod:`dimat.merge.operators`: the merge operators (:func:`average`, :func:`weight_match`,
  :func:`activation_match`), their registry :data:`METHODS` and :func:`get`;
* :mod:`dimat.merge.repair`: the BatchNorm reset's companion, REPAIR's variance correction; the ``mix`` BatchNorm
  repair (the participants' statistics, collapse-corrected) and the pre-post statistics refresh.

Around the operators:

* :mod:`dimat.merge.guard`: alignment guards (identity prior, keep margin) that keep units in place on noise;
* :mod:`dimat.merge.combine`: the combine rules after alignment (``merge.combine``: mean, ties, dare, consensus,
  fisher, regmean), given to an operator as its ``combine=`` hook;
* :mod:`dimat.merge.payload`: the per-snapshot data two of those rules need (Fisher, input Gram matrices);
* :mod:`dimat.merge.telemetry`: per-edge figures of a merge (correlation gain, units moved, distances).
"""

from dimat.merge import matching, operators, repair, stats, structure
from dimat.merge import combine, guard, payload, telemetry
from dimat.merge.operators import (
    METHODS,
    Batches,
    MergeFn,
    UnalignedError,
    activation_match,
    average,
    batch_input,
    get,
    iter_inputs,
    pair_statistics,
    reset_bn_stats,
    spec_for,
    weight_match,
)
from dimat.merge.structure import PermutationSpec, apply_permutation, check_invariance, derive, random_perms

__all__ = [
    "METHODS",
    "Batches",
    "MergeFn",
    "PermutationSpec",
    "UnalignedError",
    "activation_match",
    "apply_permutation",
    "average",
    "batch_input",
    "check_invariance",
    "derive",
    "get",
    "iter_inputs",
    "pair_statistics",
    "random_perms",
    "reset_bn_stats",
    "spec_for",
    "weight_match",
    "matching",
    "operators",
    "repair",
    "stats",
    "structure",
    "combine",
    "guard",
    "payload",
    "telemetry",
]
