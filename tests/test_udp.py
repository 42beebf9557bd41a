"""Session reads over UDP against real memcached (LocalCluster(udp=True)), directly and
through a lossy relay that drops, reorders and duplicates datagrams."""

from __future__ import annotations

import itertools
import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import pytest
from blocking_async import DRIVERS, store_for

from memsess import SessionStore
from memsess.records import FLAGS
from memsess.testing import LocalCluster
from memsess.transport import UdpPool
from memsess.transport.udp_core import HEADER

RETRY_INTERVAL = 0.2  # seconds: long enough to see UDP stay off, short enough to wait out
SIZES = {"100B": 100, "1.3KB": 1_300, "5KB": 5_000, "50KB": 50_000, "500KB": 500_000}


class LossyRelay:
    """Forwards datagrams between memsess and one memcached UDP port, in a thread.

    Seeded: drops ``drop`` of the datagrams (``drop_replies`` of the replies on top),
    sends ``duplicate`` of them twice and holds ``reorder`` of them back 1 ms, so later
    ones overtake them. Counts what it saw, and the (client, request id) of each request.
    """

    def __init__(
        self,
        server_port: int,
        *,
        drop: float = 0.0,
        drop_replies: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.server = ("127.0.0.1", server_port)
        self.drop, self.drop_replies = drop, drop_replies
        self.duplicate, self.reorder = duplicate, reorder
        self.rng = random.Random(seed)
        self.requests: list[tuple[Any, int]] = []  # (client address, request id)
        self.replies = 0
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.port: int = self.front.getsockname()[1]
        self._upstream: dict[Any, socket.socket] = {}  # one per client: replies go back right
        self._held: list[tuple[float, Callable[[bytes], Any], bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LossyRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in [self.front, *self._upstream.values()]:
            sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self.front, *self._upstream.values()], [], [], 0.001)
            for sock in readable:
                if sock is self.front:
                    data, client = self.front.recvfrom(65536)
                    self.requests.append((client, HEADER.unpack_from(data)[0]))
                    self._forward(self._upstream_for(client).send, data, self.drop)
                else:
                    client = next(c for c, s in self._upstream.items() if s is sock)
                    data = sock.recv(65536)
                    self.replies += 1
                    send = self._reply_sender(client)
                    self._forward(send, data, self.drop + self.drop_replies)
            now = time.monotonic()
            for item in [held for held in self._held if held[0] <= now]:
                self._held.remove(item)
                item[1](item[2])

    def _upstream_for(self, client: Any) -> socket.socket:
        if client not in self._upstream:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            upstream.connect(self.server)
            self._upstream[client] = upstream
        return self._upstream[client]

    def _reply_sender(self, client: Any) -> Callable[[bytes], Any]:
        return lambda data: self.front.sendto(data, client)

    def _forward(self, send: Callable[[bytes], Any], data: bytes, drop: float) -> None:
        roll = self.rng.random()
        if roll < drop:
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < self.reorder:
                self._held.append((time.monotonic() + 0.001, send, data))
            else:
                send(data)


@pytest.fixture
def udp_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(3, udp=True) as cluster:
        yield cluster


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """The UDP reads of both drivers: the blocking store's and the asyncio one's."""
    return str(request.param)


@pytest.fixture
def make_store(driver: str) -> Iterator[Callable[..., SessionStore]]:
    stores: list[SessionStore] = []

    def make(dsn: str, **options: Any) -> SessionStore:
        options.setdefault("redundancy", 2)
        store = store_for(driver, dsn, **options)
        # A read asks for a server's marker too when its last reading is stale, and two
        # keys go over TCP: these tests count datagrams, so the markers count as read.
        # test_a_udp_servers_marker_is_read_over_tcp_and_honoured covers that read.
        store._cluster.marker_due[:] = [float("inf")] * len(store._cluster.servers)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def udp_pools(store: SessionStore) -> list[UdpPool]:
    return [pool for pool in store._cluster.udp_pools if pool is not None]


def udp_replies(store: SessionStore) -> int:
    return sum(pool.replies for pool in udp_pools(store))


def relayed_dsn(cluster: LocalCluster, relays: list[LossyRelay], **params: object) -> str:
    """PHP's spelling, ``tcp://host:port?udp_port=N``: writes direct, reads via a relay."""
    query = "".join(f"&{name}={value}" for name, value in params.items())
    return ", ".join(
        f"tcp://127.0.0.1:{server.port}?udp_port={relay.port}{query}"
        for server, relay in zip(cluster.servers, relays, strict=True)
    )


def session_of(size: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    return {"user_id": seed, "blob": rng.randbytes(size), "note": "é" * (seed % 7)}


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_sessions_of_every_size_read_back_over_udp_as_over_tcp(
    udp_cluster: LocalCluster, make_store: Callable[..., SessionStore], size: int
) -> None:
    tcp = make_store(udp_cluster.dsn("tcp", timeout=1, retry_interval=RETRY_INTERVAL))
    udp = make_store(udp_cluster.dsn("udp", timeout=1, retry_interval=RETRY_INTERVAL))
    sid = tcp.new_id()
    data = session_of(size)
    tcp.save(sid, data)
    loads = [udp.load(sid) for _ in range(10)]
    assert loads == [tcp.load(sid)] * 10 == [data] * 10
    assert udp_replies(udp) > 0  # at least one copy of one read came over UDP
    assert all(s.state == "up" for s in udp.health())


def test_every_read_is_right_through_a_lossy_relay(
    udp_cluster: LocalCluster, make_store: Callable[..., SessionStore]
) -> None:
    relays = [
        LossyRelay(s.port, drop=0.1, duplicate=0.1, reorder=0.2, seed=n)
        for n, s in enumerate(udp_cluster.servers)
    ]
    with relays[0], relays[1], relays[2]:
        # A wide straggler window: on a loaded test machine a TCP retry must never be cut
        # short, since this test is about the data, not the timing.
        store = make_store(
            relayed_dsn(udp_cluster, relays, retry_interval=RETRY_INTERVAL),
            straggler_window=0.1,
        )
        sessions = {store.new_id(): session_of(size, n) for n, size in enumerate([90, 6000] * 8)}
        for sid, data in sessions.items():
            store.save(sid, data)
        for _ in range(8):
            for sid, data in sessions.items():
                assert store.load(sid) == data
        pools = udp_pools(store)
        assert sum(len(relay.requests) for relay in relays) >= 8 * len(sessions)
        assert sum(relay.replies for relay in relays) > 0
        assert sum(pool.replies for pool in pools) > 0  # reads that did come over UDP
        assert sum(pool.fallbacks for pool in pools) > 0  # and losses retried over TCP
        assert all(status.state == "up" for status in store.health())


def test_writes_go_over_tcp_and_reads_over_udp(
    udp_cluster: LocalCluster, make_store: Callable[..., SessionStore]
) -> None:
    relays = [LossyRelay(s.port) for s in udp_cluster.servers]
    with relays[0], relays[1], relays[2]:
        store = make_store(relayed_dsn(udp_cluster, relays))
        sid = store.new_id()
        store.save(sid, {"a": 1})
        assert store.touch(sid)
        assert sum(len(relay.requests) for relay in relays) == 0
        for _ in range(20):
            assert store.load(sid) == {"a": 1}
        # Both copies of a read go out as datagrams (unless five late replies in a row on
        # a busy machine switched UDP off for a server); replies come back by UDP.
        assert sum(len(relay.requests) for relay in relays) >= 30
        assert sum(relay.replies for relay in relays) >= 40
        assert udp_replies(store) >= 30  # a few may be retried over TCP on a busy box
        store.delete(sid)
        assert store.load(sid) is None


def test_newest_copy_wins_over_udp_and_the_stale_one_is_repaired_over_tcp(
    udp_cluster: LocalCluster, make_store: Callable[..., SessionStore]
) -> None:
    relays = [LossyRelay(s.port) for s in udp_cluster.servers]
    with relays[0], relays[1], relays[2]:
        store = make_store(relayed_dsn(udp_cluster, relays))
        sid = store.new_id()
        key = store.storage_key(sid)
        by_address = {s.address: s.index for s in udp_cluster.servers}
        first, second = (by_address[address] for address in store.locate(sid))
        store.save(sid, {"v": 1})
        old = udp_cluster.get_raw(first, key)
        store.save(sid, {"v": 2})
        assert old is not None
        udp_cluster.set_raw(first, key, old, flags=FLAGS)  # the first copy missed the save
        assert store.load(sid) == {"v": 2}
        assert udp_cluster.get_raw(first, key) == udp_cluster.get_raw(second, key)
        assert sum(len(relay.requests) for relay in relays) == 2  # the repair went by TCP


def test_lost_replies_never_mark_a_healthy_server_down(
    udp_cluster: LocalCluster, make_store: Callable[..., SessionStore]
) -> None:
    relays = [LossyRelay(s.port, drop_replies=1.0) for s in udp_cluster.servers]
    with relays[0], relays[1], relays[2]:
        store = make_store(relayed_dsn(udp_cluster, relays, retry_interval=30))
        sid = store.new_id()
        store.save(sid, {"a": 1})
        for _ in range(10):
            assert store.load(sid) == {"a": 1}
        statuses = [s for s in store.health() if s.udp != "on"]
        assert len(statuses) == 2  # the session's two servers: UDP off after 5 losses
        assert all(s.state == "up" and s.failures == 0 for s in store.health())
        assert all(s.udp.startswith("off (no complete reply within") for s in statuses)


def test_a_udp_read_cut_by_the_straggler_window_is_not_a_server_failure(
    make_store: Callable[..., SessionStore],
) -> None:
    with LocalCluster(2, udp=True) as cluster:
        relays = [LossyRelay(cluster.servers[0].port), LossyRelay(cluster.servers[1].port)]
        relays[1].drop_replies = 1.0
        with relays[0], relays[1]:
            store = make_store(relayed_dsn(cluster, relays), straggler_window=0.005)
            routes = store._cluster.routes
            assert routes is not None
            routes.udp_wait = 0.5  # longer than the window: the silent copy is cut on UDP
            sid = store.new_id()
            store.save(sid, {"a": 1})
            for _ in range(6):
                assert store.load(sid) == {"a": 1}
            healthy, silent = store.health()
            assert (healthy.state, healthy.failures, healthy.udp) == ("up", 0, "on")
            assert (silent.state, silent.failures) == ("up", 0)  # a lost datagram, no more
            assert silent.udp.startswith("off (no reply within the straggler window")


def test_a_server_without_udp_is_read_over_tcp_and_health_says_so(
    make_store: Callable[..., SessionStore],
) -> None:
    with LocalCluster(2) as cluster:  # no -U: ICMP port unreachable answers a datagram
        store = make_store(cluster.dsn("udp", retry_interval=RETRY_INTERVAL))
        sid = store.new_id()
        store.save(sid, {"a": 1})
        assert store.load(sid) == {"a": 1}
        assert store.load(sid) == {"a": 1}
        for status in store.health():
            assert status.state == "up"
            assert status.udp.startswith("off (nothing listens on the UDP port (refused)")
        tries = sum(pool.fallbacks for pool in udp_pools(store))
        assert tries == 2  # only the first read tried UDP; the second went straight to TCP
        time.sleep(RETRY_INTERVAL)
        assert store.load(sid) == {"a": 1}
        assert sum(pool.fallbacks for pool in udp_pools(store)) == tries + 2  # UDP tried again


def test_a_cluster_mixing_udp_and_tcp_servers_reads_both_at_once(
    udp_cluster: LocalCluster, make_store: Callable[..., SessionStore]
) -> None:
    first, second, _ = udp_cluster.servers
    store = make_store(f"udp://127.0.0.1:{first.port}, tcp://127.0.0.1:{second.port}")
    sid = store.new_id()
    store.save(sid, {"a": 1})
    assert store.load(sid) == {"a": 1}
    assert udp_replies(store) == 1
    assert [s.udp for s in store.health()] == ["on", "n/a"]


def test_a_hung_server_costs_a_udp_read_the_straggler_window_not_its_timeout(
    udp_cluster: LocalCluster, make_store: Callable[..., SessionStore]
) -> None:
    store = make_store(udp_cluster.dsn("udp", timeout=2, retry_interval=30))
    sid = store.new_id()
    store.save(sid, {"a": 1})
    by_address = {s.address: s.index for s in udp_cluster.servers}
    udp_cluster.hang(by_address[store.locate(sid)[0]])
    started = time.monotonic()
    assert store.load(sid) == {"a": 1}
    assert time.monotonic() - started < 0.5


def test_request_ids_never_repeat_on_a_socket_under_threads(
    udp_cluster: LocalCluster, make_store: Callable[..., SessionStore]
) -> None:
    relays = [LossyRelay(s.port) for s in udp_cluster.servers]
    with relays[0], relays[1], relays[2]:
        store = make_store(relayed_dsn(udp_cluster, relays, timeout=2), straggler_window=0.5)
        # The relay shares this process's GIL with the readers: give its replies time,
        # so that reads stay on UDP instead of being retried over TCP.
        routes = store._cluster.routes
        assert routes is not None
        routes.udp_wait = 0.2
        sids = [store.new_id() for _ in range(8)]
        for sid in sids:
            store.save(sid, {"sid": sid})
        errors: list[str] = []

        def reader(sid: str) -> None:
            for _ in range(50):
                if store.load(sid) != {"sid": sid}:
                    errors.append(sid)

        threads = [threading.Thread(target=reader, args=(sid,)) for sid in sids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        requests = [request for relay in relays for request in relay.requests]
        assert len(requests) >= 8 * 50 * 2 * 0.9
        assert len(set(requests)) == len(requests)  # no id twice from one client socket
        by_socket: dict[Any, list[int]] = {}
        for client, request_id in requests:
            by_socket.setdefault(client, []).append(request_id)
        for ids in by_socket.values():  # each socket counts on from its random start
            assert all((b - a) % 65536 == 1 for a, b in itertools.pairwise(ids))


def test_a_forked_child_opens_its_own_udp_sockets(udp_cluster: LocalCluster) -> None:
    with SessionStore.from_dsn(udp_cluster.dsn("udp"), redundancy=2) as store:
        store._cluster.marker_due[:] = [float("inf")] * len(store._cluster.servers)
        _fork_and_read(store)


def _fork_and_read(store: SessionStore) -> None:
    sid = store.new_id()
    store.save(sid, {"a": 1})
    assert store.load(sid) == {"a": 1}
    parent_fds = {conn.fd for pool in udp_pools(store) for conn in pool._idle}
    assert parent_fds
    pid = os.fork()
    if pid == 0:  # the child: no idle socket inherited, and reads still work
        ok = not any(pool._idle for pool in udp_pools(store)) and store.load(sid) == {"a": 1}
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.load(sid) == {"a": 1}
    assert {conn.fd for pool in udp_pools(store) for conn in pool._idle} == parent_fds


def test_a_malformed_session_id_sends_no_datagram(
    udp_cluster: LocalCluster, make_store: Callable[..., SessionStore]
) -> None:
    relays = [LossyRelay(s.port) for s in udp_cluster.servers]
    with relays[0], relays[1], relays[2]:
        store = make_store(relayed_dsn(udp_cluster, relays))
        for hostile in ["", "x", "a" * 42 + "\r\nget other", "a" * 5000]:
            assert store.load(hostile) is None
        assert sum(len(relay.requests) for relay in relays) == 0


def test_a_udp_servers_marker_is_read_over_tcp_and_honoured(
    udp_cluster: LocalCluster,
) -> None:
    relays = [LossyRelay(s.port) for s in udp_cluster.servers]
    with relays[0], relays[1], relays[2]:
        store = SessionStore.from_dsn(relayed_dsn(udp_cluster, relays), redundancy=2)
        try:
            sid = store.new_id()
            store.save(sid, {"v": 1})
            by_address = {s.address: s.index for s in udp_cluster.servers}
            first = by_address[store.locate(sid)[0]]
            marker = str(store.key_prefix).encode("ascii") + b"missed-writes"
            udp_cluster.set_raw(first, marker, b"%d" % (2**62))  # trust nothing there
            assert store.load(sid) == {"v": 1}
            assert sum(len(relay.requests) for relay in relays) == 0  # two keys: by TCP
            assert store._cluster.marker_floor[first] == 2**62
            assert store.load(sid) == {"v": 1}
            assert sum(len(relay.requests) for relay in relays) == 2  # now by UDP
        finally:
            store.close()
