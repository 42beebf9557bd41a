"""What every bench script shares: session data of each size, the local cluster,
server addresses, and a timing loop that interleaves what it compares.

Timing: each measured callable runs ``calls`` times in a row, ``rounds`` times,
the callables taking turns within each round so that machine noise (a 2-core
box also running memcached) falls on all of them alike; the figure kept is the
median over rounds of the mean time per call.

Every cluster started here is pinned as bench/cpus.py explains.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from bench.cpus import pin_client, pin_process, placement
from memsess import SessionStore, parse_dsn

try:
    from memsess.testing import LocalCluster
except ImportError as exc:  # pragma: no cover - only while memsess.testing is being written
    raise SystemExit(f"memsess.testing.LocalCluster is needed to run the bench: {exc}") from exc

__all__ = [
    "BUSY_THRESHOLD",
    "RETRY_INTERVAL",
    "SIZES",
    "TIMEOUT",
    "TTL",
    "LocalCluster",
    "Timing",
    "addresses",
    "cpu_busy",
    "is_smoke",
    "local_cluster",
    "machine_load",
    "make_session",
    "measure",
    "memsess_store",
    "pin_client",
    "pin_process",
    "pin_servers",
    "placement",
    "udp_addresses",
]

#: Session sizes measured, by label: bytes of msgpack-encoded session data.
SIZES: Final[Mapping[str, int]] = {"200B": 200, "2KB": 2_000, "20KB": 20_000}

#: Seconds; the same I/O timeout for memsess and every pymemcache client (PHP's default).
TIMEOUT: Final = 1.0
#: Seconds a failed server is skipped (memsess retry_interval, pymemcache dead_timeout).
RETRY_INTERVAL: Final = 15.0
#: Session lifetime in seconds (PHP's session.gc_maxlifetime).
TTL: Final = 1440

#: Set to 1 to make every bench script run in smoke mode (as ``--smoke`` does).
SMOKE_ENV: Final = "MEMSESS_BENCH_SMOKE"


def pin_servers(cluster: LocalCluster) -> None:
    """Pin every running server of ``cluster``; call again after a restart."""
    for server in cluster.servers:
        if server.running and server.process is not None:
            pin_process(server.process.pid)


def is_smoke(argv_flag: bool = False) -> bool:
    """True for ``--smoke`` or MEMSESS_BENCH_SMOKE=1: tiny counts, no timing claims."""
    return argv_flag or os.environ.get(SMOKE_ENV, "") not in ("", "0")


def make_session(size: int) -> dict[str, Any]:
    """Session data that msgpack-encodes to about ``size`` bytes: what a web app
    keeps (user, CSRF token, flash messages, a cart), padded with history."""
    data: dict[str, Any] = {
        "user_id": 421337,
        "csrf_token": "Jx2mQ9vLr8T0aW4zKpE1yN6bH3cU7fGd",
        "locale": "en_GB",
        "flash": [],
    }
    base = len(msgpack.packb(data))
    if size > base + 40:
        data["cart"] = [{"sku": 1000 + n, "qty": 1 + n % 3} for n in range(3)]
        base = len(msgpack.packb(data))
    history: list[str] = []
    data["history"] = history
    page = 0
    while len(msgpack.packb(data)) < size - 40:
        history.append(f"/catalogue/item/{page:06d}")
        page += 1
    # The last few bytes: a referrer of the length that lands on ``size``.
    data["referrer"] = ""
    short = size - len(msgpack.packb(data))
    if short > 0:
        data["referrer"] = "/" + "r" * (short - 2)  # 1 more byte of str header past 31
        data["referrer"] += "r" * (size - len(msgpack.packb(data)))
    return data


def addresses(cluster: LocalCluster) -> list[tuple[str, int]]:
    """The (host, TCP port) of each server, in cluster order."""
    return [(spec.host, spec.port) for spec in parse_dsn(cluster.dsn())]


def udp_addresses(cluster: LocalCluster) -> list[tuple[str, int]]:
    """The (host, UDP port) of each server of a ``LocalCluster(udp=True)``."""
    found = []
    for spec in parse_dsn(cluster.dsn()):
        if spec.udp_port is None:
            raise RuntimeError("this LocalCluster serves no UDP: start it with udp=True")
        found.append((spec.host, spec.udp_port))
    return found


@contextmanager
def local_cluster(n: int = 3, *, udp: bool = False) -> Iterator[LocalCluster]:
    """A LocalCluster of ``n`` memcached servers on loopback, stopped on exit;
    the servers pinned to the server CPUs, this thread to the client CPU."""
    with LocalCluster(n, udp=udp) as cluster:
        pin_servers(cluster)
        pin_client()
        yield cluster


def memsess_store(
    cluster: LocalCluster,
    *,
    redundancy: int,
    timeout: float = TIMEOUT,
    retry_interval: float = RETRY_INTERVAL,
    dsn: str | None = None,
) -> SessionStore:
    """A store on ``cluster`` (or on ``dsn``), with the bench's timeouts."""
    if dsn is None:
        dsn = cluster.dsn(timeout=timeout, retry_interval=retry_interval)
    return SessionStore.from_dsn(dsn, redundancy=redundancy, ttl=TTL)


#: Share of all CPUs busy (before a run) above which its numbers are called unreliable.
BUSY_THRESHOLD: Final = 0.15


def cpu_busy(sample_seconds: float = 0.5) -> float | None:
    """The share of CPU time all CPUs spent busy over the next ``sample_seconds``
    (from /proc/stat), or None where there is no /proc/stat."""
    try:
        before = _cpu_times()
        time.sleep(sample_seconds)
        after = _cpu_times()
    except OSError:
        return None
    total = sum(after) - sum(before)
    idle = (after[3] + after[4]) - (before[3] + before[4])  # idle + iowait
    return 1 - idle / total if total else 0.0


def machine_load(sample_seconds: float = 0.5) -> str:
    """How busy the machine is before a run, with a warning when other work
    competes for the CPUs: ratios from a busy 2-core machine are noise."""
    busy = cpu_busy(sample_seconds)
    if busy is None:  # not Linux: the load average will do
        return f"load average {os.getloadavg()[0]:.2f}"
    warning = " - BUSY MACHINE, numbers unreliable" if busy > BUSY_THRESHOLD else ""
    return f"CPUs {busy:.0%} busy before the run{warning}"


def _cpu_times() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:]]


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one measured callable: the median over rounds, and
    every round's mean (for spread). ``cpu_per_call`` is the CPU time (user +
    system) this thread spent per call, median over rounds: unlike wall time it
    hardly moves when other work shares the machine, and what memsess spends
    above the floor's CPU is what an optimisation can win."""

    name: str
    per_call: float
    rounds: tuple[float, ...]
    cpu_per_call: float = 0.0

    @property
    def us(self) -> float:
        return self.per_call * 1e6

    @property
    def cpu_us(self) -> float:
        return self.cpu_per_call * 1e6

    @property
    def spread(self) -> float:
        """Interquartile range over median, a rough noise figure (0.05 = 5 %)."""
        if len(self.rounds) < 4:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.rounds, n=4)
        return (q3 - q1) / self.per_call


def measure(
    candidates: Mapping[str, Callable[[], object]],
    *,
    calls: int,
    rounds: int,
    warmup: int = 20,
    max_seconds: float = 60.0,
) -> dict[str, Timing]:
    """Time each callable: ``rounds`` rounds of ``calls`` calls, taking turns.

    Stops early (with at least one round done) once ``max_seconds`` have passed,
    so a slow or stuck candidate cannot hold the run forever."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    per_round: dict[str, list[float]] = {name: [] for name in candidates}
    cpu_per_round: dict[str, list[float]] = {name: [] for name in candidates}
    started = time.perf_counter()
    order = list(candidates.items())
    for round_no in range(rounds):
        gc.collect()
        # Rotate who goes first: the first of a round pays for any wake-up.
        shift = round_no % len(order)
        for name, fn in order[shift:] + order[:shift]:
            cpu0 = time.thread_time()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_round[name].append((time.perf_counter() - t0) / calls)
            cpu_per_round[name].append((time.thread_time() - cpu0) / calls)
        if time.perf_counter() - started > max_seconds:
            print(
                f"  (stopped after {round_no + 1} rounds: over {max_seconds:g} s)", file=sys.stderr
            )
            break
    return {
        name: Timing(
            name, statistics.median(values), tuple(values), statistics.median(cpu_per_round[name])
        )
        for name, values in per_round.items()
    }
