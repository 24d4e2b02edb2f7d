"""The ``yoco`` command line: ``build_parser`` assembles the commands (``yoco.commands``, one module
each) and ``main`` runs one, turning any yoco error into one line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .allocator import retain_freed_memory
from .arguments import Parser
from .commands import COMMANDS
from .errors import YocoError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="yoco", description="YOCO and KV-cache-efficient language models")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad option, already named on one line (2)
        return e.code if isinstance(e.code, int) else 2
    retain_freed_memory()  # a yoco process reuses its freed activations (see yoco.allocator)
    try:
        return args.func(args)
    except YocoError as e:
        print(f"yoco {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
