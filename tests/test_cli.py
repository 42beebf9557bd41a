"""``memsess check`` and ``memsess inspect`` driven as a user would: a subprocess against
real memcached servers, some of them killed or hung, output and exit status checked."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from conftest import key_of, server_indexes

from memsess import SessionStore
from memsess.records import DATA, FLAGS, encode_record
from memsess.serializers import MSGPACK
from memsess.testing import LocalCluster

MARKER = "marker-7f3c-secret-contents"


def memsess(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memsess", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def row(output: str, address: str) -> str:
    """The table line of one server (or copy)."""
    lines = [line for line in output.splitlines() if line.split()[:3].count(address)]
    lines = [line for line in lines if line.split()[0] in (address, "replica", "extra")]
    assert len(lines) == 1, output
    return lines[0]


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


def test_check_rejects_a_malformed_dsn_with_status_2(cluster: LocalCluster) -> None:
    result = memsess("check", f"tcp://{cluster.servers[0].address}?weight=0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "weight must be an integer >= 1" in result.stderr


# -- inspect --------------------------------------------------------------------------------


def inspect(dsn: str, sid: str, *options: str) -> tuple[subprocess.CompletedProcess[str], str]:
    # "--": an id may start with "-" (token_urlsafe), which argparse takes for an option.
    result = memsess("inspect", dsn, *options, "--", sid)
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
        assert cells[3:5] == ["current", "data"]
        assert 590 <= int(cells[-2]) <= 600  # "expires in 600 s", from memcached's mg t


def test_inspect_show_data_prints_the_contents_once(
    dsn: str, saved: tuple[SessionStore, str]
) -> None:
    result, out = inspect(dsn, saved[1], "--show-data")
    assert result.returncode == 0
    assert out.count(MARKER) == 1
    assert "(replica 1, replica 2)" in out


def test_inspect_marks_an_older_copy_stale(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    store, sid = saved
    first, second = server_indexes(cluster, store, sid)
    old = encode_record(1_000_000, DATA, MSGPACK.id, MSGPACK.dumps({"secret": MARKER}))
    cluster.set_raw(first, key_of(store, sid), old, flags=FLAGS, exptime=60)
    result, out = inspect(dsn, sid)
    assert result.returncode == 1
    assert row(out, cluster.servers[first].address).split()[3:6] == ["stale", "data", "1000000"]
    assert row(out, cluster.servers[second].address).split()[3] == "current"
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
    assert row(out, cluster.servers[second].address).split()[3] == "missing"
    assert row(out, cluster.servers[first].address).split()[3] == "current"
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
        assert row(out, cluster.servers[index].address).split()[3:5] == ["current", "tombstone"]


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
    assert corrupt.split()[3] == "corrupt"
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
    assert "unreachable" in row(out, cluster.servers[first].address)
    assert "Connection refused" in row(out, cluster.servers[first].address)
    assert row(out, cluster.servers[second].address).split()[3] == "current"


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


def test_inspect_of_an_unknown_session_exits_3(dsn: str) -> None:
    sid = SessionStore.new_id()
    result, out = inspect(dsn, sid)
    assert result.returncode == 3
    assert ": absent" in out.splitlines()[0]
    assert out.count("missing") == 2


def test_inspect_a_malformed_id_exits_2_and_sends_nothing(cluster: LocalCluster, dsn: str) -> None:
    # Each stats call opens one connection; inspect must open none in between.
    before = [int(cluster.stats(i)["total_connections"]) for i in range(3)]
    result = memsess("inspect", dsn, "x" * 42 + "\r")
    after = [int(cluster.stats(i)["total_connections"]) for i in range(3)]
    assert result.returncode == 2
    assert "not a memsess session id" in result.stderr
    assert result.stdout == ""
    assert after == [n + 1 for n in before]


def test_help_lists_every_command_and_the_exit_statuses() -> None:
    result = memsess("--help")
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("demo", "check", "inspect"))
    assert "exit status: 0 all servers up" in " ".join(memsess("check", "--help").stdout.split())


def test_inspect_flags_a_copy_outside_the_replica_set_as_extra(
    cluster: LocalCluster, dsn: str, saved: tuple[SessionStore, str]
) -> None:
    store, sid = saved  # saved with redundancy 2; inspected as if the app used 1
    first, second = (cluster.servers[i].address for i in server_indexes(cluster, store, sid))
    result, out = inspect(dsn, sid, "--redundancy", "1")
    assert result.returncode == 0  # the one replica is current; the extra does not count
    assert row(out, first).split()[:4] == ["replica", "1", first, "current"]
    assert row(out, second).split()[:3] == ["extra", second, "current"]
    assert "extra: a copy outside the replica set for redundancy 1" in out
