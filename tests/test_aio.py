"""What only the asyncio store can get wrong, against real memcached: a blocked event
loop, a task cancelled in the middle of a fan-out, many tasks through a fault on one
loop, several loops on one store, a store used outside a loop. (Every fault test of the
blocking store also runs on this one: see the ``driver`` fixtures.)"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import uvloop
from conftest import TEST_RETRY_INTERVAL, TEST_TIMEOUT, cpu_burners, server_indexes

from memsess import AsyncSessionStore, SessionStore
from memsess.testing import LocalCluster

T = TypeVar("T")
FAULTY = 0


Runner = Callable[..., Any]
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Runner:
    """``run(cluster, body, **options)``: ``body(store)`` on a fresh event loop (asyncio's
    own, and uvloop's: what uvicorn runs on when it is installed) with a store on
    ``cluster``, closed after; returns what ``body`` returns."""
    new_loop = LOOPS[request.param]

    def run(
        cluster: LocalCluster, body: Callable[[AsyncSessionStore], Awaitable[T]], **options: Any
    ) -> T:
        async def main() -> T:
            options.setdefault("redundancy", 2)
            dsn = cluster.dsn(timeout=TEST_TIMEOUT, retry_interval=TEST_RETRY_INTERVAL)
            async with AsyncSessionStore.from_dsn(dsn, **options) as store:
                return await body(store)

        loop = new_loop()
        try:
            return loop.run_until_complete(main())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return run


async def settle(store: AsyncSessionStore, timeout: float = 10.0) -> None:
    """Until the background probe has brought every returned server back."""
    deadline = time.monotonic() + timeout
    while any(s.state in ("down", "probing") for s in store.health()):
        assert time.monotonic() < deadline, f"a server stayed down: {store.health()}"
        await asyncio.sleep(TEST_RETRY_INTERVAL / 10)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- the event loop is never blocked ------------------------------------------------------


class Ticker:
    """A task that wants to run every ``period`` seconds; records the longest gap."""

    def __init__(self, period: float = 0.010) -> None:
        self.period = period
        self.ticks = 0
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.period)
            now = time.monotonic()
            self.longest = max(self.longest, now - last - self.period)
            self.ticks += 1
            last = now

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.mark.parametrize("fault", ["hang", "kill"])
def test_the_event_loop_keeps_ticking_while_a_server_is_hung(
    cluster: LocalCluster, fault: str, run: Runner
) -> None:
    async def body(store: AsyncSessionStore) -> float:
        sids = [store.new_id() for _ in range(40)]
        for sid in sids:
            await store.save(sid, {"n": 1})
        getattr(cluster, fault)(FAULTY)
        with Ticker() as ticker:
            started = time.monotonic()
            # Over twice the servers' timeout of requests, each through the fault: a
            # blocking call would stall the loop for a whole timeout at least once.
            while time.monotonic() - started < 3 * TEST_TIMEOUT:
                for sid in sids:
                    assert await store.load(sid) == {"n": 1}
                    await store.save(sid, {"n": 1})
        assert ticker.ticks > 50
        return ticker.longest

    try:
        longest = run(cluster, body)
    finally:
        cluster.resume(FAULTY) if fault == "hang" else cluster.start_server(FAULTY)
    # A blocked loop would show a gap of the timeout (0.5 s); the allowance is for a
    # busy 2-core machine's scheduler, not for any wait of ours.
    assert longest < TEST_TIMEOUT / 2, f"the loop stalled for {longest * 1000:.0f} ms"


# -- cancellation ---------------------------------------------------------------------


def test_a_task_cancelled_mid_fanout_leaves_no_reply_to_be_misread(
    cluster: LocalCluster, run: Runner
) -> None:
    async def body(store: AsyncSessionStore) -> None:
        sids = [store.new_id() for _ in range(60)]
        mine = [sid for sid in sids if server_indexes(cluster, store, sid) == [FAULTY]]
        assert len(mine) >= 4
        for n, sid in enumerate(mine):
            await store.save(sid, {"n": n})
        fds = open_fds()
        cluster.hang(FAULTY)
        try:
            for round_ in range(20):
                task = asyncio.ensure_future(store.load(mine[round_ % len(mine)]))
                await asyncio.sleep(0)  # the task runs up to its wait: the get is sent
                assert not task.done()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        finally:
            cluster.resume(FAULTY)  # the server now answers every get it queued
        # Each cancelled request closed its connection: nothing piles up...
        assert open_fds() - fds < 5
        # ...and no queued answer is ever read as the answer to a later request.
        for _ in range(3):
            for n, sid in enumerate(mine):
                assert await store.load(sid) == {"n": n}

    run(cluster, body, redundancy=1)


def test_cancelling_many_tasks_in_the_middle_of_saves_loses_nothing_already_stored(
    cluster: LocalCluster,
    run: Runner,
) -> None:
    async def body(store: AsyncSessionStore) -> None:
        sids = [store.new_id() for _ in range(100)]
        await asyncio.gather(*(store.save(sid, {"v": 1}) for sid in sids))
        rng = random.Random(7)
        for _ in range(10):
            tasks = [asyncio.ensure_future(store.save(sid, {"v": 2})) for sid in sids]
            # Cancelled after a random number of loop turns: before, during or after
            # their fan-out.
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        got = await asyncio.gather(*(store.load(sid) for sid in sids))
        # A save cancelled mid-way may or may not have landed; either way the session
        # is whole, one of the two versions, never gone or mixed.
        assert all(data in ({"v": 1}, {"v": 2}) for data in got)
        assert all(s.state == "up" for s in store.health())

    run(cluster, body)


# -- many tasks through a fault -------------------------------------------------------


@pytest.mark.parametrize("burners", [0, 3], ids=["quiet", "three-cpu-burners"])
@pytest.mark.parametrize("fault", ["kill", "hang", "restart"])
def test_a_hundred_tasks_of_mixed_traffic_through_a_fault(
    cluster: LocalCluster, fault: str, burners: int, run: Runner
) -> None:
    async def body(store: AsyncSessionStore) -> None:
        expected: list[dict[str, int | None]] = [{} for _ in range(100)]
        stop = asyncio.Event()

        async def worker(n: int) -> int:
            rng = random.Random(n)
            mine = expected[n]
            done = 0
            while not stop.is_set():
                sid = rng.choice(list(mine)) if mine and rng.random() < 0.8 else store.new_id()
                action = rng.random()
                if action < 0.5:
                    want = None if mine.get(sid) is None else {"v": mine[sid]}
                    assert await store.load(sid) == want
                elif action < 0.9:
                    value = rng.randrange(1_000_000)
                    await store.save(sid, {"v": value})
                    mine[sid] = value
                else:
                    await store.delete(sid)
                    mine[sid] = None
                done += 1
            return done

        async def fault_schedule() -> None:
            # From a thread: starting a server blocks for a while, which on this loop
            # would stall every task past its deadline (the harness's fault, not memsess's).
            await asyncio.sleep(0.3)
            await asyncio.to_thread(getattr(cluster, fault), FAULTY)
            await asyncio.sleep(0.7)
            if fault == "kill":
                await asyncio.to_thread(cluster.start_server, FAULTY)
            elif fault == "hang":
                await asyncio.to_thread(cluster.resume, FAULTY)
            await asyncio.sleep(0.3)
            stop.set()

        every_worker = asyncio.gather(*(worker(n) for n in range(100)))
        counts, _ = await asyncio.gather(every_worker, fault_schedule())
        assert sum(counts) > 200
        await settle(store)
        for mine in expected:
            for sid, value in mine.items():
                assert await store.load(sid) == (None if value is None else {"v": value})

    with cpu_burners(burners):
        try:
            run(cluster, body)
        finally:
            if cluster.servers[FAULTY].hung:
                cluster.resume(FAULTY)


# -- loops ------------------------------------------------------------------------------


def test_one_store_serves_several_loops_each_with_its_own_connections(
    cluster: LocalCluster,
) -> None:
    dsn = cluster.dsn(timeout=TEST_TIMEOUT, retry_interval=TEST_RETRY_INTERVAL)
    store = AsyncSessionStore.from_dsn(dsn, redundancy=2)
    errors: list[BaseException] = []

    async def traffic(n: int) -> None:
        sids = [store.new_id() for _ in range(50)]
        for round_ in range(5):
            await asyncio.gather(*(store.save(sid, {"n": n, "r": round_}) for sid in sids))
            got = await asyncio.gather(*(store.load(sid) for sid in sids))
            assert got == [{"n": n, "r": round_}] * len(sids)
        await store.aclose()

    def thread(n: int) -> None:
        try:
            asyncio.run(traffic(n))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=thread, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store._loops) <= 4  # one pool per loop; closed loops are let go

    async def after() -> dict[str, Any] | None:
        sid = store.new_id()
        await store.save(sid, {"a": 1})
        return await store.load(sid)

    assert asyncio.run(after()) == {"a": 1}  # and a new loop works after the others ended


def test_a_loop_per_request_leaves_no_connections_behind(cluster: LocalCluster) -> None:
    # What async_to_sync does for each request of a WSGI server running async views.
    dsn = cluster.dsn(timeout=TEST_TIMEOUT, retry_interval=TEST_RETRY_INTERVAL)
    store = AsyncSessionStore.from_dsn(dsn, redundancy=2)
    sid = store.new_id()
    asyncio.run(store.save(sid, {"a": 1}))
    fds = open_fds()
    for _ in range(60):
        assert asyncio.run(store.load(sid)) == {"a": 1}
    assert len(store._loops) <= 1  # the closed loops' pools were let go...
    assert open_fds() - fds < 8  # ...with their sockets


def test_a_store_used_outside_a_running_loop_says_so(cluster: LocalCluster) -> None:
    store = AsyncSessionStore.from_dsn(cluster.dsn(), redundancy=2)
    coroutine = store.load(store.new_id())
    with pytest.raises(RuntimeError, match="awaited on a running event loop"):
        coroutine.send(None)


def test_from_store_shares_the_health_table_and_counters(cluster: LocalCluster) -> None:
    dsn = cluster.dsn(timeout=TEST_TIMEOUT, retry_interval=TEST_RETRY_INTERVAL)
    with SessionStore.from_dsn(dsn, redundancy=2) as blocking:
        store = AsyncSessionStore.from_store(blocking)
        sid = blocking.new_id()
        blocking.save(sid, {"from": "sync"})

        async def body() -> dict[str, Any] | None:
            try:
                return await store.load(sid)
            finally:
                await store.aclose()

        assert asyncio.run(body()) == {"from": "sync"}
        assert blocking.stats()["loads"] == 1  # the async load counted on the shared counters
        cluster.kill(FAULTY)
        sids = [blocking.new_id() for _ in range(30)]
        for other in sids:
            blocking.save(other, {"n": 1})  # the sync store finds the server down...
        assert store.health()[FAULTY].state in ("down", "probing")  # ...and so does the async one


def test_a_server_closing_an_idle_connection_raises_its_trust_floor(
    cluster: LocalCluster,
    run: Runner,
) -> None:
    async def body(store: AsyncSessionStore) -> None:
        sids = [store.new_id() for _ in range(20)]
        for sid in sids:
            await store.save(sid, {"n": 1})  # leaves idle connections to every server
        floor = store._cluster.trust_floor[FAULTY]
        cluster.restart(FAULTY)  # closes them: the server may have missed writes since
        deadline = time.monotonic() + 5
        while store._cluster.trust_floor[FAULTY] == floor:
            assert time.monotonic() < deadline, "the closed idle connection went unnoticed"
            await asyncio.sleep(0.005)
        for sid in sids:
            assert await store.load(sid) == {"n": 1}

    run(cluster, body)


def test_a_copy_still_connecting_is_not_cut_before_its_write_is_sent(
    cluster: LocalCluster,
    run: Runner,
) -> None:
    # Server 0 has a pooled connection and answers at once; server 1 has none, so its
    # write waits for a connect that takes this loop a few turns. The cut (at once
    # after the first reply) must not drop a write that never left: it is sent, then
    # cut, and the server stores it.
    from memsess import protocol
    from memsess.transport import FirstReply
    from memsess.transport.aio import AsyncFanout

    async def body(store: AsyncSessionStore) -> None:
        pools = store._loop_pools()
        warm = await AsyncFanout(pools, [(0, protocol.version())], FirstReply(1.0)).run()
        assert warm.results[0] is not None
        for n in range(20):
            key = b"memsess:cut-%d" % n
            batch = [(index, protocol.set(key, b"x", exptime=60)) for index in (0, 1)]
            pools.close()  # server 1's connection is made anew each round...
            await AsyncFanout(pools, [(0, protocol.version())], FirstReply(1.0)).run()
            run = await AsyncFanout(pools, batch, FirstReply(0.0)).run()  # ...not server 0's
            assert run.results[0] is not None
            deadline = time.monotonic() + 5
            while cluster.get_raw(1, key) is None:
                assert time.monotonic() < deadline, f"round {n}: {run.results[1]}"
                await asyncio.sleep(0.001)

    run(cluster, body)


class SlowAfterFirstReply:
    """A wait rule that, at the first reply, gives the others 5 ms, then keeps the loop
    busy for 20 ms (a CPU-heavy handler on the same loop): by the time a copy that was
    still connecting is sent, that cut is long past."""

    def __init__(self) -> None:
        self.cut_at = float("inf")

    def on_result(self, slot: int, result: object, now: float) -> float:
        if self.cut_at == float("inf"):
            self.cut_at = now + 0.005
            time.sleep(0.020)
        return self.cut_at


def test_a_copy_sent_after_the_cut_still_gets_its_window(
    cluster: LocalCluster, run: Runner
) -> None:
    from memsess import protocol
    from memsess.protocol import Version
    from memsess.transport import FirstReply
    from memsess.transport.aio import AsyncFanout

    async def body(store: AsyncSessionStore) -> None:
        pools = store._loop_pools()
        for _ in range(10):
            pools.close()  # server 1's connection is made anew each round...
            await AsyncFanout(pools, [(0, protocol.version())], FirstReply(1.0)).run()
            batch = [(0, protocol.version()), (1, protocol.version())]
            run = await AsyncFanout(pools, batch, SlowAfterFirstReply()).run()
            # ...and sent after the cut: it still gets 5 ms, plenty for a healthy server.
            assert isinstance(run.results[1], Version), run.results[1]

    run(cluster, body)
