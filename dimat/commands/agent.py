"""``dimat agent CONFIG --rank K [--transport grpc|torch] [--resume | --join]``: run one agent of a multi-process run.

Under torchrun the rank (and world size) come from the environment (``RANK``, ``WORLD_SIZE``) and the transport
defaults to ``torch``. Over gRPC the agents' addresses come from ``--peers FILE`` (``{"peers": {"0": "host:port",
...}}``) or from the topology file's ``peers``. See docs/multiprocess.md.
"""

from __future__ import annotations

import argparse
import os
from typing import Mapping, Optional

HELP = "run one agent (one process) of a gRPC or torch.distributed run"

#: Variables torchrun (torch.distributed.run) sets for every worker; any of them means "we run under torchrun".
TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config file (the same for every agent)")
    parser.add_argument("--rank", type=int, default=None, metavar="K",
                        help="this agent's rank 0..N-1 (default: $RANK, as set by torchrun)")
    parser.add_argument("--transport", choices=("grpc", "torch"), default=None,
                        help="how agents exchange models (default: torch under torchrun, else transport.name)")
    parser.add_argument("--peers", default=None, metavar="FILE",
                        help="gRPC: JSON file mapping every rank to host:port (default: the topology's peers)")
    parser.add_argument("--out", default=None, metavar="DIR", help="run folder (default: the config's 'out')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set transport.deadline_s=5 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from this agent's last checkpoint and rejoin the running agents (gRPC, no "
                             "checkpoint: start from a live neighbour's state)")
    parser.add_argument("--join", action="store_true",
                        help="gRPC: join a running run from a live neighbour's state, on a machine with no run "
                             "folder yet (implies --resume)")


def resolve_rank(arg: Optional[int], env: Mapping[str, str] = os.environ) -> int:
    """The agent's rank from ``--rank`` or ``$RANK`` (they must agree when both are given)."""
    from dimat.errors import UserError

    env_rank = env.get("RANK")
    if env_rank is not None:
        try:
            env_value = int(env_rank)
        except ValueError:
            raise UserError(f"environment variable RANK={env_rank!r} is not an integer") from None
        if arg is not None and arg != env_value:
            raise UserError(f"--rank {arg} disagrees with RANK={env_value} from the environment (torchrun)")
        arg = env_value
    if arg is None:
        raise UserError("give the agent's rank with --rank K (or run under torchrun, which sets RANK)")
    if arg < 0:
        raise UserError(f"--rank must be >= 0, got {arg}")
    return arg


def resolve_transport(arg: Optional[str], configured: str, env: Mapping[str, str] = os.environ) -> str:
    """``--transport``, else ``torch`` under torchrun, else the config's ``transport.name`` if it is multi-process."""
    from dimat.errors import UserError

    if arg is not None:
        return arg
    if any(v in env for v in TORCHRUN_VARS):
        return "torch"
    if configured in ("grpc", "torch"):
        return configured
    raise UserError(f"transport.name is {configured!r}; a single agent needs --transport grpc or --transport torch")


def main(args: argparse.Namespace) -> int:
    import signal
    import sys

    from dimat import launcher
    from dimat.config import load_config
    from dimat.errors import UserError

    cfg = load_config(args.config, args.overrides)
    rank = resolve_rank(args.rank)
    transport = resolve_transport(args.transport, cfg.transport.name)
    out = args.out or cfg.out
    # The pid file first, before the heavy imports: a launcher follows a restarted agent through it.
    launcher.write_pid_file(out, rank)
    # SIGTERM (a launcher stopping us) unwinds like Ctrl-C, so transports close and the exit file is written.
    signal.signal(signal.SIGTERM, _raise_exit)
    status = 1
    try:
        from dimat.agent_main import run_agent

        status = run_agent(cfg, rank, transport, out, peers_file=args.peers, resume=args.resume,
                           join=args.join)
    except UserError:
        status = 2
        raise
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        raise
    except KeyboardInterrupt:
        status = 130
        raise
    except Exception as e:
        if not launcher.is_addr_in_use(e):
            raise
        print(f"dimat: error: agent {rank}: cannot listen: the port is taken, or the address is not one of this "
              f"host's ({e})", file=sys.stderr)
        status = launcher.EXIT_PORT_IN_USE
    finally:
        # From here on a SIGTERM just ends the process: raising in interpreter teardown only prints noise.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        launcher.write_exit_file(out, rank, status)
    return status


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
