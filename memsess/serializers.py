"""Session data to bytes and back: msgpack (default, keeps Python types) or plain JSON.

Never pickle: these bytes come back from a shared cache, and unpickling them would run code.
"""

from __future__ import annotations

import json
import math
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple, Protocol, runtime_checkable

import msgpack

from memsess._msgpack_ext import (
    DEFAULTS,
    MAX_BIG_INT_BYTES,
    MAX_EXT_NESTING,
    MAX_SHARED_HASH,
    encoder_for,
    unpack,
    unsupported,
)
from memsess.errors import SerializationError

__all__ = [
    "JSON",
    "MAX_BIG_INT_BYTES",
    "MAX_DATA_BYTES",
    "MAX_EXT_NESTING",
    "MAX_NESTING",
    "MAX_SHARED_HASH",
    "MSGPACK",
    "SERIALIZERS",
    "JSONSerializer",
    "MsgpackSerializer",
    "Serializer",
    "get_serializer",
]

#: loads() refuses larger input; the same bound as msgpack's own Unpacker(max_buffer_size).
MAX_DATA_BYTES: Final = 100 * 1024 * 1024
#: dumps() refuses containers nested deeper than this (it also catches cycles early).
MAX_NESTING: Final = 100
# MAX_EXT_NESTING (tuples and sets inside tuples and sets, 16), MAX_BIG_INT_BYTES and
# MAX_SHARED_HASH are imported above from memsess._msgpack_ext, whose hooks apply them.


@runtime_checkable
class Serializer(Protocol):
    """Turns session data into bytes and back, without running code found in the bytes."""

    @property
    def name(self) -> str:
        """Short name used in settings: "msgpack", "json"."""

    @property
    def id(self) -> int:
        """One byte stored in each record: 1 msgpack, 2 json, 128..255 user serializers."""

    def dumps(self, data: Mapping[str, Any]) -> bytes:
        """Encode; SerializationError names the key path and type of a value it cannot encode."""

    def loads(self, raw: bytes) -> dict[str, Any]:
        """Decode; ValueError (only) on bytes that are not a dict with str keys."""


class _Rules(NamedTuple):
    """What a serializer accepts, for _find_problem()."""

    leaf_problem: Callable[[Any], str | None]
    containers: tuple[type, ...]  # walked into
    nested_payloads: tuple[type, ...]  # walked into, and count towards MAX_EXT_NESTING


# A problem found under a value: the path to it (labels, innermost first) and what is wrong.
_Found = tuple[list[Any], str]


def _container_problem(
    value: Any, is_payload: bool, depth: int, ext_depth: int, ancestors: set[int]
) -> str | None:
    if id(value) in ancestors:
        return "circular reference"
    if depth >= MAX_NESTING:
        return f"containers nested deeper than {MAX_NESTING} levels"
    if is_payload and ext_depth >= MAX_EXT_NESTING:
        return f"tuples and sets nested deeper than {MAX_EXT_NESTING} levels"
    for key in value if isinstance(value, dict) else ():
        if type(key) is not str:
            return f"dict key of type {type(key).__qualname__} (keys must be str)"
    return None


def _find_problem(
    value: Any, rules: _Rules, depth: int, ext_depth: int, ancestors: set[int]
) -> _Found | None:
    """The first thing under value that `rules` refuse (the slow path: errors only)."""
    is_payload = isinstance(value, rules.nested_payloads)
    if not (is_payload or isinstance(value, rules.containers)):
        problem = rules.leaf_problem(value)
        return None if problem is None else ([], problem)
    problem = _container_problem(value, is_payload, depth, ext_depth, ancestors)
    if problem is not None:
        return [], problem
    ancestors.add(id(value))
    if isinstance(value, dict):
        labelled: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, (set, frozenset)):
        labelled = ((..., item) for item in value)  # members have no key or index
    else:
        labelled = enumerate(value)
    for label, child in labelled:
        found = _find_problem(child, rules, depth + 1, ext_depth + is_payload, ancestors)
        if found is not None:
            found[0].append(label)
            return found
    ancestors.discard(id(value))
    return None


def _problem_message(session: dict[str, Any], rules: _Rules) -> str | None:
    """Like "session['cart'][2]: cannot serialize object of type Foo"; None if all is well."""
    found = _find_problem(session, rules, 0, 0, set())
    if found is None:
        return None
    labels, problem = found
    path = "".join("[...]" if label is ... else f"[{label!r}]" for label in reversed(labels))
    return f"session{path}: {problem}"


def _utf8_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "str is not valid UTF-8 (it holds a lone surrogate)"
    return None


# Not int: past 64 bits its encoder has a size limit to report.
_MSGPACK_NATIVE: Final = frozenset({bytes, float, bool, type(None), bytearray, memoryview})


def _msgpack_leaf_problem(value: Any) -> str | None:
    if type(value) is str:
        return _utf8_problem(value)
    if type(value) in _MSGPACK_NATIVE:
        return None
    encode = encoder_for(value)
    if encode is None:
        return unsupported(value)
    try:
        encoded = encode(value, 0)
    except Exception as exc:  # whatever __html__, utcoffset(), ... raise
        return f"cannot serialize {type(value).__qualname__}: {exc}"
    return _utf8_problem(encoded) if isinstance(encoded, str) else None


_MSGPACK_RULES: Final = _Rules(
    _msgpack_leaf_problem, (dict, list, tuple, set, frozenset), (tuple, set, frozenset)
)

# Types that hold no dict, skipped by the fast key check without an isinstance() call.
_SCALARS: Final = frozenset({str, int, float, bool, type(None), bytes})
_WALKED: Final = (dict, list, tuple)  # sets cannot hold dicts: dicts are unhashable


def _keys_are_plain(value: Any, depth: int) -> bool:
    """Every dict under value has str keys, within MAX_NESTING: the check on every dumps()."""
    if depth >= MAX_NESTING:
        return False
    if isinstance(value, dict):
        for key in value:
            if type(key) is not str:
                return False
        children = value.values()
    elif value and type(value[0]) is str and _all_str(value):
        return True  # a list of strings (a history, flash messages): nothing to walk into
    else:
        children = value
    for child in children:
        if type(child) in _SCALARS or not isinstance(child, _WALKED):
            continue
        if not _keys_are_plain(child, depth + 1):
            return False
    return True


def _all_str(items: list[Any] | tuple[Any, ...]) -> bool:
    """Whether every member of ``items`` is a str: join checks each one in C, four times
    faster than a loop over them (asked only when the first is a str: failing costs an
    exception)."""
    try:
        "".join(items)
    except TypeError:
        return False
    return True


def _as_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    if type(data) is dict:
        return data
    if not isinstance(data, Mapping):
        raise SerializationError(f"session: data must be a mapping, not {type(data).__qualname__}")
    return dict(data)


def _explain(session: dict[str, Any], exc: Exception | None) -> SerializationError:
    return SerializationError(_problem_message(session, _MSGPACK_RULES) or f"session: {exc}")


def _check_size(raw: bytes) -> bytes:
    if len(raw) > MAX_DATA_BYTES:
        raise ValueError(f"{len(raw)} bytes, over the {MAX_DATA_BYTES}-byte limit")
    return raw


_local = threading.local()
# A Packer's buffer grows to the largest session it packed and stays that size; past
# this size a thread drops its Packer so one huge session does not pin memory per thread.
_PACKER_KEEP_BYTES: Final = 64 * 1024


def _pack(session: dict[str, Any]) -> bytes:
    # One Packer per thread (a Packer is not thread-safe): packb() builds a Packer per
    # call, which measured here as half the cost of packing a 200-byte session.
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(
            default=DEFAULTS[0], strict_types=True, use_bin_type=True, buf_size=4096
        )
    packed: bytes = packer.pack(session)
    if len(packed) > _PACKER_KEEP_BYTES:
        del _local.packer
    return packed


class MsgpackSerializer:
    """msgpack, with ext types for the Python values web frameworks put in sessions.

    Ext type codes (payloads are big-endian):

    ====  ======================  ===================================================
    code  type                    payload
    ====  ======================  ===================================================
    -1    datetime, UTC offset 0  msgpack's standard Timestamp (back with tzinfo UTC)
    1     tuple                   msgpack array
    2     set                     msgpack array
    3     frozenset               msgpack array
    4     naive datetime          Timestamp layout of the wall clock read as UTC
    5     aware datetime          int64 UTC offset in us, then the wall clock as in 4
    6     date                    uint32 proleptic Gregorian ordinal
    7     time                    int64 us since midnight [+ int64 UTC offset in us]
    8     timedelta               int32 days, uint32 seconds, uint32 microseconds
    9     UUID                    16 bytes
    10    Decimal                 str(value), ASCII
    11    Markup (has __html__)   its HTML, UTF-8; back as markupsafe.Markup if importable
    12    int beyond 64 bits      two's complement, at most MAX_BIG_INT_BYTES (4096)
    ====  ======================  ===================================================

    loads() refuses a set or frozenset with more than MAX_SHARED_HASH (64) members
    sharing one hash value: building it would cost O(n^2) comparisons.

    Aware datetimes and times come back with a fixed-offset ``datetime.timezone`` (the
    offset they had; zone names are not kept). Subclasses of str, int, float, bytes,
    dict and list come back as the builtin (as with JSON); other types raise
    :class:`~memsess.errors.SerializationError`. Thread-safe.
    """

    name = "msgpack"
    id = 1

    def dumps(self, data: Mapping[str, Any]) -> bytes:
        """Encode session data; SerializationError names the path of a value it cannot."""
        session = _as_dict(data)
        if _keys_are_plain(session, 0):
            try:
                return _pack(session)
            # default=, msgpack's own limits, a failing __html__(): all are the data's fault.
            except Exception as exc:
                vars(_local).pop("packer", None)  # do not trust a Packer that failed midway
                raise _explain(session, exc) from exc
        raise _explain(session, None)

    def loads(self, raw: bytes) -> dict[str, Any]:
        """Decode what dumps() wrote; ValueError, and nothing else, for any other bytes."""
        try:
            data = unpack(_check_size(raw), 0)
        except Exception as exc:  # msgpack's docs: unpackb raises more than UnpackException
            raise ValueError(f"cannot decode msgpack session data: {exc}") from exc
        if type(data) is not dict:
            raise ValueError(f"msgpack session data is a {type(data).__qualname__}, not a map")
        return data


def _json_leaf_problem(value: Any) -> str | None:
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"float {value!r} is not valid JSON"
    if callable(getattr(value, "__html__", None)):
        return f"{type(value).__qualname__} would lose its HTML-safe mark in JSON; use msgpack"
    if isinstance(value, str):
        return _utf8_problem(value)
    if isinstance(value, tuple):
        return "tuple would come back from JSON as a list; store a list, or use msgpack"
    return f"{unsupported(value)} as JSON; use msgpack"


_JSON_RULES: Final = _Rules(_json_leaf_problem, (dict, list), ())
# check_circular off: _find_problem() has already refused cycles and deep nesting.
_JSON_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=False, separators=(",", ":")
)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # Python's json accepts NaN, Infinity


def _finite_float(text: str) -> float:
    # A number too large for a float (1e999) would read as inf, which dumps() refuses:
    # a session read that could never be saved again. Such bytes were not written by
    # memsess, so the copy is corrupt, as with NaN and Infinity.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} is out of a float's range")
    return value


_JSON_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


class JSONSerializer:
    """Plain UTF-8 JSON that any language can read: JSON types only, nothing converted.

    dict (str keys), list, str, int, float (finite), bool and None. Everything else,
    tuples and Markup included, raises :class:`~memsess.errors.SerializationError`
    rather than coming back as something else. Thread-safe.
    """

    name = "json"
    id = 2

    def dumps(self, data: Mapping[str, Any]) -> bytes:
        """Encode session data; SerializationError names the path of a value it cannot."""
        session = _as_dict(data)
        problem = _problem_message(session, _JSON_RULES)
        if problem is not None:
            raise SerializationError(problem)
        try:
            return _JSON_ENCODER.encode(session).encode("utf-8")
        except ValueError as exc:  # an int past sys.get_int_max_str_digits()
            raise SerializationError(f"session: {exc}") from exc

    def loads(self, raw: bytes) -> dict[str, Any]:
        """Decode UTF-8 JSON; ValueError, and nothing else, for any other bytes."""
        try:
            data = _JSON_DECODER.decode(str(_check_size(raw), "utf-8"))
        except Exception as exc:  # also RecursionError on deeply nested input
            raise ValueError(f"cannot decode JSON session data: {exc}") from exc
        if type(data) is not dict:
            raise ValueError(f"JSON session data is a {type(data).__qualname__}, not an object")
        return data


#: The built-in serializers, shared: they hold no per-call state.
MSGPACK: Final = MsgpackSerializer()
JSON: Final = JSONSerializer()
#: Built-in serializers by record id, to read records another serializer wrote.
SERIALIZERS: Final[Mapping[int, Serializer]] = types.MappingProxyType(
    {MSGPACK.id: MSGPACK, JSON.id: JSON}
)
_BY_NAME: Final[Mapping[str, Serializer]] = {MSGPACK.name: MSGPACK, JSON.name: JSON}


def get_serializer(spec: str | Serializer) -> Serializer:
    """The serializer named `spec` ("msgpack" or "json"), or `spec` itself once checked.

    A serializer of your own needs ``name``, ``id`` (128..255: 0..127 are memsess's),
    ``dumps()`` and ``loads()``.
    """
    if isinstance(spec, str):
        try:
            return _BY_NAME[spec]
        except KeyError:
            choices = ", ".join(repr(name) for name in sorted(_BY_NAME))
            raise ValueError(
                f"unknown serializer {spec!r}: choose {choices}, or pass an object "
                "with name, id, dumps() and loads()"
            ) from None
    if not isinstance(spec, Serializer):
        raise TypeError(
            f"serializer must be a name or an object with name, id, dumps() and loads(), "
            f"not {type(spec).__qualname__}"
        )
    builtin = SERIALIZERS.get(spec.id) if type(spec.id) is int else None
    if builtin is not None and isinstance(spec, type(builtin)):
        return spec  # a built-in class, maybe subclassed: same bytes, same id
    if type(spec.id) is not int or not 128 <= spec.id <= 255:
        raise ValueError(f"serializer {spec.name!r} has id {spec.id!r}: use 128..255")
    return spec
