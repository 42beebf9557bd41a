"""What the concurrency policies cost a request (issue 11): a request cycle (load, then
a conditional save) under "merge", "overwrite" and "lock", one at a time with no
conflict, counting the round trips (batches) of each; and the price of a conflict: a
save that meets another request's save and merges.

Wall time and the calling thread's CPU per cycle, the candidates taking turns, on three
local memcached servers, 2 KB sessions, redundancy 2.

``python -m bench.concurrency [--smoke]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import RETRY_INTERVAL, TIMEOUT, is_smoke, local_cluster, make_session, measure
from memsess import SessionStore
from memsess.testing import LocalCluster

REDUNDANCY = 2
PHP_SCRIPT = Path(__file__).resolve().parent / "php_session_cycle.php"


def php_with_memcached() -> str | None:
    """The php command when it has the memcached extension (php-memcached), else None."""
    php = shutil.which("php")
    if php is None:
        return None
    modules = subprocess.run([php, "-m"], capture_output=True, text=True, check=False).stdout
    return php if "memcached" in modules.split() else None


def php_session_cycle(
    php: str, save_path: str, iterations: int, handler: str, *settings: str
) -> dict[str, Any]:
    """One run of bench/php_session_cycle.php: its JSON answer (wall_us, cpu_us, key),
    a RuntimeError when the session read back at the end was not the one written."""
    out = subprocess.run(
        [php, str(PHP_SCRIPT), save_path, str(iterations), handler, *settings],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    if not result["ok"]:
        raise RuntimeError(f"the PHP session cycle read back the wrong data: {out}")
    return result


def php_cycles(
    php: str, cluster: LocalCluster, *, iterations: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """PHP's memcached session handler, a session_start + write_close cycle, with and
    without its session lock, 2 copies (sess_number_of_replicas=1): the best (wall us,
    process CPU us) per cycle of ``rounds`` runs."""
    save_path = ",".join(server.address for server in cluster.servers)
    found: dict[str, tuple[float, float]] = {}
    for name, locking in (("PHP memcached, sess_locking on", "1"), ("PHP memcached, no lock", "0")):
        best = (float("inf"), float("inf"))
        for _ in range(rounds):
            result = php_session_cycle(
                php,
                save_path,
                iterations,
                "memcached",
                f"memcached.sess_locking={locking}",
                "memcached.sess_number_of_replicas=1",
                "memcached.sess_binary_protocol=1",  # replicas need it
            )
            best = min(best, (result["wall_us"], result["cpu_us"]))
        found[name] = best
    return found


def _store(cluster: LocalCluster) -> SessionStore:
    dsn = cluster.dsn(timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)
    return SessionStore.from_dsn(dsn, redundancy=REDUNDANCY)


class Batches:
    """Counts the batches (round trips to the replica set) a store runs."""

    def __init__(self, store: SessionStore) -> None:
        self.count = 0
        cluster = store._cluster
        execute = cluster.execute

        def counted(batch: Any, *args: Any, **kwargs: Any) -> Any:
            if batch:  # (a retry's pause runs an empty one: no round trip)
                self.count += 1
            return execute(batch, *args, **kwargs)

        cluster.execute = counted  # type: ignore[method-assign]


def cycles(store: SessionStore, data: dict[str, Any]) -> dict[str, Callable[[], None]]:
    sids = {name: store.new_id() for name in ("merge", "overwrite", "lock", "conflict")}
    for sid in sids.values():
        store.save(sid, data)

    def cycle(sid: str, policy: str) -> Callable[[], None]:
        def run() -> None:
            snapshot = store.fetch(sid)
            assert snapshot is not None
            store.save(sid, snapshot.data, snapshot=snapshot, on_conflict=policy)

        return run

    def locked() -> None:
        with store.lock(sids["lock"]):
            cycle(sids["lock"], "merge")()

    def conflict() -> None:
        # Two requests loaded the session; the other saves first, this one merges.
        sid = sids["conflict"]
        mine, theirs = store.fetch(sid), store.fetch(sid)
        assert mine is not None
        assert theirs is not None
        store.save(sid, {**theirs.data, "other": 1}, snapshot=theirs, on_conflict="merge")
        store.save(sid, {**mine.data, "mine": 1}, snapshot=mine, on_conflict="merge")

    return {
        "merge (no conflict)": cycle(sids["merge"], "merge"),
        "overwrite": cycle(sids["overwrite"], "overwrite"),
        "lock": locked,
        "two requests, the second merging": conflict,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    smoke = is_smoke(args.smoke)
    data = make_session(2000)
    with local_cluster(3) as cluster:
        store = _store(cluster)
        try:
            candidates = cycles(store, data)
            counter = Batches(store)
            trips = {}
            for name, run in candidates.items():
                before = counter.count
                run()
                trips[name] = counter.count - before
            timings = measure(
                candidates, calls=5 if smoke else 200, rounds=2 if smoke else 15, warmup=1
            )
        finally:
            store.close()
        php = php_with_memcached()
        php_rows = (
            {}
            if php is None
            else php_cycles(php, cluster, iterations=5 if smoke else 2000, rounds=1 if smoke else 5)
        )
    print(
        f"\nA request cycle (load, then a conditional save), 2 KB session, redundancy"
        f" {REDUNDANCY}, one at a time\n"
    )
    print("| policy | round trips | wall us | CPU us |")
    print("| --- | --- | --- | --- |")
    for name, timing in timings.items():
        print(f"| {name} | {trips[name]} | {timing.us:.1f} | {timing.cpu_us:.1f} |")
    for name, (wall, cpu) in php_rows.items():
        print(f"| {name} (2 copies; CPU: the PHP process's) | | {wall:.1f} | {cpu:.1f} |")
    if php is None:
        print(
            "\n(PHP's memcached extension, with its session lock, is not installed here:"
            " `apt-get install php-cli php-memcached` for its rows; not measured.)"
        )


if __name__ == "__main__":
    main()
