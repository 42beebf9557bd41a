"""Session ids, key derivation and the record format."""

from __future__ import annotations

import math
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memsess.errors import SessionIdError
from memsess.protocol import check_key
from memsess.records import (
    CODECS,
    DATA,
    FLAGS,
    HEADER_SIZE,
    MAX_CLOCK_SKEW,
    SEALED_PREFIX,
    TOMBSTONE,
    VersionClock,
    compress,
    decode_record,
    encode_record,
    is_valid_id,
    lifetime_seconds,
    new_id,
    plain_payload,
    storage_key,
)

NOW_US = 1_750_000_000 * 10**6  # a fixed wall clock for decode_record(now_us=...)
SKEW_US = MAX_CLOCK_SKEW * 10**6
YEAR_US = 365 * 86400 * 10**6

HOSTILE_IDS = [
    "",
    "a" * 42,
    "a" * 44,
    "a" * 10_000,
    "a" * 41 + "\r\n",
    "a" * 40 + "\r\nset",
    "a" * 42 + " ",
    "a" * 42 + "\x00",
    "é" * 43,
    "a" * 42 + "=",
    "a" * 42 + "/",
]


def test_new_ids_are_43_url_safe_chars_and_unique() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", sid) for sid in ids)
    assert all(is_valid_id(sid) for sid in ids)


@pytest.mark.parametrize("sid", HOSTILE_IDS)
def test_malformed_ids_are_rejected(sid: str) -> None:
    assert not is_valid_id(sid)
    with pytest.raises(SessionIdError):
        storage_key(b"memsess:", sid)


def test_non_strings_are_not_ids() -> None:
    assert not is_valid_id(None)
    assert not is_valid_id(b"a" * 43)


def test_storage_key_is_prefix_plus_digest_never_the_id() -> None:
    sid = new_id()
    key = storage_key(b"memsess:", sid)
    assert key.startswith(b"memsess:")
    assert sid.encode() not in key
    assert len(key) == len(b"memsess:") + 40
    assert check_key(key) == key
    assert storage_key(b"memsess:", sid) == key
    assert storage_key(b"memsess:", new_id()) != key


@given(
    st.integers(1, NOW_US + SKEW_US), st.sampled_from([DATA, TOMBSTONE]), st.binary(max_size=300)
)
def test_records_round_trip(version: int, kind: int, payload: bytes) -> None:
    record = decode_record(encode_record(version, kind, 1, payload), FLAGS, now_us=NOW_US)
    assert (record.version, record.kind, record.serializer_id, record.payload) == (
        version,
        kind,
        1,
        payload,
    )
    assert record.is_tombstone == (kind == TOMBSTONE)


@pytest.mark.parametrize(
    ("raw", "flags", "reason"),
    [
        (encode_record(1, DATA, 1, b"x"), 0, "foreign"),
        (b"", FLAGS, "shorter"),
        (b"garbage bytes planted here", FLAGS, "magic"),
        (encode_record(1, DATA, 1, b"payload")[:-1], FLAGS, "checksum"),
        (encode_record(1, DATA, 1, b"payload") + b"!", FLAGS, "checksum"),
        (encode_record(1, 7, 1, b"payload"), FLAGS, "kind"),
    ],
)
def test_corrupt_records_raise_value_error(raw: bytes, flags: int, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_record(raw, flags)


def test_flipping_any_payload_bit_is_detected() -> None:
    raw = bytearray(encode_record(42, DATA, 1, b"some session payload"))
    for position in range(16, len(raw)):
        corrupt = bytearray(raw)
        corrupt[position] ^= 0x01
        with pytest.raises(ValueError, match="checksum"):
            decode_record(bytes(corrupt), FLAGS)


@given(
    st.integers(1, NOW_US + SKEW_US),
    st.binary(max_size=3000),
    st.sampled_from(sorted(CODECS.values())),
    st.integers(0, 2**32 - 1),
)
def test_compressed_records_round_trip(version: int, payload: bytes, codec: int, ttl: int) -> None:
    packed = compress(payload, codec)
    raw = encode_record(version, DATA, 1, packed, ttl=ttl, codec=codec)
    assert raw[:2] == b"\xd5\x03"
    record = decode_record(raw, FLAGS, now_us=NOW_US)
    assert (record.version, record.kind, record.serializer_id, record.ttl) == (
        version,
        DATA,
        1,
        ttl,
    )
    assert (record.codec, record.payload) == (codec, packed)
    assert plain_payload(record) == payload


def test_uncompressed_records_stay_format_2_byte_for_byte() -> None:
    raw = encode_record(5, DATA, 1, b"x", ttl=60)
    assert raw == encode_record(5, DATA, 1, b"x", ttl=60, codec=0)
    assert (raw[:2], len(raw)) == (b"\xd5\x02", HEADER_SIZE + 1)
    record = decode_record(raw, FLAGS, now_us=NOW_US)
    assert (record.codec, plain_payload(record)) == (0, b"x")


_COMPRESSED = encode_record(1, DATA, 1, compress(b"payload" * 20, 1), ttl=60, codec=1)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (encode_record(1, DATA, 1, b"x", codec=9), "unknown compression codec 9"),
        (encode_record(1, TOMBSTONE, 1, b"", codec=1), "kind"),
        (_COMPRESSED[:-1], "checksum"),
        (_COMPRESSED[:20], "shorter than its header"),
        (SEALED_PREFIX + bytes(40), "sealed record, and no secret_keys are configured"),
    ],
)
def test_corrupt_compressed_and_unexpected_sealed_records_raise(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_record(raw, FLAGS, now_us=NOW_US)


def test_flipping_any_bit_of_a_compressed_record_is_detected() -> None:
    for position in range(len(_COMPRESSED)):
        corrupt = bytearray(_COMPRESSED)
        corrupt[position] ^= 0x01
        with pytest.raises(ValueError, match=r"magic|kind|codec|checksum|impossible version"):
            decode_record(bytes(corrupt), FLAGS, now_us=NOW_US)


def test_clock_ticks_strictly_increase_and_pass_observed_versions() -> None:
    clock = VersionClock()
    first = clock.tick()
    assert clock.tick() > first
    future = first + 10**9  # a version written by a machine whose clock runs minutes ahead
    clock.observe(future)
    assert clock.tick() > future


@pytest.mark.parametrize(
    "version",
    [0, NOW_US + SKEW_US + 1, NOW_US + 30 * YEAR_US, 2**64 - 1],
    ids=["zero", "just-past-the-skew", "decades-ahead", "uint64-max"],
)
def test_impossible_versions_are_corrupt_records(version: int) -> None:
    raw = encode_record(version, DATA, 1, b"payload")
    with pytest.raises(ValueError, match="impossible version"):
        decode_record(raw, FLAGS, now_us=NOW_US)


def test_versions_up_to_the_allowed_clock_skew_ahead_are_accepted() -> None:
    for version in (1, NOW_US, NOW_US + SKEW_US):
        assert decode_record(encode_record(version, DATA, 1), FLAGS, now_us=NOW_US).version == (
            version
        )


def test_decode_record_bounds_versions_by_the_wall_clock_by_default() -> None:
    with pytest.raises(ValueError, match="impossible version"):
        decode_record(encode_record(2**64 - 1, DATA, 1), FLAGS)
    an_hour_ahead = time.time_ns() // 1000 + 3600 * 10**6  # a peer with a broken NTP
    assert decode_record(encode_record(an_hour_ahead, DATA, 1), FLAGS).version == an_hour_ahead


@pytest.mark.parametrize("hostile", [2**64 - 1, 2**80, 30 * YEAR_US])
def test_clock_ignores_versions_past_the_skew_so_every_later_write_still_encodes(
    hostile: int,
) -> None:
    clock = VersionClock()
    clock.observe(clock.tick() + hostile)
    version = clock.tick()
    assert version <= time.time_ns() // 1000 + 10**6  # still today, not decades ahead
    assert decode_record(encode_record(version, DATA, 1), FLAGS).version == version


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [(1, 1), (1440, 1440), (0.5, 1), (1e-9, 1), (2.0, 2), (2.1, 3), (86400.000001, 86401)],
)
def test_lifetime_seconds_rounds_up_to_whole_seconds(ttl: float, seconds: int) -> None:
    result = lifetime_seconds(ttl)
    assert (result, type(result)) == (seconds, int)


@pytest.mark.parametrize(
    ("ttl", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (0.0, ValueError),
        (-0.5, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        (True, TypeError),
        (False, TypeError),
        ("60", TypeError),
        (None, TypeError),
        (b"60", TypeError),
    ],
)
def test_lifetime_seconds_refuses_what_is_not_a_positive_finite_number(
    ttl: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="max_age"):
        lifetime_seconds(ttl, name="max_age")
