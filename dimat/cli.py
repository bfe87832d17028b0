"""The ``dimat`` command line: a thin dispatcher over one module per sub-command in :mod:`dimat.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``; modules
import their heavy dependencies inside ``main`` so that ``dimat --help`` stays fast. A :class:`UserError` becomes
one line ``dimat: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from dimat.errors import UserError

#: sub-command name -> module; order is the order of ``dimat --help``.
COMMANDS = {
    "run": "dimat.commands.run",
    "plot": "dimat.commands.plot",
    "topology": "dimat.commands.topology",
    "agent": "dimat.commands.agent",
    "launch": "dimat.commands.launch",
    "bench": "dimat.commands.bench",
    "model": "dimat.commands.model",
}


def _load_commands() -> dict:
    mods = {}
    for name, modname in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:  # a missing dependency inside the module is a real error
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dimat", description="Decentralized merge-and-train (DIMAT).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, mod in _load_commands().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except UserError as e:
        print(f"dimat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dimat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
