"""Counters a store keeps about itself, readable with ``store.stats()`` and,
with the optional ``prometheus_client``, exported as Prometheus metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from memsess._forksafe import renew_locks_after_fork

__all__ = ["COUNTERS", "Metrics", "register_prometheus"]

#: Every counter, with what it counts (also the Prometheus help text).
COUNTERS: Final[Mapping[str, str]] = {
    "loads": "session loads (load and fetch calls that reached the servers)",
    "hits": "loads that found a session",
    "misses": "loads that found no session (absent, expired or logged out)",
    "saves": "session saves",
    "touches": "session touches",
    "deletes": "session deletes (logouts)",
    "repairs": "stale, missing or corrupt copies rewritten by a read",
    "corrupt_records": "copies that could not be decoded",
    "partial_writes": "writes that reached fewer copies than the redundancy",
    "straggler_drops": "requests to a server cut off after the other copies answered",
    "failovers": "requests served without one of their copies (down or failed)",
    "server_state_changes": "servers marked down, back up or suspect",
    "conflicts": "conditional saves that found the session saved elsewhere since its load",
    "merge_overwrites": "keys a merged save changed that the other save had changed too",
    "locks": "session locks taken",
    "lock_timeouts": "session locks not had within their wait",
}


class Metrics:
    """Monotonic counters, named as in :data:`COUNTERS`; safe to share between
    threads and across a fork (a child starts from the parent's counts)."""

    __slots__ = ("__weakref__", "_lock", "_values")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTERS, 0)
        renew_locks_after_fork(self, "_lock")

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def add_both(self, first: str, second: str) -> None:
        """Add one to each of two counters, under one lock (a load and its hit)."""
        with self._lock:
            values = self._values
            values[first] += 1
            values[second] += 1

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter at this moment."""
        with self._lock:
            return dict(self._values)


def register_prometheus(
    stats: Callable[[], Mapping[str, int]],
    *,
    registry: Any = None,
    namespace: str = "memsess",
    labels: Mapping[str, str] | None = None,
) -> Any:
    """Expose ``stats()`` (e.g. ``store.stats``) as Prometheus counters
    ``memsess_<name>_total``, read at each scrape. Needs the ``prometheus``
    extra (``pip install memsess[prometheus]``); returns the collector."""
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily
    except ImportError as exc:  # pragma: no cover - exercised where the extra is absent
        raise ImportError(
            "Prometheus export needs prometheus_client: pip install 'memsess[prometheus]'"
        ) from exc
    label_names = sorted(labels or {})
    label_values = [str((labels or {})[name]) for name in label_names]

    class _Collector:
        def collect(self) -> Iterator[Any]:
            values = stats()
            for name, help_text in COUNTERS.items():
                family = CounterMetricFamily(f"{namespace}_{name}", help_text, labels=label_names)
                family.add_metric(label_values, values.get(name, 0))
                yield family

    collector = _Collector()
    (REGISTRY if registry is None else registry).register(collector)
    return collector
