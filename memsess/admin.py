"""Read-only admin calls to one memcached server, over pymemcache: stats and latency,
the UDP listener, and the raw bytes, flags and remaining lifetime of one key; and the
health a SessionStore gives each server after one probe read.

Used by ``memsess check`` and ``memsess inspect``; nothing here writes.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheError, MemcacheUnknownCommandError

from memsess.cluster import ServerStatus
from memsess.dsn import ServerSpec
from memsess.errors import MemsessError
from memsess.records import new_id
from memsess.store import SessionStore
from memsess.transport.udp_core import HEADER, MAX_DATAGRAM

__all__ = [
    "RawCopy",
    "ServerCheck",
    "admin_client",
    "check_server",
    "check_udp",
    "describe_error",
    "probe_health",
    "read_copy",
]

LATENCY_SAMPLES: Final = 3  # round trips timed per server; the fastest is reported
#: Seconds the UDP listener gets to answer (less when the server's timeout is shorter);
#: loopback answers in ~20 us, so a silent listener is off, not slow.
UDP_TIMEOUT: Final = 0.5
_PROBE_ID_ATTEMPTS: Final = 1000  # random ids tried to cover every server with a probe load


def admin_client(spec: ServerSpec, timeout: float) -> Any:
    """An admin client for one server that waits for every reply (pymemcache's default
    ``noreply`` would report writes as done unseen) and hands back raw bytes and flags."""
    target = spec.host if spec.scheme == "unix" else (spec.host, spec.port)
    return Client(
        target,
        connect_timeout=timeout,
        timeout=timeout,
        default_noreply=False,
        serde=_RawSerde(),
    )


class _RawSerde:
    """pymemcache serde that returns ``(value, flags)``: records are decoded here."""

    def serialize(self, key: bytes, value: bytes) -> tuple[bytes, int]:
        return value, 0

    def deserialize(self, key: bytes, value: bytes, flags: int) -> tuple[bytes, int]:
        return value, flags


def describe_error(exc: BaseException, timeout: float) -> str:
    """A short reason for an operator: ``no reply within 1 s``, ``Connection refused``."""
    if isinstance(exc, TimeoutError):
        return f"no reply within {timeout:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


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


def check_server(spec: ServerSpec) -> ServerCheck:
    """Stats, version, latency and UDP listener of one server, within ``spec.timeout``."""
    client = admin_client(spec, spec.timeout)
    try:
        samples = []
        for _ in range(LATENCY_SAMPLES):
            started = time.perf_counter()
            client.version()
            samples.append(time.perf_counter() - started)
        stats = client.stats()
    except (OSError, MemcacheError) as exc:
        udp = "not configured" if spec.udp_port is None else "-"
        return ServerCheck(spec.name, False, describe_error(exc, spec.timeout), udp=udp)
    finally:
        client.close()
    return ServerCheck(
        spec.name,
        True,
        version=bytes(stats.get(b"version", b"?")).decode(errors="replace"),
        latency_ms=round(
            min(samples[1:] or samples) * 1000, 3
        ),  # the first one includes the connect
        items=stats.get(b"curr_items"),
        memory_bytes=stats.get(b"bytes"),
        memory_limit=stats.get(b"limit_maxbytes"),
        evictions=stats.get(b"evictions"),
        udp=check_udp(spec),
    )


def check_udp(spec: ServerSpec) -> str:
    """Ask the server's UDP listener for its ``version`` in one framed datagram."""
    if spec.udp_port is None:
        return "not configured"
    request_id = random.randrange(1 << 16)
    timeout = min(spec.timeout, UDP_TIMEOUT)
    deadline = time.monotonic() + timeout
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            spec.host, spec.udp_port, type=socket.SOCK_DGRAM
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.connect(address)
            sock.send(HEADER.pack(request_id, 0, 1, 0) + b"version\r\n")
            while True:  # skip stray datagrams (another request id) until the deadline
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                datagram = sock.recv(MAX_DATAGRAM)
                if len(datagram) > HEADER.size and HEADER.unpack_from(datagram)[0] == request_id:
                    return (
                        "on"
                        if datagram[HEADER.size :].startswith(b"VERSION ")
                        else "off (bad reply)"
                    )
    except OSError as exc:
        return f"off ({describe_error(exc, timeout).lower()})"


@dataclass
class RawCopy:
    """One key as stored on one server; ``value`` None when absent, ``error`` when unread."""

    value: bytes | None = None
    flags: int = 0
    ttl: int | None = None
    error: str = ""


def read_copy(spec: ServerSpec, key: bytes) -> RawCopy:
    """The bytes, flags and remaining lifetime of ``key`` on one server."""
    client = admin_client(spec, spec.timeout)
    try:
        for _ in range(3):  # a write between the two commands changes the CAS: read again
            found, cas = client.gets(key)
            if found is None:
                return RawCopy()
            ttl, meta_cas = _remaining_ttl(client, key)
            if meta_cas is None or meta_cas == int(cas):
                break
        value, flags = found
        return RawCopy(value, flags, ttl)
    except (OSError, MemcacheError) as exc:
        return RawCopy(error=describe_error(exc, spec.timeout))
    finally:
        client.close()


def _remaining_ttl(client: Any, key: bytes) -> tuple[int | None, int | None]:
    """``mg <key> t c`` (memcached >= 1.6): seconds left (-1: never) and the CAS; the
    classic ``get`` cannot tell the lifetime. (None, None) where meta commands are absent."""
    try:
        reply: bytes = client.raw_command(b"mg " + key + b" t c", b"\r\n")
    except MemcacheUnknownCommandError:
        return None, None
    fields = {token[:1]: token[1:] for token in reply.split()[1:]} if reply[:2] == b"HD" else {}
    ttl, cas = fields.get(b"t"), fields.get(b"c")
    return (None if ttl is None else int(ttl)), (None if cas is None else int(cas))


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
