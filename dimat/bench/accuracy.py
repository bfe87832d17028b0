"""``dimat bench accuracy CONFIG --methods ... [--partitions ...] [--topologies ...] [--seeds ...] [--out DIR]``.

Runs a grid of ``dimat run`` simulations, one cell per (method, partition, topology, seed), each in its own run
folder ``OUT/cells/<method>-<partition>-<topology>-seed<k>/`` through :func:`dimat.runner.run`. A cell whose
``summary.json`` exists is skipped and an interrupted one is resumed, so the bench can be stopped and restarted.
It then writes, into ``OUT``:

* ``results.json``: per (method, partition, topology): the mean and standard deviation over seeds of the final
  mean test accuracy, the bytes each agent sent and received (the metrics' ``comm_bytes``), the agents' seconds
  spent training, merging (or mixing) and communicating, and the wall time; plus every cell's own figures and
  accuracy-per-round curves.
* ``results.md``: the same as a markdown table.
* ``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png``: one panel per (partition, topology), one line per method.

The config file fixes everything else (data set, model, rounds, epochs, optimizer); ``--set`` overrides keys of
every cell. Round r's point is the round's first evaluation (after the merge for DIMAT-style methods; at the same
epoch count for the gossip baselines), so curves compare at equal training.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

HELP = "accuracy and communication of methods over a grid of partitions, topologies and seeds"

__all__ = ["HELP", "add_arguments", "main", "Cell", "grid", "run_grid", "collect", "aggregate", "write_outputs"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config shared by every cell (data, model, rounds...)")
    parser.add_argument("--methods", default="dimat,wa,none",
                        help="comma-separated merge.method values, e.g. dimat,wa,wm,cdsgd,sgp,none,centralised")
    parser.add_argument("--partitions", default=None,
                        help="comma-separated data.partition values (default: the config's), e.g. iid,dirichlet:0.3")
    parser.add_argument("--topologies", default=None,
                        help="comma-separated topology kinds or files (default: the config's), e.g. ring,fc")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every cell (repeatable; VALUE is YAML)")
    parser.add_argument("--out", default="bench-accuracy", metavar="DIR",
                        help="output folder (cells/, results.json, results.md, plots); default bench-accuracy")


# ------------------------------------------------------------------------------------------------ the grid
class Cell:
    """One run of the grid: its coordinates, its resolved config and its folder."""

    def __init__(self, method: str, partition: str, topology: str, seed: int, cfg: Any, folder: Path):
        self.method, self.partition, self.topology, self.seed = method, partition, topology, seed
        self.cfg, self.folder = cfg, folder

    @property
    def key(self) -> Tuple[str, str, str]:
        return (self.method, self.partition, self.topology)

    @property
    def done(self) -> bool:
        return (self.folder / "summary.json").exists()


def _list(text: Optional[str], flag: str) -> Optional[List[str]]:
    from dimat.errors import UserError

    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UserError(f"{flag}: give at least one value (comma-separated), got {text!r}")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise UserError(f"{flag}: {dup[0]!r} is listed twice")
    return items


def _seeds(text: Optional[str]) -> Optional[List[int]]:
    from dimat.errors import UserError

    items = _list(text, "--seeds")
    if items is None:
        return None
    try:
        return [int(s) for s in items]
    except ValueError:
        raise UserError(f"--seeds: seeds must be integers, got {text!r}") from None


def _slug(text: str) -> str:
    p = Path(text)
    if p.suffix in (".json", ".yaml", ".yml"):  # a topology file: name it by its stem
        text = p.stem
    return re.sub(r"[^A-Za-z0-9._+-]+", "", text.replace(":", "")) or "x"


def grid(config: Optional[str], methods: Sequence[str], partitions: Optional[Sequence[str]],
         topologies: Optional[Sequence[str]], seeds: Optional[Sequence[int]], overrides: Sequence[str],
         out: Path) -> List[Cell]:
    """Every cell's resolved config, checked before anything runs (a bad method, partition, topology or data set
    is a UserError naming the flag or key)."""
    from dimat.config import load_config
    from dimat.errors import UserError
    from dimat.build import prepare

    base = load_config(config, overrides)
    partitions = list(partitions or [base["data"]["partition"]])
    topologies = list(topologies or [base["topology"]])
    seeds = list(seeds if seeds is not None else [base["seed"]])
    cells: List[Cell] = []
    checked = set()
    for p in partitions:
        for t in topologies:
            for s in seeds:
                for m in methods:
                    sets = [f"merge.method={m}", f"data.partition={p}", f"topology={t}", f"seed={s}"]
                    try:
                        cfg = load_config(config, list(overrides) + sets)
                    except UserError as e:
                        raise UserError(f"bench cell {m}/{p}/{t}/seed {s}: {e}") from None
                    folder = out / "cells" / f"{_slug(m)}-{_slug(p)}-{_slug(t)}-seed{s}"
                    cfg["out"] = str(folder)
                    if (p, t) not in checked:  # data, partition, topology and model load once per combination
                        try:
                            prepare(cfg)
                        except UserError as e:
                            raise UserError(f"bench cell {m}/{p}/{t}/seed {s}: {e}") from None
                        checked.add((p, t))
                    cells.append(Cell(m, p, t, s, cfg, folder))
    return cells


def run_grid(cells: Sequence[Cell], log=print) -> None:
    """Run every cell that has no ``summary.json`` yet (resuming one that was interrupted)."""
    from dimat.runner import run

    for i, c in enumerate(cells, 1):
        name = c.folder.name
        if c.done:
            log(f"[{i}/{len(cells)}] {name}: done already, skipped")
            continue
        resume = (c.folder / "config.yaml").exists()
        t0 = time.perf_counter()
        summary = run(c.cfg, c.folder, resume=resume, quiet=True)
        log(f"[{i}/{len(cells)}] {name}: final mean accuracy {summary['final_mean_acc']:.4f} "
            f"in {time.perf_counter() - t0:.1f} s{' (resumed)' if resume else ''}")


# ------------------------------------------------------------------------------------------------ figures
def collect(cell: Cell) -> Dict[str, Any]:
    """A finished cell's figures from its ``summary.json`` and ``metrics.jsonl``."""
    from dimat.metrics import PHASES, read_metrics

    summary = json.loads((cell.folder / "summary.json").read_text())
    records = read_metrics([cell.folder / "metrics.jsonl"])
    agents = sorted({r["agent"] for r in records})
    order = {p: i for i, p in enumerate(PHASES)}
    cumulative = {a: 0 for a in agents}
    curve: Dict[int, Dict[str, List[float]]] = {}
    for r in sorted(records, key=lambda r: (r["round"], order.get(r["phase"], 9), r["agent"])):
        cumulative[r["agent"]] += int(r.get("comm_bytes") or 0)
        if r["phase"] == "merge" and r.get("test_acc") is not None:
            point = curve.setdefault(r["round"], {"acc": [], "bytes": []})
            point["acc"].append(r["test_acc"])
            point["bytes"].append(cumulative[r["agent"]])
    n = max(len(agents), 1)
    return {
        "method": cell.method,
        "partition": cell.partition,
        "topology": cell.topology,
        "seed": cell.seed,
        "folder": str(cell.folder),
        "agents": summary["agents"],
        "final_mean_acc": summary["final_mean_acc"],
        "per_agent_acc": summary["per_agent_acc"],
        "comm_bytes_per_agent": sum(cumulative.values()) / n,
        "train_s": sum(r.get("train_s") or 0.0 for r in records),
        "merge_s": sum(r.get("merge_s") or 0.0 for r in records),
        "comm_s": sum(r.get("comm_s") or 0.0 for r in records),
        "wall_s": summary["wall_s"],
        "rounds": [k for k in sorted(curve)],
        "acc_by_round": [_mean(curve[k]["acc"]) for k in sorted(curve)],
        "bytes_by_round": [_mean(curve[k]["bytes"]) for k in sorted(curve)],
    }


def _mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs: Sequence[float]) -> Optional[float]:
    """Sample standard deviation (n - 1); 0 for a single value."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    if len(xs) == 1:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(cells: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (method, partition, topology): mean and std over seeds, in the order the cells came."""
    groups: Dict[Tuple[str, str, str], List[Mapping[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["method"], c["partition"], c["topology"]), []).append(c)
    rows = []
    for (m, p, t), cs in groups.items():
        rounds = cs[0]["rounds"]
        same = all(c["rounds"] == rounds for c in cs)
        rows.append({
            "method": m,
            "partition": p,
            "topology": t,
            "seeds": [c["seed"] for c in cs],
            "agents": cs[0]["agents"],
            "final_acc_mean": _mean([c["final_mean_acc"] for c in cs]),
            "final_acc_std": _std([c["final_mean_acc"] for c in cs]),
            "comm_bytes_per_agent": _mean([c["comm_bytes_per_agent"] for c in cs]),
            "train_s": _mean([c["train_s"] for c in cs]),
            "merge_s": _mean([c["merge_s"] for c in cs]),
            "comm_s": _mean([c["comm_s"] for c in cs]),
            "wall_s": _mean([c["wall_s"] for c in cs]),
            "rounds": rounds if same else [],
            "acc_by_round": [_mean(v) for v in zip(*[c["acc_by_round"] for c in cs])] if same else [],
            "bytes_by_round": [_mean(v) for v in zip(*[c["bytes_by_round"] for c in cs])] if same else [],
        })
    return rows


def _mb(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 1e6:.1f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table of :func:`aggregate`'s rows."""
    head = ("| method | partition | topology | seeds | final acc % (mean ± std) | MB per agent (sent + received) "
            "| train s | merge s | comm s | wall s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        acc = f"{_pct(r['final_acc_mean'])} ± {_pct(r['final_acc_std'])}"
        lines.append(f"| {r['method']} | {r['partition']} | {r['topology']} | {len(r['seeds'])} | {acc} | "
                     f"{_mb(r['comm_bytes_per_agent'])} | {r['train_s']:.1f} | {r['merge_s']:.1f} | "
                     f"{r['comm_s']:.1f} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _panels(rows: Sequence[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    seen: List[Tuple[str, str]] = []
    for r in rows:
        if (r["partition"], r["topology"]) not in seen:
            seen.append((r["partition"], r["topology"]))
    return seen


def plot(rows: Sequence[Mapping[str, Any]], path: Path, x: str) -> None:
    """Accuracy curves per method, one panel per (partition, topology); ``x`` is ``"round"`` or ``"bytes"``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = _panels(rows)
    cols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (p, t) in zip(axes.flat, panels):
        for r in rows:
            if (r["partition"], r["topology"]) != (p, t) or not r["acc_by_round"]:
                continue
            acc = [100 * a if a is not None else float("nan") for a in r["acc_by_round"]]
            if x == "round":
                ax.plot(r["rounds"], acc, marker=".", label=r["method"])
            elif r["bytes_by_round"] and r["bytes_by_round"][-1]:
                # Points before the first exchange (0 bytes) have no place on a log axis.
                pts = [(b / 1e6, a) for b, a in zip(r["bytes_by_round"], acc) if b]
                ax.plot(*zip(*pts), marker=".", label=r["method"])
            else:  # no communication at all: its final accuracy as a reference line
                ax.axhline(acc[-1], linestyle="--", linewidth=1, color="gray" if r["method"] == "none" else "black",
                           label=f"{r['method']} (no communication)")
        ax.set_title(f"{p}, {t}")
        ax.set_ylabel("test accuracy (%)")
        if x == "round":
            ax.set_xlabel("round (E local epochs each)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xlabel("MB per agent, sent + received (log)")
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(out: Path, cells: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Write results.json, results.md and the two plots into ``out``; returns the aggregated rows."""
    from dimat.metrics import atomic_write_text

    rows = aggregate(cells)
    atomic_write_text(out / "results.json", json.dumps({**meta, "results": rows, "cells": list(cells)}, indent=2)
                      + "\n")
    md = ["# dimat bench accuracy\n", f"Command: `{meta.get('command', '')}`\n", table(rows)]
    atomic_write_text(out / "results.md", "\n".join(md))
    plot(rows, out / "accuracy_vs_round.png", "round")
    plot(rows, out / "accuracy_vs_bytes.png", "bytes")
    return rows


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this bench (for results.md)."""
    import shlex

    parts = ["dimat", "bench", "accuracy", args.config, "--methods", args.methods]
    for flag in ("partitions", "topologies", "seeds"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag}", getattr(args, flag)]
    for o in args.overrides:
        parts += ["--set", o]
    parts += ["--out", args.out]
    return " ".join(shlex.quote(str(p)) for p in parts)


def main(args: argparse.Namespace) -> int:
    from dimat.config import known_methods
    from dimat.errors import UserError

    methods = _list(args.methods, "--methods")
    valid = known_methods()
    for m in methods:
        if m not in valid:
            raise UserError(f"--methods: unknown method {m!r}; choose from {', '.join(valid)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out must be a folder, but a file of that name exists")
    cells = grid(args.config, methods, _list(args.partitions, "--partitions"), _list(args.topologies, "--topologies"),
                 _seeds(args.seeds), args.overrides, out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_grid(cells)
    figures = [collect(c) for c in cells]
    meta = {"command": _command(args), "config": str(args.config), "overrides": list(args.overrides),
            "bench_wall_s": time.perf_counter() - t0}
    rows = write_outputs(out, figures, meta)
    print(table(rows), end="")
    print(f"dimat: wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy_vs_round.png'} and "
          f"{out / 'accuracy_vs_bytes.png'}")
    return 0
