"""CPU per operation beside wall time: memsess pure and compiled and their peers, one run.

``python -m bench.cpu [--smoke] [--compiled DIR]`` (issue 14's table and goals):

1. builds a compiled memsess from the checkout (``scripts/build-compiled --into`` a
   temp dir, ~35 s; ``--compiled DIR`` takes one built before); when it cannot be
   built (no C compiler, no mypy) the compiled rows say why and the rest runs;
2. starts a LocalCluster of 3 and one worker process per build
   (bench/cpu_worker.py, PYTHONPATH = the tree; each checks it imported that tree
   and that ``memsess.__compiled__`` is what the build should say), each with a
   ``SessionStore`` and an ``AsyncSessionStore`` at redundancy 2 and a 2 KB msgpack
   session; the peers (bench/cpu_peers.py) run in this process and in PHP;
3. one operation at a time: rounds in which every candidate takes its turn (who goes
   first rotates), so drift falls on all alike: memsess ``load``, ``save``,
   ``touch``, ``delete``, a load+save cycle, the async store; pymemcache
   ``HashClient``, the raw two-copy floor, aiomcache and the asyncio floor, PHP's
   pecl memcache (and php-memcached) session handler;
4. 1, 4 and 16 threads sharing one store (and one pooled HashClient), load+save
   cycles, rounds taken in turns: operations per second and the process's CPU per
   operation;
5. the goals of issue 14 for each build, PASS / MISS, never asserted; each ratio is
   the median of the per-round ratios;
6. where the CPU of a ``load`` goes, layer by layer and piece by piece, for both
   builds, and a cProfile of the pure build's ``load`` by module.

Every figure is the median over rounds of the calling thread's CPU time per operation
(``time.thread_time()``; the PHP process's for PHP, the whole process's with threads)
beside wall time. ``--smoke``: tiny counts (about a minute, most of it the build),
every row printed, nothing judged.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from bench.common import (
    RETRY_INTERVAL,
    SIZES,
    TIMEOUT,
    TTL,
    is_smoke,
    local_cluster,
    machine_load,
    make_session,
    placement,
)
from bench.cpu_peers import Peers, Php
from bench.cpu_report import Measured, print_report
from bench.cpu_worker import PIECES
from bench.versus import Worker

__all__ = ["main"]

ROOT: Final = Path(__file__).resolve().parent.parent
WORKER: Final = Path(__file__).resolve().parent / "cpu_worker.py"
REDUNDANCY: Final = 2
SIZE: Final = "2KB"
THREAD_COUNTS: Final = (1, 4, 16)


@dataclass(frozen=True)
class Counts:
    """How much of everything one run measures."""

    calls: int  # per operation and candidate, per round
    rounds: int
    php_iterations: int  # cycles per PHP run (one run per round)
    thread_seconds: float  # per thread count and candidate, per round
    thread_rounds: int
    max_cycles: int  # per thread, per thread round
    piece_calls: int  # the layers of a load (with I/O), per round
    piece_number: int  # the pieces without I/O, per round
    piece_rounds: int
    profile_calls: int
    warmup: int  # load+save cycles of each store before the first round
    build_timeout: float  # seconds


SMOKE: Final = Counts(3, 2, 5, 0.05, 1, 3, 3, 10, 1, 20, 10, 85.0)
FULL: Final = Counts(200, 20, 300, 1.0, 3, 1_000_000, 200, 2_000, 7, 3_000, 200, 600.0)


class TreeWorker(Worker):
    """One bench/cpu_worker.py process measuring the memsess of ``tree``: bench/versus.py's
    worker, started on another script and checked for the build it runs."""

    def __init__(self, build: str, tree: Path, setup: dict[str, Any]) -> None:
        self.label = f"memsess {build}"
        # The same hash seed for both builds: one less way two processes differ.
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        answer = self.ask(setup)
        imported = Path(answer["memsess"]).resolve()
        wrong = None
        if imported != tree.resolve() / "memsess":
            wrong = f"the worker imported {imported}, not {tree}'s memsess"
        elif answer["compiled"] != (build == "compiled"):
            wrong = f"memsess.__compiled__ is {answer['compiled']} in {tree} ({answer['build']})"
        if wrong is not None:
            self.close()
            raise RuntimeError(f"{self.label}: {wrong}")
        self.build: str = answer["build"]


def build_compiled(into: Path, timeout: float) -> tuple[Path | None, str]:
    """(the compiled tree, how the build went) or (None, why there is none)."""
    script = ROOT / "scripts" / "build-compiled"
    if not script.exists():
        return None, "scripts/build-compiled is not in this checkout"
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--into", str(into)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"the build took over {timeout:g} s"
    if done.returncode != 0:
        return None, f"the build failed: {_why(done.stderr + done.stdout, done.returncode)}"
    return into, f"built in {time.perf_counter() - started:.0f} s"


def _why(output: str, returncode: int) -> str:
    """The line of a failed build's output that says why: the one before the script's
    traceback (setup.py's message, or the compiler's), else the last."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    traceback = "Traceback (most recent call last):"
    if traceback in lines[1:]:
        return lines[lines.index(traceback, 1) - 1]
    return lines[-1] if lines else f"exit {returncode}"


def _add(samples: dict[tuple[str, str], list[list[float]]], row: str, ops: dict[str, Any]) -> None:
    for operation, figure in ops.items():
        samples.setdefault((row, operation), []).append(figure)


def _in_turns(steps: list[Callable[[], None]], rounds: int) -> None:
    """``rounds`` rounds of every step, who goes first rotating."""
    for round_no in range(rounds):
        shift = round_no % len(steps)
        for step in steps[shift:] + steps[:shift]:
            step()


def latency(
    workers: dict[str, TreeWorker], peers: Peers, php: Php, counts: Counts
) -> dict[tuple[str, str], list[list[float]]]:
    """Section 3: [wall, cpu] per round, by (row, operation)."""
    samples: dict[tuple[str, str], list[list[float]]] = {}
    steps: list[Callable[[], None]] = []
    for build, worker in workers.items():

        def ask(build: str = build, worker: TreeWorker = worker) -> None:
            answer = worker.ask({"do": "round", "calls": counts.calls})
            _add(samples, build, answer["sync"])
            _add(samples, f"{build} async", answer["async"])

        steps.append(ask)

    def peer_round() -> None:
        for row, ops in peers.round(counts.calls).items():
            _add(samples, row, ops)

    def php_round() -> None:
        for row, figure in php.round(counts.php_iterations).items():
            _add(samples, row, {"load+save": figure})

    steps.append(peer_round)
    if php.memcache is not None or php.memcached is not None:
        steps.append(php_round)
    _in_turns(steps, 1)  # untimed: connections, pools and caches warm for everyone
    samples.clear()
    _in_turns(steps, counts.rounds)
    return samples


def threads(
    workers: dict[str, TreeWorker], peers: Peers, counts: Counts
) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Section 4: per round, by (candidate, thread count)."""
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    runs: dict[str, Callable[[int], dict[str, float]]] = {
        build: lambda count, worker=worker: worker.ask(  # type: ignore[misc]
            {
                "do": "threads",
                "threads": count,
                "seconds": counts.thread_seconds,
                "max_cycles": counts.max_cycles,
            }
        )
        for build, worker in workers.items()
    }
    runs["hash"] = lambda count: peers.threads(count, counts.thread_seconds, counts.max_cycles)
    steps: list[Callable[[], None]] = []
    for count in THREAD_COUNTS:
        for name, run in runs.items():

            def step(name: str = name, run: Callable[[int], Any] = run, count: int = count) -> None:
                samples.setdefault((name, count), []).append(run(count))

            steps.append(step)
    _in_turns(steps, counts.thread_rounds)
    return samples


def pieces(
    workers: dict[str, TreeWorker], counts: Counts
) -> dict[tuple[str, str], list[list[float]] | str]:
    """Section 6: [wall, cpu] per round by (build, piece), or why a piece failed."""
    samples: dict[tuple[str, str], list[list[float]] | str] = {}
    request = {"do": "pieces", "calls": counts.piece_calls, "number": counts.piece_number}
    for _ in range(counts.piece_rounds):
        for build, worker in workers.items():
            for piece, figure in worker.ask(request)["pieces"].items():
                found = samples.setdefault((build, piece), [])
                if isinstance(figure, str):
                    samples[build, piece] = figure  # a piece that failed once stays failed
                elif not isinstance(found, str):
                    found.append(figure)
    return samples


def _start_workers(
    trees: dict[str, Path | None], setup: dict[str, Any], skipped: dict[str, str]
) -> dict[str, TreeWorker]:
    workers: dict[str, TreeWorker] = {}
    for build, tree in trees.items():
        if tree is None:
            continue
        try:
            workers[build] = TreeWorker(build, tree, setup)
        except RuntimeError as exc:
            if build == "pure":
                raise
            skipped[build] = str(exc)
    return workers


def measure(counts: Counts, trees: dict[str, Path | None], skipped: dict[str, str]) -> Measured:
    """Sections 3, 4 and 6, on a LocalCluster of 3."""
    data = make_session(SIZES[SIZE])
    with local_cluster(3) as cluster:
        setup = {
            "dsn": cluster.dsn("tcp", timeout=TIMEOUT, retry_interval=RETRY_INTERVAL),
            "redundancy": REDUNDANCY,
            "ttl": TTL,
            "data": data,
            "warmup": counts.warmup,
        }
        # Started after local_cluster() pinned this thread: they inherit its CPU.
        workers = _start_workers(trees, setup, skipped)
        peers: Peers | None = None
        try:
            peers = Peers(cluster, data)
            php = Php(cluster)
            found = Measured(
                builds={build: worker.build for build, worker in workers.items()},
                skipped=skipped,
                php_missing=php.missing,
                php_memcached=php.memcached is not None,
                latency=latency(workers, peers, php, counts),
                threads=threads(workers, peers, counts),
                pieces=pieces(workers, counts),
                shares=workers["pure"].ask({"do": "profile", "calls": counts.profile_calls})[
                    "shares"
                ],
            )
        finally:
            if peers is not None:
                peers.close()
            for worker in workers.values():
                worker.close()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check it runs")
    parser.add_argument(
        "--compiled", type=Path, metavar="DIR", help="a tree built by scripts/build-compiled"
    )
    parser.add_argument("--rounds", type=int, help=f"latency rounds (default {FULL.rounds})")
    args = parser.parse_args(argv)
    smoke = is_smoke(args.smoke)
    counts = SMOKE if smoke else FULL
    if args.rounds:
        counts = replace(counts, rounds=args.rounds)
    started = time.perf_counter()
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="memsess-compiled-") as scratch:
        if args.compiled is not None:
            compiled, how = args.compiled.resolve(), f"taken from {args.compiled}"
        else:
            compiled, how = build_compiled(Path(scratch), counts.build_timeout)
        if compiled is None:
            skipped["compiled"] = how
        print(
            f"\nCPU per operation, memsess pure and compiled beside its peers: {SIZE} msgpack"
            f" session, redundancy {REDUNDANCY}, LocalCluster of 3; {counts.rounds} rounds of"
            f" {counts.calls} calls, taken in turns; Python {sys.version.split()[0]}"
        )
        print(f"compiled build: {how}")
        print(f"{placement()}; {machine_load()}", flush=True)
        found = measure(counts, {"pure": ROOT, "compiled": compiled}, skipped)
    print_report(found, REDUNDANCY, THREAD_COUNTS, PIECES, judge=not smoke)
    errors = sum(int(run["errors"]) for runs in found.threads.values() for run in runs)
    if smoke:
        print("\n(smoke mode: tiny counts, the numbers mean nothing)")
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    if errors:
        print(f"{errors} load+save cycles failed in the thread runs", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
