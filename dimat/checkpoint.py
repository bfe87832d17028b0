"""Per-agent checkpoints ``checkpoints/agent-K.pt``, written atomically and durably at the end of every round.

A checkpoint holds the last completed round (-1 after pretraining), the model's state, the optimizer's state
(when it is kept across rounds) and the agent's RNG state. The previous round's file is kept as
``agent-K.prev.pt`` so that an interruption while the agents' files are being replaced one by one still leaves a
round that every agent has completed: :func:`resume_round` finds it.

Atomic and durable: the state is written to a temporary file in the same folder, flushed and fsynced, renamed over
``agent-K.pt`` (after the old one became ``.prev``), and the folder is fsynced, so after a crash or power loss
the file is either the old checkpoint or the new one, whole. A checkpoint that exists but cannot be read
(truncated, damaged, not a checkpoint) is never skipped silently: it is logged as a warning naming the file, and
when an agent has no readable checkpoint left, :func:`resume_round` raises :class:`CheckpointError` naming them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from dimat.errors import UserError

__all__ = ["save", "load", "resume_round", "path_for", "CheckpointError"]

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint file exists but cannot be read (the message names it and says why)."""


def path_for(ckpt_dir: str | Path, rank: int, prev: bool = False) -> Path:
    return Path(ckpt_dir) / (f"agent-{rank}.prev.pt" if prev else f"agent-{rank}.pt")


def save(ckpt_dir: str | Path, rank: int, state: Dict[str, Any]) -> None:
    """Atomically write agent ``rank``'s checkpoint ``state`` (must hold ``"round"``); the old one becomes ``.prev``."""
    cur = path_for(ckpt_dir, rank)
    cur.parent.mkdir(parents=True, exist_ok=True)
    tmp = cur.with_name(f".{cur.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if cur.exists():
            os.replace(cur, path_for(ckpt_dir, rank, prev=True))
        os.replace(tmp, cur)
    finally:
        if tmp.exists():  # torch.save or the disk failed: leave no half-written file behind
            tmp.unlink()
    _fsync_dir(cur.parent)  # the renames themselves survive a crash only once the folder is synced


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> Dict[str, Any]:
    """The checkpoint in ``path``; CheckpointError naming the file when it cannot be read or is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {detail}); truncated or "
                              f"damaged?") from None
    if not isinstance(state, dict) or not isinstance(state.get("round"), int):
        raise CheckpointError(f"{path}: not a dimat checkpoint (no integer 'round')")
    return state


def _available(ckpt_dir: str | Path, rank: int) -> Tuple[Dict[int, Path], List[str]]:
    """Agent ``rank``'s readable checkpoints by round, and why each unreadable one is (logged as a warning)."""
    out, damaged = {}, []
    for prev in (True, False):
        p = path_for(ckpt_dir, rank, prev)
        if p.exists():
            try:
                out[_read(p)["round"]] = p
            except CheckpointError as e:
                log.warning("%s; ignoring it", e)
                damaged.append(str(e))
    return out, damaged


def resume_round(ckpt_dir: str | Path, ranks: Iterable[int]) -> Optional[int]:
    """The latest round that every agent in ``ranks`` has a checkpoint of (None when there is none).

    An unreadable file is logged as a warning by name and ignored when the other file of that agent is readable.
    Raises CheckpointError when an agent has checkpoint files but none of them is readable.
    """
    common: Optional[set] = None
    for k in ranks:
        found, damaged = _available(ckpt_dir, k)
        if damaged and not found:
            raise CheckpointError(f"agent {k} has no readable checkpoint: " + "; ".join(damaged))
        rounds = set(found)
        common = rounds if common is None else common & rounds
    return max(common) if common else None


def load(ckpt_dir: str | Path, rank: int, round: int) -> Dict[str, Any]:
    """Agent ``rank``'s checkpoint of round ``round`` (from ``agent-K.pt`` or ``agent-K.prev.pt``)."""
    found, damaged = _available(ckpt_dir, rank)
    if round not in found:
        why = f" ({'; '.join(damaged)})" if damaged else ""
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint of round {round} for agent {rank}{why}")
    return _read(found[round])
