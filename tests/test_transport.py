"""Both fan-out drivers (the blocking poll loop and the asyncio one) and their connection
pools against real memcached processes."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from conftest import Fanout

from memsess import ConnectError, ConnectionClosedError, TimeoutError
from memsess.dsn import ServerSpec
from memsess.protocol import Status, Values, get, set
from memsess.testing import LocalCluster
from memsess.transport import FirstReply, ServerPool
from memsess.transport import fanout as blocking_fanout
from memsess.transport.aio import AsyncFanout, LoopPools


def pools_for(cluster: LocalCluster, timeout: float = 0.5) -> list[ServerPool]:
    return [ServerPool(ServerSpec("tcp", s.host, s.port, timeout=timeout)) for s in cluster.servers]


def test_one_command_reaches_every_server(cluster: LocalCluster, fanout: Fanout) -> None:
    pools = pools_for(cluster)
    results = fanout(pools, [set(b"k", b"v")] * 3)
    assert results == [Status.STORED] * 3
    replies = fanout(pools, [get(b"k")] * 3)
    assert all(isinstance(r, Values) and r.items[0].value == b"v" for r in replies)


def test_connections_are_reused(cluster: LocalCluster) -> None:
    pool = pools_for(cluster)[0]
    blocking_fanout([pool], [set(b"k", b"v")])
    conn = pool.acquire()
    pool.release(conn)
    blocking_fanout([pool], [get(b"k")])
    assert pool.acquire() is conn


def test_an_event_loops_connections_are_reused() -> None:
    with LocalCluster(1) as cluster:
        pools = LoopPools(asyncio.new_event_loop(), pools_for(cluster), on_reset=print)
        try:
            before = int(cluster.stats(0)["total_connections"])
            for _ in range(3):
                pools.loop.run_until_complete(
                    AsyncFanout(pools, [(0, get(b"k"))], FirstReply(0.01)).run()
                )
            assert len(pools._idle[0]) == 1  # one connection, made once, pooled again
            after = int(cluster.stats(0)["total_connections"])
            assert after - before == 2  # it, and the stats call's own
        finally:
            pools.close()
            pools.loop.close()


def test_a_refused_connection_is_reported_as_refused(cluster: LocalCluster, fanout: Fanout) -> None:
    pools = pools_for(cluster)
    cluster.kill(1)
    results = fanout(pools, [set(b"k", b"v")] * 3)
    assert results[0] is Status.STORED
    assert results[2] is Status.STORED
    error = results[1]
    assert isinstance(error, ConnectError)
    assert error.refused


def test_a_hung_server_alone_times_out_after_its_timeout(
    cluster: LocalCluster, fanout: Fanout
) -> None:
    pool = pools_for(cluster, timeout=0.2)[0]
    cluster.hang(0)
    try:
        (result,) = fanout([pool], [get(b"k")])
    finally:
        cluster.resume(0)
    assert isinstance(result, TimeoutError)
    assert not result.straggler


def test_a_hung_server_next_to_healthy_ones_is_dropped_as_a_straggler(
    cluster: LocalCluster, fanout: Fanout
) -> None:
    pools = pools_for(cluster, timeout=5.0)
    fanout(pools, [set(b"k", b"v")] * 3)
    cluster.hang(2)
    try:
        results = fanout(pools, [get(b"k")] * 3, straggler_window=0.01)
    finally:
        cluster.resume(2)
    assert isinstance(results[0], Values)
    assert isinstance(results[1], Values)
    assert isinstance(results[2], TimeoutError)
    assert results[2].straggler


def test_a_timed_out_connection_is_closed_not_pooled(cluster: LocalCluster, fanout: Fanout) -> None:
    pool = pools_for(cluster, timeout=0.2)[0]
    fanout([pool], [set(b"a", b"first")])
    cluster.hang(0)
    (result,) = fanout([pool], [get(b"a")])
    assert isinstance(result, TimeoutError)
    cluster.resume(0)  # the late reply to that get now arrives... on a closed socket
    time.sleep(0.05)
    fanout([pool], [set(b"b", b"second")])
    (reply,) = fanout([pool], [get(b"b")])
    assert isinstance(reply, Values)
    assert reply.items[0].key == b"b"
    assert reply.items[0].value == b"second"


def test_a_pooled_connection_to_a_restarted_server_is_retried_once(
    cluster: LocalCluster, fanout: Fanout
) -> None:
    pool = pools_for(cluster)[0]
    assert fanout([pool], [set(b"k", b"v")]) == [Status.STORED]
    cluster.restart(0)  # the pooled connection is now dead
    assert fanout([pool], [set(b"k", b"again")]) == [Status.STORED]


def test_a_server_closing_mid_reply_is_an_error(cluster: LocalCluster, fanout: Fanout) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    pool = ServerPool(ServerSpec("tcp", "127.0.0.1", port, timeout=2.0))

    import threading

    def half_reply() -> None:
        conn, _ = listener.accept()
        conn.recv(100)
        conn.sendall(b"VALUE k 0 10\r\nabc")
        conn.close()

    thread = threading.Thread(target=half_reply)
    thread.start()
    (result,) = fanout([pool], [get(b"k")])
    thread.join()
    listener.close()
    assert isinstance(result, ConnectionClosedError)


def test_an_unknown_host_fails_every_connect_at_once_without_a_lookup(
    monkeypatch: pytest.MonkeyPatch, fanout: Fanout
) -> None:
    pool = ServerPool(ServerSpec("tcp", "no-such-host.invalid", 11211))  # no raise: made anyway
    assert pool.address is None
    assert isinstance(pool.unresolved, ConnectError)

    def no_lookups(*args: object, **kwargs: object) -> object:
        raise AssertionError("a DNS lookup in a request")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookups)
    (result,) = fanout([pool], [get(b"k")])
    assert isinstance(result, ConnectError)
    assert result.refused  # the server is marked down at once
    assert "no-such-host.invalid:11211: cannot resolve host" in str(result)


def test_a_host_that_resolves_later_is_reached_once_resolve_succeeds(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, fanout: Fanout
) -> None:
    server = cluster.servers[0]
    real = socket.getaddrinfo
    dns_up = False

    def dns(host: str, *args: Any, **kwargs: Any) -> object:
        # A name only this test's DNS knows: the server's address, once DNS is back.
        if host != "memcached-a.test" or not dns_up:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(server.host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    pool = ServerPool(ServerSpec("tcp", "memcached-a.test", server.port, timeout=0.5))
    assert pool.resolve() is not None  # still down
    (failed,) = fanout([pool], [get(b"k")])
    assert isinstance(failed, ConnectError)
    dns_up = True
    assert pool.resolve() is None
    assert pool.unresolved is None
    assert pool.address is not None
    assert fanout([pool], [get(b"k")]) == [Values(())]


def test_running_out_of_sockets_is_a_connect_error_not_a_crash(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, fanout: Fanout
) -> None:
    pools = pools_for(cluster)

    def no_sockets(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(socket, "socket", no_sockets)
    results = fanout(pools, [get(b"k")] * 3)
    assert all(isinstance(r, ConnectError) and "Too many open files" in str(r) for r in results)
    assert not any(isinstance(r, ConnectError) and r.refused for r in results)


def test_waiting_for_a_slow_server_after_a_faster_deadline_passed_does_not_spin(
    cluster: LocalCluster, fanout: Fanout
) -> None:
    # Unequal timeouts: once the quick server has answered and its own deadline passed,
    # the loop must sleep until the hung one's deadline, not poll(0) over and over.
    quick = ServerPool(ServerSpec("tcp", "127.0.0.1", cluster.servers[0].port, timeout=0.05))
    slow = ServerPool(ServerSpec("tcp", "127.0.0.1", cluster.servers[1].port, timeout=0.6))
    fanout([quick, slow], [set(b"k", b"v")] * 2)
    cluster.hang(1)
    try:
        started = time.thread_time()
        results = fanout([quick, slow], [get(b"k")] * 2, straggler_window=10.0)
        spent = time.thread_time() - started
    finally:
        cluster.resume(1)
    assert isinstance(results[0], Values)
    assert isinstance(results[1], TimeoutError)
    assert spent < 0.2  # a spinning loop burns most of the 0.55 s it waits


def test_a_server_that_never_stops_sending_still_ends_at_its_deadline(
    fanout: Fanout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply streamed faster than this (CPU-starved) client reads it: a value announced
    as 1 GB, streamed without end from a process of its own. No poll is ever empty, yet
    the exchange ends at its deadline. (The compiled build's Exchange cannot be patched
    to starve, and it reads tens of MB within the deadline: hence a value no client
    reads in 0.1 s, and a stream that never ends.)"""
    import subprocess
    import sys

    from memsess.transport.exchange import Exchange

    received = Exchange.data_received

    def starved(self: Exchange, data: bytes) -> object:
        time.sleep(0.002)  # each read costs this client 2 ms
        return received(self, data)

    monkeypatch.setattr(Exchange, "data_received", starved)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    sender = subprocess.Popen(  # inherits the listener: accepts, reads, then streams
        [
            sys.executable,
            "-c",
            "import socket, sys\n"
            "listener = socket.socket(fileno=int(sys.argv[1]))\n"
            "conn, _ = listener.accept()\n"
            "conn.recv(100)\n"
            "try:\n"
            "    conn.sendall(b'VALUE k 0 1000000000\\r\\n')\n"
            "    chunk = b'x' * 65536\n"
            "    while True:\n"
            "        conn.sendall(chunk)\n"
            "except OSError:\n"
            "    pass\n",
            str(listener.fileno()),
        ],
        pass_fds=[listener.fileno()],
    )
    spec = ServerSpec("tcp", "127.0.0.1", listener.getsockname()[1], timeout=0.1)
    pool = ServerPool(spec, max_value_size=2**30)
    try:
        (result,) = fanout([pool], [get(b"k")])
    finally:
        listener.close()
        sender.kill()
        sender.wait()
    assert isinstance(result, TimeoutError), result
