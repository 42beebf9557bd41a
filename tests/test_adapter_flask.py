"""The Flask session interface on a real local cluster, through Flask's test
client and a real HTTP server: login/logout, faults, hostile cookies, session
fixation, cookie attributes, writes only when changed, outages."""

from __future__ import annotations

import http.client
import runpy
import time
from collections.abc import Iterator
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, cast

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
from flask import Flask, flash, get_flashed_messages, request, session
from flask.testing import FlaskClient
from markupsafe import Markup
from werkzeug.test import TestResponse

import memsess
from memsess import NoServerAvailableError, SessionStore
from memsess.adapters.flask import MemsessSession, MemsessSessionInterface, init_app
from memsess.testing import LocalCluster

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAME = "session"  # Flask's default SESSION_COOKIE_NAME


def make_app(store: SessionStore | None, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(TESTING=True, SECRET_KEY="only-for-flash", **config)
    init_app(app, store)

    @app.get("/login")
    def login() -> str:
        session["user"] = request.args["user"]
        session.permanent = request.args.get("remember") == "1"
        assert isinstance(session, MemsessSession)
        session.regenerate()
        return "ok"

    @app.get("/whoami")
    def whoami() -> str:
        return str(session.get("user", ""))

    @app.get("/logout")
    def logout() -> str:
        session.clear()
        return "bye"

    @app.get("/count")
    def count() -> str:
        session["count"] = session.get("count", 0) + 1
        return str(session["count"])

    @app.get("/static")
    def static_page() -> str:
        return "static"

    @app.get("/flash")
    def flash_message() -> str:
        flash(Markup("<b>saved</b>"), "info")
        return "flashed"

    @app.get("/flashes")
    def flashes() -> Any:
        # with_categories=True gives (category, message) pairs; the stub's union says both.
        messages = cast("list[tuple[str, str]]", get_flashed_messages(with_categories=True))
        return [[category, str(message)] for category, message in messages]

    return app


def set_cookies(response: TestResponse) -> list[str]:
    return response.headers.getlist("Set-Cookie")


def session_cookie(response: TestResponse) -> tuple[str, dict[str, str | bool]]:
    (found,) = cookies_named(set_cookies(response), NAME)
    return found


def raw_get(app: Flask, path: str, cookie: str) -> TestResponse:
    """A request carrying exactly ``session=<cookie>``, bypassing the cookie jar."""
    client = app.test_client(use_cookies=False)
    return client.get(path, environ_overrides={"HTTP_COOKIE": f"{NAME}={cookie}"})


def sid_of(client: FlaskClient) -> str:
    cookie = client.get_cookie(NAME)
    assert cookie is not None
    return cookie.value


@pytest.fixture
def store(cluster: LocalCluster) -> Iterator[SessionStore]:
    with make_store(cluster) as store:
        yield store


@pytest.fixture
def app(store: SessionStore) -> Flask:
    return make_app(store)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_login_request_logout(client: FlaskClient, store: SessionStore) -> None:
    assert client.get("/login?user=alice").text == "ok"
    sid = sid_of(client)
    assert store.load(sid) == {"user": "alice", "_permanent": False}
    assert client.get("/whoami").text == "alice"
    response = client.get("/logout")
    assert session_cookie(response)[0] == ""
    assert client.get_cookie(NAME) is None
    assert store.load(sid) is None
    assert client.get("/whoami").text == ""


def test_login_request_logout_over_real_http(app: Flask, store: SessionStore) -> None:
    app.config["TESTING"] = False
    with serve(app) as (host, port):

        def get(path: str, sid: str = "") -> tuple[str, list[str]]:
            connection = http.client.HTTPConnection(host, port, timeout=5)
            connection.request("GET", path, headers={"Cookie": f"{NAME}={sid}"})
            response = connection.getresponse()
            body = response.read().decode()
            connection.close()
            return body, response.headers.get_all("Set-Cookie") or []

        _, headers = get("/login?user=bob&remember=1")
        ((sid, attributes),) = cookies_named(headers, NAME)
        assert "expires" in attributes  # a permanent session's cookie outlives the browser
        assert get("/whoami", sid)[0] == "bob"
        _, headers = get("/logout", sid)
        assert cookies_named(headers, NAME)[0][0] == ""
        assert get("/whoami", sid) == ("", [])
    assert store.load(sid) is None


def test_request_that_never_reads_the_session_costs_nothing(
    client: FlaskClient, cluster: LocalCluster
) -> None:
    client.get("/login?user=alice")
    before = gets_served(cluster)
    response = client.get("/static")
    assert set_cookies(response) == []
    assert "Cookie" not in response.headers.get("Vary", "")
    assert gets_served(cluster) == before


def test_reading_does_not_rewrite(client: FlaskClient, store: SessionStore) -> None:
    client.get("/login?user=alice")
    sid = sid_of(client)
    version = version_of(store, sid)
    response = client.get("/whoami")
    assert set_cookies(response) == []  # not permanent: nothing to refresh
    assert "Cookie" in response.headers["Vary"]
    assert version_of(store, sid) == version
    client.get("/count")
    assert version_of(store, sid) > version


def test_refresh_each_request_touches_a_permanent_session(
    app: Flask, client: FlaskClient, store: SessionStore, cluster: LocalCluster
) -> None:
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(seconds=1000)
    client.get("/login?user=alice&remember=1")
    sid = sid_of(client)
    version = version_of(store, sid)
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(seconds=5000)
    response = client.get("/whoami")
    assert session_cookie(response)[0] == sid  # the cookie's Expires is refreshed
    assert version_of(store, sid) == version  # touched, not rewritten
    for index in holders(cluster, store, sid):
        assert 4990 <= ttl_left(cluster, index, key_of(store, sid)) <= 5000
    app.config.update(SESSION_REFRESH_EACH_REQUEST=False)
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(seconds=9000)
    assert set_cookies(client.get("/whoami")) == []
    assert ttl_left(cluster, holders(cluster, store, sid)[0], key_of(store, sid)) <= 5000


@pytest.mark.parametrize(("lifetime", "seconds"), [(0.5, 1), (2.1, 3), (3600, 3600)])
def test_session_lifetime_is_whole_seconds_rounded_up(
    app: Flask, lifetime: float, seconds: int
) -> None:
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(seconds=lifetime)
    assert MemsessSessionInterface.lifetime(app) == seconds


@pytest.mark.parametrize("lifetime", [timedelta(0), timedelta(seconds=-5), 0])
def test_a_lifetime_of_zero_or_less_is_refused_by_name(app: Flask, lifetime: Any) -> None:
    # Not quietly 1 second: the setting is wrong, and memcached would read 0 as "forever".
    app.config["PERMANENT_SESSION_LIFETIME"] = lifetime
    with pytest.raises(ValueError, match="PERMANENT_SESSION_LIFETIME"):
        MemsessSessionInterface.lifetime(app)


def test_login_regenerates_the_id_and_kills_the_old_one(
    client: FlaskClient, app: Flask, store: SessionStore
) -> None:
    client.get("/count")
    visitor = sid_of(client)
    client.get("/login?user=alice")
    sid = sid_of(client)
    assert sid != visitor
    assert store.load(visitor) is None
    assert store.load(sid) == {"count": 1, "user": "alice", "_permanent": False}
    assert raw_get(app, "/whoami", visitor).text == ""


@pytest.mark.parametrize("value", BAD_COOKIES.values(), ids=BAD_COOKIES.keys())
def test_bad_cookie_gets_a_fresh_session_and_never_reaches_memcached(
    app: Flask, store: SessionStore, cluster: LocalCluster, value: str
) -> None:
    assert raw_get(app, "/whoami", value).text == ""
    assert all_keys(cluster) == set()  # a fresh cluster: reading stored nothing
    sid = session_cookie(raw_get(app, "/count", value))[0]
    assert sid != value
    assert memsess.records.is_valid_id(sid)
    assert_only_key(cluster, store, sid)


def test_unknown_well_formed_id_is_not_adopted(app: Flask, store: SessionStore) -> None:
    forged = store.new_id()
    sid = session_cookie(raw_get(app, "/count", forged))[0]
    assert sid != forged
    assert store.load(forged) is None


def test_default_cookie_attributes_are_safe(client: FlaskClient) -> None:
    value, attributes = session_cookie(client.get("/count"))
    assert len(value) == 43
    assert attributes["httponly"] is True
    assert attributes["samesite"] == "Lax"  # Flask's own default would send none
    assert attributes["path"] == "/"
    assert "secure" not in attributes
    assert "domain" not in attributes
    assert "expires" not in attributes  # not permanent: a browser-session cookie
    _, permanent = session_cookie(client.get("/login?user=alice&remember=1"))
    assert "expires" in permanent


def test_configured_cookie_attributes(store: SessionStore) -> None:
    app = make_app(
        store,
        SESSION_COOKIE_NAME="sid",
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_PATH="/app",
        SESSION_COOKIE_DOMAIN="example.com",
        SESSION_COOKIE_PARTITIONED=True,
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=60),
    )
    response = app.test_client().get("/login?user=alice&remember=1")
    ((_, attributes),) = cookies_named(set_cookies(response), "sid")
    assert attributes["secure"] is True
    assert attributes["samesite"] == "Strict"
    assert attributes["path"] == "/app"
    assert attributes["domain"] == "example.com"
    assert attributes["partitioned"] is True
    expires = parsedate_to_datetime(str(attributes["expires"])).timestamp()
    assert time.time() + 55 < expires < time.time() + 65  # PERMANENT_SESSION_LIFETIME


def test_emptied_session_deletes_copies_and_cookie(
    client: FlaskClient, store: SessionStore
) -> None:
    client.get("/count")
    sid = sid_of(client)
    _, attributes = session_cookie(client.get("/logout"))
    assert attributes["expires"] == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert store.load(sid) is None


def test_flash_messages_round_trip(client: FlaskClient) -> None:
    client.get("/flash")
    assert client.get("/flashes").json == [["info", "<b>saved</b>"]]
    assert client.get("/flashes").json == []


def test_user_stays_logged_in_while_a_server_is_killed(
    client: FlaskClient, store: SessionStore, cluster: LocalCluster
) -> None:
    client.get("/login?user=alice")
    cluster.kill(holders(cluster, store, sid_of(client))[0])
    for expected in ("1", "2", "3"):
        assert client.get("/count").text == expected
    assert client.get("/whoami").text == "alice"


def test_logout_during_hang_stays_logged_out(
    client: FlaskClient, app: Flask, store: SessionStore, cluster: LocalCluster
) -> None:
    client.get("/login?user=alice")
    sid = sid_of(client)
    hung = holders(cluster, store, sid)[0]
    cluster.hang(hung)
    client.get("/logout")
    cluster.resume(hung)
    settle()
    for _ in range(3):
        assert raw_get(app, "/whoami", sid).text == ""
    assert store.load(sid) is None


def test_every_copy_unreachable_raises_and_keeps_the_data(
    client: FlaskClient, app: Flask, store: SessionStore, cluster: LocalCluster
) -> None:
    client.get("/login?user=alice")
    sid = sid_of(client)
    for server in cluster.servers:
        cluster.hang(server.index)
    with pytest.raises(NoServerAvailableError):
        client.get("/count")
    for server in cluster.servers:
        cluster.resume(server.index)
    settle()
    assert client.get("/whoami").text == "alice"
    assert store.load(sid) == {"user": "alice", "_permanent": False}


def test_outage_can_be_answered_by_an_error_handler(
    client: FlaskClient, app: Flask, cluster: LocalCluster
) -> None:
    @app.errorhandler(memsess.ClusterError)
    def unavailable(error: memsess.ClusterError) -> tuple[str, int]:
        return type(error).__name__, 503

    client.get("/login?user=alice")
    for server in cluster.servers:
        cluster.kill(server.index)
    response = client.get("/whoami")
    assert (response.status_code, response.text) == (503, "NoServerAvailableError")
    assert set_cookies(response) == []


def test_save_after_a_logout_elsewhere_is_dropped(
    client: FlaskClient, app: Flask, store: SessionStore
) -> None:
    @app.get("/race")
    def race() -> str:
        session["cart"] = ["book"]  # loads the session
        store.delete(sid_of(client))  # another request logs the user out meanwhile
        return "added"

    client.get("/login?user=alice")
    sid = sid_of(client)
    response = client.get("/race")
    assert "Set-Cookie" not in response.headers  # the cookie is left alone
    assert store.load(sid) is None


def test_init_app_builds_the_store_from_config(cluster: LocalCluster) -> None:
    app = Flask(__name__)
    app.config.update(
        MEMSESS_SAVE_PATH=cluster.dsn(timeout=0.5),
        MEMSESS_REDUNDANCY=3,
        MEMSESS_KEY_PREFIX="app1:",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=1),
    )
    interface = init_app(app)
    store = app.extensions["memsess"]
    assert isinstance(interface, MemsessSessionInterface)
    assert app.session_interface is interface
    assert (store.redundancy, store.ttl, store.key_prefix) == (3, 3600, "app1:")
    with pytest.raises(RuntimeError, match="MEMSESS_SAVE_PATH"):
        init_app(Flask(__name__))


def test_example_app_runs(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSESS_SAVE_PATH", cluster.dsn())
    app = runpy.run_path(str(EXAMPLES / "flask_app.py"))["app"]
    client = app.test_client()
    assert client.get("/login/alice").text == "logged in as alice\n"
    assert client.get("/").text == "alice, visit 1\n"
    assert client.get("/logout").text == "logged out\n"
    assert client.get("/").text == "anonymous, visit 1\n"
    app.extensions["memsess"].close()


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("MEMSESS_REDUNDANCE", "did you mean 'MEMSESS_REDUNDANCY'?"),
        ("MEMSESS_TIMEOUTS", "did you mean 'MEMSESS_TIMEOUT'?"),
        ("MEMSESS_TTL", "PERMANENT_SESSION_LIFETIME"),
    ],
)
def test_a_misspelt_or_guessed_key_is_refused_naming_the_known_ones(
    cluster: LocalCluster, store: SessionStore, key: str, hint: str
) -> None:
    for given in (None, store):  # built from the config, or given: the config is read anyway
        app = Flask(__name__)
        app.config.update({"MEMSESS_SAVE_PATH": cluster.dsn(), key: 2})
        with pytest.raises(ValueError, match=key) as refused:
            init_app(app, given)
        assert hint in str(refused.value)
        assert "MEMSESS_SAVE_PATH, MEMSESS_REDUNDANCY" in str(refused.value)
        assert "memsess" not in app.extensions


def test_timeout_and_retry_interval_set_the_entries_without_their_own(
    cluster: LocalCluster,
) -> None:
    first, *others = cluster.dsn().split(", ")
    app = Flask(__name__)
    app.config.update(
        MEMSESS_SAVE_PATH=", ".join([f"{first}?timeout=0.75&retry_interval=4", *others]),
        MEMSESS_TIMEOUT=0.25,
        MEMSESS_RETRY_INTERVAL=3,
    )
    init_app(app)
    with app.extensions["memsess"] as store:
        servers = store._cluster.servers
        assert [(server.timeout, server.retry_interval) for server in servers] == [
            (0.75, 4),
            (0.25, 3),
            (0.25, 3),
        ]


def test_a_list_of_servers_is_a_save_path(cluster: LocalCluster) -> None:
    app = make_app(store=None, MEMSESS_SAVE_PATH=cluster.dsn().split(", "), MEMSESS_REDUNDANCY=3)
    client = app.test_client()
    client.get("/login?user=alice")
    with app.extensions["memsess"] as store:
        assert holders(cluster, store, sid_of(client)) == [0, 1, 2]
        assert client.get("/whoami").text == "alice"


@pytest.mark.parametrize(
    ("save_path", "error"),
    [
        (11211, TypeError),
        ({"tcp://127.0.0.1:11211"}, TypeError),  # a set has no order: not a list of servers
        ("tcp://127.0.0.1:0", memsess.DSNError),
        (["tcp://127.0.0.1:11211", "tcp://127.0.0.1:0"], memsess.DSNError),
    ],
)
def test_a_bad_save_path_names_the_setting(save_path: object, error: type[Exception]) -> None:
    app = Flask(__name__)
    app.config["MEMSESS_SAVE_PATH"] = save_path
    with pytest.raises(error, match=r"^MEMSESS_SAVE_PATH: "):
        init_app(app)
