"""The Django backend: Django's own backend suite (SessionTestsMixin, from the
sdist of the installed Django), then a real app through Django's test clients on
a real local cluster: login/logout, faults, hostile cookies, fixation, cookie
attributes, outages, settings."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import django_settings
import django_urls
import pytest
from adapter_support import (
    BAD_COOKIES,
    RETRY_INTERVAL,
    TIMEOUT,
    all_keys,
    assert_only_key,
    holders,
    key_of,
    settle,
    ttl_left,
    version_of,
)
from django.contrib.sessions.backends.base import UpdateError
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client, SimpleTestCase, override_settings
from django.urls import path

import memsess
from memsess.adapters.django import SessionStore, get_async_store, get_store
from memsess.testing import LocalCluster

django_settings.setup()  # downloads Django's sdist on first use; a failure is an error
SessionTestsMixin: Any = importlib.import_module("sessions_tests.tests").SessionTestsMixin
NAME = "sessionid"  # Django's default SESSION_COOKIE_NAME
F = TypeVar("F", bound=Callable[..., Any])


def with_settings(**settings: Any) -> Callable[[F], F]:
    """Django's ``override_settings`` as a test's decorator, typed (Django ships no types)."""
    decorate: Callable[[F], F] = override_settings(**settings)
    return decorate


#: The store operations, the same names on the blocking and the async store.
OPERATIONS = ("fetch", "load", "save", "touch", "delete", "regenerate")


def memsess_setting(cluster: LocalCluster, **options: Any) -> dict[str, Any]:
    dsn = cluster.dsn(timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)
    return {"SAVE_PATH": dsn, "REDUNDANCY": 2, **options}


@pytest.fixture(scope="module")
def suite_cluster() -> Iterator[None]:
    with LocalCluster(3) as cluster, override_settings(SESSION_MEMSESS=memsess_setting(cluster)):
        yield


@pytest.fixture
def store_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[str, int]]]:
    """Every store operation the test makes, as (name, thread id), by driver:
    ``{"sync": [...], "async": [...]}``."""
    calls: dict[str, list[tuple[str, int]]] = {"sync": [], "async": []}

    def spy(method: Callable[..., Any], name: str) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            calls["sync"].append((name, threading.get_ident()))
            return method(*args, **kwargs)

        return record

    def aspy(method: Callable[..., Awaitable[Any]], name: str) -> Callable[..., Awaitable[Any]]:
        async def record(*args: Any, **kwargs: Any) -> Any:
            calls["async"].append((name, threading.get_ident()))
            return await method(*args, **kwargs)

        return record

    for name in OPERATIONS:
        monkeypatch.setattr(
            memsess.SessionStore, name, spy(getattr(memsess.SessionStore, name), name)
        )
        async_method = getattr(memsess.AsyncSessionStore, name)
        monkeypatch.setattr(memsess.AsyncSessionStore, name, aspy(async_method, name))
    return calls


@pytest.mark.usefixtures("suite_cluster")
class MemsessDjangoSuite(SessionTestsMixin, SimpleTestCase):  # type: ignore[misc]
    """Django's own 65 sync and async backend tests, unchanged, on memsess: its 28
    async tests on the async store only, its sync tests on the blocking store only."""

    backend = SessionStore

    @pytest.fixture(autouse=True)
    def _one_driver_per_test(self, store_calls: dict[str, list[tuple[str, int]]]) -> Iterator[None]:
        test = getattr(type(self), self._testMethodName)
        yield
        if inspect.iscoroutinefunction(test):
            # Only the mixin's own cleanup, addCleanup(self.session.delete), is sync.
            assert [name for name, _ in store_calls["sync"]] in ([], ["delete"])
        else:
            assert store_calls["async"] == []


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(3) as local, override_settings(SESSION_MEMSESS=memsess_setting(local)):
        yield local


@pytest.fixture
def store(cluster: LocalCluster) -> memsess.SessionStore:
    return get_store()


def sid_of(response: HttpResponse) -> str:
    return str(response.cookies[NAME].value)


def get(path: str, cookie: str | None = None) -> HttpResponse:
    """One request carrying exactly ``sessionid=<cookie>`` (no cookie jar)."""
    extra = {} if cookie is None else {"HTTP_COOKIE": f"{NAME}={cookie}"}
    response: HttpResponse = Client().get(path, **extra)
    return response


def test_login_request_logout(cluster: LocalCluster, store: memsess.SessionStore) -> None:
    client = Client()
    sid = sid_of(client.get("/login?user=alice"))
    assert store.load(sid) == {"user": "alice"}
    assert client.get("/whoami").content == b"alice"
    response = client.get("/logout")
    assert response.cookies[NAME].value == ""
    assert store.load(sid) is None
    assert client.get("/whoami").content == b""


def test_async_views_use_the_async_methods(cluster: LocalCluster) -> None:
    async def visit() -> list[bytes]:
        client = AsyncClient()
        return [(await client.get("/acount")).content for _ in range(3)]

    assert asyncio.run(visit()) == [b"1", b"2", b"3"]


# -- async: views on AsyncClient, the methods on the event loop, faults -----------------


async def alogin(request: HttpRequest) -> HttpResponse:
    await request.session.acycle_key()  # what django.contrib.auth.alogin() does
    await request.session.aset("user", request.GET["user"])
    return HttpResponse("ok")


async def awhoami(request: HttpRequest) -> HttpResponse:
    return HttpResponse(await request.session.aget("user", ""))


async def alogout(request: HttpRequest) -> HttpResponse:
    await request.session.aflush()  # what django.contrib.auth.alogout() does
    return HttpResponse("bye")


# ROOT_URLCONF for the async tests: the app's URLs and these async views.
urlpatterns = [
    *django_urls.urlpatterns,
    path("alogin", alogin),
    path("awhoami", awhoami),
    path("alogout", alogout),
]
async_urls = with_settings(ROOT_URLCONF=__name__)


@async_urls
def test_async_login_counter_logout(
    cluster: LocalCluster,
    store: memsess.SessionStore,
    store_calls: dict[str, list[tuple[str, int]]],
) -> None:
    # The views load, cycle and flush on the async store; Django's SessionMiddleware
    # (5.2) still saves at the end of the request with the sync save(), in its thread.
    async def visit() -> tuple[str, str, list[bytes]]:
        client = AsyncClient()
        visitor = sid_of(await client.get("/acount"))
        sid = sid_of(await client.get("/alogin?user=alice"))
        seen = [(await client.get(path)).content for path in ("/acount", "/acount", "/awhoami")]
        response = await client.get("/alogout")
        assert response.cookies[NAME].value == ""
        seen.append((await client.get("/awhoami")).content)
        return visitor, sid, seen

    visitor, sid, seen = asyncio.run(visit())
    assert seen == [b"2", b"3", b"alice", b""]
    assert sid != visitor
    assert store.load(visitor) is None  # cycled away at login
    assert store.load(sid) is None  # logged out
    assert get("/whoami", sid).content == b""
    assert {"fetch", "regenerate", "delete"} <= {name for name, _ in store_calls["async"]}


def test_async_methods_run_on_the_event_loop_without_the_blocking_store(
    cluster: LocalCluster, store_calls: dict[str, list[tuple[str, int]]]
) -> None:
    async def session_life() -> int:
        session = SessionStore()
        await session.aset("user", "alice")
        await session.asave()
        key = session.session_key
        assert await session.aexists(key)
        again = SessionStore(key)
        assert await again.aget("user") == "alice"
        await again.acycle_key()
        assert not await again.aexists(key)
        await again.aset("cart", ["book"])
        await again.asave()
        await again.aflush()
        return threading.get_ident()

    threads_before = threading.active_count()
    loop_thread = asyncio.run(session_life())
    assert store_calls["sync"] == []
    assert {name for name, _ in store_calls["async"]} >= {"fetch", "load", "save", "regenerate"}
    assert {thread for _, thread in store_calls["async"]} == {loop_thread}
    assert threading.active_count() == threads_before  # no executor was started either


def test_async_save_after_a_logout_elsewhere_raises_update_error(
    cluster: LocalCluster, store: memsess.SessionStore
) -> None:
    async def race() -> str:
        session = SessionStore()
        await session.aset("user", "alice")
        await session.asave()
        request = SessionStore(session.session_key)
        await request.aset("cart", ["book"])  # this request loaded the session...
        await SessionStore(session.session_key).adelete()  # ...another logged out
        with pytest.raises(UpdateError):
            await request.asave()
        assert await SessionStore(session.session_key).aload() == {}
        return str(session.session_key)

    sid = asyncio.run(race())
    assert store.load(sid) is None
    assert len(holders(cluster, store, sid)) == 2  # the tombstones stayed


def test_sync_and_async_requests_share_one_health_table(
    cluster: LocalCluster, store: memsess.SessionStore
) -> None:
    sid = sid_of(Client().get("/login?user=alice"))
    down = holders(cluster, store, sid)[0]
    cluster.kill(down)

    async def load() -> Any:
        return await SessionStore(sid).aget("user")

    assert asyncio.run(load()) == "alice"  # the async store meets the dead server...
    states = {status.address: status.state for status in store.health()}
    assert states[cluster.servers[down].address] == "down"  # ...and the sync store knows
    assert get_async_store().health()[down].state == "down"


@async_urls
def test_users_stay_logged_in_while_a_server_is_killed_during_async_traffic(
    cluster: LocalCluster, store: memsess.SessionStore
) -> None:
    users, rounds = 8, 6
    halfway = asyncio.Event()

    async def user(name: str) -> tuple[str, list[bytes]]:
        client = AsyncClient()
        sid = sid_of(await client.get(f"/alogin?user={name}"))
        counts = []
        for done in range(rounds):
            counts.append((await client.get("/acount")).content)
            if done == rounds // 2:
                halfway.set()
        counts.append((await client.get("/awhoami")).content)
        return sid, counts

    async def traffic() -> list[tuple[str, list[bytes]]]:
        async def kill_at_halfway() -> None:
            await halfway.wait()  # the first user halfway, the others in flight
            cluster.kill(1)

        every_user = asyncio.gather(*(user(f"u{i}") for i in range(users)))
        results, _ = await asyncio.gather(every_user, kill_at_halfway())
        return results

    results = asyncio.run(traffic())
    expected = [str(n).encode() for n in range(1, rounds + 1)]
    for index, (sid, counts) in enumerate(results):
        assert counts == [*expected, f"u{index}".encode()]
        assert store.load(sid) == {"user": f"u{index}", "count": rounds}
    killed = cluster.servers[1].address
    assert any(killed in store.locate(sid) for sid, _ in results)  # it held some copies


def test_request_that_never_reads_the_session_writes_nothing(
    cluster: LocalCluster, store: memsess.SessionStore
) -> None:
    client = Client()
    sid = sid_of(client.get("/login?user=alice"))
    version = version_of(store, sid)
    assert NAME not in client.get("/static").cookies
    assert NAME not in client.get("/whoami").cookies
    assert version_of(store, sid) == version


@with_settings(SESSION_SAVE_EVERY_REQUEST=True)
def test_save_every_request_rewrites(cluster: LocalCluster, store: memsess.SessionStore) -> None:
    client = Client()
    sid = sid_of(client.get("/login?user=alice"))
    version = version_of(store, sid)
    assert sid_of(client.get("/whoami")) == sid
    assert version_of(store, sid) > version


def test_login_cycles_the_key_and_kills_the_old_one(
    cluster: LocalCluster, store: memsess.SessionStore
) -> None:
    client = Client()
    visitor = sid_of(client.get("/count"))
    sid = sid_of(client.get("/login?user=alice"))
    assert sid != visitor
    assert store.load(visitor) is None
    assert store.load(sid) == {"count": 1, "user": "alice"}
    assert get("/whoami", visitor).content == b""


@pytest.mark.parametrize("value", BAD_COOKIES.values(), ids=BAD_COOKIES.keys())
def test_bad_cookie_gets_a_fresh_session_and_never_reaches_memcached(
    cluster: LocalCluster, store: memsess.SessionStore, value: str
) -> None:
    assert get("/whoami", value).content == b""
    assert all_keys(cluster) == set()  # a fresh cluster: reading stored nothing
    sid = sid_of(get("/count", value))
    assert sid != value
    assert memsess.records.is_valid_id(sid)
    assert_only_key(cluster, store, sid)


def test_django_style_key_is_not_adopted(
    cluster: LocalCluster, store: memsess.SessionStore
) -> None:
    for forged in ("a" * 32, store.new_id()):  # Django's own key format, an unknown memsess id
        sid = sid_of(get("/count", forged))
        assert sid != forged
        assert store.load(forged) is None


def test_default_cookie_attributes_are_safe(cluster: LocalCluster) -> None:
    cookie = Client().get("/count").cookies[NAME]
    assert len(cookie.value) == 43
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"
    assert cookie["path"] == "/"
    assert cookie["max-age"] == 1209600  # SESSION_COOKIE_AGE, two weeks
    assert cookie["expires"].endswith("GMT")
    assert not cookie["secure"]
    assert not cookie["domain"]


@with_settings(
    SESSION_COOKIE_SECURE=True,
    SESSION_COOKIE_SAMESITE="Strict",
    SESSION_COOKIE_PATH="/app",
    SESSION_COOKIE_DOMAIN="example.com",
    SESSION_COOKIE_AGE=60,
)
def test_configured_cookie_attributes(cluster: LocalCluster) -> None:
    cookie = Client().get("/count").cookies[NAME]
    store = get_store()  # the fixture's store was built before this override
    assert cookie["secure"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/app"
    assert cookie["domain"] == "example.com"
    assert cookie["max-age"] == 60
    for index in holders(cluster, store, cookie.value):  # the lifetime in memcached too
        assert 55 <= ttl_left(cluster, index, key_of(store, cookie.value)) <= 60


@pytest.mark.parametrize(("age", "seconds"), [(0.5, 1), (2.1, 3), (60, 60)])
def test_store_ttl_is_session_cookie_age_rounded_up_to_whole_seconds(
    cluster: LocalCluster, age: float, seconds: int
) -> None:
    # The store's ttl is what regenerate() (cycle_key, at login) writes with: 0.5 must not
    # reach memcached as exptime 0, "never expires".
    with override_settings(SESSION_COOKIE_AGE=age):
        ttl = get_store().ttl
    assert (ttl, type(ttl)) == (seconds, int)


@pytest.mark.parametrize("age", [0, -1, float("nan")])
def test_a_session_cookie_age_of_zero_or_less_is_refused_by_name(
    cluster: LocalCluster, age: float
) -> None:
    with (
        override_settings(SESSION_COOKIE_AGE=age),
        pytest.raises(ValueError, match="SESSION_COOKIE_AGE"),
    ):
        get_store()


def test_a_fractional_expiry_age_is_written_as_whole_seconds_rounded_up(
    cluster: LocalCluster, store: memsess.SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttls: list[object] = []
    real_save = store.save

    def spy(*args: Any, **kwargs: Any) -> None:
        ttls.append(kwargs["ttl"])
        real_save(*args, **kwargs)

    monkeypatch.setattr(store, "save", spy)
    session = SessionStore()
    session["n"] = 1
    session.set_expiry(1.5)
    session.save()
    assert ttls == [2]
    assert type(ttls[0]) is int


@with_settings(SESSION_EXPIRE_AT_BROWSER_CLOSE=True)
def test_expire_at_browser_close(cluster: LocalCluster) -> None:
    cookie = Client().get("/count").cookies[NAME]
    assert not cookie["max-age"]
    assert not cookie["expires"]


def test_user_stays_logged_in_while_a_server_is_killed(
    cluster: LocalCluster, store: memsess.SessionStore
) -> None:
    client = Client()
    sid = sid_of(client.get("/login?user=alice"))
    cluster.kill(holders(cluster, store, sid)[0])
    assert [client.get("/count").content for _ in range(3)] == [b"1", b"2", b"3"]
    assert client.get("/whoami").content == b"alice"


def test_logout_during_hang_stays_logged_out(
    cluster: LocalCluster, store: memsess.SessionStore
) -> None:
    client = Client()
    sid = sid_of(client.get("/login?user=alice"))
    hung = holders(cluster, store, sid)[0]
    cluster.hang(hung)
    client.get("/logout")
    cluster.resume(hung)
    settle()
    for _ in range(3):
        assert get("/whoami", sid).content == b""
    assert store.load(sid) is None


def test_every_copy_unreachable_raises_and_keeps_the_data(
    cluster: LocalCluster, store: memsess.SessionStore
) -> None:
    client = Client()
    sid = sid_of(client.get("/login?user=alice"))
    for server in cluster.servers:
        cluster.hang(server.index)
    with pytest.raises(memsess.NoServerAvailableError):
        client.get("/count")
    for server in cluster.servers:
        cluster.resume(server.index)
    settle()
    assert client.get("/whoami").content == b"alice"
    assert store.load(sid) == {"user": "alice"}
    for server in cluster.servers:
        cluster.kill(server.index)
    with pytest.raises(memsess.NoServerAvailableError):
        client.get("/whoami")


@with_settings(
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django_urls.SessionOutageMiddleware",
    ]
)
def test_outage_can_be_answered_by_a_middleware(cluster: LocalCluster) -> None:
    client = Client()
    client.get("/login?user=alice")
    for server in cluster.servers:
        cluster.kill(server.index)
    response = client.get("/whoami")
    assert response.status_code == 503
    assert NAME not in response.cookies


def test_save_after_a_logout_elsewhere_is_interrupted(
    cluster: LocalCluster, store: memsess.SessionStore
) -> None:
    client = Client()
    sid = sid_of(client.get("/login?user=alice"))
    response = client.get("/race")
    assert response.status_code == 400  # Django's SessionInterrupted
    assert NAME not in response.cookies
    assert store.load(sid) is None


def test_missing_or_unknown_settings_are_improperly_configured(cluster: LocalCluster) -> None:
    with override_settings(SESSION_MEMSESS=None), pytest.raises(ImproperlyConfigured):
        get_store()
    with (
        override_settings(SESSION_MEMSESS={"SAVE_PATH": "tcp://127.0.0.1:1", "REDUNDANCE": 2}),
        pytest.raises(ImproperlyConfigured, match="REDUNDANCE") as refused,
    ):
        get_store()
    assert "did you mean 'REDUNDANCY'?" in str(refused.value)
    assert "SAVE_PATH, REDUNDANCY, SERIALIZER" in str(refused.value)  # the known keys
    with (
        override_settings(SESSION_MEMSESS={"SAVE_PATH": "tcp://127.0.0.1:1", "TTL": 60}),
        pytest.raises(ImproperlyConfigured, match="SESSION_COOKIE_AGE"),
    ):
        get_store()


def test_a_list_of_servers_is_a_save_path(cluster: LocalCluster) -> None:
    servers = cluster.dsn(timeout=TIMEOUT).split(", ")
    with override_settings(SESSION_MEMSESS={"SAVE_PATH": servers, "REDUNDANCY": 3}):
        store = get_store()
        assert get_store() is store  # one store for the configuration, lists and all
        session = SessionStore()
        session["user"] = "alice"
        session.save()
        assert holders(cluster, store, session.session_key) == [0, 1, 2]
        assert SessionStore(session.session_key).load() == {"user": "alice"}


def test_timeout_and_retry_interval_set_the_entries_without_their_own(
    cluster: LocalCluster,
) -> None:
    first, *others = cluster.dsn().split(", ")
    setting = {
        "SAVE_PATH": ", ".join([f"{first}?timeout=0.75&retry_interval=4", *others]),
        "TIMEOUT": 0.25,
        "RETRY_INTERVAL": 3,
    }
    with override_settings(SESSION_MEMSESS=setting):
        servers = get_store()._cluster.servers
        assert [(server.timeout, server.retry_interval) for server in servers] == [
            (0.75, 4),
            (0.25, 3),
            (0.25, 3),
        ]


@pytest.mark.parametrize(
    "save_path",
    [11211, "tcp://127.0.0.1:0", ["tcp://127.0.0.1:11211", "tcp://127.0.0.1:0"]],
)
def test_a_bad_save_path_is_improperly_configured_naming_it(save_path: object) -> None:
    with (
        override_settings(SESSION_MEMSESS={"SAVE_PATH": save_path}),
        pytest.raises(ImproperlyConfigured, match=r'^SESSION_MEMSESS\["SAVE_PATH"\]: '),
    ):
        get_store()


def test_one_store_per_process_and_configuration(cluster: LocalCluster) -> None:
    seen: list[memsess.SessionStore] = []
    threads = [threading.Thread(target=lambda: seen.append(get_store())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(store) for store in seen}) == 1
    with override_settings(SESSION_MEMSESS=memsess_setting(cluster, SERIALIZER="json")):
        assert get_store() is not seen[0]
        assert get_store().serializer.name == "json"


def test_example_project_runs(cluster: LocalCluster) -> None:
    project = Path(__file__).resolve().parent.parent / "examples" / "django_project"
    script = (
        "from django.test import Client; c = Client(HTTP_HOST='localhost');"
        "print(c.get('/').content + c.get('/').content)"
    )
    result = subprocess.run(
        [sys.executable, str(project / "manage.py"), "shell", "-c", script],
        env={**os.environ, "MEMSESS_SAVE_PATH": cluster.dsn()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.strip().splitlines()[-1:] == [repr(b"visit 1\nvisit 2\n")], result.stderr
