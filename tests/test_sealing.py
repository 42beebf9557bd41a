"""Sealed and compressed records: the sealer itself, the store's options against real
memcached, an attacker with raw access to memcached, decompression bombs, and the
options reaching the store through every adapter's configuration."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zstandard
from blocking_async import DRIVERS
from conftest import StoreFactory, key_of, server_indexes

from memsess import SessionStore, SessionTooLargeError, generate_key
from memsess import records as records_module
from memsess.records import (
    CODECS,
    DATA,
    FLAGS,
    SEALED_PREFIX,
    TOMBSTONE,
    Record,
    codec_id,
    compress,
    decode_record,
    encode_record,
    plain_payload,
    storage_key,
)
from memsess.sealing import OVERHEAD, Sealer
from memsess.serializers import MSGPACK
from memsess.testing import LocalCluster

MARKER = "marker-5e3a-sealed-session-contents"
LEGIT = {"user_id": 42, "note": MARKER}
FORGED = {"user_id": 1, "admin": True}
OLD_KEY = "old-secret-key-for-the-sealing-tests"
NEW_KEY = "new-secret-key-for-the-sealing-tests"
ATTACKER_KEY = "the-attackers-own-key-never-configured"
# Two keys whose 4-byte ids collide (found once by a birthday search over this pattern).
COLLIDING_KEYS = (
    b"memsess-test-key-id-collision-0000046754",
    b"memsess-test-key-id-collision-0000051057",
)
KEY = b"memsess:" + b"0123456789abcdef0123456789abcdef01234567"
OTHER_KEY = b"memsess:" + b"fedcba9876543210fedcba9876543210fedcba98"
NOW_US = 1_750_000_000 * 10**6
HOUR_US = 3600 * 10**6
GIB = 1 << 30


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """The store tests on both stores: the decisions are shared, the drivers are not."""
    return str(request.param)


def raw_copies(cluster: LocalCluster, store: SessionStore, sid: str) -> dict[int, bytes]:
    """What each server of ``sid``'s replica set holds under its key, as stored."""
    key = key_of(store, sid)
    found = {index: cluster.get_raw(index, key) for index in server_indexes(cluster, store, sid)}
    return {index: raw for index, raw in found.items() if raw is not None}


def every_stored_value(cluster: LocalCluster) -> list[bytes]:
    values = []
    for server in cluster.servers:
        for key in cluster.keys(server.index):
            raw = cluster.get_raw(server.index, key)
            if raw is not None:
                values.append(raw)
    return values


def plain_record(data: dict[str, Any], *, version: int | None = None) -> bytes:
    version = time.time_ns() // 1000 if version is None else version
    return encode_record(version, DATA, MSGPACK.id, MSGPACK.dumps(data), ttl=60)


# -- the sealer ------------------------------------------------------------------------


def test_generated_keys_are_43_url_safe_characters_and_seal() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(len(key) == 43 and key.replace("-", "").replace("_", "").isalnum() for key in keys)
    sealer = Sealer([keys.pop()])
    assert sealer.open(KEY, sealer.seal(KEY, b"record")) == b"record"


@pytest.mark.parametrize(
    ("secret_keys", "error", "match"),
    [
        (NEW_KEY, TypeError, "list of keys"),
        (NEW_KEY.encode(), TypeError, "list of keys"),
        ({NEW_KEY}, TypeError, "list of keys"),
        ([], ValueError, "empty"),
        (["s" * 31], ValueError, r"secret_keys\[0\] is 31 characters, shorter than 32"),
        ([NEW_KEY, b"b" * 31], ValueError, r"secret_keys\[1\] is 31 bytes"),
        ([NEW_KEY, 12345678], TypeError, r"secret_keys\[1\] must be str or bytes, not int"),
        ([bytearray(40)], TypeError, "not bytearray"),
    ],
)
def test_bad_secret_keys_are_refused_at_construction_without_showing_them(
    secret_keys: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as raised:
        Sealer(secret_keys)
    assert NEW_KEY not in str(raised.value)
    assert "sss" not in str(raised.value)
    with pytest.raises(error, match=match):  # the store checks them before any I/O
        SessionStore.from_dsn("127.0.0.1:1", secret_keys=secret_keys)


def test_without_cryptography_secret_keys_say_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.exceptions", None)
    with pytest.raises(ImportError, match=r"pip install memsess\[crypto\]"):
        SessionStore.from_dsn("127.0.0.1:1", secret_keys=[NEW_KEY])
    SessionStore.from_dsn("127.0.0.1:1").close()  # no secret_keys: cryptography unused


@pytest.mark.parametrize("kind", [DATA, TOMBSTONE])
@pytest.mark.parametrize("codec", [0, CODECS["zlib"], CODECS["zstd"]])
def test_sealed_records_round_trip_and_hide_everything(kind: int, codec: int) -> None:
    payload = MSGPACK.dumps(LEGIT) * 3 if kind == DATA else b""
    stored = compress(payload, codec) if codec and kind == DATA else payload
    record = encode_record(
        NOW_US, kind, MSGPACK.id, stored, ttl=600, codec=codec if kind == DATA else 0
    )
    sealer = Sealer([NEW_KEY])
    sealed = sealer.seal(KEY, record)
    assert sealed.startswith(SEALED_PREFIX)
    assert len(sealed) == len(record) + OVERHEAD
    assert MARKER.encode() not in sealed
    assert record[2:] not in sealed  # neither the header (kind, version, ttl) nor the data
    opened = sealer.open_record(sealed, FLAGS, KEY, now_us=NOW_US)
    assert (opened.version, opened.kind, opened.ttl) == (NOW_US, kind, 600)
    assert plain_payload(opened) == payload
    assert sealer.seal(KEY, record) != sealed  # a fresh nonce each time


def test_a_sealed_record_opens_only_under_the_key_it_was_sealed_for() -> None:
    sealer = Sealer([NEW_KEY])
    sealed = sealer.seal(KEY, plain_record(LEGIT, version=NOW_US))
    with pytest.raises(ValueError, match="fails authentication"):
        sealer.open_record(sealed, FLAGS, OTHER_KEY, now_us=NOW_US)
    with pytest.raises(ValueError, match="foreign item"):
        sealer.open_record(sealed, FLAGS + 1, KEY, now_us=NOW_US)
    assert sealer.open_record(sealed, FLAGS, KEY, now_us=NOW_US).version == NOW_US


REFUSED = r"unsealed record|not in secret_keys|fails authentication|shorter than its header"


def test_every_flipped_bit_and_every_truncation_of_a_sealed_record_is_refused() -> None:
    sealer = Sealer([NEW_KEY])
    sealed = sealer.seal(KEY, encode_record(NOW_US, DATA, MSGPACK.id, b"\x80", ttl=60))
    for position in range(len(sealed)):
        for bit in (0x01, 0x80):
            damaged = bytearray(sealed)
            damaged[position] ^= bit
            with pytest.raises(ValueError, match=REFUSED):
                sealer.open_record(bytes(damaged), FLAGS, KEY, now_us=NOW_US)
    for length in range(len(sealed)):
        with pytest.raises(ValueError, match=REFUSED):
            sealer.open_record(sealed[:length], FLAGS, KEY, now_us=NOW_US)


def test_the_first_key_seals_every_key_opens_and_a_removed_key_opens_nothing() -> None:
    old = Sealer([OLD_KEY]).seal(KEY, plain_record(LEGIT, version=NOW_US))
    rotated = Sealer([NEW_KEY, OLD_KEY])
    assert rotated.open_record(old, FLAGS, KEY, now_us=NOW_US).version == NOW_US
    new = rotated.seal(KEY, plain_record(LEGIT, version=NOW_US + 1))
    assert Sealer([NEW_KEY]).open_record(new, FLAGS, KEY, now_us=NOW_US).version == NOW_US + 1
    with pytest.raises(ValueError, match="not in secret_keys"):
        Sealer([OLD_KEY]).open(KEY, new)
    with pytest.raises(ValueError, match="not in secret_keys"):
        Sealer([NEW_KEY]).open(KEY, old)  # the old key removed after the rotation


def test_keys_whose_ids_collide_both_open_their_records() -> None:
    first, second = COLLIDING_KEYS
    by_first = Sealer([first]).seal(KEY, b"one")
    by_second = Sealer([second]).seal(KEY, b"two")
    assert by_first[2:6] == by_second[2:6]  # the same key id: the test's premise
    both = Sealer([first, second])
    assert (both.open(KEY, by_first), both.open(KEY, by_second)) == (b"one", b"two")
    with pytest.raises(ValueError, match="fails authentication"):
        Sealer([first]).open(KEY, by_second)


def test_plain_and_sealed_records_each_refused_by_the_other_kind_of_store() -> None:
    plain = plain_record(LEGIT, version=NOW_US)
    with pytest.raises(ValueError, match="unsealed record, and secret_keys are set"):
        Sealer([NEW_KEY]).open_record(plain, FLAGS, KEY, now_us=NOW_US)
    sealed = Sealer([NEW_KEY]).seal(KEY, plain)
    with pytest.raises(ValueError, match="sealed record, and no secret_keys are configured"):
        decode_record(sealed, FLAGS, now_us=NOW_US)


# -- compression, record by record ---------------------------------------------------------


@pytest.mark.parametrize("codec", sorted(CODECS.values()))
def test_compressed_payloads_round_trip_and_damage_is_refused(codec: int) -> None:
    payload = MSGPACK.dumps({"text": MARKER * 200, "n": list(range(300))})
    packed = compress(payload, codec)
    assert len(packed) < len(payload) // 4
    raw = encode_record(NOW_US, DATA, MSGPACK.id, packed, ttl=60, codec=codec)
    record = decode_record(raw, FLAGS, now_us=NOW_US)
    assert (record.codec, record.payload, record.ttl) == (codec, packed, 60)
    assert plain_payload(record) == payload
    for damaged in (packed[:-3], packed + b"tail", packed[:4] + bytes(len(packed) - 4)):
        with pytest.raises(ValueError, match="corrupt"):
            plain_payload(record._replace(payload=damaged))
    with pytest.raises(ValueError, match="max_session_size"):
        plain_payload(record, max_size=len(payload) - 1)
    assert plain_payload(record, max_size=len(payload)) == payload


def _zeros_compressed(codec: str, *, sized: bool = True) -> bytes:
    """1 GiB of zeros, compressed a MiB at a time (never held whole)."""
    chunk = bytes(1 << 20)
    if codec == "zlib":
        deflater = zlib.compressobj(9)
        return b"".join(deflater.compress(chunk) for _ in range(1024)) + deflater.flush()
    size = GIB if sized else -1  # -1: the frame does not state its size
    packer = zstandard.ZstdCompressor(level=3).compressobj(size=size)
    return b"".join(packer.compress(chunk) for _ in range(1024)) + packer.flush()


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[int, bytes]]:
    """Decompression bombs of 1 GiB each, by name: (codec id, compressed bytes)."""
    return {
        "zlib": (CODECS["zlib"], _zeros_compressed("zlib")),
        "zstd-stating-its-size": (CODECS["zstd"], _zeros_compressed("zstd")),
        "zstd-not-stating-it": (CODECS["zstd"], _zeros_compressed("zstd", sized=False)),
    }


def peak_memory(action: Callable[[], object]) -> int:
    """Bytes allocated at the peak while ``action`` ran (tracemalloc: Python's
    allocators, which hold zlib's and zstandard's output)."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("bomb", ["zlib", "zstd-stating-its-size", "zstd-not-stating-it"])
def test_a_decompression_bomb_is_refused_within_bounded_memory(
    bombs: dict[str, tuple[int, bytes]], bomb: str
) -> None:
    codec, packed = bombs[bomb]
    assert len(packed) < 1_050_000  # what fits in one memcached item
    record = decode_record(
        encode_record(NOW_US, DATA, MSGPACK.id, packed, ttl=60, codec=codec), FLAGS, now_us=NOW_US
    )
    limit = 4 << 20

    def expand() -> None:
        with pytest.raises(ValueError, match=r"max_session_size|past 4194304 bytes"):
            plain_payload(record, max_size=limit)

    peak = peak_memory(expand)
    assert peak < limit + (1 << 20)  # the limit and change; the bomb is 256 times that


def test_without_zstandard_zstd_is_refused_to_write_and_read_as_corrupt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payload = MSGPACK.dumps(LEGIT) * 10
    record = Record(NOW_US, DATA, MSGPACK.id, compress(payload, CODECS["zstd"]), 60, 2)
    monkeypatch.setattr(records_module, "_zstandard", lambda: None)
    with pytest.raises(ImportError, match=r"pip install memsess\[zstd\]"):
        codec_id("zstd")
    with pytest.raises(ImportError, match=r"pip install memsess\[zstd\]"):
        SessionStore.from_dsn("127.0.0.1:1", compress_threshold=100, compression="zstd")
    records_module._zstd_contexts.cache_clear()  # as in a process that never compressed yet
    with pytest.raises(ImportError, match=r"pip install memsess\[zstd\]"):
        compress(payload, CODECS["zstd"])
    with pytest.raises(ValueError, match=r"zstandard is not installed here.*memsess\[zstd\]"):
        plain_payload(record)
    assert codec_id("zlib") == CODECS["zlib"]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"compression": "lz4"}, ValueError, "compression must be one of zlib, zstd"),
        ({"compress_threshold": -1}, ValueError, "compress_threshold must be at least 0"),
        ({"compress_threshold": 1.5}, TypeError, "compress_threshold must be a whole number"),
        ({"compress_threshold": True}, TypeError, "compress_threshold"),
        ({"max_session_size": 0}, ValueError, "max_session_size must be at least 1"),
    ],
)
def test_bad_compression_options_are_refused(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SessionStore.from_dsn("127.0.0.1:1", **options)


# -- sealed stores against memcached -------------------------------------------------------


def test_a_sealed_store_stores_no_plaintext_anywhere(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    store = make_store(secret_keys=[NEW_KEY])
    sid, logged_out = store.new_id(), store.new_id()
    store.save(sid, LEGIT)
    store.save(logged_out, LEGIT)
    store.delete(logged_out)
    moved = store.regenerate(sid)
    store.touch(moved)
    assert store.load(moved) == LEGIT
    assert store.load(sid) is None
    assert store.load(logged_out) is None
    # Every item the servers list, and the copies of the three sessions by their keys
    # (the crawler that lists items may not have seen the newest yet).
    known = [raw_copies(cluster, store, each) for each in (moved, sid, logged_out)]
    assert all(known)  # the moved session and two tombstones
    values = every_stored_value(cluster) + [raw for copies in known for raw in copies.values()]
    sealer = Sealer([NEW_KEY])
    for raw in values:
        if raw.isdigit():
            continue  # a server's missed-writes marker: a version, no session
        assert raw.startswith(SEALED_PREFIX)
        assert MARKER.encode() not in raw
        assert msgpack.packb(MARKER) not in raw
        assert MSGPACK.dumps(LEGIT) not in raw
    # The tombstones are sealed too: a logout's version cannot be forged either.
    tombstones = raw_copies(cluster, store, logged_out).items()
    key = key_of(store, logged_out)
    assert all(sealer.open_record(raw, FLAGS, key).is_tombstone for _, raw in tombstones)


def test_stores_rotate_keys_without_losing_sessions(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    before = make_store(secret_keys=[OLD_KEY])
    sid = before.new_id()
    before.save(sid, LEGIT)
    during = make_store(secret_keys=[NEW_KEY, OLD_KEY])
    assert during.load(sid) == LEGIT  # sealed with the old key, opened
    resaved = during.new_id()
    during.save(resaved, LEGIT)
    for raw in raw_copies(cluster, during, resaved).values():
        Sealer([NEW_KEY]).open(key_of(during, resaved), raw)  # sealed with the new key
    after = make_store(secret_keys=[NEW_KEY])
    assert after.load(resaved) == LEGIT
    assert after.load(sid) is None  # sealed only with the key since removed
    assert make_store().load(resaved) is None  # a store without keys opens nothing


def _ahead() -> int:
    """A version newer than any copy, and within the clock skew decode_record allows."""
    return time.time_ns() // 1000 + HOUR_US


def _legitimate(cluster: LocalCluster, store: SessionStore, victim: str) -> bytes:
    return next(iter(raw_copies(cluster, store, victim).values()))


def _attackers_own_session(cluster: LocalCluster, store: SessionStore, victim: str) -> bytes:
    attacker = store.new_id()  # a session of the attacker's, sealed by the app itself
    store.save(attacker, FORGED)
    return _legitimate(cluster, store, attacker)


def _bit_flipped(cluster: LocalCluster, store: SessionStore, victim: str) -> bytes:
    legit = _legitimate(cluster, store, victim)
    return legit[:30] + bytes([legit[30] ^ 0x04]) + legit[31:]  # in the ciphertext


Forgery = Callable[[LocalCluster, SessionStore, str], bytes]
#: What an attacker with raw access to memcached writes under the victim's key.
FORGERIES: dict[str, Forgery] = {
    "plain-record-with-a-high-version": lambda c, s, v: plain_record(FORGED, version=_ahead()),
    "plain-tombstone-with-a-high-version": (
        lambda c, s, v: encode_record(_ahead(), TOMBSTONE, MSGPACK.id, ttl=60)
    ),
    "random-bytes": lambda c, s, v: os.urandom(120),
    "random-bytes-after-the-sealed-prefix": lambda c, s, v: SEALED_PREFIX + os.urandom(120),
    "another-sessions-sealed-record": _attackers_own_session,
    "record-sealed-with-another-key": (
        lambda c, s, v: Sealer([ATTACKER_KEY]).seal(key_of(s, v), plain_record(FORGED))
    ),
    "truncated-sealed-record": lambda c, s, v: _legitimate(c, s, v)[:-1],
    "bit-flipped-sealed-record": _bit_flipped,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_copy_on_every_server_never_yields_a_session(
    cluster: LocalCluster, make_store: StoreFactory, forgery: str
) -> None:
    store = make_store(secret_keys=[NEW_KEY])
    victim = store.new_id()
    store.save(victim, LEGIT)
    raw = FORGERIES[forgery](cluster, store, victim)
    for server in cluster.servers:  # every server, in case a copy fails over to it
        cluster.set_raw(server.index, key_of(store, victim), raw, flags=FLAGS, exptime=60)
    assert store.load(victim) is None
    assert store.fetch(victim) is None


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_copy_beside_a_legitimate_one_loses_and_is_repaired(
    cluster: LocalCluster, make_store: StoreFactory, forgery: str
) -> None:
    store = make_store(secret_keys=[NEW_KEY])
    victim = store.new_id()
    store.save(victim, LEGIT)
    forged_on, kept_on = server_indexes(cluster, store, victim)
    key = key_of(store, victim)
    cluster.set_raw(forged_on, key, FORGERIES[forgery](cluster, store, victim), flags=FLAGS)
    assert store.load(victim) == LEGIT
    repaired = cluster.get_raw(forged_on, key)
    assert repaired == cluster.get_raw(kept_on, key)  # the legitimate copy, copied back
    assert repaired is not None
    assert store.serializer.loads(Sealer([NEW_KEY]).open_record(repaired, FLAGS, key).payload) == (
        LEGIT
    )


def test_a_plain_store_reads_sealed_records_as_no_session_and_says_why(
    cluster: LocalCluster, make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="memsess")
    sealed = make_store(secret_keys=[NEW_KEY])
    sid = sealed.new_id()
    sealed.save(sid, LEGIT)
    assert make_store().load(sid) is None
    assert any("no secret_keys are configured" in r.getMessage() for r in caplog.records)
    assert sealed.load(sid) == LEGIT  # the plain store's read repaired nothing away


def test_a_log_line_about_an_unopenable_copy_holds_neither_data_nor_key(
    cluster: LocalCluster, make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="memsess")
    store = make_store(secret_keys=[NEW_KEY])
    victim, other = store.new_id(), store.new_id()
    store.save(victim, LEGIT)
    store.save(other, {"note": MARKER, "other": True})
    first, second = server_indexes(cluster, store, victim)
    key = key_of(store, victim)
    elsewhere = next(iter(raw_copies(cluster, store, other).values()))
    cluster.set_raw(first, key, elsewhere, flags=FLAGS)  # another session's sealed record
    cluster.set_raw(second, key, plain_record(LEGIT), flags=FLAGS)  # plain, with the data
    assert store.load(victim) is None
    warnings = [r for r in caplog.records if "corrupt record" in r.getMessage()]
    addresses = {cluster.servers[first].address, cluster.servers[second].address}
    assert {a for a in addresses for r in warnings if a in r.getMessage()} == addresses
    reasons = " ".join(r.getMessage() for r in warnings)
    assert "fails authentication" in reasons
    assert "unsealed record" in reasons
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.exc_info)
        for secret in (MARKER, NEW_KEY, victim[:12], other[:12], repr(NEW_KEY.encode())):
            assert secret not in text


# -- compression against memcached ---------------------------------------------------------


def payload_of_size(size: int) -> dict[str, str]:
    """Session data that msgpack serializes to exactly ``size`` bytes."""
    for length in range(size):
        data = {"p": "a" * length}
        if len(MSGPACK.dumps(data)) == size:
            return data
    raise AssertionError(f"no payload of {size} bytes")


@pytest.mark.parametrize("compression", sorted(CODECS))
def test_only_sessions_above_the_threshold_are_compressed(
    cluster: LocalCluster, make_store: StoreFactory, compression: str
) -> None:
    store = make_store(compress_threshold=1000, compression=compression)
    stored_as = {}
    for size in (100, 1000, 1001, 50_000):
        sid = store.new_id()
        data = payload_of_size(size)
        store.save(sid, data)
        assert store.load(sid) == data
        raws = list(raw_copies(cluster, store, sid).values())
        assert len(raws) == 2
        record = decode_record(raws[0], FLAGS)
        stored_as[size] = record.codec
        if record.codec:
            assert len(raws[0]) < size / 5
    assert stored_as == {100: 0, 1000: 0, 1001: CODECS[compression], 50_000: CODECS[compression]}


def test_incompressible_sessions_are_stored_as_they_are(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    store = make_store(compress_threshold=0)
    sid = store.new_id()
    data = {"noise": os.urandom(4000)}
    store.save(sid, data)
    assert store.load(sid) == data
    assert all(
        decode_record(raw, FLAGS).codec == 0 for raw in raw_copies(cluster, store, sid).values()
    )


def test_every_store_reads_both_codecs_whatever_it_writes(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    data = {"text": MARKER * 100}
    sids = {}
    for compression in CODECS:
        writer = make_store(compress_threshold=10, compression=compression)
        sids[compression] = writer.new_id()
        writer.save(sids[compression], data)
    for reader in (make_store(), make_store(compress_threshold=10, compression="zlib")):
        assert {codec: reader.load(sid) for codec, sid in sids.items()} == {
            "zlib": data,
            "zstd": data,
        }


def test_a_zstd_session_read_without_zstandard_is_no_session_and_logged(
    cluster: LocalCluster,
    make_store: StoreFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="memsess")
    writer = make_store(compress_threshold=10, compression="zstd")
    sid = writer.new_id()
    writer.save(sid, {"text": MARKER * 100})
    before = list(raw_copies(cluster, writer, sid).values())
    monkeypatch.setattr(records_module, "_zstandard", lambda: None)
    assert make_store().load(sid) is None
    (warning,) = [r for r in caplog.records if "zstandard is not installed" in r.getMessage()]
    assert "pip install memsess[zstd]" in warning.getMessage()
    assert MARKER not in warning.getMessage()
    # Newer than any other copy, it was not "repaired" away: a reader with zstd reads it.
    assert list(raw_copies(cluster, writer, sid).values()) == before


@pytest.mark.parametrize("bomb", ["zlib", "zstd-stating-its-size", "zstd-not-stating-it"])
def test_a_bomb_planted_in_memcached_reads_as_no_session_in_bounded_memory(
    cluster: LocalCluster,
    make_store: StoreFactory,
    bombs: dict[str, tuple[int, bytes]],
    bomb: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="memsess")
    limit = 4 << 20
    store = make_store(max_session_size=limit)
    sid = store.new_id()
    codec, packed = bombs[bomb]
    raw = encode_record(time.time_ns() // 1000, DATA, MSGPACK.id, packed, ttl=60, codec=codec)
    for server in cluster.servers:
        cluster.set_raw(server.index, key_of(store, sid), raw, flags=FLAGS, exptime=60)
    loaded: list[object] = []
    peak = peak_memory(lambda: loaded.append(store.load(sid)))
    assert loaded == [None]
    # The limit, the record as read from two servers (a reply buffer, the value and its
    # payload each) and change: nothing near the 1 GiB.
    assert peak < limit + 6 * len(raw) + (1 << 20)
    assert any("undecodable session data" in r.getMessage() for r in caplog.records)


def test_a_session_over_max_session_size_is_refused_before_anything_is_sent(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    store = make_store(compress_threshold=100, max_session_size=10_000)
    sid = store.new_id()
    store.save(sid, payload_of_size(10_000))
    with pytest.raises(SessionTooLargeError, match="max_session_size"):
        store.save(sid, payload_of_size(10_001))
    assert store.load(sid) == payload_of_size(10_000)


def test_compressed_and_sealed_together(cluster: LocalCluster, make_store: StoreFactory) -> None:
    store = make_store(secret_keys=[NEW_KEY], compress_threshold=100, compression="zstd")
    sid = store.new_id()
    data = {"text": MARKER * 500}
    store.save(sid, data)
    assert store.load(sid) == data
    key = key_of(store, sid)
    for raw in raw_copies(cluster, store, sid).values():
        assert raw.startswith(SEALED_PREFIX)
        assert len(raw) < 500  # compressed before it was sealed: 17 kB became this
        record = Sealer([NEW_KEY]).open_record(raw, FLAGS, key)
        assert record.codec == CODECS["zstd"]
        assert MSGPACK.loads(plain_payload(record)) == data


# -- the options through each adapter ---------------------------------------------------------

ADAPTER_OPTIONS: dict[str, Any] = {
    "secret_keys": [NEW_KEY],
    "compress_threshold": 64,
    "compression": "zstd",
}


def assert_sealed_and_compressed(cluster: LocalCluster, prefix: str | bytes, sid: str) -> None:
    """Both copies of ``sid`` hold a record sealed with NEW_KEY, compressed with zstd."""
    key = storage_key(prefix.encode() if isinstance(prefix, str) else prefix, sid)
    raws = [raw for i in range(3) if (raw := cluster.get_raw(i, key)) is not None]
    assert len(raws) == 2
    for raw in raws:
        assert Sealer([NEW_KEY]).open_record(raw, FLAGS, key).codec == CODECS["zstd"]


@pytest.fixture
def dsn(cluster: LocalCluster) -> str:
    return cluster.dsn(timeout=0.5, retry_interval=0.3)


def test_flask_config_keys_reach_the_store(cluster: LocalCluster, dsn: str) -> None:
    from flask import Flask, session

    from memsess.adapters.flask import init_app

    app = Flask(__name__)
    app.config.update(
        MEMSESS_SAVE_PATH=dsn,
        MEMSESS_SECRET_KEYS=[NEW_KEY],
        MEMSESS_COMPRESS_THRESHOLD=64,
        MEMSESS_COMPRESSION="zstd",
        MEMSESS_MAX_SESSION_SIZE=1 << 20,
    )
    init_app(app)

    @app.get("/")
    def view() -> str:
        session["note"] = MARKER * 10
        return "ok"

    store = app.extensions["memsess"]
    try:
        client = app.test_client()
        client.get("/")
        cookie = client.get_cookie("session")
        assert cookie is not None
        assert_sealed_and_compressed(cluster, store.key_prefix, cookie.value)
        assert store.max_session_size == 1 << 20
    finally:
        store.close()


def test_quart_config_keys_reach_the_store(cluster: LocalCluster, dsn: str) -> None:
    from quart import Quart

    from memsess.adapters.quart import init_app

    app = Quart(__name__)
    app.config.update(
        MEMSESS_SAVE_PATH=dsn,
        MEMSESS_SECRET_KEYS=[NEW_KEY],
        MEMSESS_COMPRESS_THRESHOLD=64,
        MEMSESS_COMPRESSION="zstd",
    )
    init_app(app)
    store = app.extensions["memsess"]

    async def save() -> str:
        sid = store.new_id()
        await store.save(sid, {"note": MARKER * 10})
        await store.aclose()
        return str(sid)

    assert_sealed_and_compressed(cluster, store.key_prefix, asyncio.run(save()))


def test_django_settings_reach_the_store(cluster: LocalCluster, dsn: str) -> None:
    import django_settings

    django_settings.setup()
    from django.test import override_settings

    from memsess.adapters.django import SessionStore as DjangoSession
    from memsess.adapters.django import get_store

    setting = {"SAVE_PATH": dsn, "SECRET_KEYS": [NEW_KEY], "COMPRESS_THRESHOLD": 64}
    with override_settings(SESSION_MEMSESS={**setting, "COMPRESSION": "zstd"}):
        session = DjangoSession()
        session["note"] = MARKER * 10
        session.save()
        store = get_store()
        assert get_store() is store  # a list in the settings still makes one cached store
        assert session.session_key is not None
        assert_sealed_and_compressed(cluster, store.key_prefix, session.session_key)
        store.close()


def test_asgi_store_options_reach_the_store(cluster: LocalCluster, dsn: str) -> None:
    from memsess.adapters.asgi import SessionMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    middleware = SessionMiddleware(app, dsn=dsn, store_options=ADAPTER_OPTIONS)

    async def save() -> str:
        sid = middleware.store.new_id()
        await middleware.store.save(sid, {"note": MARKER * 10})
        await middleware.store.aclose()
        return str(sid)

    assert_sealed_and_compressed(cluster, middleware.store.key_prefix, asyncio.run(save()))
    with pytest.raises(TypeError, match="store_options go with dsn"):
        SessionMiddleware(app, middleware.store, store_options=ADAPTER_OPTIONS)


def test_litestar_store_options_reach_the_store(cluster: LocalCluster, dsn: str) -> None:
    from memsess.adapters.litestar import MemsessStore

    litestar_store = MemsessStore.from_dsn(dsn, **ADAPTER_OPTIONS)

    async def save() -> None:
        await litestar_store.set("k", MARKER.encode() * 10)
        assert await litestar_store.get("k") == MARKER.encode() * 10
        await litestar_store.store.aclose()

    asyncio.run(save())
    prefix = litestar_store.store.key_prefix
    assert_sealed_and_compressed(cluster, prefix, litestar_store.memsess_id("k"))
