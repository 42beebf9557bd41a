"""SessionStore against real memcached: the public API, records, hostile input."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import uuid
from decimal import Decimal

import pytest
from blocking_async import DRIVERS, store_for
from conftest import StoreFactory, all_keys, cpu_burners, server_indexes
from markupsafe import Markup

from memsess import (
    SessionConflictError,
    SessionGoneError,
    SessionIdError,
    SessionStore,
    SessionTooLargeError,
    Snapshot,
)
from memsess.records import FLAGS, decode_record, storage_key
from memsess.testing import LocalCluster


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """The API on both stores: the blocking one and the asyncio one (awaited for it)."""
    return str(request.param)


def key_of(store: SessionStore, sid: str) -> bytes:
    """The memcached key of ``sid``'s copies (``key_prefix`` is kept as given)."""
    prefix = store.key_prefix  # the option as given: a str, or bytes
    return storage_key(prefix.encode("ascii") if isinstance(prefix, str) else prefix, sid)


HOSTILE_IDS = [
    "",
    "x",
    "a" * 10_000,
    "abc\r\nset injected 0 60 3\r\nbad",
    "a" * 40 + "\r\n",
    "a" * 42 + " ",
    "a" * 42 + "\x00",
    "é" * 43,
    "../../etc/passwd" + "a" * 27,
]


def test_save_then_load_round_trips_what_frameworks_store(store: SessionStore) -> None:
    sid = store.new_id()
    data = {
        "user_id": 42,
        "name": "Zoë",
        "cart": [("sku-1", 2), ("sku-2", 1)],
        "token": b"\x00\xffbytes",
        "seen": dt.datetime(2026, 11, 26, 12, 30, tzinfo=dt.timezone.utc),
        "id": uuid.UUID(int=7),
        "price": Decimal("9.99"),
        "flash": Markup("<b>saved</b>"),
        "nested": {"a": {"b": [1, 2.5, None, True]}},
    }
    store.save(sid, data)
    loaded = store.load(sid)
    assert loaded == data
    assert loaded is not None
    assert isinstance(loaded["cart"][0], tuple)
    assert isinstance(loaded["flash"], Markup)


def test_each_session_has_exactly_redundancy_copies(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sids = [store.new_id() for _ in range(30)]
    for sid in sids:
        store.save(sid, {"n": 1})
    for sid in sids:
        holders = {i for i in range(3) if cluster.get_raw(i, key_of(store, sid)) is not None}
        assert holders == set(server_indexes(cluster, store, sid))
        assert len(holders) == 2


def test_a_weighted_server_holds_more_sessions(cluster: LocalCluster) -> None:
    ports = [server.port for server in cluster.servers]
    dsn = f"127.0.0.1:{ports[0]}?weight=4, 127.0.0.1:{ports[1]}, 127.0.0.1:{ports[2]}"
    with SessionStore.from_dsn(dsn, redundancy=1) as store:
        owners = [store.locate(store.new_id())[0] for _ in range(600)]
    heavy = owners.count(f"127.0.0.1:{ports[0]}")
    assert heavy > owners.count(f"127.0.0.1:{ports[1]}") * 2


def test_load_of_an_unknown_id_returns_none_and_stores_nothing(
    cluster: LocalCluster, store: SessionStore
) -> None:
    assert store.load(store.new_id()) is None
    assert all_keys(cluster) == set()


def test_touch_extends_the_lifetime_of_every_copy(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    store = make_store(ttl=1)
    kept, dropped = store.new_id(), store.new_id()
    store.save(kept, {"n": 1})
    store.save(dropped, {"n": 2})
    assert store.touch(kept, ttl=60)
    time.sleep(2.1)  # memcached expires at whole-second ticks
    assert store.load(kept) == {"n": 1}
    assert store.load(dropped) is None
    assert not store.touch(store.new_id())


def test_delete_writes_a_tombstone_to_every_copy(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sid = store.new_id()
    store.save(sid, {"user_id": 1})
    store.delete(sid)
    assert store.load(sid) is None
    for index in server_indexes(cluster, store, sid):
        raw = cluster.get_raw(index, key_of(store, sid))
        assert raw is not None
        assert decode_record(raw, FLAGS).is_tombstone


def test_regenerate_moves_the_data_and_kills_the_old_id(store: SessionStore) -> None:
    old = store.new_id()
    store.save(old, {"cart": [1, 2]})
    new = store.regenerate(old)
    assert new != old
    assert store.load(new) == {"cart": [1, 2]}
    assert store.load(old) is None
    with pytest.raises(SessionGoneError):
        store.regenerate(old)
    assert store.load(store.regenerate(old, {"fresh": True})) == {"fresh": True}


@pytest.mark.parametrize("sid", HOSTILE_IDS)
def test_hostile_ids_never_reach_memcached(
    cluster: LocalCluster, store: SessionStore, sid: str
) -> None:
    before = all_keys(cluster)
    assert store.load(sid) is None
    assert not store.touch(sid)
    store.delete(sid)
    with pytest.raises(SessionIdError):
        store.save(sid, {"x": 1})
    # metadump may skip an item now and then, never invent one: compare one way.
    assert all_keys(cluster) - before == set()
    assert not any(b"injected" in key for _, key in all_keys(cluster))


def test_corrupt_bytes_read_as_no_session_and_are_logged(
    cluster: LocalCluster, store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    sid = store.new_id()
    key = key_of(store, sid)
    for index in server_indexes(cluster, store, sid):
        cluster.set_raw(index, key, b"\x80garbage\xff not a record", flags=FLAGS)
    with caplog.at_level(logging.WARNING, logger="memsess"):
        assert store.load(sid) is None
    assert "corrupt record" in caplog.text
    assert sid not in caplog.text


def test_one_corrupt_copy_is_ignored_and_repaired(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sid = store.new_id()
    store.save(sid, {"user_id": 7})
    first, second = server_indexes(cluster, store, sid)
    good = cluster.get_raw(second, key_of(store, sid))
    cluster.set_raw(first, key_of(store, sid), b"truncated", flags=FLAGS)
    assert store.load(sid) == {"user_id": 7}
    assert cluster.get_raw(first, key_of(store, sid)) == good


def test_a_stale_copy_loses_to_the_newest_and_is_repaired(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sid = store.new_id()
    store.save(sid, {"version": 1})
    first, second = server_indexes(cluster, store, sid)
    old = cluster.get_raw(first, key_of(store, sid))
    store.save(sid, {"version": 2})
    assert old is not None
    cluster.set_raw(second, key_of(store, sid), old, flags=FLAGS)  # put the old copy back
    assert store.load(sid) == {"version": 2}
    assert cluster.get_raw(second, key_of(store, sid)) == cluster.get_raw(first, key_of(store, sid))


def test_a_tombstone_beats_an_older_copy_that_missed_the_logout(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sid = store.new_id()
    store.save(sid, {"user_id": 1})
    _, second = server_indexes(cluster, store, sid)
    before_logout = cluster.get_raw(second, key_of(store, sid))
    store.delete(sid)
    assert before_logout is not None
    cluster.set_raw(second, key_of(store, sid), before_logout, flags=FLAGS)
    assert store.load(sid) is None
    raw = cluster.get_raw(second, key_of(store, sid))
    assert raw is not None
    assert decode_record(raw, FLAGS).is_tombstone


def test_too_large_session_is_refused_before_sending_and_the_stored_copy_stays(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sid = store.new_id()
    store.save(sid, {"small": True})
    stored = {i: cluster.get_raw(i, key_of(store, sid)) for i in range(3)}
    with pytest.raises(SessionTooLargeError, match="item size"):
        store.save(sid, {"blob": os.urandom(2 * 1024 * 1024)})
    assert {i: cluster.get_raw(i, key_of(store, sid)) for i in range(3)} == stored
    assert store.load(sid) == {"small": True}


def test_the_largest_session_that_passes_the_check_is_stored(store: SessionStore) -> None:
    sid = store.new_id()
    blob = os.urandom(store.max_value_size - 200)
    store.save(sid, {"blob": blob})
    assert store.load(sid) == {"blob": blob}


def test_json_serializer_stores_plain_json(cluster: LocalCluster, make_store: StoreFactory) -> None:
    store = make_store(serializer="json")
    sid = store.new_id()
    store.save(sid, {"user_id": 5, "roles": ["a", "b"]})
    assert store.load(sid) == {"user_id": 5, "roles": ["a", "b"]}
    raw = cluster.get_raw(server_indexes(cluster, store, sid)[0], key_of(store, sid))
    assert raw is not None
    assert decode_record(raw, FLAGS).payload == b'{"user_id":5,"roles":["a","b"]}'


def test_a_conditional_save_after_a_logout_elsewhere_is_refused(store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"user_id": 1})
    snapshot = store.fetch(sid)  # a long request loads the session...
    assert snapshot is not None
    store.delete(sid)  # ...another request logs out...
    with pytest.raises(SessionGoneError):
        store.save(sid, {"user_id": 1, "cart": [1]}, snapshot=snapshot)  # ...then it saves
    assert store.load(sid) is None


def loaded(store: SessionStore, sid: str) -> Snapshot:
    snapshot = store.fetch(sid)
    assert snapshot is not None
    return snapshot


def test_a_conditional_save_after_a_save_elsewhere_is_a_conflict_by_default(
    store: SessionStore,
) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 1})
    slow = loaded(store, sid)  # a slow request loads...
    store.save(sid, {"n": 2}, snapshot=loaded(store, sid))  # ...a fast one saves...
    with pytest.raises(SessionConflictError) as raised:
        store.save(sid, {"n": 3}, snapshot=slow)  # ...and the slow one's save is refused
    current = raised.value.current
    assert isinstance(current, Snapshot)
    assert current.data == {"n": 2}
    assert store.load(sid) == {"n": 2}  # nothing was overwritten
    assert store.stats()["conflicts"] == 1
    store.save(sid, {"n": 3}, snapshot=current)  # saved again on what is there now
    assert store.load(sid) == {"n": 3}


def test_overwrite_is_last_writer_wins(store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 1})
    slow = loaded(store, sid)
    store.save(sid, {"n": 2, "other": True}, snapshot=loaded(store, sid))
    store.save(sid, {"n": 3}, snapshot=slow, on_conflict="overwrite")
    assert store.load(sid) == {"n": 3}


def test_merge_keeps_both_requests_changes_to_different_keys(store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"user": "ann", "cart": [1], "flash": "hi"})
    first, second = loaded(store, sid), loaded(store, sid)
    first.data["cart"].append(2)  # a nested change in place counts as setting "cart"
    del first.data["flash"]
    store.save(sid, first.data, snapshot=first, on_conflict="merge")
    second.data["theme"] = "dark"
    store.save(sid, second.data, snapshot=second, on_conflict="merge")
    assert store.load(sid) == {"user": "ann", "cart": [1, 2], "theme": "dark"}
    stats = store.stats()
    assert (stats["conflicts"], stats["merge_overwrites"]) == (1, 0)


def test_merge_of_the_same_key_keeps_the_later_save_and_counts_it(store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"step": 1, "a": 0})
    first, second = loaded(store, sid), loaded(store, sid)
    store.save(sid, {"step": 2, "a": 1}, snapshot=first, on_conflict="merge")
    store.save(sid, {"step": 3, "a": 0}, snapshot=second, on_conflict="merge")
    assert store.load(sid) == {"step": 3, "a": 1}  # "a" was only the first one's change
    assert store.stats()["merge_overwrites"] == 1


def test_a_logout_wins_over_a_merge(store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"user": "ann"})
    slow = loaded(store, sid)
    store.delete(sid)
    with pytest.raises(SessionGoneError):
        store.save(sid, {"user": "ann", "x": 1}, snapshot=slow, on_conflict="merge")
    assert store.load(sid) is None


def test_an_unknown_conflict_policy_is_refused_before_anything_is_sent(
    store: SessionStore,
) -> None:
    with pytest.raises(ValueError, match="on_conflict"):
        store.save(store.new_id(), {"a": 1}, on_conflict="lock")


@pytest.mark.parametrize("burners", [0, 3], ids=["quiet", "three-cpu-burners"])
@pytest.mark.parametrize("fault", [None, "kill"])
def test_eight_concurrent_merges_on_one_session_keep_every_change(
    cluster: LocalCluster, store: SessionStore, fault: str | None, burners: int
) -> None:
    with cpu_burners(burners):
        _eight_concurrent_merges(cluster, store, fault)


def _eight_concurrent_merges(cluster: LocalCluster, store: SessionStore, fault: str | None) -> None:
    sid = store.new_id()
    store.save(sid, {"base": 0})
    if fault:
        cluster.kill(server_indexes(cluster, store, sid)[0])
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def request(n: int) -> None:
        # Five bursts of eight requests at once (a page firing eight AJAX calls), each
        # request loading the session, changing its own key and saving.
        try:
            for round_ in range(5):
                start.wait()
                snapshot = loaded(store, sid)
                snapshot.data[f"key{n}"] = round_
                store.save(sid, snapshot.data, snapshot=snapshot, on_conflict="merge")
        except BaseException as exc:
            start.abort()
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.load(sid) == {"base": 0, **{f"key{n}": 4 for n in range(8)}}
    assert store.stats()["conflicts"] > 0  # they did meet


def test_conditional_save_of_an_unchanged_session_uses_its_cas_tokens(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 1})
    snapshot = store.fetch(sid)
    assert snapshot is not None
    assert sorted(snapshot.tokens) == sorted(server_indexes(cluster, store, sid))
    store.save(sid, {"n": 2}, snapshot=snapshot)
    again = store.fetch(sid)
    assert again is not None
    assert again.data == {"n": 2}
    assert again.version > snapshot.version


def test_health_lists_every_server(cluster: LocalCluster, store: SessionStore) -> None:
    statuses = store.health()
    assert [s.address for s in statuses] == [server.address for server in cluster.servers]
    assert {s.state for s in statuses} == {"up"}


def test_redundancy_above_the_server_count_is_refused(cluster: LocalCluster) -> None:
    with pytest.raises(ValueError, match="redundancy=4"):
        SessionStore.from_dsn(cluster.dsn(), redundancy=4)


def test_default_redundancy_is_two_or_the_server_count(cluster: LocalCluster) -> None:
    assert SessionStore.from_dsn(cluster.dsn()).redundancy == 2
    only = f"127.0.0.1:{cluster.servers[0].port}"
    assert SessionStore.from_dsn(only).redundancy == 1


def test_unix_socket_servers(driver: str) -> None:
    with LocalCluster(2, unix=True) as cluster:
        store = store_for(driver, cluster.dsn(), redundancy=2)
        try:
            sid = store.new_id()
            store.save(sid, {"via": "unix"})
            assert store.load(sid) == {"via": "unix"}
            assert all(cluster.get_raw(i, key_of(store, sid)) is not None for i in range(2))
        finally:
            store.close()


def test_a_forked_child_opens_its_own_connections(cluster: LocalCluster) -> None:
    with SessionStore.from_dsn(cluster.dsn(), redundancy=2) as store:
        _fork_and_use(store)


def _fork_and_use(store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"from": "parent"})
    assert store.load(sid) == {"from": "parent"}  # leaves pooled connections behind
    pid = os.fork()
    if pid == 0:  # the child: must not reuse the parent's sockets
        code = 1
        try:
            child_sid = store.new_id()
            store.save(child_sid, {"from": "child"})
            ok = store.load(child_sid) == {"from": "child"} and store.load(sid) is not None
            code = 0 if ok else 1
        finally:
            os._exit(code)
    for _ in range(200):  # the parent keeps using its own, interleaved with the child
        assert store.load(sid) == {"from": "parent"}
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
