"""The Litestar adapter: MemsessStore's store contract on a real local cluster, then an
app with server-side sessions (MemsessSessionConfig, and Litestar's own
ServerSideSessionConfig) through Litestar's TestClient and a real uvicorn server:
login/logout, counters, hostile cookies, faults, expiry and renewal, outages."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
from adapter_support import (
    BAD_COOKIES,
    RETRY_INTERVAL,
    TIMEOUT,
    all_keys,
    holders,
    key_of,
    make_store,
    serve_asgi,
    settle,
    ttl_left,
)
from litestar import Litestar, MediaType, Request, Response, get
from litestar.middleware.session.server_side import ServerSideSessionConfig
from litestar.testing import TestClient

import memsess
from memsess.adapters.litestar import MemsessSessionConfig, MemsessStore
from memsess.records import is_valid_id
from memsess.testing import LocalCluster

NAME = "session"  # Litestar's default cookie name
AnyRequest = Request[Any, Any, Any]
Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture
def inspector(cluster: LocalCluster) -> Iterator[memsess.SessionStore]:
    """A blocking store on the same cluster and key prefix, to look at the copies."""
    with make_store(cluster) as store:
        yield store


@pytest.fixture
def store(cluster: LocalCluster) -> Iterator[MemsessStore]:
    dsn = cluster.dsn(timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)
    store = MemsessStore.from_dsn(dsn, redundancy=2)
    yield store
    asyncio.run(store.store.aclose())


@pytest.fixture
def run(store: MemsessStore) -> Run:
    """``asyncio.run``, closing the connections the store opened on that loop."""

    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        async def and_close() -> Any:
            try:
                return await coroutine
            finally:
                await store.store.aclose()

        return asyncio.run(and_close())

    return run


def derived_keys(store: MemsessStore, inspector: memsess.SessionStore, *keys: str) -> set[bytes]:
    return {key_of(inspector, store.memsess_id(key)) for key in keys}


def stored_keys(cluster: LocalCluster) -> set[bytes]:
    return {key for _, key in all_keys(cluster)}


# -- the store contract ---------------------------------------------------------------


def test_values_round_trip_as_bytes_in_two_copies_under_derived_keys(
    cluster: LocalCluster,
    store: MemsessStore,
    inspector: memsess.SessionStore,
    run: Run,
) -> None:
    async def scenario() -> list[Any]:
        await store.set("a", b"\x00\xffbytes", expires_in=60)
        await store.set("b", "text é")
        return [await store.get("a"), await store.get("b"), await store.get("c")]

    assert run(scenario()) == [b"\x00\xffbytes", "text é".encode(), None]
    for key in ("a", "b"):
        sid = store.memsess_id(key)
        assert is_valid_id(sid)
        assert len(holders(cluster, inspector, sid)) == 2
    assert stored_keys(cluster) <= derived_keys(store, inspector, "a", "b")
    assert run(store.exists("a")) is True
    assert run(store.exists("c")) is False


@pytest.mark.parametrize("key", BAD_COOKIES.values(), ids=BAD_COOKIES.keys())
def test_any_key_is_safe_and_never_reaches_memcached(
    cluster: LocalCluster,
    store: MemsessStore,
    inspector: memsess.SessionStore,
    key: str,
    run: Run,
) -> None:
    async def scenario() -> tuple[bytes | None, bytes | None]:
        await store.set(key, b"v", expires_in=60)
        found = await store.get(key)
        await store.delete(key)
        return found, await store.get(key)

    assert run(scenario()) == (b"v", None)
    assert stored_keys(cluster) <= derived_keys(store, inspector, key)
    for server in cluster.servers:
        assert cluster.get_raw(server.index, b"injected") is None


def test_namespaces_keep_the_same_key_apart(store: MemsessStore, run: Run) -> None:
    first, second = store.with_namespace("a"), store.with_namespace("b")
    nested = first.with_namespace("x")
    assert (nested.namespace, nested.store) == ("a_x", store.store)

    async def scenario() -> list[bytes | None]:
        await first.set("k", b"1", expires_in=60)
        await second.set("k", b"2", expires_in=60)
        return [await first.get("k"), await second.get("k"), await store.get("k")]

    assert run(scenario()) == [b"1", b"2", None]
    assert len({store.memsess_id("k"), first.memsess_id("k"), nested.memsess_id("k")}) == 3


def test_expiry_is_each_copys_lifetime_and_get_renews_it(
    cluster: LocalCluster,
    store: MemsessStore,
    inspector: memsess.SessionStore,
    run: Run,
) -> None:
    def lifetimes(key: str) -> list[int]:
        sid = store.memsess_id(key)
        copies = holders(cluster, inspector, sid)
        assert len(copies) == 2
        return [ttl_left(cluster, index, key_of(inspector, sid)) for index in copies]

    async def set_values() -> list[int | None]:
        await store.set("session", b"s", expires_in=timedelta(minutes=1))
        await store.set("forever", b"f")  # no expiry: the memsess store's ttl
        return [await store.expires_in("session"), await store.expires_in("forever")]

    in_session, in_forever = run(set_values())
    assert in_session is not None
    assert 55 <= in_session <= 60
    assert in_forever is None
    assert all(55 <= seconds <= 60 for seconds in lifetimes("session"))
    assert all(1430 <= seconds <= 1440 for seconds in lifetimes("forever"))

    async def renew() -> list[bytes | None]:
        return [
            await store.get("session", renew_for=600),
            await store.get("forever", renew_for=600),
        ]

    assert run(renew()) == [b"s", b"f"]
    assert all(595 <= seconds <= 600 for seconds in lifetimes("session"))
    assert all(1430 <= seconds <= 1440 for seconds in lifetimes("forever"))  # not renewed


def test_a_negative_expiry_is_refused(store: MemsessStore, run: Run) -> None:
    with pytest.raises(ValueError, match="expiry"):
        run(store.set("k", b"v", expires_in=-1))


def test_delete_all_refuses_and_deletes_nothing(
    cluster: LocalCluster,
    store: MemsessStore,
    inspector: memsess.SessionStore,
    run: Run,
) -> None:
    run(store.set("k", b"v", expires_in=60))
    cluster.set_raw(0, b"other-app:key", b"theirs")
    with pytest.raises(NotImplementedError, match="flush"):
        run(store.delete_all())
    assert run(store.get("k")) == b"v"
    assert cluster.get_raw(0, b"other-app:key") == b"theirs"


def test_a_serializer_that_cannot_hold_bytes_is_refused(cluster: LocalCluster) -> None:
    with pytest.raises(ValueError, match="msgpack"):
        MemsessStore.from_dsn(cluster.dsn(), serializer="json")


def test_a_set_after_a_delete_elsewhere_in_the_same_request_is_dropped(
    store: MemsessStore, run: Run
) -> None:
    async def request_that_loaded() -> bytes | None:
        await store.get("k")  # this request loaded the value...
        await asyncio.create_task(store.delete("k"))  # ...another request (task) deleted it
        await store.set("k", b"changed", expires_in=60)
        return await store.get("k")

    async def request_that_did_not_load() -> bytes | None:
        await store.set("k", b"new", expires_in=60)
        return await store.get("k")

    run(store.set("k", b"v", expires_in=60))
    assert run(request_that_loaded()) is None
    assert run(request_that_did_not_load()) == b"new"  # a plain set is not conditional


# -- an app ---------------------------------------------------------------------------


@dataclass
class Gate:
    """Holds the /slow request after it loaded its session, until released."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


def make_app(
    store: MemsessStore, config: ServerSideSessionConfig | None = None, gate: Gate | None = None
) -> Litestar:
    @get("/login", media_type=MediaType.TEXT)
    async def login(request: AnyRequest) -> str:
        data = dict(request.session)
        request.clear_session()  # MemsessSessionConfig: a new id, the old one logged out
        request.set_session({**data, "user": request.query_params["user"]})
        return "ok"

    @get("/count", media_type=MediaType.TEXT)
    async def count(request: AnyRequest) -> str:
        value = request.session.get("count", 0) + 1
        request.set_session({**request.session, "count": value})
        return str(value)

    @get("/whoami", media_type=MediaType.TEXT)
    async def whoami(request: AnyRequest) -> str:
        return str(request.session.get("user", ""))

    @get("/logout", media_type=MediaType.TEXT)
    async def logout(request: AnyRequest) -> str:
        request.clear_session()
        return "bye"

    @get("/slow", media_type=MediaType.TEXT)
    async def slow(request: AnyRequest) -> str:
        assert gate is not None
        request.set_session({**request.session, "cart": ["book"]})
        gate.entered.set()
        await asyncio.to_thread(gate.release.wait, 10)
        return "added"

    def unavailable(request: AnyRequest, exc: Exception) -> Response[str]:
        return Response("Sessions are unavailable, please retry.", status_code=503)

    return Litestar(
        [login, count, whoami, logout, slow],
        middleware=[(config or MemsessSessionConfig()).middleware],
        stores={"sessions": store},
        exception_handlers={memsess.ClusterError: unavailable},
        logging_config=None,
    )


def sid_of(response: httpx.Response) -> str:
    return str(response.cookies[NAME])


def test_login_counter_logout_over_http(
    cluster: LocalCluster, store: MemsessStore, inspector: memsess.SessionStore
) -> None:
    with serve_asgi(make_app(store)) as url, httpx.Client(base_url=url) as client:
        visitor = sid_of(client.get("/count"))
        sid = sid_of(client.get("/login", params={"user": "alice"}))
        counts = [client.get("/count").text for _ in range(2)]
        assert client.get("/whoami").text == "alice"
        assert sid_of(client.get("/logout")) == "null"
        assert client.get("/whoami").text == ""
    assert counts == ["2", "3"]
    assert is_valid_id(visitor)
    assert is_valid_id(sid)
    assert sid != visitor
    for gone in (visitor, sid):  # cycled away at login, logged out: tombstones on each copy
        assert inspector.load(store.memsess_id(gone)) is None
        assert len(holders(cluster, inspector, store.memsess_id(gone))) == 2


@pytest.mark.parametrize("value", BAD_COOKIES.values(), ids=BAD_COOKIES.keys())
def test_bad_cookie_gets_a_fresh_id_and_never_reaches_memcached(
    cluster: LocalCluster, store: MemsessStore, inspector: memsess.SessionStore, value: str
) -> None:
    with TestClient(make_app(store)) as client:
        response = client.get("/count", headers={"Cookie": f"{NAME}={value}"})
    sid = sid_of(response)
    assert response.text == "1"
    assert sid != value
    assert is_valid_id(sid)
    assert stored_keys(cluster) <= derived_keys(store, inspector, sid)
    assert len(holders(cluster, inspector, store.memsess_id(sid))) == 2
    for server in cluster.servers:
        assert cluster.get_raw(server.index, b"injected") is None


def test_an_unknown_well_formed_id_is_not_adopted(store: MemsessStore) -> None:
    forged = memsess.SessionStore.new_id()
    with TestClient(make_app(store)) as client:
        response = client.get("/count", headers={"Cookie": f"{NAME}={forged}"})
    assert response.text == "1"
    assert sid_of(response) != forged


@pytest.mark.parametrize("value", ["not-a-session-id", "abc\r\nset injected 0 60 3\r\nbad"])
def test_litestars_own_config_adopts_the_cookie_but_stores_only_its_digest(
    cluster: LocalCluster,
    store: MemsessStore,
    inspector: memsess.SessionStore,
    value: str,
    run: Run,
) -> None:
    with TestClient(make_app(store, ServerSideSessionConfig())) as client:
        response = client.get("/count", headers={"Cookie": f"{NAME}={value}"})
    assert response.text == "1"
    assert run(store.get(value)) is not None  # Litestar keeps the client's value as the id...
    assert stored_keys(cluster) <= derived_keys(store, inspector, value)  # ...not as a key
    for server in cluster.servers:
        assert cluster.get_raw(server.index, b"injected") is None


@pytest.mark.parametrize("config", [MemsessSessionConfig, ServerSideSessionConfig])
def test_logout_wins_over_a_slower_request_that_loaded_the_session(
    store: MemsessStore,
    config: type[ServerSideSessionConfig],
    caplog: pytest.LogCaptureFixture,
    run: Run,
) -> None:
    caplog.set_level(logging.INFO, logger="memsess.adapters")
    gate = Gate()
    with serve_asgi(make_app(store, config(), gate)) as url, httpx.Client(base_url=url) as client:
        sid = sid_of(client.get("/login", params={"user": "alice"}))
        cookies = {NAME: sid}
        slow: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: slow.append(httpx.get(f"{url}/slow", cookies=cookies, timeout=10))
        )
        request.start()
        assert gate.entered.wait(10)  # the slow request loaded the session
        assert httpx.get(f"{url}/logout", cookies=cookies).text == "bye"
        gate.release.set()
        request.join(10)
        assert slow[0].text == "added"
        assert httpx.get(f"{url}/whoami", cookies=cookies).text == ""
    assert b"alice" not in (run(store.get(sid)) or b"")
    assert "set dropped" in caplog.text  # the slow request's save, not a lucky ordering


def test_user_stays_logged_in_while_a_server_is_killed(
    cluster: LocalCluster, store: MemsessStore, inspector: memsess.SessionStore
) -> None:
    with serve_asgi(make_app(store)) as url, httpx.Client(base_url=url) as client:
        sid = sid_of(client.get("/login", params={"user": "alice"}))
        cluster.kill(holders(cluster, inspector, store.memsess_id(sid))[0])
        counts = [client.get("/count").text for _ in range(3)]
        assert client.get("/whoami").text == "alice"
    assert counts == ["1", "2", "3"]


def test_logout_during_hang_stays_logged_out(
    cluster: LocalCluster, store: MemsessStore, inspector: memsess.SessionStore
) -> None:
    with TestClient(make_app(store)) as client:
        sid = sid_of(client.get("/login", params={"user": "alice"}))
        hung = holders(cluster, inspector, store.memsess_id(sid))[0]
        cluster.hang(hung)
        client.get("/logout")
        cluster.resume(hung)
        settle()
        for _ in range(3):
            response = client.get("/whoami", headers={"Cookie": f"{NAME}={sid}"})
            assert response.text == ""
    assert inspector.load(store.memsess_id(sid)) is None


def test_session_lifetime_is_max_age_in_the_cookie_and_in_memcached(
    cluster: LocalCluster,
    store: MemsessStore,
    inspector: memsess.SessionStore,
    run: Run,
) -> None:
    config = MemsessSessionConfig(max_age=120, renew_on_access=True)
    with TestClient(make_app(store, config)) as client:
        response = client.get("/login", params={"user": "alice"})
        assert client.get("/whoami").text == "alice"  # renewed on access: a touch
    sid = store.memsess_id(sid_of(response))
    assert "Max-Age=120" in response.headers["set-cookie"]
    copies = holders(cluster, inspector, sid)
    assert len(copies) == 2
    for index in copies:
        assert 115 <= ttl_left(cluster, index, key_of(inspector, sid)) <= 120
    assert 115 <= (run(store.expires_in(sid_of(response))) or 0) <= 120


def test_every_copy_unreachable_is_answered_by_an_exception_handler(
    cluster: LocalCluster, store: MemsessStore, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(make_app(store)) as client:
        client.get("/login", params={"user": "alice"})
        for server in cluster.servers:
            cluster.kill(server.index)
        with caplog.at_level(logging.CRITICAL, logger="memsess"):
            response = client.get("/whoami")
    assert response.status_code == 503
    assert response.text.startswith("Sessions are unavailable")


def test_an_unknown_option_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="'redundance' \\(did you mean 'redundancy'\\?\\)"):
        MemsessStore.from_dsn("tcp://127.0.0.1:11211", redundance=2)
    with pytest.raises(TypeError, match="secrue"):
        MemsessSessionConfig(secrue=True)  # type: ignore[call-arg]


def test_a_list_dsn_with_a_store_timeout_builds_the_store(cluster: LocalCluster) -> None:
    first, *others = cluster.dsn().split(", ")
    store = MemsessStore.from_dsn(
        [f"{first}?timeout=0.75&retry_interval=4", *others], timeout=0.25, retry_interval=3
    )
    servers = store.store._cluster.servers
    assert [(server.timeout, server.retry_interval) for server in servers] == [
        (0.75, 4),
        (0.25, 3),
        (0.25, 3),
    ]


@pytest.mark.parametrize(
    "dsn", ["tcp://127.0.0.1:0", ["tcp://127.0.0.1:11211", "tcp://127.0.0.1:0"]]
)
def test_a_bad_dsn_names_the_argument(dsn: str | list[str]) -> None:
    with pytest.raises(memsess.DSNError, match=r"^dsn: "):
        MemsessStore.from_dsn(dsn)
