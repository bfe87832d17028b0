"""``dimat bench merge``: what a merge costs and what it recovers (prints tables; never a timed test).

Two parts, each printed as a Markdown table (and saved under ``--out`` with the command that produced it):

* timing: ``activation_match`` on resnet20 at several widths with 1, 2 and 4 neighbours, split into statistics,
  assignment, apply and BN reset, with the peak resident memory added during the merge; medians over
  ``--repeats`` runs, next to the time of one local training epoch over 2,000 images measured in the same run.
* accuracy: two models trained independently (seeds 1 and 2) on tin20-dev, and their midpoint by every operator:
  ``average``, ``average`` + BN reset, ``weight_match``, ``activation_match`` without and with REPAIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

HELP = "merge cost (resnet20 timings) and two-model midpoint accuracy on tin20-dev"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="folder for merge.json and merge.md")
    parser.add_argument("--part", choices=["all", "timing", "accuracy"], default="all")
    parser.add_argument("--widths", default="1,4,8", help="resnet20 widths for the timing table")
    parser.add_argument("--neighbours", default="1,2,4", help="numbers of neighbours for the timing table")
    parser.add_argument("--stat-batches", type=int, default=10, help="statistics (and BN reset) batches per merge")
    parser.add_argument("--batch-size", type=int, default=128, help="images per statistics batch")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the median is reported)")
    parser.add_argument("--epoch-images", type=int, default=2000, help="images in the reference local epoch")
    parser.add_argument("--data", type=Path, default=None,
                        help="tin20-dev.npz (default: $DIMAT_TIN20 or ../shared/data/tin20-dev.npz)")
    parser.add_argument("--models", default="cnn,resnet20",
                        help="models for the accuracy table: zoo names or package.module:factory specs")
    parser.add_argument("--epochs", default="cnn:6,resnet20:3",
                        help="training epochs per model, name:epochs pairs (the last ':' separates them), or one "
                             "number for every model")
    parser.add_argument("--seeds", default="1,2", help="the two training seeds of the endpoints")
    parser.add_argument("--endpoints", type=Path, default=None,
                        help="folder to keep trained endpoints in: a model already there with the same spec, "
                             "seed, epochs, recipe and data size is loaded instead of trained again")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


# --------------------------------------------------------------------------------------------------- helpers
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples the process's resident memory every few ms; ``peak`` is the largest increase over the start."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "_PeakRSS":
        self.base = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() - self.base)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() - self.base)


def _default_data() -> Optional[Path]:
    env = os.environ.get("DIMAT_TIN20")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "data" / "tin20-dev.npz"
        if cand.exists():
            return cand
    return None


def _load_tin20(path: Path):
    import numpy as np
    import torch

    from dimat.errors import UserError

    try:
        d = np.load(path)
        xtr, ytr, xte, yte = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: cannot read tin20 arrays x_train/y_train/x_test/y_test ({e})") from None

    def prep(x):
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255)

    xtr, xte = prep(xtr), prep(xte)
    mean, std = xtr.mean((0, 2, 3), keepdim=True), xtr.std((0, 2, 3), keepdim=True)
    return (xtr - mean) / std, torch.from_numpy(ytr).long(), (xte - mean) / std, torch.from_numpy(yte).long()


def _ints(text: str, flag: str = "list") -> List[int]:
    from dimat.errors import UserError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag}: expected positive integers, got {text!r}")
    return values


def _epochs(text: str) -> Dict[str, int]:
    """``name:epochs`` pairs (the last colon separates them: names may be ``package.module:factory``); a bare
    number applies to every model (key ``"*"``)."""
    from dimat.errors import UserError

    out: Dict[str, int] = {}
    try:
        for item in (i.strip() for i in text.split(",") if i.strip()):
            name, sep, n = item.rpartition(":")
            out[name.strip() if sep else "*"] = int(n)
    except ValueError:
        raise UserError(f"--epochs: expected name:epochs pairs such as cnn:6,resnet20:3, got {text!r}") from None
    if not out or min(out.values()) < 1:
        raise UserError(f"--epochs: expected positive epoch counts, got {text!r}")
    return out


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- timing
def _local_epoch_s(width: float, images, labels, batch_size: int = 100) -> float:
    import torch

    from dimat import models
    from dimat.train import train_epochs

    torch.manual_seed(0)
    model = models.build("resnet20", 20, width=width)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t = time.perf_counter()
    c = time.process_time()
    train_epochs(model, opt, images, labels, 1, batch_size, torch.Generator().manual_seed(0))
    return time.perf_counter() - t, time.process_time() - c


def run_timing(args) -> Dict:
    import torch

    from dimat import merge, models

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, 32, 32, generator=gen) for _ in range(args.stat_batches)]
    epoch_x = torch.randn(args.epoch_images, 3, 32, 32, generator=gen)
    epoch_y = torch.randint(0, 20, (args.epoch_images,), generator=gen)
    rows, results = [], []
    epoch_s: Dict[float, float] = {}
    epoch_cpu_s: Dict[float, float] = {}
    for width in _ints(args.widths, "--widths"):
        pool = []
        for seed in range(max(_ints(args.neighbours, "--neighbours")) + 1):
            torch.manual_seed(seed)
            pool.append(models.build("resnet20", 20, width=width).eval())
        merge.spec_for(pool[0], batches[0])  # derive once (cached), as in every round after the first
        if width == 1:  # the reference the target is stated against (a width-1 merge vs a width-1 epoch)
            runs = [_local_epoch_s(width, epoch_x, epoch_y) for _ in range(max(1, min(args.repeats, 3)))]
            epoch_s[width] = statistics.median(r[0] for r in runs)
            epoch_cpu_s[width] = statistics.median(r[1] for r in runs)
        for k in _ints(args.neighbours):
            runs = []
            for _ in range(args.repeats):
                prof: Dict[str, float] = {}
                with _PeakRSS() as mem:
                    t, c = time.perf_counter(), time.process_time()
                    merge.activation_match(pool[: k + 1], [1.0] * (k + 1), batches, reset_bn=True, profile=prof)
                    prof["total_s"] = time.perf_counter() - t
                    prof["cpu_s"] = time.process_time() - c
                prof["peak_mb"] = mem.peak / 2**20
                runs.append(prof)
            med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            med.update(width=width, neighbours=k, repeats=args.repeats)
            results.append(med)
            ratio = "-"
            if width in epoch_s:
                ratio = f"{med['total_s'] / epoch_s[width]:.2f} ({med['cpu_s'] / epoch_cpu_s[width]:.2f})"
            rows.append([
                str(width), str(k), f"{med['stats_s']:.2f}", f"{med['assign_s']:.3f}", f"{med['apply_s']:.3f}",
                f"{med['bn_reset_s']:.2f}", f"{med['total_s']:.2f}", f"{med['cpu_s']:.2f}", ratio,
                f"{med['peak_mb']:.0f}",
            ])
            print(f"width {width} neighbours {k}: {med}", file=sys.stderr, flush=True)
    table = _md_table(
        ["width", "neighbours", "statistics s", "assignment s", "apply s", "BN reset s", "total s", "total CPU s",
         "merge / local epoch: wall (CPU)", "peak MB"], rows
    )
    epochs = ", ".join(f"width {w}: {s:.2f} s wall, {epoch_cpu_s[w]:.2f} s CPU" for w, s in epoch_s.items())
    note = (f"{args.stat_batches} statistics batches of {args.batch_size} images (32x32); medians of {args.repeats} "
            f"runs. One local training epoch (Adam, batch 100) over {args.epoch_images} images: {epochs}.")
    return {"table": table, "note": note, "rows": results, "local_epoch_s": epoch_s, "local_epoch_cpu_s": epoch_cpu_s}


# -------------------------------------------------------------------------------------------------- accuracy
_RECIPE = "Adam lr 1e-3, batch 100, random flips"


def _endpoint_file(folder: Path, name: str, seed: int, epochs: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return folder / f"{safe}-e{epochs}-s{seed}.pt"


def _train(name: str, seed: int, epochs: int, x, y, folder: Optional[Path] = None, num_classes: int = 20):
    """A model trained from ``seed`` (recipe: :data:`_RECIPE`); with ``folder``, loaded from there when an earlier
    run saved one with the same model, seed, epochs and recipe, else trained and saved. Returns (model, loaded)."""
    import torch

    from dimat import models
    from dimat.train import train_epochs

    torch.manual_seed(seed)
    model = models.build(name, num_classes, width=1, in_channels=x.shape[1], image_size=x.shape[-1])
    meta = {"model": name, "seed": seed, "epochs": epochs, "recipe": _RECIPE, "train_images": len(x)}
    path = _endpoint_file(folder, name, seed, epochs) if folder is not None else None
    if path is not None and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("meta") == meta:
            model.load_state_dict(saved["state"])
            return model, True
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    train_epochs(model, opt, x, y, epochs, 100, torch.Generator().manual_seed(seed), flip=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"meta": meta, "state": model.state_dict()}, tmp)
        tmp.replace(path)
    return model, False


def run_accuracy(args) -> Dict:
    import torch

    from dimat import merge
    from dimat.errors import UserError
    from dimat.train import evaluate

    path = args.data or _default_data()
    if path is None or not Path(path).exists():
        raise UserError(f"tin20-dev.npz not found ({path}); pass --data PATH or set DIMAT_TIN20")
    xtr, ytr, xte, yte = _load_tin20(Path(path))
    epochs = _epochs(args.epochs)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(xtr), generator=gen)[: args.stat_batches * args.batch_size]
    batches = [xtr[idx[i:i + args.batch_size]] for i in range(0, len(idx), args.batch_size)]
    ops = [
        ("average", lambda ms: merge.average(ms, [0.5, 0.5])),
        ("average + BN reset", lambda ms: merge.average(ms, [0.5, 0.5], batches=batches, reset_bn=True)),
        ("weight_match (+ BN reset, REPAIR)", lambda ms: merge.weight_match(ms, [0.5, 0.5], batches=batches)),
        ("activation_match, no REPAIR", lambda ms: merge.activation_match(ms, [0.5, 0.5], batches, repair=False)),
        ("activation_match", lambda ms: merge.activation_match(ms, [0.5, 0.5], batches)),
    ]
    seeds = _ints(args.seeds, "--seeds")
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise UserError(f"--seeds: expected two different seeds, got {args.seeds!r}")
    cols, results = {}, {}
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        n_ep = epochs.get(name, epochs.get("*", 6))
        t = time.perf_counter()
        trained = [_train(name, seed, n_ep, xtr, ytr, args.endpoints, int(ytr.max()) + 1) for seed in seeds]
        ends = [m for m, _ in trained]
        train_s = time.perf_counter() - t
        how = ["loaded from " + str(args.endpoints) if loaded else "trained" for _, loaded in trained]
        print(f"{name}: endpoints (seeds {seeds[0]}, {seeds[1]}): {how[0]}, {how[1]} ({train_s:.0f} s)",
              file=sys.stderr, flush=True)
        acc = [100 * evaluate(m, xte, yte)[0] for m in ends]
        res = {"epochs": n_ep, "seeds": seeds, "train_s": train_s, "endpoints": acc, "endpoints_from": how}
        for label, op in ops:
            t = time.perf_counter()
            res[label] = 100 * evaluate(op(ends), xte, yte)[0]
            res[label + " s"] = time.perf_counter() - t
        results[name] = res
        cols[name] = res
        print(f"{name}: {res}", file=sys.stderr, flush=True)
    names = list(cols)
    rows = [[f"endpoints (seed {seeds[0]} / seed {seeds[1]})"] + [f"{cols[n]['endpoints'][0]:.1f} / {cols[n]['endpoints'][1]:.1f}"
                                              for n in names]]
    for label, _ in ops:
        rows.append([label] + [
            f"{cols[n][label]:.1f} ({100 * cols[n][label] / (sum(cols[n]['endpoints']) / 2):.0f}%)" for n in names
        ])
    header = ["midpoint"] + [f"{n} (width 1, {cols[n]['epochs']} epochs)" for n in names]
    note = (f"Test accuracy (%) on {len(xte)} test images of {path}; in brackets: share of the endpoints' mean. "
            f"Endpoints: {_RECIPE}, on {len(xtr)} training images; merge statistics, BN reset and REPAIR on "
            f"{args.stat_batches} batches of {args.batch_size} training images.")
    return {"table": _md_table(header, rows), "note": note, "results": results}


# ------------------------------------------------------------------------------------------------------ main
_FLAGS = ["part", "widths", "neighbours", "stat_batches", "batch_size", "repeats", "epoch_images", "data",
          "models", "epochs", "seeds", "endpoints", "threads", "out"]


def _command(args: argparse.Namespace) -> str:
    """The full command line that reproduces this run (every option spelled out)."""
    parts = ["dimat bench merge"]
    for flag in _FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            parts.append(f"--{flag.replace('_', '-')} {value}")
    return " ".join(parts)


def main(args: argparse.Namespace) -> int:
    import torch

    from dimat.errors import UserError

    for flag in ("stat_batches", "batch_size", "repeats", "epoch_images"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    _ints(args.widths, "--widths"), _ints(args.neighbours, "--neighbours"), _epochs(args.epochs)
    _ints(args.seeds, "--seeds")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = _command(args)
    report = {"command": command, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.part in ("all", "timing"):
        report["timing"] = run_timing(args)
        print("\n## Merge time: resnet20, activation_match\n\n" + report["timing"]["table"])
        print("\n" + report["timing"]["note"])
    if args.part in ("all", "accuracy"):
        report["accuracy"] = run_accuracy(args)
        print("\n## Two-model midpoint accuracy on tin20-dev\n\n" + report["accuracy"]["table"])
        print("\n" + report["accuracy"]["note"])
    print(f"\ncommand: {command} (torch threads {report['torch_threads']}, {report['cpu_count']} CPUs)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "merge.json").write_text(json.dumps(report, indent=1, default=str))
        md = [f"command: `{command}`", ""]
        for part in ("timing", "accuracy"):
            if part in report:
                md += [report[part]["table"], "", report[part]["note"], ""]
        (args.out / "merge.md").write_text("\n".join(md))
    return 0
