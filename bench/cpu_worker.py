"""The measuring end of bench/cpu.py: one memsess tree's stores, timed on request.

bench/cpu.py runs it as a script (``python bench/cpu_worker.py``) with PYTHONPATH set
to the tree to measure: the checkout (the pure build) or a ``scripts/build-compiled
--into`` folder (the compiled one). It imports nothing of the bench, so no bench module
can shadow one of the tree's; bench/cpu.py imports its timing helpers (``timed``,
``async_timed``, ``run_threads``) so that memsess and its peers are timed by one code.
One JSON request per line on stdin, one JSON answer per line on stdout; times are
seconds per operation, ``[wall, cpu]``, cpu being this thread's (``time.thread_time()``):

- first ``{"dsn", "redundancy", "ttl", "data", "warmup", "compiled"}``: builds a
  ``SessionStore`` and an ``AsyncSessionStore``, checks a saved session loads back,
  warms up; answers ``{"memsess": <package path>, "compiled": bool, "build": str}``;
- ``{"do": "round", "calls": N}``: N of each of ``load``, ``save``, ``touch``,
  ``delete`` (of N sessions saved just before, untimed) and a ``load+save`` cycle, then
  N ``load``, ``save`` and ``load+save`` of the async store, each batch of N one
  ``run_until_complete``; answers ``{"sync": {op: [wall, cpu]}, "async": {...}}``;
- ``{"do": "threads", "threads": T, "seconds": S, "max_cycles": K}``: T threads
  sharing the store run load+save cycles on sessions of their own; answers
  ``{"ops_per_second", "cpu_per_op" (the process's CPU), "errors"}``;
- ``{"do": "pieces", "calls": N, "number": M}``: where a ``load`` goes, layer by layer
  (``fanout()`` of its two gets, ``Cluster.execute()``, ``load``: N calls each) and
  piece by piece without I/O (M calls each); answers ``{"pieces": {name: [wall, cpu]
  or "error"}}`` (they reach into memsess's internals, which may change: a piece that
  fails is reported, not fatal);
- ``{"do": "profile", "calls": N}``: cProfile of N loads (this thread's CPU); answers ``{"shares":
  {place: share of own time}}`` (meaningful for the pure build only: compiled
  functions are invisible to cProfile).

Any failure answers ``{"error": "..."}`` and ends the worker.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import itertools
import json
import os
import pstats
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memsess import AsyncSessionStore, SessionStore

__all__ = ["PIECES", "async_timed", "run_threads", "timed"]

SESSIONS_PER_THREAD = 20
#: What a "pieces" request measures (see _piece_builders).
PIECES = ("fanout", "execute", "load", "parse", "decode", "unpack", "keys")


def timed(operation: Callable[[], object], calls: int) -> list[float]:
    """[wall, cpu] seconds per call of ``calls`` calls in a row."""
    gc.collect()
    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    for _ in range(calls):
        operation()
    wall = time.perf_counter() - t0
    return [wall / calls, (time.thread_time() - cpu0) / calls]


def async_timed(
    loop: asyncio.AbstractEventLoop, operation: Callable[[], Awaitable[object]], calls: int
) -> list[float]:
    """[wall, cpu] seconds per await of ``calls`` awaits in a row, in one
    ``run_until_complete`` (whose own cost, a few us, is spread over the calls)."""

    async def repeat() -> None:
        for _ in range(calls):
            await operation()

    wall, cpu = timed(lambda: loop.run_until_complete(repeat()), 1)
    return [wall / calls, cpu / calls]


def run_threads(
    threads: int,
    make_cycle: Callable[[int], Callable[[], None]],
    *,
    seconds: float,
    max_cycles: int,
) -> dict[str, float]:
    """``make_cycle(n)()`` (a load+save cycle: two operations) in ``threads`` threads
    for ``seconds`` (or ``max_cycles`` each); operations per second, the process's CPU
    seconds per operation, and the cycles that raised."""
    counts = [0] * threads
    errors = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(n: int) -> None:
        cycle = make_cycle(n)
        start.wait()
        deadline, done = stop_at[0], 0
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
    gc.collect()
    stop_at[0] = time.perf_counter() + seconds
    cpu0, t0 = time.process_time(), time.perf_counter()
    start.wait()
    for thread in pool:
        thread.join()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    operations = 2 * sum(counts)
    return {
        "ops_per_second": operations / elapsed,
        "cpu_per_op": cpu / max(operations, 1),
        "errors": sum(errors),
    }


class _Stores:
    """The two stores of one tree on the bench's cluster, and their sessions."""

    def __init__(self, setup: dict[str, Any]) -> None:
        from memsess import AsyncSessionStore, SessionStore

        options = {"redundancy": setup["redundancy"], "ttl": setup["ttl"]}
        self.data: dict[str, Any] = setup["data"]
        self.store: SessionStore = SessionStore.from_dsn(setup["dsn"], **options)
        self.aio: AsyncSessionStore = AsyncSessionStore.from_dsn(setup["dsn"], **options)
        self.loop = asyncio.new_event_loop()
        self.sid, self.cycle_sid = self.store.new_id(), self.store.new_id()
        self.async_sid = self.aio.new_id()
        self.store.save(self.sid, self.data)
        self.store.save(self.cycle_sid, self.data)
        self.loop.run_until_complete(self.aio.save(self.async_sid, self.data))
        if self.store.load(self.sid) != self.data:
            raise RuntimeError("the session saved did not load back the same")
        for _ in range(setup["warmup"]):
            self.cycle()
            self.loop.run_until_complete(self.async_cycle())

    def cycle(self, sid: str | None = None) -> None:
        sid = sid or self.cycle_sid
        loaded = self.store.load(sid)
        if loaded is None:
            raise RuntimeError("a saved session read as missing")
        self.store.save(sid, loaded)

    async def async_cycle(self) -> None:
        loaded = await self.aio.load(self.async_sid)
        if loaded is None:
            raise RuntimeError("a saved session read as missing (async store)")
        await self.aio.save(self.async_sid, loaded)

    def round(self, calls: int) -> dict[str, dict[str, list[float]]]:
        store, aio, data = self.store, self.aio, self.data
        doomed = [store.new_id() for _ in range(calls)]
        for sid in doomed:
            store.save(sid, data)
        next_doomed = iter(doomed).__next__
        sync = {
            "load": timed(lambda: store.load(self.sid), calls),
            "save": timed(lambda: store.save(self.sid, data), calls),
            "touch": timed(lambda: store.touch(self.sid), calls),
            "delete": timed(lambda: store.delete(next_doomed()), calls),
            "load+save": timed(self.cycle, calls),
        }
        asynchronous = {
            "load": async_timed(self.loop, lambda: aio.load(self.async_sid), calls),
            "save": async_timed(self.loop, lambda: aio.save(self.async_sid, data), calls),
            "load+save": async_timed(self.loop, self.async_cycle, calls),
        }
        return {"sync": sync, "async": asynchronous}

    def threads(self, threads: int, seconds: float, max_cycles: int) -> dict[str, float]:
        sids = [[self.store.new_id() for _ in range(SESSIONS_PER_THREAD)] for _ in range(threads)]
        for sid in itertools.chain.from_iterable(sids):
            self.store.save(sid, self.data)

        def make_cycle(n: int) -> Callable[[], None]:
            own = itertools.cycle(sids[n]).__next__
            return lambda: self.cycle(own())

        return run_threads(threads, make_cycle, seconds=seconds, max_cycles=max_cycles)

    def close(self) -> None:
        self.store.close()
        self.loop.run_until_complete(self.aio.aclose())
        self.loop.close()


def _pieces(stores: _Stores, calls: int, number: int) -> dict[str, list[float] | str]:
    """Where a load goes: its layers with I/O (``calls`` each), then its pieces
    without (``number`` each); a piece whose internals moved is reported as an error."""
    try:
        builders = _piece_builders(stores, calls, number)
    except Exception as exc:  # memsess's internals moved: say so, measure the rest
        return {name: f"{type(exc).__name__}: {exc}" for name in PIECES}
    found: dict[str, list[float] | str] = {}
    for name, (build, count) in builders.items():
        try:
            found[name] = timed(build(), count)
        except Exception as exc:
            found[name] = f"{type(exc).__name__}: {exc}"
    return found


def _piece_builders(
    stores: _Stores, calls: int, number: int
) -> dict[str, tuple[Callable[[], Callable[[], object]], int]]:
    """name: (what makes the callable to time, how many calls)."""
    from memsess import protocol
    from memsess.records import DATA, FLAGS, decode_record, encode_record
    from memsess.transport import DEFAULT_STRAGGLER_WINDOW, FirstReply, fanout

    store, sid = stores.store, stores.sid
    key = store.storage_key(sid)
    cluster = store._cluster
    targets = cluster.targets(key.decode("ascii"))
    get = protocol.get(key, cas=True)
    serializer = store.serializer
    payload = serializer.dumps(stores.data)

    def two_gets() -> Callable[[], object]:
        pools = [cluster.pools[index] for index in targets]
        return lambda: fanout(pools, [get, get])

    def execute() -> Callable[[], object]:
        batch = [(index, get) for index in targets]
        return lambda: cluster.execute(batch, FirstReply(DEFAULT_STRAGGLER_WINDOW))

    def parse() -> Callable[[], object]:
        record = encode_record(1, DATA, serializer.id, payload)
        reply = b"VALUE %b %d %d 4242\r\n%b\r\nEND\r\n" % (key, FLAGS, len(record), record)

        def parse_two() -> None:
            for _ in range(2):
                parser = protocol.ClientProtocol()
                parser.send(get)
                parser.receive_data(reply)
                parser.next_reply()

        return parse_two

    def decode() -> Callable[[], object]:
        record = encode_record(1, DATA, serializer.id, payload)
        return lambda: (decode_record(record, FLAGS), decode_record(record, FLAGS))

    return {
        "fanout": (two_gets, calls),
        "execute": (execute, calls),
        "load": (lambda: lambda: store.load(sid), calls),
        "parse": (parse, number),
        "decode": (decode, number),
        "unpack": (lambda: lambda: serializer.loads(payload), number),
        "keys": (lambda: lambda: cluster.targets(store.storage_key(sid).decode("ascii")), number),
    }


def _profile(stores: _Stores, calls: int) -> dict[str, float]:
    """Shares of own time of ``calls`` loads under cProfile, by place."""
    # Timed by this thread's CPU clock, as every figure of the bench: with the default
    # (wall) clock, the waits in poll would count as the system call's own time.
    tracer = cProfile.Profile(time.thread_time)
    load, sid = stores.store.load, stores.sid
    tracer.enable()
    for _ in range(calls):
        load(sid)
    tracer.disable()
    by_place: dict[str, float] = {}
    stats = pstats.Stats(tracer)
    for (filename, _, function), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        place = _place(filename, function)
        by_place[place] = by_place.get(place, 0.0) + own
    total = sum(by_place.values()) or 1.0
    return {place: own / total for place, own in by_place.items()}


def _place(filename: str, function: str) -> str:
    """A memsess module, a system call, msgpack, or the rest."""
    if "/memsess/" in filename:
        return "memsess/" + filename.rsplit("/memsess/", 1)[1]
    if filename == "~":  # a built-in
        for call in ("send", "recv", "poll", "sendall", "recv_into"):
            if f"'{call}'" in function:
                return "system calls (send, recv, poll)"
        if "msgpack" in function or "unpackb" in function or "packb" in function:
            return "msgpack"
        name = function.strip("<>").removeprefix("built-in method ").removeprefix("builtins.")
        return f"built-in: {name}"
    return "other Python"


def _answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve() -> None:
    # This script's folder (bench/) heads sys.path: drop it, so none of the
    # bench's modules can shadow a module the measured tree imports.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
    import memsess
    from memsess._build import describe

    setup = json.loads(sys.stdin.readline())
    stores = _Stores(setup)
    try:
        _answer(
            {
                "memsess": os.path.dirname(os.path.abspath(memsess.__file__)),
                "compiled": bool(getattr(memsess, "__compiled__", False)),
                "build": describe(),
            }
        )
        for line in sys.stdin:
            request = json.loads(line)
            action = request["do"]
            if action == "round":
                _answer(stores.round(request["calls"]))
            elif action == "threads":
                _answer(
                    stores.threads(request["threads"], request["seconds"], request["max_cycles"])
                )
            elif action == "pieces":
                _answer({"pieces": _pieces(stores, request["calls"], request["number"])})
            elif action == "profile":
                _answer({"shares": _profile(stores, request["calls"])})
            else:
                raise ValueError(f"unknown request {action!r}")
    finally:
        stores.close()


def main() -> int:
    try:
        serve()
    except Exception as exc:
        _answer({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
