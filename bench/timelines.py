"""Failover timelines: one client's web requests through each fault phase,
each request checked for a wrong answer.

A fresh local cluster of 3 per client; server 0 goes through the phases of
PHASES (steady, short stalls, hung, resumed, killed, restarted empty), each
``phase_seconds`` long, with requests paced at one every PACE seconds on
SESSIONS sessions. A request is a visit (load, save the next number), a
logout (load, delete; that user's next visit starts a new session, saved without a
load, as a request without a cookie is) or a
replay of a logged-out session's cookie (load, which must find nothing).
bench/failover.py runs it for every client and reports.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from bench.baselines import NaivePair, PymemcacheHash
from bench.common import (
    TTL,
    LocalCluster,
    addresses,
    local_cluster,
    memsess_store,
    pin_servers,
)
from memsess import SessionStore

__all__ = [
    "CLIENTS",
    "FAULTY",
    "HUNG",
    "LOGOUT_EVERY",
    "MEMSESS",
    "PHASES",
    "SESSIONS",
    "Phase",
    "Sample",
    "Timeline",
    "run_timeline",
]

FAULTY = 0  # index of the server that fails
SESSIONS = 200
PACE = 0.002  # seconds between request starts
MAX_REQUESTS_PER_PHASE = 20_000
#: One request in LOGOUT_EVERY is a logout and one a replay; prime to SESSIONS,
#: so the logouts fall on every session in turn.
LOGOUT_EVERY: Final = 23
REPLAY_TURN: Final = 11  # turn % LOGOUT_EVERY of a replay
MEMSESS: Final = "memsess r2"
#: At most this many stalls in a stall phase (fewer when the phase is short).
STALLS_PER_PHASE: Final = 3


@dataclass(frozen=True)
class Phase:
    name: str
    start: Callable[[LocalCluster], None]
    #: Seconds: when > 0, server FAULTY is stopped (SIGSTOP) this long, then
    #: resumed (SIGCONT), a few times during the phase.
    stall: float = 0.0


def _nothing(cluster: LocalCluster) -> None:
    return None


def _start_again(cluster: LocalCluster) -> None:
    cluster.start_server(FAULTY)
    pin_servers(cluster)


PHASES = (
    Phase("steady", _nothing),
    Phase("stalls 50 ms", _nothing, stall=0.05),
    Phase("stalls 150 ms", _nothing, stall=0.15),
    Phase("hung", lambda cluster: cluster.hang(FAULTY)),
    Phase("resumed", lambda cluster: cluster.resume(FAULTY)),
    Phase("killed", lambda cluster: cluster.kill(FAULTY)),
    Phase("restarted empty", _start_again),
)
HUNG: Final = next(number for number, phase in enumerate(PHASES) if phase.name == "hung")


class SessionClient(Protocol):
    def load(self, sid: str) -> dict[str, Any] | None: ...
    def save(self, sid: str, data: dict[str, Any]) -> None: ...
    def delete(self, sid: str) -> None: ...
    def close(self) -> None: ...


class _ByKey:
    """A pymemcache baseline addressed by session id (the id is the memcached key)."""

    def __init__(self, client: PymemcacheHash | NaivePair) -> None:
        self.client = client

    def load(self, sid: str) -> dict[str, Any] | None:
        return self.client.load(_key(sid))

    def save(self, sid: str, data: dict[str, Any]) -> None:
        self.client.save(_key(sid), data)

    def delete(self, sid: str) -> None:
        self.client.delete(_key(sid))

    def close(self) -> None:
        self.client.close()


def _key(sid: str) -> bytes:
    # Ids from SessionStore.new_id() are 43 URL-safe characters: a valid key as they are.
    return b"bench:" + sid.encode("ascii")


def _memsess(cluster: LocalCluster, timeout: float, retry: float) -> SessionClient:
    store: SessionStore = memsess_store(
        cluster, redundancy=2, timeout=timeout, retry_interval=retry
    )
    return store


def _hashclient(cluster: LocalCluster, timeout: float, retry: float) -> SessionClient:
    return _ByKey(PymemcacheHash(addresses(cluster), ttl=TTL, timeout=timeout, dead_timeout=retry))


def _naive(cluster: LocalCluster, timeout: float, retry: float) -> SessionClient:
    return _ByKey(NaivePair(addresses(cluster), ttl=TTL, timeout=timeout))


CLIENTS: dict[str, Callable[[LocalCluster, float, float], SessionClient]] = {
    MEMSESS: _memsess,
    "HashClient": _hashclient,
    "naive pair": _naive,
}


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the timeline started
    latency: float  # seconds, the whole request
    phase: int
    kind: str  # "visit", "logout" or "replay"
    lost: bool  # the session read as missing
    stale: bool  # read older than the last acknowledged save
    undone: bool  # a logged-out session read back (also stale)
    failed: bool  # the request raised

    @property
    def wrong(self) -> bool:
        return self.lost or self.stale or self.undone or self.failed


@dataclass
class Timeline:
    client: str
    samples: list[Sample] = field(default_factory=list)
    phase_starts: list[float] = field(default_factory=list)
    end: float = 0.0
    stalls: dict[int, list[float]] = field(default_factory=dict)  # phase: seconds of each stall


@dataclass
class _Users:
    """The users' sessions and what a correct read of each gives: the number
    of the last acknowledged save, or None where the session must read as
    missing (a new session before its first save)."""

    slots: list[str]
    expected: dict[str, int | None]
    logged_out: list[tuple[str, int]] = field(default_factory=list)  # (sid, phase) acknowledged
    replays: int = 0

    def replay_target(self, phase: int) -> str | None:
        """A session logged out in ``phase`` or the one before, round robin."""
        recent = [sid for sid, logged_out_in in self.logged_out if logged_out_in >= phase - 1]
        if not recent:
            return None
        self.replays += 1
        return recent[self.replays % len(recent)]

    def new_session(self, slot: int) -> None:
        """The user of ``slot`` comes back without a session (after a logout or an error)."""
        sid = SessionStore.new_id()
        self.slots[slot] = sid
        self.expected[sid] = None


class _Stalls:
    """Stops server FAULTY for ``length`` seconds a few times over ``seconds``,
    from a background thread. The main thread leaves the cluster alone until
    :meth:`join` (LocalCluster is driven from one thread at a time)."""

    def __init__(self, cluster: LocalCluster, length: float, seconds: float) -> None:
        self.cluster = cluster
        self.length = length
        # Each stall gets at least its own length of recovery before the next.
        self.count = max(1, min(STALLS_PER_PHASE, int(seconds / (2 * length))))
        self.period = seconds / self.count
        self.measured: list[float] = []
        self.error: BaseException | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stalls", daemon=True)

    def start(self) -> None:
        self._started = time.perf_counter()
        self._thread.start()

    def join(self) -> list[float]:
        """Stop scheduling stalls, wait for the one under way; the stall lengths."""
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"stalling server {FAULTY} failed") from self.error
        return self.measured

    def _run(self) -> None:
        try:
            for number in range(self.count):
                # A fifth of a period in: the phase has requests before every stall.
                due = self._started + (number + 0.2) * self.period
                if self._stop.wait(max(0.0, due - time.perf_counter())):
                    return
                self.cluster.hang(FAULTY)
                stopped = time.perf_counter()
                try:
                    time.sleep(self.length)
                finally:
                    self.cluster.resume(FAULTY)
                    self.measured.append(time.perf_counter() - stopped)
        except BaseException as exc:  # reported by join() in the main thread
            self.error = exc


def run_timeline(
    name: str, *, phase_seconds: float, timeout: float, retry: float, data: dict[str, Any]
) -> Timeline:
    """One client through every phase on a fresh cluster."""
    timeline = Timeline(name)
    with local_cluster(3) as cluster:
        client = CLIENTS[name](cluster, timeout, retry)
        try:
            sids = [SessionStore.new_id() for _ in range(SESSIONS)]
            for sid in sids:
                client.save(sid, data | {"seq": 0})
            users = _Users(sids, dict.fromkeys(sids, 0))
            origin = time.perf_counter()
            turns = itertools.count(1)
            for number, phase in enumerate(PHASES):
                phase.start(cluster)
                timeline.phase_starts.append(time.perf_counter() - origin)
                stalls = _Stalls(cluster, phase.stall, phase_seconds) if phase.stall else None
                if stalls is not None:
                    stalls.start()
                try:
                    for turn in _paced(turns, phase_seconds):
                        timeline.samples.append(
                            _request(client, users, data, turn=turn, phase=number, origin=origin)
                        )
                finally:
                    if stalls is not None:
                        timeline.stalls[number] = stalls.join()
            timeline.end = time.perf_counter() - origin
        finally:
            client.close()
            # Leave the server runnable so the cluster can stop it.
            cluster.resume(FAULTY)
    return timeline


def _paced(turns: Iterator[int], seconds: float) -> Iterator[int]:
    """The next turns, each yielded when its request is due: one every PACE
    seconds, for ``seconds``; a request that runs late is not made up for."""
    start = next_at = time.perf_counter()
    for turn in itertools.islice(turns, MAX_REQUESTS_PER_PHASE):
        now = time.perf_counter()
        if now - start >= seconds:
            return
        if next_at > now:
            time.sleep(next_at - now)
        next_at = max(next_at + PACE, time.perf_counter())
        yield turn


def _request(
    client: SessionClient,
    users: _Users,
    data: dict[str, Any],
    *,
    turn: int,
    phase: int,
    origin: float,
) -> Sample:
    """One web request of the kind ``turn`` calls for; a visit saves ``turn`` as
    its number. Updates ``users`` with what a correct read gives from now on."""
    slot = turn % SESSIONS
    kind = "logout" if turn % LOGOUT_EVERY == 0 else "visit"
    sid = users.slots[slot]
    if turn % LOGOUT_EVERY == REPLAY_TURN:
        replayed = users.replay_target(phase)
        if replayed is not None:
            kind, sid = "replay", replayed
    expected = None if kind == "replay" else users.expected[sid]
    t0 = time.perf_counter()
    lost = stale = failed = False
    try:
        # A user without a session sends no cookie: nothing to load (as the adapters do).
        fresh = kind == "visit" and expected is None
        loaded = None if fresh else client.load(sid)
        lost = loaded is None and expected is not None
        stale = loaded is not None and (expected is None or loaded.get("seq", -1) < expected)
        if kind == "logout":
            client.delete(sid)
        elif kind == "visit":
            client.save(sid, (loaded or data) | {"seq": turn})
    except Exception:
        failed = True
    t1 = time.perf_counter()
    if kind == "visit" and not failed:
        users.expected[sid] = turn
    elif kind == "visit" and expected is None:
        # A new session whose first save failed may or may not exist: start over.
        users.new_session(slot)
    elif kind == "logout":
        if not failed:
            users.logged_out.append((sid, phase))
        # A failed logout's outcome is unknown: that id is not checked again.
        users.new_session(slot)
    # A failed save of a known session leaves either number a right answer:
    # reads are checked against the last acknowledged one, a lower bound.
    undone = stale and kind == "replay"
    return Sample(t0 - origin, t1 - t0, phase, kind, lost, stale and not undone, undone, failed)
