"""Admin calls to one memcached server over memsess's own protocol and transport: stats,
latency and a session-sized round trip, the UDP listener, and the raw bytes, flags and
remaining lifetime of one key; and the health a SessionStore gives each server after one
probe read.

Used by ``memsess check`` and ``memsess inspect``. Only the round trip writes, under a
key of its own that it deletes. Every command is one exchange under the server's DSN
``timeout`` (a whole-exchange deadline, however the reply trickles in), and a server's
commands stop at its first failure.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import secrets
import select
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from math import ceil
from typing import Final, TypeVar

from memsess import protocol
from memsess.cluster import ServerStatus
from memsess.dsn import ServerSpec
from memsess.errors import MemsessError, ProtocolError
from memsess.protocol import Command, ErrorReply, MetaItem, Reply, Stats, Status, Values, Version
from memsess.records import new_id
from memsess.store import SessionStore
from memsess.transport import ServerPool, UdpPool, fanout
from memsess.transport.udp import read_datagrams
from memsess.transport.udp_core import UdpRead

__all__ = [
    "LATENCY_SAMPLES",
    "ROUND_TRIP_INFIX",
    "ROUND_TRIP_LIFETIME",
    "ROUND_TRIP_SIZE",
    "UDP_TIMEOUT",
    "RawCopy",
    "ServerCheck",
    "check_server",
    "check_udp",
    "describe_error",
    "probe_health",
    "read_copy",
    "round_trip",
]

LATENCY_SAMPLES: Final = 3  # round trips timed per server; the fastest is reported
#: Seconds the UDP listener gets to answer (less when the server's timeout is shorter);
#: loopback answers in ~20 us, so a silent listener is off, not slow.
UDP_TIMEOUT: Final = 0.5
#: The round trip's key: the store's key_prefix, this, then 32 random hex digits (shorter
#: than a session's key, so any prefix the store can use fits).
ROUND_TRIP_INFIX: Final = b"check:"
#: Bytes of random value stored and read back: a small session record is a few hundred
#: bytes to a few KB. A server that answers ``stats`` but drops or mangles values (a
#: proxy in front of a dead pool, a full slab class, a hostile impostor) fails here.
ROUND_TRIP_SIZE: Final = 2048
#: Seconds the round trip's item lives if its delete never arrives (a server that hangs
#: after the set): it cleans up after itself either way.
ROUND_TRIP_LIFETIME: Final = 30
_VERSION: Final = protocol.version()
_PROBE_ID_ATTEMPTS: Final = 1000  # random ids tried to cover every server with a probe load
# What the transport's messages start with; the tables already name the server.
_SERVER_PREFIX: Final = re.compile(r"memcached \S+: (connect failed: )?")

_Wanted = TypeVar("_Wanted", Version, Stats, Values)


def describe_error(exc: BaseException, timeout: float) -> str:
    """A short reason for an operator: ``no reply within 1 s``, ``Connection refused``."""
    if isinstance(exc, builtins.TimeoutError):  # memsess's TimeoutError is one too
        return f"no reply within {timeout:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _SERVER_PREFIX.sub("", str(exc), count=1) or type(exc).__name__


def _ask(pool: ServerPool, command: Command) -> Reply:
    """The reply of ``pool``'s server to ``command`` within its timeout; raises the
    MemsessError that ended the exchange instead (an ErrorReply is returned)."""
    (result,) = fanout([pool], [command])
    if isinstance(result, MemsessError):
        raise result
    return result


def _expect(reply: Reply, kind: type[_Wanted]) -> _Wanted:
    """``reply`` if it is of the ``kind`` the command asked for; else raise (a ServerError
    for the server's ERROR, CLIENT_ERROR or SERVER_ERROR)."""
    if isinstance(reply, ErrorReply):
        raise reply.to_exception()
    if not isinstance(reply, kind):
        raise ProtocolError(f"unexpected reply {reply!r}")
    return reply


@dataclass
class ServerCheck:
    """What ``memsess check`` found out about one server."""

    address: str
    reachable: bool
    error: str = ""  # why it is unreachable
    version: str = ""
    latency_ms: float | None = None  # fastest of LATENCY_SAMPLES ``version`` round trips
    items: int | None = None  # curr_items
    memory_bytes: int | None = None  # bytes
    memory_limit: int | None = None  # limit_maxbytes (-m)
    evictions: int | None = None  # items dropped for room before their time: lost sessions
    udp: str = "not configured"  # "on", "off (<why>)", "not configured", "-" when down
    state: str = ""  # memsess health after one probe load: up, suspect, down, probing
    state_reason: str = ""


def check_server(spec: ServerSpec, key_prefix: bytes) -> ServerCheck:
    """Stats, version, latency, session round trip and UDP listener of one server:
    LATENCY_SAMPLES ``version`` round trips, one ``stats`` and a :func:`round_trip` under
    ``key_prefix``, each command within ``spec.timeout`` seconds, then the UDP listener
    within ``min(spec.timeout, UDP_TIMEOUT)``. A server whose round trip fails is not
    reachable (``error`` says which step failed), its stats still shown."""
    samples = []
    failed = ""
    try:
        pool = ServerPool(spec, max_idle=1)  # one connection, reused: only the first connects
        try:
            for _ in range(LATENCY_SAMPLES):
                started = time.perf_counter()
                _expect(_ask(pool, protocol.version()), Version)
                samples.append(time.perf_counter() - started)
            stats = _expect(_ask(pool, protocol.stats()), Stats)
            failed = round_trip(pool, key_prefix)
        finally:
            pool.clear()
    except MemsessError as exc:
        udp = "not configured" if spec.udp_port is None else "-"
        return ServerCheck(spec.name, False, describe_error(exc, spec.timeout), udp=udp)
    return ServerCheck(
        spec.name,
        not failed,
        failed,
        version=stats.entries.get("version", "?"),
        latency_ms=round(min(samples[1:] or samples) * 1000, 3),  # the first one connects
        items=stats.number("curr_items"),
        memory_bytes=stats.number("bytes"),
        memory_limit=stats.number("limit_maxbytes"),
        evictions=stats.number("evictions"),
        udp=check_udp(spec),
    )


def round_trip(pool: ServerPool, key_prefix: bytes) -> str:
    """What an application does to a session, once, on ``pool``'s server: ``set`` a
    ROUND_TRIP_SIZE random value under a key of its own (``key_prefix`` + ROUND_TRIP_INFIX +
    random hex, living ROUND_TRIP_LIFETIME s), ``get`` it back and compare, ``delete`` it.
    Returns "" if every step did its job, else the failed step and why (``get: no reply
    within 1 s``); each step within the server's timeout, none after a failure."""
    key = protocol.check_key(key_prefix + ROUND_TRIP_INFIX + secrets.token_hex(16).encode())
    value = os.urandom(ROUND_TRIP_SIZE)
    steps: list[tuple[str, Command, Callable[[Reply], bool]]] = [
        (
            "set",
            protocol.set(key, value, exptime=ROUND_TRIP_LIFETIME),
            lambda reply: reply is Status.STORED,
        ),
        (
            "get",
            protocol.get(key),
            lambda reply: isinstance(reply, Values) and [i.value for i in reply.items] == [value],
        ),
        ("delete", protocol.delete(key), lambda reply: reply is Status.DELETED),
    ]
    for step, command, done in steps:
        try:
            reply = _ask(pool, command)
        except MemsessError as exc:
            return f"{step}: {describe_error(exc, pool.spec.timeout)}"
        if not done(reply):
            return f"{step}: {_unexpected(reply)}"
    return ""


def _unexpected(reply: Reply) -> str:
    if isinstance(reply, ErrorReply):
        return f"{reply.kind} {reply.message}".strip()
    if isinstance(reply, Values):
        return "answered other bytes than were set" if reply.items else "answered no item"
    if isinstance(reply, Status):
        return f"answered {reply.name}"
    return f"unexpected reply {reply!r}"


def check_udp(spec: ServerSpec) -> str:
    """Ask the server's UDP listener for its ``version`` in one framed datagram (the
    transport's own UdpRead), waiting at most ``min(spec.timeout, UDP_TIMEOUT)`` s."""
    if spec.udp_port is None:
        return "not configured"
    timeout = min(spec.timeout, UDP_TIMEOUT)
    try:
        conn = UdpPool(spec, max_idle=0).acquire()  # connected: ICMP refusals are reported
    except OSError as exc:  # ConnectError (unresolvable host) is one too
        return f"off ({describe_error(exc, timeout).lower()})"
    try:
        outcome = _udp_version(conn.sock, UdpRead(_VERSION, conn.take_id(), conn.protocol, timeout))
    except OSError as exc:
        outcome = exc
    finally:
        conn.close()
    if isinstance(outcome, Version):
        return "on"
    if isinstance(outcome, OSError):
        return f"off ({describe_error(outcome, timeout).lower()})"
    return f"off (no reply within {timeout:g} s)" if outcome is None else "off (bad reply)"


def _udp_version(sock: socket.socket, read: UdpRead) -> Reply | str | OSError | None:
    """Send ``read``'s datagram, then feed it what arrives (it drops stray datagrams) until
    its reply is whole or its wait is over (None)."""
    sock.send(read.datagram)
    started = time.monotonic()
    read.sent(started, started + read.udp_wait)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while (left := read.deadline - time.monotonic()) > 0:
        if poller.poll(ceil(left * 1000)):
            outcome = read_datagrams(sock, read)
            if outcome is not None:
                return outcome
            read.progressed(time.monotonic(), started + read.udp_wait)
    return None


@dataclass
class RawCopy:
    """One key as stored on one server; ``value`` None when absent, ``error`` when unread."""

    value: bytes | None = None
    flags: int = 0
    ttl: int | None = None
    error: str = ""


def read_copy(spec: ServerSpec, key: bytes) -> RawCopy:
    """The bytes, flags and remaining lifetime of ``key`` on one server: one ``mg``
    (memcached >= 1.6) within ``spec.timeout`` s, or where meta commands are missing one
    ``get`` more, which cannot tell the lifetime (``ttl`` None)."""
    try:
        pool = ServerPool(spec, max_idle=1)
        try:
            reply = _ask(pool, protocol.meta_get(key))
            if isinstance(reply, ErrorReply) and reply.kind == "ERROR":  # no such command
                reply = _ask(pool, protocol.get(key))
        finally:
            pool.clear()
        if isinstance(reply, MetaItem):
            return RawCopy(reply.value, reply.flags, reply.ttl)
        if reply is Status.NOT_FOUND:
            return RawCopy()
        items = _expect(reply, Values).items  # of the one key asked: the parser saw to it
    except MemsessError as exc:
        return RawCopy(error=describe_error(exc, spec.timeout))
    return RawCopy(items[0].value, items[0].flags) if items else RawCopy()


def probe_health(store: SessionStore) -> list[ServerStatus]:
    """Load random (absent) ids whose replica sets cover every server, all at once, then
    read the health memsess gives each: what an application using this DSN would see."""
    wanted = {status.address for status in store.health()}
    covered: set[str] = set()
    probes = []
    for _ in range(_PROBE_ID_ATTEMPTS):
        sid = new_id()
        located = set(store.locate(sid))
        if located - covered:
            covered |= located
            probes.append(sid)
        if covered == wanted:
            break
    with ThreadPoolExecutor(max_workers=len(probes)) as pool:  # a store is thread-safe
        list(pool.map(partial(_probe, store), probes))
    return store.health()


def _probe(store: SessionStore, sid: str) -> None:
    with contextlib.suppress(MemsessError):  # the failure is what health() now reports
        store.load(sid)
