"""memsess.testing: LocalCluster really starts, breaks and stops memcached, leaking nothing."""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import os
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

import memsess.testing
from memsess import _local_servers
from memsess.errors import MemsessError
from memsess.testing import (
    LocalCluster,
    LocalClusterError,
    MemcachedNotFoundError,
    TestCerts,
    make_test_certs,
)

# The plugin's fixtures, used here the way a user's conftest would get them.
memcached_cluster = memsess.testing.memcached_cluster
local_cluster_factory = memsess.testing.local_cluster_factory

pytest_plugins = ["pytester"]

Factory = Callable[..., LocalCluster]

needs_cryptography = pytest.mark.skipif(
    importlib.util.find_spec("cryptography") is None,
    reason="TLS test certificates need the cryptography package (memsess[crypto])",
)


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


def tls_connect(
    cluster: LocalCluster, i: int, context: ssl.SSLContext | None = None, timeout: float = 1.0
) -> ssl.SSLSocket:
    """A TLS connection to server ``i``, handshake done; the cluster's own context by default."""
    server = cluster.servers[i]
    raw = socket.create_connection((server.host, server.port), timeout=timeout)
    try:
        return (context or cluster.ssl_context()).wrap_socket(raw, server_hostname=server.host)
    except BaseException:
        raw.close()
        raise


def authenticate(sock: socket.socket, user: str, password: str) -> bytes:
    """memcached's ASCII auth, as the library sends it; the server's one-line answer."""
    data = f"{user} {password}".encode()
    return ask(sock, b"set memsess:auth 0 -1 %d\r\n%s\r\n" % (len(data), data))


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes or resets the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def answer_over_tls(cluster: LocalCluster, context: ssl.SSLContext) -> bytes | OSError:
    """The server's first bytes after ``version``, or the TLS or connection error instead.

    With TLS 1.3 the client's handshake ends before the server has checked the client's
    certificate: a refusal shows at the first read (an alert, a close, or a reset).
    """
    try:
        with tls_connect(cluster, 0, context) as sock:
            sock.sendall(b"version\r\n")
            return sock.recv(65536)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc


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
        real_free_ports = _local_servers.free_ports
        handed_out: list[int] = []

        def free_ports_racing(host: str, count: int, *, udp: bool) -> list[int]:
            ports = taken[:count] if not handed_out else real_free_ports(host, count, udp=udp)
            handed_out.extend(ports)
            return ports

        # Where LocalCluster looks it up: memsess.testing imported the name.
        monkeypatch.setattr(memsess.testing, "free_ports", free_ports_racing)
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


# -- TLS and authentication ----------------------------------------------------------------


@needs_cryptography
def test_tls_cluster_answers_over_tls_only_and_removes_its_certificates() -> None:
    with LocalCluster(2, tls=True) as cluster:
        assert cluster.certs is not None
        cert_dir = Path(cluster.certs.ca).parent
        assert all(
            cluster.stats(i)["pid"] == str(s.process.pid)
            for i, s in enumerate(cluster.servers)
            if s.process
        )
        with tls_connect(cluster, 1) as sock:
            assert sock.version() == "TLSv1.3"
            assert ask(sock, b"version\r\n").startswith(b"VERSION 1.")
            settings = ask(sock, b"stats settings\r\n", end=b"END\r\n")
        assert b"STAT ssl_enabled yes\r\n" in settings
        assert b"STAT ssl_verify_mode 0\r\n" in settings  # no client certificate asked

        with connect(cluster, 1) as plain:  # a plain TCP client gets no memcached answer
            plain.sendall(b"version\r\n")
            assert b"VERSION" not in until_closed(plain)

        untrusting = ssl.create_default_context()  # the system's CAs: ours is not among them
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_connect(cluster, 0, untrusting).close()
        assert cert_dir.is_dir()
    assert not cert_dir.exists()


@needs_cryptography
def test_client_certs_cluster_refuses_a_tls_client_without_a_certificate(
    local_cluster_factory: Factory,
) -> None:
    cluster = local_cluster_factory(1, tls=True, client_certs=True)
    assert cluster.certs is not None
    without_cert = ssl.create_default_context(cafile=cluster.certs.ca)
    refused = answer_over_tls(cluster, without_cert)
    assert refused == b"" or isinstance(refused, OSError), refused

    with_cert = cluster.ssl_context()
    assert (
        answer_over_tls(cluster, with_cert) == f"VERSION {cluster.stats(0)['version']}\r\n".encode()
    )
    with tls_connect(cluster, 0, with_cert) as sock:
        settings = ask(sock, b"stats settings\r\n", end=b"END\r\n")
    # ssl_verify_mode=2 is "Require" in memcached -h; stats show it as OpenSSL's flags:
    # SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT (3 here, 7 for "Once").
    assert b"STAT ssl_verify_mode 3\r\n" in settings
    assert f"STAT ssl_ca_cert {cluster.certs.ca}\r\n".encode() in settings


def test_auth_cluster_rejects_a_wrong_password_and_accepts_the_right_one(
    local_cluster_factory: Factory,
) -> None:
    cluster = local_cluster_factory(1, auth=("alice", "s3cr:et!"))
    assert cluster.certs is None
    assert cluster.dsn() == f"tcp://alice:s3cr%3Aet%21@{cluster.servers[0].address}"
    with connect(cluster, 0) as sock:
        assert ask(sock, b"version\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    for user, password in (("alice", "wrong"), ("mallory", "s3cr:et!"), ("alice", "s3cr")):
        with connect(cluster, 0, timeout=0.2) as sock:
            # memcached 1.6.18 says "authentication failure" (or only "unauthenticated" when
            # the next command came in the same packet); the connection stays unauthenticated.
            assert authenticate(sock, user, password).startswith(b"CLIENT_ERROR ")
            assert ask(sock, b"version\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    with connect(cluster, 0) as sock:
        assert authenticate(sock, "alice", "s3cr:et!") == b"STORED\r\n"
        assert ask(sock, b"version\r\n").startswith(b"VERSION 1.")
        assert ask(sock, b"get memsess:auth\r\n") == b"END\r\n"  # the auth set stores nothing

    cluster.set_raw(0, b"k", b"v")  # the admin calls authenticate too
    assert cluster.get_raw(0, b"k") == b"v"
    assert cluster.keys(0) == {b"k"}


def test_auth_on_unix_sockets(local_cluster_factory: Factory) -> None:
    cluster = local_cluster_factory(1, unix=True, auth=("u", "p"))
    path = cluster.servers[0].socket_path
    assert cluster.dsn() == f"unix://{path}"  # unix:// takes no user:password@ in memsess.dsn
    assert cluster.auth == ("u", "p")
    with connect(cluster, 0) as sock:
        assert ask(sock, b"version\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    cluster.set_raw(0, b"k", b"v")
    cluster.restart(0)
    assert cluster.get_raw(0, b"k") is None


@needs_cryptography
def test_fault_helpers_work_on_a_tls_and_auth_cluster(
    local_cluster_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = local_cluster_factory(2, tls=True, client_certs=True, auth=("ops", "pw"))
    certs = cluster.certs
    assert certs is not None
    ca = Path(certs.ca).read_bytes()
    context = cluster.ssl_context()  # made before the restarts: it must still be trusted after
    port, old_pid = cluster.servers[0].port, cluster.stats(0)["pid"]

    cluster.set_raw(0, b"session", b"data", flags=7, exptime=100)
    assert cluster.get_raw(0, b"session") == b"data"
    cluster.restart(0)
    assert cluster.servers[0].port == port
    assert cluster.stats(0)["pid"] != old_pid
    assert cluster.get_raw(0, b"session") is None
    assert cluster.certs is certs
    assert Path(certs.ca).read_bytes() == ca
    with tls_connect(cluster, 0, context) as sock:
        assert authenticate(sock, "ops", "pw") == b"STORED\r\n"
        assert ask(sock, b"version\r\n").startswith(b"VERSION 1.")

    cluster.kill(1)
    with pytest.raises(ConnectionRefusedError):
        connect(cluster, 1)
    with pytest.raises(LocalClusterError, match=r"not running; call start_server\(1\)"):
        cluster.stats(1)
    cluster.start_server(1)
    server = cluster.servers[1]
    assert server.process is not None
    assert cluster.stats(1)["pid"] == str(server.process.pid)

    cluster.set_raw(1, b"a", b"1")
    cluster.set_raw(0, b"a", b"1")
    cluster.flush(1)
    assert cluster.keys(1) == set()
    assert cluster.keys(0) == {b"a"}

    cluster.hang(0)
    with pytest.raises(TimeoutError):  # the kernel accepts; no one does the TLS handshake
        tls_connect(cluster, 0, context, timeout=0.2).close()
    monkeypatch.setattr(memsess.testing, "ANSWER_TIMEOUT", 0.2)
    cluster.servers[0].hung = False  # as if stopped behind the cluster's back
    with pytest.raises(LocalClusterError, match=r"stats on server 0 .*timed out"):
        cluster.stats(0)
    cluster.servers[0].hung = True
    cluster.resume(0)
    assert cluster.get_raw(0, b"a") == b"1"


@needs_cryptography
def test_tls_dsn_carries_credentials_and_certificate_paths_percent_encoded(
    local_cluster_factory: Factory,
) -> None:
    cluster = local_cluster_factory(2, tls=True, client_certs=True, auth=("me", "p@ss/w%rd"))
    certs = cluster.certs
    assert certs is not None
    first, second = (server.address for server in cluster.servers)

    def encoded(path: str) -> str:
        return quote(path, safe="")

    query = (
        f"tls_ca={encoded(certs.ca)}&tls_cert={encoded(certs.client_cert)}"
        f"&tls_key={encoded(certs.client_key)}"
    )
    assert cluster.dsn() == (
        f"tls://me:p%40ss%2Fw%25rd@{first}?{query}, tls://me:p%40ss%2Fw%25rd@{second}?{query}"
    )
    entry = cluster.dsn(timeout=0.5, persistent=False).split(", ")[0]
    assert entry.endswith(f"?{query}&timeout=0.5&persistent=0")
    url = urlsplit(entry)
    assert url.scheme == "tls"
    assert (url.hostname, url.port) == ("127.0.0.1", cluster.servers[0].port)
    assert (unquote(url.username or ""), unquote(url.password or "")) == ("me", "p@ss/w%rd")
    assert "/" not in url.query  # the paths are percent-encoded whole
    params = parse_qs(url.query)
    assert params["tls_ca"] == [certs.ca]
    assert params["tls_cert"] == [certs.client_cert]
    assert params["tls_key"] == [certs.client_key]

    # Another scheme gets the credentials but no tls_* parameters; a bare address neither.
    assert (
        cluster.dsn("tcp") == f"tcp://me:p%40ss%2Fw%25rd@{first}, tcp://me:p%40ss%2Fw%25rd@{second}"
    )
    # A parameter of the caller's replaces the cluster's.
    replaced = urlsplit(cluster.dsn(tls_ca="/elsewhere/ca.pem").split(", ")[0])
    assert parse_qs(replaced.query)["tls_ca"] == ["/elsewhere/ca.pem"]
    with pytest.raises(ValueError, match="bare host:port"):
        cluster.dsn("")

    tls_only = local_cluster_factory(1, tls=True)
    assert tls_only.certs is not None
    address = tls_only.servers[0].address
    assert tls_only.dsn() == f"tls://{address}?tls_ca={encoded(tls_only.certs.ca)}"
    assert tls_only.servers[0].address == f"127.0.0.1:{tls_only.servers[0].port}"


@needs_cryptography
def test_tls_dsn_parses_back_with_memsess_dsn(local_cluster_factory: Factory) -> None:
    from memsess.dsn import parse_dsn

    cluster = local_cluster_factory(1, tls=True, client_certs=True, auth=("me", "p@ss/w%rd"))
    assert cluster.certs is not None
    (spec,) = parse_dsn(cluster.dsn(timeout=0.5))
    assert (spec.scheme, spec.host, spec.port) == ("tls", "127.0.0.1", cluster.servers[0].port)
    assert spec.timeout == 0.5
    found = {
        name: getattr(spec, name)
        for name in ("username", "password", "tls_ca", "tls_cert", "tls_key")
    }
    assert found == {
        "username": "me",
        "password": "p@ss/w%rd",
        "tls_ca": cluster.certs.ca,
        "tls_cert": cluster.certs.client_cert,
        "tls_key": cluster.certs.client_key,
    }


@needs_cryptography
def test_ssl_context_trusts_the_cluster_ca_and_needs_tls(local_cluster_factory: Factory) -> None:
    cluster = local_cluster_factory(1, tls=True)
    context = cluster.ssl_context()
    assert context is not cluster.ssl_context()  # a new one each time: callers may change it
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert [cert["subject"] for cert in context.get_ca_certs()] == [
        ((("organizationName", "memsess tests"),), (("commonName", "memsess test CA"),))
    ]
    plain = local_cluster_factory(1)
    assert plain.certs is None
    with pytest.raises(LocalClusterError, match="tls=True"):
        plain.ssl_context()


@pytest.mark.parametrize(
    "memcached_cluster", [{"n": 1, "tls": True, "auth": ("u", "p")}], indirect=True
)
@needs_cryptography
def test_memcached_cluster_fixture_takes_options_by_indirect_parametrization(
    memcached_cluster: LocalCluster,
) -> None:
    assert len(memcached_cluster.servers) == 1
    assert memcached_cluster.dsn().startswith("tls://u:p@127.0.0.1:")
    with tls_connect(memcached_cluster, 0) as sock:
        assert ask(sock, b"version\r\n") == b"CLIENT_ERROR unauthenticated\r\n"


@needs_cryptography
def test_certificates_name_the_local_hosts_and_chain_to_the_ca(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    certs = make_test_certs(tmp_path / "certs")
    assert isinstance(certs, TestCerts)
    assert all(Path(path).parent == tmp_path / "certs" for path in vars(certs).values())
    ca, server, client = (
        x509.load_pem_x509_certificate(Path(path).read_bytes())
        for path in (certs.ca, certs.server_cert, certs.client_cert)
    )
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf, usage in (
        (server, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    now = datetime.datetime.now(datetime.timezone.utc)
    for cert in (ca, server, client):
        assert cert.not_valid_before_utc < now - datetime.timedelta(hours=23)
        assert now + datetime.timedelta(days=29) < cert.not_valid_after_utc
        assert cert.not_valid_after_utc < now + datetime.timedelta(days=31)
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.name == "secp256r1"
    for key in (certs.server_key, certs.client_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    # Python's own TLS stack accepts the files: a server context and a client one with them.
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(certs.server_cert, certs.server_key)
    client_side = ssl.create_default_context(cafile=certs.ca)
    client_side.load_cert_chain(certs.client_cert, certs.client_key)

    other = make_test_certs(tmp_path / "other", hosts=("db.test", "10.1.2.3"))
    other_server = x509.load_pem_x509_certificate(Path(other.server_cert).read_bytes())
    other_san = other_server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert other_san.get_values_for_type(x509.DNSName) == ["db.test"]
    assert other_san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert Path(other.ca).read_bytes() != Path(certs.ca).read_bytes()  # a fresh CA each time


def test_without_cryptography_tls_names_the_extra_and_leaks_no_temp_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography fails
    with pytest.raises(ImportError, match=r"pip install memsess\[crypto\]"):
        make_test_certs(tmp_path / "certs")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ImportError, match=r"pip install memsess\[crypto\]"):
        LocalCluster(1, tls=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tls": True, "udp": True}, "no DTLS"),
        ({"tls": True, "unix": True}, "TCP only"),
        ({"client_certs": True}, r"client_certs=True needs tls=True"),
        ({"auth": ("u", "p"), "udp": True}, "refuses UDP"),
        ({"auth": ("a:b", "p")}, "no ':' in the user"),
        ({"auth": ("u", "p w")}, "without spaces|printable ASCII"),
        ({"auth": ("", "p")}, "printable ASCII"),
        ({"auth": ("u", "p\n")}, "printable ASCII"),
        ({"auth": ("u", "x" * 253)}, "254 characters"),
    ],
)
def test_tls_and_auth_options_memcached_cannot_honour_are_refused(
    options: dict[str, Any], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ValueError, match=message):
        LocalCluster(1, **options)
    assert list(tmp_path.iterdir()) == []


def test_set_raw_and_get_raw_refuse_keys_the_text_protocol_cannot_carry(
    memcached_cluster: LocalCluster,
) -> None:
    for key in (b"", b"a b", b"tab\tkey", b"nul\x00", b"x" * 251):
        with pytest.raises(ValueError, match="not a memcached key"):
            memcached_cluster.set_raw(0, key, b"v")
        with pytest.raises(ValueError, match="not a memcached key"):
            memcached_cluster.get_raw(0, key)
    memcached_cluster.set_raw(0, b"x" * 250, b"longest")
    assert memcached_cluster.get_raw(0, b"x" * 250) == b"longest"


def test_set_raw_reports_the_servers_refusal(local_cluster_factory: Factory) -> None:
    cluster = local_cluster_factory(1, memory_mb=8)
    with pytest.raises(LocalClusterError, match=r"set_raw on server 0 .*SERVER_ERROR"):
        cluster.set_raw(0, b"big", b"x" * 2_000_000)  # over the 1 MB item size
