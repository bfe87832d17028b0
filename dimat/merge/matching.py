"""Matching: the permutation that aligns a neighbour's units to the basis model's, per permutable group.

* :func:`match`: linear assignment on a correlation (or any score) matrix, maximised (scipy).
* :func:`unit_distance`: a tie-break from per-unit 1-D tensors, for units whose correlations tie.
* :func:`weight_matching_perms`: Git Re-Basin coordinate descent over the groups on the weights alone.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from dimat.merge.structure import AxisSlice, PermutationSpec


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
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_sweeps):
        improved = False
        for k in torch.randperm(len(groups), generator=gen).tolist():
            gi = groups[k]
            n = spec.groups[gi].size
            cost = torch.zeros(n, n, dtype=torch.float64)
            for a in spec.groups[gi].axes:
                if a.tensor not in names:
                    continue
                other = _permute_except(sj[a.tensor], slices_of[a.tensor], perms, a)
                cost += _unit_rows(s0[a.tensor], a) @ _unit_rows(other, a).T
            new = match(cost)
            ar = torch.arange(n)
            if float(cost[ar, new].sum()) > float(cost[ar, perms[gi]].sum()) + 1e-12 * float(cost.abs().max()):
                perms[gi] = new
                improved = True
        if not improved:
            break
    return perms
