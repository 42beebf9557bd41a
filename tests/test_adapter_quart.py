"""The Quart session interface on a real local cluster, through Quart's test client and
a real server (hypercorn): login/logout, hostile cookies, session fixation, writes only
when changed, a logout during a slow request, faults, outages, websockets."""

from __future__ import annotations

import asyncio
import runpy
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from adapter_support import (
    BAD_COOKIES,
    all_keys,
    assert_only_key,
    cookies_named,
    holders,
    key_of,
    make_store,
    settle,
    ttl_left,
    version_of,
)
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from quart import Quart, request, session, websocket
from quart.typing import TestClientProtocol as QuartClient  # what app.test_client() gives
from quart.wrappers import Response

import memsess
from memsess import AsyncSessionStore, SessionStore
from memsess.adapters.quart import MemsessSession, MemsessSessionInterface, init_app
from memsess.testing import LocalCluster

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAME = "session"  # Quart's default SESSION_COOKIE_NAME
T = TypeVar("T")


@dataclass
class Gate:
    """Holds /slow-count after it changed the session, until the test lets it go."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


def make_app(store: AsyncSessionStore, gate: Gate | None = None, **config: Any) -> Quart:
    app = Quart(__name__)
    app.config.update(TESTING=True, **config)
    init_app(app, store)
    app.after_serving(store.aclose)  # served by hypercorn: its loop's connections

    @app.get("/login")
    async def login() -> str:
        session["user"] = request.args["user"]
        session.permanent = request.args.get("remember") == "1"
        assert isinstance(session, MemsessSession)
        session.regenerate()
        return "ok"

    @app.get("/whoami")
    async def whoami() -> str:
        return str(session.get("user", ""))

    @app.get("/logout")
    async def logout() -> str:
        session.clear()
        return "bye"

    @app.get("/count")
    async def count() -> str:
        session["count"] = session.get("count", 0) + 1
        return str(session["count"])

    @app.get("/slow-count")
    async def slow_count() -> str:
        assert gate is not None
        session["count"] = session.get("count", 0) + 1
        gate.entered.set()
        assert await asyncio.to_thread(gate.release.wait, 5)
        return str(session["count"])

    @app.get("/static")
    async def static_page() -> str:
        return "static"

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.send(str(session.get("user", "")))
        session["user"] = "mallory"  # not written back: no response to carry a cookie

    return app


def run(store: AsyncSessionStore, scenario: Callable[[], Awaitable[T]]) -> T:
    """Run ``scenario`` on a loop of its own, closing the store's connections on it."""

    async def main() -> T:
        try:
            return await scenario()
        finally:
            await store.aclose()

    return asyncio.run(main())


def set_cookies(response: Response) -> list[str]:
    return response.headers.getlist("Set-Cookie")


def session_cookie(response: Response) -> tuple[str, dict[str, str | bool]]:
    (found,) = cookies_named(set_cookies(response), NAME)
    return found


async def text(client: QuartClient, path: str, cookie: str | None = None) -> str:
    return await (await raw_get(client, path, cookie)).get_data(as_text=True)


async def raw_get(client: QuartClient, path: str, cookie: str | None = None) -> Response:
    """A request carrying exactly ``session=<cookie>`` (the client has no cookie jar)."""
    headers = {"Cookie": f"theme=dark; {NAME}={cookie}"} if cookie is not None else {}
    return await client.get(path, headers=headers)


async def login(client: QuartClient, user: str = "alice", cookie: str | None = None) -> str:
    return session_cookie(await raw_get(client, f"/login?user={user}", cookie))[0]


@contextmanager
def serve(app: Quart) -> Iterator[str]:
    """Serve ``app`` with hypercorn on a free loopback port, in a thread. The socket is
    bound and listening first, so requests wait in its backlog, never fail to connect."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns (and closes) it
    config.accesslog = config.errorlog = None
    started = threading.Event()
    stop: list[Callable[[], object]] = []

    async def main() -> None:
        loop, shutdown = asyncio.get_running_loop(), asyncio.Event()
        stop.append(lambda: loop.call_soon_threadsafe(shutdown.set))
        started.set()
        await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop[0]()
        thread.join(timeout=10)
    assert not thread.is_alive(), "hypercorn did not stop"


@pytest.fixture
def store(cluster: LocalCluster) -> Iterator[SessionStore]:
    """The blocking store the tests inspect the cluster with."""
    with make_store(cluster) as store:
        yield store


@pytest.fixture
def astore(store: SessionStore) -> AsyncSessionStore:
    """The app's store: the same cluster, servers' health and counters as ``store``."""
    return AsyncSessionStore.from_store(store)


@pytest.fixture
def app(astore: AsyncSessionStore) -> Quart:
    return make_app(astore)


@pytest.fixture
def client(app: Quart) -> QuartClient:
    return app.test_client(use_cookies=False)


def test_login_request_logout(
    client: QuartClient, astore: AsyncSessionStore, store: SessionStore, cluster: LocalCluster
) -> None:
    async def scenario() -> str:
        sid = await login(client)
        assert store.load(sid) == {"user": "alice", "_permanent": False}
        assert await text(client, "/whoami", sid) == "alice"
        assert [await text(client, "/count", sid) for _ in range(2)] == ["1", "2"]
        value, attributes = session_cookie(await raw_get(client, "/logout", sid))
        assert (value, attributes["expires"]) == ("", "Thu, 01 Jan 1970 00:00:00 GMT")
        assert await text(client, "/whoami", sid) == ""
        return sid

    sid = run(astore, scenario)
    assert store.load(sid) is None
    assert len(holders(cluster, store, sid)) == 2  # a tombstone on every copy, not a miss


def test_login_request_logout_over_a_real_server(
    app: Quart, store: SessionStore, cluster: LocalCluster
) -> None:
    with serve(app) as url, httpx.Client(base_url=url) as browser:
        assert browser.get("/login", params={"user": "bob", "remember": "1"}).text == "ok"
        sid = browser.cookies[NAME]
        assert browser.get("/whoami").text == "bob"
        response = browser.get("/count")
        assert response.text == "1"
        assert response.headers["vary"] == "Cookie"
        assert store.load(sid) == {"user": "bob", "_permanent": True, "count": 1}
        cluster.kill(holders(cluster, store, sid)[0])
        assert browser.get("/count").text == "2"
        assert browser.get("/logout").text == "bye"
        assert NAME not in browser.cookies
        assert browser.get("/whoami").text == ""
    assert store.load(sid) is None


def test_request_without_a_cookie_costs_no_round_trip(
    client: QuartClient, astore: AsyncSessionStore, store: SessionStore
) -> None:
    async def scenario() -> list[Response]:
        return [await raw_get(client, path) for path in ("/whoami", "/count")]

    whoami, count = run(astore, scenario)
    assert set_cookies(whoami) == []
    assert memsess.records.is_valid_id(session_cookie(count)[0])
    stats = store.stats()
    assert (stats["loads"], stats["saves"]) == (0, 1)  # nothing to read: only the new session


def test_a_view_that_never_uses_the_session_changes_nothing(
    client: QuartClient, astore: AsyncSessionStore, store: SessionStore
) -> None:
    async def scenario() -> tuple[dict[str, int], Response]:
        sid = session_cookie(await raw_get(client, "/login?user=alice&remember=1"))[0]
        return store.stats(), await raw_get(client, "/static", sid)

    before, response = run(astore, scenario)
    after = store.stats()
    assert set_cookies(response) == []  # permanent, but not used: not refreshed
    assert "Cookie" not in response.headers.get("Vary", "")
    assert after["loads"] == before["loads"] + 1  # quart.session is sync: read up front
    assert (after["touches"], after["saves"]) == (before["touches"], before["saves"])


def test_reading_does_not_rewrite_and_refresh_touches_a_permanent_session(
    astore: AsyncSessionStore, store: SessionStore, cluster: LocalCluster
) -> None:
    app = make_app(astore, PERMANENT_SESSION_LIFETIME=timedelta(seconds=1000))
    client = app.test_client(use_cookies=False)

    async def scenario() -> tuple[str, str, list[Response]]:
        plain = await login(client)
        permanent = session_cookie(await raw_get(client, "/login?user=bob&remember=1"))[0]
        versions = version_of(store, plain), version_of(store, permanent)
        app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(seconds=5000)
        responses = [await raw_get(client, "/whoami", sid) for sid in (plain, permanent)]
        assert (version_of(store, plain), version_of(store, permanent)) == versions
        return plain, permanent, responses

    plain, permanent, (read, touched) = run(astore, scenario)
    assert set_cookies(read) == []  # not permanent: nothing to refresh
    assert "Cookie" in read.headers["Vary"]
    assert session_cookie(touched)[0] == permanent  # the cookie's Expires is refreshed
    for index in holders(cluster, store, permanent):
        assert 4990 <= ttl_left(cluster, index, key_of(store, permanent)) <= 5000
    for index in holders(cluster, store, plain):
        assert ttl_left(cluster, index, key_of(store, plain)) <= 1000


def test_login_regenerates_the_id_and_kills_the_old_one(
    client: QuartClient, astore: AsyncSessionStore, store: SessionStore
) -> None:
    async def scenario() -> tuple[str, str, str]:
        visitor = session_cookie(await raw_get(client, "/count"))[0]
        sid = await login(client, cookie=visitor)
        return visitor, sid, await text(client, "/whoami", visitor)

    visitor, sid, whoami = run(astore, scenario)
    assert sid != visitor
    assert whoami == ""
    assert store.load(visitor) is None
    assert store.load(sid) == {"count": 1, "user": "alice", "_permanent": False}


# Quart refuses a CRLF in a header itself, before the session is opened (below).
HEADER_SAFE_BAD_COOKIES = {name: value for name, value in BAD_COOKIES.items() if name != "crlf"}


@pytest.mark.parametrize(
    "value", HEADER_SAFE_BAD_COOKIES.values(), ids=HEADER_SAFE_BAD_COOKIES.keys()
)
def test_bad_cookie_gets_a_fresh_session_and_never_reaches_memcached(
    app: Quart, astore: AsyncSessionStore, store: SessionStore, cluster: LocalCluster, value: str
) -> None:
    # Through httpx's ASGI transport, which sends the header as given.
    async def scenario() -> tuple[str, str]:
        transport = httpx.ASGITransport(app)  # type: ignore[arg-type]  # Quart: narrower ASGI types
        headers = {"Cookie": f"{NAME}={value}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            whoami = await client.get("/whoami", headers=headers)
            assert all_keys(cluster) == set()  # a fresh cluster: reading stored nothing
            count = await client.get("/count", headers=headers)
        (found,) = cookies_named(count.headers.get_list("set-cookie"), NAME)
        return whoami.text, found[0]

    whoami, sid = run(astore, scenario)
    assert whoami == ""
    # Not even a lookup; but Werkzeug unquotes '"AAA...A"' to a well-formed (unknown) id.
    assert store.stats()["loads"] == (2 if value == BAD_COOKIES["quoted"] else 0)
    assert sid != value
    assert sid != value.strip('"')
    assert_only_key(cluster, store, sid)


def test_crlf_cookie_is_refused_before_the_session_is_opened(
    app: Quart, astore: AsyncSessionStore, store: SessionStore, cluster: LocalCluster
) -> None:
    async def scenario() -> None:
        transport = httpx.ASGITransport(app)  # type: ignore[arg-type]  # Quart: narrower ASGI types
        headers = {"Cookie": f"{NAME}={BAD_COOKIES['crlf']}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with pytest.raises(ValueError, match="newline"):
                await client.get("/count", headers=headers)

    run(astore, scenario)
    assert store.stats()["loads"] == store.stats()["saves"] == 0
    assert all_keys(cluster) == set()


def test_unknown_well_formed_id_is_not_adopted(
    client: QuartClient, astore: AsyncSessionStore, store: SessionStore
) -> None:
    forged = store.new_id()
    sid = run(astore, lambda: raw_get(client, "/count", forged))
    assert session_cookie(sid)[0] != forged
    assert store.load(forged) is None


def test_default_cookie_attributes_are_safe(client: QuartClient, astore: AsyncSessionStore) -> None:
    value, attributes = session_cookie(run(astore, lambda: raw_get(client, "/count")))
    assert len(value) == 43
    assert attributes["httponly"] is True
    assert attributes["samesite"] == "Lax"  # Quart's default None is sent as Lax
    assert attributes["path"] == "/"
    assert "secure" not in attributes
    assert "expires" not in attributes  # not permanent: ends with the browser


def test_configured_cookie_attributes(astore: AsyncSessionStore) -> None:
    app = make_app(
        astore, SESSION_COOKIE_NAME="sid", SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_PATH="/app",
        SESSION_COOKIE_DOMAIN="example.com", SESSION_COOKIE_PARTITIONED=True,
    )  # fmt: skip
    response = run(astore, lambda: raw_get(app.test_client(), "/login?user=a&remember=1"))
    ((_, attributes),) = cookies_named(set_cookies(response), "sid")
    assert attributes["secure"] is True
    assert attributes["samesite"] == "Strict"
    assert attributes["path"] == "/app"
    assert attributes["domain"] == "example.com"
    assert attributes["partitioned"] is True
    assert "expires" in attributes  # permanent


def test_logout_elsewhere_during_a_slow_request_wins(
    astore: AsyncSessionStore, store: SessionStore
) -> None:
    gate = Gate()
    client = make_app(astore, gate).test_client(use_cookies=False)

    async def scenario() -> tuple[str, Response]:
        sid = await login(client)
        slow = asyncio.create_task(raw_get(client, "/slow-count", sid))
        assert await asyncio.to_thread(gate.entered.wait, 10)  # loaded and changed, not saved
        await raw_get(client, "/logout", sid)
        gate.release.set()
        return sid, await slow

    sid, response = run(astore, scenario)
    # Its save met the logout: dropped, and the cookie left alone.
    assert "Set-Cookie" not in response.headers
    assert store.load(sid) is None


def test_every_copy_unreachable_is_an_error_the_view_can_answer(
    app: Quart, astore: AsyncSessionStore, store: SessionStore, cluster: LocalCluster
) -> None:
    client = app.test_client(use_cookies=False)

    async def outage() -> tuple[str, list[Response], str]:
        sid = await login(client)
        for server in cluster.servers:
            cluster.hang(server.index)
        failed = await raw_get(client, "/count", sid)
        static = await raw_get(client, "/static", sid)

        @app.errorhandler(memsess.ClusterError)
        async def sessions_unavailable(error: memsess.ClusterError) -> tuple[str, int]:
            return "sessions unavailable", 503

        answered = await raw_get(client, "/whoami", sid)
        for server in cluster.servers:
            cluster.resume(server.index)
        await asyncio.to_thread(settle)
        return sid, [failed, static, answered], await text(client, "/whoami", sid)

    sid, (failed, static, answered), whoami = run(astore, outage)
    assert failed.status_code == 500  # raised in the view, where error handlers see it
    assert set_cookies(failed) == []
    assert static.status_code == 200  # a view that never uses the session is served
    assert answered.status_code == 503
    assert whoami == "alice"  # nothing was saved over the session meanwhile
    assert store.load(sid) == {"user": "alice", "_permanent": False}


def test_websocket_reads_the_session_and_never_writes_it(
    client: QuartClient, astore: AsyncSessionStore, store: SessionStore
) -> None:
    async def scenario() -> tuple[str, list[Any]]:
        sid = await login(client)
        received = []
        for cookie in (sid, None):
            headers = {"Cookie": f"{NAME}={cookie}"} if cookie else {}
            async with client.websocket("/ws", headers=headers) as connection:
                received.append(await connection.receive())
        return sid, received

    sid, received = run(astore, scenario)
    assert received == ["alice", ""]
    assert store.load(sid) == {"user": "alice", "_permanent": False}


def test_init_app_builds_the_store_from_config_and_closes_it(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[AsyncSessionStore] = []
    real_aclose = AsyncSessionStore.aclose

    async def aclose(self: AsyncSessionStore) -> None:
        closed.append(self)
        await real_aclose(self)

    monkeypatch.setattr(AsyncSessionStore, "aclose", aclose)
    app = Quart(__name__)
    with pytest.raises(RuntimeError, match="MEMSESS_SAVE_PATH"):
        init_app(app)
    app.config.update(
        MEMSESS_SAVE_PATH=cluster.dsn(),
        MEMSESS_REDUNDANCY=3,
        MEMSESS_KEY_PREFIX="quart:",
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=90),
    )
    interface = init_app(app)
    built = app.extensions["memsess"]
    assert isinstance(app.session_interface, MemsessSessionInterface)
    assert interface.store is built
    assert (built.redundancy, built.key_prefix, built.ttl) == (3, "quart:", 90)

    @app.get("/count")
    async def count() -> str:
        session["count"] = session.get("count", 0) + 1
        return str(session["count"])

    with serve(app) as url, httpx.Client(base_url=url) as browser:
        assert [browser.get("/count").text for _ in range(2)] == ["1", "2"]
        sid = browser.cookies[NAME]
    assert closed == [built]  # after_serving
    with SessionStore.from_dsn(cluster.dsn(), redundancy=3, key_prefix="quart:") as reader:
        assert reader.load(sid) == {"count": 2}


def test_example_app_runs(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSESS_SAVE_PATH", cluster.dsn())
    app = runpy.run_path(str(EXAMPLES / "quart_app.py"))["app"]

    async def scenario() -> list[str]:
        client = app.test_client()
        pages = []
        for path in ("/", "/login/alice", "/", "/logout", "/"):
            pages.append(await (await client.get(path)).get_data(as_text=True))
        async with client.websocket("/ws") as connection:
            pages.append(await connection.receive())
        return pages

    pages = run(app.extensions["memsess"], scenario)
    assert pages == [
        "anonymous, visit 1\n",
        "logged in as alice\n",
        "alice, visit 2\n",
        "logged out\n",
        "anonymous, visit 1\n",
        "hello anonymous",
    ]


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("MEMSESS_REDUNDANCE", "did you mean 'MEMSESS_REDUNDANCY'?"),
        ("MEMSESS_TIMEOUTS", "did you mean 'MEMSESS_TIMEOUT'?"),
        ("MEMSESS_TTL", "PERMANENT_SESSION_LIFETIME"),
    ],
)
def test_a_misspelt_or_guessed_key_is_refused_naming_the_known_ones(
    cluster: LocalCluster, key: str, hint: str
) -> None:
    app = Quart(__name__)
    app.config.update({"MEMSESS_SAVE_PATH": cluster.dsn(), key: 2})
    with pytest.raises(ValueError, match=key) as refused:
        init_app(app)
    assert hint in str(refused.value)
    assert "MEMSESS_SAVE_PATH, MEMSESS_REDUNDANCY" in str(refused.value)
    assert "memsess" not in app.extensions


def test_a_list_of_servers_with_a_timeout_builds_the_store(cluster: LocalCluster) -> None:
    first, *others = cluster.dsn().split(", ")
    app = Quart(__name__)
    app.config.update(
        MEMSESS_SAVE_PATH=[f"{first}?timeout=0.75&retry_interval=4", *others],
        MEMSESS_TIMEOUT=0.25,
        MEMSESS_RETRY_INTERVAL=3,
        MEMSESS_REDUNDANCY=3,
    )
    init_app(app)
    store = app.extensions["memsess"]
    servers = store._cluster.servers
    assert [(server.timeout, server.retry_interval) for server in servers] == [
        (0.75, 4),
        (0.25, 3),
        (0.25, 3),
    ]

    @app.get("/login")
    async def login() -> str:
        session["user"] = "alice"
        return "ok"

    async def scenario() -> str:
        return session_cookie(await app.test_client().get("/login"))[0]

    sid = run(store, scenario)
    with SessionStore.from_dsn(cluster.dsn(), redundancy=3) as reader:
        assert reader.load(sid) == {"user": "alice"}
        assert holders(cluster, reader, sid) == [0, 1, 2]


@pytest.mark.parametrize(
    ("save_path", "error"),
    [
        (11211, TypeError),
        ("tcp://127.0.0.1:0", memsess.DSNError),
        (["tcp://127.0.0.1:11211", "tcp://127.0.0.1:0"], memsess.DSNError),
    ],
)
def test_a_bad_save_path_names_the_setting(save_path: object, error: type[Exception]) -> None:
    app = Quart(__name__)
    app.config["MEMSESS_SAVE_PATH"] = save_path
    with pytest.raises(error, match=r"^MEMSESS_SAVE_PATH: "):
        init_app(app)
