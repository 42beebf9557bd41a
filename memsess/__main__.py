"""The ``memsess`` command line: ``demo``, ``check DSN`` and ``inspect DSN SESSION_ID``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Final

from memsess.cli import EXIT_UNMET, UsageError, add_commands
from memsess.errors import DSNError

#: ``memsess demo`` could not run at all (its 1 means wrong answers were seen).
EXIT_NO_MEMCACHED: Final = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (see ``memsess COMMAND --help``)."""
    parser = argparse.ArgumentParser(prog="memsess", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run 1000 sessions on 3 local memcached servers through single faults"
    )
    demo.add_argument(
        "--secure",
        action="store_true",
        help="the same faults over TLS with ASCII authentication and sealed records"
        " (needs pip install memsess[crypto])",
    )
    add_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from memsess.demo import run_demo
        from memsess.testing import MemcachedNotFoundError  # (pulls in pytest, when present)

        try:
            return run_demo(sys.stdout, secure=args.secure)
        except MemcachedNotFoundError:  # the usual first run: one line, not a traceback
            sys.stderr.write(f"memsess demo: {_no_memcached()}\n")
            return EXIT_NO_MEMCACHED
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (DSNError, UsageError) as exc:  # a DSN or option that does not make sense
        sys.stderr.write(f"memsess {args.command}: {exc}\n")
        return EXIT_UNMET


def _no_memcached() -> str:
    """What to do when the demo finds no memcached binary to start (one line)."""
    configured = os.environ.get("MEMSESS_MEMCACHED")
    where = f"at MEMSESS_MEMCACHED={configured!r}" if configured else "on PATH"
    return (
        f"memcached not found {where}; install it (Debian/Ubuntu: sudo apt-get install"
        " memcached; macOS: brew install memcached) or set MEMSESS_MEMCACHED to its path"
    )


if __name__ == "__main__":
    sys.exit(main())
