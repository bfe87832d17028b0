"""Alignment that knows when not to permute: guards around the linear assignment of one group.

When two models already share a unit order, an assignment on noisy correlations still moves some units, and each
such move only adds noise. Two guards, usable together:

* **identity prior** ``lam``: the assignment maximises ``score + lam * I``, so a unit leaves its place only if the
  correlation it gains elsewhere exceeds ``lam`` (correlations lie in [-1, 1]).
* **keep margin** ``margin``: keep the identity for the whole group unless the mean correlation of the matched
  pairs beats the mean correlation of the diagonal (each unit with the unit in the same place) by more than
  ``margin``.
"""

from __future__ import annotations

from typing import Optional

import torch

from dimat.merge import matching

__all__ = ["guarded_match"]


def guarded_match(score: torch.Tensor, corr: torch.Tensor, identity_prior: float = 0.0,
                  keep_margin: Optional[float] = None) -> torch.Tensor:
    """The permutation of one group (unit i of the basis takes neighbour unit ``perm[i]``).

    Parameters
    ----------
    score : C x C matrix the assignment maximises (the correlation, possibly with a tie-break).
    corr : C x C correlation (basis units x neighbour units), for the keep test.
    identity_prior : lambda added to the diagonal of ``score`` (>= 0; 0: no prior).
    keep_margin : None: no test. Else the identity is kept unless the matched pairs' mean correlation exceeds the
        diagonal's mean by more than this.
    """
    n = score.shape[0]
    if identity_prior:
        score = score + identity_prior * torch.eye(n, dtype=score.dtype, device=score.device)
    perm = matching.match(score)
    if keep_margin is not None:
        ar = torch.arange(n)
        c = corr.detach().cpu().double()
        gain = float(c[ar, perm].mean() - c.diagonal().mean())
        if gain <= keep_margin:
            perm = ar.clone()
    return perm
