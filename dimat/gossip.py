"""The step-level gossip loop: gradient-gossip baselines (:mod:`dimat.baselines`) for the agents of this process.

Where DIMAT exchanges whole models once per round, a gossip method exchanges a message every ``gossip.comm_every``
local steps. To compare the two at equal training, a gossip run keeps DIMAT's round structure
(ALGORITHM.md section 2) and its metrics records:

    optional: pretrain_epochs of local training (the same as DIMAT's, :func:`dimat.loop.pretrain`)
    for r in 0 .. R-1:
        evaluate                                  (record "merge": after pretrain + r * E epochs, like DIMAT)
        unless this is the last round: E epochs of gossip steps; evaluate   (record "train")
        checkpoint

One gossip step, for every local agent: draw the next batch, forward and backward at the agent's model, take the
local optimizer's step to get the displacement ``d``; on a communication step post ``rule.message`` (the
transport's round number is the global step index), then collect the in-neighbours' messages and load
``rule.combine``; between communications load ``rule.local``. Every agent posts before any agent collects, so
in-process agents never wait on each other, and a multi-process agent (a list of one) blocks in ``collect``
until its neighbours' messages arrive or the transport's deadline passes (a late neighbour is left out).

Decisions, so that runs compare:

* An epoch is the same number of steps for every agent: ``ceil(max_i |D_i| / batch_size)``, the largest
  partition's. Agents with smaller partitions cycle through theirs (a fresh shuffle each pass), so every agent
  posts and collects the same number of times and nobody waits for a message that will never come.
* BatchNorm running statistics are mixed along with the parameters (the rule treats every floating-point tensor of
  the state dict as part of the model); ``num_batches_tracked`` stays local.
* Pretraining is DIMAT's (the config's optimizer). The gossip steps use the config's optimizer kind
  (``train.optimizer``, ``train.weight_decay``) at ``gossip.lr`` (default ``train.lr``); CDMSGD always uses
  Nesterov SGD with ``gossip.momentum``. A fresh optimizer every round unless ``train.keep_optimizer_state``,
  as DIMAT's local training.
* ``centralised`` is one agent (rank 0) that trains on the union of all partitions for the same number of epochs
  (so N times the steps of one agent) with the same optimizer; its records and summary hold one agent.
* The "train" record of round r carries the step loop's seconds: ``train_s`` (forward, backward, optimizer
  step), ``merge_s`` (the rule's mixing) and ``comm_s`` (post and collect), and ``comm_bytes`` (sent + received).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from dimat import baselines, checkpoint
from dimat.baselines import Rule, RuleState
from dimat.build import Setup, build_agent
from dimat.loop import Agent, _evaluate, _record, _seed_phase, agent_state, pretrain, progress_bar, restore_latest
from dimat.metrics import MetricsWriter
from dimat.train import shuffled_batches

__all__ = ["METHODS", "handles", "make_rule", "rule_states", "steps_per_epoch", "StepStats", "cross_entropy", "gossip_steps",
           "run_gossip_round", "build_agents", "drive"]

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]

#: the config methods (``merge.method``) that this loop runs instead of the DIMAT round loop
METHODS = baselines.STEP_METHODS


def handles(method: str) -> bool:
    """True for a method this module runs (a gradient-gossip baseline or ``centralised``)."""
    return method in METHODS


def make_rule(cfg: Mapping[str, Any]) -> Rule:
    """The update rule of the config's method (``centralised`` trains locally)."""
    method = cfg["merge"]["method"]
    if method == "centralised":
        return baselines.Local()
    return baselines.get(method, momentum=cfg["gossip"]["momentum"])


def rule_states(topology: Any, ranks: Sequence[int]) -> List[RuleState]:
    """One :class:`RuleState` per local rank: its row of pi (self and in-neighbours) and its out-degree.

    ``topology`` is a :class:`dimat.topology.Topology` (``C[i][j] = 1``: i receives from j), so agent i's
    out-neighbours are the k != i with ``C[k][i] = 1``.
    """
    c = np.asarray(topology.connectivity)
    out = []
    for i in ranks:
        out_degree = int(sum(1 for k in range(len(c)) if k != i and c[k, i] > 0))
        out.append(RuleState(rank=int(i), weights=topology.weights(int(i)), out_degree=out_degree))
    return out


def steps_per_epoch(agents: Sequence[Agent], batch_size: int) -> int:
    """Steps in one epoch for every agent: the largest local partition's number of batches (at least 1)."""
    return max(1, max(math.ceil(len(a.train[1]) / batch_size) for a in agents))


def _batches(agent: Agent, batch_size: int, flip: bool) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of the agent's data: one pass after another, each with a fresh order.

    An agent without training data (a partition that gave it none) gets ``None`` batches: it takes no gradient
    steps but still mixes, so its neighbours' exchanges go on."""
    x, y = agent.train
    if len(y) == 0:
        while True:
            yield None
    yield from shuffled_batches(x, y, batch_size, agent.generator, flip=flip)


@dataclass
class StepStats:
    """What one agent's gossip steps cost (seconds, bytes) and its mean training loss."""

    steps: int = 0
    loss_sum: float = 0.0
    train_s: float = 0.0
    merge_s: float = 0.0
    comm_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    received: set = field(default_factory=set)
    missing: set = field(default_factory=set)

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.steps if self.steps else float("nan")


def _tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cross_entropy(model: torch.nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The default training loss: cross-entropy of ``model`` on an ``(input, target)`` batch."""
    xb, yb = batch
    device = next(model.parameters()).device
    return F.cross_entropy(model(xb.to(device)), yb.to(device))


def _local_step(agent: Agent, opt: torch.optim.Optimizer, batch, stats: StepStats, loss_fn: LossFn):
    """Forward/backward at the agent's model, optimizer step; returns (x before the step, displacement d)."""
    t0 = time.perf_counter()
    model = agent.model
    if batch is None:  # no local data: no gradient, a zero displacement
        return _tensors(model), {}
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    x = _tensors(model)  # after the forward pass: BatchNorm statistics included, parameters not yet stepped
    opt.step()
    d = {k: p.detach() - x[k] for k, p in model.named_parameters()}
    stats.loss_sum += float(loss.detach())
    stats.steps += 1
    stats.train_s += time.perf_counter() - t0
    return x, d


@torch.no_grad()
def _load(agent: Agent, tensors: Mapping[str, torch.Tensor]) -> None:
    # load_state_dict copies into the existing tensors, so the optimizer keeps pointing at the model's parameters.
    agent.model.load_state_dict(tensors)


def gossip_steps(
    agents: Sequence[Agent],
    rule: Rule,
    states: Sequence[RuleState],
    optimizers: Sequence[torch.optim.Optimizer],
    streams: Sequence[Iterator],
    first_step: int,
    num_steps: int,
    comm_every: int = 1,
    loss_fn: Optional[LossFn] = None,
) -> List[StepStats]:
    """Run global steps ``first_step .. first_step + num_steps - 1`` for the local ``agents``.

    Parameters
    ----------
    agents, states, optimizers, streams : one per local agent (its rule state, local optimizer, batch iterator).
    rule : the update rule.
    first_step : the global index of the first step; a step ``t`` communicates when ``(t + 1) % comm_every == 0``
        and uses ``t`` as the transport's round number.
    comm_every : local steps per communication (>= 1).
    loss_fn : ``(model, batch) -> scalar loss`` (default :func:`cross_entropy`).

    Returns
    -------
    Each agent's :class:`StepStats`, in the order of ``agents``.
    """
    if comm_every < 1:
        raise ValueError(f"comm_every must be >= 1, got {comm_every}")
    loss_fn = loss_fn or cross_entropy
    stats = [StepStats() for _ in agents]
    for t in range(first_step, first_step + num_steps):
        communicate = rule.communicates and (t + 1) % comm_every == 0
        pending = []
        for a, st, opt, stream, s in zip(agents, states, optimizers, streams, stats):
            x, d = _local_step(a, opt, next(stream), s, loss_fn)
            t0 = time.perf_counter()
            if not communicate:
                _load(a, rule.local(x, d, st))
                s.merge_s += time.perf_counter() - t0
                continue
            msg = rule.message(x, d, st)
            t1 = time.perf_counter()
            s.merge_s += t1 - t0
            sent0 = a.node.transport.bytes_sent
            a.node.transport.post(t, msg)
            s.bytes_sent += a.node.transport.bytes_sent - sent0
            s.comm_s += time.perf_counter() - t1
            pending.append((a, st, s, x, d, msg))
        for a, st, s, x, d, msg in pending:
            tr = a.node.transport
            recv0 = tr.bytes_received
            t0 = time.perf_counter()
            received = tr.collect(t)
            t1 = time.perf_counter()
            s.comm_s += t1 - t0
            s.bytes_received += tr.bytes_received - recv0
            neighbours = set(a.node.neighbors)
            received = {j: m for j, m in received.items() if j in neighbours}
            s.received |= set(received)
            s.missing |= neighbours - set(received)
            _load(a, rule.combine(x, d, st, msg, received))
            s.merge_s += time.perf_counter() - t1
    return stats


# ------------------------------------------------------------------------------------------------- rounds
def _optimizer(agent: Agent) -> torch.optim.Optimizer:
    if agent.optimizer is not None:
        return agent.optimizer
    return agent.make_optimizer(agent.model)


def _checkpoint(agents: Sequence[Agent], states: Sequence[RuleState], r: int, ckpt_dir: Optional[Path]) -> None:
    if ckpt_dir is None:
        return
    for a, st in zip(agents, states):
        state = agent_state(a, r)
        state["ps_weight"] = float(st.ps_weight)
        checkpoint.save(ckpt_dir, a.rank, state)


def run_gossip_round(
    agents: Sequence[Agent],
    rule: Rule,
    states: Sequence[RuleState],
    r: int,
    cfg: Mapping[str, Any],
    writer: Optional[MetricsWriter],
    ckpt_dir: Optional[Path] = None,
    steps: Optional[int] = None,
) -> List[StepStats]:
    """Round ``r`` of a gossip run: evaluate ("merge" record), unless last E epochs of gossip steps ("train").

    Parameters
    ----------
    steps : steps per epoch (default :func:`steps_per_epoch` over ``agents``; a multi-process run must pass the
        run-wide value so that every agent makes the same number of exchanges).

    Returns
    -------
    Each agent's :class:`StepStats` of the round's training (empty stats for the last round).
    """
    eval_bs = cfg["eval"]["batch_size"]
    t_cfg = cfg["train"]
    for a in agents:
        if writer is not None:
            writer.write(_record(a, r, "merge", **_evaluate(a, eval_bs)))
    stats = [StepStats() for _ in agents]
    if r < cfg["rounds"] - 1:
        steps = steps if steps is not None else steps_per_epoch(agents, t_cfg["batch_size"])
        n = t_cfg["epochs"] * steps
        _seed_phase(cfg["seed"], r, agents[0].rank, "train")
        opts = [_optimizer(a) for a in agents]
        if t_cfg["keep_optimizer_state"]:
            for a, o in zip(agents, opts):
                a.optimizer = o
        streams = [_batches(a, t_cfg["batch_size"], cfg["data"]["flip"]) for a in agents]
        stats = gossip_steps(agents, rule, states, opts, streams, first_step=r * n, num_steps=n,
                             comm_every=cfg["gossip"]["comm_every"])
        for a, s in zip(agents, stats):
            if writer is not None:
                writer.write(_record(a, r, "train", **_evaluate(a, eval_bs), train_loss=s.train_loss,
                                     train_s=s.train_s, merge_s=s.merge_s, comm_s=s.comm_s,
                                     comm_bytes=s.bytes_sent + s.bytes_received, received=sorted(s.received),
                                     missing=sorted(s.missing)))
    if not t_cfg["keep_optimizer_state"]:
        for a in agents:
            a.optimizer = None
    _checkpoint(agents, states, r, ckpt_dir)
    return stats


# ---------------------------------------------------------------------------------------------- building
def _as_local_cfg(cfg: Mapping[str, Any]) -> Any:
    # The agents' Nodes must not merge: the exchange happens inside the step loop.
    local = copy.deepcopy(cfg)
    local["merge"]["method"] = "none"
    return local


def build_agents(cfg: Mapping[str, Any], setup: Any, transports: Sequence[Any]) -> List[Agent]:
    """The agents of an in-process gossip run (one agent on the union of the partitions for ``centralised``).

    ``setup`` is a :class:`dimat.build.Setup`; ``transports[k]`` is agent k's transport.
    """
    local = _as_local_cfg(cfg)
    if cfg["merge"]["method"] == "centralised":
        train = np.concatenate([p[0] for p in setup.parts])
        test = np.concatenate([p[1] for p in setup.parts])
        union = Setup(setup.topology, setup.dataset, [(np.sort(train), np.sort(test))])
        agents = [build_agent(local, union, 0, None)]
    else:
        agents = [build_agent(local, setup, k, transports[k]) for k in range(cfg["agents"])]
    return agents


def _use_rule_optimizer(agents: Sequence[Agent], rule: Rule, cfg: Mapping[str, Any]) -> None:
    """From the first round on, the agents' optimizers are the rule's (pretraining used the config's, as DIMAT)."""
    t = cfg["train"]
    lr = cfg["gossip"]["lr"] if cfg["gossip"]["lr"] is not None else t["lr"]
    own_kind = type(rule).optimizer is not Rule.optimizer
    for a in agents:
        a.make_optimizer = lambda m: rule.optimizer(m.parameters(), t["optimizer"], lr, t["weight_decay"])
        if own_kind or lr != t["lr"]:
            a.optimizer = None  # a kept pretraining optimizer of another kind or rate does not carry over


def drive(
    cfg: Mapping[str, Any],
    agents: Sequence[Agent],
    run_dir: Path,
    metrics_path: Path,
    resume: bool = False,
    quiet: bool = False,
    stop_after_round: Optional[int] = None,
    steps: Optional[int] = None,
) -> bool:
    """Pretrain and run every remaining round of a gossip run for the local ``agents`` (as :func:`runner.drive`).

    Parameters
    ----------
    steps : steps per epoch (default: over the local agents; see :func:`run_gossip_round`).

    Returns
    -------
    True when all rounds are done, False when stopped early by ``stop_after_round``.
    """
    ckpt_dir = run_dir / "checkpoints"
    rule = make_rule(cfg)
    states = rule_states(agents[0].node.topology, [a.rank for a in agents])
    if len(agents) == 1 and cfg["merge"]["method"] == "centralised":
        states = [RuleState(rank=agents[0].rank, weights={agents[0].rank: 1.0})]
    done = -2
    if resume:
        def rule_optimizer_first(last: int) -> None:
            if last >= 0:  # a kept optimizer state in a round checkpoint is the rule optimizer's
                _use_rule_optimizer(agents, rule, cfg)

        done, saved = restore_latest(agents, ckpt_dir, metrics_path, before_restore=rule_optimizer_first)
        for a, st in zip(agents, states):
            if a.rank in saved:
                st.ps_weight = float(saved[a.rank].get("ps_weight", 1.0))
    rounds = cfg["rounds"]
    with MetricsWriter(metrics_path) as writer:
        bar = progress_bar(rounds, max(done + 1, 0), cfg["merge"]["method"], quiet)
        try:
            if done < -1 and cfg["train"]["pretrain_epochs"] > 0:
                pretrain(agents, cfg, writer, ckpt_dir)
            if done < 0:
                _use_rule_optimizer(agents, rule, cfg)
            for r in range(max(done + 1, 0), rounds):
                run_gossip_round(agents, rule, states, r, cfg, writer, ckpt_dir, steps=steps)
                bar.update(1)
                if stop_after_round is not None and stop_after_round <= r < rounds - 1:
                    return False
        finally:
            bar.close()
    return True
