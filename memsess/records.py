"""Session ids, memcached keys and the stored record format, as pure functions.

Every stored value has memcached item flags :data:`FLAGS` and starts with the magic byte
0xD5 and a format byte; integers are big-endian, ``crc`` is the CRC-32 of everything
before it and of the payload, ``payload`` the serialized session (empty: a tombstone)::

    format 1 (read only)  D5 01 kind:1 serializer:1 version:8 crc:4 payload
                          (crc of the payload alone; no lifetime)
    format 2, plain       D5 02 kind:1 serializer:1 version:8 ttl:4 crc:4 payload
    format 3, compressed  D5 03 kind:1 serializer:1 version:8 ttl:4 codec:1 crc:4 payload
                          (payload compressed with codec 1 zlib or 2 zstd; data only)
    format 4, sealed      D5 04 key_id:4 nonce:12 ciphertext tag:16
                          (a whole format 2 or 3 record, encrypted and authenticated
                          with AES-256-GCM under the storage key: see memsess.sealing)

``kind`` is 0 data or 1 tombstone, ``version`` microseconds since the epoch (see
VersionClock), ``ttl`` the session's lifetime in seconds. A memsess older than formats
3 and 4 reads them as corrupt copies, i.e. no session: turning compression or sealing
on is a rollout step taken once every reader is new enough.
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
from types import ModuleType
from typing import TYPE_CHECKING, Final, NamedTuple

from memsess._chaining import caused_by
from memsess._forksafe import fork_safe_lock
from memsess.errors import SessionIdError

if TYPE_CHECKING:
    import zstandard

__all__ = [
    "CODECS",
    "DATA",
    "DEFAULT_MAX_SESSION_SIZE",
    "FLAGS",
    "MAX_CLOCK_SKEW",
    "SEALED_PREFIX",
    "TOMBSTONE",
    "Record",
    "VersionClock",
    "codec_id",
    "compress",
    "decode_record",
    "encode_record",
    "is_valid_id",
    "lifetime_seconds",
    "new_id",
    "plain_payload",
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
# Format 3: format 2 with the id of the codec that compressed the payload before the CRC.
_COMPRESSED: Final = 3
_HEADER_3: Final = struct.Struct(">BBBBQIBI")
_CHECKED_3: Final = struct.Struct(">BBBBQIB")
_COMPRESSED_PREFIX: Final = bytes((_MAGIC, _COMPRESSED))
#: The first two bytes of every sealed record (format 4, opened by memsess.sealing).
SEALED_PREFIX: Final = bytes((_MAGIC, 4))  # format 4
#: The ``compression`` option's codecs, and the id of each in a format 3 record.
CODECS: Final = {"zlib": 1, "zstd": 2}
_ZLIB: Final = 1
_ZSTD: Final = 2
_ZSTD_MISSING: Final = 'compression="zstd" needs the zstandard package: pip install memsess[zstd]'
#: Bytes a compressed session may expand to when read, unless a store says otherwise:
#: past it, decompression stops and the copy reads as corrupt (a decompression bomb).
DEFAULT_MAX_SESSION_SIZE: Final = 16 * 1024 * 1024
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
    payload: bytes  # serialized session data, as stored (see codec); b"" for a tombstone
    ttl: int = 0  # the session's lifetime in seconds; 0: unknown (a format 1 record)
    # The id (CODECS) of the compression of the payload; 0: none. Decompressed only by
    # plain_payload(), for the copy a read settles on, not for every copy read.
    codec: int = 0

    @property
    def is_tombstone(self) -> bool:
        return self.kind == TOMBSTONE


_new_tuple: Final = tuple.__new__


def encode_record(
    version: int,
    kind: int,
    serializer_id: int,
    payload: bytes = b"",
    *,
    ttl: int = 0,
    codec: int = 0,
) -> bytes:
    """The stored bytes of a record; ``ttl``: the session's lifetime in seconds;
    ``codec``: the id (:data:`CODECS`) of the compression ``payload`` is already
    compressed with (see :func:`compress`), 0 for none."""
    if codec:
        checked = _CHECKED_3.pack(_MAGIC, _COMPRESSED, kind, serializer_id, version, ttl, codec)
    else:
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
        # The common case. tuple.__new__: a NamedTuple's own __new__ is a Python frame.
        return _new_tuple(Record, (version, kind, serializer_id, payload, ttl, 0))
    _check_version(version, now_us)
    return Record(version, kind, serializer_id, payload, ttl)


def _decode_other(raw: bytes, now_us: int | None) -> Record:
    """A format 3 (compressed) or format 1 (no lifetime) record, or the error that says
    what is wrong."""
    if raw[:2] == _COMPRESSED_PREFIX:
        return _decode_compressed(raw, now_us)
    if raw[:2] == SEALED_PREFIX:
        raise ValueError("sealed record, and no secret_keys are configured to open it")
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


def _decode_compressed(raw: bytes, now_us: int | None) -> Record:
    if len(raw) < _HEADER_3.size:
        raise ValueError(f"record of {len(raw)} bytes is shorter than its header")
    _, _, kind, serializer_id, version, ttl, codec, crc = _HEADER_3.unpack_from(raw)
    if kind != DATA:  # a tombstone has no payload to compress
        raise ValueError(f"unknown record kind {kind} for a compressed record")
    if codec not in (_ZLIB, _ZSTD):
        raise ValueError(f"unknown compression codec {codec}")
    payload = raw[_HEADER_3.size :]
    if zlib.crc32(payload, zlib.crc32(raw[: _HEADER_3.size - 4])) != crc:
        raise ValueError("record checksum mismatch")
    _check_version(version, now_us)
    return Record(version, kind, serializer_id, payload, ttl, codec)


def _check_version(version: int, now_us: int | None) -> None:
    if now_us is None:
        now_us = time.time_ns() // 1000
        _bound[0] = now_us + _MAX_SKEW_US
    if not 0 < version <= now_us + _MAX_SKEW_US:
        raise ValueError(
            f"impossible version {version}: 0, or over {MAX_CLOCK_SKEW} s ahead of this clock"
        )


# -- compression ---------------------------------------------------------------------


def codec_id(name: object) -> int:
    """The id of the ``compression`` option's codec ``name`` ("zlib" or "zstd");
    ValueError for another name, ImportError for "zstd" without zstandard installed."""
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise ValueError(f"compression must be one of {', '.join(CODECS)}, not {name!r}")
    if codec == _ZSTD and _zstandard() is None:
        raise ImportError(_ZSTD_MISSING)
    return codec


def compress(payload: bytes, codec: int) -> bytes:
    """``payload`` compressed with codec ``codec`` (an id of :data:`CODECS`); ImportError
    for zstd without zstandard installed (:func:`codec_id` says so first)."""
    if codec == _ZLIB:
        return zlib.compress(payload)
    return _zstd_contexts().compressor.compress(payload)  # the frame states its size


def plain_payload(record: Record, *, max_size: int = DEFAULT_MAX_SESSION_SIZE) -> bytes:
    """The serialized session data of ``record``, decompressed if it was compressed.

    ValueError when it does not decompress: a corrupt stream, zstd where zstandard is
    not installed, or more than ``max_size`` bytes of output (a decompression bomb).
    Decompression stops there: refusing a bomb holds at most ``max_size`` bytes of
    output, plus 128 KiB for zlib (and zstd's context: about 100 KiB)."""
    codec = record.codec
    if not codec:
        return record.payload
    if codec == _ZLIB:
        return _inflate(record.payload, max_size)
    return _unzstd(record.payload, max_size)


_INFLATE_STEP: Final = 64 * 1024  # bytes of zlib input, and at most of output, per step


def _too_large(max_size: int) -> str:
    return f"compressed session expands past max_session_size ({max_size} bytes)"


def _inflate(data: bytes, max_size: int) -> bytes:
    # In steps, counted as they come: a bomb is refused holding at most max_size bytes of
    # output and a step of input (zlib's own max_length builds the output in blocks that
    # it then joins, twice the output, and copies the unread input into each
    # unconsumed_tail). A session of one step is returned without a copy.
    inflater = zlib.decompressobj()
    chunks = []
    size = end = 0
    view = memoryview(data)
    try:
        while not inflater.eof and end < len(data):
            pending: bytes | memoryview = view[end : end + _INFLATE_STEP]
            end += len(pending)
            while True:
                chunk = inflater.decompress(pending, _INFLATE_STEP)
                size += len(chunk)
                if size > max_size:
                    raise ValueError(_too_large(max_size))
                chunks.append(chunk)
                pending = inflater.unconsumed_tail
                # A full step may leave more output inside zlib, even with no input left.
                if inflater.eof or not (pending or len(chunk) == _INFLATE_STEP):
                    break
    except zlib.error as exc:
        raise caused_by(ValueError(f"corrupt zlib stream: {exc}"), None)  # noqa: B904 - see memsess._chaining
    if not inflater.eof or inflater.unused_data or end < len(data):
        raise ValueError("corrupt zlib stream: truncated, or bytes after its end")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _unzstd(data: bytes, max_size: int) -> bytes:
    module = _zstandard()
    if module is None:
        raise ValueError(
            "compressed with zstd, and zstandard is not installed here: pip install memsess[zstd]"
        )
    try:
        # zstandard allocates a frame's stated content size whatever max_output_size says,
        # so that is checked first; memsess's frames state it (one-shot compression), and
        # one that does not gets a buffer of max_size, which decompression cannot pass.
        size = module.frame_content_size(data)
        if size > max_size:
            raise ValueError(_too_large(max_size))
        return _zstd_contexts().decompressor.decompress(
            data, max_output_size=max_size, allow_extra_data=False
        )
    except module.ZstdError as exc:
        message = f"corrupt zstd frame, or one past {max_size} bytes: {exc}"
        raise caused_by(ValueError(message), None)  # noqa: B904 - see memsess._chaining


@lru_cache(maxsize=1)
def _zstandard() -> ModuleType | None:
    """The zstandard module (the ``zstd`` extra), or None when it is not installed."""
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


class _ZstdContexts(threading.local):
    # Per thread (a zstandard context is not thread-safe): making one costs about ten
    # times compressing a few kilobytes. A forked child uses its copy from one thread.
    def __init__(self) -> None:
        module = _zstandard()
        if module is None:  # compress() given the zstd codec that codec_id() would refuse
            raise ImportError(_ZSTD_MISSING)
        self.compressor: zstandard.ZstdCompressor = module.ZstdCompressor(level=3)
        self.decompressor: zstandard.ZstdDecompressor = module.ZstdDecompressor()


@lru_cache(maxsize=1)
def _zstd_contexts() -> _ZstdContexts:
    return _ZstdContexts()


class VersionClock:
    """A hybrid logical clock: versions are microseconds since the epoch, but
    always above any version this process has seen, so a write made after
    reading a copy written on a machine whose clock runs ahead still wins.
    Safe to share between threads and across a fork."""

    __slots__ = ("_last", "_lock")

    def __init__(self) -> None:
        self._last = 0
        self._lock = fork_safe_lock()

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
