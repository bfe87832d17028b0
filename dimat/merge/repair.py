"""REPAIR-style statistics correction (Jordan et al., ICLR 2023) for merged layers that no BatchNorm follows.

Averaging aligned but different networks shrinks the spread of hidden activations ("variance collapse"). A
BatchNorm layer fixes that when its statistics are recomputed; a conv/linear layer with no BatchNorm right after it
keeps the collapse. That includes every layer of a LayerNorm network (a transformer): LayerNorm normalises each
token across its units, so it cannot give a unit back the spread it lost against the other units. For each such
layer we measure the per-unit mean and standard deviation of its output in every (aligned) endpoint model, take
their weighted mean as the target, and rescale the merged layer's weights and bias so that its outputs have the
target statistics.

Every statistic of the merged model is measured on the inputs the finished model will see: in eval mode (no
dropout), with every upstream BatchNorm already reset and every upstream corrected layer already fused. The
layers are therefore processed in passes over the batches, in dependency order (:func:`plan`): pass ``l`` resets
the BatchNorm layers of level ``l`` (train mode, cumulative average, as :func:`~dimat.merge.operators.
reset_bn_stats` does) and measures the corrected layers of level ``l``, whose inputs depend only on lower levels.
Dependencies come from the autograd graph of one probe forward pass, so any model that runs is handled, whatever
its code looks like. A pass stops as soon as the last module it measures has run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from dimat.merge.structure import PermutationSpec, output_tensors
from dimat.merge.stats import eval_mode

__all__ = ["repair_layers", "endpoint_stats", "plan", "RepairPlan", "reset_and_repair", "BN_REPAIRS", "BNTarget",
           "mixture_stats", "bn_input_stats", "bn_targets", "mix_bn_stats", "refresh_bn_stats", "normalised_layers",
           "restore_unit_norms"]

#: How a merge repairs BatchNorm running statistics (``merge.bn_repair``): ``local`` recomputes them on the
#: agent's own batches; ``mix`` takes the mixture of the aligned participants' own running statistics and
#: corrects its variance by the collapse ratio measured on local batches (see :func:`bn_targets`).
BN_REPAIRS = ("local", "mix")

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm
_EPS = 1e-5

Inputs = Union[Iterable[torch.Tensor], Callable[[], Iterable[torch.Tensor]]]


def _channel_dim(layer: nn.Module, out: torch.Tensor) -> int:
    return out.dim() - 1 if isinstance(layer, nn.Linear) else 1


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BN) and m.track_running_stats


def repair_layers(model: nn.Module, spec: PermutationSpec, graph=None) -> List[Tuple[str, int]]:
    """``(module name, group index)`` of every conv/linear layer whose output units are permuted.

    Candidates only: :func:`plan` drops those whose output goes straight into a BatchNorm (the BN reset already
    repairs them). ``graph`` is accepted for compatibility and not used.
    """
    mods = dict(model.named_modules())
    out: List[Tuple[str, int]] = []
    for gi in spec.permutable:
        for a in spec.groups[gi].axes:
            if a.axis == 0 and a.offset == 0 and a.tensor.endswith(".weight"):
                name = a.tensor[: -len(".weight")]
                layer = mods.get(name)
                if isinstance(layer, _LAYERS) and layer.weight.shape[0] == a.units * a.block \
                        and (name, gi) not in out:
                    out.append((name, gi))
    return out


@dataclass
class RepairPlan:
    """Which layers to correct and in which pass; which BatchNorm layers to reset in which pass.

    ``layers`` and ``bns`` map module names to a level (0, 1, ...); ``followed_by_bn`` lists the candidate layers
    dropped because a BatchNorm reads their output directly.
    """

    layers: Dict[str, int] = field(default_factory=dict)
    bns: Dict[str, int] = field(default_factory=dict)
    followed_by_bn: List[str] = field(default_factory=list)

    @property
    def levels(self) -> int:
        return 1 + max([*self.layers.values(), *self.bns.values(), -1])


def _first_tensor(value) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def plan(model: nn.Module, candidates: Sequence[str], example: torch.Tensor) -> RepairPlan:
    """Levels of the corrected layers and the BatchNorm layers, from one probe forward pass on ``example``.

    The probe runs on a copy of ``model`` (eval mode, every parameter requiring grad) and records, for every call
    of a candidate layer or BatchNorm, its output's autograd node; walking back from each call's input node to
    the nearest recorded nodes gives its direct dependencies. Then, in call order: a BatchNorm's level is the
    highest level of the BatchNorms it depends on, and at least one more than that of any corrected layer it
    depends on (BatchNorms of one level are reset together, in one train-mode pass, as a plain reset does); a
    corrected layer's level is one more than that of anything it depends on, so it is measured on final inputs.
    A module called several times gets the highest level of its calls.
    """
    probe = copy.deepcopy(model).eval()
    for p in probe.parameters():
        p.requires_grad_(True)
    wanted = set(candidates)
    mods = dict(probe.named_modules())
    watched = [n for n, m in mods.items() if n in wanted or _is_bn(m)]
    calls: List[Tuple[str, object, object]] = []  # (module name, input autograd node, output autograd node)
    pending: Dict[str, List[object]] = {n: [] for n in watched}

    def pre(name):
        def hook(mod, args):
            t = _first_tensor(args)
            pending[name].append(t.grad_fn if t is not None else None)
        return hook

    def post(name):
        def hook(mod, args, out):
            t = _first_tensor(out)
            calls.append((name, pending[name].pop(), t.grad_fn if t is not None else None))
        return hook

    handles = [mods[n].register_forward_pre_hook(pre(n)) for n in watched]
    handles += [mods[n].register_forward_hook(post(n)) for n in watched]
    try:
        with torch.enable_grad():
            probe(example)
    finally:
        for h in handles:
            h.remove()

    # candidate layers whose output a BatchNorm reads directly are left to the BN reset
    bn_inputs = {fn_in for name, fn_in, _ in calls if _is_bn(mods[name]) and fn_in is not None}
    direct_bn = {name for name, _, fn_out in calls if name in wanted and fn_out is not None and fn_out in bn_inputs}
    result = RepairPlan(followed_by_bn=sorted(direct_bn))
    calls = [c for c in calls if _is_bn(mods[c[0]]) or c[0] not in direct_bn]
    kinds = ["bn" if _is_bn(mods[n]) else "layer" for n, _, _ in calls]
    owner: Dict[object, int] = {}  # output autograd node -> index of the call that produced it
    for i, (_, _, fn) in enumerate(calls):
        if fn is not None:
            owner.setdefault(fn, i)

    def deps(fn_in) -> Set[int]:
        found: Set[int] = set()
        seen: Set[object] = set()
        stack = [fn_in] if fn_in is not None else []
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if fn in owner:
                found.add(owner[fn])
                continue  # that call's own level already accounts for everything behind it
            stack.extend(nxt for nxt, _ in getattr(fn, "next_functions", ()))
        return found

    dep_lists = [deps(fn_in) for _, fn_in, _ in calls]
    module_level: Dict[str, int] = {}
    for _ in range(len(calls) + 1):  # a module called twice can raise levels seen earlier; iterate to a fixpoint
        level: List[int] = []
        for i, (name, _, _) in enumerate(calls):
            lv = module_level.get(name, 0)
            for d in dep_lists[i]:
                if d >= i:
                    continue
                # a BatchNorm behind a BatchNorm is reset in the same pass; anything behind a corrected layer,
                # and a corrected layer behind anything, waits for the next one
                same_pass = kinds[d] == "bn" and kinds[i] == "bn"
                lv = max(lv, level[d] if same_pass else level[d] + 1)
            level.append(lv)
        new: Dict[str, int] = {}
        for i, (name, _, _) in enumerate(calls):
            new[name] = max(new.get(name, 0), level[i])
        if new == module_level:
            break
        module_level = new
    for i, (name, _, _) in enumerate(calls):
        if kinds[i] == "bn":
            result.bns[name] = module_level[name]
        elif kinds[i] == "layer":
            result.layers[name] = module_level[name]
    return result


class _Moments:
    """Per-unit running mean and mean square of a layer's outputs (float64, equal weight per sample)."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: Optional[torch.Tensor] = None
        self.s2: Optional[torch.Tensor] = None

    def add(self, out: torch.Tensor, dim: int) -> None:
        x = out.detach().movedim(dim, -1).reshape(-1, out.shape[dim]).double()
        s1, s2 = x.sum(0), (x * x).sum(0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.shape[0]

    def mean_std(self) -> Tuple[torch.Tensor, torch.Tensor]:
        mean, var = self.mean_var()
        return mean, var.sqrt()

    def mean_var(self) -> Tuple[torch.Tensor, torch.Tensor]:
        mean = self.s1 / self.n
        return mean, (self.s2 / self.n - mean * mean).clamp_min(0)


def _batches(inputs: Inputs) -> Iterable[torch.Tensor]:
    return inputs() if callable(inputs) else inputs


@torch.no_grad()
def endpoint_stats(
    model: nn.Module, layers: Sequence[str], inputs: Inputs
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit (mean, std) of each named layer's output over ``inputs``, in eval mode (model not modified).

    A layer called several times pools the outputs of all its calls."""
    moments = _moments_of(model, {n: model.get_submodule(n) for n in layers},
                          lambda mod, args, out: (out, _channel_dim(mod, out)), eval_mode(model), inputs)
    return {name: m.mean_std() for name, m in moments.items()}


def _moments_of(model: nn.Module, modules: Dict[str, nn.Module],
                pick: Callable[[nn.Module, tuple, object], Tuple[torch.Tensor, int]], mode,
                inputs: Inputs) -> Dict[str, _Moments]:
    """Per named module, the per-channel moments of what ``pick(module, args, out)`` returns ((tensor, channel
    dim)) on every call, over ``inputs`` run through ``model`` inside the context manager ``mode``."""
    moments = {n: _Moments() for n in modules}
    handles = [mod.register_forward_hook(lambda m, args, out, acc=moments[n]: acc.add(*pick(m, args, out)))
               for n, mod in modules.items()]
    try:
        with mode:
            for x in _batches(inputs):
                model(x)
    finally:
        for h in handles:
            h.remove()
    return moments


class _Stop(Exception):
    """Raised by a hook once every module a pass measures has run: the rest of the forward pass is not needed."""


def _calls_per_pass(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> Dict[str, int]:
    counts = {n: 0 for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, a, o, n=n: counts.__setitem__(n, counts[n] + 1)) for n in names]
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counts


def _fuse(layer: nn.Module, mean_r, std_r, mean_t, std_t) -> None:
    """Rescale ``layer``'s weight (and shift its bias) so that outputs with (mean_r, std_r) get (mean_t, std_t)."""
    # a unit that does not vary (dead) cannot be given a spread: its scale stays 1, only its mean moves
    live = std_r > _EPS * (float(std_r.max()) + 1e-30)
    scale = torch.where(live, std_t / torch.where(live, std_r, 1.0), 1.0)
    w = layer.weight
    w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
    if layer.bias is not None:  # without a bias only the spread can be corrected, not the mean
        bias = (layer.bias.double() - mean_r) * scale + mean_t
        layer.bias.copy_(bias.to(layer.bias.dtype))


@torch.no_grad()
def reset_and_repair(
    model: nn.Module,
    inputs: Inputs,
    targets: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
    steps: Optional[RepairPlan] = None,
    example: Optional[torch.Tensor] = None,
    bn_mix: Optional[Dict[str, "BNTarget"]] = None,
) -> None:
    """Reset the BatchNorm statistics and correct each layer in ``targets``, level by level (see the module doc).

    Parameters
    ----------
    model : modified in place; its train/eval flags and BatchNorm momenta are restored.
    inputs : the batches: a re-iterable of input tensors, or a callable returning a fresh iterable (read once
        per level).
    targets : layer name -> per-unit (mean, std) its outputs should have (in the layer's own unit order).
    steps : the levels, from :func:`plan`; derived here from the first batch (or ``example``) when None.
    bn_mix : BatchNorm layers whose statistics come from the participants' mixture instead of a reset
        (:func:`bn_targets`); each is measured in its level's pass, on inputs every lower level already repaired.
    """
    first = example if example is not None else next(iter(_batches(inputs)))
    if steps is None:
        steps = plan(model, list(targets), first[:2])
    layers = {n: lv for n, lv in steps.layers.items() if n in targets}
    bns = dict(steps.bns)
    levels = sorted(set(layers.values()) | set(bns.values()))
    calls = _calls_per_pass(model, list(layers) + list(bns), first[:2])
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for lv in levels:
            _one_level(model, inputs, [n for n, l in layers.items() if l == lv],
                       [n for n, l in bns.items() if l == lv], targets, calls, bn_mix)
    finally:
        for m, flag in flags:
            m.training = flag


def _one_level(model, inputs, layer_names, bn_names, targets, calls, bn_mix=None) -> None:
    """One pass: reset ``bn_names`` (train mode, cumulative average) and measure then fuse ``layer_names``.

    With ``bn_mix`` (BatchNorm name -> :class:`BNTarget`), those BatchNorm layers are not reset: the pass measures
    their inputs (train mode, so each batch is normalised by its own statistics, as in the endpoints' measurement)
    and then sets their running statistics to the collapse-corrected mixture (:meth:`BNTarget.corrected`)."""
    bn_mix = bn_mix or {}
    moments = {n: _Moments() for n in layer_names}
    bn_in = {n: _Moments() for n in bn_names if n in bn_mix}
    seen = {n: 0 for n in layer_names + bn_names}
    needed = {n: calls.get(n, 0) for n in seen}
    bns = [model.get_submodule(n) for n in bn_names]
    momenta = [bn.momentum for bn in bns]
    counts = [bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None for bn in bns]

    def hook(mod, args, out, name):
        if name in moments:
            moments[name].add(out, _channel_dim(mod, out))
        if name in bn_in:
            bn_in[name].add(_first_tensor(args), 1)
        seen[name] += 1
        if all(seen[n] >= needed[n] > 0 for n in seen):
            raise _Stop

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in seen]
    for name, bn in zip(bn_names, bns):
        if name in bn_mix:
            bn.momentum = 0.0  # train mode normalises by batch statistics; momentum 0 leaves the buffers as they are
        else:
            bn.reset_running_stats()
            bn.momentum = None
        bn.train()
    try:
        for x in _batches(inputs):
            for n in seen:
                seen[n] = 0
            try:
                model(x)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        for name, bn, mom, count in zip(bn_names, bns, momenta, counts):
            bn.momentum = mom
            bn.eval()
            if name in bn_mix and count is not None:
                bn.num_batches_tracked.copy_(count)
    for name, m in bn_in.items():
        if m.n == 0:
            raise ValueError(f"BatchNorm layer {name!r} saw no input on the batches: cannot measure its collapse")
        bn_mix[name].apply(model.get_submodule(name), m.mean_var()[1])
    for name in layer_names:
        if moments[name].n == 0:
            continue
        mean_t, std_t = targets[name]
        mean_r, std_r = moments[name].mean_std()
        _fuse(model.get_submodule(name), mean_r, std_r, mean_t.double(), std_t.double())


# ------------------------------------------------------------------------------------ BatchNorm from the mixture
# A reset recomputes a merged model's BatchNorm statistics on the agent's own batches; on a skewed local split they
# describe that split, and the merged model normalises every other input as if it came from there. The ``mix``
# repair keeps the statistics the participants brought instead: each snapshot's running mean and variance describe
# its model on its owner's data, so their mixture (weighted like the merge) describes the merged neighbourhood's
# data. What the mixture misses is the merge itself: averaging aligned but different weights shrinks the spread of
# the pre-BatchNorm activations. That shrink factor is a property of the merged weights, not of the data, so it is
# measured locally as a RATIO: the merged model's per-channel variance over the weighted mean of the endpoints'
# variances, all on the same local batches, with every BatchNorm normalising by batch statistics on both sides.
# A skew of the local data enters numerator and denominator alike and largely cancels; the local mean is never used.


@dataclass
class BNTarget:
    """The mixture statistics of one BatchNorm layer and the endpoints' local input variance (float64).

    ``mean``, ``var``: the weighted mixture of the participants' running statistics; ``local_var``: the weighted
    mean of the endpoints' per-channel input variance on the local batches (the collapse ratio's denominator).
    """

    mean: torch.Tensor
    var: torch.Tensor
    local_var: torch.Tensor

    def ratio(self, merged_var: torch.Tensor) -> torch.Tensor:
        """Per-channel collapse ratio ``merged_var / local_var``; 1 where the endpoints' channel does not vary."""
        merged_var = merged_var.double()
        live = self.local_var > _EPS * (float(self.local_var.max()) + 1e-30) if self.local_var.numel() else \
            torch.zeros(0, dtype=torch.bool)
        return torch.where(live, merged_var / torch.where(live, self.local_var, 1.0), 1.0)

    def corrected(self, merged_var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Running (mean, var) for the merged layer: the mixture mean, the mixture variance times the ratio."""
        return self.mean, self.var * self.ratio(merged_var)

    def apply(self, bn: nn.Module, merged_var: torch.Tensor) -> None:
        """Set ``bn``'s running statistics to :meth:`corrected` (in place, in the buffers' dtype)."""
        mean, var = self.corrected(merged_var)
        bn.running_mean.copy_(mean.to(bn.running_mean))
        bn.running_var.copy_(var.to(bn.running_var))


def _bn_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if _is_bn(m) and m.running_mean is not None}


def mixture_stats(
    states: Sequence[Dict[str, torch.Tensor]], weights: Sequence[float], names: Iterable[str]
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm layer, the (mean, var) of the weighted mixture of the participants' running statistics.

    ``states`` are aligned state dicts (every channel in ``states[0]``'s order), ``weights`` sum to 1. The mixture
    variance includes the spread of the means: ``var = sum_j w_j (var_j + mean_j**2) - mean**2`` (float64,
    clamped at 0 against rounding).
    """
    out = {}
    for name in names:
        mean = var2 = None
        for sd, w in zip(states, weights):
            if w <= 0:
                continue
            m = sd[f"{name}.running_mean"].detach().double().cpu()
            v = sd[f"{name}.running_var"].detach().double().cpu()
            mean = w * m if mean is None else mean + w * m
            var2 = w * (v + m * m) if var2 is None else var2 + w * (v + m * m)
        if mean is None:
            raise ValueError("mixture_stats needs at least one participant with a positive weight")
        out[name] = (mean, (var2 - mean * mean).clamp_min(0))
    return out


class _batch_stat_mode:
    """Every tracked BatchNorm in train mode with momentum 0 (normalise by batch statistics, buffers unchanged),
    everything else in eval mode (no dropout); every flag, momentum and batch counter restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags: List[Tuple[nn.Module, bool]] = []
        self.saved: List[Tuple[nn.Module, object, Optional[torch.Tensor]]] = []

    def __enter__(self) -> "_batch_stat_mode":
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        for bn in _bn_modules(self.model).values():
            count = bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None
            self.saved.append((bn, bn.momentum, count))
            bn.momentum = 0.0
            bn.train()
        return self

    def __exit__(self, *exc) -> None:
        for bn, mom, count in self.saved:
            bn.momentum = mom
            if count is not None:
                bn.num_batches_tracked.copy_(count)
        for m, flag in self.flags:
            m.training = flag


@torch.no_grad()
def bn_input_stats(model: nn.Module, inputs: Inputs) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per tracked BatchNorm layer, the per-channel (mean, var) of its input over ``inputs`` (float64, pooled over
    every sample and position), with every BatchNorm normalising by batch statistics and everything else in eval
    mode. The model is not modified (its buffers, flags and momenta are as before)."""
    moments = _moments_of(model, _bn_modules(model), lambda mod, args, out: (_first_tensor(args), 1),
                          _batch_stat_mode(model), inputs)
    out = {}
    for n, m in moments.items():
        if m.n == 0:
            raise ValueError(f"BatchNorm layer {n!r} saw no input on the batches: cannot measure its statistics")
        out[n] = m.mean_var()
    return out


def bn_targets(
    endpoints: Sequence[nn.Module],
    states: Sequence[Dict[str, torch.Tensor]],
    weights: Sequence[float],
    inputs: Inputs,
) -> Dict[str, BNTarget]:
    """The :class:`BNTarget` of every tracked BatchNorm layer of a merge.

    Parameters
    ----------
    endpoints : the participants as modules in ``states[0]``'s unit order (aligned); they are not modified.
    states : their aligned state dicts (the running statistics are read from these).
    weights : the merge weights, summing to 1 (participants with weight 0 are skipped).
    inputs : local batches (a re-iterable, or a callable returning a fresh iterable), read once per endpoint.
    """
    names = list(_bn_modules(endpoints[0]))
    if not names:
        return {}
    mix = mixture_stats(states, weights, names)
    local: Dict[str, torch.Tensor] = {}
    for model, w in zip(endpoints, weights):
        if w <= 0:
            continue
        for n, (_, var) in bn_input_stats(model, inputs).items():
            local[n] = local[n] + w * var if n in local else w * var
    return {n: BNTarget(mix[n][0], mix[n][1], local[n]) for n in names}


@torch.no_grad()
def mix_bn_stats(model: nn.Module, inputs: Inputs, targets: Dict[str, BNTarget]) -> None:
    """Set every BatchNorm layer in ``targets`` to its collapse-corrected mixture statistics, in place.

    One pass over ``inputs`` measures the merged model's per-channel input variance of each layer (every
    BatchNorm normalising by batch statistics, as :func:`bn_input_stats` does for the endpoints); then
    ``running_mean = mixture mean`` and ``running_var = mixture var * merged var / endpoints' var``. Train/eval
    flags, momenta and ``num_batches_tracked`` are left as they were.
    """
    if not targets:
        return
    measured = bn_input_stats(model, inputs)
    for name, target in targets.items():
        target.apply(model.get_submodule(name), measured[name][1])


@torch.no_grad()
def refresh_bn_stats(model: nn.Module, inputs: Inputs) -> int:
    """Re-estimate every tracked BatchNorm layer's running statistics of ``model`` on ``inputs``, in place.

    A model's running statistics are an exponential average over its last training steps, taken while its weights
    were still moving, and after a short round they still hold part of the statistics a merge set. Before a
    snapshot is sent, this replaces them with a cumulative average over ``inputs`` for the current weights
    (BatchNorm layers in train mode, every other module in eval mode, so no dropout; no gradients), so that what a
    neighbour reads from the snapshot describes this model on its owner's data. Flags and momenta are restored;
    ``num_batches_tracked`` counts the batches used. Returns that number (0: no BatchNorm, nothing done).
    """
    bns = list(_bn_modules(model).values())
    if not bns:
        return 0
    flags = [(m, m.training) for m in model.modules()]
    momenta = [bn.momentum for bn in bns]
    n = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        device = bns[0].running_mean.device
        for x in _batches(inputs):
            model(x.to(device))
            n += 1
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        for m, flag in flags:
            m.training = flag
    if n == 0:
        raise ValueError("refresh_bn_stats got no batches: the running statistics would be left at their reset")
    return n


def normalised_layers(model: nn.Module, candidates: Sequence[str], example: torch.Tensor) -> List[str]:
    """The ``candidates`` (conv/linear module names) whose output only a tracked BatchNorm reads.

    Such a layer is scale-free per output unit: multiplying a unit's weights and bias by ``s > 0`` multiplies the
    BatchNorm's input channel by ``s``, which the normalisation divides out (in training, and in eval once the
    running statistics are recomputed). One probe forward pass on a copy of ``model`` (eval mode) records each
    call's output autograd node and every node's consumers; a layer qualifies when, in every call, the consumers
    of its output are BatchNorm calls that take it as their input and nothing else reads it (a residual branch or
    a returned tensor disqualifies it).
    """
    probe = copy.deepcopy(model).eval()
    for p in probe.parameters():
        p.requires_grad_(True)
    wanted = set(candidates)
    mods = dict(probe.named_modules())
    outs: Dict[str, List[object]] = {n: [] for n in wanted if n in mods}
    bn_calls: Dict[object, Set[object]] = {}  # input node -> output nodes of the BatchNorm calls reading it

    def layer_hook(name):
        def hook(mod, args, out):
            t = _first_tensor(out)
            outs[name].append(t.grad_fn if t is not None else None)
        return hook

    def bn_hook(mod, args, out):
        t_in, t_out = _first_tensor(args), _first_tensor(out)
        if t_in is not None and t_out is not None and t_in.grad_fn is not None:
            bn_calls.setdefault(t_in.grad_fn, set()).add(t_out.grad_fn)

    handles = [mods[n].register_forward_hook(layer_hook(n)) for n in outs]
    handles += [m.register_forward_hook(bn_hook) for m in mods.values() if _is_bn(m)]
    try:
        with torch.enable_grad():
            roots = [t.grad_fn for t in output_tensors(probe(example)) if t.grad_fn is not None]
    finally:
        for h in handles:
            h.remove()
    consumers: Dict[object, Set[object]] = {}
    seen: Set[object] = set()
    stack = list(roots)
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in getattr(fn, "next_functions", ()):
            if nxt is not None:
                consumers.setdefault(nxt, set()).add(fn)
                stack.append(nxt)

    def bn_only(fn) -> bool:
        readers = consumers.get(fn, set())
        return fn is not None and fn not in roots and bool(readers) and readers <= bn_calls.get(fn, set())

    return [n for n in candidates if n in outs and outs[n] and all(bn_only(fn) for fn in outs[n])]


@torch.no_grad()
def restore_unit_norms(model: nn.Module, layers: Sequence[str], states: Sequence[Dict[str, torch.Tensor]],
                       weights: Sequence[float]) -> Dict[str, float]:
    """Give every output unit of ``layers`` the weighted mean of its weight norm in ``states``, in place.

    Averaging aligned networks that are not identical shrinks their weights: the less two units agree, the
    shorter their mean. Where a BatchNorm normalises the layer's output (:func:`normalised_layers`) the shrink
    does not change the function, but it does change training: a scale-free weight moves by an angle of about
    ``lr / |w|`` per step, so a merged model at half the norm trains with about twice the angular step size and
    drifts away from its neighbours faster. The unit's weights and bias are multiplied by one factor, the target
    norm (the ``weights``-weighted mean of the unit's weight-row L2 norm in the aligned ``states``) over its
    current norm; zero rows stay zero. The BatchNorm statistics must be recomputed afterwards. Returns, per
    layer, the mean factor applied (1.0: nothing changed).
    """
    mods = dict(model.named_modules())
    total = float(sum(w for w in weights if w > 0))
    factors: Dict[str, float] = {}
    for name in layers:
        layer = mods[name]
        key = f"{name}.weight" if name else "weight"
        target = sum(w * sd[key].detach().float().flatten(1).norm(dim=1) for sd, w in zip(states, weights) if w > 0)
        target = target / total
        current = layer.weight.detach().float().flatten(1).norm(dim=1)
        scale = torch.where(current > 0, target / current.clamp_min(1e-30), torch.ones_like(current))
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(scale.view(shape).to(layer.weight.dtype))
        if getattr(layer, "bias", None) is not None:
            layer.bias.mul_(scale.to(layer.bias.dtype))
        factors[name] = float(scale.mean())
    return factors
