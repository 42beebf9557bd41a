"""memsess.testing: LocalCluster really starts, breaks and stops memcached, leaking nothing."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import memsess.testing
from memsess.errors import MemsessError
from memsess.testing import LocalCluster, LocalClusterError, MemcachedNotFoundError

# The plugin's fixtures, used here the way a user's conftest would get them.
memcached_cluster = memsess.testing.memcached_cluster
local_cluster_factory = memsess.testing.local_cluster_factory

pytest_plugins = ["pytester"]

Factory = Callable[..., LocalCluster]


def is_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie no one reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat.rpartition(b") ")[2][:1] == b"Z"


def connect(cluster: LocalCluster, i: int, timeout: float = 1.0) -> socket.socket:
    server = cluster.servers[i]
    if server.socket_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(server.socket_path)
        return sock
    return socket.create_connection((server.host, server.port), timeout=timeout)


def ask(sock: socket.socket, command: bytes, end: bytes = b"\r\n") -> bytes:
    sock.sendall(command)
    reply = b""
    while not reply.endswith(end):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {reply!r}"
        reply += chunk
    return reply


def test_start_and_close_leave_no_process_and_no_temp_dir() -> None:
    cluster = LocalCluster(3)
    started = time.monotonic()
    cluster.start()
    assert time.monotonic() - started < 1.5  # parallel start; ~20 ms on a quiet machine
    pids = [server.process.pid for server in cluster.servers if server.process]
    directory = Path(cluster.servers[0].log_path).parent
    assert len(pids) == 3
    assert all(server.running for server in cluster.servers)
    assert not any(is_gone(pid) for pid in pids)
    assert all(cluster.stats(i)["pid"] == str(pid) for i, pid in enumerate(pids))

    cluster.close()
    cluster.close()  # idempotent

    assert all(is_gone(pid) for pid in pids)
    assert not any(server.running for server in cluster.servers)
    assert not directory.exists()
    with pytest.raises(LocalClusterError, match="closed"):
        cluster.start()


def test_closing_a_cluster_with_a_hung_server_kills_it_too() -> None:
    with LocalCluster(2) as cluster:
        cluster.hang(1)
        pids = [server.process.pid for server in cluster.servers if server.process]
    assert all(is_gone(pid) for pid in pids)


def test_dsn_lists_every_server_with_params_in_the_order_given() -> None:
    with LocalCluster(2) as cluster:
        first, second = (server.address for server in cluster.servers)
        assert first.startswith("127.0.0.1:")
        assert cluster.dsn() == f"tcp://{first}, tcp://{second}"
        assert cluster.dsn(timeout=0.5, retry_interval=15, persistent=True) == (
            f"tcp://{first}?timeout=0.5&retry_interval=15&persistent=1, "
            f"tcp://{second}?timeout=0.5&retry_interval=15&persistent=1"
        )
        assert cluster.dsn("") == f"{first}, {second}"
        assert cluster.dsn("udp", weight=2) == f"udp://{first}?weight=2, udp://{second}?weight=2"


def test_dsn_before_start_is_an_error() -> None:
    cluster = LocalCluster(1)
    with pytest.raises(LocalClusterError, match=r"start\(\)"):
        cluster.dsn()
    cluster.close()


def test_killed_server_refuses_connections_and_is_reaped(memcached_cluster: LocalCluster) -> None:
    server = memcached_cluster.servers[1]
    assert server.process is not None
    pid = server.process.pid

    memcached_cluster.kill(1)
    memcached_cluster.kill(1)  # idempotent

    assert is_gone(pid)
    assert not server.running
    assert server in memcached_cluster.servers
    with pytest.raises(ConnectionRefusedError):
        connect(memcached_cluster, 1)
    with pytest.raises(LocalClusterError, match=r"not running; call start_server\(1\)"):
        memcached_cluster.get_raw(1, b"k")
    memcached_cluster.set_raw(0, b"k", b"others still answer")
    assert memcached_cluster.get_raw(0, b"k") == b"others still answer"


def test_restart_gives_an_empty_cache_on_the_same_port(memcached_cluster: LocalCluster) -> None:
    server = memcached_cluster.servers[0]
    port, old_pid = server.port, memcached_cluster.stats(0)["pid"]
    memcached_cluster.set_raw(0, b"session", b"data")

    memcached_cluster.restart(0)

    assert server.port == port
    assert memcached_cluster.stats(0)["pid"] != old_pid
    assert memcached_cluster.get_raw(0, b"session") is None


def test_start_server_brings_a_killed_server_back_and_refuses_a_running_one(
    memcached_cluster: LocalCluster,
) -> None:
    port = memcached_cluster.servers[2].port
    memcached_cluster.kill(2)
    memcached_cluster.start_server(2)
    assert memcached_cluster.servers[2].port == port
    assert memcached_cluster.keys(2) == set()
    with pytest.raises(LocalClusterError, match=r"already running; restart\(2\)"):
        memcached_cluster.start_server(2)


def test_start_restarts_every_killed_server(memcached_cluster: LocalCluster) -> None:
    memcached_cluster.kill(0)
    memcached_cluster.kill(2)
    memcached_cluster.start()
    assert all(server.running for server in memcached_cluster.servers)


def test_hung_server_accepts_connections_but_answers_only_after_resume(
    memcached_cluster: LocalCluster,
) -> None:
    memcached_cluster.set_raw(1, b"k", b"v")
    memcached_cluster.hang(1)
    assert memcached_cluster.servers[1].hung

    sock = connect(memcached_cluster, 1, timeout=0.2)  # the kernel still completes the handshake
    with sock:
        sock.sendall(b"get k\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(100)
        memcached_cluster.resume(1)
        sock.settimeout(2.0)
        assert ask(sock, b"", end=b"END\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"

    assert not memcached_cluster.servers[1].hung
    assert memcached_cluster.get_raw(1, b"k") == b"v"


@pytest.mark.parametrize("call", ["flush", "keys", "get_raw", "set_raw", "stats"])
def test_admin_calls_on_a_hung_server_fail_at_once(
    memcached_cluster: LocalCluster, call: str
) -> None:
    memcached_cluster.hang(0)
    arguments: dict[str, tuple[object, ...]] = {"get_raw": (b"k",), "set_raw": (b"k", b"v")}
    started = time.monotonic()
    with pytest.raises(LocalClusterError, match=r"hung \(SIGSTOP\); call resume\(0\) first"):
        getattr(memcached_cluster, call)(0, *arguments.get(call, ()))
    assert time.monotonic() - started < 0.5


def test_admin_call_that_gets_no_answer_times_out_with_a_clear_error(
    memcached_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memsess.testing, "ANSWER_TIMEOUT", 0.2)
    memcached_cluster.hang(2)
    memcached_cluster.servers[2].hung = False  # as if stopped behind the cluster's back
    with pytest.raises(LocalClusterError, match=r"stats on server 2 .*timed out"):
        memcached_cluster.stats(2)
    memcached_cluster.servers[2].hung = True  # close() still wakes and kills it


def test_flush_empties_one_server_only(memcached_cluster: LocalCluster) -> None:
    for i in range(3):
        memcached_cluster.set_raw(i, b"a", b"1")
        memcached_cluster.set_raw(i, b"b", b"2")
    memcached_cluster.flush(1)
    assert memcached_cluster.keys(1) == set()
    assert memcached_cluster.get_raw(1, b"a") is None
    assert memcached_cluster.keys(0) == {b"a", b"b"}
    memcached_cluster.set_raw(1, b"c", b"3")  # the same second as the flush: still stored
    assert memcached_cluster.get_raw(1, b"c") == b"3"


def test_keys_lists_planted_keys_url_decoded(memcached_cluster: LocalCluster) -> None:
    planted = {b"plain", b"memsess:abc", b"100%", b"k\xff\x01", b"a+b=c&d"}
    for key in planted:
        memcached_cluster.set_raw(2, key, b"x")
    assert memcached_cluster.keys(2) == planted
    assert memcached_cluster.keys(0) == set()


def test_set_raw_and_get_raw_round_trip_bytes_flags_and_expiry(
    memcached_cluster: LocalCluster,
) -> None:
    value = bytes(range(256)) + b"\r\nEND\r\n"
    memcached_cluster.set_raw(0, b"blob", value, flags=42, exptime=100)
    assert memcached_cluster.get_raw(0, b"blob") == value
    assert memcached_cluster.get_raw(0, b"missing") is None
    with connect(memcached_cluster, 0) as sock:
        header = ask(sock, b"mg blob f t\r\nmn\r\n", end=b"MN\r\n")
    assert header.startswith(b"HD f42 t")
    assert 98 <= int(header.split(b" t")[1].split(b"\r\n")[0]) <= 100


def test_stats_are_text(memcached_cluster: LocalCluster) -> None:
    stats = memcached_cluster.stats(0)
    assert stats["version"].count(".") == 2  # e.g. "1.6.18"
    assert stats["curr_items"] == "0"
    assert stats["libevent"]  # values may hold spaces or dashes: kept as text


def test_udp_cluster_answers_a_framed_get_on_the_tcp_port_number() -> None:
    with LocalCluster(1, udp=True) as cluster:
        server = cluster.servers[0]
        assert server.udp_port == server.port
        assert cluster.dsn() == f"udp://127.0.0.1:{server.port}"
        cluster.set_raw(0, b"k", b"over udp")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(1.0)
            # Frame header: request id, sequence number, datagram count, reserved.
            udp.sendto(struct.pack("!HHHH", 7, 0, 1, 0) + b"get k\r\n", ("127.0.0.1", server.port))
            datagram = udp.recv(2048)
    assert struct.unpack("!HHHH", datagram[:8]) == (7, 0, 1, 0)
    assert datagram[8:] == b"VALUE k 0 8\r\nover udp\r\nEND\r\n"


def test_tcp_cluster_has_no_udp_listener(memcached_cluster: LocalCluster) -> None:
    server = memcached_cluster.servers[0]
    assert server.udp_port is None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(1.0)
        udp.connect(("127.0.0.1", server.port))
        udp.send(struct.pack("!HHHH", 1, 0, 1, 0) + b"get k\r\n")
        with pytest.raises(ConnectionRefusedError):  # ICMP port unreachable
            udp.recv(2048)


def test_unix_socket_cluster_works_and_restarts_on_the_same_path(
    local_cluster_factory: Factory,
) -> None:
    cluster = local_cluster_factory(2, unix=True)
    server = cluster.servers[1]
    assert server.socket_path is not None
    assert (server.host, server.port) == (server.socket_path, 0)
    assert server.address == f"unix:{server.socket_path}"
    assert cluster.dsn().split(", ")[1] == f"unix://{server.socket_path}"
    assert oct(os.stat(server.socket_path).st_mode & 0o777) == "0o700"
    cluster.set_raw(1, b"memsess:k", b"v")
    assert cluster.keys(1) == {b"memsess:k"}

    cluster.kill(1)
    with pytest.raises(ConnectionRefusedError):
        connect(cluster, 1)
    cluster.start_server(1)
    assert cluster.get_raw(1, b"memsess:k") is None


def test_udp_and_unix_together_are_refused() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        LocalCluster(1, udp=True, unix=True)


def test_missing_binary_raises_an_error_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("MEMSESS_MEMCACHED", raising=False)
    with pytest.raises(MemcachedNotFoundError) as on_path:
        LocalCluster(1)
    message = str(on_path.value)
    assert "memcached not found on PATH" in message
    assert "apt-get install memcached" in message
    assert "brew install memcached" in message
    assert "memcached='/path/to/memcached'" in message
    assert isinstance(on_path.value, MemsessError)
    assert isinstance(on_path.value, RuntimeError)
    with pytest.raises(MemcachedNotFoundError, match="not found at '/nowhere/memcached'"):
        LocalCluster(1, memcached="/nowhere/memcached")


def test_memcached_binary_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSESS_MEMCACHED", "/nowhere/memcached")
    with pytest.raises(MemcachedNotFoundError, match="/nowhere/memcached"):
        LocalCluster(1)


def test_bad_arguments_fail_fast_with_memcacheds_own_words() -> None:
    cluster = LocalCluster(2, extra_args=["--no-such-option"])
    started = time.monotonic()
    with pytest.raises(LocalClusterError, match=r"exited.*unrecognized option") as failure:
        cluster.start()
    assert time.monotonic() - started < 1.0
    assert "--no-such-option" in str(failure.value)  # the command line is in the message
    assert not any(server.running for server in cluster.servers)


def test_two_clusters_at_once_get_distinct_ports(local_cluster_factory: Factory) -> None:
    first, second = local_cluster_factory(3), local_cluster_factory(3)
    ports = [server.port for server in first.servers + second.servers]
    assert len(set(ports)) == 6
    first.set_raw(0, b"k", b"first")
    assert second.get_raw(0, b"k") is None


def test_a_port_taken_meanwhile_is_replaced_by_a_free_one(
    local_cluster_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = local_cluster_factory(1)  # a memcached already listening: answers with its own pid
    with socket.socket() as squatter:  # a listener that never answers
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = [other.servers[0].port, squatter.getsockname()[1]]
        real_free_ports = memsess.testing._free_ports
        handed_out: list[int] = []

        def free_ports_racing(host: str, count: int, *, udp: bool) -> list[int]:
            ports = taken[:count] if not handed_out else real_free_ports(host, count, udp=udp)
            handed_out.extend(ports)
            return ports

        monkeypatch.setattr(memsess.testing, "_free_ports", free_ports_racing)
        cluster = local_cluster_factory(2)
    assert not {server.port for server in cluster.servers} & set(taken)
    assert all(cluster.stats(i)["pid"] for i in range(2))
    assert other.servers[0].running


def test_close_in_a_forked_child_leaves_the_parents_servers_running(
    memcached_cluster: LocalCluster,
) -> None:
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        memcached_cluster.close()
        os._exit(0)
    os.waitpid(child, 0)
    assert all(server.running for server in memcached_cluster.servers)
    memcached_cluster.set_raw(0, b"k", b"still here")


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_servers_die_with_a_test_process_that_is_killed_without_cleanup(tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "from memsess.testing import LocalCluster\n"
        "cluster = LocalCluster(2)\n"
        "cluster.start()\n"
        "print(' '.join(str(s.process.pid) for s in cluster.servers), flush=True)\n"
        "os._exit(0)  # no atexit, no finalizers: as if SIGKILLed or timed out\n"
    )
    environment = {**os.environ, "TMPDIR": str(tmp_path)}  # the child leaves its temp dir
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, timeout=10, env=environment
    )
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 2.0
    while not all(is_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(is_gone(pid) for pid in pids)


def test_factory_fixture_passes_options_through(local_cluster_factory: Factory) -> None:
    cluster = local_cluster_factory(1, memory_mb=8, item_size="2m")
    assert cluster.stats(0)["limit_maxbytes"] == str(8 * 1024 * 1024)
    cluster.set_raw(0, b"big", b"x" * 1_500_000)  # over the default 1 MB item size
    assert cluster.get_raw(0, b"big") == b"x" * 1_500_000


def test_plugin_fixtures_stop_every_server_after_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Load the plugin by module name whether or not the package (and its entry point) is installed.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pids_file = pytester.path / "pids.txt"
    pytester.makepyfile(
        f"""
        def test_uses_both(memcached_cluster, local_cluster_factory):
            extra = local_cluster_factory(2, udp=True)
            servers = memcached_cluster.servers + extra.servers
            with open({str(pids_file)!r}, "w") as out:
                out.write(" ".join(str(server.process.pid) for server in servers))
        """
    )
    result = pytester.runpytest("-p", "memsess.testing", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    pids = [int(pid) for pid in pids_file.read_text().split()]
    assert len(pids) == 5
    assert all(is_gone(pid) for pid in pids)
