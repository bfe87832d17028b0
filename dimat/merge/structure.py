"""Permutation groups of a network, derived from what the model computes on an example input.

A *group* is a set of tensor axes that must be permuted together for the network's function to stay the same:
the output channels of a conv/linear layer, the matching BatchNorm/LayerNorm entries and the input channels of
every consumer. :func:`derive` records the actual call of the model on an example input as an aten-level graph
(``make_fx`` over ``torch.func.functional_call``, so Python control flow, forward flags, shape arithmetic and
``ModelOutput`` results are simply executed), then walks the graph once, tracking for every dimension of every
value which units it carries, and links dimensions that must match with a union-find.

Units can be *structured*. A reshape that splits a dimension of ``h*d`` units into ``h`` heads of ``d`` units
gives its group two *factors*; the group's permutation is then a permutation of the heads (blocks of ``d``) and
one permutation inside the heads, and groups that share a factor (the heads of Q, K, V and the output
projection; Q and K's within-head dims) share its permutation. GroupNorm blocks, grouped convolutions and GQA
(several query heads per key/value head) come out of the same rules. Splits into segments (``torch.cat``,
``chunk``, ``split``, a packed ``in_proj``) give one group per segment.

Groups touching the network input or its output are never permuted, and anything not understood freezes the
groups it touches, with a warning. Every remaining group is then checked by a random-permutation invariance
self-test (:func:`check_invariance`); a group (or factor) that fails is frozen. :meth:`PermutationSpec.coverage`
says which share of the hidden units is permuted, and why the rest is not.

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
from torch import nn

__all__ = [
    "AxisSlice",
    "Factor",
    "Site",
    "Group",
    "Coverage",
    "PermutationSpec",
    "derive",
    "trace",
    "module_graph",
    "model_output",
    "output_tensors",
    "apply_permutation",
    "check_invariance",
    "random_perms",
    "compose",
]

#: relative tolerance of the invariance self-test: max|y_perm - y| / max|y|
INVARIANCE_TOL = 1e-4

#: freeze reasons that say the units are not hidden units (the logits): not counted against coverage
OUTPUT_REASON = "reaches the network output"


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
class Factor:
    """One factor of a structured group's units, outermost first (unit index = mixed radix over the factors).

    Groups that name the same ``key`` share this factor's permutation (e.g. the heads of Q, K, V and the output
    projection). A factor with a non-empty ``fixed`` reason is never permuted (identity). A ``per_block`` factor
    (the innermost one, e.g. the dims of a head or the channels of a GroupNorm group) may be permuted differently
    inside every block of its first ``block_factors`` factors (all factors before it, or the leading ones that
    every group holding it shares: with GQA, the key/value heads): its permutation is then a ``[blocks, units]``
    tensor, row ``b`` for the block at new position ``b``.
    """

    key: str
    units: int
    fixed: str = ""
    per_block: bool = False
    block_factors: int = 0

    def __str__(self) -> str:
        extra = ", per block" if self.per_block and not self.fixed else ""
        return f"{self.units} ({self.key}{extra}{', fixed: ' + self.fixed if self.fixed else ''})"


@dataclass(frozen=True)
class Site:
    """Where a group's activations are observed: the value of graph node ``node``.

    The group's units lie along dimension ``dim`` of that value, starting at entry ``offset``, ``block`` entries per
    unit (the extra entries are treated as more samples). ``consumer`` names the layer reading the value (or
    producing it, for groups that no layer reads directly, e.g. attention queries).
    """

    node: str
    dim: int
    offset: int
    units: int
    block: int = 1
    consumer: str = ""

    def __str__(self) -> str:
        return f"{self.node} ({self.consumer})" if self.consumer else self.node


@dataclass(frozen=True)
class Group:
    """One set of axes permuted together. ``frozen`` is a reason string when the group must not be permuted.

    ``factors`` describes the units' structure (outermost first); a plain group has one factor of ``size`` units.
    """

    size: int
    axes: Tuple[AxisSlice, ...]
    sites: Tuple[Site, ...]
    name: str = ""
    frozen: str = ""
    factors: Tuple[Factor, ...] = ()

    @property
    def permutable(self) -> bool:
        """True when merges may permute this group (not frozen, more than one unit, some factor not fixed)."""
        if self.frozen or self.size <= 1:
            return False
        return not self.factors or any(f.units > 1 and not f.fixed for f in self.factors)

    @property
    def structured(self) -> bool:
        """True when the units have more than one factor (heads x dims, GroupNorm blocks x channels, ...)."""
        return len(self.factors) > 1

    def keys(self) -> List[str]:
        """The permutable factor keys of this group."""
        return [f.key for f in self.effective_factors() if not f.fixed and f.units > 1]

    def effective_factors(self) -> Tuple[Factor, ...]:
        return self.factors or (Factor(f"g:{self.name}:{id(self)}", self.size),)


@dataclass(frozen=True)
class Coverage:
    """Share of hidden-unit parameter entries in permuted groups, and every frozen hidden group with its reason."""

    permuted: int
    total: int
    frozen: Tuple[Tuple[str, str], ...] = ()  # (group name, reason)

    @property
    def fraction(self) -> float:
        return self.permuted / self.total if self.total else 1.0

    def __str__(self) -> str:
        head = f"{100 * self.fraction:.1f}% of hidden-unit parameters in permuted groups"
        if not self.frozen:
            return head
        return head + "; not permuted: " + "; ".join(f"{n}: {r}" for n, r in self.frozen)


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation groups of one architecture (for one input shape)."""

    groups: Tuple[Group, ...]
    warnings: Tuple[str, ...] = field(default=())
    #: parameter entries per group (numbers of tensor entries the group's axes touch), for :meth:`coverage`
    weights: Tuple[int, ...] = field(default=(), compare=False)
    #: why the model could not be analysed at all (nothing is permuted), and its parameter count
    failed: str = ""
    parameters: int = 0

    @property
    def permutable(self) -> List[int]:
        """Indices of the groups merges may permute."""
        return [i for i, g in enumerate(self.groups) if g.permutable]

    def bundles(self) -> List[List[int]]:
        """Permutable groups joined by shared factor keys: each bundle must be permuted (and matched) together."""
        uf = _UnionFind()
        for gi in self.permutable:
            uf.find(("g", gi))
            for k in self.groups[gi].keys():
                uf.union(("g", gi), ("k", k))
        out: Dict[Any, List[int]] = {}
        for gi in self.permutable:
            out.setdefault(uf.find(("g", gi)), []).append(gi)
        return list(out.values())

    def coverage(self) -> Coverage:
        """Parameter entries in permuted groups over those in all hidden-unit groups (the logits do not count)."""
        if self.failed:
            return Coverage(0, max(self.parameters, 1), (("the whole model", self.failed),))
        permuted = total = 0
        frozen = []
        for i, g in enumerate(self.groups):
            w = self.weights[i] if i < len(self.weights) else sum(a.units * a.block for a in g.axes)
            if g.frozen.startswith(OUTPUT_REASON) or g.size <= 1:
                continue
            total += w
            if g.permutable:
                permuted += w
            else:
                frozen.append((g.name, g.frozen or "all factors fixed"))
        return Coverage(permuted, total, tuple(frozen))

    def describe(self) -> str:
        """A readable listing: one block per group with its size, structure, axes, sites and frozen reason."""
        lines = [
            f"{len(self.groups)} permutation groups ({len(self.permutable)} permutable, "
            f"{sum(1 for g in self.groups if g.frozen)} frozen)",
            f"coverage: {self.coverage()}",
        ]
        for i, g in enumerate(self.groups):
            state = f"FROZEN: {g.frozen}" if g.frozen else ("size 1, not permuted" if g.size <= 1 else "permuted")
            lines.append(f"group {i} [{g.name}] size {g.size}, {state}")
            if g.structured:
                lines.append("  units: " + " x ".join(str(f) for f in g.factors))
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

    def union(self, a: Any, b: Any) -> Any:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra


# ------------------------------------------------------------------------------------------------------ tracing
def model_output(out: Any) -> Any:
    """The part of a model's result that counts as its output: ``logits`` of a ``ModelOutput`` or dict that has
    them, otherwise the result itself (tensors, tuples, lists and dicts of tensors)."""
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        return {k: v for k, v in out.items() if v is not None}
    return out


def output_tensors(out: Any) -> List[torch.Tensor]:
    """Every tensor of a model's output: a tensor, or any nesting of tuples, lists and mappings (a Hugging Face
    ModelOutput included)."""
    out = model_output(out)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


def trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """The aten-level graph of ``model(example_input)`` in eval mode, with the model's parameters and buffers as
    ``get_attr`` nodes named by their state-dict names and one placeholder, the input.

    The call is recorded as it runs (``make_fx`` with ``pre_dispatch=True`` over ``torch.func.functional_call``):
    Python control flow, flags and shape arithmetic are executed, so the graph is what the model computes for
    inputs of this shape. Shapes are concrete: a graph serves inputs of exactly ``example_input``'s shape.
    """
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functional_call

    work = copy.deepcopy(model).eval()
    named = list(work.named_parameters()) + list(work.named_buffers())
    names = [n for n, _ in named]

    def run(*flat):
        out = functional_call(work, dict(zip(names, flat[:-1])), (flat[-1],), tie_weights=True)
        tensors = output_tensors(out)
        if not tensors:
            raise ValueError(f"the model's output holds no tensor (got {type(out).__name__})")
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    # the slow, decomposable path of nn.MultiheadAttention runs only with autograd on
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # values read back into Python (``.item()``, ``x in tensor``) take the example's values, as the call did
        gm = make_fx(run, pre_dispatch=True, _error_on_data_dependent_ops=False)(*[t for _, t in named],
                                                                                  example_input)
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for node, name in zip(placeholders[:-1], names):
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
        placeholders[-1].name = placeholders[-1].target = "x"
        # tensors the trace made constants of (``torch.tensor(...)`` in forward) travel with the graph
        known = set(names)
        constants = {n.target: getattr(gm, n.target) for n in graph.nodes
                     if n.op == "get_attr" and n.target not in known}
        root = {n: t for n, t in named}
        root.update(constants)
        out = fx.GraphModule(root, graph)
        out.graph.dimat_constants = constants
        out.recompile()
    return out


def module_graph(model: nn.Module) -> fx.Graph:
    """The torch.fx symbolic trace of ``model`` at module level (standard layers stay ``call_module`` nodes), or an
    empty graph when torch.fx cannot trace it. Used where module boundaries matter (REPAIR's layer list)."""
    try:
        return fx.symbolic_trace(copy.deepcopy(model).eval()).graph
    except Exception:
        return fx.Graph()


# ----------------------------------------------------------------------------------------------- the deriver
# A dimension of a value is described by its factors, outermost first: ((class or None, size), ...), product =
# the dimension's size. A class is a set of unit axes that must be permuted together (union-find); None is a
# factor that carries no permutable units (batch, positions, the network input). A dimension with no class at
# all is None. A class may get a structure: ("seg", [classes]) when it is cut into consecutive segments (cat,
# chunk, a packed projection), ("fac", [(class or None, size), ...]) when its units are a product (heads x dims).
Dim = Optional[Tuple[Tuple[Optional[int], int], ...]]
Lay = Optional[Tuple[Dim, ...]]
_UNIFORM = "uniform"  # a value constant across all entries (zeros, ones, full): it commutes with any permutation

_PASS = {
    "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "contiguous", "_to_copy", "to", "type_as", "clone", "detach", "alias", "lift_fresh_copy",
    "_assert_tensor_metadata", "dropout_", "relu_", "gelu_", "silu_", "hardtanh_", "sigmoid_", "tanh_",
    "leaky_relu_", "elu_", "clamp_", "fill_", "hardswish_", "mish_", "_conj", "resolve_conj", "resolve_neg",
}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
            "reshape_as", "squeeze_", "unsqueeze_", "_reshape_alias"}
_TRANSPOSE = {"permute", "transpose", "t", "movedim", "swapaxes", "swapdims", "numpy_T", "mT", "transpose_", "t_"}
_REDUCE = {"sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod", "linalg_vector_norm", "norm", "nansum",
           "nanmean", "all", "any"}
_FACTORY = {"zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros",
            "new_ones", "new_full", "new_empty", "scalar_tensor", "empty_strided", "arange", "rand", "randn",
            "rand_like", "randn_like", "tensor", "eye", "linspace", "_local_scalar_dense", "triu", "tril"}
_UNIFORM_FACTORY = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
                    "new_full", "scalar_tensor"}
_POOL_DIMS = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "adaptive_max_pool1d": 1,
    "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3,
    "upsample_nearest1d": 1, "upsample_nearest2d": 2, "upsample_nearest3d": 3, "upsample_bilinear2d": 2,
    "upsample_linear1d": 1, "upsample_bicubic2d": 2, "upsample_trilinear3d": 3, "_upsample_nearest_exact2d": 2,
    "_adaptive_avg_pool2d": 2, "lp_pool1d": 1, "lp_pool2d": 2, "reflection_pad1d": 1, "reflection_pad2d": 2,
    "reflection_pad3d": 3, "replication_pad1d": 1, "replication_pad2d": 2, "replication_pad3d": 3,
    "pixel_shuffle": 2, "pixel_unshuffle": 2,
}
_RNN_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _op_name(node: fx.Node) -> str:
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(t, "__name__", str(t))


def _meta_shape(node: Any) -> Optional[Tuple[int, ...]]:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def _is_tensor(node: Any) -> bool:
    return _meta_shape(node) is not None


class _FreezeSignal(Exception):
    pass


_VIEWS = {"t", "transpose", "permute", "view", "reshape", "_to_copy", "to", "contiguous", "expand", "clone",
          "detach", "alias", "unsqueeze", "squeeze"}


def _param_source(node: Any, depth: int = 6) -> Optional[str]:
    """The parameter a value is a view or copy of (``W.t()``, ``W.view(...)``), else None."""
    while isinstance(node, fx.Node) and depth > 0:
        if node.op == "get_attr":
            return node.target
        if node.op != "call_function" or _op_name(node) not in _VIEWS or not node.args:
            return None
        node = node.args[0]
        depth -= 1
    return None


class _Deriver:
    """One pass over an aten-level graph that links unit axes and records activation sites."""

    def __init__(self, gm: fx.GraphModule, state: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]):
        self.gm = gm
        self.state = state
        self.params = params  # name -> tensor of every parameter and floating buffer (graph get_attr targets)
        self.uf = _UnionFind()
        self.units: Dict[int, int] = {}
        self.hint: Dict[int, str] = {}
        self.struct: Dict[int, Tuple[str, list]] = {}
        self.frozen: Dict[int, str] = {}
        self.order: Dict[int, int] = {}  # class -> index of the first value it appears in
        self.items: List[Tuple[int, str, tuple]] = []  # (class, "axis"/"site"/"psite", payload)
        self.lay: Dict[str, Any] = {}
        self.multi: Dict[str, List[Any]] = {}
        self.indexed: Dict[str, List[Lay]] = {}  # RNN states stacked over layers: per-index layouts along dim 0
        self.composites: Dict[tuple, int] = {}
        self.converted: Dict[int, Tuple[int, List[Dict[int, int]]]] = {}
        self.notes: List[str] = []
        self.step = 0
        self.activated: set = set()
        self.indexed_src: Dict[Tuple[str, int], List[Lay]] = {}

    # ---- classes
    def new(self, units: int, hint: str) -> int:
        c = len(self.units)
        self.units[c] = units
        self.hint[c] = hint
        self.uf.find(c)
        return c

    def find(self, c: int) -> int:
        return self.uf.find(c)

    def freeze_cls(self, c: int, reason: str) -> None:
        r = self.find(c)
        if reason == OUTPUT_REASON:  # the logits are not hidden units, whatever else pinned them
            self.frozen[r] = reason
        else:
            self.frozen.setdefault(r, reason)

    def freeze(self, d: Any, reason: str) -> None:
        if d is None or d == _UNIFORM:
            return
        for c, _ in d:
            if c is not None:
                self.freeze_cls(c, reason)

    def freeze_lay(self, lay: Any, reason: str) -> None:
        if lay is None or lay == _UNIFORM:
            return
        for d in lay:
            self.freeze(d, reason)

    def union(self, a: int, b: int, why: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.units[ra] != self.units[rb]:
            self.freeze_cls(ra, f"units disagree ({self.units[ra]} vs {self.units[rb]}) at {why}")
            self.freeze_cls(rb, f"units disagree ({self.units[ra]} vs {self.units[rb]}) at {why}")
            return
        sa, sb = self.struct.pop(ra, None), self.struct.pop(rb, None)
        fa, fb = self.frozen.pop(ra, None), self.frozen.pop(rb, None)
        root = self.uf.union(ra, rb)
        if fa or fb:
            self.frozen[root] = OUTPUT_REASON if OUTPUT_REASON in (fa, fb) else (fa or fb)
        self.order[root] = min(self.order.get(ra, 1 << 60), self.order.get(rb, 1 << 60))
        if sa is not None and sb is not None:
            self.struct[root] = sa
            self.unify_struct(sa, sb, root, why)
        elif sa is not None or sb is not None:
            self.struct[root] = sa if sa is not None else sb

    def flat_fac(self, children: list, depth: int = 0) -> list:
        out = []
        for c, n in children:
            if n == 1:
                continue
            if c is None:
                out.append((None, n))
                continue
            r = self.find(c)
            s = self.struct.get(r)
            if s is not None and s[0] == "fac" and depth < 32:
                out.extend(self.flat_fac(s[1], depth + 1))
            else:
                out.append((r, n))
        return out

    def unify_struct(self, sa, sb, root: int, why: str) -> None:
        if sa[0] == "fac" and sb[0] == "fac":
            fa, fb = self.flat_fac(sa[1]), self.flat_fac(sb[1])
            if [n for _, n in fa] == [n for _, n in fb]:
                for (a, _), (b, _) in zip(fa, fb):
                    self.unify_cls(a, b, why)
                return
        if sa[0] == "seg" and sb[0] == "seg" and [self.units[self.find(c)] for c in sa[1]] == [
                self.units[self.find(c)] for c in sb[1]]:
            for a, b in zip(sa[1], sb[1]):
                self.union(a, b, why)
            return
        self.freeze_cls(root, f"incompatible unit structures at {why}")

    def unify_cls(self, a: Optional[int], b: Optional[int], why: str) -> None:
        if a is None and b is None:
            return
        if a is None or b is None:
            self.freeze_cls(a if b is None else b, f"mixed with entries that are not permuted at {why}")
            return
        self.union(a, b, why)

    def composite(self, d: Dim) -> Optional[int]:
        """One class standing for a whole dimension (its factors' product)."""
        if d is None or d == _UNIFORM:
            return None
        d = tuple((c, n) for c, n in d if n != 1)
        if len(d) == 1 and d[0][0] is not None:
            return d[0][0]
        if all(c is None for c, _ in d):
            return None
        key = tuple((None if c is None else self.find(c), n) for c, n in d)
        c = self.composites.get(key)
        if c is None or self.struct.get(self.find(c)) is None:
            c = self.new(math.prod(n for _, n in d), "")
            self.struct[c] = ("fac", list(key))
            self.composites[key] = c
        return c

    def unify(self, a: Any, b: Any, why: str) -> None:
        """Dimensions ``a`` and ``b`` must carry the same units in the same order."""
        if a == _UNIFORM or b == _UNIFORM:
            return
        if a is None and b is None:
            return
        if a is None or b is None:
            self.freeze(a if b is None else b, f"mixed with entries that are not permuted at {why}")
            return
        a2 = [(c, n) for c, n in a if n != 1]
        b2 = [(c, n) for c, n in b if n != 1]
        if [n for _, n in a2] == [n for _, n in b2]:
            for (x, _), (y, _) in zip(a2, b2):
                self.unify_cls(x, y, why)
            return
        self.unify_cls(self.composite(a), self.composite(b), why)

    # ---- splitting classes
    def split_factor(self, fc: Optional[int], fn: int, need: int, why: str
                     ) -> Tuple[Tuple[Optional[int], int], Tuple[Optional[int], int]]:
        """Factor ``(fc, fn)`` cut into an outer part of ``need`` units and the rest: ``((class, need),
        (class, fn // need))``; a factor without a class (no units to track) gives parts without one."""
        if fc is None:
            return (None, need), (None, fn // need)
        a, b = self.split_cls(fc, [need, fn // need], why)
        return (a, need), (b, fn // need)

    def split_cls(self, c: int, sizes: List[int], why: str) -> List[Optional[int]]:
        """Classes for the factors ``sizes`` (outermost first) of class ``c``'s units."""
        r = self.find(c)
        s = self.struct.get(r)
        if s is None:
            kids = [self.new(n, f"{self.hint[r]}/{i}") for i, n in enumerate(sizes)]
            for k in kids:
                self.order[k] = self.order.get(r, self.step)
            self.struct[r] = ("fac", [(k, n) for k, n in zip(kids, sizes)])
            return kids
        if s[0] != "fac":
            raise _FreezeSignal(f"reshape of a class cut into segments at {why}")
        flat = self.flat_fac(s[1])
        out: List[Optional[int]] = []
        queue = list(flat)
        for n in sizes:
            take, prod = [], 1
            while prod < n and queue:
                fc, fn = queue.pop(0)
                if prod * fn <= n:
                    take.append((fc, fn))
                    prod *= fn
                elif (n // prod) > 0 and fn % (n // prod) == 0:
                    need = n // prod
                    taken, rest = self.split_factor(fc, fn, need, why)
                    take.append(taken)
                    queue.insert(0, rest)
                    prod *= need
                else:
                    raise _FreezeSignal(f"reshape cuts across unit factors at {why}")
            if prod != n:
                raise _FreezeSignal(f"reshape cuts across unit factors at {why}")
            out.append(self.composite(tuple(take)) if take else None)
        return out

    def seg_cls(self, c: int, sizes: List[int], why: str) -> List[int]:
        """Classes for consecutive segments of class ``c``'s units."""
        r = self.find(c)
        s = self.struct.get(r)
        if s is None:
            kids = [self.new(n, f"{self.hint[r]}[{i}]") for i, n in enumerate(sizes)]
            for k in kids:
                self.order[k] = self.order.get(r, self.step)
            self.struct[r] = ("seg", kids)
            return kids
        if s[0] == "seg":
            have = [self.units[self.find(k)] for k in s[1]]
            if have == list(sizes):
                return list(s[1])
            # coarser pieces made of whole segments
            out, i = [], 0
            for n in sizes:
                take, tot = [], 0
                while tot < n and i < len(s[1]):
                    take.append(s[1][i])
                    tot += have[i]
                    i += 1
                if tot != n:
                    raise _FreezeSignal(f"split across segment boundaries at {why}")
                if len(take) == 1:
                    out.append(take[0])
                else:
                    k = self.new(n, "")
                    self.struct[k] = ("seg", take)
                    out.append(k)
            return out
        raise _FreezeSignal(f"split of a structured class at {why}")

    # ---- layouts
    def regroup(self, dims: List[Dim], in_shape: Sequence[int], out_shape: Sequence[int], why: str) -> Lay:
        factors: List[Tuple[Optional[int], int]] = []
        for d, n in zip(dims, in_shape):
            if n == 1:
                continue
            factors.extend([(None, n)] if d is None else [(c, k) for c, k in d if k != 1])
        out: List[Dim] = []
        for n in out_shape:
            take, prod = [], 1
            while prod < n:
                if not factors:
                    raise _FreezeSignal(f"reshape {list(in_shape)} -> {list(out_shape)} not understood at {why}")
                fc, fn = factors.pop(0)
                if prod * fn <= n:
                    take.append((fc, fn))
                    prod *= fn
                    continue
                need = n // prod
                if need < 1 or fn % need or prod * need != n:
                    raise _FreezeSignal(
                        f"reshape {list(in_shape)} -> {list(out_shape)} splits or interleaves units at {why}")
                taken, rest = self.split_factor(fc, fn, need, why)
                take.append(taken)
                factors.insert(0, rest)
                prod *= need
            out.append(self.norm(tuple(take)))
        if factors:
            raise _FreezeSignal(f"reshape {list(in_shape)} -> {list(out_shape)} not understood at {why}")
        return self.norm_lay(out)

    @staticmethod
    def norm(d: Dim) -> Dim:
        if d is None:
            return None
        d = tuple((c, n) for c, n in d if n != 1)
        if not d or all(c is None for c, _ in d):
            return None
        merged: List[Tuple[Optional[int], int]] = []
        for c, n in d:
            if c is None and merged and merged[-1][0] is None:
                merged[-1] = (None, merged[-1][1] * n)
            else:
                merged.append((c, n))
        return tuple(merged)

    def norm_lay(self, dims: Sequence[Dim]) -> Lay:
        dims = tuple(self.norm(d) for d in dims)
        return None if all(d is None for d in dims) else dims

    def L(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return None
        return self.lay.get(node.name)

    def dims(self, node: Any) -> List[Dim]:
        """Per-dimension layout of a tensor node (None for each dim it does not carry units along)."""
        shape = _meta_shape(node)
        lay = self.L(node)
        n = len(shape) if shape is not None else 0
        if lay is None or lay == _UNIFORM:
            return [None] * n
        return list(lay)

    def add_item(self, d: Dim, kind: str, payload: tuple) -> None:
        c = self.composite(d)
        if c is not None:
            self.items.append((c, kind, payload))

    def site(self, node: fx.Node, dim: int, text: str, producer: bool = False) -> None:
        d = self.dims(node)[dim]
        if d is not None:
            self.add_item(d, "psite" if producer else "site", (node.name, dim % len(_meta_shape(node)), text))

    # ---- the walk
    def run(self) -> None:
        for i, node in enumerate(self.gm.graph.nodes):
            self.step = i
            try:
                out = self.visit(node)
            except _FreezeSignal as e:
                self.unknown(node, str(e))
                out = None
            except Exception as e:  # never crash on an odd graph: freeze what it touches instead
                self.unknown(node, f"could not analyse {_op_name(node)} ({type(e).__name__}: {e})")
                out = None
            if isinstance(out, list):
                self.multi[node.name] = out
                continue
            self.lay[node.name] = out
            if node.op != "get_attr" and out not in (None, _UNIFORM):
                for d in out:
                    for c, _ in d or ():
                        if c is not None:
                            r = self.find(c)
                            self.order.setdefault(r, i)
                            self.order.setdefault(c, i)
                            self.activated.add(c)

    def unknown(self, node: fx.Node, why: str) -> None:
        touched = False
        for a in node.all_input_nodes:
            lay = self.L(a)
            if lay not in (None, _UNIFORM):
                touched = True
                self.freeze_lay(lay, why)
            for lay in self.multi.get(a.name, []):
                if lay not in (None, _UNIFORM):
                    touched = True
                    self.freeze_lay(lay, why)
        if touched:
            self.notes.append(f"{_op_name(node)} ({node.name}): {why}; groups of its inputs frozen")

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            return self.visit_param(node)
        if node.op == "output":
            for a in node.all_input_nodes:
                self.freeze_lay(self.L(a), OUTPUT_REASON)
                for lay in self.multi.get(a.name, []):
                    self.freeze_lay(lay, OUTPUT_REASON)
            return None
        if node.op != "call_function":
            raise _FreezeSignal(f"unsupported node {node.op}")
        if node.target is operator.getitem:
            src, idx = node.args
            if isinstance(src, fx.Node) and src.name in self.multi:
                outs = self.multi[src.name]
                if (src.name, idx) in self.indexed_src:
                    self.indexed[node.name] = self.indexed_src[(src.name, idx)]
                return outs[idx] if isinstance(idx, int) and -len(outs) <= idx < len(outs) else None
            if self.L(src) is not None:
                raise _FreezeSignal("indexing not understood")
            return None
        name = _op_name(node)
        shape = _meta_shape(node)
        tensors_in = [a for a in node.all_input_nodes if _is_tensor(a) or a.name in self.multi]
        if not any(self.L(a) not in (None,) or a.name in self.multi for a in tensors_in) and name not in (
                "linear", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                "conv_transpose3d", "embedding", "lstm", "gru", "rnn_tanh", "rnn_relu", "addmm", "matmul", "mm",
                "bmm", "einsum", "batch_norm", "layer_norm", "group_norm", "rms_norm", "native_layer_norm",
                "native_batch_norm", "_native_batch_norm_legit_no_training", "native_group_norm", "instance_norm"):
            # nothing here carries units (and no parameter is consumed): the result carries none either
            if name in _UNIFORM_FACTORY:
                return _UNIFORM
            if shape is None and isinstance(node.meta.get("val"), (tuple, list)):
                return [None] * len(node.meta["val"])
            return None
        handler = getattr(self, f"op_{name}", None)
        if handler is not None:
            return handler(node)
        op = node.target
        if isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags:
            return self.pointwise(node)
        if name in _PASS:
            return self.pointwise(node)
        if name in _RESHAPE:
            return self.regroup(self.dims(node.args[0]), _meta_shape(node.args[0]), shape, node.name)
        if name in _TRANSPOSE:
            return self.transpose(node)
        if name in _REDUCE:
            return self.reduce(node)
        if name in _POOL_DIMS:
            return self.spatial(node, _POOL_DIMS[name])
        if name in _FACTORY:
            return _UNIFORM if name in _UNIFORM_FACTORY else None
        raise _FreezeSignal(f"aten op {name} is not understood")

    def visit_param(self, node: fx.Node) -> Lay:
        t = self.params.get(node.target)
        if t is None or not t.is_floating_point():
            return None
        dims: List[Dim] = []
        base = node.target.rsplit(".", 1)
        for ax, n in enumerate(t.shape):
            if n == 1:
                dims.append(None)
                continue
            hint = base[0] if ax == 0 and len(base) == 2 and base[1] in ("weight", "bias") else node.target
            c = self.new(n, hint if ax == 0 else f"{node.target}[axis {ax}]")
            self.items.append((c, "axis", (node.target, ax)))
            dims.append(((c, n),))
        return tuple(dims)

    # ---- generic rules
    def pointwise(self, node: fx.Node) -> Lay:
        shape = _meta_shape(node)
        if shape is None:
            raise _FreezeSignal("non-tensor result")
        operands = [a for a in node.all_input_nodes if _is_tensor(a)]
        out: List[Dim] = [None] * len(shape)
        for k in range(1, len(shape) + 1):
            ds = []
            for a in operands:
                sa = _meta_shape(a)
                if len(sa) < k or sa[-k] == 1 and shape[-k] != 1:
                    continue  # broadcast along this dim: the operand is constant across it
                lay = self.L(a)
                if lay == _UNIFORM:
                    continue
                ds.append(self.dims(a)[-k])
            tracked = [d for d in ds if d is not None]
            if not tracked:
                continue
            for d in ds[1:]:
                self.unify(ds[0], d, node.name)
            # an operand that varies along this dim without carrying units pins it: the result carries none
            out[-k] = tracked[0] if len(tracked) == len(ds) else None
        return self.norm_lay(out)

    def transpose(self, node: fx.Node) -> Lay:
        src = node.args[0]
        d = self.dims(src)
        nd = len(d)
        name = _op_name(node)
        if name in ("t", "t_", "numpy_T"):
            order = list(range(nd))[::-1]
        elif name == "mT":
            order = list(range(nd - 2)) + [nd - 1, nd - 2]
        elif name == "permute":
            order = [int(i) % nd for i in node.args[1]]
        elif name == "movedim":
            s, e = node.args[1], node.args[2]
            s = [s] if isinstance(s, int) else list(s)
            e = [e] if isinstance(e, int) else list(e)
            s, e = [i % nd for i in s], [i % nd for i in e]
            order = [None] * nd
            for a, b in zip(s, e):
                order[b] = a
            rest = iter(i for i in range(nd) if i not in s)
            order = [o if o is not None else next(rest) for o in order]
        else:
            a, b = (int(i) % nd for i in node.args[1:3])
            order = list(range(nd))
            order[a], order[b] = order[b], order[a]
        return self.norm_lay([d[i] for i in order])

    def reduce(self, node: fx.Node) -> Lay:
        src = node.args[0]
        d = self.dims(src)
        nd = len(d)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if _op_name(node) in ("linalg_vector_norm", "norm"):
            dims = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        keep = node.kwargs.get("keepdim", False)
        if len(node.args) > 2 and isinstance(node.args[2], bool):
            keep = node.args[2]
        if _op_name(node) in ("linalg_vector_norm", "norm") and len(node.args) > 3:
            keep = node.args[3]
        if isinstance(dims, int):
            dims = [dims]
        if not isinstance(dims, (list, tuple)) or len(dims) == 0:
            return None  # a full reduction is invariant to any permutation
        dims = {int(x) % nd for x in dims}
        out = [(None if i in dims else d[i]) for i in range(nd) if keep or i not in dims]
        return self.norm_lay(out)

    def spatial(self, node: fx.Node, k: int) -> Any:
        src = node.args[0]
        d = self.dims(src)
        for x in d[-k:]:
            self.freeze(x, f"{_op_name(node)} mixes entries along a dimension that carries units ({node.name})")
        lay = self.norm_lay(d[:-k] + [None] * k)
        if isinstance(node.meta.get("val"), (tuple, list)):
            return [lay] + [None] * (len(node.meta["val"]) - 1)
        return lay

    # ---- contractions
    def contract(self, node, a, b, out_bias=None) -> Lay:
        """matmul semantics for dims lists a, b (each with their shapes)."""
        (da, sa), (db, sb) = a, b
        if len(sb) == 1:
            self.unify(da[-1], db[0], node.name)
            out = da[:-1]
        elif len(sa) == 1:
            self.unify(da[0], db[-2], node.name)
            out = db[:-2] + [db[-1]]
        else:
            self.unify(da[-1], db[-2], node.name)
            ba, bb = da[:-2], db[:-2]
            sba, sbb = sa[:-2], sb[:-2]
            n = max(len(ba), len(bb))
            batch: List[Dim] = []
            for k in range(n, 0, -1):
                x = ba[-k] if len(ba) >= k and sba[-k] != 1 else "b"
                y = bb[-k] if len(bb) >= k and sbb[-k] != 1 else "b"
                if x != "b" and y != "b":
                    self.unify(x, y, node.name)
                batch.append(x if x != "b" else (y if y != "b" else None))
            out = batch + [da[-2], db[-1]]
        return self.norm_lay(out)

    def op_mm(self, node):
        a, b = node.args[:2]
        lay = self.contract(node, (self.dims(a), _meta_shape(a)), (self.dims(b), _meta_shape(b)))
        self.weight_sites(node, a, b, lay)
        return lay

    def weight_sites(self, node, a, b, lay) -> None:
        """``x @ W`` with a parameter W (GPT-2's Conv1D, hand-written layers): x is read by a layer, the product
        is that layer's output, as for ``linear``."""
        src = _param_source(b)
        if src is None or _param_source(a) is not None or len(_meta_shape(b)) != 2:
            return
        what = src.rsplit(".", 1)[0]
        self.site(a, -1, f"input of {what}")
        if lay is not None:
            self.lay[node.name] = lay
            self.site(node, -1, f"output of {what}", True)

    op_bmm = op_mm
    op_matmul = op_mm

    def op_addmm(self, node):
        bias, a, b = node.args[:3]
        lay = self.contract(node, (self.dims(a), _meta_shape(a)), (self.dims(b), _meta_shape(b)))
        self.weight_sites(node, a, b, lay)
        d = list(lay) if lay is not None else [None] * 2
        bd = self.dims(bias)
        sb = _meta_shape(bias)
        for k in range(1, len(bd) + 1):
            if sb[-k] != 1:
                self.unify(d[-k], bd[-k], node.name)
                d[-k] = d[-k] if d[-k] is not None else bd[-k]
        return self.norm_lay(d)

    def op_linear(self, node):
        x, w = node.args[:2]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        dx, dw = self.dims(x), self.dims(w)
        self.unify(dx[-1], dw[1], node.name)
        what = w.target if w.op == "get_attr" else node.name
        self.site(x, -1, f"input of {what.rsplit('.', 1)[0] if w.op == 'get_attr' else what}")
        out = dx[:-1] + [dw[0]]
        if isinstance(b, fx.Node):
            self.unify(dw[0], self.dims(b)[0], node.name)
            if out[-1] is None:
                out[-1] = self.dims(b)[0]
        lay = self.norm_lay(out)
        self.lay[node.name] = lay
        if lay is not None:
            self.site(node, -1, f"output of {what.rsplit('.', 1)[0] if w.op == 'get_attr' else what}", True)
        return lay

    def op_einsum(self, node):
        eq, ops = node.args[0], node.args[1]
        eq = eq.replace(" ", "")
        if "..." in eq or "->" not in eq:
            raise _FreezeSignal("einsum with '...' or without '->'")
        ins, out = eq.split("->")
        ins = ins.split(",")
        letter: Dict[str, Dim] = {}
        for spec_, t in zip(ins, ops):
            d, s = self.dims(t), _meta_shape(t)
            for ch, dd, n in zip(spec_, d, s):
                if n == 1:
                    continue
                if ch in letter:
                    self.unify(letter[ch], dd, node.name)
                    letter[ch] = letter[ch] if letter[ch] is not None else dd
                else:
                    letter[ch] = dd
        return self.norm_lay([letter.get(ch) for ch in out])

    def conv(self, node, x, w, b, groups, transposed):
        dx, dw = self.dims(x), self.dims(w)
        sw = _meta_shape(w)
        k = len(sw) - 2
        ch = len(dx) - k - 1
        for d in dx[ch + 1:]:
            self.freeze(d, f"convolution over a dimension that carries units ({node.name})")
        for d in dw[2:]:
            self.unify(d, None, f"{node.name} kernel")
        what = w.target.rsplit(".", 1)[0] if w.op == "get_attr" else node.name
        if transposed:
            if groups != 1:
                raise _FreezeSignal(f"grouped transposed convolution (groups={groups})")
            self.unify(dx[ch], dw[0], node.name)
            out_ch = dw[1]
        elif groups == 1:
            self.unify(dx[ch], dw[1], node.name)
            out_ch = dw[0]
        else:
            cin, cout = _meta_shape(x)[ch], sw[0]
            ig, og = cin // groups, cout // groups
            if dx[ch] is not None:
                xg = self.regroup([dx[ch]], [cin], [groups, ig], node.name)
                xg = list(xg) if xg is not None else [None, None]
            else:
                xg = [None, None]
            wg = self.regroup([dw[0]], [cout], [groups, og], node.name) if dw[0] is not None else None
            wg = list(wg) if wg is not None else [None, None]
            self.unify(xg[0], wg[0], node.name)
            self.unify(xg[1], dw[1], node.name)
            out_ch = dw[0]
        self.site(x, ch, f"input of {what}")
        if isinstance(b, fx.Node):
            self.unify(out_ch, self.dims(b)[0], node.name)
        lay = self.norm_lay(dx[:ch] + [out_ch] + [None] * k)
        self.lay[node.name] = lay
        if lay is not None:
            self.site(node, ch, f"output of {what}", True)
        return lay

    def op_conv1d(self, node):
        a = list(node.args) + [None] * 7
        groups = node.kwargs.get("groups", a[6] if a[6] is not None else 1)
        return self.conv(node, a[0], a[1], a[2] if len(node.args) > 2 else node.kwargs.get("bias"), groups, False)

    op_conv2d = op_conv1d
    op_conv3d = op_conv1d

    def op_conv_transpose1d(self, node):
        a = list(node.args) + [None] * 8
        groups = node.kwargs.get("groups", a[6] if a[6] is not None else 1)
        return self.conv(node, a[0], a[1], a[2], groups, True)

    op_conv_transpose2d = op_conv_transpose1d
    op_conv_transpose3d = op_conv_transpose1d

    def op_convolution(self, node):
        a = list(node.args)
        return self.conv(node, a[0], a[1], a[2], a[8], bool(a[6]))

    op__convolution = op_convolution

    # ---- normalisation, embedding
    def op_batch_norm(self, node):
        x = node.args[0]
        d = self.dims(x)
        for p in node.args[1:5]:
            if isinstance(p, fx.Node):
                self.unify(d[1], self.dims(p)[0], node.name)
        return self.norm_lay(d)

    op_instance_norm = op_batch_norm

    def op__native_batch_norm_legit_no_training(self, node):
        return [self.op_batch_norm(node), None, None]

    def op_native_batch_norm(self, node):
        return [self.op_batch_norm(node), None, None]

    def op_layer_norm(self, node):
        x, shape_ = node.args[0], node.args[1]
        d = self.dims(x)
        nd = len(shape_)
        for p in node.args[2:4] if _op_name(node) != "rms_norm" else node.args[2:3]:
            if isinstance(p, fx.Node):
                dp = self.dims(p)
                for k in range(nd):
                    self.unify(d[len(d) - nd + k], dp[k], node.name)
        return self.norm_lay(d)

    op_rms_norm = op_layer_norm

    def op_native_layer_norm(self, node):
        return [self.op_layer_norm(node), None, None]

    def op_group_norm(self, node):
        x, groups = node.args[0], node.args[1]
        w = node.args[2] if len(node.args) > 2 else None
        b = node.args[3] if len(node.args) > 3 else None
        d = self.dims(x)
        c = _meta_shape(x)[1]
        if d[1] is not None and 1 < groups < c:
            self.regroup([d[1]], [c], [groups, c // groups], node.name)  # blocks x units within a block
        for p in (w, b):
            if isinstance(p, fx.Node):
                self.unify(d[1], self.dims(p)[0], node.name)
        return self.norm_lay(d)

    def op_native_group_norm(self, node):
        x, w, b, n, c, hw, groups = node.args[:7]
        d = self.dims(x)
        if d[1] is not None and 1 < groups < c:
            self.regroup([d[1]], [c], [groups, c // groups], node.name)
        for p in (w, b):
            if isinstance(p, fx.Node):
                self.unify(d[1], self.dims(p)[0], node.name)
        return [self.norm_lay(d), None, None]

    def op_embedding(self, node):
        w, ids = node.args[:2]
        dw = self.dims(w)
        if self.L(ids) not in (None, _UNIFORM):
            raise _FreezeSignal("embedding lookup with indices that carry units")
        self.unify(dw[0], None, f"{node.name} vocabulary")
        if w.op == "get_attr" and dw[1] is not None:
            for c, _ in dw[1]:
                if c is not None:
                    self.hint[c] = w.target.rsplit(".", 1)[0]
        return self.norm_lay([None] * len(_meta_shape(ids)) + [dw[1]])

    # ---- shapes
    def op_expand(self, node):
        src = node.args[0]
        d, s = self.dims(src), _meta_shape(src)
        out_shape = _meta_shape(node)
        lead = len(out_shape) - len(s)
        out = [None] * lead + [(None if s[i] == 1 else d[i]) for i in range(len(s))]
        return self.norm_lay(out)

    op_expand_as = op_expand
    op_broadcast_to = op_expand

    def op_repeat(self, node):
        src, reps = node.args[0], list(node.args[1])
        d = self.dims(src)
        lead = len(reps) - len(d)
        out = [None] * lead
        for i, x in enumerate(d):
            if reps[lead + i] != 1:
                self.freeze(x, f"repeat along a dimension that carries units ({node.name})")
                out.append(None)
            else:
                out.append(x)
        return self.norm_lay(out)

    def op_select(self, node):
        src, dim, idx = node.args[:3]
        d = self.dims(src)
        dim = dim % len(d)
        if src.name in self.indexed and dim == 0:
            return self.indexed[src.name][idx]
        if d[dim] is None:
            return self.norm_lay(d[:dim] + d[dim + 1:])
        return self.select_units(node, d, dim, idx)

    def select_units(self, node, d, dim, idx) -> Lay:
        """Picking one entry along a dim that carries units: only understood when that dim is the outer factor of
        a class (q, k, v of a packed projection): the class is then cut into segments, one per entry."""
        dd = d[dim]
        if len(dd) != 1 or dd[0][0] is None:
            raise _FreezeSignal("indexing along a dimension that carries units")
        o, n = dd[0]
        ro = self.find(o)
        if ro not in self.converted:
            parent = next((p for p, s in self.struct.items() if self.find(p) == p and s[0] == "fac"
                           and self.flat_fac(s[1])[:1] and self.flat_fac(s[1])[0][0] == ro), None)
            if parent is None:
                raise _FreezeSignal("indexing along a dimension that carries units")
            rest = self.flat_fac(self.struct[parent][1])[1:]
            pieces, maps = [], []
            for j in range(n):
                m: Dict[int, int] = {}
                kids = []
                for c, k in rest:
                    if c is None:
                        kids.append((None, k))
                        continue
                    m[c] = c if j == 0 else self.new(k, f"{self.hint[c]}#{j}")
                    self.order.setdefault(m[c], self.order.get(c, self.step))
                    kids.append((m[c], k))
                piece = self.composite(tuple(kids))
                if piece is None:
                    piece = self.new(math.prod(k for _, k in kids), "")
                pieces.append(piece)
                maps.append(m)
            self.struct[parent] = ("seg", pieces)
            self.freeze_cls(ro, "never permuted: selected by index")
            self.converted[ro] = (parent, maps)
        parent, maps = self.converted[ro]
        m = maps[idx]
        out = []
        for i, x in enumerate(d):
            if i == dim:
                continue
            out.append(None if x is None else tuple(
                (None if c is None else m.get(self.find(c), m.get(c, c)), k) for c, k in x))
        return self.norm_lay(out)

    def op_unbind(self, node):
        src = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        d = self.dims(src)
        dim = dim % len(d)
        n = _meta_shape(src)[dim]
        if d[dim] is None:
            return [self.norm_lay(d[:dim] + d[dim + 1:])] * n
        return [self.select_units(node, d, dim, j) for j in range(n)]

    def op_slice(self, node):
        src = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else 0
        d = self.dims(src)
        s = _meta_shape(src)
        dim = dim % len(d)
        if d[dim] is None:
            return self.norm_lay(d)
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else s[dim]
        step = node.args[4] if len(node.args) > 4 else 1
        start, end = max(0, start + s[dim] if start < 0 else start), min(s[dim], end + s[dim] if end < 0 else end)
        if start == 0 and end >= s[dim] and step == 1:
            return self.norm_lay(d)
        if step != 1 or len(d[dim]) != 1 or d[dim][0][0] is None:
            raise _FreezeSignal("slice along a dimension that carries units")
        sizes = [x for x in (start, end - start, s[dim] - end) if x > 0]
        pieces = self.seg_cls(d[dim][0][0], sizes, node.name)
        piece = pieces[0 if start == 0 else 1]
        out = list(d)
        out[dim] = ((piece, end - start),)
        return self.norm_lay(out)

    def op_narrow(self, node):
        src, dim, start, length = node.args[:4]
        node.args = (src, dim, start, start + length)
        return self.op_slice(node)

    def split_like(self, node):
        src = node.args[0]
        d = self.dims(src)
        vals = node.meta["val"]
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        dim = dim % len(d)
        sizes = [int(v.shape[dim]) for v in vals]
        if d[dim] is None:
            return [self.norm_lay(d)] * len(vals)
        if len(d[dim]) != 1 or d[dim][0][0] is None:
            raise _FreezeSignal("split along a dimension with structured units")
        pieces = self.seg_cls(d[dim][0][0], sizes, node.name)
        outs = []
        for p, n in zip(pieces, sizes):
            o = list(d)
            o[dim] = ((p, n),)
            outs.append(self.norm_lay(o))
        return outs

    op_split = split_like
    op_split_with_sizes = split_like
    op_chunk = split_like
    op_tensor_split = split_like
    op_unsafe_split = split_like

    def op_cat(self, node):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shapes = [_meta_shape(t) for t in tensors]
        keep = [(t, s) for t, s in zip(tensors, shapes) if s != (0,)]
        nd = len(_meta_shape(node))
        dim = dim % nd
        ds = [self.dims(t) for t, _ in keep]
        out: List[Dim] = [None] * nd
        for k in range(nd):
            if k == dim:
                continue
            col = [x[k] for x in ds]
            for x in col[1:]:
                self.unify(col[0], x, node.name)
            out[k] = next((x for x in col if x is not None), None)
        along = [x[dim] for x in ds]
        if any(x is not None for x in along):
            if any(x is None for x in along):
                for x in along:
                    self.freeze(x, f"concatenated with entries that are not permuted ({node.name})")
            else:
                kids = [self.composite(x) for x in along]
                c = self.new(sum(s[dim] for _, s in keep), "")
                self.struct[c] = ("seg", kids)
                out[dim] = ((c, sum(s[dim] for _, s in keep)),)
        return self.norm_lay(out)

    op_concat = op_cat
    op_concatenate = op_cat

    def op_stack(self, node):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        nd = len(_meta_shape(node))
        dim = dim % nd
        ds = [self.dims(t) for t in tensors]
        out = []
        for k in range(nd - 1):
            col = [x[k] for x in ds]
            for x in col[1:]:
                self.unify(col[0], x, node.name)
            out.append(next((x for x in col if x is not None), None))
        out.insert(dim, None)
        return self.norm_lay(out)

    def op_max(self, node):
        if len(node.args) < 2:
            return None
        src, dim = node.args[:2]
        d = self.dims(src)
        dim = dim % len(d)
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        self.freeze(d[dim], "max with indices over units")
        out = [(None if i == dim else x) for i, x in enumerate(d) if keep or i != dim]
        lay = self.norm_lay(out)
        return [lay, lay]

    op_min = op_max

    def op_constant_pad_nd(self, node):
        src, pad = node.args[:2]
        d = self.dims(src)
        k = len(pad) // 2
        for i in range(k):
            if pad[2 * i] or pad[2 * i + 1]:
                self.freeze(d[len(d) - 1 - i], f"padding along a dimension that carries units ({node.name})")
                d[len(d) - 1 - i] = None
        return self.norm_lay(d)

    op_pad = op_constant_pad_nd

    def op_index(self, node):
        """``x[i0, i1, ...]`` with index tensors: the indexed dims (which must not carry units) are replaced by the
        indices' broadcast shape; the other dims keep their units."""
        src, idx = node.args[:2]
        d = self.dims(src)
        pos = [i for i, t in enumerate(idx) if t is not None]
        for i in pos:
            if d[i] is not None:
                raise _FreezeSignal("indexing along a dimension that carries units")
            if isinstance(idx[i], fx.Node) and self.L(idx[i]) not in (None, _UNIFORM):
                raise _FreezeSignal("index tensors that carry units")
        if pos != list(range(pos[0], pos[-1] + 1)):
            raise _FreezeSignal("non-adjacent index tensors")
        out_shape = _meta_shape(node)
        rest_before, rest_after = d[:pos[0]], d[pos[-1] + 1:]
        mid = len(out_shape) - len(rest_before) - len(rest_after)
        return self.norm_lay(rest_before + [None] * mid + rest_after)

    def op_index_select(self, node):
        src, dim = node.args[:2]
        d = self.dims(src)
        dim = dim % len(d)
        if d[dim] is not None:
            raise _FreezeSignal("index_select along a dimension that carries units")
        return self.norm_lay(d)

    def op_scaled_dot_product_attention(self, node):
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        dq, dk, dv = self.dims(q), self.dims(k), self.dims(v)
        sq, sk = _meta_shape(q), _meta_shape(k)
        self.unify(dq[-1], dk[-1], node.name)
        self.unify(dk[-2], dv[-2], node.name)
        if isinstance(mask, fx.Node) and self.L(mask) not in (None, _UNIFORM):
            raise _FreezeSignal("attention mask that carries units")
        heads = dq[-3] if len(dq) >= 3 else None
        if len(dq) >= 3:
            hq, hk = sq[-3], sk[-3]
            if hq == hk:
                self.unify(dq[-3], dk[-3], node.name)
                self.unify(dk[-3], dv[-3], node.name)
            elif hk and hq % hk == 0:  # GQA: query head h uses key/value head h // (hq // hk)
                if dq[-3] is not None:
                    outer, _inner = self.regroup([dq[-3]], [hq], [hk, hq // hk], node.name) or (None, None)
                else:
                    outer = None
                self.unify(outer, dk[-3], node.name)
                self.unify(dk[-3], dv[-3], node.name)
            for i in range(len(dq) - 3):
                if sq[i] == sk[i]:
                    self.unify(dq[i], dk[i], node.name)
                    self.unify(dk[i], dv[i], node.name)
        out = dq[:-1] + [dv[-1]]
        if len(dq) >= 3:
            out[-3] = heads
        lay = self.norm_lay(out)
        return lay

    def rnn(self, node, kind: str):
        x, hx, params, has_biases, num_layers, _drop, _train, bidir, batch_first = node.args[:9]
        gates = _RNN_GATES[kind]
        dirs = 2 if bidir else 1
        per = 4 if has_biases else 2
        if len(params) != per * num_layers * dirs:
            raise _FreezeSignal(f"{kind} with projections is not understood")
        hxs = hx if isinstance(hx, (list, tuple)) else [hx]
        if any(self.L(h) not in (None, _UNIFORM) for h in hxs if isinstance(h, fx.Node)):
            raise _FreezeSignal(f"{kind} with initial states that carry units")
        hidden = _meta_shape(params[1])[1]
        d_in = self.dims(x)[-1]
        self.site(x, -1, f"input of {kind} ({node.name})")
        states: List[Lay] = []
        for layer in range(num_layers):
            outs = []
            for k in range(dirs):
                base = (layer * dirs + k) * per
                w_ih, w_hh = params[base], params[base + 1]
                h = self.new(hidden, f"{w_hh.target.rsplit('.', 1)[0]}.{w_hh.target.rsplit('.', 1)[1]}"
                             if w_hh.op == "get_attr" else kind)
                self.order.setdefault(h, self.step)
                self.unify(d_in, self.dims(w_ih)[1], node.name)
                self.unify(((h, hidden),), self.dims(w_hh)[1], node.name)
                for p in params[base: base + per]:  # rows of every weight and bias: gates x hidden units
                    dp = self.dims(p)[0]
                    if dp is None:
                        continue
                    g, hh = self.regroup([dp], [gates * hidden], [gates, hidden], node.name) if gates > 1 \
                        else (None, dp)
                    if g is not None:
                        self.freeze(g, f"{kind} gates are never permuted")
                    self.unify(hh, ((h, hidden),), node.name)
                outs.append(h)
                states.append(self.norm_lay([None, ((h, hidden),)]))
            if dirs == 1:
                d_in = ((outs[0], hidden),)
            else:
                c = self.new(2 * hidden, "")
                self.struct[c] = ("seg", outs)
                d_in = ((c, 2 * hidden),)
        nd = len(_meta_shape(x))
        out = self.norm_lay([None] * (nd - 1) + [d_in])
        if len(states) == 1:
            hn = self.norm_lay([None] + list(states[0]))
        else:
            mix = self.new(hidden, f"{kind} stacked states")
            self.freeze_cls(mix, f"{kind} states of several layers stacked in one tensor")
            hn = self.norm_lay([None, None, ((mix, hidden),)])
        n_out = len(node.meta["val"])
        result = [out] + [hn] * (n_out - 1)
        for i in range(1, n_out):
            self.indexed_src[(node.name, i)] = states
        return result

    def op_lstm(self, node):
        return self.rnn(node, "lstm")

    def op_gru(self, node):
        return self.rnn(node, "gru")

    def op_rnn_tanh(self, node):
        return self.rnn(node, "rnn_tanh")

    def op_rnn_relu(self, node):
        return self.rnn(node, "rnn_relu")


def _emit(d: _Deriver, state: Mapping[str, torch.Tensor], aliases: Mapping[str, List[str]]) -> Tuple[List[Group], List[int]]:
    """Turn the classes into groups: axes and sites pushed down through segment structures; factor structures
    become structured groups whose factors are keyed by their classes."""
    frozen: Dict[int, str] = {}
    for c, why in d.frozen.items():
        r = d.find(c)
        if why == OUTPUT_REASON or r not in frozen:
            frozen[r] = why
    activated = {d.find(c) for c in d.activated}
    todo = list(activated)
    while todo:  # the parts of an activated class (segments, factors) are activated too
        st = d.struct.get(todo.pop())
        for k in (st[1] if st else ()):
            k = k[0] if isinstance(k, tuple) else k
            if k is not None and d.find(k) not in activated:
                activated.add(d.find(k))
                todo.append(d.find(k))

    def push(c: int, offset: int, block: int, reason: str, depth: int = 0):
        r = d.find(c)
        reason = reason or frozen.get(r, "")
        s = d.struct.get(r)
        if s is None or depth > 32:
            return [(("plain", r), offset, block, reason, d.units[r])]
        if s[0] == "seg":
            out, off = [], offset
            for k in s[1]:
                out += push(k, off, block, reason, depth + 1)
                off += d.units[d.find(k)] * block
            return out
        flat = d.flat_fac(s[1])
        while flat and flat[-1][0] is None:
            block *= flat[-1][1]
            flat = flat[:-1]
        if not flat:
            return []
        if len(flat) == 1:
            return push(flat[0][0], offset, block, reason, depth + 1)
        return [(("fac", tuple(flat)), offset, block, reason, math.prod(n for _, n in flat))]

    best: Dict[int, Tuple[int, str]] = {}
    for c, h in d.hint.items():
        if h:
            r = d.find(c)
            o = d.order.get(c, 1 << 60)
            if r not in best or o < best[r][0]:
                best[r] = (o, h)
    groups: Dict[Any, Dict[str, Any]] = {}
    for c, kind, payload in d.items:
        live = d.find(c) in activated or c in d.activated
        for target, off, block, reason, units in push(c, 0, 1, ""):
            g = groups.setdefault(target, {"axes": [], "sites": [], "psites": [], "reason": "", "live": False,
                                           "units": units, "order": 1 << 60, "name": ""})
            if target[0] == "plain":
                g["live"] |= target[1] in activated
                g["order"] = min(g["order"], d.order.get(target[1], 1 << 60))
                g["name"] = g["name"] or best.get(target[1], (0, ""))[1]
            else:
                if target[0] == "fac":
                    g["live"] |= any(k in activated for k, _ in target[1] if k is not None)
                    g["order"] = min([g["order"]] + [d.order.get(k, 1 << 60) for k, _ in target[1] if k is not None])
                else:
                    g["live"] |= live
            g["live"] |= live
            g["reason"] = g["reason"] or reason
            if kind == "axis":
                name, ax = payload
                if not g["name"] and target[0] != "plain":
                    g["name"] = d.hint.get(c, name)
                for t in [name] + list(aliases.get(name, [])):
                    if t in state:
                        g["axes"].append(AxisSlice(t, ax, off, units, block))
            else:
                node, dim, text = payload
                g["sites" if kind == "site" else "psites"].append(Site(node, dim, off, units, block, text))
    out: List[Tuple[int, Group, int]] = []
    for target, g in groups.items():
        if not g["live"] or not g["axes"]:
            continue
        axes = sorted(set(g["axes"]), key=lambda a: (a.tensor, a.axis, a.offset))
        reason = g["reason"]
        factors: Tuple[Factor, ...] = ()
        if target[0] == "fac":
            factors = tuple(
                Factor("", n, "fixed by the layout") if k is None else Factor(
                    f"{best.get(k, (0, 'u'))[1]}#{k}", n, frozen.get(k, "") or ("cut into segments inside a factor (e.g. rotary halves)"
                                                      if d.struct.get(k) is not None else ""))
                for k, n in target[1])
            if not reason and not any(f.units > 1 and not f.fixed for f in factors):
                reason = "every factor is fixed: " + "; ".join(sorted({f.fixed for f in factors if f.fixed}))
        elif target[0] == "bad":
            reason = reason or "unsupported unit structure"
        else:
            factors = (Factor(f"{best.get(target[1], (0, 'u'))[1]}#{target[1]}", g["units"]),)
        for a in axes:
            t = state[a.tensor]
            if a.axis >= t.dim() or a.offset + a.units * a.block > t.shape[a.axis]:
                reason = reason or f"axis slice {a} does not fit tensor of shape {tuple(t.shape)}"
        sites, seen = [], set()
        for s in g["sites"] or g["psites"]:
            if (s.node, s.dim, s.offset) not in seen:
                seen.add((s.node, s.dim, s.offset))
                sites.append(s)
        name = g["name"] or axes[0].tensor
        weight = sum(state[a.tensor].numel() // max(state[a.tensor].shape[a.axis], 1) * a.units * a.block
                     for a in axes if a.axis < state[a.tensor].dim())
        out.append((g["order"], Group(size=g["units"], axes=tuple(axes), sites=tuple(sites), name=name,
                                      frozen=reason, factors=factors), weight))
    out.sort(key=lambda t: t[0])
    groups_ = [g for _, g, _ in out]
    weights = [w for _, _, w in out]
    return _freeze_overlaps(groups_), weights


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


def compose(group: Group, key_perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The permutation of a group's units given one permutation per factor key (missing or fixed: identity).

    A key's permutation is a ``[units]`` tensor, or ``[blocks, units]`` for a per-block factor (row ``b`` applies
    inside the block at new position ``b`` of the factors before it).
    """
    factors = group.effective_factors()
    sizes = [f.units for f in factors]
    n = math.prod(sizes)
    new = torch.arange(n)
    old = torch.zeros(n, dtype=torch.long)
    inner = n
    for f in factors:
        inner //= f.units
        digit = (new // inner) % f.units
        p = key_perms.get(f.key) if (f.key and not f.fixed) else None
        if p is None:
            moved = digit
        else:
            p = torch.as_tensor(p, dtype=torch.long)
            if p.dim() == 2:
                row = new // math.prod(sizes[f.block_factors:]) if f.block_factors else new // (inner * f.units)
                moved = p[row, digit]
            else:
                moved = p[digit]
        old = old * f.units + moved
    return old


def _key_shapes(spec: PermutationSpec, groups: Sequence[int]) -> Dict[str, Tuple[int, int]]:
    """key -> (blocks, units): blocks > 0 for a per-block factor, 0 for one permutation shared by all blocks."""
    shapes: Dict[str, Tuple[int, int]] = {}
    for gi in groups:
        fs = spec.groups[gi].effective_factors()
        for i, f in enumerate(fs):
            if f.key and not f.fixed and f.units > 1:
                lead = math.prod(h.units for h in fs[:f.block_factors or i])
                shapes[f.key] = (lead if f.per_block else 0, f.units)
    return shapes


def _random_key_perms(shapes: Mapping[str, Tuple[int, int]], gen: Optional[torch.Generator],
                      avoid_identity: bool = False) -> Dict[str, torch.Tensor]:
    out = {}
    for k, (blocks, n) in shapes.items():
        rows = [torch.randperm(n, generator=gen) for _ in range(max(blocks, 1))]
        if avoid_identity and n > 1 and bool((rows[0] == torch.arange(n)).all()):
            rows[0] = torch.roll(rows[0], 1)
        out[k] = torch.stack(rows) if blocks else rows[0]
    return out


def random_perms(spec: PermutationSpec, generator: Optional[torch.Generator] = None) -> Dict[int, torch.Tensor]:
    """A random permutation for every permutable group; groups sharing a factor share its permutation."""
    keys = _random_key_perms(_key_shapes(spec, spec.permutable), generator)
    return {i: compose(spec.groups[i], keys) for i in spec.permutable}


def _mark_per_block(groups: List[Group]) -> List[Group]:
    """Let the innermost factor vary per block of the leading factors that every group holding its key puts
    before it (q and k rows: heads; GQA: the key/value heads); one permutation serves every block elsewhere."""
    prefixes: Dict[str, List[Optional[tuple]]] = {}
    for g in groups:
        fs = g.effective_factors()
        for i, f in enumerate(fs):
            if f.key:
                last = i == len(fs) - 1 and len(fs) > 1
                prefixes.setdefault(f.key, []).append(tuple((h.key, h.units) for h in fs[:i]) if last else None)
    lead: Dict[str, int] = {}
    for k, pres in prefixes.items():
        if any(p is None for p in pres):
            continue
        n = 0
        while all(len(p) > n and p[n] == pres[0][n] and p[n][0] for p in pres):
            n += 1
        if n and math.prod(u for _, u in pres[0][:n]) > 1:
            lead[k] = n
    return [replace(g, factors=tuple(replace(f, per_block=True, block_factors=lead[f.key])
                                     if i == len(g.factors) - 1 and f.key in lead else f
                                     for i, f in enumerate(g.factors))) if g.structured else g for g in groups]


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
    return torch.cat([t.reshape(-1) for t in output_tensors(model(x))])


class _Tester:
    """Runs a jittered float64 copy of the model with given group permutations applied in place."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, example_input: torch.Tensor, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        # On a CPU copy whatever the model's device: float64 everywhere, and the test's RNG and indices are CPU ones.
        base = copy.deepcopy(model).cpu().eval()
        _jitter(base, self.gen)
        x = example_input.cpu()
        try:
            base64 = copy.deepcopy(base).double()
            xd = x.double() if x.is_floating_point() else x
            y = _run(base64, xd)
            base, x = base64, xd
        except Exception:  # a model that cannot run in float64 is tested in its own precision
            y = _run(base, x)
        self.base, self.x, self.y = base, x, y
        self.state = base.state_dict(keep_vars=True)
        self.scale = float(y.abs().max()) or 1.0

    def key_perms(self, shapes: Mapping[str, Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        return _random_key_perms(shapes, self.gen, avoid_identity=True)

    @torch.no_grad()
    def error(self, spec: PermutationSpec, perms: Mapping[int, torch.Tensor]) -> float:
        # permute the groups' tensors in place, run, restore: far cheaper than reloading the whole model
        saved = {}
        done = set()
        for (name, axis), idx in _axis_indices(self.state, spec, perms).items():
            t = self.state[name].data
            if (t.data_ptr(), axis) in done:  # a tied tensor: one storage under several names, permuted once
                continue
            done.add((t.data_ptr(), axis))
            saved.setdefault(name, t.clone())
            t.copy_(t.index_select(axis, idx))
        try:
            return float((_run(self.base, self.x) - self.y).abs().max()) / self.scale
        finally:
            for name, t in saved.items():
                self.state[name].data.copy_(t)


@torch.no_grad()
def check_invariance(
    model: nn.Module, spec: PermutationSpec, example_input: torch.Tensor, groups: Optional[Sequence[int]] = None,
    seed: int = 0,
) -> Dict[int, float]:
    """Relative output change when each bundle of groups (groups sharing a factor) is randomly permuted.

    Runs in eval mode on a jittered copy, in float64 when the model allows it, so the figure measures structure,
    not rounding. Groups that share a factor key (heads of Q, K, V, O) are permuted together, with one random
    permutation per factor; every group of a bundle gets the bundle's figure.

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
    tester = _Tester(model, example_input, seed)
    wanted = set(spec.permutable if groups is None else groups)
    errors: Dict[int, float] = {}
    done: set = set()
    bundles = spec.bundles()
    for gi in (spec.permutable if groups is None else groups):
        if gi in done:
            continue
        bundle = next((b for b in bundles if gi in b), [gi])
        keys = tester.key_perms(_key_shapes(spec, bundle))
        perms = {i: compose(spec.groups[i], keys) for i in bundle}
        e = tester.error(spec, perms)
        for i in bundle:
            if i in wanted:
                errors[i] = e
            done.add(i)
    return errors


@torch.no_grad()
def _self_test(model: nn.Module, spec: PermutationSpec, x: torch.Tensor, notes: List[str]) -> PermutationSpec:
    """Freeze what fails the invariance test: a failing factor of a structured bundle is fixed (identity), a
    failing bundle of plain groups is frozen."""
    tester = _Tester(model, x, 0)
    groups = list(spec.groups)
    for bundle in spec.bundles():
        sizes = _key_shapes(spec, bundle)
        keys = tester.key_perms(sizes)
        e = tester.error(spec, {i: compose(groups[i], keys) for i in bundle})
        if e <= INVARIANCE_TOL:
            continue
        if any(b for b, _ in sizes.values()):  # per-block factors failed: one permutation for all blocks
            for i in bundle:
                groups[i] = replace(groups[i], factors=tuple(replace(f, per_block=False) for f in groups[i].factors))
            spec = PermutationSpec(tuple(groups), spec.warnings, spec.weights)
            sizes = _key_shapes(spec, bundle)
            keys = tester.key_perms(sizes)
            e = tester.error(spec, {i: compose(groups[i], keys) for i in bundle})
            if e <= INVARIANCE_TOL:
                continue
        bad_keys: Dict[str, float] = {}
        if len(sizes) > 1:
            for k in sizes:
                ek = tester.error(spec, {i: compose(groups[i], {k: keys[k]}) for i in bundle})
                if not ek <= INVARIANCE_TOL:
                    bad_keys[k] = ek
            if bad_keys and len(bad_keys) < len(sizes):
                for i in bundle:
                    g = groups[i]
                    groups[i] = replace(g, factors=tuple(
                        replace(f, fixed=f"failed the invariance self-test (relative change {bad_keys[f.key]:.2e})")
                        if f.key in bad_keys else f for f in g.factors))
                trial = PermutationSpec(tuple(groups), spec.warnings, spec.weights)
                rest = {k: p for k, p in keys.items() if k not in bad_keys}
                e = tester.error(trial, {i: compose(groups[i], rest) for i in bundle})
                names = ", ".join(sorted({groups[i].name for i in bundle}))
                notes.append(f"groups [{names}]: {len(bad_keys)} unit factor(s) failed the invariance self-test "
                             f"and stay in place")
                if e <= INVARIANCE_TOL:
                    continue
        for i in bundle:
            groups[i] = replace(groups[i], frozen=f"failed the invariance self-test (relative change {e:.2e})")
            notes.append(f"group {i} [{groups[i].name}] failed the invariance self-test ({e:.2e}); frozen")
    out = PermutationSpec(tuple(groups), spec.warnings, spec.weights)
    return _fix_shared_factors(out)


def _fix_shared_factors(spec: PermutationSpec) -> PermutationSpec:
    """A factor shared with a frozen group cannot move anywhere: it becomes fixed in every group."""
    stuck = {f.key: g.frozen for g in spec.groups if g.frozen for f in g.factors if f.key and not f.fixed}
    if not stuck:
        return spec
    groups = []
    for g in spec.groups:
        if not g.frozen and any(f.key in stuck for f in g.factors):
            g = replace(g, factors=tuple(replace(f, fixed=f"shared with a frozen group ({stuck[f.key]})")
                                         if f.key in stuck and not f.fixed else f for f in g.factors))
            if not g.permutable and g.size > 1:
                g = replace(g, frozen="every factor is shared with a frozen group")
        groups.append(g)
    return PermutationSpec(tuple(groups), spec.warnings, spec.weights)


# -------------------------------------------------------------------------------------------------- derive
def _aliases(model: nn.Module) -> Dict[str, List[str]]:
    """Tied tensors: the state-dict names that share storage with the name the trace uses."""
    seen: Dict[Tuple[int, Tuple[int, ...]], str] = {}
    out: Dict[str, List[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            out.setdefault(seen[key], []).append(name)
        else:
            seen[key] = name
    return out


def derive(model: nn.Module, example_input: torch.Tensor, self_test: bool = True) -> PermutationSpec:
    """Derive the permutation groups of ``model`` from what it computes on ``example_input``.

    Parameters
    ----------
    model : any nn.Module whose forward takes one tensor (it is not modified: tracing runs on a copy in eval mode).
        Its result may be a tensor, a tuple/list/dict of tensors or a Hugging Face ``ModelOutput`` (its logits).
    example_input : a batch the model accepts (only its shape and dtype matter; 2 samples are plenty).
    self_test : run the invariance self-test and freeze every group (or unit factor) whose permutation changes the
        outputs by more than :data:`INVARIANCE_TOL` (relative).

    Returns
    -------
    The :class:`PermutationSpec`. Problems never raise: what is not understood is frozen, with a warning, and
    :meth:`PermutationSpec.coverage` reports it.
    """
    work = copy.deepcopy(model).eval()
    state = work.state_dict()
    try:
        gm = trace(work, example_input)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"cannot trace {type(model).__name__} ({type(e).__name__}: {first}); nothing is permuted"
        warnings.warn(msg, stacklevel=2)
        return PermutationSpec(groups=(), warnings=(msg,), failed=f"cannot trace ({type(e).__name__}: {first})",
                               parameters=sum(p.numel() for p in model.parameters()))
    params = dict(work.named_parameters())
    params.update({n: b for n, b in work.named_buffers() if b.is_floating_point() and n in state})
    d = _Deriver(gm, state, params)
    d.run()
    groups, weights = _emit(d, state, _aliases(work))
    notes = list(dict.fromkeys(d.notes))
    spec = _fix_shared_factors(PermutationSpec(groups=tuple(_mark_per_block(groups)), warnings=(),
                                               weights=tuple(weights)))
    if self_test and spec.permutable:
        spec = _self_test(model, spec, example_input, notes)
    spec = PermutationSpec(spec.groups, tuple(dict.fromkeys(notes)), spec.weights)
    for n in spec.warnings:
        warnings.warn(f"dimat.merge.structure: {n}", stacklevel=2)
    return spec
