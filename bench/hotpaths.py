"""Where the time of ``load`` and ``save`` (redundancy 2) goes, layer by layer.

``python -m bench.hotpaths`` prints three things:

1. a layer breakdown, the candidates taking turns (see bench/common.py):
   the raw-socket floor (one get; two gets sent at once and read with poll),
   memsess's transport alone (``fanout``), the cluster (``Cluster.execute``:
   fan-out plus health bookkeeping), the whole store call, and the store call
   with the cluster replaced by canned replies (the CPU the store itself
   spends: ids, keys, records, serializer, the plan);
2. the CPU cost of each step of the path, one at a time (``timeit``, no I/O);
3. a profile of many calls: cProfile sorted by own time (``--profiler
   pyinstrument`` for a sampling profile, which distorts small functions less).

It reaches into private attributes of the store (``_cluster``, ``_clock``):
this is a measuring tool, not an example.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import select
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from typing import Any

from bench.common import (
    SIZES,
    addresses,
    is_smoke,
    local_cluster,
    machine_load,
    make_session,
    measure,
    memsess_store,
    placement,
)
from bench.floor import RawTCP, raw_fanout_set, set_command
from memsess import SessionStore, protocol
from memsess.protocol import ClientProtocol, Command
from memsess.records import DATA, FLAGS, decode_record, encode_record, is_valid_id
from memsess.transport import DEFAULT_STRAGGLER_WINDOW, FirstReply, Result, WaitRule, fanout

__all__ = ["main"]


def _poll_two_gets(connections: Sequence[RawTCP], line: bytes) -> None:
    """The least a poll-driven two-copy read can do: send both, poll, read each
    reply whole (our replies end with END)."""
    poller = select.poll()
    pending = {}
    for conn in connections:
        conn.sock.send(line)
        poller.register(conn.sock.fileno(), select.POLLIN)
        pending[conn.sock.fileno()] = (conn.sock, bytearray())
    while pending:
        for fd, _ in poller.poll(1000):
            sock, buffer = pending[fd]
            buffer += sock.recv(262144)
            if buffer.endswith(b"END\r\n"):
                poller.unregister(fd)
                del pending[fd]


def _canned(store: SessionStore) -> SessionStore:
    """The same store, its cluster answering every batch with the replies the
    first such batch got: what is left is the store's own CPU time."""
    cluster = store._cluster
    real = cluster.execute
    replies: dict[tuple[bytes, int], list[Result]] = {}

    def execute(
        batch: Sequence[tuple[int, Command]], rule: WaitRule, record: bool = True
    ) -> list[Result]:
        shape = (batch[0][1].data.split(b" ", 1)[0], len(batch))
        if shape not in replies:
            replies[shape] = real(batch, rule, record=record)
            return replies[shape]
        now = time.monotonic()
        for slot, result in enumerate(replies[shape]):  # the plan's rule reads each reply
            rule.on_result(slot, result, now)
        return replies[shape]

    cluster.execute = execute  # type: ignore[method-assign]
    return store


def layers(
    store: SessionStore, canned: SessionStore, data: dict[str, Any], *, calls: int, rounds: int
) -> None:
    """Section 1: the layer breakdown."""
    sid = store.new_id()
    store.save(sid, data)
    key = store.storage_key(sid)
    cluster = store._cluster
    targets = cluster.targets(key.decode("ascii"))
    pools = [cluster.pools[index] for index in targets]
    get = protocol.get(key, cas=True)
    record = encode_record(1, DATA, store.serializer.id, store.serializer.dumps(data), ttl=60)
    put = protocol.set(key, record, flags=FLAGS, exptime=store.ttl)
    window = DEFAULT_STRAGGLER_WINDOW
    servers = [cluster.servers[index] for index in targets]
    raw = [RawTCP((spec.host, spec.port)) for spec in servers]
    canned.save(sid, data)
    canned.load(sid)
    raw_set = set_command(b"bench:hot:raw", record, store.ttl)
    raw[0].set(b"bench:hot:raw", record)
    try:
        timings = measure(
            {
                "raw: single get": lambda: raw[0].get(b"bench:hot:raw"),
                "raw: two gets, poll": lambda: _poll_two_gets(raw, get.data),
                "memsess fanout(): two gets": lambda: fanout(pools, [get, get]),
                "memsess Cluster.execute(): two gets": lambda: cluster.execute(
                    [(index, get) for index in targets], FirstReply(window)
                ),
                "memsess load r2": lambda: store.load(sid),
                "memsess load r2, canned replies (store CPU)": lambda: canned.load(sid),
                "raw: two-copy fan-out set": lambda: raw_fanout_set(raw[0], raw[1], raw_set),
                "memsess fanout(): two sets": lambda: fanout(pools, [put, put]),
                "memsess Cluster.execute(): two sets": lambda: cluster.execute(
                    [(index, put) for index in targets], FirstReply(window)
                ),
                "memsess save r2": lambda: store.save(sid, data),
                "memsess save r2, canned replies (store CPU)": lambda: canned.save(sid, data),
            },
            calls=calls,
            rounds=rounds,
        )
    finally:
        for conn in raw:
            conn.close()
    print("\n1. Layers (median of rounds, us per call: wall clock, and CPU of this thread)\n")
    print(f"  {'':45} {'wall':>8} {'CPU':>8}")
    for timing in timings.values():
        print(f"  {timing.name:45} {timing.us:8.1f} {timing.cpu_us:8.1f}")


def steps(store: SessionStore, data: dict[str, Any], *, number: int) -> None:
    """Section 2: CPU per step, no I/O (timeit, best of 5)."""
    sid = store.new_id()
    key = store.storage_key(sid)
    serializer = store.serializer
    payload = serializer.dumps(data)
    record = encode_record(1, DATA, serializer.id, payload)
    get = protocol.get(key, cas=True)
    reply = b"VALUE %b %d %d 4242\r\n%b\r\nEND\r\n" % (key, FLAGS, len(record), record)
    cluster = store._cluster
    clock = store._clock

    def parse_reply() -> object:
        parser = ClientProtocol()
        parser.send(get)
        parser.receive_data(reply)
        return parser.next_reply()

    candidates: dict[str, Callable[[], object]] = {
        "is_valid_id(sid)": lambda: is_valid_id(sid),
        "storage_key(prefix, sid)": lambda: store.storage_key(sid),
        "Cluster.targets(key)": lambda: cluster.targets(key.decode("ascii")),
        "protocol.get(key, cas=True)": lambda: protocol.get(key, cas=True),
        "ClientProtocol(): parse one gets reply": parse_reply,
        "decode_record(raw, flags)": lambda: decode_record(record, FLAGS),
        "serializer.loads(payload)": lambda: serializer.loads(payload),
        "serializer.dumps(data)": lambda: serializer.dumps(data),
        "VersionClock.tick()": clock.tick,
        "encode_record(...)": lambda: encode_record(1, DATA, serializer.id, payload),
        "protocol.set(key, record, ...)": lambda: protocol.set(
            key, record, flags=FLAGS, exptime=1440
        ),
        "select.poll() + 2 register": _poller,
    }
    print(f"\n2. CPU per step, no I/O (best of 5 x {number}, us per call)\n")
    for name, fn in candidates.items():
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number
        print(f"  {name:45} {best * 1e6:8.2f}")


def _poller() -> select.poll:
    poller = select.poll()
    poller.register(0, select.POLLIN)
    poller.register(1, select.POLLIN)
    return poller


def profile(store: SessionStore, data: dict[str, Any], *, calls: int, profiler: str) -> None:
    """Section 3: ``calls`` loads then ``calls`` saves under a profiler."""
    sid = store.new_id()
    store.save(sid, data)
    operations: dict[str, Callable[[], object]] = {
        "load": lambda: store.load(sid),
        "save": lambda: store.save(sid, data),
    }
    for name, fn in operations.items():
        print(f"\n3. {profiler}: {calls} x memsess {name} r2\n")
        if profiler == "pyinstrument":
            try:
                from pyinstrument import Profiler
            except ImportError:
                print("  pyinstrument is not installed: pip install pyinstrument")
                return
            sampler = Profiler(interval=0.0001)
            sampler.start()
            for _ in range(calls):
                fn()
            sampler.stop()
            print(sampler.output_text(unicode=False, color=False, show_all=False))
            continue
        tracer = cProfile.Profile()
        tracer.enable()
        for _ in range(calls):
            fn()
        tracer.disable()
        out = io.StringIO()
        pstats.Stats(tracer, stream=out).sort_stats("tottime").print_stats(15)
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check it runs")
    parser.add_argument("--size", choices=list(SIZES), default="2KB")
    parser.add_argument("--profiler", choices=["cprofile", "pyinstrument"], default="cprofile")
    args = parser.parse_args(argv)
    smoke = is_smoke(args.smoke)
    data = make_session(SIZES[args.size])
    load_before = machine_load()
    with local_cluster(3) as cluster:
        print(f"memsess hot paths, {args.size} session, redundancy 2")
        print(f"{placement()}; {load_before}")
        print(f"servers: {', '.join(f'{h}:{p}' for h, p in addresses(cluster))}")
        with (
            memsess_store(cluster, redundancy=2) as store,
            _canned(memsess_store(cluster, redundancy=2)) as canned,
        ):
            layers(store, canned, data, calls=5 if smoke else 200, rounds=2 if smoke else 21)
            steps(store, data, number=10 if smoke else 20_000)
            profile(store, data, calls=20 if smoke else 5_000, profiler=args.profiler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
