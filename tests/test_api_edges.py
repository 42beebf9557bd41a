"""The edges of the public API: what a misconfiguration, a stale snapshot or a DNS hiccup
at start-up does, and that each error says what is wrong and what to do (issue 13)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from blocking_async import DRIVERS, BlockingAsync, store_for
from conftest import TEST_TIMEOUT, StoreFactory, all_keys, server_indexes

from memsess import (
    NoServerAvailableError,
    ServerError,
    ServerSpec,
    SessionGoneError,
    SessionStore,
    SessionTooLargeError,
    WriteError,
    protocol,
)
from memsess.protocol import ClientProtocol, ErrorReply, Status
from memsess.records import DATA, FLAGS, VersionClock, encode_record, storage_key
from memsess.serializers import JSON
from memsess.store import MAX_KEY_PREFIX
from memsess.testing import LocalCluster
from memsess.transport import Result
from memsess.transport.udp_core import HEADER, UdpRead

# memcached refuses an -I under its slab_chunk_max (512 KiB by default) at start-up.
SMALL_ITEMS = ["-o", "slab_chunk_max=32768"]
# Nothing listens there, and making a store sends nothing: enough to check options.
NOWHERE = "tcp://127.0.0.1:1, tcp://127.0.0.1:2"


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """The blocking store and the asyncio one (awaited for it)."""
    return str(request.param)


def key_of(store: SessionStore, sid: str) -> bytes:
    """The memcached key of ``sid``'s copies (``key_prefix`` is kept as given)."""
    prefix = store.key_prefix  # the option as given: a str, or bytes
    return storage_key(prefix.encode("ascii") if isinstance(prefix, str) else prefix, sid)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.01)


# -- 1. a session over the servers' item size ----------------------------------------


def test_a_read_every_server_answered_with_an_error_names_each_server(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    store = make_store()
    sid = store.new_id()
    plan = store._plans.read(key_of(store, sid))  # driven by hand: no server says this
    step = next(plan)
    with pytest.raises(NoServerAvailableError) as raised:
        plan.send([ErrorReply("SERVER_ERROR", "out of memory")] * len(step.batch))
    for address in store.locate(sid):
        assert f"memcached {address}: SERVER_ERROR out of memory" in str(raised.value)


@pytest.fixture
def small_items() -> Iterator[LocalCluster]:
    """Two servers with memcached -I 64k, under the stores' default max_item_size."""
    with LocalCluster(2, item_size="64k", extra_args=SMALL_ITEMS) as local:
        yield local


def test_a_session_over_the_servers_item_size_names_each_server_and_the_fix(
    small_items: LocalCluster, driver: str
) -> None:
    with store_for(driver, small_items.dsn(timeout=TEST_TIMEOUT), redundancy=2) as store:
        with pytest.raises(WriteError) as raised:
            store.save(store.new_id(), {"blob": os.urandom(100_000)})
    message = str(raised.value)
    for server in small_items.servers:
        assert f"memcached {server.address}: SERVER_ERROR object too large for cache" in message
    assert "ErrorReply" not in message
    assert "max_item_size is 1048576 bytes: set max_item_size to the servers' -I" in message
    cause = raised.value.__cause__
    assert isinstance(cause, ServerError)
    assert cause.kind == "SERVER_ERROR"
    assert cause.server in {server.address for server in small_items.servers}


def test_with_max_item_size_at_the_servers_item_size_nothing_is_sent(
    small_items: LocalCluster, driver: str
) -> None:
    dsn = small_items.dsn(timeout=TEST_TIMEOUT)
    with store_for(driver, dsn, redundancy=2, max_item_size=64 * 1024) as store:
        with pytest.raises(SessionTooLargeError):
            store.save(store.new_id(), {"blob": os.urandom(100_000)})
    assert all_keys(small_items) == set()


# -- 2. key_prefix ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("my app:", "holds a space (byte 0x20)"),
        (b"my app:", "holds a space (byte 0x20)"),
        ("app\t", "holds a control character (byte 0x09)"),
        ("app\x7f:", "holds a control character (byte 0x7f)"),
        ("sessiön:", "is not ASCII"),
        (b"sessi\xc3\xb6n:", "is not ASCII"),
        ("p" * (MAX_KEY_PREFIX + 1), f"at most {MAX_KEY_PREFIX} leave room"),
    ],
)
def test_a_key_prefix_memcached_cannot_take_is_refused_when_the_store_is_made(
    prefix: str | bytes, why: str, driver: str
) -> None:
    with pytest.raises(ValueError, match="key_prefix") as raised:
        store_for(driver, NOWHERE, key_prefix=prefix)
    assert why in str(raised.value)


def test_a_key_prefix_of_another_type_is_a_type_error(driver: str) -> None:
    with pytest.raises(TypeError, match="key_prefix must be a str"):
        store_for(driver, NOWHERE, key_prefix=42)


def test_key_prefix_is_kept_as_given_and_starts_every_key(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    text = make_store(key_prefix="app1:")
    raw = make_store(key_prefix=b"app2:")
    assert (text.key_prefix, raw.key_prefix) == ("app1:", b"app2:")
    for store in (text, raw):
        sid = store.new_id()
        store.save(sid, {"n": 1})
        assert store.load(sid) == {"n": 1}
    prefixes = {key[:5] for _, key in all_keys(cluster)}
    assert prefixes == {b"app1:", b"app2:"}


def test_the_longest_key_prefix_leaves_room_for_every_key(make_store: StoreFactory) -> None:
    store = make_store(key_prefix="p" * MAX_KEY_PREFIX)
    sid = store.new_id()
    store.save(sid, {"n": 1})
    # The lock's key is the longest: the prefix, the digest and ".lock".
    if isinstance(store, BlockingAsync):  # the async store's lock: awaited
        async_lock = store.store.lock(sid)
        store.run(async_lock.acquire())
        store.run(async_lock.release())
    else:
        lock = store.lock(sid)
        lock.acquire()
        lock.release()
    assert store.touch(sid) is True
    store.delete(sid)
    assert store.load(sid) is None


# -- 3. SessionGoneError -----------------------------------------------------------------


def test_session_gone_error_reads_as_its_message(make_store: StoreFactory) -> None:
    store = make_store()
    sid = store.new_id()
    store.save(sid, {"n": 1})
    snapshot = store.fetch(sid)
    store.delete(sid)
    with pytest.raises(SessionGoneError) as raised:
        store.save(sid, {"n": 2}, snapshot=snapshot)
    assert str(raised.value) == "the session was logged out since it was loaded; not saved"
    assert isinstance(raised.value, KeyError)  # as before, for code that catches KeyError


# -- 4. touch and snapshots ----------------------------------------------------------------


def test_touch_of_a_logged_out_session_is_false(make_store: StoreFactory) -> None:
    store = make_store()
    sid = store.new_id()
    store.save(sid, {"n": 1})
    assert store.touch(sid) is True
    store.delete(sid)
    assert store.touch(sid) is False
    assert store.load(sid) is None
    assert store.touch(store.new_id()) is False


def test_touch_after_a_logout_one_copy_missed_is_false(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    store = make_store()
    sid = store.new_id()
    store.save(sid, {"n": 1})
    first, _ = server_indexes(cluster, store, sid)
    before_logout = cluster.get_raw(first, key_of(store, sid))
    assert before_logout is not None
    store.delete(sid)
    cluster.set_raw(first, key_of(store, sid), before_logout, flags=FLAGS)  # missed it
    assert store.touch(sid) is False
    assert store.load(sid) is None


def test_touch_of_a_sealed_store_reads_a_plain_copy_as_no_session(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    plain = make_store()
    sealed = make_store(secret_keys=["k" * 32])
    sid = plain.new_id()
    plain.save(sid, {"n": 1})
    assert sealed.touch(sid) is False  # what its load says: no session
    assert sealed.load(sid) is None


@pytest.mark.parametrize(
    ("answers", "touched"),
    [
        ([Status.TOUCHED], True),  # nothing tells a logout apart: as before gat
        ([Status.NOT_FOUND], False),
    ],
)
def test_a_server_without_gat_gets_a_plain_touch(
    make_store: StoreFactory, answers: list[Result], touched: bool
) -> None:
    # memcached before 1.5.3 answers ERROR to gat: the plan, driven by hand, falls back.
    store = make_store()
    key = key_of(store, store.new_id())
    plan = store._plans.touch(key, 60)
    gat = next(plan)
    assert [command.data[:4] for _, command in gat.batch] == [b"gat ", b"gat "]
    refused: list[Result] = [ErrorReply("ERROR", ""), ErrorReply("ERROR", "")]
    fallback = plan.send(refused[: len(gat.batch)])
    assert [command.data[:6] for _, command in fallback.batch] == [b"touch ", b"touch "]
    with pytest.raises(StopIteration) as done:
        plan.send(answers * len(fallback.batch))
    assert done.value.value is touched


def test_a_snapshot_of_another_session_is_refused(make_store: StoreFactory) -> None:
    store = make_store()
    first, second = store.new_id(), store.new_id()
    store.save(first, {"who": "first"})
    store.save(second, {"who": "second"})
    snapshot = store.fetch(first)
    with pytest.raises(ValueError, match="snapshot is of another session"):
        store.save(second, {"who": "first"}, snapshot=snapshot)
    with pytest.raises(ValueError, match="snapshot is of another session"):
        store.regenerate(second, snapshot=snapshot)
    assert store.load(second) == {"who": "second"}


# -- 5. persistent=0 -------------------------------------------------------------------------


def test_persistent_0_still_pools_connections(cluster: LocalCluster, driver: str) -> None:
    # PHP's flag is about PHP's process model; a Python process keeps its connections.
    dsn = cluster.dsn(timeout=TEST_TIMEOUT, persistent=False)
    with store_for(driver, dsn, redundancy=3) as store:
        sid = store.new_id()
        store.save(sid, {"n": 0})
        opened = [int(cluster.stats(i)["total_connections"]) for i in range(3)]
        for n in range(20):
            store.save(sid, {"n": n})
            assert store.load(sid) == {"n": n}
        now = [int(cluster.stats(i)["total_connections"]) for i in range(3)]
    # Only stats' own connections are new, not one per request.
    assert all(after - before <= 2 for before, after in zip(opened, now, strict=True))


# -- 6. every option checked when the store is made, and bounds that follow from them -------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"straggler_window": float("nan")}, ValueError, "straggler_window must be a finite"),
        ({"straggler_window": float("inf")}, ValueError, "straggler_window must be a finite"),
        ({"straggler_window": -0.1}, ValueError, "straggler_window must be a finite"),
        ({"straggler_window": True}, TypeError, "straggler_window must be a number of seconds"),
        ({"straggler_window": "0.1"}, TypeError, "straggler_window must be a number of seconds"),
        ({"redundancy": 1.5}, TypeError, "redundancy must be a whole number of copies, not float"),
        ({"redundancy": True}, TypeError, "redundancy must be a whole number of copies, not bool"),
        ({"redundancy": 0}, ValueError, "redundancy=0"),
        ({"redundancy": 3}, ValueError, "redundancy=3 needs at least that many servers"),
        ({"ttl": float("nan")}, ValueError, "ttl must be a positive, finite number"),
        ({"ttl": 10**10}, ValueError, "past 2038"),
        ({"max_item_size": 512}, ValueError, "max_item_size must be at least 1024 bytes"),
        ({"max_item_size": 2**31}, ValueError, "max_item_size must be at most 1073741824 bytes"),
        ({"max_item_size": 1e6}, TypeError, "max_item_size must be a whole number of bytes"),
        ({"ssl_context": "default"}, TypeError, "ssl_context must be an ssl.SSLContext"),
        ({"timeout": float("nan")}, ValueError, "timeout must be a finite number of seconds"),
        ({"timeout": 0}, ValueError, "timeout must be a finite number of seconds"),
        ({"retry_interval": -1}, ValueError, "retry_interval must be a finite number"),
        ({"serializer": "pickle"}, ValueError, "unknown serializer 'pickle'"),
        ({"compression": "lz4"}, ValueError, "compression must be one of"),
        ({"compress_threshold": -1}, ValueError, "compress_threshold must be at least 0"),
        ({"max_session_size": 0}, ValueError, "max_session_size must be at least 1"),
        ({"username": "u"}, ValueError, "username and password go together"),
    ],
)
def test_every_option_is_checked_when_the_store_is_made(
    driver: str, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        store_for(driver, NOWHERE, **options)


def test_a_save_path_string_given_as_servers_points_to_from_dsn() -> None:
    with pytest.raises(TypeError, match="from_dsn"):
        SessionStore("tcp://127.0.0.1:1")  # type: ignore[arg-type]


def test_a_reply_longer_than_max_item_size_is_refused_before_it_is_buffered(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    store = make_store(max_item_size=4096)
    sid = store.new_id()
    for index in server_indexes(cluster, store, sid):
        cluster.set_raw(index, key_of(store, sid), b"x" * 8000, flags=FLAGS)
    with pytest.raises(NoServerAvailableError, match="exceeds max_value_size 4096"):
        store.load(sid)


def test_a_udp_reply_longer_than_max_item_size_is_refused_too(driver: str) -> None:
    with LocalCluster(2, udp=True) as udp:
        with store_for(driver, udp.dsn(timeout=TEST_TIMEOUT), max_item_size=4096) as store:
            sid = store.new_id()
            store.save(sid, {"n": 1})
            # The first read asks each server for its marker too: two keys go over TCP.
            assert store.load(sid) == {"n": 1}
            for index in range(2):
                udp.set_raw(index, key_of(store, sid), b"x" * 8000, flags=FLAGS)
            # Over UDP now (the markers were just read), then retried over TCP.
            with pytest.raises(NoServerAvailableError, match="exceeds max_value_size 4096"):
                store.load(sid)
            assert store.stats()["corrupt_records"] == 0  # never read as a corrupt copy


def test_a_udp_reply_announced_longer_than_max_value_size_is_not_reassembled() -> None:
    # Its first datagram says how many follow: more than a value the parser would take
    # can fill, and the read goes over TCP at once instead of buffering them.
    long = UdpRead(protocol.get(b"k"), 7, ClientProtocol(max_value_size=4096), udp_wait=0.002)
    outcome = long.datagram_received(HEADER.pack(7, 0, 60, 0) + b"VALUE k 0 80000\r\n")
    assert isinstance(outcome, str)
    assert "a UDP reply of 60 datagrams" in outcome
    short = UdpRead(protocol.get(b"k"), 7, ClientProtocol(max_value_size=4096), udp_wait=0.002)
    assert short.datagram_received(HEADER.pack(7, 0, 3, 0) + b"VALUE k 0 3000\r\n") is None


def test_a_json_copy_with_a_number_out_of_range_is_corrupt(
    cluster: LocalCluster, make_store: StoreFactory
) -> None:
    store = make_store(serializer="json")
    sid = store.new_id()
    record = encode_record(VersionClock().tick(), DATA, JSON.id, b'{"n":1e999}', ttl=60)
    for index in server_indexes(cluster, store, sid):
        cluster.set_raw(index, key_of(store, sid), record, flags=FLAGS)
    assert store.load(sid) is None  # not {"n": inf}, which no save could write back
    assert store.stats()["corrupt_records"] == 1


# -- 7. a host that does not resolve at start-up --------------------------------------------


class FlakyDns:
    """socket.getaddrinfo for a name only this test knows: ``name`` is ``address``'s host
    once ``up`` is set, and does not resolve before. Records the threads that look it up."""

    def __init__(self, name: str, host: str) -> None:
        self.name = name
        self.host = host
        self.up = threading.Event()
        self.lookups: list[str] = []
        self._real = socket.getaddrinfo

    def __call__(self, host: str, *args: Any, **kwargs: Any) -> Any:
        if host == self.name:
            self.lookups.append(threading.current_thread().name)
            if not self.up.is_set():
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            host = self.host
        return self._real(host, *args, **kwargs)


def test_a_host_that_does_not_resolve_at_start_up_is_a_down_server_until_it_does(
    cluster: LocalCluster, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = cluster.servers
    dns = FlakyDns("memcached-c.test", c.host)
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    dsn = f"tcp://{a.address}, tcp://{b.address}, tcp://memcached-c.test:{c.port}"
    with store_for(driver, dsn, redundancy=2, timeout=TEST_TIMEOUT, retry_interval=0.1) as store:
        at_start = len(dns.lookups)
        (status,) = [s for s in store.health() if s.address == f"memcached-c.test:{c.port}"]
        assert status.state in ("down", "probing")
        assert "memcached-c.test" in status.reason
        assert "cannot resolve host" in status.reason
        sids = [store.new_id() for _ in range(30)]
        for sid in sids:  # the app serves requests meanwhile, from the other two
            store.save(sid, {"sid": sid})
            assert store.load(sid) == {"sid": sid}
        wait_for(lambda: len(dns.lookups) > at_start + 1)  # retried, every retry_interval
        assert set(dns.lookups[at_start:]) == {"memsess-maintenance"}  # never a request
        dns.up.set()
        wait_for(lambda: store.health()[2].state == "up")
        on_c = [sid for sid in sids if f"memcached-c.test:{c.port}" in store.locate(sid)]
        assert on_c
        for sid in on_c:
            store.save(sid, {"sid": sid, "again": True})
            assert cluster.get_raw(2, key_of(store, sid)) is not None


def test_no_host_resolving_still_makes_a_store_whose_requests_say_why(driver: str) -> None:
    store = store_for(driver, "tcp://no-such-host.invalid:11211", retry_interval=60)
    try:
        with pytest.raises(NoServerAvailableError, match="cannot resolve host"):
            store.load(store.new_id())
    finally:
        store.close()


# -- 10. store-wide timeout and retry_interval ------------------------------------------


@pytest.mark.parametrize(
    ("entry", "store_wide", "waited"), [({}, 0.25, "0.25 s"), ({"timeout": 0.4}, 0.25, "0.4 s")]
)
def test_the_store_wide_timeout_applies_where_the_entry_has_none(
    driver: str, entry: dict[str, float], store_wide: float, waited: str
) -> None:
    with LocalCluster(1) as one:
        store = store_for(driver, one.dsn(None, **entry), redundancy=1, timeout=store_wide)
        try:
            sid = store.new_id()
            store.save(sid, {"n": 1})
            one.hang(0)
            with pytest.raises(NoServerAvailableError, match=f"within its timeout of {waited}"):
                store.load(sid)
        finally:
            one.resume(0)
            store.close()


def test_the_store_wide_retry_interval_applies_where_the_entry_has_none(driver: str) -> None:
    with LocalCluster(2) as two:
        dsn = f"tcp://{two.servers[0].address}?retry_interval=2, tcp://{two.servers[1].address}"
        with store_for(driver, dsn, redundancy=2, retry_interval=60) as store:
            two.kill(0)
            two.kill(1)
            with pytest.raises(NoServerAvailableError):
                store.load(store.new_id())  # refused: both marked down at once
            retry_in = [status.retry_in for status in store.health()]
    assert retry_in[0] is not None
    assert retry_in[0] <= 2  # its own
    assert retry_in[1] is not None
    assert 30 < retry_in[1] <= 60  # the store's, not PHP's default of 15


# -- 11. a save_path given as a list -------------------------------------------------------


def test_from_dsn_takes_a_list_of_servers(cluster: LocalCluster, driver: str) -> None:
    servers = [f"tcp://{server.address}?timeout={TEST_TIMEOUT}" for server in cluster.servers]
    with store_for(driver, servers, redundancy=3) as store:
        assert [status.address for status in store.health()] == [
            server.address for server in cluster.servers
        ]
        sid = store.new_id()
        store.save(sid, {"n": 1})
        assert store.load(sid) == {"n": 1}


def test_from_dsn_refuses_anything_else_naming_it() -> None:
    with pytest.raises(TypeError, match="not dict"):
        SessionStore.from_dsn({"default": "tcp://127.0.0.1:1"})  # type: ignore[arg-type]


# -- 12. memsess.adapters without an import statement ---------------------------------------


ADAPTERS_APP = """
import sys
import memsess
assert "flask" not in sys.modules and "memsess.adapters" not in sys.modules
init_app = memsess.adapters.flask.init_app
assert callable(init_app)
assert memsess.adapters is sys.modules["memsess.adapters"]
assert memsess.adapters.wsgi.SessionMiddleware
try:
    memsess.adapters.no_such_adapter
except AttributeError:
    print("ok")
"""


def test_the_adapters_are_reached_from_import_memsess_alone() -> None:
    app = subprocess.run(
        [sys.executable, "-c", ADAPTERS_APP],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (app.returncode, app.stdout.strip()) == (0, "ok"), app.stderr


def test_importing_memsess_imports_no_framework() -> None:
    check = (
        "import sys, memsess\n"
        "print(sorted({'flask', 'django', 'memsess.adapters'} & set(sys.modules)))"
    )
    app = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=False
    )
    assert app.stdout.strip() == "[]", app.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ttl", 600),
        ("max_item_size", 64 * 1024),
        ("max_session_size", 1000),
        ("compress_threshold", 100),
    ],
)
def test_a_setting_read_off_the_store_is_the_one_it_uses_and_cannot_be_changed_later(
    name: str, value: int
) -> None:
    # Each request reads its settings from the store's operations: an attribute the
    # store let be set afterwards would be ignored there, silently.
    options: dict[str, Any] = {name: value}
    store = SessionStore([ServerSpec("tcp", "127.0.0.1", 1)], **options)
    assert getattr(store, name) == value
    with pytest.raises(AttributeError):
        setattr(store, name, value + 1)
    assert getattr(store, name) == value
    store.close()
