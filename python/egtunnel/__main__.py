"""Command line of egtunnel: `python -m egtunnel COMMAND ...`.

Each command lives in its own module and adds itself here as an argparse subcommand, so this file
only assembles them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import check, kernelspec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m egtunnel",
        description="Native SSH tunnels for Jupyter Enterprise Gateway kernels.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    kernelspec.register(commands)
    check.register(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
