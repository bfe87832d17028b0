"""The consensus model of a simulation: every agent's model aligned and merged into one, as a per-round metric.

It answers "what would one global merge give now?", which no agent of a decentralized run can compute (it needs
every model). Only the in-process simulation (``dimat run`` with ``eval.consensus: true``) has all models at hand.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Mapping, Sequence

from dimat import merge
from dimat.loop import Agent
from dimat.train import evaluate

__all__ = ["consensus_record"]


def consensus_record(agents: Sequence[Agent], r: int, cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Merge all agents' current models into one with equal weights and evaluate it on the test set.

    The operator is the run's merge method (``dimat`` for methods without one, e.g. ``none``), aligned to agent
    0's model on agent 0's local batches (``merge.stat_batches``), with the BatchNorm repair ``merge.bn_repair``
    on the same batches.
    Returns a metrics record with ``agent`` -1 and ``phase`` ``consensus``.
    """
    t0 = time.perf_counter()
    method = cfg["merge"]["method"]
    fn = merge.get(method if method in merge.METHODS else "dimat")
    ordered = sorted(agents, key=lambda a: a.rank)
    lead = ordered[0]
    models = [a.model for a in ordered]
    bn_repair = cfg["merge"].get("bn_repair", "local")
    kw = {"bn_repair": bn_repair} if bn_repair != "local" else {}  # operators registered by users may lack it
    merged = fn(models, [1.0] * len(models), batches=lead.node.batches, reset_bn=cfg["merge"]["reset_bn"],
                stat_batches=cfg["merge"]["stat_batches"], **kw)
    acc, loss = evaluate(merged, *lead.test, batch_size=cfg["eval"]["batch_size"])
    return {"round": r, "agent": -1, "phase": "consensus", "test_acc": acc, "test_loss": loss,
            "merge_s": time.perf_counter() - t0}
