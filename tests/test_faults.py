"""Single server faults with redundancy 2 on 3 real servers: kill, hang, restart
empty, flush, and a logout during a hang. Nothing lost, nothing stale, no
logged-out session comes back."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from blocking_async import DRIVERS
from conftest import (
    TEST_RETRY_INTERVAL,
    WIRES,
    StoreFactory,
    cpu_burners,
    key_of,
    server_indexes,
    wire_cluster,
)

from memsess import NoServerAvailableError, SessionStore
from memsess.testing import LocalCluster

FAULTY = 0


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """Every fault test runs on the blocking store and on the asyncio one."""
    return str(request.param)


@pytest.fixture(params=WIRES)
def cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """... and over plain TCP and over TLS with authentication."""
    with wire_cluster(3, str(request.param)) as local:
        yield local


@dataclass(frozen=True)
class Fault:
    name: str
    start: Callable[[LocalCluster], None]
    heal: Callable[[LocalCluster], None]


FAULTS = [
    Fault("kill", lambda c: c.kill(FAULTY), lambda c: c.start_server(FAULTY)),
    Fault("hang", lambda c: c.hang(FAULTY), lambda c: c.resume(FAULTY)),
    Fault("restart-empty", lambda c: c.restart(FAULTY), lambda c: None),
    Fault("flush", lambda c: c.flush(FAULTY), lambda c: None),
]


def settle(store: SessionStore, timeout: float = 10.0) -> None:
    """Wait until the store's background probe has brought every returned server back
    (none is down or being probed): requests then ask it again."""
    deadline = time.monotonic() + timeout
    while any(s.state in ("down", "probing") for s in store.health()):
        assert time.monotonic() < deadline, f"a server stayed down: {store.health()}"
        time.sleep(TEST_RETRY_INTERVAL / 10)


def check_all(store: SessionStore, live: dict[str, int], gone: set[str]) -> None:
    for sid, version in live.items():
        assert store.load(sid) == {"version": version}, "lost or stale session"
    for sid in gone:
        assert store.load(sid) is None, "a logged-out session came back"


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_sessions_survive_a_single_fault(
    cluster: LocalCluster, store: SessionStore, fault: Fault
) -> None:
    sids = [store.new_id() for _ in range(60)]
    for sid in sids:
        store.save(sid, {"version": 1})
    gone = set(sids[:10])
    for sid in gone:  # logged out before the fault
        store.delete(sid)
    live = dict.fromkeys(sids[10:], 1)

    fault.start(cluster)
    for sid in sids[10:20]:  # logged out during the fault
        store.delete(sid)
        gone.add(sid)
        del live[sid]
    for sid in live:  # updated during the fault
        store.save(sid, {"version": 2})
        live[sid] = 2
    check_all(store, live, gone)

    fault.heal(cluster)
    settle(store)
    check_all(store, live, gone)  # the returned server is read again, repaired
    check_all(store, live, gone)  # and nothing older ever wins afterwards
    assert {s.state for s in store.health()} == {"up"}, store.health()


def test_logout_during_hang_stays_logged_out_after_resume(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sids = [store.new_id() for _ in range(40)]
    for sid in sids:
        store.save(sid, {"user_id": 1})
    on_hung = [sid for sid in sids if FAULTY in server_indexes(cluster, store, sid)]
    assert on_hung
    cluster.hang(FAULTY)
    for sid in on_hung:
        store.delete(sid)  # the hung copy misses (or queues) the logout
    cluster.resume(FAULTY)  # it now answers with the copy it kept
    settle(store)
    for sid in on_hung:
        assert store.load(sid) is None
    for sid in on_hung:  # and the stale copies were overwritten by tombstones
        assert store.load(sid) is None
    assert all(store.load(sid) == {"user_id": 1} for sid in sids if sid not in on_hung)


def test_no_late_reply_is_read_as_the_answer_to_a_later_command(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    store = make_store(redundancy=1, timeout=0.3, retry_interval=0.2)
    sids = [store.new_id() for _ in range(40)]
    mine = [sid for sid in sids if server_indexes(cluster, store, sid) == [FAULTY]]
    assert len(mine) >= 3
    for n, sid in enumerate(mine):
        store.save(sid, {"n": n})
    cluster.hang(FAULTY)
    with pytest.raises(NoServerAvailableError):
        store.load(mine[0])  # times out: its reply is still queued in the server
    cluster.resume(FAULTY)  # the server now answers everything it queued
    settle(store)
    for _ in range(3):
        for n, sid in enumerate(mine):
            assert store.load(sid) == {"n": n}


def test_a_hung_copy_is_cut_off_as_a_straggler_and_then_skipped(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sids = [store.new_id() for _ in range(30)]
    for sid in sids:
        store.save(sid, {"n": 1})
    cluster.hang(FAULTY)
    deadline = time.monotonic() + 3.0
    while store.health()[FAULTY].state != "down" and time.monotonic() < deadline:
        for sid in sids:  # every read still answers, from the other copy
            assert store.load(sid) == {"n": 1}
    hung = store.health()[FAULTY]
    assert hung.state == "down"
    assert "straggler" in hung.reason
    cluster.resume(FAULTY)


def test_server_restarted_empty_is_refilled_by_read_repair(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sids = [store.new_id() for _ in range(30)]
    for sid in sids:
        store.save(sid, {"n": 1})
    cluster.restart(FAULTY)
    for sid in sids:
        assert store.load(sid) == {"n": 1}
    on_restarted = [sid for sid in sids if FAULTY in server_indexes(cluster, store, sid)]
    assert on_restarted
    assert all(cluster.get_raw(FAULTY, key_of(store, sid)) is not None for sid in on_restarted)


@pytest.mark.parametrize("burners", [0, 3], ids=["quiet", "three-cpu-burners"])
@pytest.mark.parametrize("fault", ["kill", "hang", "restart"])
def test_eight_threads_of_mixed_traffic_through_a_fault(
    cluster: LocalCluster, store: SessionStore, fault: str, burners: int
) -> None:
    with cpu_burners(burners):
        _eight_threads_through(cluster, store, fault)


def _eight_threads_through(cluster: LocalCluster, store: SessionStore, fault: str) -> None:
    errors: list[BaseException] = []
    expected: list[dict[str, int | None]] = [{} for _ in range(8)]
    stop = threading.Event()

    def worker(n: int) -> None:
        rng = random.Random(n)
        mine = expected[n]
        try:
            while not stop.is_set():
                sid = rng.choice(list(mine)) if mine and rng.random() < 0.8 else store.new_id()
                action = rng.random()
                if action < 0.5:
                    assert store.load(sid) == (None if mine.get(sid) is None else {"v": mine[sid]})
                elif action < 0.9:
                    value = rng.randrange(1_000_000)
                    store.save(sid, {"v": value})
                    mine[sid] = value
                else:
                    store.delete(sid)
                    mine[sid] = None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    getattr(cluster, fault)(FAULTY)
    time.sleep(1.0)
    if fault == "kill":
        cluster.start_server(FAULTY)
    elif fault == "hang":
        cluster.resume(FAULTY)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(len(mine) for mine in expected) > 100
    settle(store)
    for mine in expected:
        for sid, value in mine.items():
            assert store.load(sid) == (None if value is None else {"v": value})


def test_probes_start_again_after_close_when_every_copy_is_down(
    cluster: LocalCluster, store: SessionStore
) -> None:
    sid = store.new_id()
    store.save(sid, {"a": 1})
    holders = server_indexes(cluster, store, sid)
    for index in holders:
        cluster.kill(index)
    deadline = time.monotonic() + 5
    while any(store.health()[i].state == "up" for i in holders):
        assert time.monotonic() < deadline
        with pytest.raises(NoServerAvailableError):
            store.load(sid)
    store.close()  # stops the background thread that probes them
    for index in holders:
        cluster.start_server(index)
    with pytest.raises(NoServerAvailableError):
        store.load(sid)  # still marked down: but this request starts the probes again
    settle(store)
    assert store.load(sid) is None  # back (empty), read again
