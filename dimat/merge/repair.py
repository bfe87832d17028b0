"""REPAIR-style variance correction (Jordan et al., ICLR 2023) for merged layers that no BatchNorm follows.

Averaging aligned but different networks shrinks the variance of hidden pre-activations ("variance collapse").
A BatchNorm layer fixes that when its statistics are recomputed; a conv/linear layer with no BatchNorm after it
keeps the collapse. For each such layer we measure the per-channel mean and standard deviation of its output in
every (aligned) endpoint model, take the weighted mean of those as the target, and rescale the merged layer's
weights and bias so that its outputs on the same batches have the target statistics. All corrected layers (and
the BatchNorm reset) share one train-mode pass: each corrected layer normalises its output with the batch
statistics during the pass, so downstream layers see corrected inputs, and the correction is fused into the
layer's weights afterwards.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from dimat.merge.structure import PermutationSpec
from dimat.merge.stats import eval_mode

__all__ = ["repair_layers", "endpoint_stats", "reset_and_repair"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EPS = 1e-5


def _channel_dim(layer: nn.Module, out: torch.Tensor) -> int:
    return out.dim() - 1 if isinstance(layer, nn.Linear) else 1


def repair_layers(model: nn.Module, spec: PermutationSpec, graph: fx.Graph) -> List[Tuple[str, int]]:
    """``(module name, group index)`` of every conv/linear layer whose output units are permuted and that is not
    followed directly by a BatchNorm (the layers whose variance a BN reset does not repair)."""
    group_of: Dict[str, int] = {}
    for gi in spec.permutable:
        for a in spec.groups[gi].axes:
            if a.axis == 0 and a.offset == 0 and a.tensor.endswith(".weight"):
                group_of[a.tensor[: -len(".weight")]] = gi
    mods = dict(model.named_modules())
    out: List[Tuple[str, int]] = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in group_of or not isinstance(mods.get(node.target), _LAYERS):
            continue
        users = [u for u in node.users if u.op == "call_module"]
        if any(isinstance(mods.get(u.target), nn.modules.batchnorm._BatchNorm) for u in users):
            continue
        if (node.target, group_of[node.target]) not in out:
            out.append((node.target, group_of[node.target]))
    return out


class _Moments:
    """Per-channel running mean and mean square of a layer's outputs (float64, equal weight per sample)."""

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
        mean = self.s1 / self.n
        return mean, (self.s2 / self.n - mean * mean).clamp_min(0).sqrt()


@torch.no_grad()
def endpoint_stats(
    model: nn.Module, layers: Sequence[str], inputs: Iterable[torch.Tensor]
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) of each named layer's output over ``inputs``, in eval mode (model not modified)."""
    moments = {name: _Moments() for name in layers}
    handles = []
    for name in layers:
        layer = model.get_submodule(name)
        handles.append(layer.register_forward_hook(
            lambda mod, args, out, m=moments[name]: m.add(out, _channel_dim(mod, out))))
    try:
        with eval_mode(model):
            for x in inputs:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {name: m.mean_std() for name, m in moments.items()}


@torch.no_grad()
def reset_and_repair(
    model: nn.Module,
    inputs: Iterable[torch.Tensor],
    targets: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """One train-mode pass that recomputes BatchNorm statistics and corrects each layer in ``targets``.

    ``targets`` maps a layer name to the per-channel (mean, std) its outputs should have. BatchNorm layers
    accumulate a cumulative average (momentum None, restored afterwards); each target layer's output is normalised
    with its batch statistics and given the target statistics during the pass, and the average correction is fused
    into its weight and bias at the end. The model is modified in place; its train/eval mode is restored.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    moments = {name: _Moments() for name in targets}

    def hook(mod, args, out, name):
        dim = _channel_dim(mod, out)
        moments[name].add(out, dim)
        mean_t, std_t = (t.to(out.dtype) for t in targets[name])
        x = out.movedim(dim, -1)
        mu = x.reshape(-1, x.shape[-1]).mean(0)
        sd = x.reshape(-1, x.shape[-1]).var(0, unbiased=False).add(_EPS).sqrt()
        return ((x - mu) / sd * std_t + mean_t).movedim(-1, dim)

    handles = [
        model.get_submodule(name).register_forward_hook(lambda mod, a, o, n=name: hook(mod, a, o, n))
        for name in targets
    ]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    try:
        model.train()
        for x in inputs:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.train(was_training)
    for name, (mean_t, std_t) in targets.items():
        if moments[name].n == 0:
            continue
        mean_r, std_r = moments[name].mean_std()
        scale = std_t / (std_r * std_r + _EPS).sqrt()
        layer = model.get_submodule(name)
        w = layer.weight
        w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
        if layer.bias is not None:  # without a bias only the spread can be corrected, not the mean
            bias = (layer.bias.double() - mean_r) * scale + mean_t
            layer.bias.copy_(bias.to(layer.bias.dtype))
