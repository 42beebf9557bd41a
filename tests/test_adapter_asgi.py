"""The ASGI middleware on a real local cluster, with a Starlette app (``request.session``,
loaded before the app runs) and a FastAPI app (lazy, a dependency loads it), both served
by uvicorn on a loopback port and driven by httpx: login/logout, counters, hostile
cookies, lazy loading, touches, a logout during a slow request, faults, outages, websockets."""

from __future__ import annotations

import asyncio
import runpy
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from adapter_support import (
    BAD_COOKIES,
    all_keys,
    assert_only_key,
    cookies_named,
    gets_served,
    holders,
    key_of,
    make_store,
    serve_asgi,
    settle,
    ttl_left,
    version_of,
)
from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    RejectData,
    TextMessage,
)
from wsproto.events import Request as WSRequest

import memsess
from memsess import AsyncSessionStore, SessionStore
from memsess.adapters import AsyncSession, SessionNotLoadedError
from memsess.adapters.asgi import SessionMiddleware, load_session
from memsess.testing import LocalCluster

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAME = "session"


@dataclass
class Gate:
    """Holds /slow-count after it changed the session, until the test lets it go."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


async def visit(path: str, session: MutableMapping[str, Any], query: Any, gate: Gate) -> str:
    """What every test app does with its session, whatever the framework."""
    if path == "/login":
        session["user"] = query["user"]
        assert isinstance(session, AsyncSession)
        session.regenerate()
    elif path == "/logout":
        session.clear()
    elif path == "/fail":
        session["user"] = "mallory"
    elif path in ("/count", "/slow-count"):
        session["count"] = session.get("count", 0) + 1
        if path == "/slow-count":
            gate.entered.set()
            assert await asyncio.to_thread(gate.release.wait, 5)
        return str(session["count"])
    return str(session.get("user", ""))


def starlette_app(store: AsyncSessionStore, gate: Gate, **options: Any) -> SessionMiddleware:
    """``request.session`` used as with Starlette's own SessionMiddleware; the
    middleware outside the whole app, as ``Middleware(...)`` or a wrapper puts it."""

    async def endpoint(request: Request) -> Response:
        path = request.url.path
        if path == "/static":
            return Response("static")
        if options.get("lazy"):
            await load_session(request)
        body = await visit(path, request.session, request.query_params, gate)
        return Response(body, status_code=500 if path == "/fail" else 200)

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.session.get("user", ""))
        websocket.session["user"] = "mallory"  # not written back: no response to carry it
        await websocket.close()

    paths = ["/login", "/logout", "/count", "/slow-count", "/whoami", "/static", "/fail"]
    routes = [Route(path, endpoint) for path in paths]
    app = Starlette(routes=[*routes, WebSocketRoute("/ws", ws_endpoint)], lifespan=closing(store))
    return SessionMiddleware(app, store, **options)


async def current_session(connection: HTTPConnection) -> AsyncSession:
    """The FastAPI dependency of docs/adapters.md: loads the session (lazy=True)."""
    return await load_session(connection)


SessionDep = Annotated[AsyncSession, Depends(current_session)]


def fastapi_app(store: AsyncSessionStore, gate: Gate, **options: Any) -> FastAPI:
    """Lazy: only the routes that depend on the session load it."""
    api = FastAPI(lifespan=closing(store))
    api.add_middleware(SessionMiddleware, store=store, lazy=True, **options)

    def route(path: str) -> None:
        @api.get(path, response_class=PlainTextResponse)
        async def endpoint(request: Request, session: SessionDep) -> str:
            return await visit(path, session, request.query_params, gate)

    for path in ("/login", "/logout", "/count", "/slow-count", "/whoami"):
        route(path)

    @api.get("/static", response_class=PlainTextResponse)
    async def static() -> str:
        return "static"

    @api.get("/unloaded", response_class=PlainTextResponse)
    async def unloaded(request: Request) -> str:
        try:
            return str(request.session.get("user", "anonymous"))
        except RuntimeError as exc:  # SessionNotLoadedError is one
            return f"{type(exc).__name__}: {exc}"

    @api.websocket("/ws")
    async def ws(websocket: WebSocket, session: SessionDep) -> None:
        await websocket.accept()
        await websocket.send_text(session.get("user", ""))
        await websocket.close()

    return api


def closing(store: AsyncSessionStore) -> Callable[[Any], Any]:
    """A lifespan closing ``store``'s connections on the server's own loop."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await store.aclose()

    return lifespan


def the_cookie(response: httpx.Response) -> tuple[str, dict[str, str | bool]]:
    (found,) = cookies_named(response.headers.get_list("set-cookie"), NAME)
    return found


def get(url: str, path: str, sid: str | None = None) -> httpx.Response:
    """One request with exactly the session cookie ``sid`` (no cookie jar)."""
    headers = {"Cookie": f"theme=dark; {NAME}={sid}"} if sid is not None else {}
    return httpx.get(url + path, headers=headers, timeout=10)


def login(url: str, user: str = "alice", sid: str | None = None) -> str:
    return the_cookie(get(url, f"/login?user={user}", sid))[0]


def ws_read(url: str, path: str, sid: str | None) -> str:
    """Open a websocket on ``path`` (wsproto over a socket), and return the first text
    message, or how the handshake was refused."""
    host, port = url.removeprefix("http://").split(":")
    connection = WSConnection(ConnectionType.CLIENT)
    headers = [(b"cookie", f"{NAME}={sid}".encode())] if sid else []
    received, refused = [], ""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(connection.send(WSRequest(host=host, target=path, extra_headers=headers)))
        while True:
            data = sock.recv(65536)
            connection.receive_data(data or None)
            for event in connection.events():
                if isinstance(event, TextMessage):
                    received.append(event.data)
                elif isinstance(event, RejectConnection):
                    refused = f"refused {event.status_code}"
                elif isinstance(event, RejectData):
                    refused += f": {event.data.decode().strip()}"
                elif isinstance(event, CloseConnection):
                    sock.sendall(connection.send(event.response()))
                    return "".join(received)
                else:
                    assert isinstance(event, AcceptConnection)
            if not data:
                return refused


@pytest.fixture
def store(cluster: LocalCluster) -> Iterator[SessionStore]:
    """The blocking store the tests inspect the cluster with."""
    with make_store(cluster, ttl=600) as store:
        yield store


@pytest.fixture
def astore(store: SessionStore) -> AsyncSessionStore:
    """The apps' store: the same cluster, servers' health and counters as ``store``."""
    return AsyncSessionStore.from_store(store)


@pytest.fixture
def gate() -> Gate:
    return Gate()


APPS = {"starlette": starlette_app, "fastapi": fastapi_app}


@pytest.fixture(params=list(APPS))
def url(request: pytest.FixtureRequest, astore: AsyncSessionStore, gate: Gate) -> Iterator[str]:
    """A served app: Starlette loading eagerly, or FastAPI lazily through a dependency."""
    with serve_asgi(APPS[request.param](astore, gate)) as served:
        yield served


def test_login_count_logout_over_real_http(
    url: str, store: SessionStore, cluster: LocalCluster
) -> None:
    sid = login(url)
    assert store.load(sid) == {"user": "alice"}
    assert [get(url, "/count", sid).text for _ in range(3)] == ["1", "2", "3"]
    response = get(url, "/whoami", sid)
    assert response.text == "alice"
    assert response.headers["vary"] == "Cookie"
    response = get(url, "/logout", sid)
    value, attributes = the_cookie(response)
    assert (value, attributes["max-age"]) == ("", "0")
    assert store.load(sid) is None
    assert len(holders(cluster, store, sid)) == 2  # a tombstone on every copy, not a miss
    assert get(url, "/whoami", sid).text == ""


def test_login_regenerates_the_id_and_kills_the_old_one(url: str, store: SessionStore) -> None:
    visitor = the_cookie(get(url, "/count"))[0]
    sid = login(url, sid=visitor)
    assert sid != visitor
    assert store.load(visitor) is None
    assert store.load(sid) == {"count": 1, "user": "alice"}
    assert get(url, "/whoami", visitor).text == ""


def test_unchanged_session_is_touched_not_rewritten(
    astore: AsyncSessionStore, store: SessionStore, cluster: LocalCluster, gate: Gate
) -> None:
    with serve_asgi(starlette_app(astore, gate, max_age=100)) as short:
        sid = login(short)
    version = version_of(store, sid)
    with serve_asgi(starlette_app(astore, gate, max_age=5000)) as long:
        response = get(long, "/whoami", sid)
    assert response.text == "alice"
    assert the_cookie(response) == (sid, the_cookie(response)[1])
    assert the_cookie(response)[1]["max-age"] == "5000"
    assert version_of(store, sid) == version
    for index in holders(cluster, store, sid):
        assert 4990 <= ttl_left(cluster, index, key_of(store, sid)) <= 5000


def test_no_refresh_leaves_cookie_and_lifetime_alone(
    astore: AsyncSessionStore, store: SessionStore, cluster: LocalCluster, gate: Gate
) -> None:
    with serve_asgi(starlette_app(astore, gate, max_age=100)) as short:
        sid = login(short)
    with serve_asgi(starlette_app(astore, gate, max_age=5000, refresh=False)) as served:
        response = get(served, "/whoami", sid)
    assert response.text == "alice"
    assert "set-cookie" not in response.headers
    for index in holders(cluster, store, sid):
        assert ttl_left(cluster, index, key_of(store, sid)) <= 100


def test_eager_mode_reads_only_requests_with_a_session_cookie(
    astore: AsyncSessionStore, store: SessionStore, gate: Gate
) -> None:
    with serve_asgi(starlette_app(astore, gate)) as url:
        sid = login(url)
        before = store.stats()
        response = get(url, "/whoami")  # no cookie: nothing to read
        assert response.text == ""
        assert store.stats()["loads"] == before["loads"]
        response = get(url, "/static", sid)  # read before the app ran, but never used
        assert "set-cookie" not in response.headers
        assert "vary" not in response.headers
        after = store.stats()
        assert after["loads"] == before["loads"] + 1
        assert (after["touches"], after["saves"]) == (before["touches"], before["saves"])


def test_lazy_mode_costs_no_round_trip_until_the_app_loads(
    astore: AsyncSessionStore, store: SessionStore, cluster: LocalCluster, gate: Gate
) -> None:
    with serve_asgi(fastapi_app(astore, gate)) as url:
        sid = login(url)
        before, gets = store.stats(), gets_served(cluster)
        response = get(url, "/static", sid)
        assert response.text == "static"
        assert "set-cookie" not in response.headers
        assert "vary" not in response.headers
        assert store.stats() == before
        assert gets_served(cluster) == gets
        # request.session before load_session(): an error, never a blocking read.
        error = get(url, "/unloaded", sid).text
        assert error.startswith(f"{SessionNotLoadedError.__name__}: ")
        assert "await memsess.adapters.asgi.load_session(request)" in error
        assert get(url, "/unloaded").text == "anonymous"  # no cookie: nothing to load
        assert store.stats()["loads"] == before["loads"]
        assert get(url, "/whoami", sid).text == "alice"
        assert store.stats()["loads"] == before["loads"] + 1


@pytest.mark.parametrize("value", BAD_COOKIES.values(), ids=BAD_COOKIES.keys())
def test_bad_cookie_gets_a_fresh_session_and_never_reaches_memcached(
    astore: AsyncSessionStore, store: SessionStore, cluster: LocalCluster, gate: Gate, value: str
) -> None:
    # In process (httpx's ASGI transport): no HTTP server lets a CRLF through to the app.
    async def requests() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(starlette_app(astore, gate))
        headers = {"Cookie": f"{NAME}={value}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            whoami = await client.get("/whoami", headers=headers)
            count = await client.get("/count", headers=headers)
        await astore.aclose()
        return whoami, count

    whoami, count = asyncio.run(requests())
    assert whoami.text == ""
    assert store.stats()["loads"] == 0  # not even a lookup
    sid = the_cookie(count)[0]
    assert sid != value
    assert_only_key(cluster, store, sid)


def test_bad_cookie_over_real_http(url: str, store: SessionStore, cluster: LocalCluster) -> None:
    tampered = BAD_COOKIES["tampered"]
    assert get(url, "/whoami", tampered).text == ""
    assert all_keys(cluster) == set()
    sid = the_cookie(get(url, "/count", tampered))[0]
    assert sid != tampered
    assert_only_key(cluster, store, sid)


def test_unknown_well_formed_id_is_not_adopted(url: str, store: SessionStore) -> None:
    forged = store.new_id()
    sid = the_cookie(get(url, "/count", forged))[0]  # no regenerate() on this path
    assert sid != forged
    assert store.load(forged) is None
    assert store.load(sid) == {"count": 1}


def test_logout_elsewhere_during_a_slow_request_wins(
    url: str, store: SessionStore, gate: Gate
) -> None:
    sid = login(url)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get, url, "/slow-count", sid)
        assert gate.entered.wait(10)  # loaded and changed, not yet saved
        assert the_cookie(get(url, "/logout", sid))[1]["max-age"] == "0"
        gate.release.set()
        response = slow.result(timeout=10)
    assert response.text == "1"
    # Its save met the logout: dropped, and the cookie left alone.
    assert cookies_named(response.headers.get_list("set-cookie"), NAME) == []
    assert store.load(sid) is None
    assert get(url, "/whoami", sid).text == ""


def test_sessions_survive_a_server_killed_mid_traffic(
    url: str, store: SessionStore, cluster: LocalCluster
) -> None:
    users = {name: login(url, name) for name in ("alice", "bob", "carol", "dave")}
    requests, progress = 20, threading.Semaphore(0)

    def traffic(sid: str) -> list[str]:
        bodies = []
        with httpx.Client(base_url=url, headers={"Cookie": f"{NAME}={sid}"}) as client:
            for _ in range(requests):
                response = client.get("/count")
                bodies.append(f"{response.status_code} {response.text}")
                progress.release()
        return bodies

    with ThreadPoolExecutor(len(users)) as pool:
        runs = {name: pool.submit(traffic, sid) for name, sid in users.items()}
        for _ in range(len(users) * 3):  # every user under way
            assert progress.acquire(timeout=10)
        cluster.kill(holders(cluster, store, users["alice"])[0])
        bodies = {name: run.result(timeout=30) for name, run in runs.items()}
    for name, sid in users.items():
        assert bodies[name] == [f"200 {n}" for n in range(1, requests + 1)]
        assert get(url, "/whoami", sid).text == name
        assert store.load(sid) == {"user": name, "count": requests}


def test_every_copy_unreachable_answers_503_and_keeps_the_data(
    url: str, store: SessionStore, cluster: LocalCluster
) -> None:
    sid = login(url)
    for server in cluster.servers:
        cluster.hang(server.index)
    response = get(url, "/count", sid)
    assert response.status_code == 503  # not an empty session, which would be saved over
    assert "set-cookie" not in response.headers
    assert response.headers["retry-after"] == "60"
    for server in cluster.servers:
        cluster.resume(server.index)
    settle()
    assert get(url, "/whoami", sid).text == "alice"
    assert store.load(sid) == {"user": "alice"}
    for server in cluster.servers:
        cluster.kill(server.index)
    assert get(url, "/whoami", sid).status_code == 503
    assert get(url, "/whoami").text == ""  # without a cookie there is nothing to read


def test_a_save_that_reaches_no_copy_is_answered_503(
    url: str, store: SessionStore, cluster: LocalCluster, gate: Gate
) -> None:
    sid = login(url)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get, url, "/slow-count", sid)
        assert gate.entered.wait(10)  # loaded and changed, not yet saved
        for server in cluster.servers:
            cluster.kill(server.index)
        gate.release.set()
        response = slow.result(timeout=10)
    assert response.status_code == 503  # a WriteError at http.response.start
    assert "set-cookie" not in response.headers


def test_lazy_load_outage_inside_a_framework_is_answered_503(
    astore: AsyncSessionStore, cluster: LocalCluster, gate: Gate
) -> None:
    # Starlette's ServerErrorMiddleware, inside this middleware here, answers the
    # load's error with a 500 before re-raising it: the middleware sends its 503 instead.
    with serve_asgi(starlette_app(astore, gate, lazy=True)) as url:
        sid = login(url)
        assert get(url, "/whoami", sid).text == "alice"
        for server in cluster.servers:
            cluster.kill(server.index)
        response = get(url, "/whoami", sid)
        assert response.status_code == 503
        assert response.text.startswith("Sessions are unavailable")
        assert get(url, "/fail").status_code == 500  # an error of the app's own stays a 500


def test_websocket_reads_the_session_and_never_writes_it(
    url: str, store: SessionStore, cluster: LocalCluster
) -> None:
    sid = login(url)
    version = version_of(store, sid)
    assert ws_read(url, "/ws", sid) == "alice"
    assert ws_read(url, "/ws", None) == ""
    assert version_of(store, sid) == version
    assert store.load(sid) == {"user": "alice"}
    for server in cluster.servers:
        cluster.kill(server.index)
    assert ws_read(url, "/ws", sid).startswith("refused 503")


def test_server_error_response_saves_nothing(
    astore: AsyncSessionStore, store: SessionStore, gate: Gate
) -> None:
    with serve_asgi(starlette_app(astore, gate)) as url:
        sid = login(url)
        response = get(url, "/fail", sid)  # sets "user" to "mallory", then answers 500
    assert response.status_code == 500
    assert "set-cookie" not in response.headers
    assert store.load(sid) == {"user": "alice"}


def test_default_cookie_attributes_are_safe(url: str) -> None:
    value, attributes = the_cookie(get(url, "/count"))
    assert len(value) == 43
    assert attributes["httponly"] is True
    assert attributes["samesite"] == "Lax"
    assert attributes["path"] == "/"
    assert attributes["max-age"] == "600"  # the store's ttl
    assert "GMT" in str(attributes["expires"])
    assert "secure" not in attributes
    assert "domain" not in attributes


def test_configured_cookie_attributes(astore: AsyncSessionStore, gate: Gate) -> None:
    app = starlette_app(
        astore, gate, cookie_name="sid", secure=True, same_site="strict", path="/",
        domain="example.com", max_age=60, httponly=False,
    )  # fmt: skip
    with serve_asgi(app) as url:
        (header,) = httpx.get(url + "/count").headers.get_list("set-cookie")
        assert header.startswith("sid=")
        for attribute in ("; Secure", "; SameSite=Strict", "; Domain=example.com", "; Max-Age=60;"):
            assert attribute in header
        assert "HttpOnly" not in header
        browser = starlette_app(astore, gate, expire_at_browser_close=True)
        with serve_asgi(browser) as other:
            (header,) = httpx.get(other + "/count").headers.get_list("set-cookie")
        assert "Max-Age" not in header
        assert "Expires" not in header


@pytest.mark.parametrize(
    "options",
    [{"cookie_name": "a b"}, {"path": "/;x"}, {"domain": "a\r\nb"}, {"same_site": "none"},
     {"same_site": "sideways"}, {"max_age": 0}, {"max_age": -1}],
)  # fmt: skip
def test_unsafe_options_are_refused(astore: AsyncSessionStore, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each option names itself in the message
        SessionMiddleware(Starlette(), astore, **options)


def test_store_or_dsn_is_required_and_a_dsn_store_is_closed_at_shutdown(
    cluster: LocalCluster, store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(TypeError):
        SessionMiddleware(Starlette())
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    async def count(request: Request) -> Response:
        request.session["count"] = request.session.get("count", 0) + 1
        return Response(str(request.session["count"]))

    app = Starlette(routes=[Route("/count", count)], lifespan=lifespan)
    middleware = SessionMiddleware(app, dsn=cluster.dsn(), max_age=30)
    closed = []
    real_aclose = middleware.store.aclose

    async def aclose() -> None:
        closed.append(True)
        await real_aclose()

    monkeypatch.setattr(middleware.store, "aclose", aclose)
    with serve_asgi(middleware) as url:
        response = httpx.get(url + "/count")
        sid, attributes = the_cookie(response)
        assert attributes["max-age"] == "30"
        assert store.load(sid) == {"count": 1}
    assert events == ["startup", "shutdown"]  # lifespan reached the app
    assert closed == [True]


def test_an_unknown_option_is_refused_by_name(astore: AsyncSessionStore) -> None:
    with pytest.raises(TypeError, match="secrue"):
        SessionMiddleware(Starlette(), astore, secrue=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'redundance' \\(did you mean 'redundancy'\\?\\)"):
        SessionMiddleware(Starlette(), dsn="tcp://127.0.0.1:11211", store_options={"redundance": 2})


def test_a_list_dsn_with_a_store_timeout_builds_the_store(cluster: LocalCluster) -> None:
    first, *others = cluster.dsn().split(", ")
    middleware = SessionMiddleware(
        Starlette(),
        dsn=[f"{first}?timeout=0.75&retry_interval=4", *others],
        store_options={"timeout": 0.25, "retry_interval": 3, "redundancy": 3},
    )
    servers = middleware.store._cluster.servers
    assert [(server.timeout, server.retry_interval) for server in servers] == [
        (0.75, 4),
        (0.25, 3),
        (0.25, 3),
    ]
    assert middleware.store.redundancy == 3


@pytest.mark.parametrize(
    "dsn", ["tcp://127.0.0.1:0", ["tcp://127.0.0.1:11211", "tcp://127.0.0.1:0"]]
)
def test_a_bad_dsn_names_the_argument(dsn: str | list[str]) -> None:
    with pytest.raises(memsess.DSNError, match=r"^dsn: "):
        SessionMiddleware(Starlette(), dsn=dsn)


def test_example_app_runs(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSESS_SAVE_PATH", cluster.dsn())
    example = runpy.run_path(str(EXAMPLES / "fastapi_app.py"))
    with serve_asgi(example["app"]) as url, httpx.Client(base_url=url) as client:
        assert client.get("/").text == "anonymous, visit 1"
        assert client.get("/login/alice").text == "logged in as alice"
        assert client.get("/").text == "alice, visit 2"
        assert client.get("/me").json() == {"user": "alice"}
        # The session survives a killed server holding one of its copies.
        sid = client.cookies[NAME]
        with make_store(cluster) as inspector:
            first = next(s.index for s in cluster.servers if s.address == inspector.locate(sid)[0])
        cluster.kill(first)
        assert client.get("/").text == "alice, visit 3"
        assert client.get("/me").json() == {"user": "alice"}
        assert client.get("/logout").text == "logged out"
        assert client.get("/").text == "anonymous, visit 1"
