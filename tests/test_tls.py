"""TLS (``memcached -Z``) and memcached's ASCII authentication (``-Y``), against real
servers started with throw-away certificates: sessions over TLS in both drivers, resumed
TLS sessions, what each misconfiguration says and costs (never a retry storm, never a
password in a message), and a server that hangs in the middle of a handshake."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest
from blocking_async import DRIVERS, store_for
from conftest import TEST_RETRY_INTERVAL, TEST_TIMEOUT

from memsess import AsyncSessionStore, ClusterError, SessionStore
from memsess.dsn import parse_dsn
from memsess.protocol import version
from memsess.testing import LocalCluster
from memsess.transport import FirstReply
from memsess.transport.exchange import AUTH_KEY
from memsess.transport.fanout import Fanout
from memsess.transport.pool import ServerPool

pytest.importorskip("cryptography")  # the test extra has it; a bare sdist may not

USER = "sessions"
PASSWORD = "pw-9f8e7d6c5b4a"  # distinctive: searched for in every message and log


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def secure() -> Iterator[LocalCluster]:
    """Three servers that speak TLS only and want credentials."""
    with LocalCluster(3, tls=True, auth=(USER, PASSWORD)) as local:
        yield local


@pytest.fixture(scope="module")
def tls_only() -> Iterator[LocalCluster]:
    with LocalCluster(2, tls=True) as local:
        yield local


def new_session(store: SessionStore, data: dict[str, object]) -> str:
    sid = store.new_id()
    store.save(sid, data)
    return sid


def without(dsn: str, *names: str) -> str:
    """``dsn`` with the parameters ``names`` taken out of every entry."""
    entries = []
    for entry in dsn.split(", "):
        location, _, query = entry.partition("?")
        kept = [item for item in query.split("&") if item and item.split("=")[0] not in names]
        entries.append(f"{location}?{'&'.join(kept)}" if kept else location)
    return ", ".join(entries)


def failures(store: SessionStore) -> str:
    return " | ".join(status.reason for status in store.health())


def connections(cluster: LocalCluster) -> int:
    return sum(int(cluster.stats(i)["total_connections"]) for i in range(cluster.n))


def test_sessions_round_trip_over_tls_with_authentication(
    secure: LocalCluster, driver: str
) -> None:
    store = store_for(driver, secure.dsn(timeout=TEST_TIMEOUT))
    try:
        sid = new_session(store, {"user": "alice", "cart": [1, 2, 3]})
        assert store.load(sid) == {"user": "alice", "cart": [1, 2, 3]}
        assert store.touch(sid)
        new = store.regenerate(sid)
        assert store.load(new) == {"user": "alice", "cart": [1, 2, 3]}
        assert store.load(sid) is None
        store.delete(new)
        assert store.load(new) is None
        assert all(status.state == "up" for status in store.health()), failures(store)
    finally:
        store.close()


def test_new_connections_resume_the_tls_session(tls_only: LocalCluster) -> None:
    (spec, _) = parse_dsn(tls_only.dsn())
    pool = ServerPool(spec, max_idle=0)  # every exchange on a new connection
    resumed = []
    for _ in range(5):
        run = Fanout([pool], [version()], FirstReply(0.0)).run()
        assert not isinstance(run.results[0], Exception), run.results[0]
        tls = run.exchanges[0].tls
        assert tls is not None
        resumed.append(tls.resumed)
    assert resumed == [False, True, True, True, True]


def test_a_plain_client_at_a_tls_port_is_told_to_use_tls(
    tls_only: LocalCluster, driver: str
) -> None:
    store = store_for(driver, tls_only.dsn("tcp", timeout=TEST_TIMEOUT))
    try:
        with pytest.raises(ClusterError, match="use tls://"):
            new_session(store, {"a": 1})
    finally:
        store.close()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, "certificate verify failed"),  # no tls_ca: the system's CAs do not know ours
        ({"tls_server_name": "sessions.example.com"}, "not valid for 'sessions.example.com'"),
    ],
    ids=["untrusted-ca", "wrong-name"],
)
def test_an_untrusted_server_fails_its_handshake_and_is_marked_down_at_once(
    tls_only: LocalCluster, driver: str, params: dict[str, str], expected: str
) -> None:
    dsn = tls_only.dsn(timeout=TEST_TIMEOUT, retry_interval=60, **params)
    if not params:
        dsn = without(dsn, "tls_ca")
    store = store_for(driver, dsn, redundancy=1)
    try:
        with pytest.raises(ClusterError, match=expected):
            new_session(store, {"a": 1})
        assert any(status.state == "down" for status in store.health()), failures(store)
        assert "TLS handshake failed" in failures(store)
    finally:
        store.close()


def test_verification_can_be_turned_off_and_a_context_given(
    tls_only: LocalCluster, driver: str
) -> None:
    unverified = without(tls_only.dsn(timeout=TEST_TIMEOUT, tls_verify=0), "tls_ca")
    store = store_for(driver, unverified)
    try:
        sid = new_session(store, {"a": 1})
        assert store.load(sid) == {"a": 1}
    finally:
        store.close()
    bare = without(tls_only.dsn(timeout=TEST_TIMEOUT), "tls_ca")
    store = store_for(driver, bare, ssl_context=tls_only.ssl_context())
    try:
        sid = new_session(store, {"b": 2})
        assert store.load(sid) == {"b": 2}
    finally:
        store.close()


def test_an_ssl_context_without_a_tls_server_is_refused(tls_only: LocalCluster) -> None:
    with pytest.raises(ValueError, match="tls://"):
        SessionStore.from_dsn(tls_only.dsn("tcp"), ssl_context=tls_only.ssl_context())


def test_a_server_that_requires_client_certificates(driver: str) -> None:
    with LocalCluster(1, tls=True, client_certs=True) as cluster:
        with_cert = store_for(driver, cluster.dsn(timeout=TEST_TIMEOUT))
        try:
            sid = new_session(with_cert, {"a": 1})
            assert with_cert.load(sid) == {"a": 1}
        finally:
            with_cert.close()
        assert cluster.certs is not None
        no_cert = without(cluster.dsn(timeout=TEST_TIMEOUT), "tls_cert", "tls_key")
        store = store_for(driver, no_cert, redundancy=1)
        try:
            with pytest.raises(ClusterError):
                new_session(store, {"a": 1})
            assert store.health()[0].state == "down", failures(store)
        finally:
            store.close()


def test_a_wrong_password_is_one_clear_error_not_a_retry_storm(
    secure: LocalCluster, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="memsess")
    dsn = secure.dsn(timeout=TEST_TIMEOUT, retry_interval=60).replace(
        f":{PASSWORD}@", ":not-the-password@"
    )
    store = store_for(driver, dsn, redundancy=1)
    try:
        before = connections(secure)
        with pytest.raises(ClusterError) as raised:
            new_session(store, {"a": 1})
        message = str(raised.value)
        assert "refused the credentials of user 'sessions'" in message
        assert "not-the-password" not in message
        for _ in range(50):  # the server is down for its retry_interval: nothing is sent
            with pytest.raises(ClusterError):
                store.load(store.new_id())
        # At most one connection per server (its first attempt), not one per request;
        # connections() itself opens one per server.
        assert connections(secure) - before <= 2 * secure.n
        assert "not-the-password" not in caplog.text
        assert "not-the-password" not in failures(store)
    finally:
        store.close()


def test_a_server_that_wants_credentials_says_so(secure: LocalCluster, driver: str) -> None:
    dsn = secure.dsn(timeout=TEST_TIMEOUT).replace(f"{USER}:{PASSWORD}@", "")
    store = store_for(driver, dsn, redundancy=1)
    try:
        with pytest.raises(ClusterError, match="wants credentials"):
            new_session(store, {"a": 1})
    finally:
        store.close()


def test_credentials_sent_to_a_server_without_auth_leave_nothing_readable(driver: str) -> None:
    with LocalCluster(1) as cluster:
        dsn = cluster.dsn(timeout=TEST_TIMEOUT).replace("tcp://", f"tcp://{USER}:{PASSWORD}@")
        store = store_for(driver, dsn)
        try:
            sid = new_session(store, {"a": 1})
            assert store.load(sid) == {"a": 1}
        finally:
            store.close()
        assert cluster.get_raw(0, AUTH_KEY) is None
        assert all(PASSWORD.encode() not in key for key in cluster.keys(0))


def test_the_password_appears_in_no_repr_message_or_health(secure: LocalCluster) -> None:
    store = SessionStore.from_dsn(secure.dsn(timeout=TEST_TIMEOUT))
    try:
        new_session(store, {"a": 1})
        texts = [repr(store._cluster.servers), repr(store.health()), str(store.stats())]
        assert all(PASSWORD not in text for text in texts)
    finally:
        store.close()


def test_a_server_hung_mid_handshake_is_cut_off_like_a_hung_tcp_server(driver: str) -> None:
    """A fresh connection to a server stopped with SIGSTOP: the kernel completes the TCP
    connect, but no handshake answer ever comes. The save must not wait the server's
    whole timeout (5 s here): the copy is cut off a straggler window after the
    ClientHello, as a command would be, and the other copy stores the session."""
    with LocalCluster(2, tls=True, auth=(USER, PASSWORD)) as cluster:
        store = store_for(driver, cluster.dsn(timeout=5, retry_interval=TEST_RETRY_INTERVAL))
        try:
            cluster.hang(0)
            started = time.monotonic()
            sid = new_session(store, {"a": 1})
            assert store.load(sid) == {"a": 1}
            elapsed = time.monotonic() - started
            assert elapsed < 4, f"waited {elapsed:.2f} s: the hung handshake was not cut off"
            assert store.stats()["straggler_drops"] >= 1
        finally:
            cluster.resume(0)
            store.close()


def test_the_async_store_on_uvloop_over_tls_with_many_tasks(secure: LocalCluster) -> None:
    """uvloop runs the same sans-I/O TLS (no loop-level SSL), with many connections
    handshaking at once on one loop."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        store = AsyncSessionStore.from_dsn(secure.dsn(timeout=2))
        try:
            sids = [store.new_id() for _ in range(50)]
            await asyncio.gather(*(store.save(sid, {"n": n}) for n, sid in enumerate(sids)))
            loaded = await asyncio.gather(*(store.load(sid) for sid in sids))
            assert loaded == [{"n": n} for n in range(50)]
            assert all(status.state == "up" for status in store.health())
        finally:
            await store.aclose()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_flask_and_django_take_credentials_and_a_context_out_of_the_save_path(
    secure: LocalCluster,
) -> None:
    from flask import Flask, session

    from memsess.adapters.flask import init_app

    bare = without(secure.dsn(timeout=TEST_TIMEOUT), "tls_ca").replace(f"{USER}:{PASSWORD}@", "")
    app = Flask(__name__)
    app.config.update(
        MEMSESS_SAVE_PATH=bare,
        MEMSESS_USERNAME=USER,
        MEMSESS_PASSWORD=PASSWORD,
        MEMSESS_SSL_CONTEXT=secure.ssl_context(),
    )
    init_app(app)

    @app.get("/")
    def view() -> str:
        session["seen"] = session.get("seen", 0) + 1
        return str(session["seen"])

    store = app.extensions["memsess"]
    try:
        client = app.test_client()
        assert client.get("/").text == "1"
        assert client.get("/").text == "2"
        assert all(status.state == "up" for status in store.health()), failures(store)
    finally:
        store.close()

    import django_settings

    django_settings.setup()
    from django.test import override_settings

    from memsess.adapters.django import SessionStore as DjangoSession
    from memsess.adapters.django import get_store

    setting = {
        "SAVE_PATH": bare,
        "USERNAME": USER,
        "PASSWORD": PASSWORD,
        "SSL_CONTEXT": secure.ssl_context(),
    }
    with override_settings(SESSION_MEMSESS=setting):
        django_session = DjangoSession()
        django_session["seen"] = 1
        django_session.save()
        assert DjangoSession(django_session.session_key)["seen"] == 1
        get_store().close()
