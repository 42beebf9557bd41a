"""Throughput of one store shared by 1, 4 and 16 threads.

Each thread runs load+save cycles (redundancy 2, ~2 KB sessions) on its own
sessions for a fixed time; the figure is store operations per second (a
cycle is two). pymemcache's HashClient with ``use_pooling=True`` (its
thread-safe mode) runs the same cycles, one copy, for reference.

On a 2-core machine that also runs the three memcached servers, more threads
mainly show that sharing a store costs nothing (no lock held across I/O);
the GIL caps the total.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.baselines import PymemcacheHash
from bench.common import (
    RETRY_INTERVAL,
    SIZES,
    TIMEOUT,
    TTL,
    addresses,
    is_smoke,
    local_cluster,
    machine_load,
    make_session,
    memsess_store,
    placement,
)

__all__ = ["main", "run_threads"]

THREAD_COUNTS = (1, 4, 16)
SESSIONS_PER_THREAD = 20


def run_threads(
    threads: int,
    make_cycle: Callable[[int], Callable[[], None]],
    *,
    seconds: float,
    max_cycles: int,
) -> tuple[float, int]:
    """Run ``make_cycle(thread_no)()`` in ``threads`` threads for ``seconds``
    (or ``max_cycles`` per thread); return (store operations per second, errors)."""
    counts = [0] * threads
    errors = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(n: int) -> None:
        cycle = make_cycle(n)
        start.wait()
        deadline = stop_at[0]
        done = 0
        while done < max_cycles and time.perf_counter() < deadline:
            try:
                cycle()
            except Exception as exc:
                errors[n] += 1
                if errors[n] == 1:
                    print(f"  thread {n}: {exc!r}", file=sys.stderr)
            done += 1
        counts[n] = done

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - t0
    return 2 * sum(counts) / elapsed, sum(errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check it runs")
    parser.add_argument("--seconds", type=float, default=3.0, help="per thread count")
    parser.add_argument("--size", choices=list(SIZES), default="2KB")
    args = parser.parse_args(argv)
    smoke = is_smoke(args.smoke)
    seconds = 0.2 if smoke else args.seconds
    max_cycles = 20 if smoke else 1_000_000
    data = make_session(SIZES[args.size])
    failed = 0
    print(f"\nThreads sharing one client, load+save cycles, {args.size} sessions")
    print(f"{placement()}; {machine_load()}")
    print("\n| threads | memsess r2 ops/s | HashClient (pooled, 1 copy) ops/s |")
    print("| --- | --- | --- |")
    with local_cluster(3) as cluster:
        store = memsess_store(cluster, redundancy=2)
        hash_client = PymemcacheHash(
            addresses(cluster),
            ttl=TTL,
            timeout=TIMEOUT,
            dead_timeout=RETRY_INTERVAL,
            use_pooling=True,
        )
        try:
            for threads in THREAD_COUNTS:
                sids = [
                    [store.new_id() for _ in range(SESSIONS_PER_THREAD)] for _ in range(threads)
                ]
                for own in sids:
                    for sid in own:
                        store.save(sid, data)

                def memsess_cycle(n: int, sids: list[list[str]] = sids) -> Callable[[], None]:
                    own = itertools.cycle(sids[n])

                    def cycle() -> None:
                        sid = next(own)
                        loaded: dict[str, Any] | None = store.load(sid)
                        if loaded is None:
                            raise RuntimeError("a saved session read as missing")
                        store.save(sid, loaded)

                    return cycle

                def hash_cycle(n: int) -> Callable[[], None]:
                    keys = [f"bench:threads:{n}:{i}".encode() for i in range(SESSIONS_PER_THREAD)]
                    for key in keys:
                        hash_client.save(key, data)
                    own = itertools.cycle(keys)

                    def cycle() -> None:
                        key = next(own)
                        hash_client.save(key, hash_client.load(key) or data)

                    return cycle

                ours, our_errors = run_threads(
                    threads, memsess_cycle, seconds=seconds, max_cycles=max_cycles
                )
                theirs, their_errors = run_threads(
                    threads, hash_cycle, seconds=seconds, max_cycles=max_cycles
                )
                failed += our_errors + their_errors
                print(f"| {threads} | {ours:,.0f} | {theirs:,.0f} |")
        finally:
            store.close()
            hash_client.close()
    if failed:
        print(f"{failed} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
