"""Session ids, memcached keys and the stored record format, as pure functions.

A record is a 16-byte header (magic, format, kind, serializer id, version,
CRC-32 of the payload) followed by the serialized data; a tombstone has none.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import struct
import threading
import time
import zlib
from functools import lru_cache
from typing import Final, NamedTuple

from memsess._forksafe import renew_locks_after_fork
from memsess.errors import SessionIdError

__all__ = [
    "DATA",
    "FLAGS",
    "MAX_CLOCK_SKEW",
    "TOMBSTONE",
    "Record",
    "VersionClock",
    "decode_record",
    "encode_record",
    "is_valid_id",
    "lifetime_seconds",
    "new_id",
    "storage_key",
]

# 32 random bytes from `secrets` (256 bits), URL-safe base64 without padding.
_ID_BYTES: Final = 32
_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{43}")

_MAGIC: Final = 0xD5
# Format 2 adds the session's lifetime, so a read repair gives a copy the session's own
# ttl, not the store's default; its CRC-32 covers the header too. Format 1 records
# (no lifetime: repaired with the reader's default ttl) are still read.
_FORMAT: Final = 2
_FORMAT_1: Final = 1
_HEADER: Final = struct.Struct(">BBBBQII")  # ... then lifetime (s), CRC-32
_CHECKED: Final = struct.Struct(">BBBBQI")  # format 2: what the CRC covers before the payload
_CRC: Final = struct.Struct(">I")
_HEADER_1: Final = struct.Struct(">BBBBQI")  # ... then CRC-32 of the payload
HEADER_SIZE: Final = _HEADER.size
DATA: Final = 0
TOMBSTONE: Final = 1
# memcached's per-item flags mark our records ("ms"), so a record written by
# another client under our prefix is recognised as foreign, not misread.
FLAGS: Final = 0x6D73
#: Seconds a stored version may run ahead of this machine's clock. App servers' clocks
#: differ by seconds, a broken NTP by minutes; a version further ahead is corrupt or
#: hostile, and trusting it would push every later version (and the clock) past it.
MAX_CLOCK_SKEW: Final = 86400
_MAX_SKEW_US: Final = MAX_CLOCK_SKEW * 1_000_000
# The highest version decode_record accepts without reading the clock: the bound as of
# the last time it did. The clock moves on, so an older bound is only stricter (a clock
# stepped back by NTP leaves it looser by that step, until a version passes it).
_bound = [0]


def new_id() -> str:
    """A fresh session id: 256 bits from `secrets`, as 43 URL-safe characters."""
    return secrets.token_urlsafe(_ID_BYTES)


def is_valid_id(sid: object) -> bool:
    """True for a string of the form :func:`new_id` returns."""
    return isinstance(sid, str) and _ID_PATTERN.fullmatch(sid) is not None


_NOT_AN_ID: Final = "not a session id issued by memsess (expected 43 URL-safe characters)"


def storage_key(prefix: bytes, sid: str) -> bytes:
    """The memcached key of a session: ``prefix`` + a digest of the id.

    The id never reaches memcached as-is: a cookie can at worst pick which
    digest is looked up, never inject bytes into a command."""
    if type(sid) is not str:  # exactly str: the memo hashes and compares it
        raise SessionIdError(_NOT_AN_ID)
    return _storage_key(prefix, sid)


# A request loads its session and then saves or touches it: memoized, the second key
# costs a dict lookup instead of a regex and a BLAKE2b digest. Only valid ids are kept
# (an invalid one raises, and lru_cache keeps no exception); 16k keys are ~2 MB.
@lru_cache(maxsize=16384)
def _storage_key(prefix: bytes, sid: str) -> bytes:
    if _ID_PATTERN.fullmatch(sid) is None:
        raise SessionIdError(_NOT_AN_ID)
    digest = hashlib.blake2b(sid.encode("ascii"), digest_size=20).hexdigest()
    return prefix + digest.encode("ascii")


class Record(NamedTuple):
    """One decoded copy: its version and either a payload or a tombstone. (A NamedTuple:
    one is made for every copy read, and a frozen dataclass is slower to build.)"""

    version: int
    kind: int  # DATA or TOMBSTONE
    serializer_id: int
    payload: bytes  # serialized session data; b"" for a tombstone
    ttl: int = 0  # the session's lifetime in seconds; 0: unknown (a format 1 record)

    @property
    def is_tombstone(self) -> bool:
        return self.kind == TOMBSTONE


def encode_record(
    version: int, kind: int, serializer_id: int, payload: bytes = b"", *, ttl: int = 0
) -> bytes:
    """The stored bytes of a record; ``ttl``: the session's lifetime in seconds."""
    checked = _CHECKED.pack(_MAGIC, _FORMAT, kind, serializer_id, version, ttl)
    return checked + _CRC.pack(zlib.crc32(payload, zlib.crc32(checked))) + payload


def lifetime_seconds(ttl: object, *, name: str = "ttl") -> int:
    """A session lifetime as memcached takes it: whole seconds, rounded up (0.5 -> 1).

    memcached's exptime is an integer and 0 means "never expires", so 0.5 must not
    truncate to 0. TypeError for a bool or a non-number, ValueError for NaN, an
    infinity or a value <= 0; both name ``name``."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(ttl).__name__}")
    if not 0 < ttl < math.inf:  # also False for NaN
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {ttl!r}")
    return int(ttl) if isinstance(ttl, int) else math.ceil(ttl)


def decode_record(raw: bytes, flags: int, *, now_us: int | None = None) -> Record:
    """Parse stored bytes; ValueError for anything that is not an intact record.

    A version of 0, or more than :data:`MAX_CLOCK_SKEW` ahead of ``now_us``
    (microseconds since the epoch; default: the wall clock), is impossible: no
    VersionClock writes it, so the record is corrupt."""
    if flags != FLAGS:
        raise ValueError(f"foreign item (flags {flags}, expected {FLAGS})")
    if len(raw) < HEADER_SIZE or raw[1] != _FORMAT:
        return _decode_other(raw, now_us)
    magic, _, kind, serializer_id, version, ttl, crc = _HEADER.unpack_from(raw)
    payload = raw[HEADER_SIZE:]
    if magic != _MAGIC or kind > TOMBSTONE:
        raise ValueError("bad record magic" if magic != _MAGIC else f"unknown record kind {kind}")
    if zlib.crc32(payload, zlib.crc32(raw[: HEADER_SIZE - 4])) != crc:
        raise ValueError("record checksum mismatch")
    if now_us is None and 0 < version <= _bound[0]:
        return Record(version, kind, serializer_id, payload, ttl)  # the common case
    _check_version(version, now_us)
    return Record(version, kind, serializer_id, payload, ttl)


def _decode_other(raw: bytes, now_us: int | None) -> Record:
    """A format 1 record (no lifetime), or the error that says what is wrong."""
    if len(raw) < _HEADER_1.size:
        raise ValueError(f"record of {len(raw)} bytes is shorter than its header")
    magic, fmt, kind, serializer_id, version, crc = _HEADER_1.unpack_from(raw)
    if magic != _MAGIC or fmt != _FORMAT_1:
        raise ValueError("bad record magic or format")
    if kind not in (DATA, TOMBSTONE):
        raise ValueError(f"unknown record kind {kind}")
    payload = raw[_HEADER_1.size :]
    if zlib.crc32(payload) != crc:
        raise ValueError("record checksum mismatch")
    _check_version(version, now_us)
    return Record(version, kind, serializer_id, payload, 0)


def _check_version(version: int, now_us: int | None) -> None:
    if now_us is None:
        now_us = time.time_ns() // 1000
        _bound[0] = now_us + _MAX_SKEW_US
    if not 0 < version <= now_us + _MAX_SKEW_US:
        raise ValueError(
            f"impossible version {version}: 0, or over {MAX_CLOCK_SKEW} s ahead of this clock"
        )


class VersionClock:
    """A hybrid logical clock: versions are microseconds since the epoch, but
    always above any version this process has seen, so a write made after
    reading a copy written on a machine whose clock runs ahead still wins.
    Safe to share between threads and across a fork."""

    __slots__ = ("__weakref__", "_last", "_lock")

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")

    def tick(self) -> int:
        """A new version: now in microseconds, or one more than the last one."""
        now = time.time_ns() // 1000
        with self._lock:
            self._last = version = max(now, self._last + 1)
        return version

    def observe(self, version: int) -> None:
        """Have later ticks pass ``version``, unless it is over MAX_CLOCK_SKEW ahead:
        decode_record refuses those already; this keeps one that slipped through
        from moving every later version of the process (so tick() stays in 64 bits)."""
        if version > self._last and version <= time.time_ns() // 1000 + _MAX_SKEW_US:
            with self._lock:
                self._last = max(self._last, version)
