"""``memsess check`` and ``memsess inspect``: what an operator needs to see of a cluster.

Both only read, through memsess's own protocol and transport (so whatever the DSN can
say, TLS or credentials, they speak too), each server within its DSN ``timeout`` per
command. ``check`` asks every server for its stats and loads a few random, absent ids
through a SessionStore to see the health memsess gives each server; ``inspect`` reads each
copy of one session and never repairs it (that would change what is being inspected).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, Final, TextIO, TypeVar

from memsess.admin import RawCopy, ServerCheck, check_server, probe_health, read_copy
from memsess.dsn import ServerSpec, parse_dsn
from memsess.errors import ConnectError, DSNError, InvalidKeyError, MemsessError
from memsess.protocol import MAX_KEY_LENGTH, check_key
from memsess.records import (
    FLAGS,
    SEALED_PREFIX,
    TOMBSTONE,
    Record,
    decode_record,
    is_valid_id,
    plain_payload,
    storage_key,
)
from memsess.sealing import Sealer
from memsess.serializers import SERIALIZERS
from memsess.store import DEFAULT_REDUNDANCY, SessionStore

__all__ = [
    "EXIT_DEGRADED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNKNOWN",
    "EXIT_UNMET",
    "UsageError",
    "add_commands",
]

EXIT_OK: Final = 0  # every server up (check); every copy current (inspect)
EXIT_DEGRADED: Final = 1  # a server down or a UDP listener silent; a copy stale or missing
EXIT_UNMET: Final = 2  # fewer reachable servers than the redundancy; inspect: usage error
EXIT_NOT_FOUND: Final = 3  # inspect: every server answered, none holds the session
#: check: a usage or configuration error, nothing was asked (Nagios' UNKNOWN: a monitor
#: must not page "CRITICAL" for a typo in its own command line). inspect keeps 2 for
#: these, as 3 already means "no server holds the session" there.
EXIT_UNKNOWN: Final = 3
PROGRESS_AFTER: Final = 0.5  # seconds of waiting before check reports each server

T = TypeVar("T")


class UsageError(MemsessError, ValueError):
    """An option or DSN that does not make sense (a host that does not resolve, too):
    nothing is sent, one line goes to stderr, and the command exits with status 3
    (check) or 2 (inspect)."""


_CHECK_EPILOG = """exit status: 0 all servers up; 1 a server is down or its configured UDP
listener does not answer; 2 fewer servers reachable than --redundancy; 3 a usage or
configuration error, such as a malformed DSN or a host that does not resolve (nothing sent)"""
_INSPECT_EPILOG = """exit status: 0 every copy current; 1 a copy is stale, missing, corrupt
or unreadable; 2 malformed session id or usage error (nothing sent); 3 no server holds it"""


#: Where ``inspect`` finds the keys that open sealed records.
SECRET_KEYS_ENV: Final = "MEMSESS_SECRET_KEYS"  # noqa: S105 - a variable name, no key


def add_commands(commands: Any) -> None:
    """Add ``check`` and ``inspect`` to an argparse subparsers object; each sets ``run``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("dsn", metavar="DSN", help="save_path, e.g. 'tcp://a:11211, b:11211'")
    common.add_argument(
        "--redundancy",
        type=int,
        help="copies per session (default 2, or the server count if fewer)",
    )
    common.add_argument("--timeout", type=float, help="seconds per server (default: the DSN's)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("-v", "--verbose", action="store_true", help="log memsess events")
    check = commands.add_parser(
        "check", parents=[common], help="reachability, stats and health of every server"
    )
    check.epilog = _CHECK_EPILOG
    check.set_defaults(run=run_check)
    inspect = commands.add_parser(
        "inspect", parents=[common], help="where each copy of one session lives"
    )
    inspect.epilog = _INSPECT_EPILOG
    inspect.add_argument(
        "session_id", metavar="SESSION_ID", help="put -- before an id that starts with '-'"
    )
    inspect.add_argument("--key-prefix", default="memsess:", help="the store's key_prefix")
    inspect.add_argument("--show-data", action="store_true", help="print session contents")
    inspect.add_argument(
        "--secret-keys-env",
        default=SECRET_KEYS_ENV,
        metavar="NAME",
        help="environment variable holding the store's secret_keys, separated by commas,"
        f" to open sealed copies (default {SECRET_KEYS_ENV}; never on the command line,"
        " where ps would show them)",
    )
    inspect.set_defaults(run=run_inspect)


# -- shared helpers -------------------------------------------------------------------------


def _servers(args: argparse.Namespace) -> tuple[list[ServerSpec], int]:
    """The DSN's servers (``--timeout`` applied) and the redundancy asked for."""
    specs = list(parse_dsn(args.dsn))
    if args.timeout is not None:
        specs = [dataclasses.replace(spec, timeout=args.timeout) for spec in specs]
    redundancy: int = args.redundancy or 0
    if args.redundancy is None:
        redundancy = min(DEFAULT_REDUNDANCY, len(specs))
    if redundancy < 1:
        raise UsageError(f"--redundancy must be at least 1, got {redundancy}")
    return specs, redundancy


def _open_store(specs: list[ServerSpec], **options: Any) -> SessionStore:
    """A SessionStore on ``specs``. Making one sends nothing, so what fails here is the
    command line: a host that does not resolve, a TLS file that cannot be read, an
    option the store refuses; each becomes a UsageError."""
    try:
        return SessionStore(specs, **options)
    except (ConnectError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _gather(jobs: Mapping[str, Callable[[], T]], progress: TextIO) -> dict[str, T]:
    """Run every job at once (a hung server costs one timeout, not one each); after
    PROGRESS_AFTER seconds, report each job that finishes on ``progress``."""
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {pool.submit(job): name for name, job in jobs.items()}
        _, pending = wait(futures, timeout=PROGRESS_AFTER)
        if pending:
            progress.write(f"waiting for {', '.join(sorted(futures[f] for f in pending))} …\n")
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                progress.write(f"  {futures[future]}: done in {time.monotonic() - start:.1f} s\n")
            progress.flush()
        return {name: future.result() for future, name in futures.items()}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _configure_logging(verbose: bool) -> None:
    # The output already reports what the library would log; -v shows the events too.
    logger = logging.getLogger("memsess")
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)


# -- check ----------------------------------------------------------------------------------


def run_check(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``memsess check``: print a table (or JSON) of every server; return the exit status.

    Takes at most about (LATENCY_SAMPLES + 1) DSN timeouts and the UDP wait of the slowest
    server: servers are checked at once, each command within its server's timeout."""
    _configure_logging(args.verbose)
    try:
        specs, redundancy = _servers(args)
        # Each server gets its full timeout, no straggler cut-off: a state other than "up"
        # then means it failed the probe, not that it answered a few ms after its peer.
        patience = max(spec.timeout for spec in specs)
        redundancy_used = min(redundancy, len(specs))
        store = _open_store(specs, redundancy=redundancy_used, straggler_window=patience)
    except (DSNError, UsageError) as exc:
        sys.stderr.write(f"memsess check: {exc}\n")
        return EXIT_UNKNOWN
    with store:
        jobs: dict[str, Callable[[], Any]] = {
            spec.name: partial(check_server, spec) for spec in specs
        }
        jobs["health probe"] = lambda: probe_health(store)
        results = _gather(jobs, sys.stderr)
    checks: list[ServerCheck] = [results[spec.name] for spec in specs]
    for check, status in zip(checks, results["health probe"], strict=True):
        check.state, check.state_reason = status.state, status.reason
    code, verdict = _check_verdict(checks, redundancy)
    if args.json:
        report = {"servers": [dataclasses.asdict(c) for c in checks], "redundancy": redundancy}
        json.dump({**report, "verdict": verdict, "exit_status": code}, out, indent=2)
        out.write("\n")
    else:
        out.write(_check_table(checks) + "\n" + verdict + "\n")
    return code


def _check_verdict(checks: list[ServerCheck], redundancy: int) -> tuple[int, str]:
    down = [c.address for c in checks if not c.reachable]
    silent = [c.address for c in checks if c.udp.startswith("off")]
    reachable = len(checks) - len(down)
    if reachable < redundancy:
        return EXIT_UNMET, (
            f"CRITICAL: {reachable} of {len(checks)} servers reachable;"
            f" redundancy {redundancy} cannot be met"
        )
    problems = [f"down: {', '.join(down)}"] if down else []
    problems += [f"UDP listener not answering: {', '.join(silent)}"] if silent else []
    if problems:
        return EXIT_DEGRADED, (
            f"DEGRADED: {'; '.join(problems)} ({reachable} of {len(checks)} servers reachable,"
            f" redundancy {redundancy} still met)"
        )
    return EXIT_OK, f"OK: all {len(checks)} servers up; redundancy {redundancy} met"


def _check_table(checks: list[ServerCheck]) -> str:
    header = ["server", "reachable", "version", "latency", "items", "memory", "evictions"]
    header += ["udp", "memsess"]
    rows = []
    for c in checks:
        memory = "-"
        if c.memory_bytes is not None and c.memory_limit is not None:
            memory = f"{_size(c.memory_bytes)} / {_size(c.memory_limit)}"
        rows.append(
            (
                c.address,
                "yes" if c.reachable else f"no: {c.error}",
                c.version or "-",
                "-" if c.latency_ms is None else f"{c.latency_ms:.2f} ms",
                "-" if c.items is None else str(c.items),
                memory,
                "-" if c.evictions is None else str(c.evictions),
                c.udp,
                c.state + (f" ({c.state_reason})" if c.state_reason and c.reachable else ""),
            )
        )
    return _table(header, rows)


# -- inspect --------------------------------------------------------------------------------


@dataclass
class CopyReport:
    """One server's copy of the inspected session."""

    address: str
    role: str  # "replica 1", "replica 2", ... in ring order; "extra" outside the replica set
    status: str  # "current", "stale", "missing", "corrupt", "sealed", "unreachable"; "newer"
    kind: str = ""  # "data" or "tombstone"
    version: int | None = None  # microseconds since the epoch when written (hybrid clock)
    size: int | None = None  # bytes stored, 16-byte record header included
    ttl: int | None = None  # seconds left; -1 never expires; None unknown (no meta commands)
    detail: str = ""  # why unreachable or corrupt
    data: Any = None  # the decoded session, only with --show-data


def run_inspect(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``memsess inspect``: print each copy of one session; return the exit status."""
    if not is_valid_id(args.session_id):
        sys.stderr.write(
            "memsess inspect: SESSION_ID is not a memsess session id"
            " (expected 43 URL-safe characters); nothing was sent\n"
        )
        return EXIT_UNMET
    _configure_logging(args.verbose)
    specs, redundancy = _servers(args)
    if redundancy > len(specs):
        raise UsageError(
            f"--redundancy {redundancy} needs that many servers; the DSN has {len(specs)}"
        )
    key = _storage_key(args.key_prefix, args.session_id)
    with _open_store(specs, redundancy=redundancy, key_prefix=args.key_prefix) as store:
        replicas = store.locate(args.session_id)  # pure: the ring, nothing sent
    sealer = _sealer(args.secret_keys_env)
    reads = _gather({spec.name: partial(read_copy, spec, key) for spec in specs}, sys.stderr)
    opener = partial(_open, sealer, key)
    copies = _classify(specs, replicas, reads, opener, show_data=args.show_data)
    code, state = _inspect_verdict([c for c in copies if c.role != "extra"])
    # The user typed the id, but output gets pasted into tickets: echo a prefix only.
    shown = args.session_id[:8] + "…"
    if args.json:
        report = {"session_prefix": args.session_id[:8], "key": key.decode(), "state": state}
        report["exit_status"] = code
        copies_json = [dataclasses.asdict(copy) for copy in copies]
        json.dump({**report, "copies": copies_json}, out, indent=2, default=str)
        out.write("\n")
    else:
        out.write(_inspect_text(shown, key, state, copies, redundancy))
    return code


def _storage_key(key_prefix: str, session_id: str) -> bytes:
    """The memcached key of the session; a UsageError for a prefix memcached cannot take."""
    try:
        return check_key(storage_key(key_prefix.encode("ascii"), session_id))
    except (UnicodeEncodeError, InvalidKeyError) as exc:
        raise UsageError(
            f"--key-prefix {key_prefix!r} cannot start a memcached key: it must be ASCII,"
            " without spaces or control characters, and at most"
            f" {MAX_KEY_LENGTH - len(storage_key(b'', session_id))} characters"
        ) from exc


def _sealer(variable: str) -> Sealer | None:
    """The opener of sealed copies, from the keys in environment ``variable`` (if set)."""
    value = os.environ.get(variable, "")
    keys = [key for key in re.split(r"[,\s]+", value) if key]
    if not keys:
        return None
    try:
        return Sealer(keys)
    except (TypeError, ValueError, ImportError) as exc:  # no message holds a key
        raise UsageError(f"${variable}: {exc}") from None


def _open(sealer: Sealer | None, key: bytes, raw: bytes, flags: int) -> Record:
    """The record stored as ``raw``, as the store reads it; ValueError if it cannot.
    A sealed copy with no keys to open it is a KeyError."""
    if sealer is not None:
        return sealer.open_record(raw, flags, key)
    if raw[:2] == SEALED_PREFIX and flags == FLAGS:
        raise KeyError(f"sealed record: set ${SECRET_KEYS_ENV} (or --secret-keys-env) to open it")
    return decode_record(raw, flags)


def _classify(
    specs: list[ServerSpec],
    replicas: tuple[str, ...],
    reads: dict[str, RawCopy],
    opener: Callable[[bytes, int], Record],
    *,
    show_data: bool,
) -> list[CopyReport]:
    """One report per replica-set server, then servers outside it that hold a copy."""
    copies = []
    for spec in specs:
        in_set = spec.name in replicas
        role = f"replica {replicas.index(spec.name) + 1}" if in_set else "extra"
        copy = _copy_report(spec.name, role, reads[spec.name], opener, show_data=show_data)
        if in_set or copy.version is not None or copy.status in ("corrupt", "sealed"):
            copies.append(copy)
    # The newest copy of the replica set is what a load returns; an extra copy is only
    # compared with it (it can be "newer" when the application uses more copies).
    newest = max((c.version or 0 for c in copies if c.role != "extra"), default=0)
    for copy in copies:
        if copy.version is not None:
            copy.status = "current" if copy.version == newest else "stale"
            copy.status = "newer" if copy.version > newest else copy.status
    order = {address: position for position, address in enumerate(replicas)}
    return sorted(copies, key=lambda c: order.get(c.address, len(order)))


def _copy_report(
    address: str,
    role: str,
    read: RawCopy,
    opener: Callable[[bytes, int], Record],
    *,
    show_data: bool,
) -> CopyReport:
    """What one server holds; the status of a decodable copy is set by its version."""
    if read.error:
        return CopyReport(address, role, "unreachable", detail=read.error)
    if read.value is None:
        return CopyReport(address, role, "missing")
    size = len(read.value)
    try:
        record = opener(read.value, read.flags)
    except KeyError as exc:
        return CopyReport(address, role, "sealed", size=size, ttl=read.ttl, detail=exc.args[0])
    except ValueError as exc:
        return CopyReport(address, role, "corrupt", size=size, ttl=read.ttl, detail=str(exc))
    if record.kind == TOMBSTONE:
        return CopyReport(address, role, "", "tombstone", record.version, size, read.ttl)
    data = _decode_data(record) if show_data else None
    return CopyReport(address, role, "", "data", record.version, size, read.ttl, data=data)


def _decode_data(record: Record) -> Any:
    serializer = SERIALIZERS.get(record.serializer_id)
    if serializer is None:
        return f"(serializer id {record.serializer_id} is not built in; cannot decode)"
    try:
        return serializer.loads(plain_payload(record))
    except ValueError as exc:
        return f"(undecodable: {exc})"


def _inspect_verdict(replica_copies: list[CopyReport]) -> tuple[int, str]:
    current = [c for c in replica_copies if c.status == "current"]
    if not current:
        unreadable = any(c.status in ("unreachable", "sealed") for c in replica_copies)
        sealed = any(c.status == "sealed" for c in replica_copies)
        return (EXIT_DEGRADED if unreadable else EXIT_NOT_FOUND), "sealed" if sealed else "absent"
    state = "logged out" if current[0].kind == "tombstone" else "live"
    return (EXIT_OK if len(current) == len(replica_copies) else EXIT_DEGRADED), state


def _inspect_text(
    shown: str, key: bytes, state: str, copies: list[CopyReport], redundancy: int
) -> str:
    lines = [f"session {shown} (memcached key {key.decode()}): {state}"]
    versions = [c.version for c in copies if c.version is not None and c.role != "extra"]
    newest = max(versions, default=None)
    if newest is not None:
        written = datetime.fromtimestamp(newest / 1e6, tz=timezone.utc)
        age = time.time() - newest / 1e6
        lines.append(
            f"newest version {newest}, written {written:%Y-%m-%d %H:%M:%S} UTC ({age:.0f} s ago)"
        )
    repairs = [
        c for c in copies if c.role != "extra" and c.status in ("stale", "missing", "corrupt")
    ]
    if newest is not None and repairs:
        lines.append(f"a load now would repair {len(repairs)} of {redundancy} copies")
    if any(c.role == "extra" for c in copies):
        lines.append(
            f"extra: a copy outside the replica set for redundancy {redundancy}"
            " (does --redundancy match the application's?)"
        )
    header = ("copy", "server", "status", "kind", "version", "size", "expires in", "detail")
    rows = [
        (
            c.role,
            c.address,
            c.status,
            c.kind or "-",
            "-" if c.version is None else str(c.version),
            "-" if c.size is None else _size(c.size),
            "-" if c.ttl is None else "never" if c.ttl < 0 else f"{c.ttl} s",
            c.detail,
        )
        for c in copies
    ]
    text = "\n".join(lines) + "\n\n" + _table(header, rows)
    holders: dict[int, list[str]] = {}  # version -> copies holding it, data shown once each
    for c in copies:
        if c.data is not None and c.version is not None:
            holders.setdefault(c.version, []).append(c.role)
    for version, roles in holders.items():
        data = next(c.data for c in copies if c.version == version)
        text += f"\ndata of version {version} ({', '.join(roles)}): {data!r}\n"
    return text
