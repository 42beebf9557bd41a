"""bench/cpu.py's tables: the figures side by side, threads, issue 14's goals (PASS /
MISS, never asserted) and where the CPU of a ``load`` goes."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from bench.cpu_peers import PHP_MEMCACHE
from bench.report import Goal
from bench.versus import Figures

__all__ = ["Measured", "goals", "print_report"]

BUILDS: Final = ("pure", "compiled")
STORE_OPS: Final = ("load", "save", "touch", "delete", "load+save")
LOAD_SAVE_CYCLE: Final = ("load", "save", "load+save")
#: The php-memcached rows, as bench/concurrency.py names its runs.
PHP_MEMCACHED: Final = ("PHP memcached, sess_locking on", "PHP memcached, no lock")
#: (row, label, copies, operations) of the side-by-side table, in order.
ROWS: Final = (
    ("pure", "memsess SessionStore, pure", 2, STORE_OPS),
    ("compiled", "memsess SessionStore, compiled", 2, STORE_OPS),
    ("hash", "pymemcache HashClient, pooled (get + msgpack, msgpack + set)", 1, LOAD_SAVE_CYCLE),
    ("hash single", "pymemcache HashClient, no pool (the same)", 1, LOAD_SAVE_CYCLE),
    ("floor", "raw sockets: a get sent to 2 servers, then both read (the floor)", 2, ("load",)),
    (PHP_MEMCACHE, "PHP pecl memcache handler, lock + read + write + unlock", 2, ("load+save",)),
    (PHP_MEMCACHED[0], "PHP memcached handler, sess_locking on", 2, ("load+save",)),
    (PHP_MEMCACHED[1], "PHP memcached handler, no lock", 2, ("load+save",)),
    ("pure async", "memsess AsyncSessionStore, pure", 2, LOAD_SAVE_CYCLE),
    ("compiled async", "memsess AsyncSessionStore, compiled", 2, LOAD_SAVE_CYCLE),
    ("aiomcache", "aiomcache.Client, 1 server, pool 2", 1, LOAD_SAVE_CYCLE),
    ("async floor", "raw asyncio Protocol: a get to 2 servers, both awaited", 2, ("load",)),
)


#: What the CPU goals' references are called.
REFERENCES: Final = {
    ("hash single", "load"): "HashClient get (no pool)",
    ("hash single", "save"): "HashClient set (no pool)",
    ("floor", "load"): "raw two-copy floor",
}


@dataclass(frozen=True)
class Measured:
    """What one run of bench/cpu.py measured: per round, [wall, cpu] seconds per
    operation by (row, operation); thread runs by (candidate, threads); the pieces of
    a load by (build, piece), or why one failed; cProfile shares of the pure load."""

    builds: dict[str, str]  # build: memsess._build.describe() in its worker
    skipped: dict[str, str]  # build: why it was not measured
    php_missing: str | None
    php_memcached: bool
    latency: dict[tuple[str, str], list[list[float]]]
    threads: dict[tuple[str, int], list[dict[str, float]]]
    pieces: dict[tuple[str, str], list[list[float]] | str]
    shares: dict[str, float]

    def figures(self, row: str, operation: str) -> Figures | None:
        rounds = self.latency.get((row, operation))
        if not rounds:
            return None
        return Figures(tuple(wall for wall, _ in rounds), tuple(cpu for _, cpu in rounds))

    def piece(self, build: str, piece: str) -> float | str | None:
        """Median CPU us of a piece, or why it failed (None: not measured)."""
        found = self.pieces.get((build, piece))
        if found is None or isinstance(found, str):
            return found
        return statistics.median(cpu for _, cpu in found) * 1e6


def _paired(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """The median of the per-round ratios ours / theirs: drift both share cancels."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def _cpu_goal(
    found: Measured, build: str, operation: str, *, reference: str, target: float
) -> Goal:
    """``operation``'s CPU against the same figure of the ``reference`` row."""
    name = f"{build}: {operation} CPU / {REFERENCES[reference, operation]}"
    ours, theirs = found.figures(build, operation), found.figures(reference, operation)
    if ours is None or theirs is None:
        return Goal(name, None, target, False, "x", found.skipped.get(build, "not measured"))
    return Goal(
        name,
        _paired(ours.cpu, theirs.cpu),
        target,
        False,
        "x",
        f"{ours.cpu_us:.1f} us vs {theirs.cpu_us:.1f} us CPU; wall {ours.wall_us:.1f} us vs"
        f" {theirs.wall_us:.1f} us ({ours.wall_us / theirs.wall_us:.2f}x)",
        digits=3,  # 0.998x must not read as 1.00x beside a MISS
    )


def _php_goal(found: Measured, build: str) -> Goal:
    name = f"{build}: load+save cycles/s / PHP pecl memcache"
    php = PHP_MEMCACHE
    if found.figures(php, "load+save") is None and found.php_memcached:
        php, name = PHP_MEMCACHED[0], f"{build}: load+save cycles/s / PHP memcached (no pecl)"
    ours, theirs = found.figures(build, "load+save"), found.figures(php, "load+save")
    if ours is None or theirs is None:
        why = found.skipped.get(build) or f"PHP not measured: {found.php_missing}"
        return Goal(name, None, 2.0, True, "x", why)
    return Goal(
        name,
        _paired(theirs.wall, ours.wall),
        2.0,
        True,
        "x",
        f"{1e6 / ours.wall_us:,.0f} vs {1e6 / theirs.wall_us:,.0f} cycles/s; CPU per cycle"
        f" {ours.cpu_us:.1f} us vs {theirs.cpu_us:.1f} us (PHP process)",
        digits=3,
    )


def _threads_goal(found: Measured, build: str) -> Goal:
    name = f"{build}: 4 threads, one store: ops/s / HashClient pooled"
    ours, theirs = found.threads.get((build, 4)), found.threads.get(("hash", 4))
    if not ours or not theirs:
        return Goal(name, None, 1.0, True, "x", found.skipped.get(build, "not measured"))
    our_ops = [run["ops_per_second"] for run in ours]
    their_ops = [run["ops_per_second"] for run in theirs]
    our_cpu = statistics.median(run["cpu_per_op"] for run in ours) * 1e6
    their_cpu = statistics.median(run["cpu_per_op"] for run in theirs) * 1e6
    return Goal(
        name,
        _paired(our_ops, their_ops),
        1.0,
        True,
        "x",
        f"{statistics.median(our_ops):,.0f} vs {statistics.median(their_ops):,.0f} ops/s;"
        f" CPU per op {our_cpu:.1f} us vs {their_cpu:.1f} us (whole process)",
        digits=3,
    )


def goals(found: Measured) -> list[Goal]:
    """Issue 14's goals, compiled build first."""
    listed = []
    for build in reversed(BUILDS):
        listed += [
            _cpu_goal(found, build, "load", reference="hash single", target=1.0),
            _cpu_goal(found, build, "save", reference="hash single", target=1.0),
            _cpu_goal(found, build, "load", reference="floor", target=1.5),
            _php_goal(found, build),
            _threads_goal(found, build),
        ]
    return listed


def print_figures(found: Measured) -> None:
    print("\n| client | copies | op | CPU us/op | wall us/op | per s (1/wall) | spread |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row, label, copies, operations in ROWS:
        build = row.split()[0]
        if build in found.skipped:
            print(f"| {label} | {copies} | - | skipped: {found.skipped[build]} | | | |")
            continue
        for operation in operations:
            figure = found.figures(row, operation)
            if figure is not None:
                print(
                    f"| {label} | {copies} | {operation} | {figure.cpu_us:.1f} |"
                    f" {figure.wall_us:.1f} | {1e6 / figure.wall_us:,.0f} | {figure.spread:.0%} |"
                )
    print(
        "\nCPU: the calling thread's (time.thread_time()); PHP's: the PHP process's"
        " (getrusage). Spread: CPU interquartile range / median over rounds."
    )
    if found.php_missing is not None:
        print(
            f"PHP pecl memcache: skipped ({found.php_missing}; `apt-get install php-cli"
            " php-memcache` for its row)."
        )


def print_threads(found: Measured, thread_counts: Sequence[int]) -> None:
    names = [build for build in BUILDS if build not in found.skipped] + ["hash"]
    labels = {"pure": "memsess pure", "compiled": "memsess compiled", "hash": "HashClient pooled"}
    head = " | ".join(f"{labels[name]} ops/s | CPU us/op" for name in names)
    print("\nThreads sharing one client, load+save cycles (CPU: the whole process's)\n")
    print(f"| threads | {head} |\n|{' --- |' * (1 + 2 * len(names))}")
    for count in thread_counts:
        cells = []
        for name in names:
            runs = found.threads.get((name, count), [])
            ops = statistics.median(run["ops_per_second"] for run in runs)
            cpu = statistics.median(run["cpu_per_op"] for run in runs) * 1e6
            cells.append(f"{ops:,.0f} | {cpu:.1f}")
        print(f"| {count} | {' | '.join(cells)} |")


#: The rows of the breakdown: (label, piece, piece subtracted from it); "floor" is the
#: raw two-copy floor measured in the bench's process.
BREAKDOWN: Final = (
    ("raw floor: two gets sent, both read (system calls, kernel)", "floor", None),
    ("transport above the floor: fanout() of the two gets - floor", "fanout", "floor"),
    ("... of which parsing the two replies (alone)", "parse", None),
    ("cluster: Cluster.execute() - fanout() (batch, health, round trips)", "execute", "fanout"),
    (
        "store: load - Cluster.execute() (key, plan and rule, records, serializer)",
        "load",
        "execute",
    ),
    ("... of which decoding the two records (alone)", "decode", None),
    ("... of which msgpack-unpacking the session (alone)", "unpack", None),
    ("... of which the key and its servers (alone)", "keys", None),
    ("load, in all (measured beside the layers)", "load", None),
)


def _breakdown_cell(found: Measured, build: str, piece: str, minus: str | None) -> str:
    """CPU us of ``piece`` less ``minus``; "n/a" when a piece failed, "-" if unmeasured."""
    values: list[float | str | None] = []
    for name in (piece, minus):
        if name == "floor":
            floor = found.figures("floor", "load")
            values.append(None if floor is None else floor.cpu_us)
        elif name is not None:
            values.append(found.piece(build, name))
    if any(isinstance(value, str) for value in values):
        return "n/a"
    if any(value is None for value in values):
        return "-"
    numbers = [value for value in values if isinstance(value, float)]
    return f"{numbers[0] - sum(numbers[1:]):.1f}"


def _print_room(found: Measured, builds: Sequence[str]) -> None:
    """What the CPU goals of a load leave above the floor, against what it takes."""
    floor, hash_get = found.figures("floor", "load"), found.figures("hash single", "load")
    if floor is None or hash_get is None:
        return
    for build in builds:
        load = found.figures(build, "load")
        if load is not None:
            print(
                f"  {build}: a load takes {load.cpu_us - floor.cpu_us:.1f} us of CPU above the"
                f" floor; <= 1.5x the floor leaves {0.5 * floor.cpu_us:.1f} us for it,"
                f" <= HashClient's get (no pool) {hash_get.cpu_us - floor.cpu_us:.1f} us"
            )


def print_breakdown(found: Measured, pieces: Sequence[str]) -> None:
    """Where a load's CPU goes, both builds: the layers' differences and, below each,
    what its main pieces cost measured alone."""
    builds = [build for build in BUILDS if build not in found.skipped]
    print("\nWhere the CPU of a load goes (us of this thread, medians over rounds)\n")
    print(f"| piece | {' | '.join(builds)} |\n|{' --- |' * (1 + len(builds))}")
    for label, piece, minus in BREAKDOWN:
        cells = " | ".join(_breakdown_cell(found, build, piece, minus) for build in builds)
        print(f"| {label} | {cells} |")
    _print_room(found, builds)
    for build in builds:
        for piece in pieces:
            failed = found.piece(build, piece)
            if isinstance(failed, str):
                print(f"  {build}: {piece} not measured: {failed}")
    if found.shares:
        print("\ncProfile of the pure build's load: shares of own time by place\n")
        print("| place | share |\n| --- | --- |")
        rest = 0.0
        for place, share in sorted(found.shares.items(), key=lambda item: -item[1]):
            if share >= 0.02:
                print(f"| {place} | {share:.0%} |")
            else:
                rest += share
        print(f"| the rest (places under 2 % each) | {rest:.0%} |")


def print_report(
    found: Measured,
    redundancy: int,
    thread_counts: Sequence[int],
    pieces: Sequence[str],
    *,
    judge: bool = True,
) -> None:
    """Every table; with ``judge`` False (smoke mode) the goals say no PASS or MISS."""
    for build, describe in found.builds.items():
        print(f"memsess {build}: {describe}")
    print_figures(found)
    print_threads(found, thread_counts)
    print(f"\nIssue 14's goals, redundancy {redundancy} (ratios: medians of per-round ratios)\n")
    print("| goal | measured | target | verdict | detail |\n| --- | --- | --- | --- | --- |")
    for goal in goals(found):
        if judge:
            print(goal.row())
        else:
            print(
                f"| {goal.name} | {goal.shown} | {goal.target_shown} | not judged | {goal.detail} |"
            )
    print_breakdown(found, pieces)
