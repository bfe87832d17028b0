"""Merge telemetry: how much an alignment changed and how far the merged model is from each participant.

Pure functions over correlations, permutations and state dicts; the round (:class:`dimat.node.Node`) turns them
into per-edge fields of a merge record.
"""

from __future__ import annotations

import math
from typing import Collection, Dict, Mapping, Optional

import torch

__all__ = ["alignment", "units_moved", "distance"]


def alignment(corrs: Mapping[int, torch.Tensor], perms: Mapping[int, torch.Tensor]) -> Dict[str, float]:
    """Mean correlation of the diagonal (before alignment) and of the matched pairs (after), over all units of
    the given groups (each unit counts once), and the share of units that moved.

    ``corrs[g]`` is group g's C x C correlation (basis units x neighbour units), ``perms[g]`` its permutation
    (missing: identity).
    """
    before = after = 0.0
    moved = units = 0
    for g, c in corrs.items():
        c = c.detach().cpu().double()
        n = c.shape[0]
        ar = torch.arange(n)
        p = perms.get(g, ar)
        p = torch.as_tensor(p, dtype=torch.long).cpu()
        before += float(c.diagonal().sum())
        after += float(c[ar, p].sum())
        moved += int((p != ar).sum())
        units += n
    if units == 0:
        return {"corr_before": math.nan, "corr_after": math.nan, "moved": 0.0}
    return {"corr_before": before / units, "corr_after": after / units, "moved": moved / units}


def units_moved(perms: Mapping[int, torch.Tensor], sizes: Mapping[int, int]) -> float:
    """Share of units, over the groups in ``sizes`` (group -> units), whose permutation entry is not the identity."""
    total = sum(sizes.values())
    if total == 0:
        return 0.0
    moved = 0
    for g, n in sizes.items():
        p = perms.get(g)
        if p is not None:
            moved += int((torch.as_tensor(p).cpu() != torch.arange(n)).sum())
    return moved / total


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
             names: Optional[Collection[str]] = None) -> float:
    """Relative L2 distance ``||a - b|| / ||a||`` over the floating-point tensors in ``names`` (None: all)."""
    num = den = 0.0
    for n, t in a.items():
        if not t.is_floating_point() or (names is not None and n not in names):
            continue
        ta = t.detach().double()
        num += float(((ta - b[n].detach().double()) ** 2).sum())
        den += float((ta ** 2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)
