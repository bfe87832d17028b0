"""``dimat topology make KIND --agents N [-o FILE]`` and ``dimat topology show SPEC [SPEC ...]``."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

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

    show = sub.add_parser("show", help="print neighbours, degrees, connectivity and spectral gap of a topology "
                                       "or of a schedule over a period",
                          description="Validate a topology file and describe it; or describe a time-varying "
                                      "topology: the mixing of a period (spectral gap of the product of its "
                                      "mixing matrices) and the graphs of its first rounds. Several SPECs are a "
                                      "list cycled by round, as in a config's 'topology: [a.json, b.json]'.")
    show.add_argument("spec", metavar="SPEC", nargs="+",
                      help="a .json/.yaml/.yml topology file, a kind (ring, ...; needs --agents) or a schedule "
                           "(one-peer-exponential, random-matching; needs --agents)")
    show.add_argument("--agents", "-n", type=int, default=None, metavar="N",
                      help="number of agents (default: the file's)")
    show.add_argument("--seed", type=int, default=0, help="seed of 'random-matching' and 'random' (default 0)")
    show.add_argument("--rounds", type=int, default=None, metavar="T",
                      help="rounds to mix over (default: the schedule's period; ceil(log2 N) without one)")
    show.add_argument("--show-rounds", type=int, default=None, metavar="K",
                      help="list the graphs of the first K rounds (default: the mixing window, at most 8)")
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
    from dimat.errors import UserError
    from dimat.schedule import Schedule
    from dimat.topology import Topology

    single_file = len(args.spec) == 1 and Path(args.spec[0]).suffix.lower() in (".json", ".yaml", ".yml")
    if single_file and args.rounds is None and args.show_rounds is None:
        topo = Topology.load(args.spec[0])
        if args.agents is not None and args.agents != topo.num_agents:
            raise UserError(f"{args.spec[0]}: field 'num_agents': the file has {topo.num_agents} agents, "
                            f"--agents says {args.agents}")
        print(topo.describe())
        return 0
    n = args.agents
    if n is None:
        files = [s for s in args.spec if Path(s).suffix.lower() in (".json", ".yaml", ".yml")]
        if not files:
            raise UserError(f"{' '.join(args.spec)}: give --agents N (the number of agents)")
        n = Topology.load(files[0]).num_agents
    spec = args.spec[0] if len(args.spec) == 1 else list(args.spec)
    print(Schedule.from_spec(spec, n, seed=args.seed).describe(rounds=args.rounds, show_rounds=args.show_rounds))
    return 0
