"""Two requests of one user at once (a page firing two AJAX calls): the slow one loaded
the session before the fast one saved, and saves after it. Through every adapter, by
default, both keep their changes (a merge by key); the policies "error" and
"overwrite" do what they say. Against real memcached, with and without a killed server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import django_settings
import httpx
import pytest
from adapter_support import RETRY_INTERVAL, TIMEOUT, make_store

import memsess
from memsess import AsyncSessionStore, SessionConflictError, SessionStore
from memsess.testing import LocalCluster

django_settings.setup()  # as tests/test_adapter_django.py does

NAME = "session"
START = {"user": "ann", "cart": [1]}


@pytest.fixture(params=[None, "kill"], ids=["healthy", "a-server-killed"])
def fault(request: pytest.FixtureRequest) -> str | None:
    param: str | None = request.param
    return param


@pytest.fixture
def store(cluster: LocalCluster) -> Iterator[SessionStore]:
    with make_store(cluster, ttl=600) as store:
        yield store


def begin(cluster: LocalCluster, store: SessionStore, fault: str | None) -> str:
    """A logged-in session; with the fault, one of its servers killed first."""
    sid = store.new_id()
    store.save(sid, START)
    if fault == "kill":
        address = store.locate(sid)[0]
        cluster.kill(next(s.index for s in cluster.servers if s.address == address))
    return sid


class Gate:
    """The slow request says it has loaded the session, then waits to be let go."""

    def __init__(self) -> None:
        self.loaded, self.go = threading.Event(), threading.Event()

    def hold(self) -> None:
        self.loaded.set()
        assert self.go.wait(10)


def both_ways(slow: Callable[[], Any], fast: Callable[[], Any], gate: Gate) -> None:
    """Run ``slow`` in a thread until it has loaded, ``fast`` to its end, then let
    ``slow`` finish; re-raise what either raised."""
    errors: list[BaseException] = []

    def run_slow() -> None:
        try:
            slow()
        except BaseException as exc:
            errors.append(exc)
            gate.loaded.set()

    thread = threading.Thread(target=run_slow)
    thread.start()
    assert gate.loaded.wait(10)
    try:
        fast()
    finally:
        gate.go.set()
        thread.join()
    if errors:
        raise errors[0]


# -- WSGI ----------------------------------------------------------------------------


def wsgi_app(gate: Gate) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        session = environ["memsess.session"]
        query = dict(part.split("=") for part in environ["QUERY_STRING"].split("&"))
        assert session["user"] == "ann"  # loaded
        if query.get("wait"):
            gate.hold()
        if query["do"] == "cart":
            session["cart"].append(2)  # a nested change...
            session.modified = True  # ...said so, as in Flask
        else:
            session["theme"] = "dark"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def wsgi_call(app: Any, path: str, sid: str) -> None:
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"], _, environ["QUERY_STRING"] = path.partition("?")
    environ["HTTP_COOKIE"] = f"{NAME}={sid}"
    b"".join(app(environ, lambda status, headers, exc_info=None: None))


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("merge", {"user": "ann", "cart": [1, 2], "theme": "dark"}),
        ("overwrite", {"user": "ann", "cart": [1, 2]}),
    ],
)
def test_wsgi(
    cluster: LocalCluster, fault: str | None, store: SessionStore, policy: str, expected: Any
) -> None:
    from memsess.adapters.wsgi import SessionMiddleware

    sid = begin(cluster, store, fault)
    gate = Gate()
    app = SessionMiddleware(wsgi_app(gate), store, on_conflict=policy)
    both_ways(
        lambda: wsgi_call(app, "/?do=cart&wait=1", sid),
        lambda: wsgi_call(app, "/?do=theme", sid),
        gate,
    )
    assert store.load(sid) == expected


def test_wsgi_error_policy_refuses_the_later_save(
    cluster: LocalCluster, fault: str | None, store: SessionStore
) -> None:
    from memsess.adapters.wsgi import SessionMiddleware

    sid = begin(cluster, store, fault)
    gate = Gate()
    app = SessionMiddleware(wsgi_app(gate), store, on_conflict="error")
    with pytest.raises(SessionConflictError):
        both_ways(
            lambda: wsgi_call(app, "/?do=cart&wait=1", sid),
            lambda: wsgi_call(app, "/?do=theme", sid),
            gate,
        )
    assert store.load(sid) == {"user": "ann", "cart": [1], "theme": "dark"}


def test_a_misspelt_policy_is_refused_at_once(store: SessionStore) -> None:
    from memsess.adapters.wsgi import SessionMiddleware

    with pytest.raises(ValueError, match="merge"):
        SessionMiddleware(wsgi_app(Gate()), store, on_conflict="merged")


# -- Flask ---------------------------------------------------------------------------


def test_flask(cluster: LocalCluster, fault: str | None, store: SessionStore) -> None:
    from flask import Flask, request, session

    from memsess.adapters.flask import init_app

    sid = begin(cluster, store, fault)
    gate = Gate()
    app = Flask(__name__)
    app.secret_key = "unused"
    init_app(app, store)

    @app.get("/")
    def change() -> str:
        assert session["user"] == "ann"
        if request.args.get("wait"):
            gate.hold()
        if request.args["do"] == "cart":
            session["cart"].append(2)
            session.modified = True  # Flask's way to say a nested value changed
        else:
            session["theme"] = "dark"
        return "ok"

    def get(path: str) -> None:
        client = app.test_client()
        client.set_cookie(NAME, sid)
        assert client.get(path).status_code == 200

    both_ways(lambda: get("/?do=cart&wait=1"), lambda: get("/?do=theme"), gate)
    assert store.load(sid) == {"user": "ann", "cart": [1, 2], "theme": "dark"}


# -- Django (the backend, as its SessionMiddleware drives it) --------------------------


def test_django(
    cluster: LocalCluster, fault: str | None, store: SessionStore, settings_for_django: Any
) -> None:
    from memsess.adapters.django import SessionStore as DjangoSession
    from memsess.adapters.django import get_store

    sid = begin(cluster, get_store(), fault)
    slow, fast = DjangoSession(sid), DjangoSession(sid)
    assert slow["user"] == fast["user"] == "ann"  # both loaded
    fast["theme"] = "dark"
    fast.save()
    slow["cart"].append(2)
    slow.modified = True
    slow.save()
    assert get_store().load(sid) == {"user": "ann", "cart": [1, 2], "theme": "dark"}


@pytest.fixture
def settings_for_django(cluster: LocalCluster) -> Iterator[None]:
    import django_settings  # noqa: F401 - configures Django
    from django.test import override_settings

    dsn = cluster.dsn(timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)
    with override_settings(SESSION_MEMSESS={"SAVE_PATH": dsn, "REDUNDANCY": 2}):
        yield


# -- ASGI (Starlette) and Quart: two requests at once on one event loop ---------------------


def test_asgi(cluster: LocalCluster, fault: str | None, store: SessionStore) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from memsess.adapters.asgi import SessionMiddleware

    sid = begin(cluster, store, fault)

    async def main() -> None:
        loaded, go = asyncio.Event(), asyncio.Event()

        async def change(request: Request) -> PlainTextResponse:
            assert request.session["user"] == "ann"
            if request.query_params.get("wait"):
                loaded.set()
                await go.wait()
            if request.query_params["do"] == "cart":
                request.session["cart"].append(2)
                request.session["cart"] = request.session["cart"]
            else:
                request.session["theme"] = "dark"
            return PlainTextResponse("ok")

        astore = AsyncSessionStore.from_store(store)
        app = SessionMiddleware(Starlette(routes=[Route("/", change)]), store=astore)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", cookies={NAME: sid}
        ) as client:
            slow = asyncio.ensure_future(client.get("/?do=cart&wait=1"))
            await loaded.wait()
            assert (await client.get("/?do=theme")).status_code == 200
            go.set()
            assert (await slow).status_code == 200
        await astore.aclose()

    asyncio.run(main())
    assert store.load(sid) == {"user": "ann", "cart": [1, 2], "theme": "dark"}


def test_quart(cluster: LocalCluster, fault: str | None, store: SessionStore) -> None:
    from quart import Quart, request, session

    from memsess.adapters.quart import init_app

    sid = begin(cluster, store, fault)

    async def main() -> None:
        loaded, go = asyncio.Event(), asyncio.Event()
        astore = AsyncSessionStore.from_store(store)
        app = Quart(__name__)
        init_app(app, astore)

        @app.get("/")
        async def change() -> str:
            assert session["user"] == "ann"
            if request.args.get("wait"):
                loaded.set()
                await go.wait()
            if request.args["do"] == "cart":
                session["cart"].append(2)
                session.modified = True
            else:
                session["theme"] = "dark"
            return "ok"

        def client() -> Any:
            made = app.test_client()
            made.set_cookie("localhost", NAME, sid)
            return made

        slow = asyncio.ensure_future(client().get("/?do=cart&wait=1"))
        await loaded.wait()
        assert (await client().get("/?do=theme")).status_code == 200
        go.set()
        assert (await slow).status_code == 200
        await astore.aclose()

    asyncio.run(main())
    assert store.load(sid) == {"user": "ann", "cart": [1, 2], "theme": "dark"}


def test_the_counters_say_a_merge_happened(
    cluster: LocalCluster, fault: str | None, store: SessionStore
) -> None:
    from memsess.adapters.wsgi import SessionMiddleware

    sid = begin(cluster, store, fault)
    gate = Gate()
    app = SessionMiddleware(wsgi_app(gate), store)
    both_ways(
        lambda: wsgi_call(app, "/?do=cart&wait=1", sid),
        lambda: wsgi_call(app, "/?do=theme", sid),
        gate,
    )
    stats = store.stats()
    assert stats["conflicts"] == 1
    assert stats["merge_overwrites"] == 0
    assert isinstance(memsess.SessionConflictError("x"), memsess.MemsessError)


# -- whole-session operations: a login (regenerate) and a logout (clear) ----------------


def login_app(gate: Gate) -> Callable[..., Any]:
    """/login regenerates (a new id, the old one logged out); /logout clears;
    /note?wait=1 loads, waits for the gate, then sets a key."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        session = environ["memsess.session"]
        path = environ["PATH_INFO"]
        assert session["user"] == "ann"  # loaded
        if path == "/login":
            session["user"] = "ann (logged in)"
            session.regenerate()
        elif path == "/logout":
            session.clear()
        else:
            gate.hold()
            session["note"] = "from the slow request"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def wsgi_cookies(app: Any, path: str, sid: str) -> list[str]:
    """The Set-Cookie values of one request with session cookie ``sid``."""
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    environ["HTTP_COOKIE"] = f"{NAME}={sid}"
    headers: list[tuple[str, str]] = []
    b"".join(app(environ, lambda status, found, exc_info=None: headers.extend(found)))
    return [value for name, value in headers if name.lower() == "set-cookie"]


@pytest.mark.parametrize("whole", ["/login", "/logout"])
def test_a_request_finishing_after_a_login_or_logout_changes_nothing(
    cluster: LocalCluster, fault: str | None, store: SessionStore, whole: str
) -> None:
    # Defined: a login or a logout is a whole-session operation. A request that loaded
    # the session before it and saves after it finds the old id logged out: its changes
    # are dropped, and it leaves the cookie alone, so the browser keeps the cookie of
    # the login (a cookie expired by that late response would log the user out again).
    from memsess.adapters.wsgi import SessionMiddleware

    sid = begin(cluster, store, fault)
    gate = Gate()
    app = SessionMiddleware(login_app(gate), store)
    late: list[list[str]] = []
    first: list[str] = []
    both_ways(
        lambda: late.append(wsgi_cookies(app, "/note", sid)),
        lambda: first.extend(wsgi_cookies(app, whole, sid)),
        gate,
    )
    assert late == [[]]  # no Set-Cookie from the late request
    assert store.load(sid) is None  # the old id stays logged out
    if whole == "/login":
        (cookie,) = first
        new_sid = cookie.split(";")[0].split("=", 1)[1]
        assert new_sid != sid
        assert store.load(new_sid) == {"user": "ann (logged in)", "cart": [1]}
    else:
        assert "Max-Age=0" in first[0]  # the logout expired the cookie itself


# -- the "lock" policy: one request at a time -------------------------------------------


def serialized(slow: Callable[[], Any], fast: Callable[[], Any], gate: Gate) -> bool:
    """Start ``slow`` (it loads, then waits for the gate), then ``fast``; True if
    ``fast`` was still waiting when the gate opened (it could not load meanwhile)."""
    threads = [threading.Thread(target=slow), threading.Thread(target=fast)]
    threads[0].start()
    assert gate.loaded.wait(10)
    threads[1].start()
    threads[1].join(timeout=0.3)  # it must not get through while the lock is held
    waited = threads[1].is_alive()
    gate.go.set()
    for thread in threads:
        thread.join(10)
    return waited


def test_wsgi_lock_policy_runs_the_requests_one_at_a_time(
    cluster: LocalCluster, fault: str | None, store: SessionStore
) -> None:
    from memsess.adapters.wsgi import SessionMiddleware

    sid = begin(cluster, store, fault)
    gate = Gate()
    app = SessionMiddleware(wsgi_app(gate), store, on_conflict="lock")
    assert serialized(
        lambda: wsgi_call(app, "/?do=cart&wait=1", sid),
        lambda: wsgi_call(app, "/?do=theme", sid),
        gate,
    )
    assert store.load(sid) == {"user": "ann", "cart": [1, 2], "theme": "dark"}
    stats = store.stats()
    assert (stats["locks"], stats["conflicts"]) == (2, 0)
    key = storage_key_of(store, sid)
    assert all(cluster.get_raw(s.index, key) is None for s in cluster.servers if s.running)


def test_a_view_that_raises_gives_the_lock_back(
    cluster: LocalCluster, fault: str | None, store: SessionStore
) -> None:
    from flask import Flask, session

    from memsess.adapters.flask import init_app

    sid = begin(cluster, store, fault)
    app = Flask(__name__)
    # TESTING: the exception propagates, so Flask never saves the session; only the
    # teardown can give the lock back.
    app.config.update(MEMSESS_ON_CONFLICT="lock", TESTING=True)
    init_app(app, store)

    @app.get("/boom")
    def boom() -> str:
        assert session["user"] == "ann"  # loaded: the lock is held
        raise RuntimeError("a bug in the view")

    client = app.test_client()
    client.set_cookie(NAME, sid)
    with pytest.raises(RuntimeError, match="a bug"):
        client.get("/boom")
    with store.lock(sid, wait=0.5):  # free again at once, not after its lease
        pass


def test_asgi_lock_policy_answers_503_when_the_lock_is_not_had(
    cluster: LocalCluster, fault: str | None, store: SessionStore
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from memsess.adapters.asgi import SessionMiddleware

    sid = begin(cluster, store, fault)

    async def main() -> int:
        async def show(request: Request) -> PlainTextResponse:
            return PlainTextResponse(request.session["user"])

        astore = AsyncSessionStore.from_store(store)
        app = SessionMiddleware(
            Starlette(routes=[Route("/", show)]), store=astore, on_conflict="lock"
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", cookies={NAME: sid}
        ) as client:
            assert (await client.get("/")).text == "ann"  # took and gave back the lock
            holder = store.lock(sid)
            holder.acquire()  # another request holds it for longer than the wait
            try:
                status = (await client.get("/")).status_code
            finally:
                holder.release()
        await astore.aclose()
        return status

    assert asyncio.run(main()) == 503


def storage_key_of(store: SessionStore, sid: str) -> bytes:
    from memsess.plans import LOCK_SUFFIX

    return store.storage_key(sid) + LOCK_SUFFIX


# -- eight requests at once, the same key, a logout: through ASGI, on one event loop ------


def asgi_race_app(
    store: AsyncSessionStore,
    arrived: list[int],
    all_in: asyncio.Event,
    go: dict[str, asyncio.Event],
) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from memsess.adapters import AsyncSession
    from memsess.adapters.asgi import SessionMiddleware

    async def change(request: Request) -> PlainTextResponse:
        name = request.query_params["name"]
        assert request.session["user"] == "ann"  # loaded
        arrived.append(1)
        if len(arrived) == len(go):
            all_in.set()
        await go[name].wait()
        if request.query_params.get("logout"):
            request.session.clear()
        elif request.query_params.get("login"):
            session = request.session  # Starlette types it as a dict: it is memsess's
            assert isinstance(session, AsyncSession)
            session.regenerate()
            session["user"] = "ann (logged in)"
        else:
            request.session[request.query_params["key"]] = name
        return PlainTextResponse("ok")

    return SessionMiddleware(Starlette(routes=[Route("/", change)]), store=store)


def run_race(
    store: SessionStore, sid: str, requests: list[dict[str, str]], order: list[str]
) -> dict[str, httpx.Response]:
    """Send ``requests`` at once; once all have loaded the session, let them save one
    by one in ``order`` (each waited for before the next); their responses by name."""
    responses: dict[str, httpx.Response] = {}

    async def main() -> None:
        arrived: list[int] = []
        all_in = asyncio.Event()
        go = {request["name"]: asyncio.Event() for request in requests}
        astore = AsyncSessionStore.from_store(store)
        app = asgi_race_app(astore, arrived, all_in, go)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", cookies={NAME: sid}
        ) as client:
            pending = {
                request["name"]: asyncio.ensure_future(client.get("/", params=request))
                for request in requests
            }
            await all_in.wait()  # every request has loaded the session
            for name in order:
                go[name].set()
                responses[name] = await pending[name]
                assert responses[name].status_code == 200
        await astore.aclose()

    asyncio.run(main())
    return responses


def test_a_request_finishing_after_a_login_through_asgi_changes_nothing(
    cluster: LocalCluster, fault: str | None, store: SessionStore
) -> None:
    sid = begin(cluster, store, fault)
    responses = run_race(
        store, sid, [{"name": "in", "login": "1"}, {"name": "late", "key": "x"}], ["in", "late"]
    )
    new_sid = responses["in"].cookies[NAME]
    assert new_sid != sid
    assert store.load(new_sid) == {**START, "user": "ann (logged in)"}
    assert store.load(sid) is None  # the old id stays logged out: the late change dropped
    assert "set-cookie" not in responses["late"].headers  # and the new cookie left alone


def test_eight_requests_at_once_changing_different_keys_keep_every_change(
    cluster: LocalCluster, fault: str | None, store: SessionStore
) -> None:
    sid = begin(cluster, store, fault)
    names = [f"r{n}" for n in range(8)]
    run_race(store, sid, [{"name": n, "key": f"key-{n}"} for n in names], names)
    assert store.load(sid) == {**START, **{f"key-{n}": n for n in names}}


def test_two_requests_changing_the_same_key_the_later_save_wins(
    cluster: LocalCluster, fault: str | None, store: SessionStore
) -> None:
    sid = begin(cluster, store, fault)
    run_race(store, sid, [{"name": "a", "key": "x"}, {"name": "b", "key": "x"}], ["a", "b"])
    assert store.load(sid) == {**START, "x": "b"}
    assert store.stats()["merge_overwrites"] == 1


def test_a_logout_during_another_request_wins(
    cluster: LocalCluster, fault: str | None, store: SessionStore
) -> None:
    sid = begin(cluster, store, fault)
    run_race(
        store,
        sid,
        [{"name": "out", "logout": "1"}, {"name": "late", "key": "x"}],
        ["out", "late"],
    )
    assert store.load(sid) is None


# -- Django's "lock" policy, through its test client --------------------------------------

DJANGO_GATE = Gate()


def django_hold(request: Any) -> Any:
    from django.http import HttpResponse

    assert request.session["user"] == "ann"  # loaded: the lock is held
    DJANGO_GATE.hold()
    request.session["cart"] = [*request.session["cart"], 2]
    return HttpResponse("ok")


def django_theme(request: Any) -> Any:
    from django.http import HttpResponse

    assert request.session["user"] == "ann"
    request.session["theme"] = "dark"
    return HttpResponse("ok")


def django_boom(request: Any) -> Any:
    assert request.session["user"] == "ann"
    raise RuntimeError("a bug in the view")


def django_urlpatterns() -> list[Any]:
    from django.urls import path

    return [
        path("hold", django_hold),
        path("theme", django_theme),
        path("boom", django_boom),
        path("race", django_race),
    ]


@pytest.fixture
def locking_django(cluster: LocalCluster) -> Iterator[None]:
    from django.test import override_settings

    dsn = cluster.dsn(timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)
    global urlpatterns
    urlpatterns = django_urlpatterns()
    with override_settings(
        SESSION_MEMSESS={"SAVE_PATH": dsn, "REDUNDANCY": 2, "ON_CONFLICT": "lock"},
        MIDDLEWARE=[
            "memsess.adapters.django.SessionLockMiddleware",
            "django.contrib.sessions.middleware.SessionMiddleware",
        ],
        ROOT_URLCONF=__name__,
    ):
        yield


urlpatterns: list[Any] = []  # filled below, once the views exist


def test_django_lock_policy_runs_the_requests_one_at_a_time(
    cluster: LocalCluster, fault: str | None, locking_django: None
) -> None:
    from django.conf import settings
    from django.test import Client

    from memsess.adapters.django import get_store

    sid = begin(cluster, get_store(), fault)
    global DJANGO_GATE
    DJANGO_GATE = gate = Gate()

    def get(path: str) -> None:
        client = Client(raise_request_exception=True)
        client.cookies[settings.SESSION_COOKIE_NAME] = sid
        assert client.get(path).status_code == 200

    assert serialized(lambda: get("/hold"), lambda: get("/theme"), gate)
    assert get_store().load(sid) == {"user": "ann", "cart": [1, 2], "theme": "dark"}
    with get_store().lock(sid, wait=0.5):  # given back after each request
        pass


def test_django_view_that_raises_gives_the_lock_back(
    cluster: LocalCluster, fault: str | None, locking_django: None
) -> None:
    from django.conf import settings
    from django.test import Client

    from memsess.adapters.django import get_store

    sid = begin(cluster, get_store(), fault)
    client = Client(raise_request_exception=True)
    client.cookies[settings.SESSION_COOKIE_NAME] = sid
    with pytest.raises(RuntimeError, match="a bug"):
        client.get("/boom")
    with get_store().lock(sid, wait=0.5):  # free at once, not after its lease
        pass


def test_django_lock_policy_needs_its_middleware(cluster: LocalCluster) -> None:
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from memsess.adapters.django import conflict_setting

    dsn = cluster.dsn()
    with override_settings(SESSION_MEMSESS={"SAVE_PATH": dsn, "ON_CONFLICT": "lock"}):
        with pytest.raises(ImproperlyConfigured, match="SessionLockMiddleware"):
            conflict_setting()


# -- eight requests, the same key, a logout: through WSGI, Flask and Django (threads) ------


class Race:
    """Requests that each load the session, then wait for their turn to change it."""

    def __init__(self, names: list[str]) -> None:
        self.go = {name: threading.Event() for name in names}
        self.arrived = threading.Semaphore(0)

    def loaded(self, name: str) -> None:
        self.arrived.release()
        assert self.go[name].wait(10)

    def run(self, send: Callable[[dict[str, str]], None], requests: list[dict[str, str]]) -> None:
        """Send every request at once; when all have loaded, let them finish one by one
        in the order given."""
        threads = {
            request["name"]: threading.Thread(target=send, args=(request,)) for request in requests
        }
        for thread in threads.values():
            thread.start()
        for _ in requests:
            assert self.arrived.acquire(timeout=10)
        for name, thread in threads.items():
            self.go[name].set()
            thread.join(10)
            assert not thread.is_alive()


RACE: Race = Race([])


def apply_change(session: Any, query: dict[str, str]) -> None:
    if query.get("logout"):
        # Django's logout() flushes; the other adapters' sessions log out when emptied.
        session.flush() if hasattr(session, "flush") else session.clear()
    elif query.get("login"):
        # A login: a new id (Django's login() cycles the key), then the user changes.
        session.cycle_key() if hasattr(session, "cycle_key") else session.regenerate()
        session["user"] = "ann (logged in)"
    else:
        session[query["key"]] = query["name"]


def race_wsgi_app(store: SessionStore) -> Any:
    from urllib.parse import parse_qsl

    from memsess.adapters.wsgi import SessionMiddleware

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        session = environ["memsess.session"]
        query = dict(parse_qsl(environ["QUERY_STRING"]))
        assert session["user"] == "ann"
        RACE.loaded(query["name"])
        apply_change(session, query)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return SessionMiddleware(app, store)


def race_flask_app(store: SessionStore) -> Any:
    from flask import Flask, request, session

    from memsess.adapters.flask import init_app

    app = Flask(__name__)
    init_app(app, store)

    @app.get("/race")
    def race() -> str:
        assert session["user"] == "ann"
        RACE.loaded(request.args["name"])
        apply_change(session, dict(request.args))
        return "ok"

    return app


def django_race(request: Any) -> Any:
    from django.http import HttpResponse

    assert request.session["user"] == "ann"
    RACE.loaded(request.GET["name"])
    apply_change(request.session, dict(request.GET.items()))
    return HttpResponse("ok")


def send_wsgi(
    app: Any, sid: str, statuses: dict[str, str], cookies: dict[str, list[str]]
) -> Callable[[dict[str, str]], None]:
    """Send a request to the WSGI ``app``; note its status and its session cookies."""
    from urllib.parse import urlencode

    def send(query: dict[str, str]) -> None:
        environ: dict[str, Any] = {}
        setup_testing_defaults(environ)
        environ["PATH_INFO"], environ["QUERY_STRING"] = "/race", urlencode(query)
        environ["HTTP_COOKIE"] = f"{NAME}={sid}"
        started: list[Any] = []
        b"".join(app(environ, lambda line, headers, exc_info=None: started.extend([line, headers])))
        statuses[query["name"]] = started[0]
        cookies[query["name"]] = [
            value.strip().split(";")[0].split("=", 1)[1]
            for name, value in started[1]
            if name.lower() == "set-cookie" and value.strip().startswith(f"{NAME}=")
        ]

    return send


SCENARIOS = {
    "eight-keys": (
        [{"name": f"r{n}", "key": f"key-{n}"} for n in range(8)],
        {**START, **{f"key-{n}": f"r{n}" for n in range(8)}},
    ),
    "same-key": ([{"name": "a", "key": "x"}, {"name": "b", "key": "x"}], {**START, "x": "b"}),
    "logout": ([{"name": "out", "logout": "1"}, {"name": "late", "key": "x"}], None),
    # The old id stays logged out after a login; the new one holds the login's data.
    "login": ([{"name": "in", "login": "1"}, {"name": "late", "key": "x"}], None),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("adapter", ["wsgi", "flask", "django"])
def test_requests_at_once_through_the_wsgi_adapters(
    cluster: LocalCluster, fault: str | None, store: SessionStore, adapter: str, scenario: str
) -> None:
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    global RACE
    requests, expected = SCENARIOS[scenario]
    RACE = Race([request["name"] for request in requests])
    dsn = cluster.dsn(timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)
    with override_settings(
        SESSION_MEMSESS={"SAVE_PATH": dsn, "REDUNDANCY": 2},
        SESSION_COOKIE_NAME=NAME,
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
    ):
        from memsess.adapters.django import get_store

        target = get_store() if adapter == "django" else store
        sid = begin(cluster, target, fault)
        app = {
            "wsgi": lambda: race_wsgi_app(target),
            "flask": lambda: race_flask_app(target),
            "django": WSGIHandler,
        }[adapter]()
        statuses: dict[str, str] = {}
        cookies: dict[str, list[str]] = {}
        RACE.run(send_wsgi(app, sid, statuses, cookies), requests)
        assert target.load(sid) == expected
        if scenario == "login":
            (new_sid,) = cookies["in"]
            assert new_sid != sid
            assert target.load(new_sid) == {**START, "user": "ann (logged in)"}
    if adapter == "django" and scenario in ("logout", "login"):
        # Django answers a save that met a logout 400 (SessionInterrupted), as with its
        # own backends; the others drop the changes quietly, leaving the cookie alone.
        assert statuses["late"] == "400 Bad Request"
        assert set(statuses.values()) == {"200 OK", "400 Bad Request"}
    else:
        assert set(statuses.values()) == {"200 OK"}
        if scenario in ("logout", "login"):
            assert cookies["late"] == []


urlpatterns = django_urlpatterns()


# -- Litestar: its session is one JSON value, merged by key on a conflict -----------------


def test_litestar(cluster: LocalCluster, fault: str | None, store: SessionStore) -> None:
    from litestar import Litestar, Request, get

    from memsess.adapters.litestar import MemsessSessionConfig, MemsessStore

    async def main() -> dict[str, Any]:
        loaded, go = asyncio.Event(), asyncio.Event()

        @get("/login")
        async def login(request: Request[Any, Any, Any]) -> str:
            request.set_session({"user": "ann", "cart": [1]})
            return "ok"

        @get("/change")
        async def change(request: Request[Any, Any, Any]) -> str:
            assert request.session["user"] == "ann"
            do = request.query_params["do"]
            if "wait" in request.query_params:
                loaded.set()
                await go.wait()
            if do == "cart":
                request.set_session({**request.session, "cart": [1, 2]})
            else:
                request.set_session({**request.session, "theme": "dark"})
            return "ok"

        astore = AsyncSessionStore.from_store(store)
        memsess_store = MemsessStore(astore)
        app = Litestar(
            route_handlers=[login, change],
            middleware=[MemsessSessionConfig().middleware],
            stores={"sessions": memsess_store},
            logging_config=None,
        )
        # Litestar types the ASGI scope and messages more narrowly than httpx's app: the
        # two libraries' annotations disagree, the protocol they speak is the same.
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/login")).status_code == 200
            sid = client.cookies["session"]
            if fault == "kill":
                address = astore.locate(memsess_store.memsess_id(sid))[0]
                cluster.kill(next(s.index for s in cluster.servers if s.address == address))
            slow = asyncio.ensure_future(client.get("/change", params={"do": "cart", "wait": 1}))
            await loaded.wait()
            assert (await client.get("/change", params={"do": "theme"})).status_code == 200
            go.set()
            assert (await slow).status_code == 200
            snapshot = await astore.fetch(memsess_store.memsess_id(sid))
        await astore.aclose()
        assert snapshot is not None
        value: dict[str, Any] = json.loads(snapshot.data["value"])
        return value

    assert asyncio.run(main()) == {"user": "ann", "cart": [1, 2], "theme": "dark"}
