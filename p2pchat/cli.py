"""The ``p2pchat`` command line.

For now it knows ``--version`` and ``--help``; the subcommands (init, run, send, demo, ...) arrive with the node.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from p2pchat import __version__
from p2pchat.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for the ``p2pchat`` command."""
    parser = argparse.ArgumentParser(
        prog="p2pchat",
        description="A peer-to-peer, serverless, end-to-end-encrypted messenger.",
    )
    parser.add_argument("--version", action="version", version=f"p2pchat {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except UserError as exc:
        print(f"p2pchat: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 0
