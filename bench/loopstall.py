"""Is the event loop ever blocked? A ticker task on the loop wants to run every 10 ms
while tasks load and save sessions and one memcached server hangs (SIGSTOP) for a while;
its lateness is what every other request on that loop would wait.

Two stores side by side, on the same cluster, one after the other:

- ``AsyncSessionStore``, awaited;
- ``SessionStore`` called from the loop's tasks, as an asyncio framework calling a
  blocking store does (Quart with the Flask adapter, before memsess had an async store).

``python -m bench.loopstall [--smoke] [--tasks N] [--hang SECONDS]``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import RETRY_INTERVAL, TIMEOUT, is_smoke, local_cluster, make_session
from memsess import AsyncSessionStore, SessionStore
from memsess.testing import LocalCluster

TICK = 0.010  # seconds between ticks the ticker asks for
HUNG = 0  # the server that hangs


class Ticker:
    """Lateness of each tick of a task that sleeps TICK seconds at a time."""

    def __init__(self) -> None:
        self.late: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(TICK)
            now = time.monotonic()
            self.late.append(max(0.0, now - last - TICK))
            last = now


async def scenario(
    cluster: LocalCluster,
    name: str,
    *,
    tasks: int,
    hang: float,
    calm: float,
    pace: float,
) -> dict[str, Any]:
    dsn = cluster.dsn(timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)
    data = make_session(2000)
    if name == "async":
        store: Any = AsyncSessionStore.from_dsn(dsn, redundancy=2)
        load: Callable[[str], Awaitable[Any]] = store.load
        save: Callable[[str, Any], Awaitable[None]] = store.save
    else:
        blocking = store = SessionStore.from_dsn(dsn, redundancy=2)

        async def load(sid: str) -> Any:
            return blocking.load(sid)  # on the loop's thread, as a framework would

        async def save(sid: str, value: Any) -> None:
            blocking.save(sid, value)

    sids = [store.new_id() for _ in range(200)]
    for sid in sids:
        await save(sid, data)
    stop = asyncio.Event()
    ticker = Ticker()
    worst = 0.0
    wrong = 0
    ops = 0

    async def worker(seed: int) -> None:
        nonlocal worst, wrong, ops
        rng = random.Random(seed)
        while not stop.is_set():
            sid = rng.choice(sids)
            started = time.monotonic()
            if await load(sid) != data:
                wrong += 1
            await save(sid, data)
            worst = max(worst, time.monotonic() - started)
            ops += 2
            await asyncio.sleep(pace)

    async def fault() -> None:
        await asyncio.sleep(calm)
        cluster.hang(HUNG)
        await asyncio.sleep(hang)
        cluster.resume(HUNG)
        await asyncio.sleep(calm)
        stop.set()

    try:
        await asyncio.gather(ticker.run(stop), fault(), *(worker(n) for n in range(tasks)))
    finally:
        if cluster.servers[HUNG].hung:
            cluster.resume(HUNG)
        if name == "async":
            await store.aclose()
        else:
            store.close()
    late = sorted(ticker.late)
    return {
        "store": "AsyncSessionStore" if name == "async" else "SessionStore on the loop",
        "ticks": len(late),
        "p50": statistics.median(late) if late else 0.0,
        "p99": late[int(len(late) * 0.99)] if late else 0.0,
        "max": late[-1] if late else 0.0,
        "worst": worst,
        "ops": ops,
        "wrong": wrong,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tasks", type=int, default=10, help="tasks of load+save cycles")
    parser.add_argument(
        "--pace",
        type=float,
        default=0.005,
        help="seconds each task sleeps between cycles (the loop is not kept busy: lateness"
        " then shows blocking, not a loop saturated with work)",
    )
    parser.add_argument("--hang", type=float, default=3.0, help="seconds the server hangs")
    args = parser.parse_args(argv)
    smoke = is_smoke(args.smoke)
    hang, calm = (0.3, 0.1) if smoke else (args.hang, 0.5)
    rows = []
    with local_cluster(3) as cluster:
        for name in ("async", "sync"):
            rows.append(
                asyncio.run(
                    scenario(cluster, name, tasks=args.tasks, hang=hang, calm=calm, pace=args.pace)
                )
            )
            time.sleep(RETRY_INTERVAL if not smoke else 0)  # the hung server probed again
    print(
        f"\nA ticker every {TICK * 1000:g} ms on the loop; {args.tasks} tasks of load+save,"
        f" each pausing {args.pace * 1000:g} ms between cycles;"
        f" server {HUNG} hung for {hang:g} s (timeout {TIMEOUT:g} s, redundancy 2,"
        " 2 KB sessions)\n"
    )
    print("| store | ticks | tick late p50 ms | p99 ms | max ms | worst request ms | ops | wrong |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['store']} | {row['ticks']} | {row['p50'] * 1000:.2f} | {row['p99'] * 1000:.1f}"
            f" | {row['max'] * 1000:.1f} | {row['worst'] * 1000:.1f} | {row['ops']}"
            f" | {row['wrong']} |"
        )
    if any(row["wrong"] for row in rows):
        raise SystemExit("wrong answers: see the table")


if __name__ == "__main__":
    main()
