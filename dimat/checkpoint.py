"""Per-agent checkpoints ``checkpoints/agent-K.pt``, written atomically at the end of every round.

A checkpoint holds the last completed round (-1 after pretraining), the model's state, the optimizer's state
(when it is kept across rounds) and the agent's RNG state. The previous round's file is kept as
``agent-K.prev.pt`` so that an interruption while the agents' files are being replaced one by one still leaves a
round that every agent has completed: :func:`resume_round` finds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

__all__ = ["save", "load", "resume_round", "path_for"]


def path_for(ckpt_dir: str | Path, rank: int, prev: bool = False) -> Path:
    return Path(ckpt_dir) / (f"agent-{rank}.prev.pt" if prev else f"agent-{rank}.pt")


def save(ckpt_dir: str | Path, rank: int, state: Dict[str, Any]) -> None:
    """Atomically write agent ``rank``'s checkpoint ``state`` (must hold ``"round"``); the old one becomes ``.prev``."""
    cur = path_for(ckpt_dir, rank)
    cur.parent.mkdir(parents=True, exist_ok=True)
    tmp = cur.with_name(f".{cur.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    if cur.exists():
        os.replace(cur, path_for(ckpt_dir, rank, prev=True))
    os.replace(tmp, cur)


def _round_of(path: Path) -> Optional[int]:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["round"])
    except Exception:  # a missing or unreadable file simply offers no round
        return None


def _available(ckpt_dir: str | Path, rank: int) -> Dict[int, Path]:
    out = {}
    for prev in (True, False):
        p = path_for(ckpt_dir, rank, prev)
        if p.exists():
            r = _round_of(p)
            if r is not None:
                out[r] = p
    return out


def resume_round(ckpt_dir: str | Path, ranks: Iterable[int]) -> Optional[int]:
    """The latest round that every agent in ``ranks`` has a checkpoint of (None when there is none)."""
    common: Optional[set] = None
    for k in ranks:
        rounds = set(_available(ckpt_dir, k))
        common = rounds if common is None else common & rounds
    return max(common) if common else None


def load(ckpt_dir: str | Path, rank: int, round: int) -> Dict[str, Any]:
    """Agent ``rank``'s checkpoint of round ``round`` (from ``agent-K.pt`` or ``agent-K.prev.pt``)."""
    found = _available(ckpt_dir, rank)
    if round not in found:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint of round {round} for agent {rank}")
    return torch.load(found[round], map_location="cpu", weights_only=True)
