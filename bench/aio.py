"""asyncio: memsess's AsyncSessionStore against the blocking store and aiomcache.

``python -m bench.aio`` starts a LocalCluster of 3 and measures, on one event
loop in this thread, with a 2 KB msgpack session:

1. latency, one operation at a time, the candidates taking turns within each
   round (bench/common.py): ``load``, ``save`` and a load+save cycle of
   ``AsyncSessionStore`` and of ``SessionStore`` (redundancy 2, same process,
   same servers), and of ``aiomcache.Client`` on one server (one copy: ``get``
   + ``msgpack.unpackb``, ``msgpack.packb`` + ``set``), the client
   aiohttp-session's memcached storage uses. Wall time and the CPU time of
   this thread (``time.thread_time()``) per operation, medians over rounds;
2. throughput: ``--tasks`` (100) tasks on the loop, each running load+save
   cycles on its own session for ``--seconds``, the async store against
   aiomcache with a pool of 2 (its default, what aiohttp-session's example
   gets) and of one connection per task; operations per second and CPU per
   operation, medians over rounds taken in turns, and the connections each
   client opened (from memcached's ``total_connections``);
3. the goal of issue 10: the async store reading two copies against aiomcache
   reading one, as aiomcache's time / memsess's (so above 1 memsess is
   faster), for wall and for CPU; >= 1.0x is the goal, never asserted;
4. a cProfile of ``--profile`` async loads, sorted by own time: where the
   async store spends its CPU.

Each batch of calls of an async candidate is one ``loop.run_until_complete``
(its cost, a few us, spread over ``--calls`` calls); the blocking store's
calls run in the same thread, the loop idle meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiomcache
import msgpack

from bench.common import (
    RETRY_INTERVAL,
    SIZES,
    TIMEOUT,
    TTL,
    LocalCluster,
    Timing,
    addresses,
    is_smoke,
    local_cluster,
    machine_load,
    make_session,
    measure,
    placement,
)
from bench.report import Goal
from memsess import AsyncSessionStore, SessionStore

__all__ = [
    "AiomcacheSessions",
    "Throughput",
    "latency",
    "load_goals",
    "main",
    "measure_load_goals",
    "throughput",
]

REDUNDANCY: Final = 2
#: aiomcache.Client's default pool size: what aiohttp-session's example gets.
AIOMCACHE_DEFAULT_POOL: Final = 2
OPERATIONS: Final = ("load", "save", "load+save")
#: memsess counters (memsess.metrics) that mean more than an operation done: with
#: no fault, a nonzero one under load is the store mistaking its own queue for a slow server.
EVENTS: Final = (
    "repairs",
    "partial_writes",
    "straggler_drops",
    "failovers",
    "server_state_changes",
)

Op = Callable[[], Awaitable[object]]


def _dsn(cluster: LocalCluster) -> str:
    # TCP whatever the cluster serves: aiomcache has no UDP.
    return cluster.dsn("tcp", timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)


def _key(name: str) -> bytes:
    """An aiomcache key as long as memsess's (``memsess:`` + a 43-character id)."""
    return f"bench:aio:{name}:".encode().ljust(51, b"0")


class AiomcacheSessions:
    """Sessions the way aiohttp-session's memcached storage keeps them: one
    ``aiomcache.Client`` (one server, one copy), here with msgpack."""

    def __init__(self, address: tuple[str, int], *, pool_size: int) -> None:
        self.client = aiomcache.Client(address[0], address[1], pool_size=pool_size)

    async def load(self, key: bytes) -> dict[str, Any] | None:
        raw = await self.client.get(key)
        if raw is None:
            return None
        data: dict[str, Any] = msgpack.unpackb(raw)
        return data

    async def save(self, key: bytes, data: dict[str, Any]) -> None:
        await self.client.set(key, msgpack.packb(data), exptime=TTL)

    async def close(self) -> None:
        await self.client.close()


class _RawGet(asyncio.Protocol):
    """The least an asyncio client can do for a get: one Protocol, the reply taken
    whole once it ends with END (no parsing, no records, no plan)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.endswith(b"END\r\n") and self.waiter is not None:
            self.waiter.set_result(self.buffer)
            self.buffer, self.waiter = b"", None


class RawFloor:
    """The asyncio floor for reading two copies: a get written to two servers at once,
    then both replies awaited (raw bytes, nothing decoded)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, servers: list[tuple[str, int]]) -> None:
        self.loop = loop
        self.servers = servers
        self.conns: list[_RawGet] = []

    async def open(self) -> None:
        for host, port in self.servers:
            _, conn = await self.loop.create_connection(_RawGet, host, port)
            self.conns.append(conn)

    async def load(self, key: bytes) -> None:
        waiters = []
        for conn in self.conns:
            conn.waiter = waiter = self.loop.create_future()
            waiters.append(waiter)
            assert conn.transport is not None
            conn.transport.write(b"get " + key + b"\r\n")
        for waiter in waiters:
            await waiter

    def close(self) -> None:
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()


def _batch(loop: asyncio.AbstractEventLoop, op: Op, calls: int) -> Callable[[], None]:
    """``calls`` awaits of ``op()`` in a row, as one blocking call."""

    async def repeat() -> None:
        for _ in range(calls):
            await op()

    return lambda: loop.run_until_complete(repeat())


def _sync_batch(op: Callable[[], object], calls: int) -> Callable[[], None]:
    def repeat() -> None:
        for _ in range(calls):
            op()

    return repeat


def _measure_batches(
    batches: Mapping[str, Callable[[], None]], *, calls: int, rounds: int
) -> dict[str, Timing]:
    """bench/common.py's ``measure`` with each call a batch of ``calls`` operations
    (the first batch of each, untimed, warms connections and adaptive windows up);
    the Timings per operation."""
    timings = measure(batches, calls=1, rounds=rounds, warmup=1)
    return {
        name: Timing(
            name,
            timing.per_call / calls,
            tuple(value / calls for value in timing.rounds),
            timing.cpu_per_call / calls,
        )
        for name, timing in timings.items()
    }


# -- 1. latency ------------------------------------------------------------------------


def latency(
    loop: asyncio.AbstractEventLoop,
    cluster: LocalCluster,
    data: dict[str, Any],
    *,
    calls: int,
    rounds: int,
    operations: tuple[str, ...] = OPERATIONS,
    blocking: bool = True,
) -> dict[tuple[str, str], Timing]:
    """Timings by (client, operation); clients "async", "sync" (when ``blocking``),
    "aiomcache"."""
    run = loop.run_until_complete
    async_store = AsyncSessionStore.from_dsn(_dsn(cluster), redundancy=REDUNDANCY, ttl=TTL)
    sync_store = SessionStore.from_dsn(_dsn(cluster), redundancy=REDUNDANCY, ttl=TTL)
    aiomc = AiomcacheSessions(addresses(cluster)[0], pool_size=AIOMCACHE_DEFAULT_POOL)
    floor = RawFloor(loop, addresses(cluster)[:REDUNDANCY])
    try:
        run(floor.open())
        sid, sync_sid = async_store.new_id(), sync_store.new_id()
        run(async_store.save(sid, data))
        sync_store.save(sync_sid, data)
        key = _key("latency")
        run(aiomc.save(key, data))
        for host_port in addresses(cluster)[:REDUNDANCY]:  # the floor reads both copies
            index = addresses(cluster).index(host_port)
            cluster.set_raw(index, key, msgpack.packb(data))

        async def async_cycle() -> None:
            loaded = await async_store.load(sid)
            assert loaded is not None
            await async_store.save(sid, loaded)

        def sync_cycle() -> None:
            loaded = sync_store.load(sync_sid)
            assert loaded is not None
            sync_store.save(sync_sid, loaded)

        async def aiomcache_cycle() -> None:
            loaded = await aiomc.load(key)
            assert loaded is not None
            await aiomc.save(key, loaded)

        async_ops: dict[str, Op] = {
            "load": lambda: async_store.load(sid),
            "save": lambda: async_store.save(sid, data),
            "load+save": async_cycle,
        }
        sync_ops: dict[str, Callable[[], object]] = {
            "load": lambda: sync_store.load(sync_sid),
            "save": lambda: sync_store.save(sync_sid, data),
            "load+save": sync_cycle,
        }
        aiomcache_ops: dict[str, Op] = {
            "load": lambda: aiomc.load(key),
            "save": lambda: aiomc.save(key, data),
            "load+save": aiomcache_cycle,
        }
        batches: dict[str, Callable[[], None]] = {}
        for operation in operations:
            batches[f"async {operation}"] = _batch(loop, async_ops[operation], calls)
            if blocking:
                batches[f"sync {operation}"] = _sync_batch(sync_ops[operation], calls)
            batches[f"aiomcache {operation}"] = _batch(loop, aiomcache_ops[operation], calls)
        if "load" in operations:
            batches["floor load"] = _batch(loop, lambda: floor.load(key), calls)
        timings = _measure_batches(batches, calls=calls, rounds=rounds)
    finally:
        floor.close()
        run(async_store.aclose())
        sync_store.close()
        run(aiomc.close())
    found: dict[tuple[str, str], Timing] = {}
    for name, timing in timings.items():
        client, operation = name.split(" ", 1)
        found[client, operation] = timing
    return found


# -- 2. throughput ---------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """One client's load+save cycles by concurrent tasks: per round, store
    operations per second and CPU seconds per operation (this thread's, and the
    whole process's, to catch work done by other threads)."""

    name: str
    ops_per_second: tuple[float, ...]
    cpu_per_op: tuple[float, ...]
    process_cpu_per_op: tuple[float, ...]
    errors: int
    warmup_connections: int  # opened on all servers before the timed rounds
    connections_per_op: float  # opened during the timed rounds, per operation
    #: What memsess's counters saw in the timed rounds beyond the operations themselves.
    events: Mapping[str, int] = field(default_factory=dict)

    @property
    def ops(self) -> float:
        return statistics.median(self.ops_per_second)

    @property
    def cpu_us(self) -> float:
        return statistics.median(self.cpu_per_op) * 1e6

    @property
    def process_cpu_us(self) -> float:
        return statistics.median(self.process_cpu_per_op) * 1e6

    @property
    def spread(self) -> float:
        """Range of ops/s over the median (0.05 = 5 %)."""
        return (max(self.ops_per_second) - min(self.ops_per_second)) / self.ops


async def _run_tasks(
    cycles: list[Callable[[], Awaitable[None]]], *, seconds: float, max_cycles: int
) -> tuple[int, int]:
    """Each cycle in a task of its own until ``seconds`` pass (or ``max_cycles``
    each); (cycles done, errors)."""
    deadline = time.perf_counter() + seconds
    errors = [0]

    async def task(cycle: Callable[[], Awaitable[None]]) -> int:
        done = 0
        while done < max_cycles and time.perf_counter() < deadline:
            try:
                await cycle()
            except Exception as exc:
                errors[0] += 1
                if errors[0] == 1:
                    print(f"  {exc!r}", file=sys.stderr)
            done += 1
        return done

    counts = await asyncio.gather(*(task(cycle) for cycle in cycles))
    return sum(counts), errors[0]


class _Connections:
    """Connections opened on every server of a cluster, from memcached's
    ``total_connections`` (less what asking for it adds)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        first = self._total()
        self.own = self._total() - first  # the admin connection(s) of one look

    def _total(self) -> int:
        servers = range(len(self.cluster.servers))
        return sum(int(self.cluster.stats(i)["total_connections"]) for i in servers)

    def mark(self) -> int:
        return self._total()

    def since(self, mark: int) -> int:
        return self._total() - mark - self.own


def _cycles(
    load: Callable[[Any], Awaitable[dict[str, Any] | None]],
    save: Callable[[Any, dict[str, Any]], Awaitable[None]],
    ids: list[Any],
) -> list[Callable[[], Awaitable[None]]]:
    """A load+save cycle on each id."""

    def cycle_of(one: Any) -> Callable[[], Awaitable[None]]:
        async def cycle() -> None:
            loaded = await load(one)
            if loaded is None:
                raise RuntimeError("a saved session read as missing")
            await save(one, loaded)

        return cycle

    return [cycle_of(one) for one in ids]


def _saver(
    save: Callable[[Any, dict[str, Any]], Awaitable[None]], ids: list[Any], data: dict[str, Any]
) -> Callable[[], Awaitable[None]]:
    """What saves ``data`` under each id, one after the other."""

    async def save_all() -> None:
        for one in ids:
            await save(one, data)

    return save_all


def throughput(
    loop: asyncio.AbstractEventLoop,
    cluster: LocalCluster,
    data: dict[str, Any],
    *,
    tasks: int,
    seconds: float,
    rounds: int,
    pools: tuple[int, ...],
    max_cycles: int = 1_000_000,
) -> list[Throughput]:
    """``tasks`` tasks, each on a session of its own; ``rounds`` timed rounds, the
    clients taking turns (who goes first rotates), after an untimed one each."""
    run = loop.run_until_complete
    store = AsyncSessionStore.from_dsn(_dsn(cluster), redundancy=REDUNDANCY, ttl=TTL)
    clients = {
        f"aiomcache, pool {size}": AiomcacheSessions(addresses(cluster)[0], pool_size=size)
        for size in pools
    }
    connections = _Connections(cluster)
    try:
        sids = [store.new_id() for _ in range(tasks)]
        keys = [_key(f"task-{n}") for n in range(tasks)]
        # Per client: its load+save cycles, one per task, and what saves their sessions.
        candidates = {f"memsess async store, r{REDUNDANCY}": _cycles(store.load, store.save, sids)}
        saves: dict[str, Callable[[], Awaitable[None]]] = {
            f"memsess async store, r{REDUNDANCY}": _saver(store.save, sids, data)
        }
        for name, client in clients.items():
            candidates[name] = _cycles(client.load, client.save, keys)
            saves[name] = _saver(client.save, keys, data)
        ops: dict[str, list[float]] = {name: [] for name in candidates}
        cpu: dict[str, list[float]] = {name: [] for name in candidates}
        process_cpu: dict[str, list[float]] = {name: [] for name in candidates}
        errors = dict.fromkeys(candidates, 0)
        warmup = dict.fromkeys(candidates, 0)
        opened = dict.fromkeys(candidates, 0)
        done_ops = dict.fromkeys(candidates, 0)
        # Untimed: the sessions saved, then a short round (pools fill).
        for name, cycles in candidates.items():
            mark = connections.mark()
            run(saves[name]())
            _, failed = run(_run_tasks(cycles, seconds=min(seconds, 0.2), max_cycles=max_cycles))
            errors[name] += failed
            warmup[name] = connections.since(mark)
        counted_before = store.stats()
        order = list(candidates.items())
        for round_no in range(rounds):
            shift = round_no % len(order)
            for name, cycles in order[shift:] + order[:shift]:
                mark = connections.mark()
                cpu0, process0 = time.thread_time(), time.process_time()
                t0 = time.perf_counter()
                done, failed = run(_run_tasks(cycles, seconds=seconds, max_cycles=max_cycles))
                elapsed = time.perf_counter() - t0
                operations = 2 * max(done, 1)
                cpu[name].append((time.thread_time() - cpu0) / operations)
                process_cpu[name].append((time.process_time() - process0) / operations)
                ops[name].append(2 * done / elapsed)
                errors[name] += failed
                opened[name] += connections.since(mark)
                done_ops[name] += operations
        counted = store.stats()
        events = {
            name: counted[name] - counted_before[name]
            for name in EVENTS
            if counted[name] != counted_before[name]
        }
    finally:
        run(store.aclose())
        for client in clients.values():
            run(client.close())
    return [
        Throughput(
            name,
            tuple(ops[name]),
            tuple(cpu[name]),
            tuple(process_cpu[name]),
            errors[name],
            warmup[name],
            opened[name] / max(done_ops[name], 1),
            events if name.startswith("memsess") else {},
        )
        for name in candidates
    ]


# -- 3. the goal -----------------------------------------------------------------------


def load_goals(timings: Mapping[tuple[str, str], Timing]) -> list[Goal]:
    """Issue 10: async load (two copies) / aiomcache get (one), wall and CPU."""
    ours, theirs = timings["async", "load"], timings["aiomcache", "load"]
    return [
        Goal(
            "async load r2 / aiomcache get (1 copy), wall",
            theirs.us / ours.us,
            1.0,
            True,
            "x",
            f"{ours.us:.1f} us vs {theirs.us:.1f} us",
        ),
        Goal(
            "async load r2 / aiomcache get (1 copy), CPU",
            theirs.cpu_us / ours.cpu_us,
            1.0,
            True,
            "x",
            f"{ours.cpu_us:.1f} us vs {theirs.cpu_us:.1f} us of this thread",
        ),
    ]


def measure_load_goals(
    cluster: LocalCluster, data: dict[str, Any], *, calls: int, rounds: int
) -> list[Goal]:
    """The two goals alone (for bench/report.py): async load against aiomcache get."""
    loop = asyncio.new_event_loop()
    try:
        timings = latency(
            loop, cluster, data, calls=calls, rounds=rounds, operations=("load",), blocking=False
        )
    finally:
        loop.close()
    return load_goals(timings)


# -- 4. profile ------------------------------------------------------------------------


def profile(
    loop: asyncio.AbstractEventLoop, cluster: LocalCluster, data: dict[str, Any], *, calls: int
) -> None:
    """cProfile of ``calls`` async loads, sorted by own time."""
    store = AsyncSessionStore.from_dsn(_dsn(cluster), redundancy=REDUNDANCY, ttl=TTL)
    try:
        sid = store.new_id()
        loop.run_until_complete(store.save(sid, data))
        repeat = _batch(loop, lambda: store.load(sid), calls)
        repeat()  # warm
        tracer = cProfile.Profile()
        tracer.enable()
        repeat()
        tracer.disable()
    finally:
        loop.run_until_complete(store.aclose())
    out = io.StringIO()
    stats = pstats.Stats(tracer, stream=out)
    stats.sort_stats("tottime").print_stats(20)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    by_place: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        place = _place(filename, function)
        by_place[place] = by_place.get(place, 0.0) + own
    total = sum(by_place.values())
    print("\nOwn time by place (shares hold better than cProfile's inflated times):\n")
    print("| place | share of own time |\n| --- | --- |")
    for place, own in sorted(by_place.items(), key=lambda item: -item[1]):
        if own / total >= 0.01:
            print(f"| {place} | {own / total:.0%} |")


def _place(filename: str, function: str) -> str:
    """Where a profiled function lives: a memsess module, the asyncio machinery, a
    system call, or the rest."""
    if "/memsess/" in filename:
        return "memsess/" + filename.rsplit("/memsess/", 1)[1]
    if "/asyncio/" in filename or filename.endswith("/selectors.py"):
        return "asyncio + selectors (stdlib)"
    if filename == "~":  # a built-in
        for call in ("send", "recv", "poll"):
            if f"'{call}'" in function:
                return f"system call: {call}"
        return "other built-ins"
    return "other Python"


# -- report ----------------------------------------------------------------------------


def print_latency(timings: Mapping[tuple[str, str], Timing]) -> None:
    labels = {
        "async": f"memsess AsyncSessionStore, r{REDUNDANCY}",
        "sync": f"memsess SessionStore, r{REDUNDANCY}",
        "aiomcache": "aiomcache.Client (1 server, 1 copy)",
        "floor": "raw asyncio Protocol, a get to 2 servers, both awaited (the floor)",
    }
    print("\n| client | op | wall us | CPU us | spread (wall IQR/median) |")
    print("| --- | --- | --- | --- | --- |")
    for client, label in labels.items():
        for operation in OPERATIONS:
            timing = timings.get((client, operation))
            if timing is not None:
                print(
                    f"| {label} | {operation} | {timing.us:.1f} | {timing.cpu_us:.1f} |"
                    f" {timing.spread:.0%} |"
                )
    print("\n| op | aiomcache / async, wall | CPU | sync / async, wall | CPU |")
    print("| --- | --- | --- | --- | --- |")
    for operation in OPERATIONS:
        ours = timings["async", operation]
        theirs, sync = timings["aiomcache", operation], timings["sync", operation]
        print(
            f"| {operation} | {theirs.us / ours.us:.2f}x | {theirs.cpu_us / ours.cpu_us:.2f}x |"
            f" {sync.us / ours.us:.2f}x | {sync.cpu_us / ours.cpu_us:.2f}x |"
        )


def print_throughput(found: list[Throughput], tasks: int) -> None:
    print(
        f"\n| client ({tasks} tasks, load+save cycles) | ops/s | CPU us per op |"
        " spread (ops/s range/median) | connections opened: warm-up, then per 1000 ops |"
        " errors |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for result in found:
        print(
            f"| {result.name} | {result.ops:,.0f} | {result.cpu_us:.1f} | {result.spread:.0%} |"
            f" {result.warmup_connections}, then {result.connections_per_op * 1000:.1f} |"
            f" {result.errors} |"
        )
    for result in found:
        if result.events:
            happened = ", ".join(f"{name} {count}" for name, count in result.events.items())
            print(f"  {result.name}, in the timed rounds, with no fault: {happened}")
        if result.process_cpu_us > 1.1 * result.cpu_us:
            print(
                f"  note: {result.name} used {result.process_cpu_us:.1f} us of process CPU per op,"
                f" {result.cpu_us:.1f} us in this thread: other threads work for it"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check it runs")
    parser.add_argument("--size", choices=list(SIZES), default="2KB", help="session size")
    parser.add_argument("--calls", type=int, default=200, help="calls per candidate per round")
    parser.add_argument("--rounds", type=int, default=25, help="latency rounds")
    parser.add_argument("--tasks", type=int, default=100, help="concurrent tasks (throughput)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per throughput round")
    parser.add_argument("--throughput-rounds", type=int, default=7)
    parser.add_argument("--profile", type=int, default=3000, metavar="LOADS", help="0: none")
    args = parser.parse_args(argv)
    smoke = is_smoke(args.smoke)
    calls, rounds = (3, 2) if smoke else (args.calls, args.rounds)
    seconds, throughput_rounds, max_cycles = (
        (0.05, 2, 3) if smoke else (args.seconds, args.throughput_rounds, 1_000_000)
    )
    profile_calls = min(args.profile, 20) if smoke else args.profile
    data = make_session(SIZES[args.size])
    load_before = machine_load()
    pools = (AIOMCACHE_DEFAULT_POOL, args.tasks)
    loop = asyncio.new_event_loop()
    try:
        with local_cluster(3) as cluster:
            print(
                f"\nasyncio: memsess AsyncSessionStore against SessionStore and aiomcache"
                f" {aiomcache.__version__}, {args.size} session, LocalCluster of 3,"
                f" {type(loop).__name__}"
            )
            print(f"{placement()}; {load_before}")
            print(f"\n1. one operation at a time: {rounds} rounds of {calls} calls, taking turns")
            timings = latency(loop, cluster, data, calls=calls, rounds=rounds)
            print_latency(timings)
            print(
                f"\n2. {args.tasks} tasks on one loop: {throughput_rounds} rounds of {seconds:g} s,"
                " taking turns"
            )
            found = throughput(
                loop,
                cluster,
                data,
                tasks=args.tasks,
                seconds=seconds,
                rounds=throughput_rounds,
                pools=pools,
                max_cycles=max_cycles,
            )
            print_throughput(found, args.tasks)
            print("\n3. issue 10's goal: aiomcache time / memsess time (> 1: memsess faster)")
            print(
                "\n| goal | measured | target | verdict | detail |\n| --- | --- | --- | --- | --- |"
            )
            for goal in load_goals(timings):
                print(goal.row())
            if profile_calls:
                print(f"\n4. cProfile: {profile_calls} x AsyncSessionStore.load, r{REDUNDANCY}\n")
                profile(loop, cluster, data, calls=profile_calls)
    finally:
        loop.close()
    if smoke:
        print("\n(smoke mode: tiny counts, the numbers mean nothing)")
    return 1 if any(result.errors for result in found) else 0


if __name__ == "__main__":
    sys.exit(main())
