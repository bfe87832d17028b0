"""``dimat plot RUN [RUN ...] [-o FILE]``: accuracy per round of one or more runs (accuracy.png)."""

from __future__ import annotations

import argparse

HELP = "plot mean/min/max test accuracy per round of one or more run folders"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by dimat run or dimat launch")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="PNG to write (default: RUN/accuracy.png for one run, ./accuracy.png for several)")
    parser.add_argument("--title", help="plot title")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dimat.plot import plot_accuracy

    out = args.output or (Path(args.runs[0]) / "accuracy.png" if len(args.runs) == 1 else Path("accuracy.png"))
    path = plot_accuracy(args.runs, out, title=args.title)
    print(f"dimat: wrote {path}")
    return 0
