"""``memsess check`` and ``memsess inspect`` driven as a user would: a subprocess against
real memcached servers, some of them killed or hung, output and exit status checked; and
against socket-level fakes that misbehave as no real memcached does (dripping a reply one
byte at a time, streaming STAT lines forever), to pin that every command ends in time."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import all_keys, key_of, server_indexes

import memsess as memsess_package
from memsess import SessionStore
from memsess.copies import CopyStatus
from memsess.protocol import MAX_STATS_LINES, MAX_STATS_SIZE
from memsess.records import DATA, FLAGS, encode_record, storage_key
from memsess.serializers import MSGPACK
from memsess.testing import LocalCluster

MARKER = "marker-7f3c-secret-contents"
TIMEOUT = 0.5  # seconds: the DSN timeout of the tests against fakes
#: What a command may take past its servers' timeout: interpreter start-up (~0.2 s here),
#: the other servers' round trips, a busy 2-core host. A command that did not end at the
#: timeout would take the subprocess's 30 s.
SLACK = 1.5


def memsess(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memsess", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def row(output: str, address: str) -> str:
    """The table line of one server (or copy)."""
    lines = [line for line in output.splitlines() if line.split()[:3].count(address)]
    lines = [line for line in lines if line.split()[0] in (address, "replica", "extra")]
    assert len(lines) == 1, output
    return lines[0]


def status_of(output: str, address: str) -> CopyStatus:
    """The status inspect gives the copy on one server: the store's own names."""
    cells = row(output, address).split()
    return CopyStatus(cells[cells.index(address) + 1])


@pytest.fixture
def dsn(cluster: LocalCluster) -> str:
    return cluster.dsn(timeout=0.5)


@pytest.fixture
def saved(cluster: LocalCluster, dsn: str) -> tuple[SessionStore, str]:
    """A store on ``cluster`` and a session saved through it, holding MARKER."""
    store = SessionStore.from_dsn(dsn, redundancy=2)
    sid = store.new_id()
    store.save(sid, {"secret": MARKER}, ttl=600)
    return store, sid


# -- check ----------------------------------------------------------------------------------


def test_check_healthy_cluster_exits_0_with_one_row_per_server(
    cluster: LocalCluster, dsn: str
) -> None:
    result = memsess("check", dsn)
    assert result.returncode == 0, result.stderr
    version = cluster.stats(0)["version"]
    for server in cluster.servers:
        cells = row(result.stdout, server.address).split()
        assert cells[1:3] == ["yes", version]
        assert cells[-2:] == ["configured", "up"]  # udp "not configured", memsess "up"
    assert "OK: all 3 servers up; redundancy 2 met" in result.stdout
    assert result.stderr == ""  # no progress lines: nothing was slow
    build = "compiled (mypyc, " if memsess_package.__compiled__ else "pure Python"
    assert f"memsess {memsess_package.__version__}, {build}" in result.stdout


def test_check_json_says_which_build_runs(dsn: str) -> None:
    report = json.loads(memsess("check", dsn, "--json").stdout)
    assert report["memsess"] == memsess_package.__version__
    assert report["compiled"] is memsess_package.__compiled__
    assert report["build"].startswith("compiled" if report["compiled"] else "pure")


def test_check_with_a_server_killed_says_down_and_exits_1(cluster: LocalCluster, dsn: str) -> None:
    cluster.kill(1)
    result = memsess("check", dsn)
    assert result.returncode == 1
    killed = row(result.stdout, cluster.servers[1].address)
    assert "no: Connection refused" in killed
    assert killed.split()[-1] == "down"  # memsess's own health tracking agrees
    for i in (0, 2):
        assert row(result.stdout, cluster.servers[i].address).split()[1] == "yes"
    assert f"DEGRADED: down: {cluster.servers[1].address}" in result.stdout


def test_check_exits_2_when_too_few_servers_are_left_for_the_redundancy(
    cluster: LocalCluster, dsn: str
) -> None:
    cluster.kill(0)
    cluster.kill(2)
    result = memsess("check", dsn)
    assert result.returncode == 2
    assert "CRITICAL: 1 of 3 servers reachable; redundancy 2 cannot be met" in result.stdout
    assert memsess("check", dsn, "--redundancy", "1").returncode == 1  # degraded, still served


def test_check_exits_2_for_a_redundancy_above_the_server_count(dsn: str) -> None:
    result = memsess("check", dsn, "--redundancy", "4")
    assert result.returncode == 2
    assert "3 of 3 servers reachable; redundancy 4 cannot be met" in result.stdout


def test_check_json_reports_items_memory_and_latency(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    cluster.kill(2)
    result = memsess("check", dsn, "--json")
    report = json.loads(result.stdout)
    assert report["exit_status"] == result.returncode == 1
    by_address = {server["address"]: server for server in report["servers"]}
    up = [by_address[cluster.servers[i].address] for i in (0, 1)]
    assert all(s["reachable"] and s["state"] == "up" and s["latency_ms"] > 0 for s in up)
    assert all(s["memory_limit"] == 64 * 1024 * 1024 for s in up)
    killed = by_address[cluster.servers[2].address]
    assert (killed["reachable"], killed["state"], killed["items"]) == (False, "down", None)
    _, sid = saved
    holders = server_indexes(cluster, saved[0], sid)
    expected_items = sum(1 for i in holders if i != 2)
    assert sum(s["items"] for s in up) == expected_items


def test_check_reports_the_udp_listener_on_off_or_not_configured(
    local_cluster_factory: Callable[..., LocalCluster],
) -> None:
    with_udp = local_cluster_factory(2, udp=True)
    on = json.loads(memsess("check", with_udp.dsn("udp"), "--json").stdout)
    assert [s["udp"] for s in on["servers"]] == ["on", "on"]
    assert on["exit_status"] == 0
    plain = json.loads(memsess("check", with_udp.dsn("tcp"), "--json").stdout)
    assert [s["udp"] for s in plain["servers"]] == ["not configured"] * 2
    tcp_only = local_cluster_factory(1)  # memcached -U 0: nothing listens on UDP
    port = tcp_only.servers[0].port
    result = memsess("check", tcp_only.dsn("tcp", udp_port=port), "--json")
    off = json.loads(result.stdout)
    assert off["servers"][0]["udp"] == "off (connection refused)"
    assert result.returncode == 1
    assert "UDP listener not answering" in off["verdict"]


def test_check_shows_progress_while_a_hung_server_is_waited_for(
    cluster: LocalCluster, dsn: str
) -> None:
    cluster.hang(1)
    try:
        result = memsess("check", dsn, "--timeout", "1")
    finally:
        cluster.resume(1)
    hung = cluster.servers[1].address
    assert result.returncode == 1
    assert f"waiting for {hung}" in result.stderr
    assert f"{hung}: done in 1." in result.stderr
    hung_row = row(result.stdout, hung)
    assert "no: no reply within 1 s" in hung_row
    assert hung_row.split()[-1] == "suspect"  # one straggler: memsess still uses it


def test_check_and_inspect_speak_tls_and_authenticate_as_the_dsn_says() -> None:
    # The CLI goes through memsess's own transport: whatever a DSN can ask of it (tls://,
    # user:password@), the admin commands do too.
    with LocalCluster(2, tls=True, auth=("operator", "pa55word")) as secure:
        dsn = secure.dsn(timeout=TIMEOUT)
        assert dsn.startswith("tls://operator:pa55word@")
        store = SessionStore.from_dsn(dsn, redundancy=2)
        sid = store.new_id()
        store.save(sid, {"secret": MARKER}, ttl=600)
        check = memsess("check", dsn)
        result, out = inspect(dsn, sid)
        refused = memsess("check", dsn.replace("pa55word", "wrong"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert all(row(check.stdout, s.address).split()[1] == "yes" for s in secure.servers)
    assert result.returncode == 0, out + result.stderr
    assert [status_of(out, s.address) for s in secure.servers] == [CopyStatus.CURRENT] * 2
    assert refused.returncode == 2
    assert "refused the credentials of user 'operator'" in row(
        refused.stdout, secure.servers[0].address
    )


def one_line_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The single stderr line of a command that refused its command line."""
    assert result.stdout == ""
    assert result.stderr.startswith(f"memsess {command}: ")
    assert result.stderr.count("\n") == 1, result.stderr  # no traceback
    return result.stderr


def test_check_rejects_a_malformed_dsn_with_status_3_unknown(cluster: LocalCluster) -> None:
    # Nagios: 3 is UNKNOWN. A typo in the monitor's own configuration is not the cluster
    # being CRITICAL (2), which would page someone for the wrong reason.
    result = memsess("check", f"tcp://{cluster.servers[0].address}?weight=0")
    assert result.returncode == 3
    assert "weight must be an integer >= 1" in one_line_error(result, "check")
    assert memsess("check", "tcp://127.0.0.1:11211", "--redundancy", "0").returncode == 3


def test_a_host_that_does_not_resolve_is_a_usage_error_of_one_line(dsn: str) -> None:
    unresolvable = f"{dsn}, tcp://no-such-host.invalid:11211"
    check = memsess("check", unresolvable)
    assert check.returncode == 3
    assert "no-such-host.invalid:11211: cannot resolve host" in one_line_error(check, "check")
    result, _ = inspect(unresolvable, SessionStore.new_id())
    assert result.returncode == 3  # as for check: server state alone uses 0, 1 and 2
    assert "cannot resolve host" in one_line_error(result, "inspect")


@pytest.mark.parametrize("prefix", ["sessiön:", "a b:", "a\x01", "p" * 211])
def test_check_and_inspect_refuse_a_key_prefix_memcached_cannot_take_in_one_line(
    dsn: str, prefix: str
) -> None:
    result, _ = inspect(dsn, SessionStore.new_id(), "--key-prefix", prefix)
    assert result.returncode == 3
    assert "--key-prefix" in one_line_error(result, "inspect")
    check = memsess("check", dsn, "--key-prefix", prefix)
    assert check.returncode == 3
    assert "--key-prefix" in one_line_error(check, "check")


@pytest.mark.parametrize(
    ("command", "args", "complaint"),
    [
        ("check", [], "the following arguments are required: DSN"),
        ("check", ["tcp://127.0.0.1:1", "--timeout", "soon"], "--timeout: invalid float"),
        ("inspect", ["tcp://127.0.0.1:1"], "the following arguments are required: SESSION_ID"),
        ("inspect", ["tcp://127.0.0.1:1", "--redundancy", "two", "--", "x"], "invalid int"),
        ("inspect", ["tcp://127.0.0.1:1", "--no-such-option", "--", "x"], "unrecognized"),
    ],
)
def test_a_command_line_argparse_refuses_is_one_line_and_status_3_unknown(
    command: str, args: list[str], complaint: str
) -> None:
    # argparse's own exit status, 2, is CRITICAL to a monitor: a typo in a probe's
    # command line must not page anyone for the cluster.
    result = memsess(command, *args)
    assert result.returncode == 3
    assert complaint in one_line_error(result, command)


def test_check_round_trip_leaves_no_key_behind(cluster: LocalCluster, dsn: str) -> None:
    before = [cluster.stats(i) for i in range(3)]
    result = memsess("check", dsn, "--key-prefix", "app1:")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all_keys(cluster) == set()
    for i, stats in enumerate(before):  # one set, one get that hit, one delete that hit
        after = cluster.stats(i)
        for counter in ("cmd_set", "get_hits", "delete_hits"):
            assert int(after[counter]) == int(stats[counter]) + 1, counter


# -- inspect --------------------------------------------------------------------------------


def inspect(
    dsn: str, sid: str, *options: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], str]:
    # "--": an id may start with "-" (token_urlsafe), which argparse takes for an option.
    result = memsess("inspect", dsn, *options, "--", sid, env=env)
    assert sid not in result.stdout + result.stderr  # never the full id
    return result, result.stdout


def test_inspect_lists_each_copy_without_contents_or_the_full_id(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    store, sid = saved
    result, out = inspect(dsn, sid)
    assert result.returncode == 0, result.stderr
    assert MARKER not in out
    assert out.startswith(f"session {sid[:8]}… (memcached key {key_of(store, sid).decode()}): live")
    for n, index in enumerate(server_indexes(cluster, store, sid), start=1):
        cells = row(out, cluster.servers[index].address).split()
        assert cells[:2] == ["replica", str(n)]
        assert CopyStatus(cells[3]) is CopyStatus.CURRENT
        assert cells[4] == "data"
        assert 590 <= int(cells[-2]) <= 600  # "expires in 600 s", from memcached's mg t


def test_inspect_show_data_prints_the_contents_once(
    dsn: str, saved: tuple[SessionStore, str]
) -> None:
    result, out = inspect(dsn, saved[1], "--show-data")
    assert result.returncode == 0
    assert out.count(MARKER) == 1
    assert "(replica 1, replica 2)" in out


def test_inspect_show_data_prints_an_int_too_long_for_str_as_a_placeholder(
    cluster: LocalCluster, dsn: str
) -> None:
    # msgpack stores ints up to 4096 bytes (~9,900 digits); Python refuses to turn one of
    # over sys.get_int_max_str_digits() (4,300) digits into text, in repr and json alike.
    store = SessionStore.from_dsn(dsn, redundancy=2)
    sid = store.new_id()
    huge = 10**4999 + 7
    store.save(sid, {"n": huge, "nested": [{-huge}, (1, huge * 10)], "small": 12345}, ttl=600)
    store.close()
    result, out = inspect(dsn, sid, "--show-data")
    assert result.returncode == 0, result.stderr
    data = out[out.index("data of version") :]
    assert "'n': <int of 5000 digits>" in data
    assert "[{<negative int of 5000 digits>}, (1, <int of 5001 digits>)]" in data
    assert "'small': 12345" in data
    result, out = inspect(dsn, sid, "--show-data", "--json")
    assert result.returncode == 0, result.stderr
    (shown, _) = (copy["data"] for copy in json.loads(out)["copies"])
    assert shown["n"] == "<int of 5000 digits>"
    assert shown["small"] == 12345


def test_inspect_marks_an_older_copy_stale(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    store, sid = saved
    first, second = server_indexes(cluster, store, sid)
    old = encode_record(1_000_000, DATA, MSGPACK.id, MSGPACK.dumps({"secret": MARKER}))
    cluster.set_raw(first, key_of(store, sid), old, flags=FLAGS, exptime=60)
    result, out = inspect(dsn, sid)
    assert result.returncode == 1
    assert status_of(out, cluster.servers[first].address) is CopyStatus.STALE
    assert row(out, cluster.servers[first].address).split()[4:6] == ["data", "1000000"]
    assert status_of(out, cluster.servers[second].address) is CopyStatus.CURRENT
    assert "a load now would repair 1 of 2 copies" in out
    assert MARKER not in out


def test_inspect_marks_a_missing_copy(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    store, sid = saved
    first, second = server_indexes(cluster, store, sid)
    cluster.flush(second)
    result, out = inspect(dsn, sid)
    assert result.returncode == 1
    assert status_of(out, cluster.servers[second].address) is CopyStatus.MISSING
    assert status_of(out, cluster.servers[first].address) is CopyStatus.CURRENT
    assert "a load now would repair 1 of 2 copies" in out


def test_inspect_shows_a_logout_as_tombstones(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    store, sid = saved
    store.delete(sid)
    result, out = inspect(dsn, sid)
    assert result.returncode == 0
    assert ": logged out" in out.splitlines()[0]
    for index in server_indexes(cluster, store, sid):
        assert status_of(out, cluster.servers[index].address) is CopyStatus.CURRENT
        assert row(out, cluster.servers[index].address).split()[4] == "tombstone"


def test_inspect_reports_a_corrupt_copy_with_the_reason(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    store, sid = saved
    first, _ = server_indexes(cluster, store, sid)
    intact = cluster.get_raw(first, key_of(store, sid))
    assert intact is not None
    flipped = intact[:-1] + bytes([intact[-1] ^ 1])  # one bit of the payload
    cluster.set_raw(first, key_of(store, sid), flipped, flags=FLAGS, exptime=60)
    result, out = inspect(dsn, sid, "--show-data")
    assert result.returncode == 1
    corrupt = row(out, cluster.servers[first].address)
    assert status_of(out, cluster.servers[first].address) is CopyStatus.CORRUPT
    assert corrupt.split()[-5:] in (  # the corrupt copy's own lifetime, and why
        ["60", "s", "record", "checksum", "mismatch"],
        ["59", "s", "record", "checksum", "mismatch"],
    )
    assert out.count(MARKER) == 1  # --show-data: only the intact copy decodes
    assert "a load now would repair 1 of 2 copies" in out


def test_inspect_with_a_replica_server_down_says_unreachable(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    store, sid = saved
    first, second = server_indexes(cluster, store, sid)
    cluster.kill(first)
    result, out = inspect(dsn, sid)
    assert result.returncode == 1
    assert status_of(out, cluster.servers[first].address) is CopyStatus.UNREACHABLE
    assert "Connection refused" in row(out, cluster.servers[first].address)
    assert status_of(out, cluster.servers[second].address) is CopyStatus.CURRENT


def test_inspect_json_has_each_copy(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    store, sid = saved
    _, out = inspect(dsn, sid, "--json")
    report: dict[str, Any] = json.loads(out)
    assert (report["state"], report["exit_status"], report["session_prefix"]) == (
        "live",
        0,
        sid[:8],
    )
    assert [c["role"] for c in report["copies"]] == ["replica 1", "replica 2"]
    addresses = [cluster.servers[i].address for i in server_indexes(cluster, store, sid)]
    assert [c["address"] for c in report["copies"]] == addresses
    assert len({c["version"] for c in report["copies"]}) == 1
    assert all(c["data"] is None and c["size"] > 16 for c in report["copies"])


def test_inspect_of_a_session_no_server_holds_exits_2_critical(dsn: str) -> None:
    sid = SessionStore.new_id()
    result, out = inspect(dsn, sid)
    assert result.returncode == 2
    assert ": absent" in out.splitlines()[0]
    assert out.count(CopyStatus.MISSING.value) == 2


def test_inspect_a_malformed_id_exits_3_and_sends_nothing(cluster: LocalCluster, dsn: str) -> None:
    # Each stats call opens one connection; inspect must open none in between.
    before = [int(cluster.stats(i)["total_connections"]) for i in range(3)]
    result = memsess("inspect", dsn, "x" * 42 + "\r")
    after = [int(cluster.stats(i)["total_connections"]) for i in range(3)]
    assert result.returncode == 3
    assert "not a memsess session id" in one_line_error(result, "inspect")
    assert after == [n + 1 for n in before]


def test_help_lists_every_command_and_the_exit_statuses() -> None:
    result = memsess("--help")
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("demo", "check", "inspect"))
    assert "exit status: 0 all servers up" in " ".join(memsess("check", "--help").stdout.split())
    inspect_help = " ".join(memsess("inspect", "--help").stdout.split())
    assert "2 no server holds it" in inspect_help
    assert "3 a usage or configuration error" in inspect_help


def test_inspect_flags_a_copy_outside_the_replica_set_as_extra(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    store, sid = saved  # saved with redundancy 2; inspected as if the app used 1
    first, second = (cluster.servers[i].address for i in server_indexes(cluster, store, sid))
    result, out = inspect(dsn, sid, "--redundancy", "1")
    assert result.returncode == 0  # the one replica is current; the extra does not count
    assert row(out, first).split()[:3] == ["replica", "1", first]
    assert status_of(out, first) is CopyStatus.CURRENT
    assert row(out, second).split()[:2] == ["extra", second]
    assert status_of(out, second) is CopyStatus.CURRENT
    assert "extra: a copy outside the replica set for redundancy 1" in out


# -- misbehaving servers: every command ends within its timeout ---------------------------

#: A fake server's answer to one command line: chunks to send, and pauses in seconds.
Script = Callable[[bytes], Iterator[bytes | float]]


class FakeServer:
    """A memcached impostor on 127.0.0.1 that answers each command line by ``script``,
    one thread per connection; ``sent`` counts the bytes it got out. Stops when the
    client goes away or the test ends."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sent = 0
        self.received: list[bytes] = []  # every line, data blocks included
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets = [self._listener]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    def __enter__(self) -> FakeServer:
        self._threads[0].start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for sock in self._sockets:  # wakes the threads blocked in accept, recv or send
            with contextlib.suppress(OSError):  # not connected (any more)
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while data := conn.recv(65536):
                buffer += data
                while b"\r\n" in buffer:
                    line, _, buffer = buffer.partition(b"\r\n")
                    self.received.append(line)
                    for step in self.script(line):
                        if isinstance(step, float):
                            if self._stop.wait(step):
                                return
                        else:
                            conn.sendall(step)
                            self.sent += len(step)
        except OSError:
            return  # the client hung up: it gave up on us


def drip_forever(line: bytes) -> Iterator[bytes | float]:
    """A reply that never ends, one byte every 20 ms: each recv gets a byte, no recv ever
    waits the timeout out, and the line stays far below MAX_LINE_LENGTH."""
    yield b"VERSION 1."
    while True:
        yield 0.02
        yield b"6"


def healthy_but(stats: Callable[[], Iterator[bytes | float]]) -> Script:
    """A server that answers version and gets like memcached (no items) and stats by
    ``stats``."""

    def script(line: bytes) -> Iterator[bytes | float]:
        if line == b"stats":
            yield from stats()
        elif line == b"version":
            yield b"VERSION 1.6.18\r\n"
        else:
            yield b"END\r\n"

    return script


def stat_lines_flood() -> Iterator[bytes | float]:
    block = b"".join(b"STAT n%d 1\r\n" % i for i in range(4000))
    while True:
        yield block


def stat_lines_slowly() -> Iterator[bytes | float]:
    while True:
        yield b"STAT n 1\r\n"
        yield 0.01  # 4096 lines would take 41 s: only the deadline can end this


def timed(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = memsess(*args)
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (drip_forever, f"no: no reply within {TIMEOUT:g} s"),
        (healthy_but(stat_lines_slowly), f"no: no reply within {TIMEOUT:g} s"),
        (healthy_but(stat_lines_flood), f"no: a stats reply of more than {MAX_STATS_LINES}"),
    ],
    ids=["drip", "slow-stat-lines", "endless-stat-lines"],
)
def test_check_of_a_misbehaving_server_ends_at_its_timeout_and_says_it_failed(
    cluster: LocalCluster, script: Script, reason: str
) -> None:
    with FakeServer(script) as fake:
        dsn = f"{cluster.dsn(timeout=TIMEOUT)}, tcp://{fake.address}?timeout={TIMEOUT}"
        result, elapsed = timed("check", dsn)
        sent = fake.sent
    assert elapsed < TIMEOUT + SLACK
    assert result.returncode == 1  # one server down, redundancy 2 still met
    assert reason in row(result.stdout, fake.address)
    assert f"DEGRADED: down: {fake.address}" in result.stdout
    # It stopped reading: what the fake got out is what the parser took plus socket buffers.
    assert sent < 16 * MAX_STATS_SIZE


def admin_only(line: bytes) -> Iterator[bytes | float]:
    """A server that answers version and stats, and never a session command."""
    if line == b"version":
        yield b"VERSION 1.6.18\r\n"
    elif line == b"stats":
        yield b"STAT version 1.6.18\r\nSTAT curr_items 0\r\nEND\r\n"


def test_check_fails_a_server_that_answers_stats_but_never_a_session_command(
    cluster: LocalCluster,
) -> None:
    with FakeServer(admin_only) as fake:
        dsn = f"{cluster.dsn(timeout=TIMEOUT)}, tcp://{fake.address}?timeout={TIMEOUT}"
        result, elapsed = timed("check", dsn)
        received = list(fake.received)
    assert elapsed < TIMEOUT + SLACK
    assert result.returncode == 1, result.stdout
    assert f"DEGRADED: down: {fake.address}" in result.stdout
    cells = row(result.stdout, fake.address)
    assert f"no: set: no reply within {TIMEOUT:g} s" in cells
    # The probe loads timed out too, so memsess's own health agrees: suspect after one
    # timeout, down when two of the random probe ids both reached this server.
    assert cells.split()[-1] in {"suspect", "down"}
    # The round trip's own key, a session-sized value, and a lifetime that cleans up
    # after a delete that never came.
    (command,) = [line for line in received if line.startswith(b"set ")]
    _, key, _, exptime, size = command.split()
    assert key.startswith(b"memsess:check:")
    assert 0 < int(exptime) <= 60
    assert 1024 <= int(size) <= 4096


def mangles_values(line: bytes) -> Iterator[bytes | float]:
    """A server that stores anything and answers every get with a value of its own."""
    if line.startswith(b"set "):
        yield b"STORED\r\n"
    elif line.startswith(b"get "):
        key = line.split()[1]
        yield b"VALUE %b 0 5\r\nhello\r\nEND\r\n" % key
    else:
        yield from admin_only(line)


def test_check_fails_a_server_that_returns_other_bytes_than_were_set(
    cluster: LocalCluster,
) -> None:
    with FakeServer(mangles_values) as fake:
        dsn = f"{cluster.dsn(timeout=TIMEOUT)}, tcp://{fake.address}?timeout={TIMEOUT}"
        result = memsess("check", dsn)
    assert result.returncode == 1, result.stdout
    assert "no: get: answered other bytes than were set" in row(result.stdout, fake.address)


def test_inspect_of_a_dripping_server_ends_at_its_timeout(cluster: LocalCluster) -> None:
    with FakeServer(drip_forever) as fake:
        dsn = f"tcp://{cluster.servers[0].address}?timeout={TIMEOUT}, tcp://{fake.address}"
        dsn += f"?timeout={TIMEOUT}"
        (result, _), elapsed = timed_inspect(dsn, SessionStore.new_id(), "--redundancy", "2")
    assert elapsed < TIMEOUT + SLACK
    assert result.returncode == 1  # a copy unreadable: not "absent" (2), which it may hold
    dripping = row(result.stdout, fake.address)
    assert status_of(result.stdout, fake.address) is CopyStatus.UNREACHABLE
    assert f"no reply within {TIMEOUT:g} s" in dripping


def timed_inspect(
    dsn: str, sid: str, *options: str
) -> tuple[tuple[subprocess.CompletedProcess[str], str], float]:
    started = time.monotonic()
    outcome = inspect(dsn, sid, *options)
    return outcome, time.monotonic() - started


def test_inspect_falls_back_to_get_on_a_server_without_meta_commands() -> None:
    sid = SessionStore.new_id()
    key = storage_key(b"memsess:", sid)
    record = encode_record(1_000_000, DATA, MSGPACK.id, MSGPACK.dumps({"secret": MARKER}))

    def memcached_1_5(line: bytes) -> Iterator[bytes | float]:
        if line == b"get " + key:
            yield b"VALUE %b %d %d\r\n%b\r\nEND\r\n" % (key, FLAGS, len(record), record)
        else:
            yield b"ERROR\r\n"  # mg is an unknown command there

    with FakeServer(memcached_1_5) as fake:
        result, out = inspect(f"tcp://{fake.address}", sid, "--redundancy", "1", "--show-data")
    assert result.returncode == 0, result.stderr
    cells = row(out, fake.address).split()
    assert CopyStatus(cells[3]) is CopyStatus.CURRENT
    assert cells[4:6] == ["data", "1000000"]
    assert cells[-1] == "-"  # the lifetime is unknown without mg
    assert out.count(MARKER) == 1


def test_check_reports_a_silent_or_garbled_udp_listener_within_its_wait(
    cluster: LocalCluster,
) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never read
    garbled = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    done = threading.Event()

    def answer_garbled() -> None:
        # Every request (the health probe's gets may come too) gets a stray datagram
        # (another request id), which is skipped, then a reply to the very request that
        # answers no memcached command.
        while not done.is_set():
            try:
                datagram, peer = garbled.recvfrom(2048)
            except TimeoutError:
                continue
            stray = bytes([datagram[0] ^ 1]) + datagram[1:8] + b"VERSION 1.6.18\r\n"
            garbled.sendto(stray, peer)
            garbled.sendto(datagram[:8] + b"STORED\r\n", peer)

    with silent, garbled:
        silent.bind(("127.0.0.1", 0))
        garbled.bind(("127.0.0.1", 0))
        garbled.settimeout(0.05)
        answerer = threading.Thread(target=answer_garbled, daemon=True)
        answerer.start()
        servers = [server.address for server in cluster.servers]
        ports = [silent.getsockname()[1], garbled.getsockname()[1]]
        dsn = ", ".join(
            [f"tcp://{servers[i]}?timeout={TIMEOUT}&udp_port={ports[i]}" for i in (0, 1)]
            + [f"tcp://{servers[2]}?timeout={TIMEOUT}"]
        )
        try:
            result, elapsed = timed("check", dsn, "--json")
        finally:
            done.set()
            answerer.join(timeout=5)
    report = json.loads(result.stdout)
    assert [s["udp"] for s in report["servers"]] == [
        f"off (no reply within {TIMEOUT:g} s)",
        "off (bad reply)",
        "not configured",
    ]
    assert result.returncode == 1
    assert elapsed < TIMEOUT + SLACK


def test_inspect_opens_sealed_and_compressed_copies_with_keys_from_the_environment(
    cluster: LocalCluster, dsn: str
) -> None:
    from memsess import generate_key

    key = generate_key()
    store = SessionStore.from_dsn(
        dsn, redundancy=2, secret_keys=[key], compress_threshold=16, compression="zlib"
    )
    sid = store.new_id()
    store.save(sid, {"secret": MARKER * 20}, ttl=600)
    store.close()

    result, out = inspect(dsn, sid, "--show-data", env={"MEMSESS_SECRET_KEYS": f"{key}"})
    assert result.returncode == 0, result.stderr
    assert out.count(MARKER * 20) == 1
    assert key not in out + result.stderr

    # Without the keys: the copies are sealed, not corrupt, and nothing is shown.
    result, out = inspect(dsn, sid, "--show-data", env={"MEMSESS_SECRET_KEYS": ""})
    assert result.returncode == 1, out
    assert ": sealed" in out.splitlines()[0]
    for index in server_indexes(cluster, store, sid):
        assert status_of(out, cluster.servers[index].address) is CopyStatus.SEALED
    assert MARKER not in out

    # With keys, an unsealed copy is not trusted: the store would not read it either.
    plain = SessionStore.from_dsn(dsn, redundancy=2)
    plain.save(sid, {"secret": "planted"})
    plain.close()
    env = {"MY_KEYS": f"{generate_key()}, {key}"}
    result, out = inspect(dsn, sid, "--secret-keys-env", "MY_KEYS", env=env)
    assert result.returncode == 2, out  # no copy the store would read: absent
    for index in server_indexes(cluster, store, sid):
        assert status_of(out, cluster.servers[index].address) is CopyStatus.CORRUPT
    assert "unsealed record" in out


def test_inspect_refuses_short_keys_in_one_line_without_showing_them(dsn: str) -> None:
    sid = SessionStore.new_id()
    result = memsess("inspect", dsn, "--", sid, env={"MEMSESS_SECRET_KEYS": "too-short-key"})
    assert result.returncode == 3, result.stderr
    assert "too-short-key" not in one_line_error(result, "inspect")
