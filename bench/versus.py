"""CPU time per load and per save: the working tree's memsess against another revision's.

``python -m bench.versus [--base REV]`` extracts REV's ``memsess`` package
(``git archive REV memsess | tar -x``) into a temp dir, starts a LocalCluster
of 3 and one worker process per tree (bench/versus_worker.py with PYTHONPATH
set to that tree), each with its own store at redundancy 2 on that cluster
and a 2 KB session. The two take turns round by round (new, base, new,
base...), each round ``--calls`` loads then as many saves, so drift falls on
both alike. Reported per operation and tree: medians over rounds of the
calling thread's CPU time per call (``time.thread_time()``) beside wall time;
and per operation the ratio new / base, the median of the per-round ratios.
The goal is CPU per load and per save no higher than the base's (ratio <=
1.0), PASS / MISS, never asserted: an A/A run (``--base HEAD`` with nothing
changed) shows how far from 1.0 noise alone goes.

The base is ``--base``, else $MEMSESS_BENCH_BASE, else the merge-base of HEAD
and ``main`` (or ``origin/main``): HEAD itself on main with uncommitted work.
When there is none (a clone without history), ``--smoke`` prints "skipped: no
base revision" and exits 0; a full run exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

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
from bench.report import Goal

__all__ = ["Worker", "main", "resolve_base"]

ROOT: Final = Path(__file__).resolve().parent.parent
WORKER: Final = Path(__file__).resolve().parent / "versus_worker.py"
#: Names the base revision when --base is not given (e.g. a CI job's merge-base).
BASE_ENV: Final = "MEMSESS_BENCH_BASE"
OPERATIONS: Final = ("load", "save")
REDUNDANCY: Final = 2


def _git(repo: Path, *args: str) -> str | None:
    """``git -C repo args``'s output, stripped, or None when git fails (or is missing)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def resolve_base(repo: Path, requested: str | None) -> tuple[str, str] | None:
    """(commit id, how it was chosen) of the base revision, or None when there is none."""
    if requested is None:
        requested = os.environ.get(BASE_ENV) or None
    if requested is not None:
        commit = _git(repo, "rev-parse", "--verify", "--quiet", f"{requested}^{{commit}}")
        return None if commit is None else (commit, requested)
    for branch in ("main", "origin/main"):
        commit = _git(repo, "merge-base", "HEAD", branch)
        if commit:
            return commit, f"merge-base of HEAD and {branch}"
    return None


def extract(repo: Path, commit: str, into: Path) -> bool:
    """Write ``commit``'s memsess package under ``into``; False when it has none."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", commit, "memsess"],
            capture_output=True,
            check=False,
        )
    except OSError:
        return False
    if archive.returncode != 0:
        return False
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return (into / "memsess" / "__init__.py").exists()


def _same_as_working_tree(repo: Path, commit: str) -> bool:
    """True when the working tree's memsess is the commit's, uncommitted files included."""
    changed = _git(repo, "status", "--porcelain", "--", "memsess")
    return changed == "" and _git(repo, "diff", "--quiet", commit, "--", "memsess") is not None


class Worker:
    """One bench/versus_worker.py process measuring the memsess of ``tree``."""

    def __init__(self, label: str, tree: Path, setup: dict[str, Any]) -> None:
        self.label = label
        # The same hash seed for both: one less way two processes of the same
        # code differ (dict and set layouts), which alternating cannot cancel.
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        imported = Path(self.ask(setup)["memsess"]).resolve()
        if imported != tree.resolve() / "memsess":
            self.close()
            raise RuntimeError(f"{label}: the worker imported {imported}, not {tree}'s memsess")

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request, wait for its answer."""
        stdin, stdout = self._pipes()
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: the worker exited ({self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.label}: {answer['error']}")
        return answer

    def close(self) -> None:
        stdin, _ = self._pipes()
        stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        return self.process.stdin, self.process.stdout


@dataclass(frozen=True)
class Figures:
    """Seconds per call of one operation of one tree, one entry per round."""

    wall: tuple[float, ...]
    cpu: tuple[float, ...]

    @property
    def cpu_us(self) -> float:
        return statistics.median(self.cpu) * 1e6

    @property
    def wall_us(self) -> float:
        return statistics.median(self.wall) * 1e6

    @property
    def spread(self) -> float:
        """CPU interquartile range over median (0.05 = 5 %)."""
        return _iqr(self.cpu)[1] / statistics.median(self.cpu) if len(self.cpu) >= 4 else 0.0


def _iqr(values: tuple[float, ...]) -> tuple[float, float]:
    """(first quartile, interquartile range)."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3 - q1


def run_rounds(
    workers: dict[str, Worker], *, calls: int, rounds: int
) -> dict[tuple[str, str], Figures]:
    """``rounds`` rounds, the workers taking turns; figures by (operation, worker)."""
    wall: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, worker in workers.items():
            answer = worker.ask({"calls": calls})
            for operation in OPERATIONS:
                wall.setdefault((operation, name), []).append(answer[operation][0])
                cpu.setdefault((operation, name), []).append(answer[operation][1])
    return {key: Figures(tuple(wall[key]), tuple(cpu[key])) for key in wall}


def goals(figures: dict[tuple[str, str], Figures]) -> list[Goal]:
    """CPU per call, new / base, for each operation; lower is better. The ratio
    is the median of the per-round ratios (each round's new over the base's
    right after it), which cancels the drift both share."""
    found = []
    for operation in OPERATIONS:
        new, base = figures[operation, "new"], figures[operation, "base"]
        paired = tuple(n / b for n, b in zip(new.cpu, base.cpu, strict=True))
        noise = ""
        if len(paired) >= 4:
            q1, iqr = _iqr(paired)
            noise = f", IQR {q1:.2f}-{q1 + iqr:.2f}"
        found.append(
            Goal(
                f"CPU per {operation}, new / base",
                statistics.median(paired),
                1.0,
                False,
                "x",
                f"per-round ratios{noise}; medians {new.cpu_us:.1f} us vs {base.cpu_us:.1f} us"
                f" CPU, {new.wall_us:.1f} us vs {base.wall_us:.1f} us wall"
                f" ({new.wall_us / base.wall_us:.2f}x)",
                digits=3,  # 1.004x must not read as 1.00x beside a MISS
            )
        )
    return found


def print_report(
    figures: dict[tuple[str, str], Figures],
    labels: dict[str, str],
    found: list[Goal],
) -> None:
    print("\n| op | tree | CPU us per call | wall us per call | spread (CPU IQR/median) |")
    print("| --- | --- | --- | --- | --- |")
    for operation in OPERATIONS:
        for name in ("new", "base"):
            figure = figures[operation, name]
            print(
                f"| {operation} | {labels[name]} | {figure.cpu_us:.1f} | {figure.wall_us:.1f} |"
                f" {figure.spread:.0%} |"
            )
    print("\n| goal | measured | target | verdict | detail |\n| --- | --- | --- | --- | --- |")
    for goal in found:
        print(goal.row())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check it runs")
    parser.add_argument(
        "--base",
        help=f"the git revision to compare with (default: ${BASE_ENV}, else the merge-base"
        " of HEAD and main)",
    )
    parser.add_argument("--size", choices=list(SIZES), default="2KB", help="session size")
    parser.add_argument("--calls", type=int, default=200, help="calls per operation per round")
    parser.add_argument("--rounds", type=int, default=40, help="rounds per tree")
    args = parser.parse_args(argv)
    smoke = is_smoke(args.smoke)
    calls, rounds, warmup = (5, 2, 5) if smoke else (args.calls, args.rounds, 100)
    base = resolve_base(ROOT, args.base)
    with tempfile.TemporaryDirectory(prefix="memsess-base-") as base_tree:
        if base is None or not extract(ROOT, base[0], Path(base_tree)):
            what = args.base or os.environ.get(BASE_ENV) or "merge-base of HEAD and main"
            print(f"skipped: no base revision ({what} not found in {ROOT}, or no memsess in it)")
            return 0 if smoke else 2
        commit, chosen = base
        subject = _git(ROOT, "log", "-1", "--format=%h %s", commit) or commit[:12]
        labels = {"new": "working tree", "base": f"base {commit[:7]}"}
        data = make_session(SIZES[args.size])
        load_before = machine_load()
        print(
            f"\nmemsess load / save, working tree ({ROOT}) against {chosen}: {subject}"
            f"\n{args.size} session, redundancy {REDUNDANCY}, LocalCluster of 3; {rounds} rounds"
            f" of {calls} calls per operation, the trees taking turns"
        )
        print(f"{placement()}; {load_before}")
        if _same_as_working_tree(ROOT, commit):
            print(
                "(the base's memsess is the working tree's: an A/A run, its ratios show the noise)"
            )
        with local_cluster(3) as cluster:
            setup = {
                "dsn": cluster.dsn(timeout=TIMEOUT, retry_interval=RETRY_INTERVAL),
                "redundancy": REDUNDANCY,
                "ttl": TTL,
                "data": data,
                "warmup": warmup,
            }
            workers: dict[str, Worker] = {}
            try:
                # Started after local_cluster() pinned this thread: they inherit its CPU.
                workers["new"] = Worker(labels["new"], ROOT, setup)
                workers["base"] = Worker(labels["base"], Path(base_tree), setup)
                figures = run_rounds(workers, calls=calls, rounds=rounds)
            finally:
                for worker in workers.values():
                    worker.close()
    found = goals(figures)
    print_report(figures, labels, found)
    if smoke:
        print("\n(smoke mode: tiny counts, the numbers mean nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
