"""Session locks against real memcached (for apps that need requests of one user to run
strictly one at a time): one owner at a time, a lease that ends a crashed holder's lock,
a bounded wait, release only by the owner, and best effort under a server fault."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
from conftest import key_of, server_indexes

from memsess import AsyncSessionStore, SessionLockError, SessionStore
from memsess.plans import LOCK_SUFFIX
from memsess.testing import LocalCluster


def lock_values(cluster: LocalCluster, store: SessionStore, sid: str) -> list[bytes | None]:
    """The lock's value on each running server of ``sid``'s replica set."""
    key = key_of(store, sid) + LOCK_SUFFIX
    running = {s.index for s in cluster.servers if s.running}
    return [cluster.get_raw(i, key) for i in server_indexes(cluster, store, sid) if i in running]


def faulted(cluster: LocalCluster, store: SessionStore, fault: str | None) -> str:
    """A session id; with the fault, the first server of its replica set killed."""
    sid = store.new_id()
    if fault == "kill":
        cluster.kill(server_indexes(cluster, store, sid)[0])
    return sid


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_one_owner_at_a_time_and_a_bounded_wait(cluster: LocalCluster, store: SessionStore) -> None:
    sid = store.new_id()
    first = store.lock(sid)
    first.acquire()
    assert lock_values(cluster, store, sid) == [first.token] * 2  # on every copy
    started = time.monotonic()
    with pytest.raises(SessionLockError, match="held by another request"):
        store.lock(sid, wait=0.2).acquire()
    assert 0.2 <= time.monotonic() - started < 1.0  # waited, boundedly
    first.release()
    assert lock_values(cluster, store, sid) == [None, None]
    with store.lock(sid, wait=0.2) as second:  # free again
        assert second.held
    stats = store.stats()
    assert (stats["locks"], stats["lock_timeouts"]) == (2, 1)


def test_a_crashed_holders_lock_ends_with_its_lease(store: SessionStore) -> None:
    sid = store.new_id()
    store.lock(sid, lease=1).acquire()  # never released: its holder "crashed"
    started = time.monotonic()
    with store.lock(sid, wait=5):  # had once the lease runs out
        waited = time.monotonic() - started
    assert 0.5 < waited < 3.0


@pytest.mark.parametrize("fault", [None, "kill"])
def test_a_release_after_the_lease_ran_out_leaves_the_new_owners_lock(
    cluster: LocalCluster, store: SessionStore, fault: str | None
) -> None:
    sid = faulted(cluster, store, fault)
    copies = len(lock_values(cluster, store, sid))
    slow = store.lock(sid, lease=1)
    slow.acquire()
    wait_until(lambda: lock_values(cluster, store, sid) == [None] * copies, "the lease to end")
    fresh = store.lock(sid)
    fresh.acquire()
    slow.release()  # too late: the lock is the new owner's now
    assert lock_values(cluster, store, sid) == [fresh.token] * copies
    with pytest.raises(SessionLockError):
        store.lock(sid, wait=0.1).acquire()
    fresh.release()
    assert lock_values(cluster, store, sid) == [None] * copies


@pytest.mark.parametrize("fault", [None, "kill"])
def test_locked_read_modify_writes_lose_no_update_even_overwriting(
    cluster: LocalCluster, store: SessionStore, fault: str | None
) -> None:
    sid = store.new_id()
    store.save(sid, {"n": 0})
    if fault:
        cluster.kill(server_indexes(cluster, store, sid)[0])
    errors: list[BaseException] = []

    def request() -> None:
        try:
            for _ in range(10):
                with store.lock(sid, wait=10):
                    snapshot = store.fetch(sid)
                    assert snapshot is not None
                    data = {"n": snapshot.data["n"] + 1}
                    # "overwrite": only the lock keeps these from losing updates.
                    store.save(sid, data, snapshot=snapshot, on_conflict="overwrite")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.load(sid) == {"n": 80}
    assert store.stats()["conflicts"] == 0  # serialized: no save ever met another


def test_the_async_store_locks_on_the_same_keys(cluster: LocalCluster, store: SessionStore) -> None:
    sid = store.new_id()

    async def main() -> None:
        async with AsyncSessionStore.from_store(store) as astore:
            async with astore.lock(sid) as held:
                assert lock_values(cluster, store, sid) == [held.token] * 2
                with pytest.raises(SessionLockError):
                    store.lock(sid, wait=0.1).acquire()  # the blocking store sees it
            assert lock_values(cluster, store, sid) == [None, None]

    asyncio.run(main())


@pytest.mark.parametrize("fault", [None, "kill"])
def test_a_lock_held_by_a_killed_worker_ends_with_its_lease(
    cluster: LocalCluster, store: SessionStore, fault: str | None
) -> None:
    import subprocess
    import sys

    sid = faulted(cluster, store, fault)
    dsn = cluster.dsn(timeout=0.5, retry_interval=0.3)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, memsess\n"
            "store = memsess.SessionStore.from_dsn(sys.argv[1], redundancy=2)\n"
            "store.lock(sys.argv[2], lease=1).acquire()\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",  # holds it until killed
            dsn,
            sid,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == "locked\n"
        worker.kill()  # SIGKILL: it never releases
        worker.wait()
        with pytest.raises(SessionLockError):
            store.lock(sid, wait=0.1).acquire()  # still held right after the kill
        with store.lock(sid, wait=5):  # ...until its lease has run out
            pass
    finally:
        worker.kill()
        worker.wait()
