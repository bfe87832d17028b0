"""Streaming activation statistics at the permutation groups' activation sites (the DIMAT matching signal).

For the agent's model M_0 and each neighbour M_j, one eval-mode forward pass per batch records every site of
every group at once (a torch.fx copy of the graph that returns the site values). Per neighbour, per group and per
site we keep float64 running means, variances and the C x C cross-covariance between M_0's and M_j's units,
merged batch by batch with Chan's parallel formulas (each batch is centred on its own mean first, so no
catastrophic cancellation). Memory is O(k * C^2) per group; the joint kC x kC matrix is never built.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from dimat.merge.structure import PermutationSpec, Site

__all__ = ["CrossStats", "units_view", "unit_features", "site_module", "collect_correlations", "collect_pair_stats",
           "correlations_from_stats", "pair_sites", "encode_pair_stats", "decode_pair_stats", "pool", "eval_mode"]


class CrossStats:
    """Running mean and variance of two feature sets a, b (C units each) and their cross-covariance.

    Feed it either ``update(a, b)`` with ``[samples, C]`` tensors, or per-batch centred moments with
    :meth:`add_batch`; batches are combined with Chan's parallel formulas in float64. :meth:`correlation`
    returns the C x C Pearson correlation with rows for ``a``'s units, columns for ``b``'s; a unit with zero
    variance (dead) correlates 0 with every unit.
    """

    def __init__(self, units: int):
        self.n = 0
        self.mean_a = torch.zeros(units, dtype=torch.float64)
        self.mean_b = torch.zeros(units, dtype=torch.float64)
        self.m2_a = torch.zeros(units, dtype=torch.float64)
        self.m2_b = torch.zeros(units, dtype=torch.float64)
        self.cross = torch.zeros(units, units, dtype=torch.float64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add a batch of samples ``a``, ``b`` of shape ``[samples, C]``."""
        a, b = a.double(), b.double()
        mu_a, mu_b = a.mean(0), b.mean(0)
        ca, cb = a - mu_a, b - mu_b
        self.add_batch(a.shape[0], mu_a, mu_b, (ca * ca).sum(0), (cb * cb).sum(0), ca.T @ cb)

    def add_batch(self, m: int, mu_a, mu_b, m2_a, m2_b, c_ab) -> None:
        """Add one batch given by its centred moments: sample count, means, sums of squared deviations of a and
        of b, and the sum of outer products of the deviations ``(a - mu_a)(b - mu_b)^T``."""
        if m == 0:
            return
        # accumulate on the CPU in float64 whatever the models' device (some accelerators lack float64)
        mu_a, mu_b, m2_a, m2_b, c_ab = (t.detach().cpu().double() for t in (mu_a, mu_b, m2_a, m2_b, c_ab))
        n = self.n
        tot = n + m
        da, db = mu_a - self.mean_a, mu_b - self.mean_b
        f = n * m / tot
        self.cross += c_ab + f * torch.outer(da, db)
        self.m2_a += m2_a + f * da * da
        self.m2_b += m2_b + f * db * db
        self.mean_a += da * (m / tot)
        self.mean_b += db * (m / tot)
        self.n = tot

    def merge(self, other: "CrossStats") -> "CrossStats":
        """A new CrossStats holding both ``self``'s and ``other``'s samples (Chan's parallel update): exactly the
        moments of the concatenated data, whatever the split."""
        if other.mean_a.shape != self.mean_a.shape:
            raise ValueError(f"cannot pool statistics of {other.mean_a.numel()} and {self.mean_a.numel()} units")
        out = self.copy()
        out.add_batch(other.n, other.mean_a, other.mean_b, other.m2_a, other.m2_b, other.cross)
        return out

    def transposed(self) -> "CrossStats":
        """The same statistics with the roles of ``a`` and ``b`` swapped (cross-moment transposed)."""
        out = CrossStats(self.mean_a.numel())
        out.n = self.n
        out.mean_a, out.mean_b = self.mean_b.clone(), self.mean_a.clone()
        out.m2_a, out.m2_b = self.m2_b.clone(), self.m2_a.clone()
        out.cross = self.cross.T.clone()
        return out

    def copy(self) -> "CrossStats":
        out = CrossStats(self.mean_a.numel())
        out.n = self.n
        out.mean_a, out.mean_b = self.mean_a.clone(), self.mean_b.clone()
        out.m2_a, out.m2_b, out.cross = self.m2_a.clone(), self.m2_b.clone(), self.cross.clone()
        return out

    def correlation(self) -> torch.Tensor:
        """C x C Pearson correlation (float64); 0 wherever either unit has (numerically) zero variance."""
        n = max(self.n, 1)
        std_a = (self.m2_a / n).clamp_min(0).sqrt()
        std_b = (self.m2_b / n).clamp_min(0).sqrt()
        live_a = std_a > 1e-6 * (float(std_a.max()) + 1e-30)
        live_b = std_b > 1e-6 * (float(std_b.max()) + 1e-30)
        denom = torch.outer(torch.where(live_a, std_a, 1.0), torch.where(live_b, std_b, 1.0))
        corr = ((self.cross / n) / denom).clamp(-1.0, 1.0)
        corr[~live_a, :] = 0.0
        corr[:, ~live_b] = 0.0
        return corr


def _channels_last_rows(value: torch.Tensor, site: Site) -> Optional[torch.Tensor]:
    """For a channels-last N x C x H x W value with units on C: a ``[N*H*W, units]`` view, else None."""
    if value.dim() != 4 or site.dim != 1 or site.block != 1 or value.is_contiguous():
        return None
    if not value.is_contiguous(memory_format=torch.channels_last):
        return None
    rows = value.permute(0, 2, 3, 1).reshape(-1, value.shape[1])  # a view: NHWC is contiguous
    return rows[:, site.offset: site.offset + site.units]


def units_view(value: torch.Tensor, site: Site) -> torch.Tensor:
    """The site's units as a ``[B, units, L]`` tensor (a view when possible): every B x L entry is a sample."""
    rows = _channels_last_rows(value, site)
    if rows is not None:
        return rows.unsqueeze(2)
    shape = value.shape
    lead = 1
    for d in shape[: site.dim]:
        lead *= d
    x = value.reshape(lead, shape[site.dim], -1)
    x = x[:, site.offset: site.offset + site.units * site.block]
    return x.reshape(lead, site.units, -1)


def unit_features(value: torch.Tensor, site: Site) -> torch.Tensor:
    """The site's units as a ``[samples, units]`` matrix: every other dimension (and the block) is a sample."""
    x = units_view(value, site)
    return x.transpose(1, 2).reshape(-1, site.units)


class _BatchMoments:
    """One model's per-unit centred moments at one site for one batch, and the layout for its cross products.

    Each batch is centred on its own mean before any product (float32 products of raw activations would lose the
    variance of units whose mean is large against their spread). Centring is done in place on the recorded site
    value (which nothing else reads; ``owned=False`` makes a copy instead). The layout avoids further copies: a
    ``[B, U, L]`` tensor multiplied with batched matmuls when the ``[B, U, U]`` intermediate is small, a
    ``[samples, U]`` matrix when L is 1, otherwise a ``[U, samples]`` matrix.
    """

    _BMM_LIMIT = 4_000_000  # entries of the [B, U, U] intermediate

    def __init__(self, value: torch.Tensor, site: Site, owned: bool = True):
        x = units_view(value, site)
        if not owned or x.dtype != torch.float32:
            x = x.float().clone() if x.dtype == torch.float32 else x.float()
        b, u, l = x.shape
        self.n = b * l
        if l == 1:  # [samples, U] rows: flat features, or a channels-last map
            x = x[:, :, 0]
            self.mean = x.mean(0)
            self.mode, self.x = "rows", x.sub_(self.mean)
            self.m2 = (self.x * self.x).sum(0)  # the sums of squares alone, not the U x U Gram matrix
        elif b * u * u <= self._BMM_LIMIT:
            self.mean = x.sum(2).sum(0) / self.n
            self.mode, self.x = "bmm", x.sub_(self.mean[None, :, None])
            self.m2 = torch.linalg.vector_norm(self.x, dim=2).square_().sum(0)
        else:
            x = x.transpose(0, 1).reshape(u, -1)
            self.mean = x.mean(1)
            self.mode, self.x = "cols", x.sub_(self.mean[:, None])
            self.m2 = (self.x * self.x).sum(1)

    def cross(self, other: "_BatchMoments") -> torch.Tensor:
        """Sum over samples of the outer products of self's and other's centred units, ``[units, units]``."""
        if self.mode == "rows":
            return self.x.T @ other.x
        if self.mode == "bmm":
            return torch.bmm(self.x, other.x.transpose(1, 2)).sum(0)
        return self.x @ other.x.T


def _moments(values: Sequence[torch.Tensor], sites: Sequence[Site], slot: Dict[str, int]) -> List[_BatchMoments]:
    """Centred moments at every site. The first site reading a storage centres it in place; later sites sharing
    that storage (a flatten view, an Identity, another cat segment) work on a copy."""
    seen: set = set()
    out = []
    for s in sites:
        v = values[slot[s.node]]
        ptr = v.untyped_storage().data_ptr()
        out.append(_BatchMoments(v, s, owned=ptr not in seen))
        seen.add(ptr)
    return out


def site_module(model: nn.Module, graph: fx.Graph, nodes: Sequence[str]) -> fx.GraphModule:
    """A module sharing ``model``'s parameters that returns the values of graph ``nodes`` (a tuple).

    ``graph`` is a torch.fx trace of the same architecture; nodes no site needs are removed, so the forward pass
    stops at the last site.
    """
    g = fx.Graph()
    env: Dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        env[node.name] = g.node_copy(node, lambda n: env[n.name])
    if not nodes:
        raise ValueError("site_module needs at least one node")
    g.output(tuple(env[n] for n in nodes))
    constants = getattr(graph, "dimat_constants", {})
    if constants:  # the model's own tensors (shared, not copied) plus the trace's constants
        root = {n.target: constants[n.target] if n.target in constants else _attr(model, n.target)
                for n in g.nodes if n.op == "get_attr"}
        gm = fx.GraphModule(root, g)
    else:
        gm = fx.GraphModule(model, g)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class eval_mode:
    """Context manager: put modules in eval mode, restoring each submodule's own flag afterwards."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        self.flags: List[Tuple[nn.Module, bool]] = []

    def __enter__(self) -> "eval_mode":
        for m in self.modules:
            self.flags += [(sub, sub.training) for sub in m.modules()]
            m.eval()
        return self

    def __exit__(self, *exc) -> None:
        for sub, flag in self.flags:
            sub.training = flag


GraphSource = Union[fx.Graph, Callable[[torch.Tensor], fx.Graph]]


Sites = List[Tuple[int, Site]]


def pair_sites(spec: PermutationSpec, groups: Sequence[int]) -> Sites:
    """``(group index, site)`` of every activation site of ``groups``, in the order the pair statistics use."""
    return [(gi, s) for gi in groups for s in spec.groups[gi].sites]


@torch.no_grad()
def collect_correlations(
    models: Sequence[nn.Module],
    spec: PermutationSpec,
    graph: GraphSource,
    inputs: Iterable[torch.Tensor],
    groups: Sequence[int],
) -> List[Dict[int, torch.Tensor]]:
    """Per neighbour ``j = 1..k``, per group: the unit correlation between ``models[0]`` and ``models[j]``.

    Each group's correlation is the mean over its activation sites of the per-site Pearson correlations. Groups
    without sites are left out of the result.

    Parameters
    ----------
    models : ``models[0]`` is the basis; the others are the neighbours (none is modified; modes are restored).
    spec : the architecture's groups.
    graph : the graph the sites' node names refer to (:func:`dimat.merge.structure.trace`), or a function giving
        that graph for an input batch (aten graphs have the batch shape built in, so each new shape needs its own).
    inputs : input tensors (already limited to the statistics batches), on the models' device.
    groups : indices of the groups to match.

    Returns
    -------
    A list of length ``len(models) - 1`` of ``{group index: C x C float64 correlation}`` (rows: models[0]'s units).
    """
    sites = pair_sites(spec, groups)
    return [correlations_from_stats(sites, per_site)
            for per_site in collect_pair_stats(models, spec, graph, inputs, groups)]


def correlations_from_stats(sites: Sites, per_site: Sequence[CrossStats]) -> Dict[int, torch.Tensor]:
    """``{group index: C x C correlation}``: per group, the mean over its sites of the sites' Pearson correlations
    (``per_site[k]`` belongs to ``sites[k]``, see :func:`pair_sites`)."""
    corr: Dict[int, torch.Tensor] = {}
    count: Dict[int, int] = {}
    for (gi, _), st in zip(sites, per_site):
        c = st.correlation()
        corr[gi] = corr[gi] + c if gi in corr else c
        count[gi] = count.get(gi, 0) + 1
    return {gi: c / count[gi] for gi, c in corr.items()}


@torch.no_grad()
def collect_pair_stats(
    models: Sequence[nn.Module],
    spec: PermutationSpec,
    graph: GraphSource,
    inputs: Iterable[torch.Tensor],
    groups: Sequence[int],
) -> List[List[CrossStats]]:
    """Per neighbour ``j = 1..k``, per activation site of ``groups`` (in :func:`pair_sites` order): the
    :class:`CrossStats` of ``models[0]``'s units (``a``) and ``models[j]``'s units (``b``) on ``inputs``.

    These are the sufficient statistics of the correlations (:func:`correlations_from_stats`); statistics of the
    same pair gathered on other data pool with :meth:`CrossStats.merge`. Parameters as in
    :func:`collect_correlations`.
    """
    sites = pair_sites(spec, groups)
    if not sites:
        return [[] for _ in models[1:]]
    nodes = list(dict.fromkeys(s.node for _, s in sites))
    slot = {n: i for i, n in enumerate(nodes)}
    mods_by_shape: Dict[tuple, List[fx.GraphModule]] = {}

    def mods_for(x: torch.Tensor) -> List[fx.GraphModule]:
        key = (tuple(x.shape), x.dtype)
        if key not in mods_by_shape:
            g = graph(x) if callable(graph) and not isinstance(graph, fx.Graph) else graph
            have = {n.name for n in g.nodes}
            missing = [n for n in nodes if n not in have]
            if missing:
                raise ValueError(
                    f"activation sites {missing[:3]} are not in the model's graph for inputs of shape "
                    f"{tuple(x.shape)}: the model computes something different for this input shape")
            mods_by_shape[key] = [site_module(m, g, nodes) for m in models]
        return mods_by_shape[key]

    stats = [[CrossStats(s.units) for _, s in sites] for _ in models[1:]]
    with eval_mode(*models):
        for x in inputs:
            mods = mods_for(x)
            for m in mods:
                m.eval()
            site_list = [s for _, s in sites]
            feats0 = _moments(mods[0](x), site_list, slot)
            for j, mod in enumerate(mods[1:]):
                featsj = _moments(mod(x), site_list, slot)
                for f0, fj, st in zip(feats0, featsj, stats[j]):
                    st.add_batch(f0.n, f0.mean, fj.mean, f0.m2, fj.m2, f0.cross(fj))
    return stats


# ------------------------------------------------------------------------------ pair statistics as a message
#: Tensor names of one site's entry in a pair-statistics message (``site{k}.{field}``).
_FIELDS = ("n", "mean_a", "mean_b", "m2_a", "m2_b", "cross")


#: dtype of the moments in a message. float32 halves the bytes; its relative rounding (6e-8) is far below the
#: sampling noise of a few thousand samples. Never a 16-bit float: sums of squares over thousands of samples
#: overflow float16.
WIRE_DTYPE = torch.float32


def encode_pair_stats(per_site: Sequence[CrossStats]) -> Dict[str, torch.Tensor]:
    """One pair's statistics as a flat dict of tensors (a message any transport can carry).

    Per site ``k``: ``site{k}.n`` (int64 scalar, samples), ``site{k}.mean_a`` / ``mean_b`` / ``m2_a`` / ``m2_b``
    (C each) and ``site{k}.cross`` (C x C), in :data:`WIRE_DTYPE`. ``a`` is the sender's model, ``b`` the
    receiver's: the receiver takes :meth:`CrossStats.transposed`. Size: ``4 * (C*C + 4*C) + 8`` bytes per site.
    """
    out: Dict[str, torch.Tensor] = {}
    for k, st in enumerate(per_site):
        out[f"site{k}.n"] = torch.tensor(int(st.n), dtype=torch.int64)
        for f in _FIELDS[1:]:
            out[f"site{k}.{f}"] = getattr(st, f).detach().cpu().to(WIRE_DTYPE).contiguous()
    return out


def decode_pair_stats(msg: Mapping[str, torch.Tensor], units: Sequence[int]) -> List[CrossStats]:
    """The per-site statistics in a message from :func:`encode_pair_stats`, checked against what this model
    expects: exactly one entry per site with ``units[k]`` units, the right dtypes and shapes, ``n >= 1``, finite
    values and non-negative sums of squares. ValueError (naming the first problem) otherwise."""
    if not isinstance(msg, Mapping):
        raise ValueError(f"pair statistics must be a dict of tensors, got {type(msg).__name__}")
    expected = {f"site{k}.{f}" for k in range(len(units)) for f in _FIELDS}
    extra = sorted(set(msg) - expected)
    missing = sorted(expected - set(msg), key=lambda n: (len(n), n))
    if extra or missing:
        raise ValueError(f"pair statistics for {len(units)} sites: "
                         + (f"unexpected entry {extra[0]!r}" if extra else f"entry {missing[0]!r} missing"))
    out: List[CrossStats] = []
    for k, c in enumerate(units):
        st = CrossStats(c)
        n = msg[f"site{k}.n"]
        if not isinstance(n, torch.Tensor) or n.dtype != torch.int64 or n.dim() != 0 or int(n) < 1:
            raise ValueError(f"pair statistics: site{k}.n must be an int64 scalar >= 1, got {n!r}")
        st.n = int(n)
        for f in _FIELDS[1:]:
            t = msg[f"site{k}.{f}"]
            shape = (c, c) if f == "cross" else (c,)
            if not isinstance(t, torch.Tensor) or t.dtype != WIRE_DTYPE or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"pair statistics: site{k}.{f} must be {WIRE_DTYPE} of shape {shape}, got {got}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"pair statistics: site{k}.{f} holds NaN or Inf")
            if f.startswith("m2") and bool((t < 0).any()):
                raise ValueError(f"pair statistics: site{k}.{f} (a sum of squares) has negative entries")
            setattr(st, f, t.detach().cpu().to(torch.float64))
        out.append(st)
    return out


def pool(own: Sequence[CrossStats], theirs: Sequence[CrossStats]) -> List[CrossStats]:
    """Site by site, the pooled statistics of two sides of an edge: ``own`` (this agent's data; ``a`` = this
    agent's model) and ``theirs`` as the neighbour sent them (its data; ``a`` = the neighbour's model), which are
    transposed first. Each side weighs by its own sample count."""
    if len(own) != len(theirs):
        raise ValueError(f"cannot pool statistics of {len(theirs)} sites with {len(own)}")
    return [o.merge(t.transposed()) for o, t in zip(own, theirs)]
