"""The measuring end of bench/versus.py: one memsess tree's load and save, timed on request.

bench/versus.py runs it as a script (``python bench/versus_worker.py``) with
PYTHONPATH set to the tree to measure. It imports nothing of the bench and,
of that tree, only ``memsess.SessionStore`` (public API every revision has).
One JSON request per line on stdin, one JSON answer per line on stdout:

- first ``{"dsn": ..., "redundancy": 2, "ttl": 1440, "data": {...}, "warmup": 100}``:
  builds the store, saves a session and checks it loads back, warms up;
  answers ``{"memsess": "<path of the memsess package imported>"}``;
- then ``{"calls": N}``, once per round: N loads, then N saves, of that
  session; answers ``{"load": [wall, cpu], "save": [wall, cpu]}``, seconds
  per call, cpu being this thread's CPU time (``time.thread_time()``).

Any failure answers ``{"error": "..."}`` and ends the worker.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any


def _timed(operation: Callable[[], object], calls: int) -> list[float]:
    """[wall, cpu] seconds per call of ``calls`` calls in a row."""
    gc.collect()
    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    for _ in range(calls):
        operation()
    wall = time.perf_counter() - t0
    return [wall / calls, (time.thread_time() - cpu0) / calls]


def _answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve() -> None:
    # This script's folder (bench/) heads sys.path: drop it, so none of the
    # bench's modules can shadow a module the measured tree imports.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
    import memsess
    from memsess import SessionStore

    setup = json.loads(sys.stdin.readline())
    data: dict[str, Any] = setup["data"]
    store = SessionStore.from_dsn(setup["dsn"], redundancy=setup["redundancy"], ttl=setup["ttl"])
    try:
        sid = store.new_id()
        store.save(sid, data)
        if store.load(sid) != data:
            raise RuntimeError("the session saved did not load back the same")
        for _ in range(setup["warmup"]):
            store.load(sid)
            store.save(sid, data)
        _answer({"memsess": os.path.dirname(os.path.abspath(memsess.__file__))})
        for line in sys.stdin:
            calls = json.loads(line)["calls"]
            load = _timed(lambda: store.load(sid), calls)
            save = _timed(lambda: store.save(sid, data), calls)
            _answer({"load": load, "save": save})
    finally:
        store.close()


def main() -> int:
    try:
        serve()
    except Exception as exc:
        _answer({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
