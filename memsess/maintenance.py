"""The store's background thread: probes servers marked down, and repairs the copies
that writes could not store (hinted handoff), so no request ever pays for either.

A down server is probed once its retry interval has passed by writing its marker (the
version below which its copies may predate a write it missed, see memsess.plans); only
then is it marked up, so no request of this process reads it before its marker is there.
The thread starts when there is work and ends after a second without any.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from time import monotonic
from typing import Any, Final

from memsess._forksafe import renew_locks_after_fork
from memsess.cluster import Cluster
from memsess.errors import MemsessError
from memsess.plans import Flow, Plans
from memsess.protocol import Status

__all__ = ["MAX_HINTS", "Maintenance"]

log = logging.getLogger("memsess.store")

#: Sessions remembered for repair at most; past this the oldest hints are dropped
#: (reads still repair those copies when they find them).
MAX_HINTS: Final = 10_000
_IDLE_EXIT: Final = 1.0  # seconds without work before the thread ends
_HINTS_PER_ROUND: Final = 64  # repairs between two looks at the down servers


class Maintenance:
    """Probes and repairs for one store, on one lazily started daemon thread."""

    def __init__(self, cluster: Cluster, plans: Plans, run: Callable[[Flow[Any]], Any]) -> None:
        self._cluster = cluster
        self._plans = plans
        self._run = run
        self._hints: OrderedDict[bytes, set[int]] = OrderedDict()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        renew_locks_after_fork(self, "_cond", factory=threading.Condition)

    def hint(self, key: bytes, servers: list[int]) -> None:
        """The write of ``key`` could not store its copy on ``servers``."""
        with self._cond:
            missing = self._hints.pop(key, set())
            missing.update(servers)
            self._hints[key] = missing
            while len(self._hints) > MAX_HINTS:
                self._hints.popitem(last=False)
            self._ensure_running()
            self._cond.notify()

    def wake(self) -> None:
        """A server is down: make sure the thread runs, and looks again at when to probe."""
        with self._cond:
            self._ensure_running()
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread (work arriving later starts it again)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _ensure_running(self) -> None:
        # Under self._cond. A thread of the parent does not exist in a forked child:
        # is_alive() is then False, and the child starts its own. A store stays usable
        # after close(): new work starts a new thread.
        self._closed = False
        thread = self._thread
        if thread is None or not thread.is_alive():
            # The thread holds this object weakly: a store dropped without close() (a
            # test, a reloaded app) ends its thread instead of probing forever.
            self._thread = threading.Thread(
                target=_maintain, args=(weakref.ref(self),), name="memsess-maintenance", daemon=True
            )
            self._thread.start()

    def _round(self, idle_since: float) -> float | None:
        """Probe what is due, repair what is ready, wait for more; returns when the
        thread last worked, or None for it to end."""
        worked = self._probe_due() + self._repair_some()
        now = monotonic()
        if worked:
            idle_since = now
        next_probe = self._cluster.next_probe_at()
        with self._cond:
            if self._closed:
                return None
            if self._ready_hints():
                return idle_since
            # Hints wait for their servers to be up again (a suspect one may take a
            # while): the thread stays while any is left, looking once a second.
            if next_probe is None and not self._hints and now - idle_since >= _IDLE_EXIT:
                self._thread = None
                return None
            wake_at = idle_since + _IDLE_EXIT if next_probe is None else next_probe
            # Waited here, under the lock the check took: no notify() is lost between.
            self._cond.wait(max(0.0, min(wake_at - now, _IDLE_EXIT)))
            return idle_since

    def _probe_due(self) -> int:
        due = self._cluster.claim_due_probes(monotonic())
        for index in due:
            self._probe(index)
        return len(due)

    def _probe(self, index: int) -> None:
        cluster = self._cluster
        version = cluster.clock.tick()
        try:
            result = self._run(self._plans.mark(index, version))
        except MemsessError as exc:  # pragma: no cover - the plan returns its errors
            result = exc
        if result is Status.STORED:
            cluster.raise_trust_floor(index, version)
        elif not isinstance(result, MemsessError):
            result = MemsessError(f"marker not stored: {result}")
        cluster.record(index, result)

    def _ready_hints(self) -> list[bytes]:
        # Under self._cond: hints whose servers are all asked by requests again.
        usable = {i for i, status in enumerate(self._cluster.status()) if status.state == "up"}
        ready = [key for key, servers in self._hints.items() if servers <= usable]
        return ready[:_HINTS_PER_ROUND]

    def _repair_some(self) -> int:
        with self._cond:
            ready = self._ready_hints()
            for key in ready:
                del self._hints[key]
        for key in ready:
            try:
                self._run(self._plans.read(key, patient=True))  # repairs what lags
            except MemsessError as exc:
                log.debug("a background repair failed (a later read repairs it): %s", exc)
        return len(ready)


def _maintain(ref: weakref.ref[Maintenance]) -> None:
    """The thread: rounds of work and waits, while its Maintenance is alive."""
    idle_since = monotonic()
    while True:
        maintenance = ref()
        if maintenance is None:
            return
        worked_at = maintenance._round(idle_since)
        del maintenance  # between rounds the thread keeps no store alive
        if worked_at is None:
            return
        idle_since = worked_at
