"""msgpack ext types for the Python values sessions hold: the ``default=``/``ext_hook=`` pair.

Private to :mod:`memsess.serializers`, which uses what ``__all__`` lists; the ext code
table is in ``MsgpackSerializer``'s docstring.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import struct
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import msgpack

__all__ = [
    "DEFAULTS",
    "MAX_BIG_INT_BYTES",
    "MAX_EXT_NESTING",
    "MAX_SHARED_HASH",
    "encoder_for",
    "unpack",
    "unsupported",
]

#: Tuples and sets inside tuples and sets. Each level is a nested msgpack payload and
#: decoding one takes ~40 KiB of C stack: 200 levels (a 1 KiB input) crash an 8 MiB stack.
#: Defined here, where the hooks per depth are built, and re-exported by memsess.serializers.
MAX_EXT_NESTING: Final = 16
#: Ints beyond 64 bits (ext 12), in bytes: 32767 bits, ~9,900 decimal digits, over twice
#: what str() and int() take by default (sys.int_info.default_max_str_digits). Without a
#: bound one member of a set could make every hash and comparison of it arbitrarily slow.
MAX_BIG_INT_BYTES: Final = 4096
#: A set or frozenset whose stored members share one hash() value more often than this
#: is refused. Python hashes numbers as their value mod 2**61-1 (UUIDs as their int, a
#: tuple from its members' hashes), so a writer to the cache can pick members that all
#: collide; each insert then compares with every earlier one: a 780 KB set of such ints
#: took ~20 s of CPU to load. Honest data shares a hash between a handful of members.
MAX_SHARED_HASH: Final = 64

# msgpack ext type codes. -1 is msgpack's own Timestamp; ours are 1..127 and stored
# in shared caches, so a code, once released, never changes meaning. Their payload
# layouts are tabled in MsgpackSerializer's docstring (serializers.py): update both.
_TUPLE: Final = 1
_SET: Final = 2
_FROZENSET: Final = 3
_NAIVE_DATETIME: Final = 4
_AWARE_DATETIME: Final = 5
_DATE: Final = 6
_TIME: Final = 7
_TIMEDELTA: Final = 8
_UUID: Final = 9
_DECIMAL: Final = 10
_MARKUP: Final = 11
_BIG_INT: Final = 12

_EPOCH: Final = dt.datetime(1970, 1, 1)
_MICROSECOND: Final = dt.timedelta(microseconds=1)
_OFFSET: Final = struct.Struct(">q")  # UTC offset in microseconds (whole seconds are legal)
_ORDINAL: Final = struct.Struct(">I")
_TIME_OF_DAY: Final = struct.Struct(">q")  # microseconds since midnight
_DURATION: Final = struct.Struct(">iII")  # timedelta's own normalized days, seconds, microseconds
_INT64_MIN: Final = -(2**63)
_UINT64_END: Final = 2**64

_Encoder = Callable[[Any, int], Any]


def unsupported(value: object) -> str:
    """Why ``value`` cannot be serialized: its type has no encoder (see :func:`encoder_for`)."""
    return f"cannot serialize object of type {type(value).__qualname__}"


@functools.cache
def _markup_class() -> type[str] | None:
    """markupsafe.Markup, imported on first use: only Flask/Jinja apps have it."""
    try:
        from markupsafe import Markup
    except ImportError:
        return None
    return Markup


def _pack_items(items: list[Any], depth: int) -> bytes:
    if depth >= MAX_EXT_NESTING:
        raise TypeError(f"tuples and sets nested deeper than {MAX_EXT_NESTING} levels")
    # packb, not the thread's Packer: this runs inside that Packer's pack() call.
    packed: bytes = msgpack.packb(
        items, default=DEFAULTS[depth + 1], strict_types=True, use_bin_type=True
    )
    return packed


def _wall_clock(value: dt.datetime) -> msgpack.Timestamp:
    # Integer arithmetic: Timestamp.from_datetime() went through float (and treated naive
    # as local time) in the msgpack versions we support, which shifts far-off dates.
    delta = value.replace(tzinfo=None) - _EPOCH
    return msgpack.Timestamp(delta.days * 86400 + delta.seconds, delta.microseconds * 1000)


def _encode_datetime(value: dt.datetime, depth: int) -> object:
    offset = value.utcoffset()
    if offset is None:
        return msgpack.ExtType(_NAIVE_DATETIME, _wall_clock(value).to_bytes())
    if not offset:  # UTC: msgpack's standard Timestamp, readable as a time by any msgpack
        return _wall_clock(value)
    # Wall clock + offset rather than the instant: near datetime.min/max the instant
    # may fall outside datetime's range while the wall clock never does.
    return msgpack.ExtType(
        _AWARE_DATETIME, _OFFSET.pack(offset // _MICROSECOND) + _wall_clock(value).to_bytes()
    )


def _encode_time(value: dt.time, depth: int) -> msgpack.ExtType:
    of_day = (value.hour * 3600 + value.minute * 60 + value.second) * 10**6 + value.microsecond
    offset = value.utcoffset()
    if offset is None and value.tzinfo is not None:
        raise TypeError(f"time with tzinfo {value.tzinfo!r} has no fixed UTC offset")
    suffix = b"" if offset is None else _OFFSET.pack(offset // _MICROSECOND)
    return msgpack.ExtType(_TIME, _TIME_OF_DAY.pack(of_day) + suffix)


def _encode_int(value: int, depth: int) -> object:
    number = int.__int__(value)  # IntEnum and friends: their value, as JSON would
    if _INT64_MIN <= number < _UINT64_END:
        return number
    size = number.bit_length() // 8 + 1
    if size > MAX_BIG_INT_BYTES:  # loads() would refuse it
        raise ValueError(f"int of {size} bytes, over the {MAX_BIG_INT_BYTES}-byte limit")
    return msgpack.ExtType(_BIG_INT, number.to_bytes(size, "big", signed=True))


def _encode_markup(value: Any, depth: int) -> msgpack.ExtType:
    # Flask's TagMarkup rule: anything with __html__ is markup, stored as its HTML.
    return msgpack.ExtType(_MARKUP, str(value.__html__()).encode("utf-8"))


# Exact types msgpack cannot pack itself (with strict_types=True, subclasses of the
# types it can pack come here too; _SUBCLASS_ENCODERS handles them).
_ENCODERS: Final[dict[type, _Encoder]] = {
    tuple: lambda value, depth: msgpack.ExtType(_TUPLE, _pack_items(list(value), depth)),
    set: lambda value, depth: msgpack.ExtType(_SET, _pack_items(list(value), depth)),
    frozenset: lambda value, depth: msgpack.ExtType(_FROZENSET, _pack_items(list(value), depth)),
    dt.datetime: _encode_datetime,
    dt.date: lambda value, depth: msgpack.ExtType(_DATE, _ORDINAL.pack(value.toordinal())),
    dt.time: _encode_time,
    dt.timedelta: lambda value, depth: msgpack.ExtType(
        _TIMEDELTA, _DURATION.pack(value.days, value.seconds, value.microseconds)
    ),
    uuid.UUID: lambda value, depth: msgpack.ExtType(_UUID, value.bytes),
    decimal.Decimal: lambda value, depth: msgpack.ExtType(_DECIMAL, str(value).encode("ascii")),
    int: _encode_int,  # reached only for ints outside msgpack's 64-bit range
}

# First match wins: datetime before date, the special types before the builtins they
# subclass. Subclasses of builtins become the builtin, as json.dumps would make them.
_SUBCLASS_ENCODERS: Final[tuple[tuple[type | tuple[type, ...], _Encoder], ...]] = (
    *((cls, _ENCODERS[cls]) for cls in (dt.datetime, dt.date, dt.time, dt.timedelta)),
    *((cls, _ENCODERS[cls]) for cls in (uuid.UUID, decimal.Decimal, tuple, set, frozenset)),
    (int, _encode_int),
    (float, lambda value, depth: float.__float__(value)),
    (str, lambda value, depth: str.__str__(value)),
    ((bytes, bytearray), lambda value, depth: bytes(value)),
    (dict, lambda value, depth: dict(value)),
    (list, lambda value, depth: list(value)),
)


def encoder_for(value: object) -> _Encoder | None:
    """The ``(value, depth) -> packable`` encoder of ``value``'s type, or None: not storable."""
    encode = _ENCODERS.get(type(value))
    if encode is not None:
        return encode
    if callable(getattr(value, "__html__", None)):
        return _encode_markup
    for cls, encode in _SUBCLASS_ENCODERS:
        if isinstance(value, cls):
            return encode
    return None


def _default(value: object, depth: int) -> object:
    """msgpack's default= hook for values inside `depth` levels of tuples and sets."""
    encode = encoder_for(value)
    if encode is None:
        raise TypeError(unsupported(value))
    return encode(value, depth)


#: msgpack's default= hook for each depth of tuples and sets: ``DEFAULTS[0]`` at the top.
DEFAULTS: Final = tuple(
    functools.partial(_default, depth=depth) for depth in range(MAX_EXT_NESTING + 1)
)


def unpack(raw: bytes, depth: int) -> Any:
    """``raw`` decoded, as found inside ``depth`` levels of tuples and sets (0: a whole
    payload); ValueError (or a msgpack error) for bytes that are not what dumps() writes."""
    # unpackb sets max_str_len, max_array_len, ... to len(raw) (documented), so a header
    # claiming 2**31 items fails before anything is allocated for them.
    return msgpack.unpackb(
        raw,
        ext_hook=_EXT_HOOKS[depth],
        object_hook=_require_str_keys,
        raw=False,
        strict_map_key=True,
        timestamp=3,
    )


def _require_str_keys(mapping: dict[Any, Any]) -> dict[str, Any]:
    # strict_map_key still lets bin (bytes) keys through; dumps() never writes them.
    for key in mapping:
        if type(key) is not str:
            raise ValueError(f"map key of type {type(key).__qualname__}, not str")
    return mapping


def _unpack_items(data: bytes, depth: int) -> list[Any]:
    if depth >= MAX_EXT_NESTING:
        raise ValueError(f"tuples and sets nested deeper than {MAX_EXT_NESTING} levels")
    items = unpack(data, depth + 1)
    if type(items) is not list:
        raise ValueError(f"payload is a {type(items).__qualname__}, not an array")
    return items


def _unpack_members(data: bytes, depth: int) -> list[Any]:
    """The members of a set or frozenset, refused if too many share one hash value.

    Counting hash values is O(n) whatever they are (they are machine ints); building
    the set from members that collide is O(n^2). Map keys need no such check: msgpack
    maps hold str (or bytes) keys only, whose hash is keyed per process (SipHash)."""
    members = _unpack_items(data, depth)
    # k members sharing a hash leave at most n - k + 1 distinct hashes: the set of hashes
    # alone clears honest data, whose members hardly ever collide, cheaper than a Counter.
    if len(members) > MAX_SHARED_HASH and len(set(map(hash, members))) <= (
        len(members) - MAX_SHARED_HASH
    ):
        shared = max(Counter(map(hash, members)).values())
        if shared > MAX_SHARED_HASH:
            raise ValueError(f"{shared} set members share one hash (limit {MAX_SHARED_HASH})")
    return members


def _decode_big_int(data: bytes, depth: int) -> int:
    if len(data) > MAX_BIG_INT_BYTES:
        raise ValueError(f"int of {len(data)} bytes, over the {MAX_BIG_INT_BYTES}-byte limit")
    return int.from_bytes(data, "big", signed=True)


def _decode_wall_clock(data: bytes) -> dt.datetime:
    stamp = msgpack.Timestamp.from_bytes(data)
    return _EPOCH + dt.timedelta(seconds=stamp.seconds, microseconds=stamp.nanoseconds // 1000)


def _decode_timezone(data: bytes) -> dt.timezone:
    (offset,) = _OFFSET.unpack(data)
    return dt.timezone(dt.timedelta(microseconds=offset))


def _decode_time(data: bytes, depth: int) -> dt.time:
    if len(data) not in (8, 16):
        raise ValueError(f"{len(data)} bytes, not 8 or 16")
    (of_day,) = _TIME_OF_DAY.unpack_from(data)
    seconds, microsecond = divmod(of_day, 10**6)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    tzinfo = _decode_timezone(data[8:]) if len(data) == 16 else None
    return dt.time(hour, minute, second, microsecond, tzinfo=tzinfo)


def _decode_markup(data: bytes, depth: int) -> str:
    text = data.decode("utf-8")
    markup = _markup_class()
    return text if markup is None else markup(text)


_DECODERS: Final[dict[int, Callable[[bytes, int], Any]]] = {
    _TUPLE: lambda data, depth: tuple(_unpack_items(data, depth)),
    _SET: lambda data, depth: set(_unpack_members(data, depth)),
    _FROZENSET: lambda data, depth: frozenset(_unpack_members(data, depth)),
    _NAIVE_DATETIME: lambda data, depth: _decode_wall_clock(data),
    _AWARE_DATETIME: lambda data, depth: _decode_wall_clock(data[8:]).replace(
        tzinfo=_decode_timezone(data[:8])
    ),
    _DATE: lambda data, depth: dt.date.fromordinal(_ORDINAL.unpack(data)[0]),
    _TIME: _decode_time,
    _TIMEDELTA: lambda data, depth: dt.timedelta(*_DURATION.unpack(data)),
    _UUID: lambda data, depth: uuid.UUID(bytes=data),
    _DECIMAL: lambda data, depth: decimal.Decimal(data.decode("ascii")),
    _MARKUP: _decode_markup,
    _BIG_INT: _decode_big_int,
}


def _decode_ext(code: int, data: bytes, depth: int) -> Any:
    """msgpack's ext_hook= for ext types found inside `depth` levels of tuples and sets."""
    decode = _DECODERS.get(code)
    if decode is None:
        raise ValueError(f"unknown msgpack ext type {code}")
    try:
        return decode(data, depth)
    except Exception as exc:  # struct.error, decimal.InvalidOperation, ... all mean corrupt
        raise ValueError(f"ext type {code}: {exc}") from exc


_EXT_HOOKS: Final = tuple(
    functools.partial(_decode_ext, depth=depth) for depth in range(MAX_EXT_NESTING + 1)
)
