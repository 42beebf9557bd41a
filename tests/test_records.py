"""Session ids, key derivation and the record format."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memsess.errors import SessionIdError
from memsess.protocol import check_key
from memsess.records import (
    DATA,
    FLAGS,
    TOMBSTONE,
    VersionClock,
    decode_record,
    encode_record,
    is_valid_id,
    new_id,
    storage_key,
)

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


@given(st.integers(0, 2**64 - 1), st.sampled_from([DATA, TOMBSTONE]), st.binary(max_size=300))
def test_records_round_trip(version: int, kind: int, payload: bytes) -> None:
    record = decode_record(encode_record(version, kind, 1, payload), FLAGS)
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


def test_clock_ticks_strictly_increase_and_pass_observed_versions() -> None:
    clock = VersionClock()
    first = clock.tick()
    assert clock.tick() > first
    future = first + 10**12  # a version written by a machine whose clock runs ahead
    clock.observe(future)
    assert clock.tick() > future
