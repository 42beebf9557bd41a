"""The read rule against real memcached: a live server slower than any straggler window
(a stall of 30 or 150 ms: SIGSTOP, then SIGCONT) never makes a read end on the wrong
copy. Each scenario is a worked example of docs/consistency.md."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from blocking_async import DRIVERS, store_for
from conftest import TEST_RETRY_INTERVAL, TEST_TIMEOUT, WIRES, key_of, wire_cluster

from memsess import SessionStore
from memsess.records import FLAGS, TOMBSTONE, decode_record, encode_record
from memsess.testing import LocalCluster

STALLS = [0.030, 0.150]  # seconds: over every straggler window, under the 0.5 s timeout


@pytest.fixture(params=WIRES)
def pair(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """Two servers, over plain TCP and over TLS with authentication."""
    with wire_cluster(2, str(request.param)) as local:
        yield local


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def new_store(cluster: LocalCluster, driver: str = "sync", **options: object) -> SessionStore:
    dsn = cluster.dsn(timeout=TEST_TIMEOUT, retry_interval=TEST_RETRY_INTERVAL)
    return store_for(driver, dsn, redundancy=2, **options)


@pytest.fixture
def stores(pair: LocalCluster, driver: str) -> Iterator[Callable[[], SessionStore]]:
    made: list[SessionStore] = []

    def make() -> SessionStore:
        made.append(new_store(pair, driver))
        return made[-1]

    yield make
    for store in made:
        store.close()


@contextmanager
def stalled(cluster: LocalCluster, index: int, seconds: float) -> Iterator[None]:
    """Server ``index`` stops answering (SIGSTOP) and resumes ``seconds`` later, while
    the block runs; it is running again when the block exits."""
    cluster.hang(index)
    timer = threading.Timer(seconds, cluster.resume, args=(index,))
    timer.start()
    try:
        yield
    finally:
        timer.join()
        cluster.resume(index)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def state(store: SessionStore, index: int) -> str:
    return store.health()[index].state


def mark_down_while_hung(cluster: LocalCluster, store: SessionStore, index: int, sid: str) -> None:
    """Hang server ``index`` and make ``store`` mark it down (requests see it fail)."""
    cluster.hang(index)
    wait_for(lambda: store.load(sid) is not None and state(store, index) == "down", "down")


def back_up(cluster: LocalCluster, store: SessionStore, index: int) -> None:
    """Resume server ``index`` and wait until ``store``'s probe has brought it back."""
    cluster.resume(index)
    wait_for(lambda: state(store, index) == "up", "the probe to bring the server back")


@pytest.mark.parametrize("stall", STALLS)
def test_logout_during_a_hang_is_not_undone_when_the_other_copy_stalls(
    pair: LocalCluster, stores: Callable[[], SessionStore], stall: float
) -> None:
    store = stores()
    sid = store.new_id()
    store.save(sid, {"user": "alice"})
    mark_down_while_hung(pair, store, 1, sid)
    store.delete(sid)  # the tombstone reaches server 0 only
    back_up(pair, store, 1)  # server 1 still holds alice's session
    with stalled(pair, 0, stall):
        assert store.load(sid) is None


@pytest.mark.parametrize("stall", STALLS)
def test_an_update_during_a_hang_is_not_lost_when_the_other_copy_stalls(
    pair: LocalCluster, stores: Callable[[], SessionStore], stall: float
) -> None:
    store = stores()
    sid = store.new_id()
    store.save(sid, {"cart": 1})
    mark_down_while_hung(pair, store, 1, sid)
    store.save(sid, {"cart": 2})
    back_up(pair, store, 1)
    with stalled(pair, 0, stall):
        assert store.load(sid) == {"cart": 2}


@pytest.mark.parametrize("stall", STALLS)
def test_an_empty_copy_does_not_log_the_user_out_while_the_other_stalls(
    pair: LocalCluster, stores: Callable[[], SessionStore], stall: float
) -> None:
    store = stores()
    sid = store.new_id()
    store.save(sid, {"user": "bob"})
    pair.restart(0)
    with stalled(pair, 1, stall):
        assert store.load(sid) == {"user": "bob"}
    assert pair.get_raw(0, key_of(store, sid)) is not None  # and the empty one is repaired


@pytest.mark.parametrize("stall", STALLS)
def test_an_idle_process_reads_the_marker_of_a_server_that_missed_writes(
    pair: LocalCluster, stores: Callable[[], SessionStore], stall: float
) -> None:
    """Two stores are two processes: the idle one never saw server 1 fail, so only the
    marker the busy one wrote on server 1 when it came back tells it not to trust it."""
    busy, idle = stores(), stores()
    sid = busy.new_id()
    busy.save(sid, {"cart": 1})
    assert idle.load(sid) == {"cart": 1}  # its connections are pooled: nothing fails later
    mark_down_while_hung(pair, busy, 1, sid)
    busy.save(sid, {"cart": 2})
    back_up(pair, busy, 1)
    assert state(idle, 1) == "up"
    with stalled(pair, 0, stall):
        assert idle.load(sid) == {"cart": 2}


def test_a_copy_written_after_the_marker_decides_alone(
    pair: LocalCluster, stores: Callable[[], SessionStore]
) -> None:
    """The marker costs nothing to sessions written since: their copies decide alone,
    so a hung server next to them is cut off after its window, not its timeout."""
    store = stores()
    old = store.new_id()
    store.save(old, {"n": 0})
    mark_down_while_hung(pair, store, 1, old)
    back_up(pair, store, 1)
    fresh = store.new_id()
    store.save(fresh, {"n": 1})
    other = stores()  # knows nothing but the marker
    pair.hang(0)
    try:
        started = time.monotonic()
        assert other.load(fresh) == {"n": 1}
        assert time.monotonic() - started < TEST_TIMEOUT
    finally:
        pair.resume(0)


def test_a_miss_waits_for_the_other_copy_rather_than_deciding(
    pair: LocalCluster, stores: Callable[[], SessionStore]
) -> None:
    store = stores()
    sid = store.new_id()
    store.save(sid, {"n": 1})
    pair.flush(0)  # server 0 answers at once: a miss
    with stalled(pair, 1, 0.1):
        assert store.load(sid) == {"n": 1}


def test_a_tombstone_planted_on_one_copy_wins_wherever_it_is(
    pair: LocalCluster, stores: Callable[[], SessionStore]
) -> None:
    store = stores()
    for holder in (0, 1):
        sid = store.new_id()
        store.save(sid, {"n": 1})
        raw = pair.get_raw(holder, key_of(store, sid))
        assert raw is not None
        version = decode_record(raw, FLAGS).version
        tombstone = encode_record(version + 1, TOMBSTONE, 1, ttl=60)
        pair.set_raw(holder, key_of(store, sid), tombstone, flags=FLAGS)
        assert store.load(sid) is None
        assert all(pair.get_raw(i, key_of(store, sid)) == tombstone for i in (0, 1))


def test_sixteen_threads_through_a_hang_and_resume_give_no_wrong_answer(
    memcached_cluster: LocalCluster,
) -> None:
    store = new_store(memcached_cluster)
    errors: list[BaseException] = []
    wrong: list[str] = []
    stop = threading.Event()
    counts = [0] * 16

    def worker(n: int) -> None:
        mine: dict[str, int | None] = {}
        try:
            while not stop.is_set():
                sid = store.new_id()
                for value in range(3):
                    store.save(sid, {"v": value})
                    mine[sid] = value
                for known, last in list(mine.items())[-8:]:
                    got = store.load(known)
                    if got != (None if last is None else {"v": last}):
                        wrong.append(f"{known[:6]}: expected {last}, got {got}")
                store.delete(sid)
                mine[sid] = None
                counts[n] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: sum(counts) > 50, "traffic")
        memcached_cluster.hang(0)
        wait_for(lambda: state(store, 0) == "down", "the hung server to be marked down")
        before = sum(counts)
        wait_for(lambda: sum(counts) > before + 50, "traffic during the hang")
        memcached_cluster.resume(0)
        wait_for(lambda: state(store, 0) == "up", "the server back")
        before = sum(counts)
        wait_for(lambda: sum(counts) > before + 50, "traffic after the resume")
    finally:
        stop.set()
        memcached_cluster.resume(0)
        for thread in threads:
            thread.join()
        store.close()
    assert errors == []
    assert wrong == []
