"""``dimat launch CONFIG --transport grpc|torch [--agents N] [--out DIR]``: N local agent processes, one per agent.

Starts ``dimat agent`` N times on free local ports, writes ``OUT/peers.json`` and ``OUT/pids/agent-K.pid``, copies
the agents' metrics lines into ``OUT/metrics.jsonl`` as their rounds finish, waits, and writes ``OUT/summary.json``
as ``dimat run`` does. See docs/multiprocess.md.
"""

from __future__ import annotations

import argparse

HELP = "run each agent in its own local process, over gRPC or torch.distributed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config file")
    parser.add_argument("--transport", choices=("grpc", "torch"), default=None,
                        help="how agents exchange models (default: the config's transport.name)")
    parser.add_argument("--agents", type=int, default=None, metavar="N",
                        help="number of agent processes (overrides the config's 'agents')")
    parser.add_argument("--out", default=None, metavar="DIR", help="run folder (default: the config's 'out')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set transport.deadline_s=5 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="restart every agent from its last checkpoint")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop the agents after this many seconds (default: wait as long as they run; each "
                             "round is bounded by transport.deadline_s)")


def main(args: argparse.Namespace) -> int:
    import signal

    from dimat import launcher
    from dimat.config import load_config
    from dimat.errors import UserError

    overrides = list(args.overrides)
    if args.agents is not None:
        if args.agents < 1:
            raise UserError(f"--agents must be >= 1, got {args.agents}")
        overrides.append(f"agents={args.agents}")
    if args.timeout is not None and not args.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    cfg = load_config(args.config, overrides)
    transport = args.transport or cfg.transport.name
    if transport not in ("grpc", "torch"):
        raise UserError(f"{args.config}: transport.name is {transport!r}; dimat launch needs "
                        f"--transport grpc or --transport torch")
    # SIGTERM unwinds like Ctrl-C, so that the launcher stops its agents before it goes.
    signal.signal(signal.SIGTERM, _raise_exit)
    result = launcher.launch(cfg, transport, args.out or cfg.out, timeout=args.timeout, resume=args.resume)
    if result.summary is not None:
        s = result.summary
        print(f"dimat launch: run folder {result.out_dir}: final mean accuracy {_pct(s['final_mean_acc'])} "
              f"(min {_pct(s['final_min_acc'])}, max {_pct(s['final_max_acc'])}) in {s['wall_s']:.1f} s")
    if not result.ok:
        failed = result.wait.failed() or sorted(result.wait.returncodes)
        why = ", timed out" if result.wait.timed_out else ""
        print(f"dimat launch: the run did not finish (agents {failed} failed{why}); no summary.json; continue it "
              f"with: dimat launch {result.out_dir / 'config.yaml'} --transport {result.transport} "
              f"--out {result.out_dir} --resume")
        return 1
    return 0


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
