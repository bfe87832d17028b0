"""The DIMAT round loop (post, merge, train, checkpoint) for the agents that live in this process.

:func:`run_round` is the one implementation of a round. The in-process runner calls it with all N agents (inproc
transports); a multi-process agent calls it with a list of one agent (grpc or torch transport). Nothing here
assumes that every agent of the run is local: agents only meet through their :class:`~dimat.node.Node`'s
transport. A round is::

    post every local agent's snapshot of round r
    gather: every local agent collects its neighbours' snapshots (and, with merge.stats both, sends each neighbour
        the statistics of their pair on its own data: the round's second message)
    merge every local agent (Jacobi: the transport cloned the round-r snapshots at post time); evaluate
    unless r is the last round: train E local epochs; evaluate
    checkpoint
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from dimat import checkpoint
from dimat.metrics import MetricsWriter
from dimat.node import MergeResult, Node
from dimat.train import evaluate, train_epochs

__all__ = ["Agent", "run_round", "pretrain", "agent_state", "restore_agent", "restore_latest", "progress_bar"]

Pair = Tuple[torch.Tensor, torch.Tensor]
_PHASE_IDS = {"pretrain": 0, "merge": 1, "train": 2}


@dataclass
class Agent:
    """One agent living in this process.

    Attributes
    ----------
    rank : index in the topology.
    node : merges (holds the model and the transport).
    train : the agent's private training data ``(x, y)``.
    test : the global test set ``(x, y)`` (the headline accuracy).
    local_test : the agent's own test partition ``(x, y)``.
    make_optimizer : ``model -> optimizer``.
    generator : the agent's RNG (data order, augmentation); seeded with ``seed + rank``.
    optimizer : the optimizer kept across rounds (``keep_optimizer_state``), else None.
    last_test_acc : the test accuracy of the agent's latest record (for the accuracy change across a merge).
    """

    rank: int
    node: Node
    train: Pair
    test: Pair
    local_test: Pair
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    generator: torch.Generator
    optimizer: Optional[torch.optim.Optimizer] = None
    last_test_acc: Optional[float] = None

    @property
    def model(self) -> nn.Module:
        return self.node.model


def _seed_phase(seed: int, r: int, rank: int, phase: str) -> None:
    # Anything that draws from torch's global RNG (an operator, a layer) gets a seed fixed by (run, round, agent,
    # phase), so a resumed run draws exactly what an uninterrupted one would.
    state = np.random.SeedSequence([int(seed), r + 1, int(rank), _PHASE_IDS[phase]]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def _evaluate(agent: Agent, eval_batch_size: int) -> Dict[str, float]:
    acc, loss = evaluate(agent.model, *agent.test, batch_size=eval_batch_size)
    local_acc, _ = evaluate(agent.model, *agent.local_test, batch_size=eval_batch_size)
    agent.last_test_acc, before = acc, agent.last_test_acc
    out = {"test_acc": acc, "test_loss": loss, "local_test_acc": local_acc}
    if before is not None:
        out["acc_change"] = acc - before  # since the agent's previous evaluation (for a merge: across it)
    return out


def _train(agent: Agent, epochs: int, cfg: Mapping[str, Any]) -> Tuple[float, float]:
    """Train ``epochs`` local epochs; returns (mean train loss, seconds)."""
    t0 = time.perf_counter()
    opt = agent.optimizer
    if opt is None:
        opt = agent.make_optimizer(agent.model)
        if cfg["train"]["keep_optimizer_state"]:
            agent.optimizer = opt
    loss = train_epochs(agent.model, opt, *agent.train, epochs=epochs, batch_size=cfg["train"]["batch_size"],
                        generator=agent.generator, flip=cfg["data"]["flip"])
    return loss, time.perf_counter() - t0


def _record(agent: Agent, r: int, phase: str, **fields: Any) -> Dict[str, Any]:
    rec: Dict[str, Any] = {"round": r, "agent": agent.rank, "phase": phase, "test_acc": None, "test_loss": None,
                           "local_test_acc": None, "train_loss": None, "train_s": 0.0, "merge_s": 0.0,
                           "comm_s": 0.0, "comm_bytes": 0}
    rec.update(fields)
    return rec


def agent_state(agent: Agent, r: int) -> Dict[str, Any]:
    """What a checkpoint holds after round ``r``: the model, its basis tag, the kept optimizer state and the RNG
    state."""
    return {
        "round": r,
        "model": agent.model.state_dict(),
        "basis_tag": agent.node.basis_tag,
        "optimizer": agent.optimizer.state_dict() if agent.optimizer is not None else None,
        "generator": agent.generator.get_state(),
        "last_test_acc": getattr(agent, "last_test_acc", None),  # a resumed run reports the same acc_change
    }


def restore_agent(agent: Agent, state: Mapping[str, Any]) -> None:
    """Load a checkpoint written by :func:`agent_state` into ``agent`` (model, optimizer, RNG)."""
    agent.model.load_state_dict(state["model"])
    agent.node.basis_tag = int(state.get("basis_tag", agent.rank))  # checkpoints from before tags: own rank
    agent.generator.set_state(state["generator"])
    agent.last_test_acc = state.get("last_test_acc")
    if state.get("optimizer") is not None:
        agent.optimizer = agent.make_optimizer(agent.model)
        agent.optimizer.load_state_dict(state["optimizer"])


def _checkpoint(agents: Sequence[Agent], r: int, ckpt_dir: Optional[Path]) -> None:
    if ckpt_dir is not None:
        for a in agents:
            checkpoint.save(ckpt_dir, a.rank, agent_state(a, r))


def pretrain(agents: Sequence[Agent], cfg: Mapping[str, Any], writer: Optional[MetricsWriter],
             ckpt_dir: Optional[Path] = None, progress: Optional[Callable[[], None]] = None) -> None:
    """``train.pretrain_epochs`` of local training before the first merge (recorded as round -1, "pretrain")."""
    epochs = cfg["train"]["pretrain_epochs"]
    for a in agents:
        _seed_phase(cfg["seed"], -1, a.rank, "pretrain")
        loss, secs = _train(a, epochs, cfg)
        if not cfg["train"]["keep_optimizer_state"]:
            a.optimizer = None
        if writer is not None:
            writer.write(_record(a, -1, "pretrain", **_evaluate(a, cfg["eval"]["batch_size"]), train_loss=loss,
                                 train_s=secs))
        if progress:
            progress()
    _checkpoint(agents, -1, ckpt_dir)


def run_round(
    agents: Sequence[Agent],
    r: int,
    cfg: Mapping[str, Any],
    writer: Optional[MetricsWriter],
    ckpt_dir: Optional[Path] = None,
    progress: Optional[Callable[[], None]] = None,
) -> List[MergeResult]:
    """Run round ``r`` (0-based, of ``cfg["rounds"]``) for the local ``agents``.

    Parameters
    ----------
    agents : the agents of this process (all N in a simulation, one in a multi-process run).
    r : the round.
    cfg : the resolved config (``seed``, ``rounds``, ``train.*``, ``data.flip``, ``eval.batch_size``).
    writer : receives one record per agent and phase, as soon as the phase ends (None: no metrics).
    ckpt_dir : where ``agent-K.pt`` is written at the end of the round (None: no checkpoints).
    progress : called once per agent and phase (for a progress bar).

    Returns
    -------
    Each local agent's :class:`MergeResult`, in the order of ``agents``.
    """
    eval_bs = cfg["eval"]["batch_size"]
    for a in agents:
        a.node.post(r)
    for a in agents:  # every local agent has its neighbours' snapshots (and sent its second message) before any merges
        _seed_phase(cfg["seed"], r, a.rank, "merge")
        a.node.gather(r)
    results = []
    for a in agents:
        _seed_phase(cfg["seed"], r, a.rank, "merge")
        tag = a.node.basis_tag
        res = a.node.merge_round(r)
        results.append(res)
        if a.node.basis_tag != tag and a.optimizer is not None:
            # The merge loaded the model in another agent's unit order (basis shared): a kept optimizer state is
            # in the old order, so this agent trains the round with a fresh optimizer. A tag changes at most
            # a few times per run (it only decreases).
            a.optimizer = None
        if writer is not None:
            extra = {}
            if a.node.stats == "both":  # the second message: its bytes (in comm_bytes too), and the edges without it
                extra = {"stats_bytes": res.stats_bytes, "stats_both": res.stats_both,
                         "stats_fallback": sorted(res.stats_fallback), "stats_unused": res.stats_unused}
            writer.write(_record(a, r, "merge", **_evaluate(a, eval_bs), merge_s=res.merge_s, comm_s=res.comm_s,
                                 comm_bytes=res.comm_bytes, received=res.received, missing=res.missing,
                                 ages=res.ages, **extra, **res.telemetry))
        if progress:
            progress()
    if r < cfg["rounds"] - 1:
        for a in agents:
            _seed_phase(cfg["seed"], r, a.rank, "train")
            loss, secs = _train(a, cfg["train"]["epochs"], cfg)
            if writer is not None:
                writer.write(_record(a, r, "train", **_evaluate(a, eval_bs), train_loss=loss, train_s=secs))
            if progress:
                progress()
    if not cfg["train"]["keep_optimizer_state"]:
        for a in agents:
            a.optimizer = None
    _checkpoint(agents, r, ckpt_dir)
    return results


# ---------------------------------------------------------------------------------------------- driving
def progress_bar(total: int, initial: int, desc: str, quiet: bool, leave: bool = True):
    """A tqdm bar on stderr, shown only on a terminal and without ``quiet``; ``leave=False`` for inner bars."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="round" if leave else "agent-phase", leave=leave,
                disable=quiet or not sys.stderr.isatty(), file=sys.stderr, dynamic_ncols=True)


def restore_latest(
    agents: Sequence[Agent], ckpt_dir: Path, metrics_path: Path,
    before_restore: Optional[Callable[[int], None]] = None,
) -> Tuple[int, Dict[int, Dict[str, Any]]]:
    """Restore the local agents from the latest round they all completed and drop later metrics records.

    ``before_restore(round)`` runs first when there is a checkpoint (to set up what the restore loads into).
    Returns the last completed step (-2 nothing, -1 pretraining, r >= 0 round r) and the loaded checkpoints by rank.
    """
    done, saved = -2, {}
    last = checkpoint.resume_round(ckpt_dir, [a.rank for a in agents])
    if last is not None:
        if before_restore is not None:
            before_restore(last)
        for a in agents:
            saved[a.rank] = checkpoint.load(ckpt_dir, a.rank, last)
            restore_agent(a, saved[a.rank])
        done = last
    MetricsWriter.truncate_after(metrics_path, done)
    return done, saved
