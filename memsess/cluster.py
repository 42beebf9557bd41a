"""Placement and health: the ketama ring, replica sets, and running a batch of commands
with health, round-trip times and trust floors updated from the outcomes.

The ring is static: a server that is down stays on it and is skipped, so no key silently
moves to a server that never had it. A down server is never asked by a request; the
store's maintenance thread probes it (:meth:`Cluster.claim_due_probes`). A server whose
host does not resolve when the cluster is made is such a down server: the maintenance
thread looks it up again before each probe, so no DNS lookup sits in a request.
"""

from __future__ import annotations

import hashlib
import logging
import math
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from time import monotonic

from uhashring import HashRing

from memsess._forksafe import fork_safe_lock
from memsess.dsn import ServerSpec
from memsess.errors import ConnectError, MemsessError, NoServerAvailableError, TimeoutError
from memsess.health import (
    DEFAULT_FAILURE_THRESHOLD,
    Health,
    State,
    claim_probe,
    on_failure,
    on_success,
    straggler_window,
)
from memsess.metrics import Metrics
from memsess.protocol import DEFAULT_MAX_VALUE_SIZE, Command, ErrorReply, Status, Values, Version
from memsess.records import VersionClock
from memsess.transport import (
    DatagramLostError,
    Fanout,
    Ran,
    Result,
    ServerPool,
    UdpPool,
    UdpRoutes,
    WaitRule,
)
from memsess.transport.tls import TlsClient

__all__ = ["Cluster", "ServerStatus", "check_straggler_window"]

# Batches between two recomputations of every server's straggler windows.
_WINDOW_REFRESH = 64
# The round trip assumed before the first reply (seconds): a LAN's, well under any floor.
_PRIOR_RTT = 0.0005
# The classes of a server's reply (not an error): the fast path of Cluster.execute.
_REPLIES = frozenset({Values, Status, Version, ErrorReply})

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
    """The servers of one DSN, their pools, and what this process knows of each: health,
    round-trip times, and its *trust floor* — the version below which a copy read from it
    may predate a write it missed (raised at each failure), so cannot decide a read alone.
    """

    def __init__(
        self,
        servers: Sequence[ServerSpec],
        *,
        redundancy: object,  # an int, checked below: typed int, mypyc's own check would word it
        clock: VersionClock | None = None,
        straggler_window: float | None = None,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        metrics: Metrics | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
    ) -> None:
        """``max_value_size``: the longest value in bytes a reply may carry (the store's
        item size): a longer one is refused before it is buffered."""
        if not servers:
            raise ValueError("a cluster needs at least one server")
        if isinstance(redundancy, bool) or not isinstance(redundancy, int):
            raise TypeError(
                f"redundancy must be a whole number of copies, not {type(redundancy).__name__}"
            )
        if not 1 <= redundancy <= len(servers):
            raise ValueError(
                f"redundancy={redundancy} needs at least that many servers;"
                f" the DSN has {len(servers)}"
            )
        if straggler_window is not None:
            check_straggler_window(straggler_window)
        self.servers = tuple(servers)
        self.redundancy = redundancy
        self.fixed_window = straggler_window
        self.failure_threshold = failure_threshold
        self.clock = VersionClock() if clock is None else clock
        self.metrics = Metrics() if metrics is None else metrics
        self.pools = tuple(
            ServerPool(
                spec, tls=TlsClient.for_server(spec, ssl_context), max_value_size=max_value_size
            )
            for spec in self.servers
        )
        # Gets to a server with a udp_port go over UDP; everything else over its pool.
        self.udp_pools = tuple(
            None if spec.udp_port is None else UdpPool(spec, max_value_size=max_value_size)
            for spec in self.servers
        )
        routes = {p: u for p, u in zip(self.pools, self.udp_pools, strict=True) if u is not None}
        self.has_udp = bool(routes)
        #: Which reads go over UDP (None: no server has a UDP port), for every driver.
        self.routes = UdpRoutes(routes, straggler_window=straggler_window) if routes else None
        count = len(self.servers)
        self._health = [self._first_health(index, monotonic()) for index in range(count)]
        self._last_reply = [float("-inf")] * count  # monotonic seconds
        # Seconds; a prior of a LAN's round trip until replies say otherwise.
        self._srtt = [_PRIOR_RTT] * count
        self._rttvar = [_PRIOR_RTT / 2] * count
        # UP without a failure: no health to record on a reply.
        self._clean = [health.state is State.UP for health in self._health]
        #: Per server, the straggler windows (seconds) the plans use: recomputed after a
        #: change of health and every _WINDOW_REFRESH batches (round trips drift slowly).
        self.read_windows = [0.0] * count
        self.write_windows = [0.0] * count
        self._batches = 0
        #: Per server, the version below which its copies need another copy's word: as
        #: this process saw it fail, and as its marker said when last read (and when).
        self.trust_floor = [0] * count
        self.marker_floor = [0] * count
        self.marker_due = [0.0] * count  # monotonic seconds
        #: Called (outside any lock) when a server is marked down: the store wakes the
        #: thread that probes it.
        self.on_down: Callable[[], None] = lambda: None
        self._lock = fork_safe_lock()
        self.replica_set = _replica_sets(self.servers, redundancy)
        self.refresh_windows()

    def _first_health(self, index: int, now: float) -> Health:
        """Up, or down and due for a probe at once when its host did not resolve (a DNS
        hiccup at start-up must not stop the app from starting)."""
        unresolved = self.resolve(index, lookup=False)
        if unresolved is None:
            return Health(since=now)
        log.warning(
            "%s; marked down, looked up again in the background every %g s",
            unresolved,
            self.servers[index].retry_interval,
        )
        return Health(State.DOWN, 1, now, str(unresolved), now)

    def resolve(self, index: int, *, lookup: bool = True) -> MemsessError | None:
        """Why server ``index`` has no address yet (its host did not resolve), or None.
        With ``lookup``, look its host up again first: a blocking DNS lookup, made only
        by the maintenance thread (:meth:`claim_due_probes`)."""
        udp = self.udp_pools[index]
        for pool in (self.pools[index], udp) if udp is not None else (self.pools[index],):
            error = pool.resolve() if lookup else pool.unresolved
            if error is not None:
                return error
        return None

    def targets(self, key: str) -> list[int]:
        """The servers of ``key``'s replica set to ask now: those not marked down."""
        members = self.replica_set(key)
        health = self._health
        chosen = [i for i in members if health[i].usable]
        if not chosen:
            raise NoServerAvailableError(
                "every server of this session's replica set is down: "
                + ", ".join(f"{self.servers[i].name} ({health[i].reason})" for i in members)
            )
        return chosen

    def refresh_windows(self, index: int | None = None) -> None:
        """Recompute the straggler windows the plans read (:attr:`read_windows`,
        :attr:`write_windows`) of server ``index``, or of all."""
        for i in range(len(self.servers)) if index is None else (index,):
            self.read_windows[i] = self.window(i, write=False)
            self.write_windows[i] = self.window(i, write=True)

    def window(self, index: int, *, write: bool) -> float:
        """Seconds server ``index`` gets once the other answers are conclusive: the
        ``straggler_window`` override, else adapted to its latency and state."""
        if self.fixed_window is not None:
            return self.fixed_window
        return straggler_window(
            self._health[index],
            self._srtt[index],
            self._rttvar[index],
            write=write,
            timeout=self.servers[index].timeout,
        )

    def execute(
        self, batch: Sequence[tuple[int, Command]], rule: WaitRule, record: bool = True
    ) -> list[Result]:
        """Run one command per server at once under ``rule``; update health, round-trip
        times and trust floors from the outcomes (health only with ``record``)."""
        pools = self.pools
        run = Fanout(
            [pools[index] for index, _ in batch],
            [command for _, command in batch],
            rule,
            self.routes,
        ).run()
        return self.account(batch, run, record)

    def account(self, batch: Sequence[tuple[int, Command]], run: Ran, record: bool) -> list[Result]:
        """Update health, round-trip times and trust floors from a batch run by any driver
        (``run``: its results, latencies and exchanges); returns the results."""
        results: list[Result] = run.results  # type: ignore[assignment]  # all filled
        exchanges = run.exchanges
        clean = self._clean
        srtts, rttvars = self._srtt, self._rttvar
        now = monotonic()
        self._batches = batches = (self._batches + 1) % _WINDOW_REFRESH
        if not batches:
            self.refresh_windows()
        for slot, (index, _) in enumerate(batch):
            result = results[slot]
            if result.__class__ not in _REPLIES or exchanges[slot].retried:
                self._account(index, result, exchanges[slot].retried, record=record)
                continue
            # A reply. Float stores, each atomic: no lock (a sample lost in a race is
            # harmless). RFC 6298's update (section 2), inlined: every reply runs it.
            self._last_reply[index] = now
            srtt = srtts[index]
            rttvar = rttvars[index]
            diff = run.latency[slot] - srtt
            srtts[index] = srtt + diff / 8
            rttvars[index] = rttvar + ((diff if diff > 0 else -diff) - rttvar) / 4
            if record and not clean[index]:
                self.record(index, result)
        return results

    def _account(self, index: int, result: Result, reset: bool, *, record: bool) -> None:
        """The uncommon outcomes of one server: an error, or a reply after a reset."""
        if isinstance(result, MemsessError):
            if isinstance(result, TimeoutError) and result.straggler:
                self.metrics.add("straggler_drops")
            self.metrics.add("failovers")
        if isinstance(result, DatagramLostError):
            return  # a lost datagram says nothing about the server
        if reset or isinstance(result, MemsessError):
            # A failure, or a pooled connection gone stale (the server may have restarted,
            # empty): its copies may predate a write it missed.
            self.raise_trust_floor(index)
        if not isinstance(result, MemsessError):
            self._last_reply[index] = monotonic()
        if record:
            self.record(index, result)

    def raise_trust_floor(self, index: int, version: int | None = None) -> None:
        """From now on a copy on server ``index`` older than ``version`` (default: now)
        does not decide a read alone."""
        version = self.clock.tick() if version is None else version
        with self._lock:
            self.trust_floor[index] = max(self.trust_floor[index], version)

    # -- down servers and their probes ----------------------------------------------------

    def next_probe_at(self) -> float | None:
        """Monotonic time the first down server is due for a probe; None if none is down."""
        due = [h.retry_at for h in self._health if h.state in (State.DOWN, State.PROBING)]
        return min(due) if due else None

    def claim_due_probes(self, now: float) -> list[int]:
        """The down servers whose retry interval has passed, marked PROBING, to probe.

        Called by the maintenance thread only: a server whose host has not resolved yet
        is looked up here, and if it still does not resolve, it is down again for its
        retry interval (a failed probe) and not returned."""
        claimed = []
        with self._lock:
            for index, health in enumerate(self._health):
                probing = claim_probe(
                    health, now, probe_timeout=self.servers[index].timeout * 2 + 1
                )
                if probing is not None:
                    self._health[index] = probing
                    self._clean[index] = False
                    claimed.append(index)
        ready = []
        for index in claimed:
            unresolved = self.resolve(index)  # outside the lock: DNS may take a while
            if unresolved is None:
                ready.append(index)
            else:
                self.record(index, unresolved)
        return ready

    def record(self, index: int, result: Result) -> None:
        """Update server ``index``'s health from one outcome."""
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
            self._clean[index] = after.state is State.UP and not after.failures
        if after.state is not before.state:
            self.refresh_windows(index)
        if after.state is not before.state:
            # A failed probe (probing -> down) repeats every retry interval while
            # a server stays down: neither a change worth counting nor logging.
            if not (before.state is State.PROBING and after.state is State.DOWN):
                self.metrics.add("server_state_changes")
            _log_transition(spec, before, after, result)
            if after.state is State.DOWN:
                self.on_down()

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


def check_straggler_window(seconds: object) -> float:
    """``seconds`` if it is a straggler window: a finite number of seconds >= 0."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(
            f"straggler_window must be a number of seconds, not {type(seconds).__name__}"
        )
    if not (0 <= seconds < math.inf):  # also False for NaN
        raise ValueError(
            f"straggler_window must be a finite number of seconds >= 0, got {seconds!r}"
        )
    return seconds


def _replica_sets(
    servers: tuple[ServerSpec, ...], redundancy: int
) -> Callable[[str], tuple[int, ...]]:
    ring = HashRing(
        nodes={spec.name: {"weight": spec.weight} for spec in servers},
        hash_fn="ketama",
    )
    position = {spec.name: index for index, spec in enumerate(servers)}
    names = [spec.name.encode() for spec in servers]

    @lru_cache(maxsize=_REPLICA_CACHE_SIZE)
    def replica_set(key: str) -> tuple[int, ...]:
        members = [
            position[node["nodename"]] for node in ring.range(key, size=redundancy, unique=True)
        ]
        if len(members) < redundancy:
            # Skewed weights (weight=100 beside 1) can leave a server with no point on
            # the ring at all, and ring.range then returns fewer distinct servers than
            # asked: fill up by rendezvous hashing, so each key still gets `redundancy`
            # distinct servers, always the same ones.
            rest = sorted(
                (i for i in range(len(servers)) if i not in members),
                key=lambda i: hashlib.blake2b(names[i] + key.encode(), digest_size=8).digest(),
            )
            members += rest[: redundancy - len(members)]
        return tuple(members)

    # The ring is built once and never changed, so reading it from many threads at once
    # is safe (uhashring is not safe to mutate).
    return replica_set


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
