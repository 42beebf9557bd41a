"""Failover timelines: per-request latency and wrong answers while one of three servers fails.

For each client (memsess at redundancy 2, pymemcache HashClient, the naive
two-client pair) a fresh local cluster of 3 goes through seven phases of
``--phase-seconds`` each: steady; short stalls of server 0 (SIGSTOP, then
SIGCONT 50 ms later, a few times, from a background thread); the same with
150 ms stalls; server 0 hung (SIGSTOP); resumed (SIGCONT); killed; restarted
empty. Requests are paced at one every 2 ms on 200 sessions, the same for
every client, with the same 1 s timeout everywhere:

- a visit (most requests): load, then save the next number;
- a logout (1 request in 23): load, then delete; that user's next visit
  starts a new session;
- a replay (1 in 23): load a session logged out in this phase or the one
  before (an old cookie in another tab), which must read as missing. So the
  resumed phase checks that the logouts made during the hang stay done, as
  its visits check that the updates made during the hang do.

A failed server is retried after ``--retry-interval`` seconds (memsess
``retry_interval``, pymemcache ``dead_timeout``), short enough to show each
client's recovery within a phase.

Prints, per phase and client, the wrong answers: sessions read as missing
("lost": the user is logged out), read older than the last write the client
acknowledged ("stale": a cart losing an item, or a logout undone, counted
apart too) and requests that raised ("failed"); p50, p99 and worst latency;
and how many requests took over 5, 20 and 100 ms (memsess's straggler
window adapts, so fixed thresholds rather than "waited the window"). Then,
for memsess, the issue's targets with one server of three hung: p99 <= 5 ms
and worst <= 100 ms over the hang, no wrong answer over the hang and the
phase after it (the same for each stall phase), as PASS / MISS: measured,
never asserted. The requests and their checks are bench/timelines.py. Draws
the timelines to docs/failover.png (needs matplotlib:
``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Final

from bench.common import SIZES, TIMEOUT, is_smoke, machine_load, make_session, placement
from bench.report import Goal
from bench.timelines import (
    CLIENTS,
    FAULTY,
    HUNG,
    LOGOUT_EVERY,
    MEMSESS,
    PHASES,
    SESSIONS,
    Sample,
    Timeline,
    run_timeline,
)

__all__ = ["main", "plot", "summary", "target_lines"]

DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "failover.png"
#: Thresholds in ms: requests slower than each are counted.
SLOW_MS: Final = (5, 20, 100)
#: The issue's targets for memsess with one server of three hung.
TARGET_P99_MS: Final = 5.0
TARGET_WORST_MS: Final = 100.0


def _percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _phase_samples(timeline: Timeline, *numbers: int) -> list[Sample]:
    return [s for s in timeline.samples if s.phase in numbers]


def summary(timelines: list[Timeline]) -> list[str]:
    """Markdown table: one row per client and phase."""
    slow = " | ".join(f"> {ms} ms" for ms in SLOW_MS)
    rows = [
        "| client | phase | requests | wrong | lost | stale | (logouts undone) | failed"
        f" | p50 ms | p99 ms | worst ms | {slow} |",
        "| --- " * (11 + len(SLOW_MS)) + "|",
    ]
    for timeline in timelines:
        for number, phase in enumerate(PHASES):
            samples = _phase_samples(timeline, number)
            head = f"| {timeline.client} | {phase.name} | {len(samples)} |"
            if not samples:
                rows.append(head + " - |" * (8 + len(SLOW_MS)))
                continue
            ordered = sorted(s.latency * 1e3 for s in samples)
            counts = " | ".join(str(sum(ms > limit for ms in ordered)) for limit in SLOW_MS)
            undone = sum(s.undone for s in samples)
            rows.append(
                f"{head} {sum(s.wrong for s in samples)} | {sum(s.lost for s in samples)} |"
                f" {sum(s.stale for s in samples) + undone} | ({undone}) |"
                f" {sum(s.failed for s in samples)} | {statistics.median(ordered):.3f} |"
                f" {_percentile(ordered, 0.99):.2f} | {ordered[-1]:.1f} | {counts} |"
            )
    return rows


def target_goals(timeline: Timeline, number: int) -> list[Goal]:
    """The issue's targets over fault phase ``number``: p99 and worst latency
    in it, wrong answers in it and (for the hang) in the phase after it, when
    the server is back."""
    samples = _phase_samples(timeline, number)
    if not samples:
        return []
    ordered = sorted(s.latency * 1e3 for s in samples)
    checked = (number, number + 1) if number == HUNG else (number,)
    wrong = sum(s.wrong for s in _phase_samples(timeline, *checked))
    span = " and ".join(PHASES[n].name for n in checked)
    return [
        Goal("p99", _percentile(ordered, 0.99), TARGET_P99_MS, False, " ms", ""),
        Goal("worst", ordered[-1], TARGET_WORST_MS, False, " ms", ""),
        Goal(f"wrong answers ({span})", wrong, 0, False, "", "", digits=0),
    ]


def target_lines(timelines: list[Timeline]) -> list[str]:
    """memsess's issue targets with one server of three hung, then for each stall phase."""
    lines = []
    for timeline in timelines:
        if timeline.client != MEMSESS:
            continue
        faults = [HUNG] + [n for n, phase in enumerate(PHASES) if phase.stall]
        for number in faults:
            goals = target_goals(timeline, number)
            if not goals:
                continue
            verdict = "PASS" if all(goal.verdict == "PASS" for goal in goals) else "MISS"
            label = "server 0 of 3 hung" if number == HUNG else PHASES[number].name
            checks = "; ".join(goal.brief() for goal in goals)
            lines.append(f"{verdict}  {timeline.client}, {label} (issue targets): {checks}")
    return lines


def _stall_note(timelines: list[Timeline]) -> str:
    """The stalls as they happened: how many per client, and how long, per stall phase."""
    parts = []
    for number, phase in enumerate(PHASES):
        counts = {len(t.stalls.get(number, [])) for t in timelines}
        measured = [s * 1e3 for t in timelines for s in t.stalls.get(number, [])]
        if phase.stall and measured:
            each = "-".join(map(str, sorted(counts)))
            parts.append(
                f"{phase.name}: {each} per client, {min(measured):.0f}-{max(measured):.0f} ms each"
            )
    return "; ".join(parts) or "no stall"


def _phase_note(timeline: Timeline, number: int) -> str:
    """Worst latency and wrong answers of one phase, for its label on the plot."""
    samples = _phase_samples(timeline, number)
    if not samples:
        return "no request"
    worst = max(s.latency for s in samples) * 1e3
    wrong = sum(s.wrong for s in samples)
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
    figure, grid = plt.subplots(
        len(timelines),
        1,
        figsize=(12, 2.4 * len(timelines) + 0.8),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    axes = grid[:, 0]
    shades = ("#ffffff", "#f6e8fb", "#ecd6f5", "#fde2e2", "#e2f0fd", "#fdf1d6", "#e3f5e1")
    colours = {MEMSESS: "#1f77b4", "HashClient": "#d62728", "naive pair": "#ff7f0e"}
    for axis, timeline in zip(axes, timelines, strict=True):
        edges = [*timeline.phase_starts, timeline.end]
        for number, phase in enumerate(PHASES):
            axis.axvspan(
                edges[number], edges[number + 1], color=shades[number % len(shades)], zorder=0
            )
            axis.text(
                (edges[number] + edges[number + 1]) / 2,
                0.97,
                f"{phase.name}\n{_phase_note(timeline, number)}",
                transform=axis.get_xaxis_transform(),
                ha="center",
                va="top",
                fontsize=7,
                color="#333333",
            )
        ok = [s for s in timeline.samples if not s.wrong]
        bad = [s for s in timeline.samples if s.wrong]
        colour = colours.get(timeline.client, "#333333")
        axis.scatter([s.at for s in ok], [s.latency * 1e3 for s in ok], s=3, color=colour)
        axis.scatter(
            [s.at for s in bad],
            [s.latency * 1e3 for s in bad],
            s=10,
            marker="x",
            color="black",
            label="wrong answer: session lost, stale or logout undone, or request failed",
        )
        axis.axhline(
            TARGET_P99_MS, color="#2ca02c", linestyle="--", linewidth=0.8, label="p99 target"
        )
        axis.axhline(
            TARGET_WORST_MS, color="#9467bd", linestyle="--", linewidth=0.8, label="worst target"
        )
        axis.axhline(timeout * 1e3, color="#777777", linestyle=":", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_ylim(0.05, 3e4)  # room above 1 s for the phase labels
        axis.set_ylabel(f"{timeline.client}\nms per request")
        axis.grid(axis="y", which="major", color="#dddddd", linewidth=0.5)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    axes[-1].set_xlabel("seconds")
    figure.suptitle(
        f"Web requests while server 0 of 3 fails; timeout {timeout:g} s,"
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
    parser.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help=f"comma-separated clients of {', '.join(CLIENTS)} (default: all)",
    )
    parser.add_argument("--plot", type=Path, help=f"PNG to write (default {DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.clients.split(",") if name.strip()]
    unknown = sorted(set(names) - set(CLIENTS))
    if unknown:
        parser.error(f"unknown client(s) {', '.join(unknown)}; choose from {', '.join(CLIENTS)}")
    smoke = is_smoke(args.smoke)
    # Smoke mode shortens the timeout too, or each hung request would take 1 s;
    # its phases still fit one 150 ms stall.
    phase_seconds = 0.2 if smoke else args.phase_seconds
    timeout = 0.1 if smoke else TIMEOUT
    retry = 0.1 if smoke else args.retry_interval
    data = make_session(SIZES["2KB"])
    load_before = machine_load()
    timelines = [
        run_timeline(name, phase_seconds=phase_seconds, timeout=timeout, retry=retry, data=data)
        for name in names
    ]
    print(
        f"\nFailover: server {FAULTY} of 3; phases of {phase_seconds:g} s; timeout {timeout:g} s;"
        f" retry interval {retry:g} s; {SESSIONS} sessions of 2KB; 1 request in {LOGOUT_EVERY}"
        f" a logout, 1 a replay of a logged-out session"
    )
    print(f"{placement()}; {load_before}; {_stall_note(timelines)}\n")
    print("\n".join(summary(timelines)))
    lines = target_lines(timelines)
    if lines:
        print("\n" + "\n".join(lines))
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
