"""store.stats() counters against real memcached, and their Prometheus export."""

from __future__ import annotations

import threading
import time

from conftest import TEST_RETRY_INTERVAL, StoreFactory, key_of, server_indexes
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from memsess import SessionStore
from memsess.metrics import COUNTERS, Metrics, register_prometheus
from memsess.records import DATA, FLAGS, encode_record
from memsess.serializers import MSGPACK
from memsess.testing import LocalCluster


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that changed, by how much."""
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


def test_every_counter_starts_at_zero(store: SessionStore) -> None:
    assert store.stats() == dict.fromkeys(COUNTERS, 0)


def test_loads_count_hits_and_misses(store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 1})
    before = store.stats()
    store.load(sid)
    store.load(sid)
    store.load(store.new_id())
    assert moved(before, store.stats()) == {"loads": 3, "hits": 2, "misses": 1}


def test_a_malformed_id_is_not_counted_as_a_load(store: SessionStore) -> None:
    store.load("not an id")
    assert store.stats()["loads"] == 0  # nothing reached the servers


def test_saves_touches_and_deletes_count_one_each(store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 1})
    store.save(sid, {"n": 2})
    assert store.touch(sid)
    store.delete(sid)
    assert not store.touch(sid + "!")  # malformed: nothing sent, not counted
    assert moved(dict.fromkeys(COUNTERS, 0), store.stats()) == {
        "saves": 2,
        "touches": 1,
        "deletes": 1,
    }


def test_stats_is_a_copy(store: SessionStore) -> None:
    store.stats()["loads"] = 99
    assert store.stats()["loads"] == 0


def test_a_stale_copy_is_repaired_once(cluster: LocalCluster, store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 2})
    first, _ = server_indexes(cluster, store, sid)
    old = encode_record(1_000_000, DATA, MSGPACK.id, MSGPACK.dumps({"n": 1}))
    cluster.set_raw(first, key_of(store, sid), old, flags=FLAGS)
    before = store.stats()
    assert store.load(sid) == {"n": 2}
    assert store.load(sid) == {"n": 2}  # already repaired: nothing more to rewrite
    assert moved(before, store.stats()) == {"loads": 2, "hits": 2, "repairs": 1}
    assert cluster.get_raw(first, key_of(store, sid)) != old


def test_a_corrupt_copy_is_counted_and_repaired(cluster: LocalCluster, store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 1})
    first, _ = server_indexes(cluster, store, sid)
    cluster.set_raw(first, key_of(store, sid), b"\xd5garbage", flags=FLAGS)
    before = store.stats()
    assert store.load(sid) == {"n": 1}
    assert moved(before, store.stats()) == {
        "loads": 1,
        "hits": 1,
        "corrupt_records": 1,
        "repairs": 1,
    }


def test_a_killed_server_counts_failovers_partial_writes_and_state_changes(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 1})
    first, _ = server_indexes(cluster, store, sid)
    cluster.kill(first)
    before = store.stats()
    store.save(sid, {"n": 2})  # asks both copies: one refused, so marked down at once
    assert moved(before, store.stats()) == {
        "saves": 1,
        "partial_writes": 1,
        "failovers": 1,
        "server_state_changes": 1,
    }
    before = store.stats()
    assert store.load(sid) == {"n": 2}  # the down server is skipped, not asked
    store.save(sid, {"n": 3})
    assert moved(before, store.stats()) == {
        "loads": 1,
        "hits": 1,
        "saves": 1,
        "failovers": 2,
        "partial_writes": 1,
    }


def test_a_server_coming_back_is_one_more_state_change(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 1})
    first, _ = server_indexes(cluster, store, sid)
    cluster.kill(first)
    store.load(sid)
    assert store.stats()["server_state_changes"] == 1  # up -> down
    cluster.start_server(first)
    time.sleep(TEST_RETRY_INTERVAL * 1.5)
    store.load(sid)  # the probe: refills the empty copy and brings the server back
    store.load(sid)
    stats = store.stats()
    assert stats["server_state_changes"] == 2  # probing -> up; the claim is not counted
    assert stats["repairs"] == 1
    assert [status.state for status in store.health()] == ["up", "up", "up"]


def test_a_hung_server_is_a_straggler_drop(cluster: LocalCluster, store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 1})
    _, second = server_indexes(cluster, store, sid)
    cluster.hang(second)
    try:
        before = store.stats()
        started = time.perf_counter()
        assert store.load(sid) == {"n": 1}
        elapsed = time.perf_counter() - started
    finally:
        cluster.resume(second)
    assert elapsed < 0.25  # the healthy copy answered; the hung one was not waited for
    assert moved(before, store.stats()) == {
        "loads": 1,
        "hits": 1,
        "straggler_drops": 1,
        "failovers": 1,
        "server_state_changes": 1,  # up -> suspect
    }


def test_counters_do_not_lose_increments_across_threads() -> None:
    metrics = Metrics()

    def work() -> None:
        for _ in range(2000):
            metrics.add("saves")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert metrics.snapshot()["saves"] == 16_000


def samples(registry: CollectorRegistry) -> dict[str, tuple[float, dict[str, str]]]:
    text = generate_latest(registry).decode()
    return {
        sample.name: (sample.value, sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prometheus_exports_every_counter_with_its_value(store: SessionStore) -> None:
    registry = CollectorRegistry()
    register_prometheus(store.stats, registry=registry)
    sid = store.new_id()
    store.save(sid, {"n": 1})
    for _ in range(3):
        store.load(sid)
    exported = samples(registry)
    assert exported["memsess_loads_total"] == (3.0, {})
    assert exported["memsess_hits_total"] == (3.0, {})
    assert exported["memsess_saves_total"] == (1.0, {})
    assert {f"memsess_{name}_total" for name in COUNTERS} <= set(exported)
    store.load(store.new_id())  # read at each scrape, not at registration
    assert samples(registry)["memsess_misses_total"] == (1.0, {})
    text = generate_latest(registry).decode()
    assert "# HELP memsess_loads_total " + COUNTERS["loads"] in text


def test_prometheus_labels_tell_two_stores_apart(make_store: StoreFactory) -> None:
    registry = CollectorRegistry()
    first, second = make_store(), make_store()
    register_prometheus(first.stats, registry=registry, labels={"store": "a"})
    register_prometheus(second.stats, registry=registry, labels={"store": "b"}, namespace="other")
    first.load(first.new_id())
    exported = samples(registry)
    assert exported["memsess_loads_total"] == (1.0, {"store": "a"})
    assert exported["other_loads_total"] == (0.0, {"store": "b"})
