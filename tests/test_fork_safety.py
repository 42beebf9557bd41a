"""A fork while another thread holds a lock (gunicorn --preload, uWSGI, multiprocessing)
must not leave the child waiting forever on the lock only that thread could release."""

from __future__ import annotations

import gc
import os
import select
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import pytest

from memsess._forksafe import (
    _CALLS,
    _LOCKS,
    _RENEWALS,
    call_after_fork,
    fork_safe_lock,
    renew_locks_after_fork,
)
from memsess.dsn import ServerSpec
from memsess.metrics import Metrics
from memsess.protocol import Values, get
from memsess.records import DATA, FLAGS, VersionClock, decode_record, encode_record
from memsess.testing import LocalCluster
from memsess.transport import ServerPool, fanout
from memsess.transport.pool import close_all

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

# Far above what a child takes to tick a clock, even on a loaded machine; only a hung
# child waits this long.
CHILD_DEADLINE = 10.0


@contextmanager
def held_by_another_thread(*locks: AbstractContextManager[object]) -> Iterator[None]:
    """``locks`` held by a second thread for the duration of the block."""
    acquired, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            acquired.set()
            release.wait()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    acquired.wait()
    try:
        yield
    finally:
        release.set()
        holder.join()


def run_in_child(use: Callable[[], None]) -> None:
    """Fork, run ``use()`` in the child, and fail unless it returns within the deadline."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            use()
            os.write(write_end, b"ok")
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], CHILD_DEADLINE)
        answer = os.read(read_end, 2) if ready else b""
    finally:
        os.close(read_end)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert ready, f"the child hung for {CHILD_DEADLINE} s on a lock held at fork time"
    assert (answer, os.waitstatus_to_exitcode(status)) == (b"ok", 0)


def test_version_clock_ticks_in_a_child_forked_while_another_thread_ticks() -> None:
    clock = VersionClock()
    before = clock.tick()

    def use() -> None:
        version = clock.tick()
        assert version > before
        decode_record(encode_record(version, DATA, 1), FLAGS)

    with held_by_another_thread(clock._lock):
        run_in_child(use)
    assert clock.tick() > before  # the parent's clock still works once released


def test_metrics_count_in_a_child_forked_while_another_thread_counts() -> None:
    metrics = Metrics()
    metrics.add("loads")

    def use() -> None:
        metrics.add("loads")
        assert metrics.snapshot()["loads"] == 2

    with held_by_another_thread(metrics._lock):
        run_in_child(use)
    assert metrics.snapshot()["loads"] == 1  # the child's count stays in the child


def test_renewal_does_not_keep_its_owner_alive() -> None:
    metrics = Metrics()
    entry = (id(metrics), "_lock")
    assert entry in _RENEWALS
    del metrics
    gc.collect()
    assert entry not in _RENEWALS


def test_a_fork_safe_lock_is_not_kept_alive_by_its_registration() -> None:
    clock = VersionClock()
    lock = weakref.ref(clock._lock)
    assert lock() in _LOCKS
    del clock
    gc.collect()
    assert lock() is None


def test_a_fork_safe_lock_held_at_the_fork_is_free_in_the_child_and_held_in_the_parent() -> None:
    lock = fork_safe_lock()

    def use() -> None:
        with lock:
            pass

    with held_by_another_thread(lock):
        run_in_child(use)
        assert lock.locked()  # the parent's holder still holds it


def test_renewal_uses_the_factory_of_each_registration() -> None:
    class Owner:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.rlock = threading.RLock()
            renew_locks_after_fork(self, "lock")
            renew_locks_after_fork(self, "rlock", factory=threading.RLock)

    owner = Owner()

    def use() -> None:
        with owner.lock, owner.rlock, owner.rlock:  # the RLock is still reentrant
            pass

    with held_by_another_thread(owner.lock, owner.rlock):
        run_in_child(use)


def test_a_child_forked_while_the_django_adapter_builds_a_store_can_build_its_own() -> None:
    pytest.importorskip("django")
    from memsess.adapters import django as adapter

    def take_the_lock() -> None:
        with adapter._stores_lock:
            pass

    with held_by_another_thread(adapter._stores_lock):
        run_in_child(take_the_lock)


def test_a_child_forked_after_the_async_store_was_used_opens_its_own_connections() -> None:
    import asyncio

    from memsess import AsyncSessionStore
    from memsess.testing import LocalCluster

    with LocalCluster(2) as cluster:
        store = AsyncSessionStore.from_dsn(cluster.dsn(), redundancy=2)
        loop = asyncio.new_event_loop()
        try:
            sid = store.new_id()
            loop.run_until_complete(store.save(sid, {"from": "parent"}))
            idle = [conn for conns in store._loops[loop]._idle for conn in conns]
            assert idle  # pooled connections, left idle

            def use() -> None:
                assert not store._loops  # none of the parent's loops...
                assert all(conn.closed for conn in idle)  # ...nor their sockets
                child_sid = store.new_id()
                asyncio.run(store.save(child_sid, {"from": "child"}))
                assert asyncio.run(store.load(sid)) == {"from": "parent"}

            with held_by_another_thread(store._loops_lock):
                run_in_child(use)
            for _ in range(50):  # the parent's connections were not disturbed
                assert loop.run_until_complete(store.load(sid)) == {"from": "parent"}
        finally:
            loop.run_until_complete(store.aclose())
            loop.close()


def test_a_call_after_fork_runs_in_the_child_once_its_locks_are_free() -> None:
    class Owner:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.calls = 0
            renew_locks_after_fork(self, "lock")

    def take_the_lock(owner: Owner) -> None:
        with owner.lock:  # renewed already: free in the child
            owner.calls += 1

    owner = Owner()
    call_after_fork(owner, take_the_lock)
    call_after_fork(owner, take_the_lock)  # registered twice: called once

    def use() -> None:
        assert owner.calls == 1

    with held_by_another_thread(owner.lock):
        run_in_child(use)
    assert owner.calls == 0  # only in the child


def test_a_call_after_fork_does_not_keep_its_owner_alive() -> None:
    class Owner:
        pass

    owner = Owner()
    call_after_fork(owner, print)
    entry = (id(owner), print)
    assert entry in _CALLS
    del owner
    gc.collect()
    assert entry not in _CALLS


def test_a_child_closes_its_copies_of_a_stream_pools_idle_connections() -> None:
    with LocalCluster(1) as cluster:
        server = cluster.servers[0]
        pool = ServerPool(ServerSpec("tcp", server.host, server.port, timeout=2.0))
        try:
            assert fanout([pool], [get(b"k")]) == [Values(())]
            idle = list(pool._idle)
            assert idle  # pooled, left idle

            def use() -> None:
                assert not pool._idle  # none of the parent's connections...
                assert all(conn.sock.fileno() == -1 for conn in idle)  # ...closed here
                assert fanout([pool], [get(b"k")]) == [Values(())]  # a new one works

            run_in_child(use)
            assert list(pool._idle) == idle  # the parent's are untouched, and still work
            assert fanout([pool], [get(b"k")]) == [Values(())]
            assert list(pool._idle) == idle
        finally:
            pool.clear()


def test_a_stream_pool_is_not_kept_alive_by_its_fork_registration() -> None:
    pool = ServerPool(ServerSpec("tcp", "127.0.0.1", 1))
    entry = (id(pool._idle), close_all)
    assert entry in _CALLS
    del pool
    gc.collect()
    assert entry not in _CALLS
