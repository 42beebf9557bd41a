"""Session ids, memcached keys and the stored record format, as pure functions.

A record is a 16-byte header (magic, format, kind, serializer id, version,
CRC-32 of the payload) followed by the serialized data; a tombstone has none.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Final

from memsess.errors import SessionIdError

__all__ = [
    "DATA",
    "FLAGS",
    "TOMBSTONE",
    "Record",
    "VersionClock",
    "decode_record",
    "encode_record",
    "is_valid_id",
    "new_id",
    "storage_key",
]

# 32 random bytes from `secrets` (256 bits), URL-safe base64 without padding.
_ID_BYTES: Final = 32
_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{43}")

_MAGIC: Final = 0xD5
_FORMAT: Final = 1
_HEADER: Final = struct.Struct(">BBBBQI")
HEADER_SIZE: Final = _HEADER.size
DATA: Final = 0
TOMBSTONE: Final = 1
# memcached's per-item flags mark our records ("ms"), so a record written by
# another client under our prefix is recognised as foreign, not misread.
FLAGS: Final = 0x6D73


def new_id() -> str:
    """A fresh session id: 256 bits from `secrets`, as 43 URL-safe characters."""
    return secrets.token_urlsafe(_ID_BYTES)


def is_valid_id(sid: object) -> bool:
    """True for a string of the form :func:`new_id` returns."""
    return isinstance(sid, str) and _ID_PATTERN.fullmatch(sid) is not None


def storage_key(prefix: bytes, sid: str) -> bytes:
    """The memcached key of a session: ``prefix`` + a digest of the id.

    The id never reaches memcached as-is: a cookie can at worst pick which
    digest is looked up, never inject bytes into a command."""
    if not is_valid_id(sid):
        raise SessionIdError("not a session id issued by memsess (expected 43 URL-safe characters)")
    digest = hashlib.blake2b(sid.encode("ascii"), digest_size=20).hexdigest()
    return prefix + digest.encode("ascii")


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded copy: its version and either a payload or a tombstone."""

    version: int
    kind: int  # DATA or TOMBSTONE
    serializer_id: int
    payload: bytes  # serialized session data; b"" for a tombstone

    @property
    def is_tombstone(self) -> bool:
        return self.kind == TOMBSTONE


def encode_record(version: int, kind: int, serializer_id: int, payload: bytes = b"") -> bytes:
    header = _HEADER.pack(_MAGIC, _FORMAT, kind, serializer_id, version, zlib.crc32(payload))
    return header + payload


def decode_record(raw: bytes, flags: int) -> Record:
    """Parse stored bytes; ValueError for anything that is not an intact record."""
    if flags != FLAGS:
        raise ValueError(f"foreign item (flags {flags}, expected {FLAGS})")
    if len(raw) < HEADER_SIZE:
        raise ValueError(f"record of {len(raw)} bytes is shorter than its header")
    magic, fmt, kind, serializer_id, version, crc = _HEADER.unpack_from(raw)
    if magic != _MAGIC or fmt != _FORMAT:
        raise ValueError("bad record magic or format")
    if kind not in (DATA, TOMBSTONE):
        raise ValueError(f"unknown record kind {kind}")
    payload = raw[HEADER_SIZE:]
    if zlib.crc32(payload) != crc:
        raise ValueError("record checksum mismatch")
    return Record(version, kind, serializer_id, payload)


class VersionClock:
    """A hybrid logical clock: versions are microseconds since the epoch, but
    always above any version this process has seen, so a write made after
    reading a copy written on a machine whose clock runs ahead still wins."""

    __slots__ = ("_last", "_lock")

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def tick(self) -> int:
        now = time.time_ns() // 1000
        with self._lock:
            self._last = version = max(now, self._last + 1)
        return version

    def observe(self, version: int) -> None:
        if version > self._last:
            with self._lock:
                self._last = max(self._last, version)
