"""Per-snapshot payloads of the combine rules: what an agent computes on its own data and sends with its model.

* ``fisher``: the diagonal (empirical) Fisher of every floating-point parameter: the mean over local samples of
  the squared gradient of ``log p(y | x)`` at the sample's label, in eval mode. Same names and shapes as the
  parameters; permuted like them.
* ``gram``: for every Linear and Conv2d layer (groups 1, zero padding), the Gram matrix of the layer's inputs
  ``X^T X / rows`` (a convolution's input is its unfolded patches, ``C_in * kh * kw`` columns), with a constant
  column 1 appended when the layer has a bias. Permuted along the layer's input axis (both sides).

Payload tensors travel inside the snapshot dict under reserved names (:data:`PREFIX`), so every transport carries,
validates (names, shapes, dtypes, finite values against the agent's own snapshot) and counts them like weights.
:func:`split` separates them from the model's tensors again; :func:`check` validates a neighbour's payload against
the agent's own.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dimat.merge import structure
from dimat.merge.structure import PermutationSpec

__all__ = ["PREFIX", "KINDS", "compute", "template", "encode", "split", "check", "permute", "gram_layers",
           "fisher_diag", "input_grams"]

#: Snapshot names of payload tensors start with this (then ``<kind>.<name>``); model tensors never do.
PREFIX = "__dimat_payload__."
KINDS = ("fisher", "gram")


# ------------------------------------------------------------------------------------------------- layers
def gram_layers(model: nn.Module, max_size: Optional[int] = None) -> Dict[str, nn.Module]:
    """Layers whose weights RegMean merges: Linear, and Conv2d with one group and zero (numeric) padding, whose
    Gram matrix has at most ``max_size`` rows (inputs, times the kernel's area for a conv, plus one with a bias;
    None: any size). The matrix costs ``max_size ** 2`` floats on the wire, per snapshot."""
    out: Dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = m
        elif (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
              and not isinstance(m.padding, str)):
            out[name] = m
    if max_size is not None:
        out = {name: m for name, m in out.items() if _gram_size(m) <= max_size}
    return out


def _gram_size(m: nn.Module) -> int:
    n = m.in_features if isinstance(m, nn.Linear) else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    return n + (1 if m.bias is not None else 0)


def _rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its least-squares problem: ``[rows, n]`` (plus a ones column with a bias)."""
    if isinstance(m, nn.Linear):
        rows = x.reshape(-1, m.in_features)
    else:
        if x.dim() == 3:  # an unbatched C x H x W input
            x = x[None]
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if m.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], 1)
    return rows


# ------------------------------------------------------------------------------------------------ compute
def _pairs(batches: Iterable, limit: Optional[int]) -> Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    n = 0
    for b in batches:
        if limit is not None and n >= limit:
            break
        if isinstance(b, torch.Tensor):
            x, y = b, None
        elif isinstance(b, (tuple, list)) and b and isinstance(b[0], torch.Tensor):
            x, y = b[0], (b[1] if len(b) > 1 and isinstance(b[1], torch.Tensor) else None)
        else:
            raise ValueError(f"a batch must be an input tensor or an (input, target) pair, got {type(b).__name__}")
        if x.shape[0] == 0:
            continue
        n += 1
        yield x, y
    if n == 0:
        raise ValueError("no local batches: the combine payload needs at least one non-empty batch")


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def input_grams(model: nn.Module, batches: Iterable, limit: Optional[int] = None,
                max_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Layer name -> mean Gram matrix of the layer's inputs over ``limit`` batches (float32; eval mode), for the
    layers of :func:`gram_layers` (``max_size``)."""
    layers = gram_layers(model, max_size)
    acc = {name: torch.zeros(_gram_size(m), _gram_size(m), dtype=torch.float64) for name, m in layers.items()}
    count = {name: 0 for name in layers}

    def hook(name: str, m: nn.Module):
        def fn(_mod, args):
            rows = _rows(m, args[0].detach())
            for chunk in rows.split(65536):  # bounded memory for large unfolded maps
                acc[name] += (chunk.T @ chunk).double().cpu()
            count[name] += rows.shape[0]
        return fn

    was = model.training
    handles = [m.register_forward_pre_hook(hook(name, m)) for name, m in layers.items()]
    try:
        model.eval()
        dev = _device(model)
        for x, _ in _pairs(batches, limit):
            model(x.to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {name: (acc[name] / max(count[name], 1)).float() for name in layers}


def fisher_diag(model: nn.Module, batches: Iterable, limit: Optional[int] = None,
                max_samples: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Parameter name -> diagonal empirical Fisher (mean squared per-sample gradient of log p(y|x)), eval mode.

    Uses the first ``limit`` batches, and at most ``max_samples`` samples of them (None: all): every sample costs
    one backward pass. Per-sample gradients come from ``torch.func.vmap``; a model that vmap cannot trace falls
    back to one backward pass per sample.
    """
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.is_floating_point()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    total = 0
    was = model.training
    dev = _device(model)

    def logp(p, x, y):
        out = functional_call(model, (p, buffers), (x[None],))
        return -F.cross_entropy(out, y[None])  # log p(y | x), without indexing by a batched y

    per_sample = vmap(grad(logp), in_dims=(None, 0, 0))
    try:
        model.eval()
        for x, y in _pairs(batches, limit):
            if y is None or y.is_floating_point():
                raise ValueError("the Fisher payload needs (input, integer label) batches")
            if max_samples is not None:
                if total >= max_samples:
                    break
                x, y = x[:max_samples - total], y[:max_samples - total]
            x, y = x.to(dev), y.to(dev)
            try:
                g = per_sample(params, x, y)
            except Exception:  # data-dependent control flow, in-place ops on inputs...: one sample at a time
                g = _loop_grads(model, x, y)
            for n in acc:
                acc[n] += (g[n].detach().double() ** 2).sum(0).cpu()
            total += x.shape[0]
    finally:
        model.train(was)
    return {n: (acc[n] / max(total, 1)).to(params[n].dtype).cpu() for n in acc}


def _loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    rows: Dict[str, List[torch.Tensor]] = {n: [] for n, _ in named}
    for i in range(x.shape[0]):
        with torch.enable_grad():
            lp = torch.log_softmax(model(x[i:i + 1]), -1)[0, y[i]]
            gs = torch.autograd.grad(lp, [p for _, p in named], allow_unused=True)
        for (n, p), g in zip(named, gs):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in rows.items()}


def compute(kind: str, model: nn.Module, batches: Iterable, limit: Optional[int] = None,
            fisher_samples: Optional[int] = None, gram_max: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The payload of ``kind`` (``fisher`` or ``gram``) of ``model`` on ``limit`` local batches (the Fisher on
    at most ``fisher_samples`` samples of them; Gram matrices of at most ``gram_max`` rows)."""
    if kind == "fisher":
        return fisher_diag(model, batches, limit, fisher_samples)
    if kind == "gram":
        return input_grams(model, batches, limit, gram_max)
    raise ValueError(f"unknown payload kind {kind!r}; choose one of {', '.join(KINDS)}")


def template(kind: str, model: nn.Module, gram_max: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Zero tensors with the names, shapes and dtypes of ``model``'s payload of ``kind`` (no data needed)."""
    if kind == "fisher":
        return {n: torch.zeros_like(p, device="cpu") for n, p in model.named_parameters() if p.is_floating_point()}
    if kind == "gram":
        return {n: torch.zeros(_gram_size(m), _gram_size(m)) for n, m in gram_layers(model, gram_max).items()}
    raise ValueError(f"unknown payload kind {kind!r}; choose one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------- in a snapshot
def encode(kind: str, payload: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Snapshot entries for a payload: ``PREFIX + kind + "." + name`` -> tensor."""
    return {f"{PREFIX}{kind}.{n}": t for n, t in payload.items()}


def split(snapshot: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]:
    """``(the other entries, kind -> payload)`` of a snapshot."""
    rest: Dict[str, torch.Tensor] = {}
    found: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in snapshot.items():
        if k.startswith(PREFIX):
            kind, _, name = k[len(PREFIX):].partition(".")
            found.setdefault(kind, {})[name] = v
        else:
            rest[k] = v
    return rest, found


def check(payload: Optional[Mapping[str, torch.Tensor]], expected: Mapping[str, torch.Tensor], kind: str,
          sender: object) -> None:
    """ValueError naming the sender and tensor unless ``payload`` has ``expected``'s names and shapes, and is finite."""
    if payload is None:
        raise ValueError(f"the snapshot from {sender} carries no {kind!r} payload (does it run the same "
                         f"merge.combine?)")
    for n, t in expected.items():
        got = payload.get(n)
        if got is None:
            raise ValueError(f"the {kind!r} payload from {sender} lacks tensor {n!r}")
        if tuple(got.shape) != tuple(t.shape):
            raise ValueError(f"the {kind!r} payload from {sender}: tensor {n!r} has shape {tuple(got.shape)}, "
                             f"expected {tuple(t.shape)}")
        if not got.is_floating_point() or not bool(torch.isfinite(got).all()):
            raise ValueError(f"the {kind!r} payload from {sender}: tensor {n!r} is not finite floating point")
    extra = [n for n in payload if n not in expected]
    if extra:
        raise ValueError(f"the {kind!r} payload from {sender} has an unexpected tensor {extra[0]!r}")


def permute(kind: str, payload: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
            spec: Optional[PermutationSpec], perms: Optional[Mapping[int, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The payload in the unit order that ``perms`` gives ``state`` (the model it was computed on)."""
    if spec is None or not perms:
        return dict(payload)
    if kind == "fisher":  # same names and shapes as the parameters: permute a copy of the state holding them
        moved = structure.apply_permutation({**state, **payload}, spec, perms)
        return {n: moved[n] for n in payload}
    if kind == "gram":
        index = structure._axis_indices(state, spec, perms)
        out = {}
        for layer, g in payload.items():
            idx = index.get((f"{layer}.weight", 1))
            if idx is None:
                out[layer] = g
                continue
            fan = state[f"{layer}.weight"]
            k = fan[0, 0].numel()  # kernel entries per input channel (1 for a Linear)
            full = (idx[:, None] * k + torch.arange(k)[None, :]).reshape(-1)
            if full.numel() < g.shape[0]:  # the bias's constant input stays last
                full = torch.cat([full, torch.arange(full.numel(), g.shape[0])])
            out[layer] = g.index_select(0, full).index_select(1, full)
        return out
    raise ValueError(f"unknown payload kind {kind!r}")
