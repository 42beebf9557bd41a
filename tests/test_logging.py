"""What memsess logs against real memcached: each event once, from one layer, naming the
server and the reason, never the session's contents or its id."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import TEST_RETRY_INTERVAL, server_indexes

from memsess import SessionStore
from memsess.records import DATA, FLAGS, encode_record, storage_key
from memsess.serializers import MSGPACK
from memsess.testing import LocalCluster

MARKER = "marker-41d9-session-contents"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="memsess")
    return caplog


@pytest.fixture
def session(store: SessionStore, logs: pytest.LogCaptureFixture) -> Iterator[str]:
    """A saved session holding MARKER; after the test, no log line may show either."""
    sid = store.new_id()
    store.save(sid, {"secret": MARKER})
    yield sid
    # At teardown, logs.records is the teardown's own (empty) list: ask for each phase.
    for record in logs.get_records("setup") + logs.get_records("call"):
        text = record.getMessage() + repr(record.args) + str(record.exc_info)
        assert MARKER not in text
        assert sid[:12] not in text  # not the id, not even a recognisable part of it


def key_of(store: SessionStore, sid: str) -> bytes:
    """The memcached key of ``sid``'s copies (``key_prefix`` is kept as given: a str)."""
    prefix = store.key_prefix  # the option as given: a str, or bytes
    return storage_key(prefix.encode("ascii") if isinstance(prefix, str) else prefix, sid)


def lines(logs: pytest.LogCaptureFixture, contains: str) -> list[logging.LogRecord]:
    return [r for r in logs.records if r.name.startswith("memsess") and contains in r.getMessage()]


def test_a_killed_server_is_marked_down_once_with_the_reason(
    cluster: LocalCluster, store: SessionStore, session: str, logs: pytest.LogCaptureFixture
) -> None:
    first, _ = server_indexes(cluster, store, session)
    cluster.kill(first)
    for n in range(5):
        store.load(session)
        store.save(session, {"secret": MARKER, "n": n})
    (down,) = lines(logs, "marked down")
    address = cluster.servers[first].address
    assert (down.name, down.levelno) == ("memsess.cluster", logging.WARNING)
    assert down.getMessage().startswith(f"memcached {address} marked down (")
    assert "Connection refused" in down.getMessage()
    assert "retried in 0.3 s" in down.getMessage()


def test_a_server_back_up_is_logged_once(
    cluster: LocalCluster, store: SessionStore, session: str, logs: pytest.LogCaptureFixture
) -> None:
    first, _ = server_indexes(cluster, store, session)
    cluster.kill(first)
    store.load(session)
    cluster.start_server(first)
    time.sleep(TEST_RETRY_INTERVAL * 1.5)
    for _ in range(5):
        store.load(session)
    (back,) = lines(logs, "back up")
    assert (back.name, back.levelno) == ("memsess.cluster", logging.INFO)
    assert back.getMessage() == f"memcached {cluster.servers[first].address} is back up"


def test_a_hung_server_is_logged_as_slow_once(
    cluster: LocalCluster, store: SessionStore, session: str, logs: pytest.LogCaptureFixture
) -> None:
    _, second = server_indexes(cluster, store, session)
    cluster.hang(second)
    try:
        store.load(session)
        store.load(session)  # still suspect: no second line
    finally:
        cluster.resume(second)
    (slow,) = lines(logs, "slow")
    assert slow.name == "memsess.cluster"
    assert slow.getMessage().startswith(f"memcached {cluster.servers[second].address} is slow: ")
    assert "no reply within the straggler window" in slow.getMessage()


def test_a_write_that_missed_a_copy_is_logged_once_with_the_failed_server(
    cluster: LocalCluster, store: SessionStore, session: str, logs: pytest.LogCaptureFixture
) -> None:
    first, _ = server_indexes(cluster, store, session)
    cluster.kill(first)
    store.save(session, {"secret": MARKER, "n": 2})  # asks both: one refuses
    (partial,) = lines(logs, "reached")
    address = cluster.servers[first].address
    assert (partial.name, partial.levelno) == ("memsess.store", logging.INFO)
    assert partial.getMessage().startswith("save reached 1 of 2 copies: ")
    assert f"memcached {address}: connect failed: Connection refused" in partial.getMessage()
    assert len(lines(logs, "marked down")) == 1  # the other event of the same failure


def test_writes_while_a_server_is_known_down_log_nothing_more(
    cluster: LocalCluster, store: SessionStore, session: str, logs: pytest.LogCaptureFixture
) -> None:
    first, _ = server_indexes(cluster, store, session)
    cluster.kill(first)
    store.load(session)  # marks it down
    store.save(session, {"secret": MARKER, "n": 2})
    store.delete(session)
    # A server already known down is skipped, not asked: it was logged once when it
    # went down, so the writes made meanwhile add no lines, only counts.
    assert lines(logs, "reached") == []
    assert store.stats()["partial_writes"] == 2


def test_a_repair_is_logged_once_per_read(
    cluster: LocalCluster, store: SessionStore, session: str, logs: pytest.LogCaptureFixture
) -> None:
    first, _ = server_indexes(cluster, store, session)
    old = encode_record(1_000_000, DATA, MSGPACK.id, MSGPACK.dumps({"secret": MARKER}))
    cluster.set_raw(first, key_of(store, session), old, flags=FLAGS)
    store.load(session)
    store.load(session)  # nothing left to repair: no second line
    (repair,) = lines(logs, "repairing")
    digest = key_of(store, session)[-40:-32].decode()
    assert repair.name == "memsess.store"
    # Names the session by 8 digest characters, the server and why.
    address = cluster.servers[first].address
    assert repair.getMessage() == f"repairing {digest}…: stale on memcached {address}"


def test_a_corrupt_record_is_logged_once_with_the_server_and_reason(
    cluster: LocalCluster, store: SessionStore, session: str, logs: pytest.LogCaptureFixture
) -> None:
    first, _ = server_indexes(cluster, store, session)
    key = key_of(store, session)
    intact = cluster.get_raw(first, key)
    assert intact is not None
    assert MARKER.encode() in intact
    cluster.set_raw(first, key, intact[:-1] + bytes([intact[-1] ^ 1]), flags=FLAGS)
    assert store.load(session) == {"secret": MARKER}
    store.load(session)
    (corrupt,) = lines(logs, "corrupt record")
    address = cluster.servers[first].address
    assert (corrupt.name, corrupt.levelno) == ("memsess.store", logging.WARNING)
    assert f"on memcached {address}, read as no session: record checksum mismatch" in (
        corrupt.getMessage()
    )
    (repair,) = lines(logs, "repairing")  # the rewrite is its own event
    assert repair.getMessage().endswith(f": corrupt on memcached {address}")


def test_a_healthy_cluster_logs_nothing(
    store: SessionStore, session: str, logs: pytest.LogCaptureFixture
) -> None:
    for n in range(20):
        assert store.load(session) is not None
        store.save(session, {"secret": MARKER, "n": n})
        store.touch(session)
    store.delete(session)
    assert store.load(session) is None
    assert [r for r in logs.records if r.name.startswith("memsess")] == []


NO_LOGGING_APP = """
import logging, sys
import memsess

warnings = []
# A filter sees every record the logger handles, and is no handler: the last-resort
# handler still applies when nothing else does.
logging.getLogger("memsess.cluster").addFilter(lambda record: warnings.append(record) or True)
with memsess.SessionStore.from_dsn(sys.argv[1], redundancy=2, timeout=0.5) as store:
    sid = store.new_id()
    store.save(sid, {"n": 1})  # one copy refused: its server is marked down, a warning
    assert store.load(sid) == {"n": 1}
print(len([r for r in warnings if r.levelno >= logging.WARNING]))
"""


def test_an_app_that_configured_no_logging_gets_nothing_on_stderr(cluster: LocalCluster) -> None:
    # Without a handler anywhere, logging's last resort prints WARNING and above to
    # stderr: where a library's messages go is the application's call (logging HOWTO,
    # "Configuring Logging for a Library"), so memsess's logger has a NullHandler.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"tcp://127.0.0.1:{closed.getsockname()[1]}"
    dsn = f"tcp://{cluster.servers[0].address}, {refused}"
    app = subprocess.run(
        [sys.executable, "-c", NO_LOGGING_APP, dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert app.returncode == 0, app.stderr
    assert int(app.stdout) >= 1  # the warning was logged...
    assert app.stderr == ""  # ...and nothing reached stderr
