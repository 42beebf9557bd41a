"""AsyncSessionStore: the session store for asyncio, the same plans (memsess.plans) as
the blocking SessionStore run by an event loop's driver (memsess.transport.aio).

No thread pool: every request's I/O is non-blocking on the calling task's loop, each
command fanned out to every copy at once, under the same deadlines, rules, straggler
windows, health table and UDP reads as the blocking store. Only the probes of down
servers and the background repairs run on the store's maintenance thread, as they do
for the blocking store; no request waits for them.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import weakref
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from memsess._forksafe import renew_locks_after_fork
from memsess.plans import Flow
from memsess.store import DEFAULT_LOCK_LEASE, DEFAULT_LOCK_WAIT, Snapshot, StoreCore
from memsess.transport.aio import AsyncFanout, LoopPools
from memsess.transport.pool import reset_after_fork

__all__ = ["AsyncSessionLock", "AsyncSessionStore"]

T = TypeVar("T")


class AsyncSessionStore(StoreCore):
    """Sessions in a cluster of memcached servers, ``redundancy`` copies each, for
    asyncio: the API and options of :class:`memsess.SessionStore`, with every method
    that talks to the servers a coroutine (load, fetch, save, touch, delete,
    regenerate, aclose; ``async with``). What does no I/O stays a plain call:
    from_dsn, from_store, new_id, locate, health, stats.

    Safe for any number of concurrent tasks. Connections belong to the event loop that
    opened them (one pool per loop), so one store may serve several loops, e.g. one per
    thread; a task cancelled in the middle of an operation closes the connections it
    was waiting on, so no reply is left behind to be misread.
    """

    def _shared_init(self) -> None:
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopPools] = (
            weakref.WeakKeyDictionary()
        )
        self._loops_lock = threading.Lock()
        renew_locks_after_fork(self, "_loops_lock")
        reset_after_fork(self)
        # The pools of the loop used last, as one tuple so that another thread's loop
        # replacing it is atomic; the loop held weakly, as in _loops.
        self._current: tuple[weakref.ref[asyncio.AbstractEventLoop], LoopPools] | None = None

    def _forget_after_fork(self) -> None:
        # A forked child must not share sockets with its parent (a reply meant for one
        # could be read by the other), nor use the parent's loops: their pools are
        # dropped, the child's copies of their sockets closed (that sends nothing: the
        # parent still holds them open).
        for pools in list(self._loops.values()):
            pools.forget()
        self._loops = weakref.WeakKeyDictionary()
        self._current = None

    # -- the public API --------------------------------------------------------

    async def load(self, sid: str) -> dict[str, Any] | None:
        """The session's data, or None when absent, expired, logged out or not a valid
        id; see :meth:`memsess.SessionStore.load`."""
        return await self._arun(self._ops.load(sid))

    async def fetch(self, sid: str) -> Snapshot | None:
        """Like :meth:`load`, with the version and CAS tokens for a conditional save."""
        return await self._arun(self._ops.fetch(sid))

    async def save(
        self,
        sid: str,
        data: Mapping[str, Any],
        *,
        ttl: float | None = None,
        snapshot: Snapshot | None = None,
        on_conflict: str = "error",
    ) -> None:
        """Store ``data`` on every live copy; see :meth:`memsess.SessionStore.save`."""
        await self._arun(self._ops.save(sid, data, ttl, snapshot, on_conflict))

    async def touch(self, sid: str, *, ttl: float | None = None) -> bool:
        """Extend the lifetime of every copy; see :meth:`memsess.SessionStore.touch`."""
        return await self._arun(self._ops.touch(sid, ttl))

    async def delete(self, sid: str) -> None:
        """Log out; see :meth:`memsess.SessionStore.delete`."""
        await self._arun(self._ops.delete(sid))

    async def regenerate(
        self,
        sid: str,
        data: Mapping[str, Any] | None = None,
        *,
        ttl: float | None = None,
        snapshot: Snapshot | None = None,
    ) -> str:
        """Move the session to a new id; see :meth:`memsess.SessionStore.regenerate`."""
        return await self._arun(self._regenerate(sid, data, ttl, snapshot))

    def lock(
        self, sid: str, *, lease: float = DEFAULT_LOCK_LEASE, wait: float = DEFAULT_LOCK_WAIT
    ) -> AsyncSessionLock:
        """The session's lock (``async with store.lock(sid): ...``); see
        :meth:`memsess.SessionStore.lock`."""
        return AsyncSessionLock(self, sid, lease=lease, wait=wait)

    async def aclose(self) -> None:
        """Close this loop's idle connections (and those of loops already closed) and
        stop the background thread. The store can still be used afterwards.

        A loop still running in another thread keeps its connections until
        ``aclose()`` is awaited there: they are that loop's to close."""
        self._maintenance.close()
        self._cluster.close()
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            pools = self._loops.pop(loop, None)
            if pools is not None:
                pools.close()
            self._forget_closed_loops()
            self._current = None

    def _forget_closed_loops(self) -> None:
        # Under _loops_lock. A loop's transports refer to it, so its entry would never
        # leave the weak dictionary by itself (a web server that runs each request on a
        # loop of its own, like async_to_sync, would pile them up): closed loops go here,
        # with their sockets.
        for other in [other for other in self._loops if other.is_closed()]:
            self._loops.pop(other).close()

    async def __aenter__(self) -> AsyncSessionStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the asyncio driver -------------------------------------------------------------

    async def _arun(self, flow: Flow[T]) -> T:
        """Run each step of a plan as one fan-out on the running loop."""
        pools = self._loop_pools()
        if pools.closer is None:
            await _close_at_shutdown(pools)
        cluster = self._cluster
        routes = cluster.routes
        try:
            step = next(flow)
            while True:
                if step.pause:
                    await asyncio.sleep(step.pause)
                batch = step.batch
                run = await AsyncFanout(pools, batch, step.rule, routes=routes).run()
                step = flow.send(cluster.account(batch, run, step.record))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            flow.close()  # cancelled mid-plan: the plan ends here too

    def _loop_pools(self) -> LoopPools:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "AsyncSessionStore's methods are awaited on a running event loop;"
                " memsess.SessionStore is the blocking store"
            ) from None
        current = self._current
        if current is not None and current[0]() is loop:
            return current[1]
        with self._loops_lock:
            pools = self._loops.get(loop)
            if pools is None:
                self._forget_closed_loops()
                cluster = self._cluster
                pools = LoopPools(loop, cluster.pools, on_reset=cluster.raise_trust_floor)
                self._loops[loop] = pools
            self._current = (weakref.ref(loop), pools)
        return pools


class AsyncSessionLock:
    """:class:`memsess.store.SessionLock`, awaited."""

    def __init__(self, store: AsyncSessionStore, sid: str, *, lease: float, wait: float) -> None:
        self.store, self.sid, self.lease, self.wait = store, sid, lease, wait
        self.token = secrets.token_hex(16).encode("ascii")
        self.held = False

    async def acquire(self) -> None:
        await self.store._arun(self.store._lock(self.sid, self.token, self.lease, self.wait))
        self.held = True

    async def release(self) -> None:
        if self.held:
            self.held = False
            await self.store._arun(self.store._unlock(self.sid, self.token))

    async def __aenter__(self) -> AsyncSessionLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


async def _close_at_shutdown(pools: LoopPools) -> None:
    """Have ``pools`` closed when its loop shuts down. asyncio.run() and asgiref's
    async_to_sync (a loop per request under WSGI) close every async generator that is
    still open on the loop before closing it (``loop.shutdown_asyncgens()``); this one
    waits for that, then closes the connections while the loop can still do so."""

    async def until_shutdown() -> AsyncIterator[None]:
        try:
            yield
        finally:
            pools.close()

    closer = until_shutdown()
    pools.closer = closer  # the loop keeps only a weak reference to it
    await closer.__anext__()  # started on this loop: the loop now knows it
