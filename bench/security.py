"""TLS, authentication and sealed records: what each costs a load and a save.

``python -m bench.security [--smoke]`` starts four LocalClusters of 3 (plain TCP, TCP
with ASCII authentication, TLS, TLS with authentication; each its own memcached
processes) and measures, the candidates taking turns within each round (bench/common.py):

1. per operation on pooled connections, redundancy 2: ``SessionStore.load`` and
   ``save`` of a 2 KB msgpack session over plain TCP (the baseline), TCP + auth, TLS,
   TLS + auth, plain TCP with sealed records (``secret_keys``), and TLS + auth + sealed
   (the "secure" configuration); then a compressible 20 KB session plain, sealed, sealed
   and compressed (zlib, zstd when installed) and secure + zstd; beside them the peer
   baseline, pymemcache ``HashClient`` (one copy, msgpack) over plain TCP and over TLS.
   Wall time and the CPU time of this thread (``time.thread_time()``) per operation,
   medians over rounds, and both as a ratio to the plain-TCP memsess row of the same
   size and operation;
2. a new connection per operation: connect (+ TLS handshake) (+ auth) + ``version`` to
   one server through memsess's own pool and driver (``ServerPool(max_idle=0)``,
   ``Fanout``), TLS with a full handshake (the session forgotten first) and resumed (the
   session of the previous connection offered), each run checking
   ``exchange.tls.resumed``; pymemcache ``Client`` doing the same (it never resumes);
3. the raw cost, in this process, of sealing and opening a record (memsess.sealing's
   ``Sealer``, AES-256-GCM) and of compressing and decompressing one.

Auth costs only on a new connection: on a pooled one the server has taken the
credentials already, which is why part 2 exists.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol

import msgpack
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient

from bench.baselines import Baseline
from bench.common import (
    RETRY_INTERVAL,
    TIMEOUT,
    TTL,
    LocalCluster,
    Timing,
    addresses,
    is_smoke,
    machine_load,
    make_session,
    measure,
    pin_client,
    pin_servers,
    placement,
)
from memsess import SessionStore, parse_dsn, protocol
from memsess.records import (
    CODECS,
    DATA,
    FLAGS,
    codec_id,
    compress,
    decode_record,
    encode_record,
    plain_payload,
)
from memsess.sealing import OVERHEAD, Sealer, generate_key
from memsess.transport.fanout import Fanout, FirstReply
from memsess.transport.pool import ServerPool

__all__ = ["Clusters", "connection_costs", "main", "operation_costs", "raw_costs"]

REDUNDANCY: Final = 2
#: memcached -Y credentials of the auth clusters (printable ASCII, no space, no ':').
AUTH: Final = ("bench", "bench-secret-0123456789")
SMALL: Final = 2_000
LARGE: Final = 20_000
#: Compress a session whose serialized data is larger than this (bytes): the 20 KB one.
COMPRESS_THRESHOLD: Final = 1024
#: The memsess row every ratio of part 1 is taken against (per size and operation).
BASELINE: Final = "memsess, plain TCP"


def _zstd_installed() -> bool:
    try:
        codec_id("zstd")
    except ImportError:
        return False
    return True


@dataclass
class Clusters:
    """The four clusters, each of 3 servers, all up at once so their rows take turns."""

    tcp: LocalCluster
    auth: LocalCluster
    tls: LocalCluster
    tls_auth: LocalCluster


@contextmanager
def clusters() -> Iterator[Clusters]:
    with ExitStack() as stack:
        found = Clusters(
            stack.enter_context(LocalCluster(3)),
            stack.enter_context(LocalCluster(3, auth=AUTH)),
            stack.enter_context(LocalCluster(3, tls=True)),
            stack.enter_context(LocalCluster(3, tls=True, auth=AUTH)),
        )
        for cluster in (found.tcp, found.auth, found.tls, found.tls_auth):
            pin_servers(cluster)
        pin_client()
        yield found


def _dsn(cluster: LocalCluster) -> str:
    # tls:// (with the cluster's tls_ca) and user:password@ as the cluster serves them.
    return cluster.dsn(timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)


def _key(name: str) -> bytes:
    """A pymemcache key as long as memsess's (``memsess:`` + a 43-character id)."""
    return f"bench:security:{name}:".encode().ljust(51, b"0")


# -- 1. per operation, pooled connections ------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One configuration of part 1: its name, the size of its session and how to build it."""

    name: str
    size: int
    cluster: LocalCluster
    options: Mapping[str, Any]


def _rows(found: Clusters, secret_keys: list[str]) -> list[Row]:
    sealed = {"secret_keys": secret_keys}
    rows = [
        Row(BASELINE, SMALL, found.tcp, {}),
        Row("memsess, TCP + auth", SMALL, found.auth, {}),
        Row("memsess, TLS", SMALL, found.tls, {}),
        Row("memsess, TLS + auth", SMALL, found.tls_auth, {}),
        Row("memsess, plain TCP, sealed", SMALL, found.tcp, sealed),
        Row("memsess, TLS + auth + sealed", SMALL, found.tls_auth, sealed),
        Row(BASELINE, LARGE, found.tcp, {}),
        Row("memsess, plain TCP, sealed", LARGE, found.tcp, sealed),
    ]
    codecs = ["zlib", "zstd"] if _zstd_installed() else ["zlib"]
    for codec in codecs:
        compressed = {**sealed, "compress_threshold": COMPRESS_THRESHOLD, "compression": codec}
        rows.append(Row(f"memsess, plain TCP, sealed + {codec}", LARGE, found.tcp, compressed))
    best = codecs[-1]
    rows.append(
        Row(
            f"memsess, TLS + auth + sealed + {best}",
            LARGE,
            found.tls_auth,
            {**sealed, "compress_threshold": COMPRESS_THRESHOLD, "compression": best},
        )
    )
    return rows


def _pymemcache(cluster: LocalCluster, *, tls: bool) -> Baseline:
    """pymemcache ``HashClient`` over every server of ``cluster``: one copy per key."""
    client = HashClient(
        addresses(cluster),
        connect_timeout=TIMEOUT,
        timeout=TIMEOUT,
        no_delay=True,
        dead_timeout=RETRY_INTERVAL,
        ignore_exc=True,
        default_noreply=False,
        tls_context=cluster.ssl_context() if tls else None,
    )
    return Baseline(client, ttl=TTL)


def operation_costs(
    found: Clusters, *, calls: int, rounds: int, warmup: int
) -> dict[tuple[str, int, str], Timing]:
    """Timings by (configuration, session size, operation)."""
    secret_keys = [generate_key()]
    sessions = {SMALL: make_session(SMALL), LARGE: make_session(LARGE)}
    candidates: dict[str, Callable[[], object]] = {}
    labels: dict[str, tuple[str, int, str]] = {}
    closers: list[Callable[[], None]] = []

    def add(name: str, size: int, load: Callable[[], object], save: Callable[[], None]) -> None:
        for operation, fn in (("load", load), ("save", save)):
            label = f"{name} {size} {operation}"
            candidates[label] = fn
            labels[label] = (name, size, operation)

    try:
        for row in _rows(found, secret_keys):
            store = SessionStore.from_dsn(
                _dsn(row.cluster), redundancy=REDUNDANCY, ttl=TTL, **row.options
            )
            closers.append(store.close)
            sid, data = store.new_id(), sessions[row.size]
            store.save(sid, data)
            if store.load(sid) != data:
                raise RuntimeError(f"{row.name}: a saved session read back wrong")
            add(
                row.name,
                row.size,
                partial(store.load, sid),
                partial(store.save, sid, data),
            )
        for tls, cluster in ((False, found.tcp), (True, found.tls)):
            peer = _pymemcache(cluster, tls=tls)
            closers.append(peer.close)
            key, data = _key("tls" if tls else "tcp"), sessions[SMALL]
            peer.save(key, data)
            if peer.load(key) != data:
                raise RuntimeError("pymemcache: a saved session read back wrong")
            name = f"pymemcache HashClient, {'TLS' if tls else 'plain TCP'} (1 copy)"
            add(
                name,
                SMALL,
                partial(peer.load, key),
                partial(peer.save, key, data),
            )
        timings = measure(candidates, calls=calls, rounds=rounds, warmup=warmup)
    finally:
        for close in closers:
            close()
    return {labels[label]: timing for label, timing in timings.items()}


def print_operations(timings: Mapping[tuple[str, int, str], Timing]) -> None:
    print(
        "\n| configuration | session | op | wall us | CPU us | wall / plain TCP |"
        " CPU / plain TCP | CPU us over plain TCP | spread |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for operation in ("load", "save"):
        for (name, size, op), timing in timings.items():
            if op != operation:
                continue
            base = timings[BASELINE, size, operation]
            print(
                f"| {name} | {size // 1000} KB | {operation} | {timing.us:.1f} |"
                f" {timing.cpu_us:.1f} | {timing.us / base.us:.2f}x |"
                f" {timing.cpu_us / base.cpu_us:.2f}x | {timing.cpu_us - base.cpu_us:+.1f} |"
                f" {timing.spread:.0%} |"
            )


# -- 2. a new connection per operation ---------------------------------------------------


class _Counted(Protocol):
    """A part 2 candidate: one new connection per call, counting what happened."""

    def __call__(self) -> None: ...
    def reset(self) -> None: ...
    def note(self) -> str: ...


class _Connect:
    """connect (+ TLS) (+ auth) + ``version`` to one server, on a connection closed after:
    memsess's pool with no idle connection kept, and its blocking driver."""

    def __init__(self, cluster: LocalCluster, *, resume: bool, keep: bool = False) -> None:
        spec = parse_dsn(_dsn(cluster))[0]
        self.pool = ServerPool(spec, max_idle=1 if keep else 0)
        self.keep = keep
        self.resume = resume
        self.runs = 0
        self.resumed = 0
        self.failed = 0

    def __call__(self) -> None:
        tls = self.pool.tls
        if tls is not None and not self.resume:
            tls.session = None  # a full handshake: nothing offered to resume
        run = Fanout([self.pool], [protocol.version()], FirstReply(0.0)).run()
        self.runs += 1
        if not isinstance(run.results[0], protocol.Version):
            self.failed += 1
        link = run.exchanges[0].tls
        if link is not None and link.resumed:
            self.resumed += 1

    def reset(self) -> None:
        self.runs = self.resumed = self.failed = 0

    def note(self) -> str:
        """What the timed runs did: their TLS handshakes, and any failure."""
        if self.keep:
            note = "one connection, reused"
        elif self.pool.tls is not None:
            note = f"{self.resumed}/{self.runs} resumed"
        else:
            note = ""
        return f"{note} ({self.failed} FAILED)" if self.failed else note

    def close(self) -> None:
        self.pool.clear()


class _PymemcacheConnect:
    """pymemcache ``Client``: connect (+ TLS, a full handshake each time) + ``version``."""

    def __init__(self, cluster: LocalCluster, *, tls: bool) -> None:
        self.address = addresses(cluster)[0]
        self.context = cluster.ssl_context() if tls else None
        self.runs = 0
        self.failed = 0

    def __call__(self) -> None:
        client = Client(
            self.address,
            connect_timeout=TIMEOUT,
            timeout=TIMEOUT,
            no_delay=True,
            tls_context=self.context,
        )
        try:
            self.runs += 1
            if not client.version():
                self.failed += 1
        finally:
            client.close()

    def reset(self) -> None:
        self.runs = self.failed = 0

    def note(self) -> str:
        note = "full handshake, never resumes" if self.context is not None else ""
        return f"{note} ({self.failed} FAILED)" if self.failed else note


def connection_costs(
    found: Clusters, *, calls: int, rounds: int
) -> tuple[dict[str, Timing], dict[str, str]]:
    """Timings by candidate, and per candidate a note of its handshakes (and failures)."""
    ours = {
        "memsess, pooled connection (no connect), TLS + auth": _Connect(
            found.tls_auth, resume=True, keep=True
        ),
        "memsess, TCP": _Connect(found.tcp, resume=False),
        "memsess, TCP + auth": _Connect(found.auth, resume=False),
        "memsess, TLS, full handshake": _Connect(found.tls, resume=False),
        "memsess, TLS, resumed": _Connect(found.tls, resume=True),
        "memsess, TLS + auth, full handshake": _Connect(found.tls_auth, resume=False),
        "memsess, TLS + auth, resumed": _Connect(found.tls_auth, resume=True),
    }
    theirs = {
        "pymemcache Client, TCP": _PymemcacheConnect(found.tcp, tls=False),
        "pymemcache Client, TLS": _PymemcacheConnect(found.tls, tls=True),
    }
    candidates: dict[str, _Counted] = {**ours, **theirs}
    try:
        # Warmed up here, not by measure: the counts below are of the timed runs only.
        for _ in range(2):
            for fn in candidates.values():
                fn()
        for counted in candidates.values():
            counted.reset()
        timings = measure(candidates, calls=calls, rounds=rounds, warmup=0)
    finally:
        for connect in ours.values():
            connect.close()
    notes = {name: counted.note() for name, counted in candidates.items()}
    return timings, notes


def print_connections(timings: Mapping[str, Timing], notes: Mapping[str, str]) -> None:
    base = timings["memsess, TCP"]
    print(
        "\n| new connection + version, 1 server | wall us | CPU us | wall / TCP | CPU / TCP |"
        " handshakes |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, timing in timings.items():
        print(
            f"| {name} | {timing.us:.1f} | {timing.cpu_us:.1f} | {timing.us / base.us:.2f}x |"
            f" {timing.cpu_us / base.cpu_us:.2f}x | {notes[name]} |"
        )


# -- 3. raw costs, in this process ------------------------------------------------------


def _now_us() -> int:
    return time.time_ns() // 1000


def _seal_open(sealer: Sealer, key: bytes, record: bytes) -> bytes:
    return sealer.open(key, sealer.seal(key, record))


def _repack(payload: bytes) -> bytes:
    packed: bytes = msgpack.packb(msgpack.unpackb(payload))
    return packed


def _decompress(record: bytes) -> bytes:
    return plain_payload(decode_record(record, FLAGS))


def raw_costs(*, calls: int, rounds: int) -> tuple[dict[str, Timing], dict[str, str]]:
    """Timings of sealing, opening, compressing and decompressing a record, and the
    stored size of each."""
    sealer = Sealer([generate_key()])
    key = b"memsess:" + b"x" * 43
    candidates: dict[str, Callable[[], object]] = {}
    sizes: dict[str, str] = {}
    for size in (SMALL, LARGE):
        payload = msgpack.packb(make_session(size))
        record = encode_record(_now_us(), DATA, 1, payload, ttl=TTL)
        sealed = sealer.seal(key, record)
        assert sealer.open(key, sealed) == record
        label = f"{size // 1000} KB"
        candidates[f"seal, {label}"] = partial(sealer.seal, key, record)
        candidates[f"open, {label}"] = partial(sealer.open, key, sealed)
        candidates[f"seal + open, {label}"] = partial(_seal_open, sealer, key, record)
        candidates[f"msgpack unpack + pack, {label}"] = partial(_repack, payload)
        sizes[f"seal, {label}"] = f"{len(record)} -> {len(sealed)} B (+{OVERHEAD})"
    payload = msgpack.packb(make_session(LARGE))
    for codec in CODECS:
        if codec == "zstd" and not _zstd_installed():
            continue
        number = CODECS[codec]
        packed = compress(payload, number)
        record = encode_record(_now_us(), DATA, 1, packed, ttl=TTL, codec=number)
        assert plain_payload(decode_record(record, FLAGS)) == payload
        candidates[f"{codec} compress, 20 KB"] = partial(compress, payload, number)
        candidates[f"{codec} decode + decompress, 20 KB"] = partial(_decompress, record)
        sizes[f"{codec} compress, 20 KB"] = f"{len(payload)} -> {len(packed)} B"
    return measure(candidates, calls=calls, rounds=rounds, warmup=10), sizes


def print_raw(timings: Mapping[str, Timing], sizes: Mapping[str, str]) -> None:
    print("\n| in-process step | CPU us | stored bytes |")
    print("| --- | --- | --- |")
    for name, timing in timings.items():
        print(f"| {name} | {timing.cpu_us:.1f} | {sizes.get(name, '')} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check it runs")
    parser.add_argument("--calls", type=int, default=200, help="operations per candidate/round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--connects", type=int, default=40, help="new connections per candidate/round"
    )
    args = parser.parse_args(argv)
    smoke = is_smoke(args.smoke)
    calls, rounds, connects = (2, 2, 2) if smoke else (args.calls, args.rounds, args.connects)
    load_before = machine_load()
    with clusters() as found:
        print(
            f"\nTLS, auth and sealing: 2 KB and 20 KB msgpack sessions, redundancy {REDUNDANCY},"
            " four LocalClusters of 3 (plain, auth, TLS, TLS + auth), memcached"
            f" {found.tcp.stats(0)['version']}"
        )
        print(f"{placement()}; {load_before}")
        print(f"\n1. per operation, pooled connections: {rounds} rounds of {calls} calls, in turns")
        operations = operation_costs(found, calls=calls, rounds=rounds, warmup=1 if smoke else 20)
        print_operations(operations)
        print(f"\n2. a new connection per operation: {rounds} rounds of {connects}, in turns")
        connections, notes = connection_costs(found, calls=connects, rounds=rounds)
        print_connections(connections, notes)
    print(f"\n3. in this process, no server: {rounds} rounds of {calls * 10}, in turns")
    raw, sizes = raw_costs(calls=calls * 10, rounds=rounds)
    print_raw(raw, sizes)
    seal_open = raw["seal + open, 2 KB"].cpu_us
    secure = statistics.fmean(
        operations["memsess, TLS + auth + sealed", SMALL, op].cpu_us for op in ("load", "save")
    ) - statistics.fmean(operations[BASELINE, SMALL, op].cpu_us for op in ("load", "save"))
    print(
        f"\nsecure (TLS + auth + sealed) over plain TCP: {secure:+.1f} CPU us per 2 KB operation"
        f" on average; seal + open of one 2 KB record: {seal_open:.1f} us"
    )
    if smoke:
        print("\n(smoke mode: tiny counts, the numbers mean nothing)")
    failed = [name for name, note in notes.items() if "FAILED" in note]
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
