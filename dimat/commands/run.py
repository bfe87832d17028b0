"""``dimat run CONFIG [--set key.sub=value ...] [--out DIR] [--resume] [--quiet]``: simulate every agent in one
process and write the run folder (config.yaml, metrics.jsonl, summary.json, checkpoints/)."""

from __future__ import annotations

import argparse

HELP = "run a decentralized merge-and-train simulation from a YAML config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see docs/config.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=0.01 (repeatable; VALUE is YAML)")
    parser.add_argument("--out", help="run folder (default: the config's 'out', else runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in the run folder from its last complete round")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    import json

    from dimat.config import load_config
    from dimat.runner import run

    cfg = load_config(args.config, args.overrides)
    if args.out is not None:
        cfg["out"] = args.out
    summary = run(cfg, cfg["out"], resume=args.resume, quiet=args.quiet)
    print(json.dumps(summary))
    print(f"dimat: run folder {cfg['out']}: final mean accuracy {summary['final_mean_acc']:.4f} "
          f"(min {summary['final_min_acc']:.4f}, max {summary['final_max_acc']:.4f}) in {summary['wall_s']:.1f} s")
    return 0
