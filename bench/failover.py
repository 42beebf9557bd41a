"""Failover timelines: per-request latency while one of three servers fails.

For each client (memsess at redundancy 2, pymemcache HashClient, the naive
two-client pair) a fresh local cluster of 3 goes through five phases of
``--phase-seconds`` each: steady, server 0 hung (SIGSTOP), resumed
(SIGCONT), killed, restarted empty. Requests are web requests (load, then
save) on the same 200 sessions for every client, paced at one every 2 ms,
with the same 1 s timeout everywhere. A failed server is retried after
``--retry-interval`` seconds (memsess ``retry_interval``, pymemcache
``dead_timeout``), short enough to show each client's recovery within a phase.

Prints worst, p99 and p50 latency per phase and client, with the sessions
read as missing ("lost": the user would be logged out) and read older than
the last write the client acknowledged ("stale": e.g. a cart losing an item),
and draws the timelines to docs/failover.png (needs matplotlib:
``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.baselines import NaivePair, PymemcacheHash
from bench.common import (
    SIZES,
    TIMEOUT,
    TTL,
    LocalCluster,
    addresses,
    is_smoke,
    local_cluster,
    machine_load,
    make_session,
    memsess_store,
    pin_servers,
    placement,
)
from memsess import SessionStore
from memsess.records import storage_key

__all__ = ["Phase", "Sample", "main", "run_timeline"]

DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "failover.png"
FAULTY = 0  # index of the server that fails
SESSIONS = 200
PACE = 0.002  # seconds between request starts (a request that runs late is not made up for)
MAX_REQUESTS_PER_PHASE = 20_000


@dataclass(frozen=True)
class Phase:
    name: str
    start: Callable[[LocalCluster], None]


def _start_again(cluster: LocalCluster) -> None:
    cluster.start_server(FAULTY)
    pin_servers(cluster)


PHASES = (
    Phase("steady", lambda cluster: None),
    Phase("hung", lambda cluster: cluster.hang(FAULTY)),
    Phase("resumed", lambda cluster: cluster.resume(FAULTY)),
    Phase("killed", lambda cluster: cluster.kill(FAULTY)),
    Phase("restarted empty", _start_again),
)


class SessionClient(Protocol):
    def load(self, sid: str) -> dict[str, Any] | None: ...
    def save(self, sid: str, data: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class _ByKey:
    """A pymemcache baseline addressed by session id: the same memcached key as memsess."""

    def __init__(self, client: PymemcacheHash | NaivePair) -> None:
        self.client = client

    def load(self, sid: str) -> dict[str, Any] | None:
        return self.client.load(storage_key(b"memsess:", sid))

    def save(self, sid: str, data: dict[str, Any]) -> None:
        self.client.save(storage_key(b"memsess:", sid), data)

    def close(self) -> None:
        self.client.close()


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
    "memsess r2": _memsess,
    "HashClient": _hashclient,
    "naive pair": _naive,
}


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the timeline started
    latency: float  # seconds, load + save
    phase: int
    lost: bool  # the session read as missing
    stale: bool  # read older than the last acknowledged save
    failed: bool  # the request raised


@dataclass
class Timeline:
    client: str
    samples: list[Sample] = field(default_factory=list)
    phase_starts: list[float] = field(default_factory=list)
    end: float = 0.0


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
            origin = time.perf_counter()
            turn = 0
            # Each save writes the next number in "seq"; the last one acknowledged
            # (save returned) is what a correct read gives back.
            acknowledged = dict.fromkeys(sids, 0)
            for number, phase in enumerate(PHASES):
                phase.start(cluster)
                phase_start = time.perf_counter()
                timeline.phase_starts.append(phase_start - origin)
                next_at = phase_start
                for _ in range(MAX_REQUESTS_PER_PHASE):
                    now = time.perf_counter()
                    if now - phase_start >= phase_seconds:
                        break
                    if next_at > now:
                        time.sleep(next_at - now)
                    next_at = max(next_at + PACE, time.perf_counter())
                    sid = sids[turn % SESSIONS]
                    turn += 1
                    sample, written = _request(
                        client,
                        sid,
                        data,
                        expected=acknowledged[sid],
                        seq=turn,
                        origin=origin,
                        phase=number,
                    )
                    timeline.samples.append(sample)
                    if written:
                        acknowledged[sid] = turn
            timeline.end = time.perf_counter() - origin
        finally:
            client.close()
            # Leave the server runnable so the cluster can stop it.
            cluster.resume(FAULTY)
    return timeline


def _request(
    client: SessionClient,
    sid: str,
    data: dict[str, Any],
    *,
    expected: int,
    seq: int,
    origin: float,
    phase: int,
) -> tuple[Sample, bool]:
    """One web request: load, then save the next ``seq``. Returns the sample and
    whether the save was acknowledged (returned without raising)."""
    t0 = time.perf_counter()
    lost = stale = failed = written = False
    try:
        loaded = client.load(sid)
        lost = loaded is None
        stale = loaded is not None and loaded.get("seq", -1) < expected
        client.save(sid, (loaded or data) | {"seq": seq})
        written = True
    except Exception:
        failed = True
    t1 = time.perf_counter()
    return Sample(t0 - origin, t1 - t0, phase, lost, stale, failed), written


def _percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summary(timelines: list[Timeline]) -> list[str]:
    """Markdown table: one row per client and phase."""
    rows = [
        "| client | phase | requests | worst ms | p99 ms | p50 ms | lost | stale | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for timeline in timelines:
        for number, phase in enumerate(PHASES):
            samples = [s for s in timeline.samples if s.phase == number]
            if not samples:
                rows.append(f"| {timeline.client} | {phase.name} | 0 | - | - | - | - | - | - |")
                continue
            ordered = sorted(s.latency * 1e3 for s in samples)
            rows.append(
                f"| {timeline.client} | {phase.name} | {len(samples)} | {ordered[-1]:.1f} |"
                f" {_percentile(ordered, 0.99):.2f} | {statistics.median(ordered):.3f} |"
                f" {sum(s.lost for s in samples)} | {sum(s.stale for s in samples)} |"
                f" {sum(s.failed for s in samples)} |"
            )
    return rows


def _phase_note(timeline: Timeline, number: int) -> str:
    """Worst latency and wrong answers of one phase, for its label on the plot."""
    samples = [s for s in timeline.samples if s.phase == number]
    if not samples:
        return "no request"
    worst = max(s.latency for s in samples) * 1e3
    wrong = sum(s.lost or s.stale or s.failed for s in samples)
    return f"worst {worst:.0f} ms" + (f", {wrong} wrong" if wrong else "")


def plot(timelines: list[Timeline], path: Path, *, timeout: float, retry: float) -> bool:
    """Draw one panel per client, latency (log scale) against time, phases shaded.
    Returns False (with a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: no plot drawn. Install it with"
            " `pip install -e '.[plot]'` to draw " + str(path),
            file=sys.stderr,
        )
        return False
    figure, axes = plt.subplots(
        len(timelines), 1, figsize=(10, 2.4 * len(timelines) + 0.8), sharex=True, sharey=True
    )
    shades = ("#ffffff", "#fde2e2", "#e2f0fd", "#fdf1d6", "#e3f5e1")
    colours = {"memsess r2": "#1f77b4", "HashClient": "#d62728", "naive pair": "#ff7f0e"}
    for axis, timeline in zip(axes, timelines, strict=True):
        edges = [*timeline.phase_starts, timeline.end]
        for number, phase in enumerate(PHASES):
            axis.axvspan(edges[number], edges[number + 1], color=shades[number], zorder=0)
            axis.text(
                (edges[number] + edges[number + 1]) / 2,
                0.97,
                f"{phase.name}\n{_phase_note(timeline, number)}",
                transform=axis.get_xaxis_transform(),
                ha="center",
                va="top",
                fontsize=7.5,
                color="#333333",
            )
        ok = [s for s in timeline.samples if not (s.lost or s.stale or s.failed)]
        bad = [s for s in timeline.samples if s.lost or s.stale or s.failed]
        colour = colours.get(timeline.client, "#333333")
        axis.scatter([s.at for s in ok], [s.latency * 1e3 for s in ok], s=3, color=colour)
        axis.scatter(
            [s.at for s in bad],
            [s.latency * 1e3 for s in bad],
            s=10,
            marker="x",
            color="black",
            label="wrong answer: session lost (read as missing) or stale, or request failed",
        )
        axis.axhline(20, color="#2ca02c", linestyle="--", linewidth=0.8, label="20 ms goal")
        axis.axhline(timeout * 1e3, color="#777777", linestyle=":", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_ylim(0.05, 3e4)  # room above 1 s for the phase labels
        axis.set_ylabel(f"{timeline.client}\nms per request")
        axis.grid(axis="y", which="major", color="#dddddd", linewidth=0.5)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    axes[-1].set_xlabel("seconds")
    figure.suptitle(
        f"Web requests (load + save) while server 0 of 3 fails; timeout {timeout:g} s,"
        f" retry interval {retry:g} s (dotted: the timeout)",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.035, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"plot written to {path}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny phases: check it runs")
    parser.add_argument("--phase-seconds", type=float, default=4.0)
    parser.add_argument("--retry-interval", type=float, default=2.0)
    parser.add_argument("--plot", type=Path, help=f"PNG to write (default {DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    smoke = is_smoke(args.smoke)
    # Smoke mode shortens the timeout too, or each hung request would take 1 s.
    phase_seconds = 0.1 if smoke else args.phase_seconds
    timeout = 0.1 if smoke else TIMEOUT
    retry = 0.1 if smoke else args.retry_interval
    data = make_session(SIZES["2KB"])
    load_before = machine_load()
    timelines = [
        run_timeline(name, phase_seconds=phase_seconds, timeout=timeout, retry=retry, data=data)
        for name in CLIENTS
    ]
    print(
        f"\nFailover: server {FAULTY} of 3; phases of {phase_seconds:g} s; timeout {timeout:g} s;"
        f" retry interval {retry:g} s; {SESSIONS} sessions of 2KB"
    )
    print(f"{placement()}; {load_before}\n")
    print("\n".join(summary(timelines)))
    if not args.no_plot:
        if args.plot is not None:
            path = args.plot
        elif smoke:  # never overwrite the real plot with a smoke run's
            import tempfile

            path = Path(tempfile.gettempdir()) / "memsess-failover-smoke.png"
        else:
            path = DEFAULT_PLOT
        plot(timelines, path, timeout=timeout, retry=retry)
    if smoke:
        print("\n(smoke mode: tiny phases and a 0.1 s timeout, the numbers mean nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
