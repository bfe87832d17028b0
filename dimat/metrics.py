"""Run metrics: one JSON object per line (``metrics.jsonl``), appended and flushed as each agent finishes a phase.

A record holds ``round, agent, phase`` (``pretrain`` with round -1, then ``merge`` and ``train``), ``test_acc``,
``test_loss`` (full test set), ``local_test_acc`` (the agent's own test partition), ``train_loss``, ``train_s``,
``merge_s``, ``comm_s``, ``comm_bytes`` (sent + received this phase), ``acc_change`` (test accuracy minus the
agent's previous record's) and, after a merge, ``received`` / ``missing`` neighbour ranks and the merge telemetry
of :class:`dimat.node.MergeResult` (``edges`` per neighbour, ``consensus_dist``, ``units_moved``,
``align_corr_before``, ``align_corr_after``). With ``eval.consensus`` the simulation adds one ``consensus`` record
per round (agent -1): all agents' models merged into one. The in-process runner writes every agent to one file; a multi-process run gives each
agent its own :class:`MetricsWriter` (one file per agent) and :func:`read_metrics` reads them together.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence

__all__ = ["MetricsWriter", "read_metrics", "summarize", "atomic_write_text", "final_records"]

PHASES = ("pretrain", "merge", "train")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _clean(v: Any) -> Any:
    # JSON has no NaN: write null so that every reader (jq, pandas, browsers) can parse the file.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Appends metric records to a JSON-lines file, one flushed line per record.

    Parameters
    ----------
    path : the ``.jsonl`` file (created if missing; existing lines are kept).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "a")

    def write(self, record: Mapping[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def truncate_after(path: str | Path, last_round: int) -> None:
        """Keep only the records of rounds <= ``last_round`` (atomically); for resuming an interrupted run."""
        path = Path(path)
        if not path.exists():
            return
        keep = [json.dumps(r) + "\n" for r in read_metrics([path]) if r["round"] <= last_round]
        atomic_write_text(path, "".join(keep))


def read_metrics(paths: Sequence[str | Path]) -> List[Dict[str, Any]]:
    """All records of the given files, sorted by (round, phase order, agent). A torn last line is skipped."""
    records = []
    for p in paths:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption
    order = {p: i for i, p in enumerate(PHASES)}
    records.sort(key=lambda r: (r["round"], order.get(r["phase"], len(order)), r["agent"]))
    return records


def final_records(records: Iterable[Mapping[str, Any]]) -> Dict[int, Mapping[str, Any]]:
    """Each agent's last record (the latest round, then the latest phase)."""
    last: Dict[int, Mapping[str, Any]] = {}
    order = {p: i for i, p in enumerate(PHASES)}
    for r in records:
        a = r["agent"]
        key = (r["round"], order.get(r["phase"], len(order)))
        if a not in last or key >= (last[a]["round"], order.get(last[a]["phase"], len(order))):
            last[a] = r
    return last


def summarize(records: Iterable[Mapping[str, Any]], method: str, agents: int, rounds: int,
              wall_s: float) -> Dict[str, Any]:
    """The run summary: final test accuracy per agent (its last record) and its mean, min and max.

    ``wall_s`` is the wall-clock time of the process that wrote the summary (of the resumed part, after a resume).
    """
    last = final_records(records)
    per_agent = [last[a]["test_acc"] if a in last else None for a in range(agents)]
    accs = [a for a in per_agent if a is not None]
    return {
        "method": method,
        "agents": agents,
        "rounds": rounds,
        "final_mean_acc": sum(accs) / len(accs) if accs else None,
        "final_min_acc": min(accs) if accs else None,
        "final_max_acc": max(accs) if accs else None,
        "per_agent_acc": per_agent,
        "wall_s": wall_s,
    }


def per_round(records: Iterable[Mapping[str, Any]], phase: str = "merge", key: str = "test_acc"
              ) -> Dict[int, List[float]]:
    """round -> the agents' values of field ``key`` (default the test accuracy) in ``phase`` (for plots)."""
    out: Dict[int, List[float]] = {}
    for r in records:
        v = r.get(key)
        if r["phase"] == phase and isinstance(v, (int, float)) and not isinstance(v, bool):
            out.setdefault(r["round"], []).append(v)
    return dict(sorted(out.items()))
