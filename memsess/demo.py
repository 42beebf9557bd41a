"""``memsess demo``: 1000 sessions on a local cluster of 3, through each single fault.

For every fault it counts what a user would notice: sessions lost, stale
reads, logged-out sessions that came back, and the slowest request. With
``--secure`` the servers speak TLS only and want a password (memcached -Z -Y),
the records are sealed, and every stored byte is searched for session data.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from memsess.store import SessionStore
from memsess.testing import LocalCluster

__all__ = ["Scenario", "run_demo"]

SESSIONS = 1000
REDUNDANCY = 2
FAULTY = 0  # index of the server that suffers the fault
RETRY_INTERVAL = 1.0  # seconds; PHP's default is 15, shortened so the demo sees the return


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Callable[[LocalCluster], None]
    heal: Callable[[LocalCluster], None]


@dataclass(frozen=True)
class Security:
    """How the demo reaches its servers and stores its records: plain by default."""

    cluster: dict[str, Any] = field(default_factory=dict)
    store: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def secure(cls) -> Security:
        from memsess.sealing import generate_key

        return cls(
            cluster={"tls": True, "auth": ("demo", secrets.token_urlsafe(16))},
            store={"secret_keys": [generate_key()]},
        )

    @property
    def enabled(self) -> bool:
        return bool(self.cluster)


SCENARIOS = (
    Scenario("kill", lambda c: c.kill(FAULTY), lambda c: c.start_server(FAULTY)),
    # Still hung while everything is read back: the reads must not wait 1 s.
    Scenario("hang", lambda c: c.hang(FAULTY), lambda c: None),
    Scenario("restart empty", lambda c: c.restart(FAULTY), lambda c: None),
    Scenario("flush", lambda c: c.flush(FAULTY), lambda c: None),
    Scenario("hang, logout, resume", lambda c: c.hang(FAULTY), lambda c: c.resume(FAULTY)),
)


@dataclass
class Tally:
    """What one scenario saw."""

    ok: int = 0
    lost: int = 0
    stale: int = 0
    resurrected: int = 0
    errors: int = 0
    exposed: int = 0  # stored items in which session data could be read (--secure)
    latencies: list[float] = field(default_factory=list)

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.latencies.append(time.perf_counter() - start)

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def run_scenario(scenario: Scenario, out: TextIO, security: Security | None = None) -> Tally:
    """Save, fault, write and log out during the fault, heal, read everything."""
    security = Security() if security is None else security
    tally = Tally()
    started = time.perf_counter()
    with LocalCluster(3, **security.cluster) as cluster:
        dsn = cluster.dsn(timeout=1, retry_interval=RETRY_INTERVAL)
        with SessionStore.from_dsn(dsn, redundancy=REDUNDANCY, **security.store) as store:
            sids = [store.new_id() for _ in range(SESSIONS)]
            for n, sid in enumerate(sids):
                store.save(sid, {"user_id": n, "version": 1})
            logged_out = set(sids[:100])  # logged out before the fault
            for sid in logged_out:
                store.delete(sid)
            scenario.fault(cluster)
            # During the fault: every live session is updated, 100 more log out.
            _during(store, sids, logged_out, tally)
            scenario.heal(cluster)
            # Past the retry interval the returned server is probed and read
            # again: whatever it kept through the fault now competes.
            time.sleep(RETRY_INTERVAL * 1.2)
            for n, sid in enumerate(sids):
                _check(store, sid, n, sid in logged_out, tally)
            if security.enabled:
                tally.exposed = _exposed(cluster)
    wrong = tally.lost + tally.stale + tally.resurrected + tally.errors + tally.exposed
    out.write(
        f"  {scenario.name}: {'ok' if not wrong else f'{wrong} wrong'}, {tally.ok}/{SESSIONS}"
        f" correct ({time.perf_counter() - started:.1f} s)\n"
    )
    out.flush()
    return tally


def _exposed(cluster: LocalCluster) -> int:
    """Stored items, on every server, in which a session's data shows in clear."""
    exposed = 0
    for i in range(cluster.n):
        if cluster.servers[i].hung:
            continue  # (the "hang" scenario reads everything back while it still hangs)
        for key in cluster.keys(i):
            raw = cluster.get_raw(i, key) or b""
            exposed += b"user_id" in raw or b"version" in raw
    return exposed


def _during(store: SessionStore, sids: list[str], logged_out: set[str], tally: Tally) -> None:
    for n, sid in enumerate(sids):
        if sid in logged_out:
            continue
        try:
            if n < 200:
                with tally.timed():
                    store.delete(sid)
                logged_out.add(sid)
            else:
                with tally.timed():
                    data = store.load(sid)
                with tally.timed():
                    store.save(sid, {**(data or {}), "user_id": n, "version": 2})
        except Exception:
            tally.errors += 1


def _check(store: SessionStore, sid: str, n: int, deleted: bool, tally: Tally) -> None:
    try:
        with tally.timed():
            data = store.load(sid)
    except Exception:
        tally.errors += 1
        return
    if deleted:
        tally.resurrected += data is not None
        tally.ok += data is None
    elif data is None:
        tally.lost += 1
    elif data.get("version") != 2:
        tally.stale += 1
    else:
        tally.ok += 1


class _Collect(logging.Handler):
    """Keeps memsess's log lines to show them under the table, not in it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.first: dict[object, str] = {}  # message template -> first line
        self.counts: dict[object, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.first.setdefault(record.msg, f"{record.levelname.lower()}: {record.getMessage()}")
        self.counts[record.msg] = self.counts.get(record.msg, 0) + 1


def run_demo(out: TextIO = sys.stdout, *, secure: bool = False) -> int:
    """Run every scenario and print the table; 0 when nothing was lost. ``secure``: over
    TLS with authentication, with sealed records (and no session data readable in any
    stored byte). Raises :class:`~memsess.testing.MemcachedNotFoundError` before printing
    anything when there is no memcached binary to start."""
    # A LocalCluster looks for its binary when made and starts servers only when entered:
    # without memcached this raises now, not after the header.
    LocalCluster(1).close()
    logger = logging.getLogger("memsess")
    collect = _Collect()
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        return _run_all(out, collect, Security.secure() if secure else Security())
    finally:
        logger.removeHandler(collect)


def _run_all(out: TextIO, collect: _Collect, security: Security) -> int:
    out.write(
        f"memsess demo: {SESSIONS} sessions, redundancy {REDUNDANCY}, 3 local memcached servers,"
        f" timeout 1 s, retry_interval {RETRY_INTERVAL:g} s.\nEach fault hits one server;"
        " sessions are updated and logged out during it, then all are read back after it heals.\n"
    )
    if security.enabled:
        out.write(
            "Secure: TLS only with a password (memcached -Z -Y), sealed records (AES-256-GCM);"
            " 'exposed' counts stored items where session data shows in clear.\n"
        )
    start = time.perf_counter()
    results = [(scenario, run_scenario(scenario, out, security)) for scenario in SCENARIOS]
    out.write("\n")
    header: tuple[str, ...] = (
        "fault",
        "correct",
        "lost",
        "stale",
        "resurrected",
        "errors",
        "p50 ms",
        "worst ms",
    )
    if security.enabled:
        header = (*header[:6], "exposed", *header[6:])
    rows = [
        (
            scenario.name,
            f"{t.ok}/{SESSIONS}",
            str(t.lost),
            str(t.stale),
            str(t.resurrected),
            str(t.errors),
            *([str(t.exposed)] if security.enabled else []),
            f"{t.percentile(0.5) * 1000:.2f}",
            f"{max(t.latencies) * 1000:.1f}",
        )
        for scenario, t in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + "\n"
        )
    out.write("\nWhat memsess logged (count, then the first line of each kind):\n")
    for template, line in collect.first.items():
        out.write(f"  {collect.counts[template]:5d}x {line}\n")
    bad = sum(t.lost + t.stale + t.resurrected + t.errors + t.exposed for _, t in results)
    out.write(
        f"\n{'all sessions correct' if not bad else f'{bad} wrong answers'}"
        f" ({time.perf_counter() - start:.1f} s)\n"
    )
    return 0 if not bad else 1
