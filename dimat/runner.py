"""The in-process simulation behind ``dimat run``: N agents in one process over in-process transports.

* :func:`drive` runs pretraining and the rounds for a list of local agents, with checkpoints, metrics and resume.
* :func:`run` builds the agents (:mod:`dimat.build`), drives them and writes the run folder.

"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from dimat import gossip
from dimat.build import build_agent, check_run_dir, coverage_record, merge_coverage, prepare, warn_coverage
from dimat.config import Config, dump
from dimat.consensus import consensus_record
from dimat.errors import UserError
from dimat.loop import Agent, pretrain, progress_bar, restore_latest, run_round
from dimat.metrics import MetricsWriter, atomic_write_text, read_metrics, summarize

__all__ = ["drive", "run"]


def drive(
    cfg: Mapping[str, Any],
    agents: Sequence[Agent],
    run_dir: Path,
    metrics_path: Path,
    resume: bool = False,
    quiet: bool = False,
    stop_after_round: Optional[int] = None,
) -> bool:
    """Pretrain (unless resumed past it) and run every remaining round for the local ``agents``.

    Parameters
    ----------
    cfg : the resolved config.
    agents : the agents of this process.
    run_dir : checkpoints go to ``run_dir/checkpoints``.
    metrics_path : the JSON-lines file the agents' records are appended to.
    resume : restore the agents from the latest round they all completed and drop later records from
        ``metrics_path``; start from scratch when there is no checkpoint yet.
    quiet : no progress bars.
    stop_after_round : return after this round, as if interrupted (for tests of resume).

    Returns
    -------
    True when all rounds are done, False when stopped early.
    """
    ckpt_dir = run_dir / "checkpoints"
    done = restore_latest(agents, ckpt_dir, metrics_path)[0] if resume else -2  # -2 nothing, -1 pretraining, r
    rounds = cfg["rounds"]
    with MetricsWriter(metrics_path) as writer:
        outer = progress_bar(rounds, max(done + 1, 0), "rounds", quiet)
        inner = progress_bar(len(agents), 0, "agents", quiet, leave=False)  # one step per agent and phase
        try:
            if done < -1 and cfg["train"]["pretrain_epochs"] > 0:
                inner.set_description("pretrain")
                pretrain(agents, cfg, writer, ckpt_dir, progress=inner.update)
            for r in range(max(done + 1, 0), rounds):
                inner.reset(total=len(agents) * (2 if r < rounds - 1 else 1))
                inner.set_description(f"round {r}")
                results = run_round(agents, r, cfg, writer, ckpt_dir, progress=inner.update)
                if cfg["eval"].get("consensus"):  # all models merged into one: what a global merge would give
                    writer.write(consensus_record(agents, r, cfg))
                outer.update(1)
                missing = sum(len(x.missing) for x in results)
                if missing:
                    outer.set_postfix(missing=missing)
                if stop_after_round is not None and stop_after_round <= r < rounds - 1:
                    return False
        finally:
            inner.close()
            outer.close()
    return True


def run(
    cfg: Config,
    out_dir: Optional[str | Path] = None,
    resume: bool = False,
    quiet: bool = False,
    stop_after_round: Optional[int] = None,
) -> Optional[Dict[str, Any]]:
    """Run the in-process simulation of ``cfg`` and write its run folder.

    Parameters
    ----------
    cfg : a resolved config (:func:`dimat.config.load_config`).
    out_dir : run folder (default ``cfg.out``); receives ``config.yaml``, ``metrics.jsonl``, ``summary.json``
        and ``checkpoints/agent-K.pt``.
    resume : continue the run in ``out_dir`` from its last complete round (the config must be the same).
    quiet : no progress bars.
    stop_after_round : stop after this round without a summary, as an interruption would (for tests).

    Returns
    -------
    The summary (also written to ``summary.json``), or None when stopped early.
    """
    t0 = time.perf_counter()
    out = Path(out_dir if out_dir is not None else cfg["out"])
    if cfg["transport"]["name"] != "inproc":
        raise UserError(f"{getattr(cfg, 'source', 'config')}: transport.name: 'dimat run' simulates every agent in "
                        f"one process (inproc); run {cfg['transport']['name']!r} transports with 'dimat launch'")
    if not cfg["transport"]["sync"]:
        raise UserError(f"{getattr(cfg, 'source', 'config')}: transport.sync: false (asynchronous rounds) needs "
                        f"the grpc transport; 'dimat run' simulates synchronous rounds")
    setup = prepare(cfg)  # every input error surfaces here, before anything is written
    check_run_dir(cfg, out, resume)
    coverage = merge_coverage(cfg, setup.dataset)
    warn_coverage(cfg, coverage)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(out / "config.yaml", dump(cfg))
    from dimat.transport.inproc import make_inproc

    transports = make_inproc([setup.topology.neighbors(k) for k in range(cfg["agents"])], setup.schedule)
    if gossip.handles(cfg["merge"]["method"]):  # gradient-gossip baselines and centralised: a step-level loop
        agents, driver = gossip.build_agents(cfg, setup, transports), gossip.drive
    else:
        agents, driver = [build_agent(cfg, setup, k, transports[k]) for k in range(cfg["agents"])], drive
    try:
        done = driver(cfg, agents, out, out / "metrics.jsonl", resume=resume, quiet=quiet,
                      stop_after_round=stop_after_round)
    finally:
        for t in transports:
            t.close()
    if not done:
        return None
    summary = summarize(read_metrics([out / "metrics.jsonl"]), cfg["merge"]["method"], len(agents),
                        cfg["rounds"], wall_s=time.perf_counter() - t0)
    if coverage is not None:
        summary["merge_coverage"] = coverage_record(coverage)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
