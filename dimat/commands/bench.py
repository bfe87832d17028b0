"""``dimat bench merge|transport|accuracy``: benchmarks that print what they measured and how (never timed tests)."""

from __future__ import annotations

import argparse
import importlib

HELP = "run a benchmark: merge, transport or accuracy"

#: benchmark name -> module with HELP, add_arguments(parser), main(args)
BENCHES = {
    "merge": "dimat.bench.merge",
    "transport": "dimat.bench.transport",
    "accuracy": "dimat.bench.accuracy",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    for name, modname in BENCHES.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_bench_main=mod.main)


def main(args: argparse.Namespace) -> int:
    return int(args._bench_main(args) or 0)
