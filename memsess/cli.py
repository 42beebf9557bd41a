"""``memsess check`` and ``memsess inspect``: what an operator needs to see of a cluster.

Both go through memsess's own protocol and transport (so whatever the DSN can say, TLS
or credentials, they speak too), each server within its DSN ``timeout`` per command.
``check`` asks every server for its stats, stores, reads back and deletes one item of its
own, and loads a few random, absent ids through a SessionStore to see the health memsess
gives each server; ``inspect`` reads each copy of one session, classifies the copies as the
store does (memsess.copies) and never repairs one (that would change what is inspected).
Exit statuses follow Nagios: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (a usage error).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, Final, NoReturn, TextIO, TypeVar

from memsess import __compiled__, __version__
from memsess._build import describe as describe_build
from memsess.admin import RawCopy, ServerCheck, check_server, probe_health, read_copy
from memsess.copies import Classified, Copy, CopyStatus, classify, open_copy
from memsess.dsn import ServerSpec, parse_dsn
from memsess.errors import ConnectError, DSNError, InvalidKeyError, MemsessError
from memsess.protocol import MAX_KEY_LENGTH, check_key
from memsess.records import Record, is_valid_id, new_id, plain_payload, storage_key
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

# Server state alone uses 0, 1 and 2 (Nagios' OK, WARNING, CRITICAL); 3 is UNKNOWN.
EXIT_OK: Final = 0  # every server up (check); every copy current (inspect)
EXIT_DEGRADED: Final = 1  # a server down or a UDP listener silent; a copy not current
EXIT_UNMET: Final = 2  # check: fewer reachable servers than the redundancy
EXIT_NOT_FOUND: Final = 2  # inspect: every server answered, none holds the session
#: Either command: a usage or configuration error, nothing was asked (a monitor must not
#: page "CRITICAL" for a typo in its own command line).
EXIT_UNKNOWN: Final = 3
PROGRESS_AFTER: Final = 0.5  # seconds of waiting before check reports each server

T = TypeVar("T")


class UsageError(MemsessError, ValueError):
    """An option or DSN that does not make sense (a host that does not resolve, too):
    nothing is sent, one line goes to stderr, and the command exits with status 3."""


_CHECK_EPILOG = """exit status: 0 all servers up; 1 a server is down, fails a session-sized
set/get/delete, or its configured UDP listener does not answer; 2 fewer servers reachable
than --redundancy; 3 a usage or configuration error, such as a malformed DSN or a host that
does not resolve (nothing sent)"""
_INSPECT_EPILOG = """exit status: 0 every copy current; 1 a copy is stale, missing,
corrupt, sealed or unreachable; 2 no server holds it (every server answered); 3 a usage or
configuration error, such as a malformed session id (nothing sent)"""


#: Where ``inspect`` finds the keys that open sealed records.
SECRET_KEYS_ENV: Final = "MEMSESS_SECRET_KEYS"  # noqa: S105 - a variable name, no key
_SEALED_DETAIL: Final = f"sealed record: set ${SECRET_KEYS_ENV} (or --secret-keys-env) to open it"


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
    common.add_argument("--key-prefix", default="memsess:", help="the store's key_prefix")
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
    _usage_errors_exit_unknown(check)
    _usage_errors_exit_unknown(inspect)


def _usage_errors_exit_unknown(parser: argparse.ArgumentParser) -> None:
    """argparse answers a bad command line with its usage and status 2, CRITICAL to a
    monitor; here it is one line and EXIT_UNKNOWN, as a bad DSN is. (Arguments left over
    would be refused by the top parser: this one refuses them first, the same way.)"""

    def error(message: str) -> NoReturn:
        parser.exit(EXIT_UNKNOWN, f"{parser.prog}: {message}\n")

    parse = parser.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = parse(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    # Per instance: the parser's class is the top parser's choice (add_subparsers).
    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign,assignment]


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
        store = SessionStore(specs, **options)
    except (ConnectError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    # A store starts a server whose host does not resolve as down (a DNS hiccup must not
    # stop an app from starting); for a command line it is a mistake to say at once.
    for pool in store._cluster.pools:
        if pool.unresolved is not None:
            store.close()
            raise UsageError(str(pool.unresolved))
    return store


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

    Takes at most about (LATENCY_SAMPLES + 4) DSN timeouts (stats, then the set, get and
    delete of admin.round_trip) and the UDP wait of the slowest server: servers are
    checked at once, each command within its server's timeout."""
    _configure_logging(args.verbose)
    try:
        specs, redundancy = _servers(args)
        key_prefix = _key_prefix(args.key_prefix)
        # Each server gets its full timeout, no straggler cut-off: a state other than "up"
        # then means it failed the probe, not that it answered a few ms after its peer.
        patience = max(spec.timeout for spec in specs)
        redundancy_used = min(redundancy, len(specs))
        store = _open_store(
            specs,
            redundancy=redundancy_used,
            straggler_window=patience,
            key_prefix=args.key_prefix,
        )
    except (DSNError, UsageError) as exc:
        sys.stderr.write(f"memsess check: {exc}\n")
        return EXIT_UNKNOWN
    with store:
        jobs: dict[str, Callable[[], Any]] = {
            spec.name: partial(check_server, spec, key_prefix) for spec in specs
        }
        jobs["health probe"] = lambda: probe_health(store)
        results = _gather(jobs, sys.stderr)
    checks: list[ServerCheck] = [results[spec.name] for spec in specs]
    for check, status in zip(checks, results["health probe"], strict=True):
        check.state, check.state_reason = status.state, status.reason
    code, verdict = _check_verdict(checks, redundancy)
    build = f"memsess {__version__}, {describe_build()}"
    if args.json:
        report = {"servers": [dataclasses.asdict(c) for c in checks], "redundancy": redundancy}
        report |= {"memsess": __version__, "compiled": __compiled__, "build": describe_build()}
        json.dump({**report, "verdict": verdict, "exit_status": code}, out, indent=2)
        out.write("\n")
    else:
        out.write(_check_table(checks) + "\n" + verdict + "\n" + build + "\n")
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
    status: str  # a CopyStatus value: "current", "stale", "missing", "corrupt", ...
    kind: str = ""  # "data" or "tombstone"
    version: int | None = None  # microseconds since the epoch when written (hybrid clock)
    size: int | None = None  # bytes stored, 16-byte record header included
    ttl: int | None = None  # seconds left; -1 never expires; None unknown (no meta commands)
    detail: str = ""  # why unreachable or corrupt
    data: Any = None  # the decoded session, only with --show-data


def run_inspect(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``memsess inspect``: print each copy of one session; return the exit status."""
    _configure_logging(args.verbose)
    try:
        key, specs, replicas, sealer = _inspect_setup(args)
    except (DSNError, UsageError) as exc:
        sys.stderr.write(f"memsess inspect: {exc}\n")
        return EXIT_UNKNOWN
    reads = _gather({spec.name: partial(read_copy, spec, key) for spec in specs}, sys.stderr)
    copies = {
        address: None if read.error else open_copy(read.value, read.flags, None, key, sealer)
        for address, read in reads.items()
    }
    # Without keys, inspect cannot tell a sealed copy the store opens from one it does not.
    keys_unknown = sealer is None
    replica_set = classify([copies[address] for address in replicas], keys_unknown=keys_unknown)
    reports = _reports(
        specs,
        replicas,
        replica_set,
        copies,
        reads,
        keys_unknown=keys_unknown,
        show_data=args.show_data,
    )
    code = _inspect_status(replica_set)
    state = replica_set.state.value
    # The user typed the id, but output gets pasted into tickets: echo a prefix only.
    shown = args.session_id[:8] + "…"
    if args.json:
        report = {"session_prefix": args.session_id[:8], "key": key.decode(), "state": state}
        report["exit_status"] = code
        copies_json = [dataclasses.asdict(copy) for copy in reports]
        json.dump({**report, "copies": copies_json}, out, indent=2, default=str)
        out.write("\n")
    else:
        out.write(_inspect_text(shown, key, state, reports, len(replicas)))
    return code


def _inspect_setup(
    args: argparse.Namespace,
) -> tuple[bytes, list[ServerSpec], tuple[str, ...], Sealer | None]:
    """The session's key, the servers, its replica set (in ring order) and the opener of
    sealed copies; a UsageError, before anything is sent, for what cannot be used."""
    if not is_valid_id(args.session_id):
        raise UsageError(
            "SESSION_ID is not a memsess session id (expected 43 URL-safe characters);"
            " nothing was sent"
        )
    specs, redundancy = _servers(args)
    if redundancy > len(specs):
        raise UsageError(
            f"--redundancy {redundancy} needs that many servers; the DSN has {len(specs)}"
        )
    key = storage_key(_key_prefix(args.key_prefix), args.session_id)
    with _open_store(specs, redundancy=redundancy, key_prefix=args.key_prefix) as store:
        replicas = store.locate(args.session_id)  # pure: the ring, nothing sent
    return key, specs, replicas, _sealer(args.secret_keys_env)


def _key_prefix(key_prefix: str) -> bytes:
    """``--key-prefix`` as memcached takes it; a UsageError for one it cannot take (in
    front of a session's key, the longest that check and inspect use)."""
    try:
        prefix = key_prefix.encode("ascii")
        check_key(storage_key(prefix, new_id()))
    except (UnicodeEncodeError, InvalidKeyError) as exc:
        raise UsageError(
            f"--key-prefix {key_prefix!r} cannot start a memcached key: it must be ASCII,"
            " without spaces or control characters, and at most"
            f" {MAX_KEY_LENGTH - len(storage_key(b'', new_id()))} characters"
        ) from exc
    return prefix


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


def _reports(
    specs: list[ServerSpec],
    replicas: tuple[str, ...],
    replica_set: Classified,
    copies: dict[str, Copy | None],
    reads: dict[str, RawCopy],
    *,
    keys_unknown: bool,
    show_data: bool,
) -> list[CopyReport]:
    """One report per replica-set server in ring order, then each server outside it that
    holds an item (an extra copy is compared with the replica set's newest: it can be
    "newer" when the application uses more copies)."""
    reports = [
        _report(
            address, f"replica {n}", copies[address], status, reads[address], show_data=show_data
        )
        for n, (address, status) in enumerate(zip(replicas, replica_set.statuses, strict=True), 1)
    ]
    newest = 0 if replica_set.newest is None else replica_set.newest.version
    for spec in specs:
        copy = copies[spec.name]
        if spec.name not in replicas and copy is not None and copy.raw:
            status = copy.status(newest, keys_unknown=keys_unknown)
            report = _report(
                spec.name, "extra", copy, status, reads[spec.name], show_data=show_data
            )
            reports.append(report)
    return reports


def _report(
    address: str,
    role: str,
    copy: Copy | None,
    status: CopyStatus,
    read: RawCopy,
    *,
    show_data: bool,
) -> CopyReport:
    """What one server holds, as ``status`` (memsess.copies) names it."""
    if copy is None:
        return CopyReport(address, role, status.value, detail=read.error)
    if not copy.raw:
        return CopyReport(address, role, status.value)
    record = copy.record
    detail = _SEALED_DETAIL if status is CopyStatus.SEALED else copy.problem
    if record is None:
        return CopyReport(
            address, role, status.value, size=len(copy.raw), ttl=read.ttl, detail=detail
        )
    kind = "tombstone" if record.is_tombstone else "data"
    data = _printable(_decode_data(record)) if show_data and kind == "data" else None
    return CopyReport(
        address, role, status.value, kind, record.version, len(copy.raw), read.ttl, data=data
    )


def _decode_data(record: Record) -> Any:
    serializer = SERIALIZERS.get(record.serializer_id)
    if serializer is None:
        return f"(serializer id {record.serializer_id} is not built in; cannot decode)"
    try:
        return serializer.loads(plain_payload(record))
    except ValueError as exc:
        return f"(undecodable: {exc})"


class _LongInt(str):
    """Shown in place of an int too long for ``str()`` (``sys.get_int_max_str_digits()``,
    4300 by default, while msgpack stores ~9,900 digits): repr() and json raise on one."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _printable(value: Any) -> Any:
    """``value`` with every int too long for ``str()`` replaced by a :class:`_LongInt`,
    in the containers the serializers decode to (dict keys and values, list, tuple, set)."""
    if isinstance(value, int):
        try:
            str(value)  # refused before any conversion work when far over the limit
        except ValueError:
            sign = "negative " if value < 0 else ""
            return _LongInt(f"<{sign}int of {_decimal_digits(abs(value))} digits>")
        return value
    if type(value) is dict:
        return {_printable(key): _printable(item) for key, item in value.items()}
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_printable(item) for item in value)
    return value


def _decimal_digits(magnitude: int) -> int:
    """How many digits ``str(magnitude)`` would have (magnitude > 0), without str()."""
    digits = int(math.log10(magnitude)) + 1  # log10 takes any int; its float may be off by one
    if magnitude >= 10**digits:
        return digits + 1
    if magnitude < 10 ** (digits - 1):
        return digits - 1
    return digits


def _inspect_status(replica_set: Classified) -> int:
    """The exit status of inspect, from the replica set's copies."""
    statuses = replica_set.statuses
    if replica_set.newest is None:
        unread = CopyStatus.UNREACHABLE in statuses or CopyStatus.SEALED in statuses
        return EXIT_DEGRADED if unread else EXIT_NOT_FOUND
    return EXIT_OK if all(s is CopyStatus.CURRENT for s in statuses) else EXIT_DEGRADED


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
    repairs = [c for c in copies if c.role != "extra" and CopyStatus(c.status).repaired]
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
