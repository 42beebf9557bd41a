"""The WSGI middleware on a real local cluster: lazy loading, login/logout,
faults, hostile cookies, session fixation, cookie attributes, outages."""

from __future__ import annotations

import http.client
import math
import runpy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from wsgiref.util import setup_testing_defaults

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
    serve,
    settle,
    ttl_left,
    version_of,
)

from memsess import NoServerAvailableError, SessionStore
from memsess.adapters import Session
from memsess.adapters.wsgi import ENVIRON_KEY, SessionMiddleware
from memsess.testing import LocalCluster

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAME = "session"


def demo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """login?user=..., whoami, logout, count, static (never reads the session), fail."""
    session: Session = environ[ENVIRON_KEY]
    path = environ["PATH_INFO"]
    body = path
    if path == "/login":
        session["user"] = parse_qs(environ["QUERY_STRING"])["user"][0]
        session.regenerate()
    elif path == "/whoami":
        body = session.get("user", "")
    elif path == "/logout":
        session.clear()
    elif path == "/count":
        session["count"] = session.get("count", 0) + 1
        body = str(session["count"])
    elif path == "/fail":
        session["user"] = "mallory"
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [b"failed"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]


@dataclass
class Reply:
    status: str
    body: str
    set_cookies: list[str]
    vary: list[str]

    def cookie(self) -> tuple[str, dict[str, str | bool]]:
        (found,) = cookies_named(self.set_cookies, NAME)
        return found


def call(app: Any, path: str, cookie: str | None = None) -> Reply:
    """One request to a WSGI app; ``cookie`` is the session cookie's raw value."""
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"], _, environ["QUERY_STRING"] = path.partition("?")
    if cookie is not None:
        environ["HTTP_COOKIE"] = f"theme=dark; {NAME}={cookie}"
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started.extend([status, headers])

    body = b"".join(app(environ, start_response))
    status, headers = started

    def values(name: str) -> list[str]:
        return [value for key, value in headers if key.lower() == name]

    return Reply(status, body.decode(), values("set-cookie"), values("vary"))


def login(app: Any, user: str = "alice", cookie: str | None = None) -> str:
    return call(app, f"/login?user={user}", cookie).cookie()[0]


@pytest.fixture
def store(cluster: LocalCluster) -> Iterator[SessionStore]:
    with make_store(cluster, ttl=600) as store:
        yield store


@pytest.fixture
def app(store: SessionStore) -> SessionMiddleware:
    return SessionMiddleware(demo_app, store)


def test_login_request_logout_over_real_http(app: SessionMiddleware, store: SessionStore) -> None:
    with serve(app) as (host, port):

        def get(path: str, sid: str | None = None) -> tuple[bytes, list[str]]:
            connection = http.client.HTTPConnection(host, port, timeout=5)
            connection.request("GET", path, headers={"Cookie": f"{NAME}={sid}"} if sid else {})
            response = connection.getresponse()
            body = response.read()
            connection.close()
            return body, response.headers.get_all("Set-Cookie") or []

        _, headers = get("/login?user=alice")
        ((sid, _),) = cookies_named(headers, NAME)
        assert store.load(sid) == {"user": "alice"}
        body, headers = get("/whoami", sid)
        assert body == b"alice"
        assert cookies_named(headers, NAME)[0][0] == sid  # refreshed, same id
        _, headers = get("/logout", sid)
        assert cookies_named(headers, NAME) == [("", cookies_named(headers, NAME)[0][1])]
        assert cookies_named(headers, NAME)[0][1]["max-age"] == "0"
        assert store.load(sid) is None
    assert call(app, "/whoami", sid).body == ""


def test_request_that_never_reads_the_session_costs_no_round_trip(
    app: SessionMiddleware, cluster: LocalCluster
) -> None:
    sid = login(app)
    before = gets_served(cluster)
    reply = call(app, "/static", sid)
    assert reply.body == "/static"
    assert reply.set_cookies == []
    assert reply.vary == []
    assert gets_served(cluster) == before
    reply = call(app, "/whoami", sid)
    assert reply.body == "alice"
    assert reply.vary == ["Cookie"]
    assert gets_served(cluster) > before


def test_unchanged_session_is_touched_not_rewritten(
    store: SessionStore, cluster: LocalCluster
) -> None:
    sid = login(SessionMiddleware(demo_app, store, max_age=100))
    version = version_of(store, sid)
    reply = call(SessionMiddleware(demo_app, store, max_age=5000), "/whoami", sid)
    assert reply.cookie()[1]["max-age"] == "5000"
    assert version_of(store, sid) == version
    for index in holders(cluster, store, sid):
        assert 4990 <= ttl_left(cluster, index, key_of(store, sid)) <= 5000


def test_no_refresh_leaves_cookie_and_lifetime_alone(
    store: SessionStore, cluster: LocalCluster
) -> None:
    sid = login(SessionMiddleware(demo_app, store, max_age=100))
    app = SessionMiddleware(demo_app, store, max_age=5000, refresh_each_request=False)
    reply = call(app, "/whoami", sid)
    assert reply.body == "alice"
    assert reply.set_cookies == []
    for index in holders(cluster, store, sid):
        assert ttl_left(cluster, index, key_of(store, sid)) <= 100


def test_login_regenerates_the_id_and_kills_the_old_one(
    app: SessionMiddleware, store: SessionStore
) -> None:
    visitor = call(app, "/count").cookie()[0]
    sid = login(app, cookie=visitor)
    assert sid != visitor
    assert store.load(visitor) is None
    assert store.load(sid) == {"count": 1, "user": "alice"}
    assert call(app, "/whoami", visitor).body == ""


@pytest.mark.parametrize("value", BAD_COOKIES.values(), ids=BAD_COOKIES.keys())
def test_bad_cookie_gets_a_fresh_session_and_never_reaches_memcached(
    app: SessionMiddleware, store: SessionStore, cluster: LocalCluster, value: str
) -> None:
    assert call(app, "/whoami", value).body == ""
    assert all_keys(cluster) == set()  # a fresh cluster: reading stored nothing
    sid = login(app, cookie=value)
    assert sid != value
    assert_only_key(cluster, store, sid)


def test_unknown_well_formed_id_is_not_adopted(app: SessionMiddleware, store: SessionStore) -> None:
    forged = store.new_id()
    sid = call(app, "/count", forged).cookie()[0]  # no regenerate() on this path
    assert sid != forged
    assert store.load(forged) is None


def test_default_cookie_attributes_are_safe(app: SessionMiddleware) -> None:
    _, attributes = call(app, "/count").cookie()
    assert attributes["httponly"] is True
    assert attributes["samesite"] == "Lax"
    assert attributes["path"] == "/"
    assert attributes["max-age"] == "600"  # the store's ttl
    assert "GMT" in str(attributes["expires"])
    assert "secure" not in attributes
    assert "domain" not in attributes


def test_configured_cookie_attributes(store: SessionStore) -> None:
    app = SessionMiddleware(
        demo_app, store, cookie_name="sid", secure=True, samesite="Strict",
        path="/app", domain="example.com", max_age=60, httponly=False,
    )  # fmt: skip
    (header,) = call(app, "/count").set_cookies
    assert header.startswith("sid=")
    assert "; Secure" in header
    assert "; SameSite=Strict" in header
    assert "; Path=/app" in header
    assert "; Domain=example.com" in header
    assert "; Max-Age=60;" in header
    assert "HttpOnly" not in header
    browser = SessionMiddleware(demo_app, store, cookie_name="sid", expire_at_browser_close=True)
    (header,) = call(browser, "/count").set_cookies
    assert "Max-Age" not in header
    assert "Expires" not in header


@pytest.mark.parametrize(
    "options",
    [{"cookie_name": "a b"}, {"path": "/;x"}, {"domain": "a\r\nb"}, {"samesite": "None"},
     {"samesite": "lax"}, {"max_age": 0}, {"max_age": -0.5}, {"max_age": math.nan},
     {"max_age": math.inf}],
)  # fmt: skip
def test_unsafe_options_are_refused(store: SessionStore, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each option names itself in the message
        SessionMiddleware(demo_app, store, **options)


def test_an_unknown_option_is_refused_by_name(store: SessionStore) -> None:
    with pytest.raises(TypeError, match="secrue"):
        SessionMiddleware(demo_app, store, secrue=True)  # type: ignore[call-arg]


def test_a_max_age_that_is_not_a_number_is_refused_by_name(store: SessionStore) -> None:
    for max_age in (True, "60"):
        with pytest.raises(TypeError, match="max_age"):
            SessionMiddleware(demo_app, store, max_age=max_age)  # type: ignore[arg-type]


@pytest.mark.parametrize(("max_age", "seconds"), [(0.5, 1), (2.1, 3)])
def test_a_fractional_max_age_is_rounded_up_in_the_cookie_and_the_store(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch, max_age: float, seconds: int
) -> None:
    # memcached reads exptime 0 as "never expires": 0.5 must not become 0 on the way.
    ttls: list[object] = []
    for method in ("save", "touch", "regenerate"):
        real = getattr(store, method)

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            ttls.append(kwargs["ttl"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(store, method, spy)
    app = SessionMiddleware(demo_app, store, max_age=max_age)
    visitor = call(app, "/count").cookie()[0]  # save
    sid = login(app, cookie=visitor)  # regenerate
    reply = call(app, "/whoami", sid)  # touch
    assert reply.cookie()[1]["max-age"] == str(seconds)
    assert len(ttls) >= 3  # regenerate() may save through save() too
    assert all(ttl == seconds and type(ttl) is int for ttl in ttls)


def test_user_stays_logged_in_while_a_server_is_killed(
    app: SessionMiddleware, store: SessionStore, cluster: LocalCluster
) -> None:
    sid = login(app)
    cluster.kill(holders(cluster, store, sid)[0])
    for expected in ("1", "2", "3"):
        assert call(app, "/count", sid).body == expected
    assert call(app, "/whoami", sid).body == "alice"


def test_logout_during_hang_stays_logged_out(
    app: SessionMiddleware, store: SessionStore, cluster: LocalCluster
) -> None:
    sid = login(app)
    hung = holders(cluster, store, sid)[0]
    cluster.hang(hung)
    started = time.monotonic()
    assert call(app, "/logout", sid).cookie()[1]["max-age"] == "0"
    assert time.monotonic() - started < 0.4  # the hung copy did not cost its timeout
    cluster.resume(hung)
    settle()
    for _ in range(3):
        assert call(app, "/whoami", sid).body == ""
    assert store.load(sid) is None


def test_every_copy_unreachable_raises_and_keeps_the_data(
    app: SessionMiddleware, store: SessionStore, cluster: LocalCluster
) -> None:
    sid = login(app)
    for server in cluster.servers:
        cluster.hang(server.index)
    with pytest.raises(NoServerAvailableError):
        call(app, "/count", sid)
    for server in cluster.servers:
        cluster.resume(server.index)
    settle()
    assert call(app, "/whoami", sid).body == "alice"
    assert store.load(sid) == {"user": "alice"}
    for server in cluster.servers:
        cluster.kill(server.index)
    with pytest.raises(NoServerAvailableError):
        call(app, "/whoami", sid)


def test_server_error_response_saves_nothing(app: SessionMiddleware, store: SessionStore) -> None:
    sid = login(app)
    reply = call(app, "/fail", sid)
    assert reply.status.startswith("500")
    assert reply.set_cookies == []
    assert store.load(sid) == {"user": "alice"}


def test_save_after_a_logout_elsewhere_is_dropped(store: SessionStore) -> None:
    def racing_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        session: Session = environ[ENVIRON_KEY]
        session["cart"] = ["book"]  # loads the session
        store.delete(session.sid or "")  # another request logs the user out meanwhile
        start_response("200 OK", [])
        return [b""]

    app = SessionMiddleware(demo_app, store)
    sid = login(app)
    reply = call(SessionMiddleware(racing_app, store), "/", sid)
    assert cookies_named(reply.set_cookies, NAME) == []  # the cookie is left alone
    assert store.load(sid) is None


def test_example_app_runs(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSESS_SAVE_PATH", cluster.dsn())
    example = runpy.run_path(str(EXAMPLES / "wsgi_app.py"))
    first = call(example["app"], "/")
    assert first.body == "visit 1\n"
    assert call(example["app"], "/", first.cookie()[0]).body == "visit 2\n"
    example["store"].close()
