"""Session loads over UDP against loads over TCP, same cluster, same run.

``python -m bench.bench_udp`` starts a local cluster of 3 with UDP on and measures,
the candidates taking turns within each round (bench/common.py ``measure``):

1. ``store.load`` of a 200-byte session at redundancy 2, over a ``tcp://`` DSN and a
   ``udp://`` DSN of the same servers (issue 3's goal: UDP >= 1.4x the TCP rate), and
   the raw-socket floor, TCP and UDP, of the same two-copy read and of a single get;
2. per session size (100 B to 500 KB): the time of a load each way, and how many UDP
   reads lost a datagram and were retried over TCP;
3. with ``--profile``: where a UDP load spends its time (cProfile).

Placement follows MEMSESS_BENCH_PIN (bench/cpus.py): ``split`` (default) pins the
bench to one CPU and the servers to the other, ``none`` leaves it to the kernel.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import select
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Final

from bench.common import (
    LocalCluster,
    Timing,
    addresses,
    is_smoke,
    local_cluster,
    make_session,
    measure,
    memsess_store,
    placement,
    udp_addresses,
)
from bench.floor import RawTCP, RawUDP
from memsess import SessionStore
from memsess.transport import UdpPool

GOAL: Final = 1.4  # issue 3: UDP load rate / TCP load rate, 200 B, redundancy 2
#: Session sizes of part 2, by label: bytes of msgpack-encoded session data.
SIZES: Final = {"100B": 100, "1.3KB": 1_300, "5KB": 5_000, "50KB": 50_000, "500KB": 500_000}
_HEADER: Final = struct.Struct("!HHHH")


class RawPair:
    """The floor of a two-copy read: one ``get`` to each of two servers, both sent
    before either reply is read, waited for in one poll; no parsing beyond the end."""

    def __init__(self, targets: Sequence[tuple[str, int]], *, udp: bool) -> None:
        self.udp = udp
        self.socks = []
        for address in targets:
            if udp:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.connect(address)
            else:
                sock = socket.create_connection(address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            self.socks.append(sock)
        self.by_fd = {sock.fileno(): sock for sock in self.socks}
        self.request_id = 0

    def get(self, key: bytes) -> None:
        self.request_id = (self.request_id + 1) & 0xFFFF
        command = b"gets " + key + b"\r\n"
        if self.udp:
            command = _HEADER.pack(self.request_id, 0, 1, 0) + command
        poller = select.poll()
        for sock in self.socks:
            sock.send(command)
            poller.register(sock, select.POLLIN)
        pending = len(self.socks)
        while pending:
            for fd, _ in poller.poll(1000):
                data = self.by_fd[fd].recv(65536)
                # A 200-byte reply comes in one datagram or one segment on loopback.
                if data.endswith(b"END\r\n"):
                    poller.unregister(fd)
                    pending -= 1

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def _stores(cluster: LocalCluster) -> tuple[SessionStore, SessionStore]:
    tcp = memsess_store(cluster, redundancy=2, dsn=cluster.dsn("tcp", timeout=1.0))
    udp = memsess_store(cluster, redundancy=2, dsn=cluster.dsn("udp", timeout=1.0))
    return tcp, udp


def _udp_pools(store: SessionStore) -> list[UdpPool]:
    return [pool for pool in store._cluster.udp_pools if pool is not None]


def steady(cluster: LocalCluster, *, calls: int, rounds: int) -> float:
    """Part 1; returns the UDP / TCP load rate ratio."""
    tcp, udp = _stores(cluster)
    sid = tcp.new_id()
    tcp.save(sid, make_session(200))
    replicas = [addresses(cluster)[i] for i in _indexes(cluster, tcp, sid)]
    udp_replicas = [udp_addresses(cluster)[i] for i in _indexes(cluster, tcp, sid)]
    raw_tcp, raw_udp = RawPair(replicas, udp=False), RawPair(udp_replicas, udp=True)
    one_tcp, one_udp = RawTCP(replicas[0]), RawUDP(udp_replicas[0])
    key = str(tcp.key_prefix).encode("ascii") + b"raw"
    for address in replicas:
        with socket.create_connection(address) as sock:
            sock.sendall(b"set %b 0 0 200\r\n%b\r\n" % (key, b"x" * 200))
            sock.recv(100)
    candidates: dict[str, Callable[[], object]] = {
        "memsess load r2 TCP": lambda: tcp.load(sid),
        "memsess load r2 UDP": lambda: udp.load(sid),
        "raw two-copy get TCP": lambda: raw_tcp.get(key),
        "raw two-copy get UDP": lambda: raw_udp.get(key),
        "raw single get TCP": lambda: one_tcp.get(key),
        "raw single get UDP": lambda: one_udp.get(key),
    }
    timings = measure(candidates, calls=calls, rounds=rounds)
    _print_timings(timings)
    ratio = timings["memsess load r2 TCP"].per_call / timings["memsess load r2 UDP"].per_call
    floor = timings["raw two-copy get TCP"].per_call / timings["raw two-copy get UDP"].per_call
    single = timings["raw single get TCP"].per_call / timings["raw single get UDP"].per_call
    verdict = "PASS" if ratio >= GOAL else "MISS"
    print(f"UDP / TCP load rate: {ratio:.2f}x (goal {GOAL}x: {verdict})")
    print(f"raw floor, UDP / TCP rate: two-copy get {floor:.2f}x, single get {single:.2f}x")
    fallbacks = sum(pool.fallbacks for pool in _udp_pools(udp))
    print(f"UDP reads retried over TCP during the run: {fallbacks}")
    for closable in (tcp, udp, raw_tcp, raw_udp, one_tcp, one_udp):
        closable.close()
    return ratio


def by_size(cluster: LocalCluster, *, loads: int) -> None:
    """Part 2: time per load each way and UDP losses, per session size."""
    tcp, udp = _stores(cluster)
    print(f"\n{'size':>6} {'TCP us':>9} {'UDP us':>9} {'ratio':>6}  UDP reads retried over TCP")
    for label, size in SIZES.items():
        sid = tcp.new_id()
        data = make_session(size)
        tcp.save(sid, data)
        if udp.load(sid) != data:
            raise AssertionError(f"{label}: the UDP load differs from what was saved")
        before = sum(pool.fallbacks for pool in _udp_pools(udp))
        replies = sum(pool.replies for pool in _udp_pools(udp))
        timings = measure(
            {"tcp": functools.partial(tcp.load, sid), "udp": functools.partial(udp.load, sid)},
            calls=max(1, loads // 5),
            rounds=5,
            warmup=2,
        )
        lost = sum(pool.fallbacks for pool in _udp_pools(udp)) - before
        reads = sum(pool.replies for pool in _udp_pools(udp)) - replies + lost
        ratio = timings["tcp"].per_call / timings["udp"].per_call
        share = f"{lost} of {reads} ({100 * lost / max(1, reads):.1f} %)"
        print(f"{label:>6} {timings['tcp'].us:9.1f} {timings['udp'].us:9.1f} {ratio:6.2f}  {share}")
    tcp.close()
    udp.close()


def profile(cluster: LocalCluster, *, calls: int) -> None:
    """Part 3: cProfile of the UDP load, top 15 by own time."""
    _, udp = _stores(cluster)
    sid = udp.new_id()
    udp.save(sid, make_session(200))
    tracer = cProfile.Profile()
    tracer.enable()
    for _ in range(calls):
        udp.load(sid)
    tracer.disable()
    out = io.StringIO()
    pstats.Stats(tracer, stream=out).sort_stats("tottime").print_stats(15)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    udp.close()


def _indexes(cluster: LocalCluster, store: SessionStore, sid: str) -> list[int]:
    by_address = {server.address: server.index for server in cluster.servers}
    return [by_address[address] for address in store.locate(sid)]


def _print_timings(timings: dict[str, Timing]) -> None:
    for timing in timings.values():
        print(f"  {timing.name:24} {timing.us:8.1f} us  (spread {100 * timing.spread:.0f} %)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check it runs")
    parser.add_argument("--profile", action="store_true", help="also profile the UDP load")
    parser.add_argument("--rounds", type=int, default=21, help="rounds of part 1 (default 21)")
    args = parser.parse_args(argv)
    smoke = is_smoke(args.smoke)
    with local_cluster(3, udp=True) as cluster:
        print(f"memsess load over UDP vs TCP, redundancy 2; {placement()}")
        steady(cluster, calls=5 if smoke else 2000, rounds=2 if smoke else args.rounds)
        by_size(cluster, loads=5 if smoke else 500)
        if args.profile:
            profile(cluster, calls=20 if smoke else 5000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
