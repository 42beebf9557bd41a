"""The ``memsess`` command line: ``memsess demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memsess", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo", help="run 1000 sessions on 3 local memcached servers through single faults"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from memsess.demo import run_demo

        return run_demo(sys.stdout)
    parser.error(f"unknown command {args.command}")  # pragma: no cover - argparse rejects first
    return 2


if __name__ == "__main__":
    sys.exit(main())
