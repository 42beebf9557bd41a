"""``python -m bench``: every benchmark in one command.

Parts, each in its own Python process (so one part's garbage, threads and
pinning never touch the next):

- ``steady``: pytest-benchmark, bench/test_steady.py (memsess against
  pymemcache and the raw-socket floor, 3 sizes, redundancy 1-3);
- ``report``: the goal ratios of issue 5 with PASS / MISS (bench/report.py);
- ``versus``: CPU per load and per save, the working tree's memsess against
  another git revision's, the two taking turns (bench/versus.py);
- ``threads``: 1, 4 and 16 threads sharing one store (bench/threads.py);
- ``failover``: latency and wrong answers through short stalls, a hang, a
  kill and a restart, and docs/failover.png (bench/failover.py);
- ``hotpaths``: where load and save spend their time, layer by layer, and a
  profile (bench/hotpaths.py);
- ``udp``: bench/bench_udp.py, when it exists;
- ``aio``: the asyncio store against the blocking one and aiomcache, one at a
  time and 100 tasks on one loop (bench/aio.py);
- ``loopstall``: how late a 10 ms ticker on the event loop runs while a server
  hangs, the async store against a blocking store called on the loop
  (bench/loopstall.py);
- ``concurrency``: what the conflict policies cost a request: round trips, wall
  and CPU of merge, overwrite and lock, and of a merge after a conflict
  (bench/concurrency.py);
- ``security``: what TLS, ASCII authentication, sealed records and compression
  cost per load and save, beside plain TCP and pymemcache over TLS, and what a
  new connection costs with a full and a resumed TLS handshake
  (bench/security.py);
- ``cpu``: issue 14's table: CPU per operation beside wall time, memsess pure and
  compiled (built at the start, ~35 s) in worker processes, beside HashClient, the raw
  two-copy floor, PHP's session handlers, aiomcache and threads, the goals, and where
  a load's CPU goes (bench/cpu.py).

``--smoke`` runs every part with tiny counts (about a minute, most of it the
compile of ``cpu``) and exits 1 if any part fails: for CI, it checks that
everything runs, never how fast.
With ``--only PART``, arguments after ``--`` go to that part
(``python -m bench --only report -- --size 200B``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.cpus import PIN_ENV

ROOT = Path(__file__).resolve().parent.parent
PARTS = (
    "steady",
    "report",
    "versus",
    "threads",
    "failover",
    "hotpaths",
    "udp",
    "aio",
    "loopstall",
    "concurrency",
    "security",
    "cpu",
)


def _steady(smoke: bool) -> list[str]:
    command = [sys.executable, "-m", "pytest", "bench/test_steady.py", "-q"]
    if smoke:
        # Each benchmark body runs once, untimed: proves every candidate works.
        return [*command, "--benchmark-disable"]
    return [
        *command,
        "--benchmark-min-rounds=50",
        "--benchmark-max-time=0.3",
        "--benchmark-warmup=on",
        "--benchmark-warmup-iterations=50",
        "--benchmark-columns=median,iqr,min,rounds",
        "--benchmark-sort=name",
        "--benchmark-group-by=group",
    ]


def _command(part: str, smoke: bool, extra: list[str]) -> list[str] | None:
    if part == "steady":
        return _steady(smoke) + extra
    if part == "udp":
        if not (ROOT / "bench" / "bench_udp.py").exists():
            return None
        return [sys.executable, "-m", "bench.bench_udp", *(["--smoke"] if smoke else [])]
    return [sys.executable, "-m", f"bench.{part}", *(["--smoke"] if smoke else []), *extra]


def _wait_until_quiet(limit: float) -> None:
    """Wait (at most ``limit`` seconds) until other work leaves the CPUs idle:
    on a shared 2-core machine a neighbour's test run swamps every ratio."""
    from bench.common import BUSY_THRESHOLD, cpu_busy

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        busy = cpu_busy(1.0)
        if busy is None or busy <= BUSY_THRESHOLD:
            return
        print(f"  (CPUs {busy:.0%} busy: waiting for them to quiet down)", flush=True)
        time.sleep(4)
    print(f"  (still busy after {limit:g} s: running anyway)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts, a few seconds, for CI")
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each part, wait up to SECONDS for the CPUs to be idle (shared machines)",
    )
    args, extra = parser.parse_known_args(argv)
    if extra[:1] == ["--"]:  # `python -m bench --only report -- --size 200B`
        extra = extra[1:]
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    env = dict(os.environ)
    env.setdefault(PIN_ENV, "split")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    outcomes: list[tuple[str, str, float]] = []
    for part in parts:
        command = _command(part, args.smoke, extra if len(parts) == 1 else [])
        if command is None:
            outcomes.append((part, "skipped (bench/bench_udp.py not there)", 0.0))
            continue
        print(f"\n=== {part}: {' '.join(command[1:])}", flush=True)
        if args.wait_quiet > 0 and not args.smoke:
            _wait_until_quiet(args.wait_quiet)
        started = time.perf_counter()
        # Bounded: a full run of any part takes well under this.
        limit = 120 if args.smoke else 1200
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, timeout=limit, check=False).returncode
            verdict = "ok" if code == 0 else f"FAILED (exit {code})"
        except subprocess.TimeoutExpired:
            verdict = f"FAILED (over {limit} s)"
        outcomes.append((part, verdict, time.perf_counter() - started))
    print("\n=== summary" + (" (smoke mode)" if args.smoke else ""))
    for part, verdict, seconds in outcomes:
        print(f"  {part:9} {verdict}  {seconds:.1f} s")
    return 1 if any(verdict.startswith("FAILED") for _, verdict, _ in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
