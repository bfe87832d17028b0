"""Matching: the permutation that aligns a neighbour's units to the basis model's, per permutable group.

* :func:`match`: linear assignment on a correlation (or any score) matrix, maximised (scipy).
* :func:`unit_distance`: a tie-break from per-unit 1-D tensors, for units whose correlations tie.
* :func:`match_bundle`: structured groups (heads x dims, GroupNorm blocks x channels, GQA) that share factor
  permutations: inner assignments for every pair of outer blocks first, an assignment of the outer blocks on the
  summed matched scores, then a few sweeps of coordinate ascent over the factors.
* :func:`weight_matching_perms`: Git Re-Basin coordinate descent over the groups on the weights alone.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dimat.merge.structure import AxisSlice, Group, PermutationSpec, compose


def match(corr: torch.Tensor) -> torch.Tensor:
    """The permutation maximising the summed correlation: unit i of the basis takes neighbour unit ``perm[i]``."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.asarray(corr.cpu(), dtype=np.float64), maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


#: weight of the parameter tie-break next to correlations in [-1, 1]: it only decides between units whose
#: correlations tie, e.g. units that never fire on the statistics batches (correlation 0 with everything).
TIE_BREAK = 1e-6


def unit_distance(s0: Dict[str, torch.Tensor], sj: Dict[str, torch.Tensor], group) -> torch.Tensor:
    """Normalised squared distance between units of two models by their per-unit 1-D tensors (biases, BN entries)."""
    cols0, colsj = [], []
    for a in group.axes:
        t0 = s0[a.tensor]
        if t0.dim() != 1 or a.block != 1 or not t0.is_floating_point():
            continue
        v0 = t0[a.offset: a.offset + a.units].detach().cpu().double()
        vj = sj[a.tensor][a.offset: a.offset + a.units].detach().cpu().double()
        scale = float(torch.cat([v0, vj]).std()) + 1e-12
        cols0.append(v0 / scale)
        colsj.append(vj / scale)
    if not cols0:
        return torch.zeros(group.size, group.size, dtype=torch.float64)
    d = torch.cdist(torch.stack(cols0, 1), torch.stack(colsj, 1)) ** 2
    return d / (float(d.max()) + 1e-30)


def _unit_rows(t: torch.Tensor, a: AxisSlice) -> torch.Tensor:
    """The entries of tensor ``t`` owned by each unit of axis slice ``a``, one row per unit (float64)."""
    x = t.movedim(a.axis, 0)[a.offset: a.offset + a.units * a.block]
    return x.reshape(a.units, -1).double()


def _permute_except(t: torch.Tensor, slices, perms: Dict[int, torch.Tensor], skip) -> torch.Tensor:
    """``t`` with the current permutation of every group applied to its axes, except the axis slice ``skip``."""
    for gi, a in slices:
        if a == skip:
            continue
        p = perms[gi]
        idx = torch.arange(t.shape[a.axis])
        idx[a.offset: a.offset + a.units * a.block] = (
            a.offset + p[:, None] * a.block + torch.arange(a.block)[None, :]
        ).reshape(-1)
        t = t.index_select(a.axis, idx)
    return t


def _levels(group: Group) -> List[Tuple[Optional[str], int]]:
    """(key or None when fixed, units) per factor of the group, outermost first."""
    return [(f.key if f.key and not f.fixed and f.units > 1 else None, f.units) for f in group.effective_factors()]


def _marginal(score: torch.Tensor, levels, perms: Dict[str, torch.Tensor], at: int, inner_lsa: bool) -> torch.Tensor:
    """Score of pairing unit a with unit b of factor ``at``: the other factors are paired by their current
    permutations (``inner_lsa``: the factors inside ``at`` are paired by the best assignment per pair instead)."""
    sizes = [n for _, n in levels]
    L = len(sizes)
    t = score.reshape(sizes + sizes)
    for m, (k, n) in enumerate(levels):  # put the neighbour's units of the other factors in matched order
        if m == at or (inner_lsa and m > at):
            continue
        p = perms.get(k) if k is not None else None
        if p is not None:
            t = t.index_select(L + m, p)
    outer = [m for m in range(L) if m != at and not (inner_lsa and m > at)]
    inner = [m for m in range(L) if inner_lsa and m > at]
    # rows (at, inner..., outer...), cols (at, inner..., outer...)
    order = [at] + inner + outer
    t = t.permute(order + [L + m for m in order])
    n_at = sizes[at]
    r_in = int(np.prod([sizes[m] for m in inner])) if inner else 1
    r_out = int(np.prod([sizes[m] for m in outer])) if outer else 1
    t = t.reshape(n_at, r_in, r_out, n_at, r_in, r_out).diagonal(dim1=2, dim2=5).sum(-1)  # [a, i, b, j]
    if r_in == 1:
        return t[:, 0, :, 0]
    from scipy.optimize import linear_sum_assignment

    out = torch.zeros(n_at, n_at, dtype=torch.float64)
    blocks = t.permute(0, 2, 1, 3).cpu().numpy()
    for a in range(n_at):
        for b in range(n_at):
            r, c = linear_sum_assignment(blocks[a, b], maximize=True)
            out[a, b] = float(blocks[a, b][r, c].sum())
    return out


def match_bundle(spec: PermutationSpec, bundle: Sequence[int], scores: Dict[int, torch.Tensor],
                 sweeps: int = 3) -> Dict[str, torch.Tensor]:
    """One permutation per factor key of a bundle of groups, maximising the summed scores of its groups.

    ``scores`` maps group index -> [size x size] score (activation correlation, or ``W_0 W_j^T`` in weight
    matching) between the basis' units (rows) and the neighbour's (columns); groups without a score do not vote.
    Factors are solved outermost first: for a factor with inner factors (heads over head dims), every pair of
    outer units is scored by the best inner assignment between them, and the outer assignment maximises the sum;
    then every factor is re-solved given the others (a few sweeps of coordinate ascent). Returns key -> perm
    (new unit i takes the neighbour's unit ``perm[i]``); compose a group's permutation with
    :func:`dimat.merge.structure.compose`.
    """
    voting = [gi for gi in bundle if gi in scores]
    levels = {gi: _levels(spec.groups[gi]) for gi in voting}
    depth: Dict[str, int] = {}
    sizes: Dict[str, int] = {}
    for gi in voting:
        for m, (k, n) in enumerate(levels[gi]):
            if k is not None:
                depth[k] = min(depth.get(k, m), m)
                sizes[k] = n
    perms: Dict[str, torch.Tensor] = {}
    keys = sorted(depth, key=lambda k: depth[k])
    per_block = {f.key for gi in voting for f in spec.groups[gi].factors
                 if f.per_block and f.key in depth}
    if per_block:
        sweeps = 0  # coordinate ascent below assumes one permutation per factor
    for sweep in range(sweeps + 1):
        changed = False
        for k in keys:
            total = torch.zeros(sizes[k], sizes[k], dtype=torch.float64)
            for gi in voting:
                for m, (kk, _) in enumerate(levels[gi]):
                    if kk == k:
                        total += _marginal(scores[gi].double().cpu(), levels[gi], perms, m, inner_lsa=sweep == 0)
            new = match(total)
            if k not in perms or not torch.equal(new, perms[k]):
                changed = True
            perms[k] = new
        if sweep > 0 and not changed:
            break
    for k in per_block:  # inside every block pair that the outer factors matched, its own assignment
        acc = None
        for gi in voting:
            lv = levels[gi]
            if lv[-1][0] != k:
                continue
            f = spec.groups[gi].effective_factors()[-1]
            bf = f.block_factors or len(lv) - 1
            n = lv[-1][1]

            def old_index(part):
                old = torch.zeros(1, dtype=torch.long)
                for kk, m in part:
                    p = perms.get(kk) if kk is not None else None
                    p = torch.arange(m) if p is None else p
                    old = (old[:, None] * m + p[None, :]).reshape(-1)
                return old

            q_lead, q_mid = old_index(lv[:bf]), old_index(lv[bf:-1])
            bl, bm = q_lead.numel(), q_mid.numel()
            c = scores[gi].double().cpu().reshape(bl, bm, n, bl, bm, n)
            blk = c[torch.arange(bl)[:, None], torch.arange(bm)[None, :], :, q_lead[:, None], q_mid[None, :], :]
            blk = blk.sum(1)  # [lead block, n, n]: summed over the matched middle blocks (GQA query heads)
            acc = blk if acc is None else acc + blk
        perms[k] = torch.stack([match(acc[b]) for b in range(acc.shape[0])])
    return perms


def weight_matching_perms(
    s0: Dict[str, torch.Tensor],
    sj: Dict[str, torch.Tensor],
    spec: PermutationSpec,
    groups: Sequence[int],
    names: set,
    max_sweeps: int = 100,
    seed: int = 0,
) -> Dict[int, torch.Tensor]:
    """Git Re-Basin coordinate descent: per group, assign on sum over its axes of W0 Wj^T until no improvement."""
    slices_of: Dict[str, List[Tuple[int, AxisSlice]]] = {}
    for gi in groups:
        for a in spec.groups[gi].axes:
            if a.tensor in names:
                slices_of.setdefault(a.tensor, []).append((gi, a))
    perms = {gi: torch.arange(spec.groups[gi].size) for gi in groups}
    bundles = [b for b in spec.bundles() if set(b) <= set(groups)]
    bundles += [[gi] for gi in groups if not any(gi in b for b in bundles)]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_sweeps):
        improved = False
        for k in torch.randperm(len(bundles), generator=gen).tolist():
            bundle = bundles[k]
            costs = {}
            for gi in bundle:
                n = spec.groups[gi].size
                cost = torch.zeros(n, n, dtype=torch.float64)
                for a in spec.groups[gi].axes:
                    if a.tensor not in names:
                        continue
                    other = _permute_except(sj[a.tensor], slices_of[a.tensor], perms, a)
                    cost += _unit_rows(s0[a.tensor], a) @ _unit_rows(other, a).T
                costs[gi] = cost
            if len(bundle) == 1 and not spec.groups[bundle[0]].structured:
                new = {bundle[0]: match(costs[bundle[0]])}
            else:
                keyp = match_bundle(spec, bundle, costs)
                new = {gi: compose(spec.groups[gi], keyp) for gi in bundle}
            ar = {gi: torch.arange(spec.groups[gi].size) for gi in bundle}
            gain = sum(float(costs[gi][ar[gi], new[gi]].sum()) for gi in bundle)
            old = sum(float(costs[gi][ar[gi], perms[gi]].sum()) for gi in bundle)
            scale = max(float(costs[gi].abs().max()) for gi in bundle)
            if gain > old + 1e-12 * scale:
                perms.update(new)
                improved = True
        if not improved:
            break
    return perms
