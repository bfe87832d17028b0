"""``dimat topology make KIND --agents N [-o FILE]`` and ``dimat topology show FILE``."""

from __future__ import annotations

import argparse
import sys
import warnings

HELP = "build a topology file (make) or inspect one (show)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="topology_command", metavar="ACTION")
    sub.required = True

    make = sub.add_parser("make", help="build a named topology and print or save it",
                          description="Build a topology with Metropolis-Hastings weights; print it as JSON "
                                      "or write it to FILE (.json, .yaml or .yml).")
    make.add_argument("kind", metavar="KIND",
                      help="fc, ring, bipartite, disconnected, torus, exponential or random")
    make.add_argument("--agents", "-n", type=int, required=True, metavar="N", help="number of agents")
    make.add_argument("--seed", type=int, default=0, help="seed for 'random' (default 0)")
    make.add_argument("-o", "--output", metavar="FILE", help="write here instead of printing (format by suffix)")
    make.add_argument("--format", choices=("json", "yaml"), default="json", help="format when printing (default json)")
    make.add_argument("--p", type=float, default=None, help="'random': edge probability (default 2 ln N / N)")
    make.add_argument("--rows", type=int, default=None, help="'torus': number of rows (must divide N)")
    make.add_argument("--hubs", type=int, default=None, help="'bipartite': size of the small side (default 2)")
    make.add_argument("--directed", action="store_true", help="'exponential': one-way links i -> i + 2^k")
    make.set_defaults(_topology_main=_make)

    show = sub.add_parser("show", help="print neighbours, degrees, connectivity and spectral gap of a file",
                          description="Validate a topology file and describe it.")
    show.add_argument("file", metavar="FILE", help=".json, .yaml or .yml topology file")
    show.set_defaults(_topology_main=_show)


def main(args: argparse.Namespace) -> int:
    # report the library's warnings (asymmetric, disconnected) as plain lines, not Python warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = int(args._topology_main(args) or 0)
    for w in caught:
        print(f"dimat: warning: {w.message}", file=sys.stderr)
    return rc


def _make(args: argparse.Namespace) -> int:
    from dimat.topology import Topology

    kw = {}
    for name in ("p", "rows", "hubs"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    if args.directed:
        kw["directed"] = True
    topo = Topology.build(args.kind, args.agents, seed=args.seed, **kw)
    if args.output:
        topo.save(args.output)
        print(f"wrote {args.output} ({topo.graph_type}, {topo.num_agents} agents, "
              f"spectral gap {topo.spectral_gap():.4f})")
    else:
        sys.stdout.write(topo.dumps(args.format))
    return 0


def _show(args: argparse.Namespace) -> int:
    from dimat.topology import Topology

    print(Topology.load(args.file).describe())
    return 0
