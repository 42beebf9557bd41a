"""One test, both drivers: :class:`BlockingAsync` puts SessionStore's blocking API in
front of an AsyncSessionStore, so that a test written against the blocking store (the
fault tests, the nemesis's workers) drives the asyncio store just the same."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

from memsess import AsyncSessionStore, SessionStore

DRIVERS = ["sync", "async"]


def store_for(driver: str, dsn: str | Sequence[str], **options: Any) -> SessionStore:
    """A SessionStore, or (``driver`` "async") an AsyncSessionStore behind BlockingAsync."""
    if driver == "async":
        # Typed as what it stands in for: tests written for SessionStore drive it as one.
        return BlockingAsync(AsyncSessionStore.from_dsn(dsn, **options))  # type: ignore[return-value]
    if driver != "sync":
        raise ValueError(f"no such driver: {driver!r}")
    return SessionStore.from_dsn(dsn, **options)


class BlockingAsync:
    """An AsyncSessionStore behind SessionStore's blocking API, so that one test runs on
    both drivers: each call runs the coroutine to its end on the calling thread's own
    event loop (one loop per thread: a threaded test uses one store from several loops).
    Everything else is the async store's own attribute."""

    def __init__(self, store: AsyncSessionStore) -> None:
        self.store = store
        self._loops: dict[int, asyncio.AbstractEventLoop] = {}
        self._lock = threading.Lock()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        thread = threading.get_ident()
        with self._lock:
            loop = self._loops.get(thread)
            if loop is None:
                loop = self._loops[thread] = asyncio.new_event_loop()
        return loop.run_until_complete(coroutine)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.store, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        def blocking(*args: Any, **kwargs: Any) -> Any:
            return self.run(attribute(*args, **kwargs))

        return blocking

    def close(self) -> None:
        # Each loop closes its own connections (none is running now: any thread may).
        for loop in self._loops.values():
            loop.run_until_complete(self.store.aclose())
            loop.close()
        self._loops.clear()

    def __enter__(self) -> BlockingAsync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
