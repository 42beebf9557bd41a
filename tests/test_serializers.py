"""Serializers: what round-trips, what is refused with a key path, and hostile bytes."""

from __future__ import annotations

import collections
import datetime as dt
import enum
import itertools
import math
import sys
import threading
import uuid
import zoneinfo
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markupsafe import Markup

from memsess import _msgpack_ext, serializers
from memsess.errors import SerializationError
from memsess.serializers import (
    JSON,
    MAX_BIG_INT_BYTES,
    MAX_EXT_NESTING,
    MAX_NESTING,
    MAX_SHARED_HASH,
    MSGPACK,
    SERIALIZERS,
    JSONSerializer,
    MsgpackSerializer,
    get_serializer,
)

UTC = dt.timezone.utc
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
PLUS_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))
ODD_OFFSET = dt.timezone(-dt.timedelta(hours=3, seconds=7, microseconds=5))


def canonical(value: Any) -> Any:
    """A comparable form that keeps what == ignores: types, offsets, -0.0, Decimal exponents."""
    kind = type(value)
    if kind is dict:
        return kind, tuple((key, canonical(item)) for key, item in value.items())
    if kind in (list, tuple, set, frozenset):
        items = (canonical(item) for item in value)
        return kind, (tuple(items) if kind in (list, tuple) else frozenset(items))
    if kind in (dt.datetime, dt.time):
        return kind, value.replace(tzinfo=None), value.utcoffset(), value.tzinfo is None
    exact = {float: repr, Decimal: Decimal.as_tuple}.get(kind)
    return kind, value if exact is None else exact(value)


def assert_round_trip(value: Any, serializer: Any = MSGPACK) -> Any:
    back = serializer.loads(serializer.dumps({"key": value}))["key"]
    assert canonical(back) == canonical(value)
    return back


ROUND_TRIPS = {
    "str": "héllo \x00 wörld 🎉",
    "empty str": "",
    "int": -(2**63),
    "uint64": 2**64 - 1,
    "big int": 2**200 + 1,
    "big negative int": -(2**64),
    "float": 0.1,
    "negative zero": -0.0,
    "inf": math.inf,
    "bool": True,
    "none": None,
    "bytes": b"\x00\xff\x80",
    "list": [1, "two", [3.0]],
    "dict": {"nested": {"deeper": [1, {"x": None}]}},
    "tuple": (1, "a", (2, (3,)), [4]),
    "empty tuple": (),
    "set": {1, "a", (2, 3), frozenset({4})},
    "empty set": set(),
    "frozenset": frozenset({b"x", dt.date(2024, 1, 1)}),
    "naive datetime": dt.datetime(2024, 2, 29, 13, 14, 15, 123456),
    "utc datetime": dt.datetime(2024, 2, 29, 13, 14, 15, 654321, tzinfo=UTC),
    "+05:30 datetime": dt.datetime(2024, 2, 29, 13, 14, 15, 1, tzinfo=PLUS_0530),
    "odd offset datetime": dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=ODD_OFFSET),
    "zoneinfo datetime": dt.datetime(2024, 7, 1, 12, tzinfo=PARIS),
    "pre-epoch naive datetime": dt.datetime(1900, 1, 1, 0, 0, 0, 500000),
    "datetime.min +05:30": dt.datetime.min.replace(tzinfo=PLUS_0530),
    "datetime.max -03:00": dt.datetime.max.replace(tzinfo=ODD_OFFSET),
    "datetime.max utc": dt.datetime.max.replace(tzinfo=UTC),
    "date": dt.date(2020, 2, 29),
    "date.min": dt.date.min,
    "time": dt.time(23, 59, 59, 999999),
    "aware time": dt.time(1, 2, 3, 4, tzinfo=ODD_OFFSET),
    "timedelta": dt.timedelta(days=-3, seconds=5, microseconds=7),
    "timedelta.max": dt.timedelta.max,
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": Decimal("-1.2300"),
    "decimal exponent": Decimal("1E+999999"),
    "decimal nan": Decimal("NaN"),
    "markup": Markup("<b>bold</b> &amp;"),
}


@pytest.mark.parametrize("value", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_msgpack_round_trips_each_type_as_the_same_type(value: Any) -> None:
    assert_round_trip(value)


def test_tuple_stays_tuple_and_markup_stays_markup() -> None:
    back = MSGPACK.loads(MSGPACK.dumps({"pair": (1, 2), "html": Markup("<i>x</i>")}))
    assert type(back["pair"]) is tuple
    assert type(back["html"]) is Markup


def test_aware_datetime_keeps_its_offset_and_microseconds() -> None:
    value = dt.datetime(2024, 3, 31, 2, 30, 0, 7, tzinfo=PLUS_0530)
    back = assert_round_trip(value)
    assert back.utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert (back.hour, back.microsecond) == (2, 7)


def test_zoneinfo_datetime_comes_back_with_the_offset_it_had() -> None:
    winter, summer = dt.datetime(2024, 1, 1, tzinfo=PARIS), dt.datetime(2024, 7, 1, tzinfo=PARIS)
    assert assert_round_trip(winter).tzinfo == dt.timezone(dt.timedelta(hours=1))
    assert assert_round_trip(summer).tzinfo == dt.timezone(dt.timedelta(hours=2))


def test_naive_datetime_stays_naive() -> None:
    assert assert_round_trip(dt.datetime(2024, 1, 1, 12)).tzinfo is None


def test_utc_datetime_is_a_standard_msgpack_timestamp() -> None:
    value = dt.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=UTC)
    assert msgpack.unpackb(MSGPACK.dumps({"at": value}), timestamp=3) == {"at": value}


def test_time_in_a_named_zone_is_refused_it_has_no_offset() -> None:
    with pytest.raises(SerializationError, match=r"session\['at'\]: .*no fixed UTC offset"):
        MSGPACK.dumps({"at": dt.time(12, tzinfo=PARIS)})


def test_object_with_html_comes_back_as_markup_like_flask_tags_it() -> None:
    class Widget:
        def __html__(self) -> str:
            return "<input>"

    back = MSGPACK.loads(MSGPACK.dumps({"w": Widget()}))["w"]
    assert (type(back), back) == (Markup, Markup("<input>"))


def test_markup_comes_back_as_str_without_markupsafe(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = MSGPACK.dumps({"html": Markup("<b>x</b>")})
    monkeypatch.setitem(sys.modules, "markupsafe", None)  # makes `import markupsafe` fail
    _msgpack_ext._markup_class.cache_clear()
    try:
        back = MSGPACK.loads(raw)["html"]
    finally:
        _msgpack_ext._markup_class.cache_clear()
    assert (type(back), back) == (str, "<b>x</b>")


class Color(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (collections.OrderedDict(b=1, a=2), {"b": 1, "a": 2}),
        (collections.defaultdict(list, a=[1]), {"a": [1]}),
        (Color.RED, "red"),
        (Level.HIGH, 3),
        (Point(1, 2), (1, 2)),
        (bytearray(b"ab"), b"ab"),
    ],
    ids=["OrderedDict", "defaultdict", "str enum", "IntEnum", "namedtuple", "bytearray"],
)
def test_subclasses_of_builtins_come_back_as_the_builtin(value: Any, expected: Any) -> None:
    back = MSGPACK.loads(MSGPACK.dumps({"key": value}))["key"]
    assert canonical(back) == canonical(expected)


def test_django_session_values_round_trip() -> None:
    # What django.contrib.auth.login() and SessionBase.set_expiry() store (Django 5.2).
    session = {
        "_auth_user_id": "42",
        "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
        "_auth_user_hash": "f" * 64,
        "_session_expiry": dt.datetime(2030, 1, 1, tzinfo=UTC).isoformat(),
    }
    for serializer in (MSGPACK, JSON):
        assert serializer.loads(serializer.dumps(session)) == session
        with_seconds = {**session, "_session_expiry": 1209600}
        assert serializer.loads(serializer.dumps(with_seconds)) == with_seconds


def test_flask_tagged_values_round_trip() -> None:
    # The types flask.json.tag.TaggedJSONSerializer tags in a cookie session.
    session = {
        "_fresh": True,
        "_flashes": [("message", Markup("<b>saved</b>"))],
        "token": b"\x01\x02",
        "id": uuid.uuid4(),
        "seen": dt.datetime(2024, 1, 1, tzinfo=UTC),
        " di": {" t": "a dict whose one key looks like a Flask tag"},
    }
    assert canonical(MSGPACK.loads(MSGPACK.dumps(session))) == canonical(session)


def test_top_level_mapping_that_is_not_a_dict_is_accepted() -> None:
    assert MSGPACK.loads(MSGPACK.dumps(collections.OrderedDict(a=1))) == {"a": 1}


def test_large_session_round_trips_and_the_thread_packer_recovers() -> None:
    big = {"blob": b"x" * 200_000, "items": list(range(10_000))}
    assert MSGPACK.loads(MSGPACK.dumps(big)) == big
    assert MSGPACK.dumps({"a": 1}) == msgpack.packb({"a": 1})


def test_wire_format_is_stable() -> None:
    # Records outlive deploys in a shared cache: a change here breaks stored sessions.
    session = {
        "t": (1, "a"),
        "s": frozenset({7}),
        "n": dt.datetime(2024, 1, 2, 3, 4, 5, 6),
        "u": dt.datetime(2024, 1, 2, tzinfo=UTC),
        "z": dt.datetime(2024, 1, 2, tzinfo=PLUS_0530),
        "d": dt.date(2024, 1, 2),
        "h": dt.time(1, 2, 3),
        "p": dt.timedelta(days=1, seconds=2, microseconds=3),
        "i": uuid.UUID(int=1),
        "m": Decimal("1.5"),
        "k": Markup("<b>"),
        "b": 2**64,
    }
    assert MSGPACK.dumps(session).hex() == (
        "8c"
        "a174d6019201a161"  # ext 1: array [1, "a"]
        "a173d5039107"  # ext 3: array [7]
        "a16ed70400005dc065937d25"  # ext 4: Timestamp 64 layout, 6000 ns
        "a175d6ff65935200"  # ext -1: msgpack Timestamp 32
        "a17ac70c05000000049c2c060065935200"  # ext 5: +19800 s in us, wall clock
        "a164d606000b4647"  # ext 6: ordinal 738887
        "a168d70700000000dde878c0"  # ext 7: 3723 s in us
        "a170c70c08000000010000000200000003"  # ext 8: days, seconds, us
        "a169d80900000000000000000000000000000001"  # ext 9: 16 bytes
        "a16dc7030a312e35"  # ext 10: "1.5"
        "a16bc7030b3c623e"  # ext 11: "<b>"
        "a162c7090c010000000000000000"  # ext 12: 2**64, two's complement
    )


def test_failed_dumps_leaves_the_next_one_correct() -> None:
    with pytest.raises(SerializationError):
        MSGPACK.dumps({"a": [1, 2, object()]})
    assert MSGPACK.dumps({"b": [3]}) == msgpack.packb({"b": [3]})


def test_dumps_and_loads_are_thread_safe() -> None:
    errors: list[BaseException] = []

    def work(number: int) -> None:
        session = {"n": number, "t": (number, str(number)), "at": dt.datetime(2024, 1, 1)}
        try:
            for _ in range(2000):
                assert MSGPACK.loads(MSGPACK.dumps(session)) == session
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --- hypothesis: random session-like data -----------------------------------------

fixed_offsets = st.timedeltas(
    min_value=dt.timedelta(hours=-24) + dt.timedelta(microseconds=1),
    max_value=dt.timedelta(hours=24) - dt.timedelta(microseconds=1),
).map(dt.timezone)
hashables = st.recursive(
    st.one_of(st.integers(), st.text(), st.binary(), st.dates(), st.uuids()),
    lambda children: st.lists(children, max_size=3).map(tuple) | st.frozensets(children),
    max_leaves=5,
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(),
    st.binary(),
    st.datetimes(timezones=st.none() | st.just(UTC) | fixed_offsets | st.timezones()),
    st.dates(),
    st.times(timezones=st.none() | fixed_offsets),
    st.timedeltas(),
    st.uuids(),
    st.decimals(),
    st.text().map(Markup),
    st.sets(hashables, max_size=4),
    st.frozensets(hashables, max_size=4),
)
session_values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(), children, max_size=4),
    ),
    max_leaves=25,
)
sessions = st.dictionaries(st.text(), session_values, max_size=6)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=25,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions)
def test_msgpack_round_trips_random_sessions(session: dict[str, Any]) -> None:
    assert canonical(MSGPACK.loads(MSGPACK.dumps(session))) == canonical(session)


@settings(deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_json_round_trips_random_json_sessions(session: dict[str, Any]) -> None:
    assert canonical(JSON.loads(JSON.dumps(session))) == canonical(session)


# --- refused values -------------------------------------------------------------


class Foo:
    pass


@pytest.mark.parametrize(
    ("session", "message"),
    [
        ({"cart": [1, 2, Foo()]}, r"^session\['cart'\]\[2\]: cannot serialize object of type Foo$"),
        ({"a": {"b": (1, {"c": Foo()})}}, r"^session\['a'\]\['b'\]\[1\]\['c'\]: .* type Foo$"),
        ({"tags": {1, Foo()}}, r"^session\['tags'\]\[\.\.\.\]: cannot serialize .* Foo$"),
        ({"f": 1j}, r"^session\['f'\]: cannot serialize object of type complex$"),
        ({"e": Exception("x")}, r"^session\['e'\]: cannot serialize object of type Exception$"),
        ({1: "x"}, r"^session: dict key of type int \(keys must be str\)$"),
        ({"p": {b"k": 1}}, r"^session\['p'\]: dict key of type bytes"),
        ({"p": [{None: 1}]}, r"^session\['p'\]\[0\]: dict key of type NoneType"),
        ({"p": ({("a",): 1},)}, r"^session\['p'\]\[0\]: dict key of type tuple"),
        ({"s": "\ud800"}, r"^session\['s'\]: str is not valid UTF-8"),
    ],
    ids=[
        "list item",
        "deep",
        "set member",
        "complex",
        "exception",
        "int key",
        "bytes key",
        "None key",
        "tuple key",
        "lone surrogate",
    ],
)
def test_unsupported_values_name_their_key_path(session: dict[Any, Any], message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        MSGPACK.dumps(session)


def test_serialization_error_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        MSGPACK.dumps({"x": Foo()})


def test_circular_reference_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match=r"^session\['loop'\]\[0\]: circular reference"):
        MSGPACK.dumps({"loop": loop})


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_tuples(depth: int) -> tuple[Any, ...]:
    value: tuple[Any, ...] = ()
    for _ in range(depth - 1):
        value = (value,)
    return value


def test_nesting_limit_is_enforced_on_dumps() -> None:
    MSGPACK.dumps({"deep": nested_lists(MAX_NESTING - 1)})  # with the session dict: the limit
    with pytest.raises(SerializationError, match="nested deeper than"):
        MSGPACK.dumps({"deep": nested_lists(MAX_NESTING)})


def test_tuple_nesting_limit_is_enforced_on_dumps() -> None:
    assert_round_trip(nested_tuples(MAX_EXT_NESTING))
    with pytest.raises(SerializationError, match="tuples and sets nested deeper than"):
        MSGPACK.dumps({"deep": nested_tuples(MAX_EXT_NESTING + 1)})


def test_data_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(SerializationError, match="must be a mapping"):
        MSGPACK.dumps([("a", 1)])  # type: ignore[arg-type]


# --- hostile bytes to loads ------------------------------------------------------

VALID = MSGPACK.dumps(
    {"t": (1, {2}), "at": dt.datetime(2024, 1, 1, tzinfo=PLUS_0530), "m": Markup("<b>")}
)


def ext(code: int, payload: bytes) -> bytes:
    """{"k": <ext code payload>}, by hand: msgpack.ExtType refuses codes below 0."""
    header = b"\xc9" + len(payload).to_bytes(4, "big") + code.to_bytes(1, "big", signed=True)
    return b"\x81\xa1k" + header + payload


def nested_tuple_ext(depth: int) -> bytes:
    """{"k": a tuple in a tuple ... `depth` + 1 levels}, written without dumps()."""
    payload: bytes = msgpack.packb([])
    for _ in range(depth):
        payload = msgpack.packb([msgpack.ExtType(1, payload)])
    return ext(1, payload)


HOSTILE = {
    "empty": b"",
    "array claiming 2**31 items": b"\xdd\x7f\xff\xff\xff" + b"\xc0" * 8,
    "map claiming 2**31 pairs": b"\xdf\x7f\xff\xff\xff" + b"\xa0\xc0" * 8,
    "str claiming 4 GiB": b"\x81\xa1k\xdb\xff\xff\xff\xff" + b"x" * 8,
    "list at top": msgpack.packb([1, 2]),
    "int at top": msgpack.packb(7),
    "nil at top": b"\xc0",
    "int key": msgpack.packb({1: 2}),
    "bytes key": msgpack.packb({b"k": 2}, use_bin_type=True),
    "nested bytes key": msgpack.packb({"a": {b"k": 2}}, use_bin_type=True),
    "float key": msgpack.packb({1.5: 2}),
    "invalid utf-8 str": b"\x81\xa1k\xa2\xff\xfe",
    "unknown ext code": ext(42, b"x"),
    "negative ext code": ext(-5, b"x"),
    "extra bytes after": VALID + b"\x00",
    "tuple ext holding a map": ext(1, msgpack.packb({"a": 1})),
    "set of lists": ext(2, msgpack.packb([[1]])),
    "truncated tuple payload": ext(1, b"\x92\x01"),
    "datetime of 3 bytes": ext(4, b"\x00\x00\x00"),
    "timestamp out of range": msgpack.packb({"k": msgpack.Timestamp(2**40, 0)}),
    "timestamp nanoseconds over 1e9": ext(-1, b"\xff" * 12),
    "offset of 25 hours": ext(5, (25 * 3600 * 10**6).to_bytes(8, "big") + b"\0" * 4),
    "aware datetime too short": ext(5, b"\x00" * 5),
    "date ordinal 0": ext(6, b"\x00\x00\x00\x00"),
    "date of 2 bytes": ext(6, b"\x00\x01"),
    "time past midnight": ext(7, (86400 * 10**6).to_bytes(8, "big")),
    "time of 9 bytes": ext(7, b"\x00" * 9),
    "timedelta overflow": ext(8, b"\x7f\xff\xff\xff" + b"\xff" * 8),
    "uuid of 15 bytes": ext(9, b"\x00" * 15),
    "decimal not a number": ext(10, b"1.2.3"),
    "decimal not ascii": ext(10, b"\xff"),
    "markup not utf-8": ext(11, b"\xff"),
    "tuples nested past the limit": nested_tuple_ext(MAX_EXT_NESTING + 1),
    # Without the limit this 1.5 KiB input crashed the interpreter (C stack overflow).
    "tuples nested 300 deep": nested_tuple_ext(300),
    "lists nested 100000 deep": b"\x81\xa1k" + b"\x91" * 100_000,
}


@pytest.mark.parametrize("raw", HOSTILE.values(), ids=HOSTILE.keys())
def test_loads_raises_value_error_on_hostile_bytes(raw: bytes) -> None:
    with pytest.raises(ValueError, match="msgpack"):
        MSGPACK.loads(raw)


def test_loads_accepts_tuples_nested_to_the_limit() -> None:
    assert MSGPACK.loads(nested_tuple_ext(MAX_EXT_NESTING - 1))["k"]


def test_loads_refuses_input_over_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serializers, "MAX_DATA_BYTES", len(VALID) - 1)
    with pytest.raises(ValueError, match="limit"):
        MSGPACK.loads(VALID)
    with pytest.raises(ValueError, match="limit"):
        JSON.loads(b'{"a":"' + b"x" * len(VALID) + b'"}')


@pytest.mark.parametrize("size", range(len(VALID)))
def test_loads_raises_value_error_on_every_truncation(size: int) -> None:
    with pytest.raises(ValueError, match="msgpack"):
        MSGPACK.loads(VALID[:size])


def loads_or_value_error(serializer: Any, raw: bytes) -> None:
    try:
        result = serializer.loads(raw)
    except ValueError:
        return
    assert type(result) is dict
    assert all(type(key) is str for key in result)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_loads_of_random_bytes_raises_only_value_error(raw: bytes) -> None:
    loads_or_value_error(MSGPACK, raw)
    loads_or_value_error(MSGPACK, b"\x81\xa1k" + raw)  # past the first byte, into a value
    loads_or_value_error(JSON, raw)


@settings(max_examples=500)
@given(st.integers(min_value=-128, max_value=127), st.binary(max_size=40))
def test_loads_of_random_ext_payloads_raises_only_value_error(code: int, payload: bytes) -> None:
    loads_or_value_error(MSGPACK, ext(code, payload))


@settings(max_examples=300)
@given(st.data())
def test_loads_of_corrupted_valid_data_raises_only_value_error(data: st.DataObject) -> None:
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    loads_or_value_error(MSGPACK, bytes(raw))


def test_loads_of_wrong_input_type_raises_value_error() -> None:
    for serializer in (MSGPACK, JSON):
        with pytest.raises(ValueError, match="cannot decode"):
            serializer.loads(None)  # type: ignore[arg-type]


# --- CPU bounds on loads: members chosen to share one hash() ---------------------

# Python hashes every number as its value mod this prime (sys.hash_info.modulus), so
# anyone who can write to the cache can pick set members that all share one hash.
HASH_MODULUS = 2**61 - 1


def big_int(value: int) -> msgpack.ExtType:
    return msgpack.ExtType(12, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def set_ext(code: int, members: list[Any]) -> bytes:
    """{"k": set (code 2) or frozenset (3) of `members`}, by hand: building the hostile
    set in Python to dumps() it would cost the very time the check saves."""
    return ext(code, msgpack.packb(members, use_bin_type=True))


def colliding(count: int, start: int = 2**64) -> list[int]:
    return [start + i * HASH_MODULUS for i in range(count)]


def test_loads_refuses_a_780_kb_set_of_big_ints_sharing_one_hash() -> None:
    # Before the check, loading this took ~20 s of CPU: each insert compared the new
    # member with every earlier one.
    raw = set_ext(2, [big_int(value) for value in colliding(60_000)])
    assert len(raw) > 770_000
    with pytest.raises(ValueError, match="share one hash"):
        MSGPACK.loads(raw)


# Not only ints: UUIDs (hashed as their 128-bit int; the slowest, ~1 ms per member),
# Decimals, and tuples of plain 64-bit ints (a tuple's hash is made of its members').
INT64_TWINS = colliding(9, start=5)  # 5 + 8 * HASH_MODULUS still fits in 64 bits
COLLIDING_MEMBERS = {
    "uuids": [msgpack.ExtType(9, value.to_bytes(16, "big")) for value in colliding(2000)],
    "decimals": [msgpack.ExtType(10, str(value).encode()) for value in colliding(2000)],
    "tuples of int64": [
        msgpack.ExtType(1, msgpack.packb(list(t))) for t in itertools.product(INT64_TWINS, repeat=4)
    ],
    "floats and ints": [
        *(2.0 ** (61 * k) for k in range(-17, 17)),  # 2**61 == 1 mod HASH_MODULUS
        *colliding(9, start=1),
        *map(big_int, colliding(30, start=1 + 9 * HASH_MODULUS)),
    ],
}


@pytest.mark.parametrize("members", COLLIDING_MEMBERS.values(), ids=COLLIDING_MEMBERS.keys())
@pytest.mark.parametrize("code", [2, 3], ids=["set", "frozenset"])
def test_loads_refuses_sets_of_any_members_sharing_one_hash(code: int, members: list[Any]) -> None:
    with pytest.raises(ValueError, match="share one hash"):
        MSGPACK.loads(set_ext(code, members))


def test_loads_accepts_up_to_max_shared_hash_members_per_hash() -> None:
    uuids = {uuid.UUID(int=value) for value in colliding(MAX_SHARED_HASH)}
    assert len({hash(member) for member in uuids}) == 1
    assert_round_trip(uuids)
    assert_round_trip(frozenset(uuids))


def test_big_ints_are_bounded_in_size_both_ways() -> None:
    largest = 2 ** (MAX_BIG_INT_BYTES * 8 - 1) - 1
    assert_round_trip(largest)
    assert_round_trip(-largest)
    with pytest.raises(SerializationError, match=r"^session\['n'\]\[0\]: .*bytes"):
        MSGPACK.dumps({"n": [largest + 1]})
    with pytest.raises(ValueError, match="bytes"):
        MSGPACK.loads(ext(12, b"\x01" * (MAX_BIG_INT_BYTES + 1)))


# --- JSON ------------------------------------------------------------------------


def test_json_output_is_compact_utf8() -> None:
    assert JSON.dumps({"a": [1, "é", None, True, 1.5, {"b": {}}]}) == (
        '{"a":[1,"é",null,true,1.5,{"b":{}}]}'.encode()
    )


@pytest.mark.parametrize(
    ("session", "message"),
    [
        ({"t": (1, 2)}, r"^session\['t'\]: tuple would come back from JSON as a list"),
        ({"m": Markup("<b>")}, r"^session\['m'\]: Markup would lose its HTML-safe mark"),
        ({"b": [b"x"]}, r"^session\['b'\]\[0\]: cannot serialize object of type bytes as JSON"),
        ({"d": dt.datetime(2024, 1, 1)}, r"^session\['d'\]: .* type datetime as JSON"),
        ({"u": {uuid.uuid4()}}, r"^session\['u'\]: cannot serialize object of type set"),
        ({"n": math.nan}, r"^session\['n'\]: float nan is not valid JSON$"),
        ({"i": [-math.inf]}, r"^session\['i'\]\[0\]: float -inf is not valid JSON$"),
        ({"k": {1: "a"}}, r"^session\['k'\]: dict key of type int"),
        ({"s": "\udfff"}, r"^session\['s'\]: str is not valid UTF-8"),
        ({"i": 10**5000}, r"^session: .*digits"),
    ],
    ids=[
        "tuple",
        "markup",
        "bytes",
        "datetime",
        "set",
        "nan",
        "inf",
        "int key",
        "surrogate",
        "huge int",
    ],
)
def test_json_refuses_values_json_cannot_keep(session: dict[Any, Any], message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        JSON.dumps(session)


def test_json_accepts_subclasses_of_json_types() -> None:
    session = {"od": collections.OrderedDict(a=1), "c": Color.RED, "l": Level.HIGH}
    assert JSON.loads(JSON.dumps(session)) == {"od": {"a": 1}, "c": "red", "l": 3}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[1]",
        b'"s"',
        b"null",
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":1} x',
        b'{"a":"\xff"}',
        "{}".encode("utf-16"),
        b"[" * 100_000,
        b'{"a":' + b"1" * 5000 + b"}",
    ],
    ids=[
        "empty",
        "array",
        "string",
        "null",
        "NaN",
        "Infinity",
        "trailing",
        "bad utf-8",
        "utf-16",
        "deep",
        "huge int",
    ],
)
def test_json_loads_raises_value_error_on_bad_input(raw: bytes) -> None:
    with pytest.raises(ValueError, match="JSON"):
        JSON.loads(raw)


@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"1.5e309", b"[1e400]"])
def test_json_number_out_of_a_floats_range_is_corrupt_not_infinity(number: bytes) -> None:
    # Read as inf, it would be a session that loads but can never be saved again (dumps
    # refuses inf): no memsess wrote it, so the copy is corrupt.
    with pytest.raises(ValueError, match="out of a float's range"):
        JSON.loads(b'{"a":' + number + b"}")


def test_json_floats_in_range_still_read_exactly() -> None:
    data = {"max": 1.7976931348623157e308, "tiny": 5e-324, "neg": -0.0, "third": 1 / 3}
    loaded = JSON.loads(JSON.dumps(data))
    assert loaded == data
    assert all(type(value) is float for value in loaded.values())


# --- get_serializer and the registry ----------------------------------------------


class Custom:
    name = "custom"
    id = 200

    def dumps(self, data: Any) -> bytes:
        return b""

    def loads(self, raw: bytes) -> dict[str, Any]:
        return {}


def test_get_serializer_by_name() -> None:
    assert get_serializer("msgpack") is MSGPACK
    assert get_serializer("json") is JSON
    assert get_serializer(MSGPACK) is MSGPACK


def test_get_serializer_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'pickle'.*'json', 'msgpack'"):
        get_serializer("pickle")


def test_get_serializer_accepts_a_user_serializer_with_a_user_id() -> None:
    custom = Custom()
    assert get_serializer(custom) is custom


@pytest.mark.parametrize("bad_id", [0, 1, 2, 127, 256, -1, "200"])
def test_get_serializer_refuses_ids_outside_the_user_range(bad_id: Any) -> None:
    custom = Custom()
    custom.id = bad_id
    with pytest.raises(ValueError, match=r"128\.\.255"):
        get_serializer(custom)


def test_get_serializer_accepts_subclasses_of_the_builtins() -> None:
    class Tuned(MsgpackSerializer):
        pass

    tuned = Tuned()
    assert get_serializer(tuned) is tuned


def test_get_serializer_refuses_objects_without_the_protocol() -> None:
    with pytest.raises(TypeError, match="dumps"):
        get_serializer(42)  # type: ignore[arg-type]


def test_serializers_by_id() -> None:
    assert dict(SERIALIZERS) == {1: MSGPACK, 2: JSON}
    assert (MSGPACK.name, JSON.name) == ("msgpack", "json")
    assert isinstance(MSGPACK, MsgpackSerializer)
    assert isinstance(JSON, JSONSerializer)
    with pytest.raises(TypeError):
        SERIALIZERS[3] = JSON  # type: ignore[index]
