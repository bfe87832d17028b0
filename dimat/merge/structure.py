"""Permutation groups of a network, derived automatically from a torch.fx trace.

A *group* is a set of tensor axes that must be permuted together for the network's function to stay the same:
the output channels of a conv/linear layer, the matching BatchNorm/LayerNorm entries and the input channels of
every consumer. :func:`derive` traces the model on an example input, walks the graph once and links axes that
must match with a union-find; a residual ``+`` joins its operands' groups, ``torch.cat`` along channels keeps one
segment per operand, and a C x H x W map flattened into a Linear gives each channel its H*W block of inputs.
Groups touching the network input or its output are never permuted, and anything not understood (grouped convs,
attention, unknown modules or functions) freezes the groups it touches, with a warning. Every remaining group is
then checked by a random-permutation invariance self-test (:func:`check_invariance`); a group that fails is frozen.

The result is a plain immutable :class:`PermutationSpec`, printable with :meth:`PermutationSpec.describe` and
consumed by every merge operator through :func:`apply_permutation`.

Permutation convention: ``perm`` maps new unit ``i`` to old unit ``perm[i]`` along every axis of the group
(``new[..., i, ...] = old[..., perm[i], ...]``).
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = [
    "AxisSlice",
    "Site",
    "Group",
    "PermutationSpec",
    "derive",
    "apply_permutation",
    "check_invariance",
    "random_perms",
]

#: relative tolerance of the invariance self-test: max|y_perm - y| / max|y|
INVARIANCE_TOL = 1e-4


# ------------------------------------------------------------------------------------------------ data structure
@dataclass(frozen=True)
class AxisSlice:
    """``units`` units along axis ``axis`` of state-dict tensor ``tensor``, starting at entry ``offset``.

    Unit ``u`` owns the ``block`` consecutive entries ``offset + u*block ... offset + (u+1)*block - 1`` (block > 1
    when a C x H x W map is flattened into a Linear: channel c owns its H*W inputs).
    """

    tensor: str
    axis: int
    offset: int
    units: int
    block: int = 1

    def __str__(self) -> str:
        extra = f" block {self.block}" if self.block > 1 else ""
        span = "" if self.offset == 0 else f" from {self.offset}"
        return f"{self.tensor}[axis {self.axis}{span}{extra}]"


@dataclass(frozen=True)
class Site:
    """Where a group's activations are observed: the value of graph node ``node`` (the input of a consuming layer).

    The group's units lie along dimension ``dim`` of that value, starting at entry ``offset``, ``block`` entries per
    unit (the extra entries are treated as more samples).
    """

    node: str
    dim: int
    offset: int
    units: int
    block: int = 1
    consumer: str = ""

    def __str__(self) -> str:
        return f"{self.node} (input of {self.consumer})" if self.consumer else self.node


@dataclass(frozen=True)
class Group:
    """One set of axes permuted together. ``frozen`` is a reason string when the group must not be permuted."""

    size: int
    axes: Tuple[AxisSlice, ...]
    sites: Tuple[Site, ...]
    name: str = ""
    frozen: str = ""

    @property
    def permutable(self) -> bool:
        """True when merges may permute this group (not frozen and more than one unit)."""
        return not self.frozen and self.size > 1


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation groups of one architecture (for one input shape)."""

    groups: Tuple[Group, ...]
    warnings: Tuple[str, ...] = field(default=())

    @property
    def permutable(self) -> List[int]:
        """Indices of the groups merges may permute."""
        return [i for i, g in enumerate(self.groups) if g.permutable]

    def describe(self) -> str:
        """A readable listing: one block per group with its size, axes, activation sites and frozen reason."""
        lines = [
            f"{len(self.groups)} permutation groups ({len(self.permutable)} permutable, "
            f"{sum(1 for g in self.groups if g.frozen)} frozen)"
        ]
        for i, g in enumerate(self.groups):
            state = f"FROZEN: {g.frozen}" if g.frozen else ("size 1, not permuted" if g.size <= 1 else "permuted")
            lines.append(f"group {i} [{g.name}] size {g.size}, {state}")
            lines.append("  axes:  " + ", ".join(str(a) for a in g.axes))
            if g.sites:
                lines.append("  sites: " + ", ".join(str(s) for s in g.sites))
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


# ------------------------------------------------------------------------------------------------- union-find
class _UnionFind:
    def __init__(self) -> None:
        self.parent: Dict[Any, Any] = {}

    def find(self, a: Any) -> Any:
        self.parent.setdefault(a, a)
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


# ----------------------------------------------------------------------------------------- channel layouts
@dataclass(frozen=True)
class _Seg:
    var: int
    units: int
    block: int = 1


@dataclass(frozen=True)
class _Layout:
    """Which dimension of a value carries permutable units, and the units' segments along it."""

    dim: int
    segs: Tuple[_Seg, ...]

    @property
    def entries(self) -> int:
        return sum(s.units * s.block for s in self.segs)


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax,
)
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu, F.mish, F.elu,
    F.selu, F.celu, F.leaky_relu, F.softplus, F.hardtanh, F.hardswish, F.hardsigmoid, F.logsigmoid, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout, torch.neg, operator.neg,
    torch.abs, torch.exp, torch.clamp, torch.softmax, F.softmax, F.log_softmax, torch.log_softmax,
}
_ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "neg", "abs", "exp", "clamp", "softmax", "log_softmax", "contiguous", "clone",
    "detach", "float", "double", "half", "to", "type_as", "relu_", "sigmoid_", "tanh_", "clamp_",
}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.interpolate, torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
    torch.adaptive_avg_pool1d,
}
_BINARY_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_SHAPE_QUERIES = {"size", "dim", "numel"}


def _is_tensor_node(a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("tensor_meta"), TensorMetadata)


def _shape(n: fx.Node) -> Tuple[int, ...]:
    return tuple(n.meta["tensor_meta"].shape)


def _arg_nodes(node: fx.Node) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
    return found


def _reshape_groups(a: Sequence[int], b: Sequence[int]) -> Optional[List[Tuple[List[int], List[int]]]]:
    """Pair consecutive dims of shape ``a`` with consecutive dims of ``b`` that hold the same entries."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj = [], []
        pa = pb = 1
        while True:
            if pa == pb and gi and gj:
                # absorb trailing size-1 dims into this group
                while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
                    gi.append(i)
                    i += 1
                while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
                    gj.append(j)
                    j += 1
                break
            if (pa <= pb or j >= len(b)) and i < len(a):
                pa *= a[i]
                gi.append(i)
                i += 1
            elif j < len(b):
                pb *= b[j]
                gj.append(j)
                j += 1
            else:
                break
        if pa != pb:
            return None
        if not gi and not gj:
            break
        groups.append((gi, gj))
    return groups


class _Deriver:
    """One pass over a shape-annotated fx graph that links axes and records activation sites."""

    def __init__(self, gm: fx.GraphModule, state_names: set):
        self.gm = gm
        self.state_names = state_names
        self.uf = _UnionFind()
        self.var_units: Dict[int, int] = {}
        self.var_names: Dict[int, str] = {}
        self.frozen: Dict[int, str] = {}
        self.layout: Dict[str, Optional[_Layout]] = {}
        self.sites: List[Tuple[int, Site]] = []
        self.notes: List[str] = []

    # -- primitives
    def new_var(self, units: int, name: str) -> int:
        v = len(self.var_units)
        self.var_units[v] = units
        self.var_names[v] = name
        self.uf.find(("v", v))
        return v

    def freeze(self, lay: Optional[_Layout], reason: str) -> None:
        if lay is None:
            return
        for s in lay.segs:
            self.frozen.setdefault(s.var, reason)

    def freeze_inputs(self, node: fx.Node, reason: str) -> None:
        for a in _arg_nodes(node):
            self.freeze(self.layout.get(a.name), reason)

    def link(self, tensor: str, axis: int, lay: _Layout) -> None:
        if tensor not in self.state_names:
            return
        offset = 0
        for s in lay.segs:
            self.uf.union(("v", s.var), ("a", AxisSlice(tensor, axis, offset, s.units, s.block)))
            offset += s.units * s.block

    def link_param(self, tensor: str, axis: int, var: int, units: int) -> None:
        if tensor in self.state_names:
            self.uf.union(("v", var), ("a", AxisSlice(tensor, axis, 0, units, 1)))

    def union_layouts(self, lays: Sequence[_Layout]) -> bool:
        first = lays[0]
        for lay in lays[1:]:
            if lay.dim != first.dim or [(s.units, s.block) for s in lay.segs] != [
                (s.units, s.block) for s in first.segs
            ]:
                return False
        for lay in lays[1:]:
            for a, b in zip(first.segs, lay.segs):
                self.uf.union(("v", a.var), ("v", b.var))
        return True

    def add_site(self, src: fx.Node, lay: _Layout, consumer: str) -> None:
        offset = 0
        for s in lay.segs:
            self.sites.append((s.var, Site(src.name, lay.dim, offset, s.units, s.block, consumer)))
            offset += s.units * s.block

    # -- the walk
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self.layout[node.name] = self.visit(node)
            except Exception as e:  # never crash on an odd graph: freeze what it touches instead
                self.unknown(node, f"could not analyse ({type(e).__name__}: {e})")
                self.layout[node.name] = None

    def unknown(self, node: fx.Node, why: str) -> None:
        touched = [a for a in _arg_nodes(node) if self.layout.get(a.name) is not None]
        if touched:
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            if node.op == "call_module":
                what = f"{what} ({type(self.gm.get_submodule(node.target)).__name__})"
            self.notes.append(f"{node.op} {what}: {why}; groups of its inputs frozen")
        self.freeze_inputs(node, f"{why} at {node.name}")

    def visit(self, node: fx.Node) -> Optional[_Layout]:
        if node.op in ("placeholder", "get_attr"):
            return None  # the network input is never permuted; parameters get linked where they are used
        if node.op == "output":
            self.freeze_inputs(node, "reaches the network output")
            return None
        inputs = [a for a in _arg_nodes(node) if self.layout.get(a.name) is not None]
        if not _is_tensor_node(node):
            if node.op == "call_method" and node.target in _SHAPE_QUERIES:
                return None
            if node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim"):
                return None
            if node.op == "call_function" and node.target is operator.getitem and not inputs:
                return None
            if inputs:
                self.unknown(node, "non-tensor result")
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(node.target))
        if node.op == "call_function":
            return self.visit_function(node)
        if node.op == "call_method":
            return self.visit_method(node)
        self.unknown(node, "unsupported node")
        return None

    def x_of(self, node: fx.Node) -> Tuple[Optional[fx.Node], Optional[_Layout]]:
        x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        if not isinstance(x, fx.Node):
            return None, None
        return x, self.layout.get(x.name)

    def only_first_input_varies(self, node: fx.Node) -> bool:
        others = [a for a in _arg_nodes(node)[1:] if _is_tensor_node(a)]
        return not others

    # -- modules
    def visit_module(self, node: fx.Node, m: nn.Module) -> Optional[_Layout]:
        x, lay = self.x_of(node)
        out_shape = _shape(node)
        if len(node.args) + len(node.kwargs) != 1 and not isinstance(m, _ELEMENTWISE_MODULES):
            self.unknown(node, f"{type(m).__name__} called with several arguments")
            return None
        prefix = node.target + "."
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if m.groups != 1:
                self.unknown(node, f"grouped convolution (groups={m.groups})")
                v = self.new_var(m.out_channels, node.target)
                self.frozen[v] = f"grouped convolution {node.target}"
                return _Layout(1, (_Seg(v, m.out_channels),))
            return self.producer(node, prefix, lay, x, in_dim=1, out_dim=1, units=m.out_channels,
                                 in_entries=m.in_channels)
        if isinstance(m, nn.Linear):
            last = len(out_shape) - 1
            return self.producer(node, prefix, lay, x, in_dim=last, out_dim=last, units=m.out_features,
                                 in_entries=m.in_features)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if lay is None:
                return None
            if lay.dim != 1 or lay.entries != m.num_features:
                self.unknown(node, "BatchNorm over a dimension that is not the channel dimension")
                return None
            for p in ("weight", "bias", "running_mean", "running_var"):
                self.link(prefix + p, 0, lay)
            return lay
        if isinstance(m, nn.LayerNorm):
            if lay is None:
                return None
            nd = len(m.normalized_shape)
            if lay.dim < len(out_shape) - nd:
                return lay  # normalised over other dims: its parameters do not touch the channel axis
            if nd == 1 and lay.dim == len(out_shape) - 1:
                for p in ("weight", "bias"):
                    self.link(prefix + p, 0, lay)
                return lay
            self.unknown(node, "LayerNorm over the channel dimension and others")
            return None
        if isinstance(m, _ELEMENTWISE_MODULES):
            if not self.only_first_input_varies(node):
                self.unknown(node, f"{type(m).__name__} with several tensor inputs")
                return None
            if lay is not None and isinstance(m, (nn.Softmax, nn.LogSoftmax)) and m.dim is None:
                self.unknown(node, "softmax over an implicit dimension")
                return None
            return lay
        if isinstance(m, _SPATIAL_MODULES):
            if lay is None or lay.dim == 1:
                return lay
            self.unknown(node, f"{type(m).__name__} on a value whose channel dimension is not 1")
            return None
        if isinstance(m, nn.Flatten):
            return self.reshape(node, x, lay)
        self.unknown(node, f"module type {type(m).__name__} is not understood")
        return None

    def producer(self, node, prefix, lay, x, in_dim, out_dim, units, in_entries) -> _Layout:
        """A conv/linear: its input axis joins the input's groups, its output axis starts a new group."""
        if lay is not None:
            if lay.dim != in_dim or lay.entries != in_entries:
                self.unknown(node, "input units are not along the dimension the layer contracts")
            else:
                self.link(prefix + "weight", 1, lay)
                self.add_site(x, lay, node.target)
        v = self.new_var(units, node.target)
        self.link_param(prefix + "weight", 0, v, units)
        self.link_param(prefix + "bias", 0, v, units)
        return _Layout(out_dim, (_Seg(v, units),))

    # -- functions and methods
    def visit_function(self, node: fx.Node) -> Optional[_Layout]:
        f = node.target
        x, lay = self.x_of(node)
        if f in _ELEMENTWISE_FUNCTIONS:
            if not self.only_first_input_varies(node):
                self.unknown(node, f"{getattr(f, '__name__', f)} with several tensor inputs")
                return None
            return lay
        if f in _SPATIAL_FUNCTIONS:
            if lay is None or lay.dim == 1:
                return lay
            self.unknown(node, "pooling on a value whose channel dimension is not 1")
            return None
        if f in _BINARY_FUNCTIONS:
            return self.binary(node)
        if f in _RESHAPE_FUNCTIONS:
            return self.reshape(node, x, lay)
        if f is torch.cat or f is torch.concat:
            return self.cat(node)
        if f in _REDUCE_FUNCTIONS:
            return self.reduce(node, x, lay)
        if f is torch.transpose or f is torch.permute:
            return self.transpose(node, x, lay)
        self.unknown(node, f"function {getattr(f, '__name__', f)} is not understood")
        return None

    def visit_method(self, node: fx.Node) -> Optional[_Layout]:
        name = node.target
        x, lay = self.x_of(node)
        if name in _ELEMENTWISE_METHODS:
            if not self.only_first_input_varies(node):
                self.unknown(node, f"method {name} with several tensor inputs")
                return None
            return lay
        if name in _BINARY_METHODS:
            return self.binary(node)
        if name in _RESHAPE_METHODS:
            return self.reshape(node, x, lay)
        if name in _REDUCE_METHODS:
            return self.reduce(node, x, lay)
        if name in ("transpose", "permute"):
            return self.transpose(node, x, lay)
        self.unknown(node, f"method {name} is not understood")
        return None

    def binary(self, node: fx.Node) -> Optional[_Layout]:
        """Elementwise op of several tensors: operands carrying units are joined, broadcast constants are fine."""
        out_shape = _shape(node)
        operands = [a for a in _arg_nodes(node) if _is_tensor_node(a)]
        lays = [self.layout.get(a.name) for a in operands]
        full = [lay for a, lay in zip(operands, lays) if lay is not None]
        if not full:
            return None
        if not self.union_layouts(full):
            self.unknown(node, "operands carry units along different dimensions")
            return None
        lay = full[0]
        if any(_shape(a) != out_shape for a, l in zip(operands, lays) if l is not None):
            self.unknown(node, "broadcast of an operand that carries units")
            return None
        for a, l in zip(operands, lays):
            if l is not None:
                continue
            shp = _shape(a)
            k = len(shp) - (len(out_shape) - lay.dim)  # the operand's dim aligned with the unit dim
            if k < 0 or shp[k] == 1:
                continue  # constant across units: permutation commutes with it
            if a.op == "get_attr" and a.target in self.state_names:
                self.link(a.target, k, lay)
                continue
            self.unknown(node, "an operand varies along the units but is not permuted with them")
            return None
        return lay

    def cat(self, node: fx.Node) -> Optional[_Layout]:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            self.unknown(node, "cat of a non-list")
            return None
        nd = len(_shape(node))
        dim = dim % nd
        lays = [self.layout.get(t.name) for t in tensors]
        if all(l is None for l in lays):
            return None
        if any(l is None for l in lays) or len({l.dim for l in lays}) != 1:
            self.unknown(node, "cat of values with different unit layouts")
            return None
        if lays[0].dim == dim:  # concatenated along units: one segment per operand
            return _Layout(dim, tuple(s for l in lays for s in l.segs))
        if not self.union_layouts(lays):
            self.unknown(node, "cat of values with different unit layouts")
            return None
        return lays[0]

    def reduce(self, node: fx.Node, x, lay) -> Optional[_Layout]:
        if lay is None:
            return None
        nd_in = len(_shape(x))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None:
            return None  # a full reduction is invariant to any permutation
        dims = [d % nd_in for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if lay.dim in dims:
            return None  # a sum/mean/max over the units is invariant to their order
        new_dim = lay.dim if keep else lay.dim - sum(1 for d in dims if d < lay.dim)
        return _Layout(new_dim, lay.segs)

    def transpose(self, node: fx.Node, x, lay) -> Optional[_Layout]:
        if lay is None:
            return None
        nd = len(_shape(x))
        rest = list(node.args[1:])
        if node.target in ("transpose", torch.transpose):
            a, b = (d % nd for d in rest[:2])
            order = list(range(nd))
            order[a], order[b] = order[b], order[a]
        else:
            order = [d % nd for d in (rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest)]
        return _Layout(order.index(lay.dim), lay.segs)

    def reshape(self, node: fx.Node, x, lay) -> Optional[_Layout]:
        """A reshape keeps units when the unit dim leads a run of merged dims (e.g. flatten C x H x W)."""
        if lay is None:
            return None
        a, b = _shape(x), _shape(node)
        groups = _reshape_groups(a, b)
        if groups is not None:
            for gi, gj in groups:
                if lay.dim not in gi:
                    continue
                if math.prod(a[d] for d in gi if d < lay.dim) != 1:
                    break
                inner = math.prod(a[d] for d in gi if d > lay.dim)
                lead = next((d for d in gj if b[d] != 1), gj[0] if gj else None)
                if lead is None:
                    break
                q = math.prod(b[d] for d in gj if d > lead)
                if any((s.block * inner) % q for s in lay.segs):
                    break
                return _Layout(lead, tuple(_Seg(s.var, s.units, s.block * inner // q) for s in lay.segs))
        self.unknown(node, f"reshape {list(a)} -> {list(b)} splits or interleaves the units")
        return None


def _groups_from(d: _Deriver, state: Mapping[str, torch.Tensor]) -> List[Group]:
    members: Dict[Any, List[Any]] = {}
    for key in list(d.uf.parent):
        members.setdefault(d.uf.find(key), []).append(key)
    site_by_var: Dict[int, List[Site]] = {}
    for v, s in d.sites:
        site_by_var.setdefault(v, []).append(s)
    groups: List[Group] = []
    for keys in members.values():
        vars_ = sorted(k[1] for k in keys if k[0] == "v")
        axes = sorted((k[1] for k in keys if k[0] == "a"), key=lambda a: (a.tensor, a.axis, a.offset))
        if not axes:
            continue
        units = {d.var_units[v] for v in vars_} | {a.units for a in axes}
        frozen = next((d.frozen[v] for v in vars_ if v in d.frozen), "")
        if len(units) != 1:
            frozen = frozen or f"axes disagree on the number of units {sorted(units)}"
        for a in axes:
            t = state[a.tensor]
            if a.axis >= t.dim() or a.offset + a.units * a.block > t.shape[a.axis]:
                frozen = frozen or f"axis slice {a} does not fit tensor of shape {tuple(t.shape)}"
        sites, seen = [], set()
        for v in vars_:
            for s in site_by_var.get(v, []):
                if (s.node, s.offset) not in seen:
                    seen.add((s.node, s.offset))
                    sites.append(s)
        name = d.var_names[vars_[0]] if vars_ else axes[0].tensor
        groups.append(Group(size=min(units), axes=tuple(axes), sites=tuple(sites), name=name, frozen=frozen))
    return _freeze_overlaps(groups)


def _freeze_overlaps(groups: List[Group]) -> List[Group]:
    """Two groups claiming overlapping, different entries of one tensor axis cannot both be permuted."""
    spans: Dict[Tuple[str, int], List[Tuple[int, int, int, AxisSlice]]] = {}
    for gi, g in enumerate(groups):
        for a in g.axes:
            spans.setdefault((a.tensor, a.axis), []).append((a.offset, a.offset + a.units * a.block, gi, a))
    bad = set()
    for lst in spans.values():
        for i, (s1, e1, g1, a1) in enumerate(lst):
            for s2, e2, g2, a2 in lst[i + 1:]:
                if s1 < e2 and s2 < e1 and (a1 != a2 or g1 != g2):
                    bad.update((g1, g2))
    return [
        replace(g, frozen=g.frozen or "shares entries of a tensor axis with another group") if i in bad else g
        for i, g in enumerate(groups)
    ]


# ------------------------------------------------------------------------------------------ applying perms
Perms = Union[Mapping[int, torch.Tensor], Sequence[Optional[torch.Tensor]]]


def _axis_indices(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Perms, skip: Optional[AxisSlice] = None
) -> Dict[Tuple[str, int], torch.Tensor]:
    """For every (tensor, axis) touched by a given permutation, the index vector that applies it."""
    items = perms.items() if isinstance(perms, Mapping) else enumerate(perms)
    out: Dict[Tuple[str, int], torch.Tensor] = {}
    for gi, p in items:
        if p is None:
            continue
        g = spec.groups[gi]
        p = torch.as_tensor(p, dtype=torch.long)
        if p.numel() != g.size:
            raise ValueError(f"permutation for group {gi} has {p.numel()} entries, the group has {g.size} units")
        for a in g.axes:
            if a == skip:
                continue
            key = (a.tensor, a.axis)
            if key not in out:
                out[key] = torch.arange(state[a.tensor].shape[a.axis])
            idx = (a.offset + p[:, None] * a.block + torch.arange(a.block)[None, :]).reshape(-1)
            out[key][a.offset:a.offset + a.units * a.block] = idx
    return out


def apply_permutation(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Perms
) -> Dict[str, torch.Tensor]:
    """A new state dict with each group's permutation applied to every axis of the group.

    Parameters
    ----------
    state_dict : the model's tensors (not modified).
    spec : the architecture's groups (from :func:`derive`).
    perms : group index -> permutation (a LongTensor of the group's size; new unit i is old unit ``perm[i]``),
        as a mapping or a sequence aligned with ``spec.groups``; None or missing means identity.

    Returns
    -------
    A new dict; tensors no permutation touches are the same objects as in ``state_dict``.
    """
    index = _axis_indices(state_dict, spec, perms)
    out = dict(state_dict)
    for (name, axis), idx in index.items():
        out[name] = out[name].index_select(axis, idx.to(out[name].device))
    return out


def random_perms(spec: PermutationSpec, generator: Optional[torch.Generator] = None) -> Dict[int, torch.Tensor]:
    """A random permutation for every permutable group."""
    return {i: torch.randperm(spec.groups[i].size, generator=generator) for i in spec.permutable}


# --------------------------------------------------------------------------------------------- self-test
def _jitter(model: nn.Module, generator: torch.Generator) -> None:
    """Break the symmetry of a fresh init (BN weights all 1, biases 0) so mislinked axes show in the outputs."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype)
            if name.endswith("running_var"):
                t.mul_(torch.exp(0.3 * noise))
            else:
                scale = float(t.std()) if t.numel() > 1 else 0.0
                t.add_(noise * max(scale, 0.1) * 0.3)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = torch.cat([o.reshape(-1) for o in out if isinstance(o, torch.Tensor)])
    elif isinstance(out, dict):
        out = torch.cat([o.reshape(-1) for o in out.values() if isinstance(o, torch.Tensor)])
    return out.reshape(-1)


@torch.no_grad()
def check_invariance(
    model: nn.Module, spec: PermutationSpec, example_input: torch.Tensor, groups: Optional[Sequence[int]] = None,
    seed: int = 0,
) -> Dict[int, float]:
    """Relative output change when each group alone is randomly permuted (eval mode, on a jittered copy).

    The copy runs in float64 when the model allows it, so the figure measures structure, not rounding.

    Parameters
    ----------
    model : the network (not modified).
    spec : its groups.
    example_input : a batch the model accepts.
    groups : group indices to test (default: every permutable group).

    Returns
    -------
    group index -> max|y_permuted - y| / max|y| (dimensionless; a valid group gives ~1e-12 in float64).
    """
    g = torch.Generator().manual_seed(seed)
    # On a CPU copy whatever the model's device: float64 everywhere, and the test's RNG and indices are CPU ones.
    base = copy.deepcopy(model).cpu().eval()
    _jitter(base, g)
    x = example_input.cpu()
    try:
        base64 = copy.deepcopy(base).double()
        y = _run(base64, x.double() if x.is_floating_point() else x)
        base, x = base64, (x.double() if x.is_floating_point() else x)
    except Exception:  # a model that cannot run in float64 is tested in its own precision
        y = _run(base, x)
    state = base.state_dict(keep_vars=True)
    scale = float(y.abs().max()) or 1.0
    errors: Dict[int, float] = {}
    for gi in (spec.permutable if groups is None else groups):
        size = spec.groups[gi].size
        perm = torch.randperm(size, generator=g)
        if size > 1 and bool((perm == torch.arange(size)).all()):
            perm = torch.roll(perm, 1)
        # permute the group's tensors in place, run, restore: far cheaper than reloading the whole model
        saved = {}
        for (name, axis), idx in _axis_indices(state, spec, {gi: perm}).items():
            t = state[name].data
            saved.setdefault(name, t.clone())
            t.copy_(t.index_select(axis, idx))
        try:
            errors[gi] = float((_run(base, x) - y).abs().max()) / scale
        finally:
            for name, t in saved.items():
                state[name].data.copy_(t)
    return errors


# -------------------------------------------------------------------------------------------------- derive
def trace(model: nn.Module) -> fx.GraphModule:
    """The torch.fx trace of ``model`` (standard torch.nn modules stay leaves)."""
    return fx.symbolic_trace(model)


def derive(model: nn.Module, example_input: torch.Tensor, self_test: bool = True) -> PermutationSpec:
    """Derive the permutation groups of ``model`` from a torch.fx trace on ``example_input``.

    Parameters
    ----------
    model : any nn.Module that torch.fx can trace (it is not modified: tracing runs on a copy in eval mode).
    example_input : a batch the model accepts (only its shape and dtype matter; 2 samples are plenty).
    self_test : run :func:`check_invariance` and freeze every group whose permutation changes the outputs by more
        than :data:`INVARIANCE_TOL` (relative).

    Returns
    -------
    The :class:`PermutationSpec`. Problems never raise: what is not understood is frozen, with a warning.
    """
    work = copy.deepcopy(model).eval()
    state = work.state_dict()
    try:
        gm = trace(work)
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {first}); nothing is permuted"
        warnings.warn(msg, stacklevel=2)
        return PermutationSpec(groups=(), warnings=(msg,))
    d = _Deriver(gm, set(state))
    d.run()
    groups = _groups_from(d, state)
    notes = list(dict.fromkeys(d.notes))
    spec = PermutationSpec(groups=tuple(groups), warnings=tuple(notes))
    if self_test and spec.permutable:
        errors = check_invariance(model, spec, example_input)
        failed = {i: e for i, e in errors.items() if not e <= INVARIANCE_TOL}
        if failed:
            new = list(spec.groups)
            for i, e in failed.items():
                new[i] = replace(new[i], frozen=f"failed the invariance self-test (relative change {e:.2e})")
                notes.append(f"group {i} [{new[i].name}] failed the invariance self-test ({e:.2e}); frozen")
            spec = PermutationSpec(groups=tuple(new), warnings=tuple(notes))
    for n in notes:
        warnings.warn(f"dimat.merge.structure: {n}", stacklevel=2)
    return spec
