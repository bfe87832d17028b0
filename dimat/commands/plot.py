"""``dimat plot RUN [RUN ...] [-o FILE] [--metric NAME]``: accuracy (or a merge telemetry field) per round of one
or more runs (accuracy.png, or NAME.png)."""

from __future__ import annotations

import argparse

HELP = "plot mean/min/max test accuracy per round of one or more run folders"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by dimat run or dimat launch")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="PNG to write (default: RUN/accuracy.png for one run, ./accuracy.png for several)")
    parser.add_argument("--title", help="plot title")
    parser.add_argument("--metric", default="test_acc", metavar="NAME",
                        help="field of the merge records to draw: test_acc (default), acc_change, "
                             "align_corr_before, align_corr_after, units_moved, consensus_dist, or any numeric field")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dimat.plot import plot_accuracy

    name = "accuracy.png" if args.metric == "test_acc" else f"{args.metric}.png"
    out = args.output or (Path(args.runs[0]) / name if len(args.runs) == 1 else Path(name))
    path = plot_accuracy(args.runs, out, title=args.title, metric=args.metric)
    print(f"dimat: wrote {path}")
    return 0
