"""The output layer of a classifier, and an agent's samples per class (``merge.head: label_counts``).

A classifier's last Linear layer has one output unit per class. Averaging it with the mixing weights mixes, for
a class only one agent has seen, that agent's trained weights with its neighbours', which were trained to push the
class's logit down: on label-skewed splits the merged model forgets the class again at every merge. Combining the
layer class by class (:func:`dimat.merge.combine.class_weighted_mean`) takes each class's weights from the
participants that trained on it, weighted by their samples of the class. This module finds the layer and counts
the samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from dimat.merge.stats import eval_mode
from dimat.merge.structure import model_output

__all__ = ["OutputLayer", "output_layer", "logits_of", "batch_labels", "count_labels", "counts_ok", "MIN_CORR_SCOPES",
           "check_min_corr_scope", "min_corr_by_classes"]


@dataclass(frozen=True)
class OutputLayer:
    """The Linear layer whose output is the model's logits: its module name, number of classes and the state
    dict names of its tensors with their class axis (0)."""

    name: str
    classes: int
    axes: Dict[str, int]


def logits_of(out: Any) -> Optional[torch.Tensor]:
    """The logits in a model's output: what :func:`dimat.merge.structure.model_output` takes as the output (the
    tensor itself, or the ``logits`` of a Hugging Face ``ModelOutput`` or dict), or the first element of a tuple;
    None otherwise."""
    out = model_output(out)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


@torch.no_grad()
def output_layer(model: nn.Module, example: torch.Tensor) -> Tuple[Optional[OutputLayer], str]:
    """The ``nn.Linear`` that returns ``model``'s ``[batch, classes]`` logits on ``example``, found by running the
    model once in eval mode: the layer whose output is the logits tensor (or equal to it). Returns
    ``(layer, "")``, or ``(None, why)`` when there is none: the output is not ``[batch, classes]`` logits,
    something changes them after the last Linear (a scale, a softmax), or the layer's weight is shared with
    another module (a tied embedding)."""
    seen: List[Tuple[str, nn.Linear, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, _inp, out, name=name: seen.append((name, mod, out)))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with eval_mode(model):
            logits = logits_of(model(example))
    finally:
        for h in hooks:
            h.remove()
    if logits is None or logits.dim() != 2:
        return None, "the model does not return [batch, classes] logits"
    for name, mod, out in reversed(seen):
        if out is logits or (isinstance(out, torch.Tensor) and out.shape == logits.shape and torch.equal(out, logits)):
            break
    else:
        return None, "no nn.Linear layer returns the model's logits unchanged"
    tied = [n for n, p in model.named_parameters(remove_duplicate=False)
            if p is mod.weight and n != (f"{name}.weight" if name else "weight")]
    if tied:
        return None, f"the output layer {name!r} shares its weight with {tied[0]!r}"
    prefix = f"{name}." if name else ""
    axes = {f"{prefix}weight": 0}
    if mod.bias is not None:
        axes[f"{prefix}bias"] = 0
    return OutputLayer(name, int(mod.out_features), axes), ""


def batch_labels(batch: Any) -> Optional[torch.Tensor]:
    """The integer class labels of an ``(input, label, ...)`` batch: a 1-D integer tensor, or None."""
    y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dim() != 1:
        return None
    return y


def counts_ok(counts: Any) -> bool:
    """Whether ``counts`` is a usable vector of samples per class: 1-D floating point, finite, >= 0, not all 0."""
    return (isinstance(counts, torch.Tensor) and counts.dim() == 1 and counts.is_floating_point()
            and bool(torch.isfinite(counts).all()) and not bool((counts < 0).any()) and float(counts.sum()) > 0)


def count_labels(batches: Iterable, classes: int, limit: Optional[int] = None) -> Optional[torch.Tensor]:
    """Samples per class (float64, ``[classes]``) in the first ``limit`` batches of ``(input, label, ...)``
    (None: all), or None when a batch carries no integer labels or a label is outside ``0 .. classes - 1``."""
    counts = torch.zeros(classes, dtype=torch.float64)
    for i, b in enumerate(batches):
        if limit is not None and i >= limit:
            break
        y = batch_labels(b)
        if y is None:
            return None
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            return None
        counts += torch.bincount(y.cpu().long(), minlength=classes).double()
    return counts


#: Values of ``merge.min_corr_scope``: with class counts, ``min_corr`` for the participants that share a class with
#: the merge's reference only (see :func:`min_corr_by_classes`), or for all of them.
MIN_CORR_SCOPES = ("shared_classes", "all")


def check_min_corr_scope(scope: str) -> None:
    """ValueError unless ``scope`` is one of :data:`MIN_CORR_SCOPES`."""
    if scope not in MIN_CORR_SCOPES:
        raise ValueError(f"min_corr_scope must be one of {', '.join(MIN_CORR_SCOPES)}, got {scope!r}")


def min_corr_by_classes(min_corr: float, counts: Sequence[torch.Tensor]
                        ) -> Tuple[Union[float, List[Optional[float]]], List[int]]:
    """``merge.min_corr`` for the participants after the reference (``counts[0]``: the reference's samples per
    class): ``min_corr`` for a participant that has samples of a class the reference has samples of, None for one
    that shares no class with it. Leaving a unit out keeps the reference's feature in its place; a reference that
    never saw any of the participant's classes has no feature of them to keep, so all of that participant's units
    join the average.

    Returns what :func:`dimat.merge.activation_match` takes as ``min_corr`` (the one threshold when every
    participant shares a class with the reference, else one per participant) and the positions (>= 1) of the
    participants it was lifted for."""
    ref = counts[0] > 0
    lifted = [pos for pos, c in enumerate(counts[1:], start=1) if not bool(((c > 0) & ref).any())]
    if not lifted:
        return float(min_corr), []
    return [None if pos in lifted else float(min_corr) for pos in range(1, len(counts))], lifted
