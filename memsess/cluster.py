"""Placement and health: the ketama ring, replica sets, and fan-out with health updates.

The ring is static: a server that is down stays on it and is skipped, so no
key silently moves to a server that never had it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from time import monotonic

from uhashring import HashRing

from memsess.dsn import ServerSpec
from memsess.errors import ConnectError, MemsessError, NoServerAvailableError, TimeoutError
from memsess.health import (
    DEFAULT_FAILURE_THRESHOLD,
    Health,
    State,
    claim_probe,
    on_failure,
    on_success,
)
from memsess.metrics import Metrics
from memsess.protocol import Command
from memsess.transport import (
    DEFAULT_STRAGGLER_WINDOW,
    DatagramLostError,
    Result,
    ServerPool,
    UdpPool,
    UdpRoutes,
    fanout,
)

__all__ = ["Cluster", "ServerStatus"]

log = logging.getLogger("memsess.cluster")

# Replica sets memoized per key: a request looks its key up for the load and
# again for the save; 64k recent keys cost a few MB at most.
_REPLICA_CACHE_SIZE = 65536


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """One server as :meth:`SessionStore.health` reports it."""

    address: str
    state: str  # "up", "suspect", "down" or "probing"
    failures: int  # consecutive failures
    reason: str  # the last failure, "" when none
    retry_in: float | None  # seconds until a down server is probed again
    weight: int
    udp: str = "n/a"  # session reads: "on" (over UDP), "off (<why>; retried in <s> s)", "n/a"


class Cluster:
    """The servers of one DSN, their pools and their shared health table."""

    def __init__(
        self,
        servers: Sequence[ServerSpec],
        *,
        redundancy: int,
        straggler_window: float = DEFAULT_STRAGGLER_WINDOW,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        metrics: Metrics | None = None,
    ) -> None:
        if not servers:
            raise ValueError("a cluster needs at least one server")
        if not 1 <= redundancy <= len(servers):
            raise ValueError(
                f"redundancy={redundancy} needs at least that many servers;"
                f" the DSN has {len(servers)}"
            )
        if straggler_window < 0:
            raise ValueError(f"straggler_window must be >= 0 seconds, got {straggler_window}")
        self.servers = tuple(servers)
        self.redundancy = redundancy
        self.straggler_window = straggler_window
        self.failure_threshold = failure_threshold
        self.metrics = Metrics() if metrics is None else metrics
        self.pools = tuple(ServerPool(spec) for spec in self.servers)
        # Gets to a server with a udp_port go over UDP; everything else over its pool.
        self.udp_pools = tuple(
            None if spec.udp_port is None else UdpPool(spec) for spec in self.servers
        )
        routes = {p: u for p, u in zip(self.pools, self.udp_pools, strict=True) if u is not None}
        self._routes = UdpRoutes(routes, straggler_window=straggler_window) if routes else None
        self._health = [Health(since=monotonic()) for _ in self.servers]
        self._last_reply = [float("-inf")] * len(self.servers)  # monotonic seconds
        self._lock = threading.Lock()
        ring = HashRing(
            nodes={spec.name: {"weight": spec.weight} for spec in self.servers},
            hash_fn="ketama",
        )
        position = {spec.name: index for index, spec in enumerate(self.servers)}

        @lru_cache(maxsize=_REPLICA_CACHE_SIZE)
        def replica_set(key: str) -> tuple[int, ...]:
            nodes = ring.range(key, size=redundancy, unique=True)
            return tuple(position[node["nodename"]] for node in nodes)

        # The ring is built once and never changed, so reading it from many
        # threads at once is safe (uhashring is not safe to mutate).
        self.replica_set = replica_set

    def targets(self, key: str) -> list[int]:
        """The servers of ``key``'s replica set to ask now: usable ones, plus a
        down one whose retry interval has passed (as a probe)."""
        members = self.replica_set(key)
        health = self._health
        chosen = [i for i in members if health[i].usable]
        if len(chosen) < len(members):
            chosen = self._with_probes(members)
        if not chosen:
            raise NoServerAvailableError(
                "every server of this session's replica set is down: "
                + ", ".join(f"{self.servers[i].name} ({health[i].reason})" for i in members)
            )
        return chosen

    def execute(self, batch: Sequence[tuple[int, Command]]) -> list[Result]:
        """Run one command per server at once; update health from the outcomes."""
        pools = self.pools
        results = fanout(
            [pools[index] for index, _ in batch],
            [command for _, command in batch],
            straggler_window=self.straggler_window,
            exchange_factory=self._routes,
        )
        health = self._health
        last_reply = self._last_reply
        now = monotonic()
        for (index, _), result in zip(batch, results, strict=True):
            if isinstance(result, DatagramLostError):
                continue  # a lost datagram says nothing about the server
            failed = isinstance(result, MemsessError)
            if not failed:
                last_reply[index] = now  # a float store: atomic, no lock needed
            if failed or health[index].failures or not health[index].usable:
                self._record(index, result)
        return results

    def status(self) -> list[ServerStatus]:
        now = monotonic()
        with self._lock:
            table = list(self._health)
        return [
            ServerStatus(
                address=spec.name,
                state=h.state.value,
                failures=h.failures,
                reason=h.reason,
                retry_in=max(0.0, h.retry_at - now) if h.state is State.DOWN else None,
                weight=spec.weight,
                udp="n/a" if udp is None else udp.status(now),
            )
            for spec, h, udp in zip(self.servers, table, self.udp_pools, strict=True)
        ]

    def close(self) -> None:
        for pool in self.pools:
            pool.clear()
        for udp_pool in self.udp_pools:
            if udp_pool is not None:
                udp_pool.clear()

    def _with_probes(self, members: tuple[int, ...]) -> list[int]:
        now = monotonic()
        chosen = []
        with self._lock:
            for index in members:
                health = self._health[index]
                if health.usable:
                    chosen.append(index)
                    continue
                probing = claim_probe(health, now, probe_timeout=self.servers[index].timeout * 2)
                if probing is not None:
                    self._health[index] = probing
                    chosen.append(index)
        return chosen

    def _record(self, index: int, result: Result) -> None:
        spec = self.servers[index]
        now = monotonic()
        with self._lock:
            before = self._health[index]
            if isinstance(result, MemsessError):
                after = on_failure(
                    before,
                    now,
                    reason=str(result),
                    retry_interval=spec.retry_interval,
                    immediate=isinstance(result, ConnectError) and result.refused,
                    threshold=self.failure_threshold,
                    last_reply=self._last_reply[index],
                )
            else:
                after = on_success(before, now)
            self._health[index] = after
        if after.state is not before.state:
            # A failed probe (probing -> down) repeats every retry interval while
            # a server stays down: neither a change worth counting nor logging.
            if not (before.state is State.PROBING and after.state is State.DOWN):
                self.metrics.add("server_state_changes")
            _log_transition(spec, before, after, result)


def _log_transition(spec: ServerSpec, before: Health, after: Health, result: Result) -> None:
    if after.state is State.DOWN and before.state is not State.PROBING:
        log.warning(
            "memcached %s marked down (%s); retried in %g s",
            spec.name,
            after.reason,
            spec.retry_interval,
        )
    elif after.state is State.UP and before.state in (State.DOWN, State.PROBING):
        log.info("memcached %s is back up", spec.name)
    elif after.state is State.SUSPECT and isinstance(result, TimeoutError):
        log.info("memcached %s is slow: %s", spec.name, after.reason)
