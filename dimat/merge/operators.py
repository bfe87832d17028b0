"""Merge operators: combine an agent's model with its neighbours' models into one new model.

Three operators share one signature, ``fn(models, weights, batches=None, reset_bn=..., stat_batches=None)``:

* :func:`average` (``"wa"``): weighted average of every floating-point tensor, no alignment.
* :func:`weight_match` (``"wm"``): Git Re-Basin weight matching aligns every neighbour to ``models[0]``, then averages.
* :func:`activation_match` (``"dimat"``): DIMAT aligns every neighbour to ``models[0]`` by correlating activations on
  the agent's own batches, then averages.

``models[0]`` is always the agent's own model: the basis every neighbour is aligned to, and the source of integer
buffers (``num_batches_tracked``). Each operator returns a NEW module; the inputs are never mutated. The groups of
axes that may be permuted come from :func:`dimat.merge.structure.derive` (cached per architecture and input shape).
:data:`METHODS` maps config names to operators; :func:`get` looks one up.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from dimat.merge import combine as combine_mod
from dimat.merge import guard, matching, stats, structure, telemetry
from dimat.merge.repair import BN_REPAIRS, bn_targets, endpoint_stats, mix_bn_stats, repair_layers, reset_and_repair
from dimat.merge.repair import RepairPlan, normalised_layers, restore_unit_norms
from dimat.merge.repair import plan as repair_plan
from dimat.merge.structure import PermutationSpec

__all__ = [
    "average", "weight_match", "activation_match", "reset_bn_stats", "spec_for", "graph_for", "METHODS", "get",
    "UnalignedError", "pair_statistics",
]

Batches = Iterable[Any]
#: A combine hook: ``fn(aligned_states, weights, perms_per_model, spec) -> state``. It replaces the weighted sum of
#: the aligned state dicts (see :mod:`dimat.merge.combine`); ``perms_per_model[j - 1]`` is the permutation given to
#: model j (empty: identity) and ``spec`` the groups (None when nothing was aligned).
CombineFn = Callable[[List[Dict[str, torch.Tensor]], List[float], List[Dict[int, torch.Tensor]],
                      Optional[PermutationSpec]], Dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------------------------- input checking
def _check_models(models: Sequence[nn.Module]) -> List[Dict[str, torch.Tensor]]:
    """State dicts of ``models``; ValueError (naming model index and tensor) unless all share one architecture."""
    if isinstance(models, nn.Module) or len(models) == 0:
        raise ValueError("models must be a non-empty sequence of nn.Module (models[0] is the agent's own model)")
    states = []
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ValueError(f"model {i} is a {type(m).__name__}, not an nn.Module")
        states.append(m.state_dict())
    ref = states[0]
    ref_types = [(n, type(mod)) for n, mod in models[0].named_modules()]
    for i, sd in enumerate(states):
        if i > 0:
            missing = [k for k in ref if k not in sd]
            extra = [k for k in sd if k not in ref]
            if missing or extra:
                name = (missing or extra)[0]
                raise ValueError(
                    f"model {i} has a different architecture from model 0: tensor {name!r} is "
                    f"{'missing from' if missing else 'only in'} model {i}"
                )
            types = [(n, type(mod)) for n, mod in models[i].named_modules()]
            if types != ref_types:
                bad = next((a[0] for a, b in zip(types, ref_types) if a != b), "")
                raise ValueError(f"model {i} has a different architecture from model 0 (module {bad!r})")
        for name, t in sd.items():
            if t.shape != ref[name].shape or t.dtype != ref[name].dtype:
                raise ValueError(
                    f"model {i}: tensor {name!r} has shape {tuple(t.shape)} ({t.dtype}), but model 0 has "
                    f"{tuple(ref[name].shape)} ({ref[name].dtype})"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"model {i}: tensor {name!r} contains NaN or Inf")
    return states


def _to_align(w: Sequence[float], same_basis: Sequence[int]) -> List[int]:
    """Indices of the neighbours to align: weight > 0 and not declared to share ``models[0]``'s basis."""
    same = set()
    for j in same_basis:
        if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 < j < len(w):
            raise ValueError(f"same_basis holds model indices 1..{len(w) - 1}, got {j!r}")
        same.add(int(j))
    return [j for j in range(1, len(w)) if w[j] > 0 and j not in same]


def _check_weights(weights: Sequence[float], n: int) -> List[float]:
    """Weights renormalised to sum to 1; ValueError on a wrong length, a negative, non-finite or all-zero list."""
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError) as e:
        raise ValueError(f"weights must be a sequence of {n} numbers: {e}") from None
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} models; give one weight per model")
    for i, x in enumerate(w):
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"weight {i} (for model {i}) is {x}; weights must be finite and non-negative")
    total = sum(w)
    if total <= 0:
        raise ValueError("weights sum to 0; at least one model needs a positive weight")
    return [x / total for x in w]


def _check(models: Sequence[nn.Module], weights: Sequence[float]):
    states = _check_models(models)
    return states, _check_weights(weights, len(states))


# --------------------------------------------------------------------------------------------------- batches
def batch_input(batch: Any) -> torch.Tensor:
    """The input tensor of a batch that is either a tensor or an ``(input, target, ...)`` pair."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ValueError(f"a batch must be an input tensor or an (input, target) pair, got {type(batch).__name__}")


def iter_inputs(batches: Batches, limit: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Yield the input tensors of the first ``limit`` batches (all when None); ValueError if there are none."""
    if batches is None:
        raise ValueError("batches is None; this operation needs a non-empty iterable of input batches")
    if limit is not None and limit < 1:
        raise ValueError(f"the number of batches must be >= 1 or None, got {limit}")
    n = 0
    for batch in batches:
        if limit is not None and n >= limit:
            break
        x = batch_input(batch)
        if x.shape[0] == 0:
            continue
        n += 1
        yield x
    if n == 0:
        raise ValueError("batches is empty: need at least one non-empty batch of inputs")


# ------------------------------------------------------------------------------------------- combining tensors
def _weighted_sum(states: Sequence[Dict[str, torch.Tensor]], weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Weighted sum of every floating-point tensor; every other tensor is copied from ``states[0]``."""
    out: Dict[str, torch.Tensor] = {}
    for name, t0 in states[0].items():
        if t0.is_floating_point():
            acc = torch.zeros_like(t0, dtype=torch.float64)
            for sd, w in zip(states, weights):
                if w:
                    acc.add_(sd[name].detach().to(torch.float64), alpha=w)
            out[name] = acc.to(t0.dtype)
        else:
            out[name] = t0.detach().clone()
    return out


def _new_model(template: nn.Module, state: Dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@torch.no_grad()
def reset_bn_stats(
    model: nn.Module, batches: Batches, num_batches: Optional[int] = None, channels_last: bool = False
) -> nn.Module:
    """Recompute every BatchNorm layer's running mean and variance on ``batches``, in place.

    The forward passes run in train mode with ``momentum=None`` (a cumulative average over the batches), without
    gradients; afterwards each layer's momentum and the model's train/eval mode are restored. Models without
    BatchNorm are left untouched.

    Parameters
    ----------
    model : the module to repair (modified in place and returned).
    batches : re-iterable of input tensors or ``(input, target)`` pairs.
    num_batches : use only the first ``num_batches`` batches (None: all).
    channels_last : feed 4-D inputs in channels-last memory order (faster convolutions on CPU; only for models
        known to accept it, see :func:`spec_for`).
    """
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]
    if not bns:
        return model
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    device = _device_of(model)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    try:
        model.train()
        for x in iter_inputs(batches, num_batches):
            model(_to(x, device, channels_last))
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.train(was_training)
    return model


def _to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _finish(template: nn.Module, state, batches, reset_bn: bool, stat_batches) -> nn.Module:
    merged = _new_model(template, state)
    if reset_bn and batches is not None:
        # channels-last inputs only where an earlier merge of this architecture showed the model accepts them
        cl = _channels_last(template, _first_input(batches))
        reset_bn_stats(merged, batches, stat_batches, channels_last=cl)
    return merged


# ------------------------------------------------------------------------------------------------- operators
def average(
    models: Sequence[nn.Module],
    weights: Sequence[float],
    batches: Optional[Batches] = None,
    reset_bn: bool = False,
    stat_batches: Optional[int] = None,
    same_basis: Sequence[int] = (),
    repair: bool = False,
    combine: Optional[CombineFn] = None,
    bn_repair: str = "local",
    bn_batches: Optional[int] = None,
    restore_norms: bool = False,
) -> nn.Module:
    """WA: the weighted average of every floating-point tensor, without alignment.

    Parameters
    ----------
    models : ``models[0]`` is the agent's own model (integer buffers come from it); all share one architecture.
    weights : one non-negative weight per model, renormalised to sum to 1.
    batches : optional re-iterable of input tensors or ``(input, target)`` pairs, used only for the BN reset.
    reset_bn : when true (and ``batches`` is given), recompute BatchNorm statistics of the result on ``batches``.
    stat_batches : number of batches used for the BN reset (None: all).
    same_basis : accepted for a uniform signature and ignored: nothing is aligned here.
    repair : with ``reset_bn`` and ``batches``, also the REPAIR correction that :func:`activation_match` applies
        (same layers, same targets), so that ``average(..., reset_bn=r, repair=p)`` is exactly
        ``activation_match(..., reset_bn=r, repair=p)`` with identity permutations. Off by default: WA is the
        plain baseline.
    combine : replaces the weighted sum (see :data:`CombineFn`); called with identity permutations.
    bn_repair, bn_batches : how ``reset_bn`` repairs BatchNorm statistics, and on how many batches, as in
        :func:`activation_match`.
    restore_norms : as in :func:`activation_match`.

    Returns
    -------
    A new module; the inputs are not modified.
    """
    states, w = _check(models, weights)
    _to_align(w, same_basis)  # the same checks as the aligning operators
    check_bn_repair(bn_repair, bn_batches)
    _check_restore(restore_norms, batches)
    if (reset_bn or restore_norms) and batches is not None:
        example = _first_input(batches)  # an empty iterable is an error before any work is done
        if repair or bn_repair != "local" or bn_batches is not None or restore_norms:
            device = _device_of(models[0])
            spec = spec_for(models[0], example.to(device))[0] if repair else None
            cl = _channels_last(models[0], example)
            return _merge_aligned(models, states, w, [{} for _ in models[1:]], spec, batches, reset_bn,
                                  stat_batches, None, repair, cl, combine, bn_repair, bn_batches, restore_norms)
    state = _weighted_sum(states, w) if combine is None else combine(states, w, [{} for _ in states[1:]], None)
    return _finish(models[0], state, batches, reset_bn, stat_batches)


# ------------------------------------------------------------------------------------- groups, cached per arch
_SPEC_CACHE: "OrderedDict[tuple, Tuple[PermutationSpec, fx.Graph]]" = OrderedDict()
_SPEC_CACHE_SIZE = 16


def _arch_key(model: nn.Module, state: Dict[str, torch.Tensor], x: torch.Tensor) -> tuple:
    return (
        type(model).__module__,
        type(model).__qualname__,
        tuple((k, tuple(v.shape), v.dtype) for k, v in state.items()),
        tuple((n, type(m).__name__) for n, m in model.named_modules()),
        tuple(x.shape[1:]),
        x.dtype,
    )


def spec_for(model: nn.Module, example_input: torch.Tensor) -> Tuple[PermutationSpec, fx.Graph]:
    """The model's permutation groups, derived (and self-tested) once per architecture and input shape, and its
    aten graph for inputs of exactly ``example_input``'s shape (the graph the groups' activation sites refer to)."""
    return _spec(model, example_input), graph_for(model, example_input)


def _spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """The model's permutation groups, derived (and self-tested) once per architecture and input shape."""
    key = _arch_key(model, model.state_dict(), example_input)
    hit = _SPEC_CACHE.get(key)
    if hit is not None:
        _SPEC_CACHE.move_to_end(key)
        return hit[0]
    example = example_input[:2]
    spec = structure.derive(model, example)
    _SPEC_CACHE[key] = (spec, fx.Graph())
    _CHANNELS_LAST[key] = _accepts_channels_last(model, example)
    while len(_SPEC_CACHE) > _SPEC_CACHE_SIZE:
        old = _SPEC_CACHE.popitem(last=False)[0]
        _CHANNELS_LAST.pop(old, None)
    return spec


def _memo(cache: "OrderedDict[tuple, Any]", key: tuple, make: Callable[[], Any],
          size: int = _SPEC_CACHE_SIZE) -> Any:
    """``cache[key]``, made by ``make()`` on a miss; the least recently used entries beyond ``size`` are dropped."""
    if key not in cache:
        cache[key] = make()
        while len(cache) > size:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


_GRAPH_CACHE: "OrderedDict[tuple, fx.Graph]" = OrderedDict()


def graph_for(model: nn.Module, x: torch.Tensor) -> fx.Graph:
    """The model's aten graph (:func:`dimat.merge.structure.trace`) for inputs of ``x``'s exact shape, cached per
    architecture and shape; an empty graph when the model cannot be traced."""

    def make() -> fx.Graph:
        graph = fx.Graph()
        try:
            env: Dict[str, fx.Node] = {}
            traced = structure.trace(model, x).graph
            for node in traced.nodes:  # a free copy: the trace's module holds a model copy
                env[node.name] = graph.node_copy(node, lambda n: env[n.name])
            graph.dimat_constants = getattr(traced, "dimat_constants", {})
        except Exception:  # derive already warned; nothing is permuted
            graph = fx.Graph()
        return graph

    key = _arch_key(model, model.state_dict(), x) + (tuple(x.shape), "aten")
    return _memo(_GRAPH_CACHE, key, make, 2 * _SPEC_CACHE_SIZE)


_CHANNELS_LAST: Dict[tuple, bool] = {}


@torch.no_grad()
def _accepts_channels_last(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether the model gives the same outputs on channels-last 4-D inputs (faster CPU convolutions).

    Some models cannot take them (``x.view(n, -1)`` on a channels-last map raises), so this is probed once per
    architecture on a copy; any error or difference means no.
    """
    if example.dim() != 4 or not example.is_floating_point():
        return False
    try:
        m = copy.deepcopy(model).eval()
        a = m(example)
        b = m(example.contiguous(memory_format=torch.channels_last))
        return bool(
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (float(a.abs().max()) + 1e-12))
        )
    except Exception:
        return False


def _channels_last(model: nn.Module, example: torch.Tensor) -> bool:
    return _CHANNELS_LAST.get(_arch_key(model, model.state_dict(), example), False)


def _repair_targets(models, aligned, w, layers, batches, stat_batches, cl=False):
    """Weighted per-unit output (mean, std) of the aligned endpoints (``aligned``: their permuted state dicts)
    for the named ``layers``; each endpoint is measured in ``models[0]``'s unit order."""
    device = _device_of(models[0])
    targets: Dict[str, List[torch.Tensor]] = {}
    for j, (sd, wj) in enumerate(zip(aligned, w)):
        if wj <= 0:
            continue
        model = models[j] if j == 0 or sd is None else _new_model(models[j], sd)
        inputs = (_to(x, device, cl) for x in iter_inputs(batches, stat_batches))
        for name, (mean, std) in endpoint_stats(model, layers, inputs).items():
            acc = targets.setdefault(name, [torch.zeros_like(mean), torch.zeros_like(std)])
            acc[0] += wj * mean
            acc[1] += wj * std
    return {name: (m, s) for name, (m, s) in targets.items()}


_PLAN_CACHE: "OrderedDict[tuple, RepairPlan]" = OrderedDict()


def _plan_for(model: nn.Module, candidates: List[str], example: torch.Tensor) -> RepairPlan:
    """REPAIR's plan (:func:`dimat.merge.repair.plan`), made once per architecture, input shape and layer set."""
    key = _arch_key(model, model.state_dict(), example) + (tuple(candidates),)
    return _memo(_PLAN_CACHE, key, lambda: repair_plan(model, candidates, example))


_NORMALISED_CACHE: "OrderedDict[tuple, List[str]]" = OrderedDict()
_NORM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the layers restore_norms may rescale


def _normalised_for(model: nn.Module, example: torch.Tensor) -> List[str]:
    """The conv/linear layers only a BatchNorm reads (:func:`dimat.merge.repair.normalised_layers`), once per
    architecture and input shape."""

    def make() -> List[str]:
        layers = [n for n, m in model.named_modules() if isinstance(m, _NORM_LAYERS)]
        found = normalised_layers(model, layers, example) if layers else []
        if not found:  # said once per architecture: the option was asked for and does nothing here
            warnings.warn(f"restore_norms: no conv/linear layer of {type(model).__name__} has an output that only a "
                          f"BatchNorm reads, so nothing is rescaled (layers before GroupNorm, LayerNorm or no "
                          f"normalisation are left as the combine step made them)", stacklevel=5)
        return found

    return _memo(_NORMALISED_CACHE, _arch_key(model, model.state_dict(), example), make)


def _check_restore(restore_norms: bool, batches) -> None:
    if not isinstance(restore_norms, bool):
        raise ValueError(f"restore_norms must be true or false, got {restore_norms!r}")
    if restore_norms and batches is None:
        raise ValueError("restore_norms needs batches: the layers it rescales are found by one forward pass, and "
                         "the BatchNorm statistics must be recomputed after it")


def check_min_corr(min_corr: Optional[float]) -> None:
    """ValueError unless ``min_corr`` is None or a finite real number (not a bool)."""
    if min_corr is not None and (isinstance(min_corr, bool) or not isinstance(min_corr, numbers.Real)
                                 or not math.isfinite(min_corr)):
        raise ValueError(f"min_corr must be a finite number or None, got {min_corr!r}")


def check_bn_repair(bn_repair: str, bn_batches: Optional[int] = None) -> None:
    """ValueError unless ``bn_repair`` is one of :data:`~dimat.merge.repair.BN_REPAIRS` and ``bn_batches`` None or
    an int >= 1 (the operators' arguments; the node and the Flower aggregator check theirs with it)."""
    if bn_repair not in BN_REPAIRS:
        raise ValueError(f"bn_repair must be one of {', '.join(BN_REPAIRS)}, got {bn_repair!r}")
    if bn_batches is not None and (isinstance(bn_batches, bool) or not isinstance(bn_batches, numbers.Integral)
                                   or bn_batches < 1):
        raise ValueError(f"bn_batches must be an integer >= 1 or None, got {bn_batches!r}")


def _mix_targets(models, states, aligned, w, batches, n_batches, cl):
    """:func:`dimat.merge.repair.bn_targets` of a merge: ``states`` are the aligned state dicts, ``aligned[j]``
    is None where model j was not permuted (it is then measured as it is)."""
    if not any(isinstance(m, _BN_TYPES) and m.track_running_stats for m in models[0].modules()):
        return {}  # nothing to repair: no endpoint copies, no passes
    device = _device_of(models[0])
    endpoints = [models[j] if j == 0 or sd is None else _new_model(models[j], sd) for j, sd in enumerate(aligned)]
    return bn_targets(endpoints, states, w, lambda: (_to(x, device, cl) for x in iter_inputs(batches, n_batches)))


def _repair_bn(merged, models, states, aligned, w, spec, batches, n_batches, cl, repair: bool,
               bn_repair: str) -> None:
    """The statistics repair after the weighted sum (in place): BatchNorm statistics by ``bn_repair`` (a reset on
    the local batches, or the participants' collapse-corrected mixture), plus, with ``repair``, REPAIR of the
    permuted conv/linear layers that no BatchNorm reads directly."""
    device = _device_of(merged)
    mix = _mix_targets(models, states, aligned, w, batches, n_batches, cl) if bn_repair == "mix" else None
    inputs = lambda: (_to(x, device, cl) for x in iter_inputs(batches, n_batches))  # noqa: E731
    steps = None
    if repair:
        example = _to(_first_input(batches), device, cl)[:2]
        candidates = [n for n, _ in repair_layers(models[0], spec)]
        steps = _plan_for(merged, candidates, example) if candidates else None
    if steps is None or not steps.layers:
        if mix is None:
            reset_bn_stats(merged, batches, n_batches, channels_last=cl)
        else:
            mix_bn_stats(merged, inputs, mix)
        return
    targets = _repair_targets(models, aligned, w, list(steps.layers), batches, n_batches, cl)
    reset_and_repair(merged, inputs, targets, steps, example, bn_mix=mix)


def _cached_spec(model: nn.Module, state: Dict[str, torch.Tensor]) -> Optional[PermutationSpec]:
    """The most recently derived spec of this architecture, for any input shape (None if there is none)."""
    key = _arch_key(model, state, torch.zeros(1))[:4]
    for k in reversed(_SPEC_CACHE):
        if k[:4] == key:
            return _SPEC_CACHE[k][0]
    return None


def _merge_aligned(models, states, w, perms_per_model, spec, batches, reset_bn, stat_batches, profile,
                   repair=False, cl=False, combine=None, bn_repair="local", bn_batches=None, restore_norms=False,
                   masks=None):
    """Apply the permutations, take the weighted sum, with ``restore_norms`` give the units a BatchNorm normalises
    their mean norm back, then repair the statistics (BatchNorm by ``bn_repair``, and REPAIR) on ``bn_batches``
    batches (None: ``stat_batches``)."""
    t = time.perf_counter()
    aligned = [states[0]] + [
        structure.apply_permutation(sd, spec, perms) if perms else sd
        for sd, perms in zip(states[1:], perms_per_model)
    ]
    permuted = [None] + [sd if perms else None for sd, perms in zip(aligned[1:], perms_per_model)]
    if masks is not None and any(masks):  # merge.min_corr: poorly matched units are left out of the mean
        entry = [None] + list(masks)
        state = combine_mod.combine_states(aligned, w, combine_mod.CombineOptions(), masks=entry) if combine is None \
            else combine(aligned, w, perms_per_model, spec, masks=entry)
    else:
        state = _weighted_sum(aligned, w) if combine is None else combine(aligned, w, perms_per_model, spec)
    merged = _new_model(models[0], state)
    if restore_norms:
        example = _to(_first_input(batches), _device_of(merged), cl)[:2]
        restore_unit_norms(merged, _normalised_for(merged, example), aligned, w)
    t_apply = time.perf_counter() - t
    t = time.perf_counter()
    if reset_bn and batches is not None:
        n_batches = stat_batches if bn_batches is None else bn_batches
        if repair or bn_repair != "local":
            _repair_bn(merged, models, aligned, permuted, w, spec, batches, n_batches, cl, repair, bn_repair)
        else:
            reset_bn_stats(merged, batches, n_batches, channels_last=cl)
    if profile is not None:
        profile["apply_s"] = t_apply
        profile["bn_reset_s"] = time.perf_counter() - t
    return merged


def _first_input(batches: Batches) -> torch.Tensor:
    """The first input batch; ValueError for None, an empty iterable or a one-shot iterator (read several times)."""
    if batches is not None and iter(batches) is batches:
        raise ValueError(
            "batches must be re-iterable (a list, or an object whose __iter__ starts over): it is read once for "
            "the statistics and again for the BN reset; got a one-shot iterator"
        )
    return next(iter_inputs(batches, 1))


def activation_match(
    models: Sequence[nn.Module],
    weights: Sequence[float],
    batches: Batches,
    reset_bn: bool = True,
    stat_batches: Optional[int] = None,
    repair: bool = True,
    profile: Optional[Dict[str, float]] = None,
    same_basis: Sequence[int] = (),
    strict: bool = False,
    combine: Optional[CombineFn] = None,
    identity_prior: float = 0.0,
    keep_margin: Optional[float] = None,
    report: Optional[Dict[int, Dict[str, float]]] = None,
    bn_repair: str = "local",
    bn_batches: Optional[int] = None,
    pair_stats: Optional[Mapping[int, Sequence[stats.CrossStats]]] = None,
    restore_norms: bool = False,
    min_corr: Union[float, Sequence[Optional[float]], None] = None,
) -> nn.Module:
    """DIMAT: align every neighbour to ``models[0]`` by activation correlation on local batches, then average.

    For each neighbour j and each permutable group, the Pearson correlation between ``models[0]``'s and
    ``models[j]``'s units at the group's activation sites (eval mode, streaming float64 statistics) feeds a linear
    assignment (scipy ``linear_sum_assignment``, maximise); the permutation is applied to every axis of the group,
    the aligned models are averaged with ``weights``, and BatchNorm statistics are recomputed on ``batches``.

    Parameters
    ----------
    models : ``models[0]`` is the agent's own model (the basis; integer buffers come from it), then neighbours.
    weights : one non-negative weight per model, renormalised to sum to 1.
    batches : re-iterable of input tensors or ``(input, target)`` pairs from the agent's own data.
    reset_bn : recompute BatchNorm running statistics of the result on the batches (momentum restored after).
    stat_batches : number of batches used for the statistics and the BN reset (None: all).
    repair : with ``reset_bn``, also apply the REPAIR variance correction to permuted conv/linear layers that no
        BatchNorm follows (see :mod:`dimat.merge.repair`); costs one more forward pass per model, and only when
        such layers exist.
    profile : optional dict that receives the seconds spent: ``stats_s``, ``assign_s``, ``apply_s``,
        ``bn_reset_s`` (BN reset and REPAIR).
    same_basis : indices (>= 1) of models already in ``models[0]``'s unit order, e.g. descendants of one common
        merged model: they are averaged as they are (the identity permutation), with no statistics of their
        own. Re-estimating a permutation that is known to be the identity only adds the estimate's errors.
    strict : raise :class:`UnalignedError` instead of averaging units that cannot be aligned: frozen hidden-unit
        groups (see :meth:`PermutationSpec.coverage`) and permutable groups that have no activation site (these
        are otherwise aligned by weight matching).
    combine : replaces the weighted sum of the aligned models (see :data:`CombineFn`).
    identity_prior, keep_margin : guards against moving units on noise (see :mod:`dimat.merge.guard`; plain groups only: structured groups are
        matched factor by factor without them): lambda
        added to the correlation's diagonal before the assignment, and the margin by which a group's matched
        correlation must beat the diagonal's for the group to be permuted at all (None: no test).
    report : optional dict that receives, per aligned model index j, the mean correlation before (diagonal) and
        after alignment and the share of units moved (:func:`dimat.merge.telemetry.alignment`).
    bn_repair : how ``reset_bn`` sets the merged BatchNorm running statistics. ``"local"``: recomputed on the
        batches (train-mode forward passes, cumulative average). ``"mix"``: the weighted mixture of the aligned
        participants' own running statistics (the variance includes the spread of their means), its variance
        multiplied per channel by the collapse ratio measured on the batches: the merged model's input variance
        over the weighted mean of the aligned endpoints' (every BatchNorm normalising by batch statistics on both
        sides); the local data's mean is never used (:func:`dimat.merge.repair.bn_targets`). ``num_batches_tracked``
        stays the agent's own. Costs one forward pass per participant more than ``"local"``.
    bn_batches : number of batches for the BatchNorm step and REPAIR (None: ``stat_batches``).
    pair_stats : optional, per model index j >= 1, the statistics of the pair (``models[0]``, ``models[j]``) at
        every activation site, in :func:`pair_statistics`' order, e.g. pooled from both agents' data
        (:func:`dimat.merge.stats.pool`). Model j is then aligned on them and ``batches`` are not read for it
        (they still serve the BatchNorm reset and REPAIR); the others are measured on ``batches``.
    restore_norms : after the combine step, give every output unit of each conv/linear layer whose output only a
        BatchNorm reads the weighted mean of its weight norm in the aligned models (weights and bias scaled by
        one factor per unit; :func:`dimat.merge.repair.restore_unit_norms`). The function is unchanged once the
        BatchNorm statistics are recomputed (``reset_bn``), but the merged model trains at its participants'
        effective step size instead of a larger one: averaging units that do not agree shortens them.
    min_corr : None (default): every aligned unit is averaged. A number: a neighbour's unit joins the average
        only where its correlation with the ``models[0]`` unit it was matched to is at least ``min_corr``; elsewhere
        that neighbour is left out of the mean, for the unit's incoming and outgoing weights and its
        normalisation parameters alike (:func:`dimat.merge.combine.masked_mean`), so the unit comes from the
        participants that do agree (at least ``models[0]``). Averaging two unrelated features gives a third that
        neither model uses; this keeps the basis model's feature instead. Models in ``same_basis`` are averaged
        whole; so are groups aligned by weight matching (no correlation). Above 1, no aligned neighbour
        contributes at all. A sequence gives one threshold per model of ``models[1:]`` (None: all of that model's
        units join). With a combine hook, the hook gets ``masks=`` (rule ``mean`` only). ``report`` gains
        ``kept``: the share of a neighbour's units that joined the average (for each model with a threshold).

    Returns
    -------
    A new module; the inputs are not modified.
    """
    states, w = _check(models, weights)
    check_bn_repair(bn_repair, bn_batches)
    _check_restore(restore_norms, batches)
    if not (math.isfinite(identity_prior) and identity_prior >= 0):
        raise ValueError(f"identity_prior must be a finite number >= 0, got {identity_prior!r}")
    if keep_margin is not None and not math.isfinite(keep_margin):
        raise ValueError(f"keep_margin must be a finite number or None, got {keep_margin!r}")
    thresholds = _per_model_min_corr(min_corr, len(models) - 1)
    device = _device_of(models[0])
    example = _first_input(batches).to(device)
    spec, graph = spec_for(models[0], example)
    if strict:
        _check_alignable(spec)
    cl = _channels_last(models[0], example)
    groups = spec.permutable
    todo = _to_align(w, same_basis)
    t = time.perf_counter()
    corrs: List[Dict[int, torch.Tensor]] = []
    if groups and todo:
        sites = stats.pair_sites(spec, groups)
        given = dict(pair_stats or {})
        for j in given:
            if j not in todo:
                raise ValueError(f"pair_stats given for model {j}, which is not aligned here (models to align: "
                                 f"{todo})")
            if [st.mean_a.numel() for st in given[j]] != [s.units for _, s in sites]:
                raise ValueError(f"pair_stats for model {j} do not match the model's {len(sites)} activation sites")
        measure = [j for j in todo if j not in given]
        measured: List[List[stats.CrossStats]] = []
        if measure:
            inputs = (_to(x, device, cl) for x in iter_inputs(batches, stat_batches))
            measured = stats.collect_pair_stats([models[0]] + [models[j] for j in measure], spec,
                                                lambda x: graph_for(models[0], x), inputs, groups)
        per_model = dict(zip(measure, measured))
        per_model.update(given)
        corrs = [stats.correlations_from_stats(sites, per_model[j]) for j in todo]
    t_stats = time.perf_counter() - t
    t = time.perf_counter()
    perms: List[Dict[int, torch.Tensor]] = [{} for _ in models[1:]]
    masks: List[Optional[combine_mod.EntryMask]] = [None for _ in models[1:]]
    for j, corr in zip(todo, corrs):
        perms[j - 1] = _perms_from_correlations(spec, corr, states[0], states[j], models[0], identity_prior,
                                                keep_margin)
        kept = None
        if thresholds[j - 1] is not None:
            masks[j - 1], kept = _unit_masks(spec, corr, perms[j - 1], thresholds[j - 1], states[0])
        if report is not None:
            report[j] = telemetry.alignment(corr, perms[j - 1])
            if kept is not None:
                report[j]["kept"] = kept
    if profile is not None:
        profile["stats_s"] = t_stats
        profile["assign_s"] = time.perf_counter() - t
    return _merge_aligned(
        models, states, w, perms, spec, batches, reset_bn, stat_batches, profile, repair, cl, combine, bn_repair,
        bn_batches, restore_norms, masks,
    )


@torch.no_grad()
def pair_statistics(models: Sequence[nn.Module], batches: Batches,
                    stat_batches: Optional[int] = None) -> List[List[stats.CrossStats]]:
    """Per neighbour j >= 1, the activation statistics of the pair (``models[0]``, ``models[j]``) on ``batches``:
    one :class:`~dimat.merge.stats.CrossStats` per activation site of the permutable groups (``a``: models[0]'s
    units), exactly what :func:`activation_match` gathers before matching. An agent computes them on its own data
    for each neighbour's model, sends them (:func:`dimat.merge.stats.encode_pair_stats`) and gives them, pooled
    with the neighbour's, back to :func:`activation_match` as ``pair_stats``; no input or label leaves it.

    Returns one (possibly empty) list per neighbour."""
    _check_models(models)
    device = _device_of(models[0])
    example = _first_input(batches).to(device)
    spec, _ = spec_for(models[0], example)
    cl = _channels_last(models[0], example)
    if not spec.permutable or len(models) < 2:
        return [[] for _ in models[1:]]
    inputs = (_to(x, device, cl) for x in iter_inputs(batches, stat_batches))
    return stats.collect_pair_stats(list(models), spec, lambda x: graph_for(models[0], x), inputs,
                                    spec.permutable)


def pair_sites_of(model: nn.Module, example_input: torch.Tensor) -> List[int]:
    """Units of each activation site in :func:`pair_statistics`' order, for ``model`` on inputs like
    ``example_input`` (what a pair-statistics message for this model must hold)."""
    spec, _ = spec_for(model, example_input.to(_device_of(model)))
    return [s.units for _, s in stats.pair_sites(spec, spec.permutable)]


class UnalignedError(ValueError):
    """``activation_match(..., strict=True)`` met units it cannot align."""


def _unaligned(spec: PermutationSpec) -> List[str]:
    """What a merge would average without aligning: frozen hidden groups, and permutable factors no site observes."""
    out = [f"{name}: {why}" for name, why in spec.coverage().frozen]
    bundles = spec.bundles()
    for bundle in bundles:
        seen = {k for gi in bundle if spec.groups[gi].sites for k in spec.groups[gi].keys()}
        blind = [gi for gi in bundle if any(k not in seen for k in spec.groups[gi].keys())]
        out += [f"{spec.groups[gi].name}: no activation site observes its units" for gi in blind]
    return out


def _check_alignable(spec: PermutationSpec) -> None:
    bad = _unaligned(spec)
    if bad:
        raise UnalignedError(
            f"strict activation matching: {len(bad)} group(s) cannot be aligned by activations: " + "; ".join(bad))


def _per_model_min_corr(min_corr: Union[float, Sequence[Optional[float]], None], n: int) -> List[Optional[float]]:
    """``activation_match``'s ``min_corr`` as one threshold (or None) per aligned model; ValueError on a sequence of
    the wrong length or a threshold that is not a finite number."""
    if min_corr is None or isinstance(min_corr, (numbers.Real, bool, str, bytes)):
        check_min_corr(min_corr)
        return [None if min_corr is None else float(min_corr)] * n
    per = list(min_corr)
    if len(per) != n:
        raise ValueError(f"min_corr: {len(per)} thresholds for {n} aligned models")
    for c in per:
        check_min_corr(c)
    return [None if c is None else float(c) for c in per]


def _unit_masks(spec: PermutationSpec, corr: Mapping[int, torch.Tensor], perms: Mapping[int, torch.Tensor],
                min_corr: float, state: Mapping[str, torch.Tensor]) -> Tuple[combine_mod.EntryMask, float]:
    """The entries an aligned neighbour contributes under ``min_corr`` (see :func:`activation_match`), and the
    share of its correlated units that pass. A unit passes when its matched correlation (``corr[g][u, perm[u]]``,
    basis unit ``u``) is at least ``min_corr``; a NaN correlation (a unit constant on the batches) fails."""
    out: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
    passed = total = 0
    for gi, c in corr.items():
        n = c.shape[0]
        p = torch.as_tensor(perms.get(gi, torch.arange(n)), dtype=torch.long).cpu()
        keep = (c.detach().cpu().double()[torch.arange(n), p] >= min_corr)
        passed += int(keep.sum())
        total += n
        if bool(keep.all()):
            continue
        for ax in spec.groups[gi].axes:
            if ax.units != n:
                raise AssertionError(f"{ax} has {ax.units} units, its group {n}")  # derive() guarantees equality
            vec = torch.ones(state[ax.tensor].shape[ax.axis], dtype=torch.float64)
            vec[ax.offset: ax.offset + n * ax.block] = keep.double().repeat_interleave(ax.block)
            out.setdefault(ax.tensor, []).append((ax.axis, vec))
    return out, (passed / total if total else 1.0)


def _perms_from_correlations(spec, corr, s0, sj, model, identity_prior: float = 0.0,
                             keep_margin: Optional[float] = None) -> Dict[int, torch.Tensor]:
    """Per permutable group, the permutation aligning the neighbour: plain groups by one assignment on their
    correlation (ties broken by parameters, guarded by ``identity_prior`` and ``keep_margin``), bundles of
    structured groups factor by factor; groups that no activation site observes are aligned by weight matching."""
    out: Dict[int, torch.Tensor] = {}
    blind: List[int] = []
    for bundle in spec.bundles():
        if len(bundle) == 1 and not spec.groups[bundle[0]].structured:
            gi = bundle[0]
            if gi in corr:
                g = spec.groups[gi]
                score = corr[gi] - matching.TIE_BREAK * matching.unit_distance(s0, sj, g)
                out[gi] = guard.guarded_match(score, corr[gi], identity_prior, keep_margin)
            else:
                blind.append(gi)
            continue
        seen = {k for gi in bundle if gi in corr for k in spec.groups[gi].keys()}
        if any(k not in seen for gi in bundle for k in spec.groups[gi].keys()):
            blind += bundle
            continue
        keys = matching.match_bundle(spec, bundle, corr)
        for gi in bundle:
            out[gi] = structure.compose(spec.groups[gi], keys)
    if blind:
        names = {n for n, _ in model.named_parameters()}
        cpu0 = {k: v.detach().cpu() for k, v in s0.items() if k in names}
        cpuj = {k: v.detach().cpu() for k, v in sj.items() if k in names}
        out.update(matching.weight_matching_perms(cpu0, cpuj, spec, blind, names))
    return out


def weight_match(
    models: Sequence[nn.Module],
    weights: Sequence[float],
    batches: Optional[Batches] = None,
    reset_bn: bool = True,
    stat_batches: Optional[int] = None,
    example_input: Optional[torch.Tensor] = None,
    profile: Optional[Dict[str, float]] = None,
    same_basis: Sequence[int] = (),
    repair: bool = True,
    combine: Optional[CombineFn] = None,
    bn_repair: str = "local",
    bn_batches: Optional[int] = None,
    restore_norms: bool = False,
) -> nn.Module:
    """WM: align every neighbour to ``models[0]`` by Git Re-Basin weight matching, then average.

    Coordinate descent over the permutable groups (random order, at most 100 sweeps): each step solves a linear
    assignment on the sum over the group's parameter axes of ``W_0 W_j^T``, until a sweep brings no improvement.

    Parameters
    ----------
    models, weights : as in :func:`activation_match`.
    batches : re-iterable of inputs or ``(input, target)`` pairs; gives the input shape for deriving the groups and
        the data for the BN reset. Without batches no BN reset runs, and the groups come from ``example_input`` or
        from an earlier merge of the same architecture.
    reset_bn : recompute BatchNorm statistics of the result on ``batches`` (when given).
    stat_batches : number of batches used for the BN reset (None: all).
    example_input : an input batch for deriving the groups when ``batches`` is None.
    profile : optional dict that receives ``assign_s``, ``apply_s``, ``bn_reset_s`` (seconds).
    same_basis : as in :func:`activation_match`: models taken with the identity permutation.
    repair : with ``reset_bn`` and ``batches``, also the REPAIR correction, as in :func:`activation_match`.
    combine : as in :func:`activation_match`.
    bn_repair, bn_batches : as in :func:`activation_match`.
    restore_norms : as in :func:`activation_match`; needs ``batches``.

    Returns
    -------
    A new module; the inputs are not modified.
    """
    states, w = _check(models, weights)
    check_bn_repair(bn_repair, bn_batches)
    _check_restore(restore_norms, batches)
    todo = _to_align(w, same_basis)
    device = _device_of(models[0])
    cl = False
    if batches is not None:
        example = _first_input(batches).to(device)
        spec = _spec(models[0], example)
        cl = _channels_last(models[0], example)
    elif example_input is not None:
        spec = _spec(models[0], example_input.to(device))
    else:
        found = _cached_spec(models[0], states[0])
        if found is None:
            raise ValueError(
                "weight_match needs batches or an example_input to derive the permutation groups "
                "(or an earlier merge of this architecture)"
            )
        spec = found
    names = {n for n, _ in models[0].named_parameters()}
    t = time.perf_counter()
    perms: List[Dict[int, torch.Tensor]] = [{} for _ in models[1:]]
    if spec.permutable:
        cpu = [{k: v.detach().cpu() for k, v in sd.items() if k in names} for sd in states]
        for j in todo:
            perms[j - 1] = matching.weight_matching_perms(cpu[0], cpu[j], spec, spec.permutable, names)
    if profile is not None:
        profile["stats_s"] = 0.0
        profile["assign_s"] = time.perf_counter() - t
    return _merge_aligned(models, states, w, perms, spec, batches, reset_bn, stat_batches, profile, repair, cl,
                          combine, bn_repair, bn_batches, restore_norms)


MergeFn = Callable[..., nn.Module]

#: config name -> merge operator; every entry accepts
#: ``fn(models, weights, batches=, reset_bn=, stat_batches=, same_basis=, combine=, bn_repair=, bn_batches=,
#: restore_norms=)``.
METHODS: Dict[str, MergeFn] = {"dimat": activation_match, "wa": average, "wm": weight_match}


def get(name: str) -> MergeFn:
    """The merge operator registered under ``name`` (see :data:`METHODS`); ValueError listing the valid names."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown merge method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None
