"""Accuracy plots of one or more runs: mean test accuracy per round, with the band between the worst and best
agent (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from dimat.errors import UserError
from dimat.metrics import per_round, read_metrics

__all__ = ["run_curve", "plot_accuracy", "metrics_files"]


def metrics_files(run_dir: Path) -> List[Path]:
    """The metrics files of a run folder: ``metrics.jsonl``, else one ``metrics-*.jsonl`` per agent."""
    one = run_dir / "metrics.jsonl"
    return [one] if one.exists() else sorted(run_dir.glob("metrics-*.jsonl"))


def run_curve(run_dir: str | Path, phase: str = "merge", metric: str = "test_acc"
              ) -> Tuple[List[int], List[float], List[float], List[float]]:
    """Rounds and the mean, min and max over agents of ``metric`` in ``phase`` ("merge": after each merge).

    ``metric`` is a numeric field of the records: ``test_acc`` or a merge telemetry field (``acc_change``,
    ``align_corr_before``, ``align_corr_after``, ``units_moved``, ``units_kept``, ``consensus_dist``).

    Raises
    ------
    UserError : ``run_dir`` is not a run folder or holds no record of ``phase``.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"{d}: not a run folder")
    files = metrics_files(d)
    if not files:
        raise UserError(f"{d}: no metrics.jsonl (is it a dimat run folder?)")
    curve: Dict[int, List[float]] = per_round(read_metrics(files), phase, key=metric)
    if not curve:
        raise UserError(f"{files[0]}: no '{phase}' records with {'a test accuracy' if metric == 'test_acc' else repr(metric)}")
    rounds = list(curve)
    return (rounds, [sum(v) / len(v) for v in curve.values()], [min(v) for v in curve.values()],
            [max(v) for v in curve.values()])


def _label(run_dir: Path) -> str:
    summary = run_dir / "summary.json"
    try:
        method = json.loads(summary.read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        method = None
    return f"{run_dir.name} ({method})" if method and method not in run_dir.name else run_dir.name


_LABELS = {"test_acc": "test accuracy after merge", "acc_change": "test accuracy change across the merge",
           "align_corr_before": "mean correlation of units in place", "align_corr_after":
           "mean correlation of matched units", "units_moved": "share of units moved by alignment",
           "units_kept": "share of aligned units averaged (min_corr)",
           "consensus_dist": "relative distance, merged model to neighbours"}


def plot_accuracy(run_dirs: Sequence[str | Path], out_file: str | Path, title: Optional[str] = None,
                  metric: str = "test_acc") -> Path:
    """Write a PNG with one line (mean over agents) and one min-max band per run; returns its path.

    ``metric`` is the merge-record field drawn (see :func:`run_curve`)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(Path(d), run_curve(d, metric=metric)) for d in run_dirs]  # every input is checked before anything is drawn
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for d, (rounds, mean, lo, hi) in curves:
            line, = ax.plot(rounds, mean, marker="o", markersize=3, label=_label(d))
            ax.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(_LABELS.get(metric, metric))
        what = "test accuracy" if metric == "test_acc" else metric
        ax.set_title(title or f"mean {what} over agents (band: min to max)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
        out = Path(out_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(out)
    finally:
        plt.close(fig)
    return out
