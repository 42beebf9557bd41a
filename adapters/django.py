"""Django session backend: ``SESSION_ENGINE = "memsess.adapters.django"``, configured by
the ``SESSION_MEMSESS`` setting; one memsess store per process and configuration, and
its asyncio twin (sharing its cluster) for the async methods.

``SESSION_MEMSESS = {"SAVE_PATH": "tcp://10.0.0.1:11211, tcp://10.0.0.2:11211",
"REDUNDANCY": 2}``; the other keys are in :data:`OPTIONS`.
"""

from __future__ import annotations

import os
import secrets
import threading
import weakref
from collections.abc import Callable, Generator
from typing import Any, Final, TypeVar

from asgiref.sync import iscoroutinefunction

# Django ships no types: mypy reads these names as Any (pyproject.toml says so once).
from django.conf import settings
from django.contrib.sessions.backends.base import CreateError, SessionBase, UpdateError
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.decorators import sync_and_async_middleware

from memsess.adapters import conflict_policy
from memsess.adapters._config import build_store, check_save_path, unknown_names
from memsess.aio import AsyncSessionStore
from memsess.errors import DSNError, SessionConflictError, SessionGoneError
from memsess.records import is_valid_id, lifetime_seconds
from memsess.store import SessionStore as MemsessStore
from memsess.store import Snapshot

__all__ = [
    "KEYS",
    "LOCK_MIDDLEWARE",
    "OPTIONS",
    "SessionLockMiddleware",
    "SessionStore",
    "conflict_setting",
    "get_async_store",
    "get_store",
]

#: Keys of ``settings.SESSION_MEMSESS`` besides the required ``SAVE_PATH``, and the
#: SessionStore option each sets. The store's ttl is ``SESSION_COOKIE_AGE``.
OPTIONS: Final = {
    "REDUNDANCY": "redundancy",
    "SERIALIZER": "serializer",  # "msgpack" (default) or "json"
    "KEY_PREFIX": "key_prefix",
    "STRAGGLER_WINDOW": "straggler_window",
    "MAX_ITEM_SIZE": "max_item_size",
    "SECRET_KEYS": "secret_keys",  # a list: the first key seals, all open
    "COMPRESS_THRESHOLD": "compress_threshold",
    "COMPRESSION": "compression",  # "zlib" (default) or "zstd"
    "MAX_SESSION_SIZE": "max_session_size",
    "USERNAME": "username",  # memcached -Y credentials for entries without user:password@
    "PASSWORD": "password",
    "SSL_CONTEXT": "ssl_context",  # an ssl.SSLContext for every tls:// server
    # Seconds, for the SAVE_PATH entries without their own ?timeout= / ?retry_interval=
    # (TIMEOUT is a server's time to answer, not a lifetime as in Django's CACHES).
    "TIMEOUT": "timeout",
    "RETRY_INTERVAL": "retry_interval",
}
#: Every key of ``settings.SESSION_MEMSESS``.
KEYS: Final = ("SAVE_PATH", *OPTIONS, "ON_CONFLICT")
# Keys guessed from Django's CACHES and other libraries, and where their meaning is set.
_GUESSES: Final = {
    "LOCATION": "the servers are SAVE_PATH",
    "SERVERS": "the servers are SAVE_PATH",
    "DSN": "the servers are SAVE_PATH",
    "TTL": "the lifetime of a session is settings.SESSION_COOKIE_AGE",
}

_stores: dict[tuple[Any, ...], MemsessStore] = {}
_async_stores: weakref.WeakKeyDictionary[MemsessStore, AsyncSessionStore] = (
    weakref.WeakKeyDictionary()  # by the blocking store each shares its cluster with
)
_stores_lock = threading.Lock()


def _renew_stores_lock() -> None:
    # A child forked while another thread held the lock would wait on it forever.
    global _stores_lock  # noqa: PLW0603 - the module's one lock, replaced in the child
    _stores_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_stores_lock)


def get_store() -> MemsessStore:
    """The store for the current settings: built on first use, then shared by every
    thread of the process (a changed configuration gets a store of its own)."""
    config = getattr(settings, "SESSION_MEMSESS", None)
    if not isinstance(config, dict) or not config.get("SAVE_PATH"):
        raise ImproperlyConfigured(
            'memsess: set SESSION_MEMSESS = {"SAVE_PATH": "tcp://127.0.0.1:11211", ...}'
        )
    message = unknown_names(config, KEYS, what="SESSION_MEMSESS key", instead=_GUESSES)
    if message is not None:
        raise ImproperlyConfigured(message)
    setting = 'SESSION_MEMSESS["SAVE_PATH"]'
    try:
        check_save_path(config["SAVE_PATH"], setting=setting)
    except TypeError as exc:
        raise ImproperlyConfigured(str(exc)) from None
    # Lists as tuples: the save path and the options are also the key of the store cache
    # (hashable). A list of servers is the way Django's CACHES take their LOCATION.
    save_path = _hashable(config["SAVE_PATH"])
    options = {OPTIONS[key]: _hashable(value) for key, value in config.items() if key in OPTIONS}
    options["ttl"] = lifetime_seconds(settings.SESSION_COOKIE_AGE, name="SESSION_COOKIE_AGE")
    cache_key = (save_path, *sorted(options.items()))
    store = _stores.get(cache_key)
    if store is None:
        with _stores_lock:
            store = _stores.get(cache_key)
            if store is None:
                store = _stores[cache_key] = _build_store(save_path, options, setting=setting)
    return store


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _build_store(save_path: Any, options: dict[str, Any], *, setting: str) -> MemsessStore:
    """The store of ``SESSION_MEMSESS``; ImproperlyConfigured naming ``setting`` for a
    save path that does not parse."""
    try:
        return build_store(MemsessStore, save_path, options, setting=setting)
    except DSNError as exc:
        raise ImproperlyConfigured(str(exc)) from exc


def conflict_setting() -> str:
    """``SESSION_MEMSESS["ON_CONFLICT"]``: what a save does when another request of the
    same user saved the session meanwhile: "merge" (the default: this request's keys
    on top of the other's), "error" (``UpdateError``) or "overwrite" (last writer
    wins)."""
    config = getattr(settings, "SESSION_MEMSESS", None) or {}
    try:
        policy = conflict_policy(config.get("ON_CONFLICT", "merge"))
    except ValueError as exc:
        raise ImproperlyConfigured(str(exc)) from None
    if policy == "lock" and LOCK_MIDDLEWARE not in settings.MIDDLEWARE:
        # A backend sees no end of the request: the middleware gives the lock back.
        raise ImproperlyConfigured(
            f'memsess: ON_CONFLICT "lock" needs "{LOCK_MIDDLEWARE}" in MIDDLEWARE, before'
            ' "django.contrib.sessions.middleware.SessionMiddleware"'
        )
    return policy


#: The middleware the "lock" policy needs: it gives the session's lock back at the end
#: of every request, however it ended (after SessionMiddleware has saved the session).
LOCK_MIDDLEWARE: Final = "memsess.adapters.django.SessionLockMiddleware"


@sync_and_async_middleware  # type: ignore[untyped-decorator]
def SessionLockMiddleware(get_response: Any) -> Any:  # noqa: N802 - Django's middleware style
    """Gives back the session's lock the request took under ``ON_CONFLICT: "lock"``,
    once the response is made (and the session saved), or when the view raised."""
    if iscoroutinefunction(get_response):

        async def release_after(request: Any) -> Any:
            try:
                return await get_response(request)
            finally:
                session = getattr(request, "session", None)
                if isinstance(session, SessionStore):
                    await session.arelease_lock()

        return release_after

    def release_after_sync(request: Any) -> Any:
        try:
            return get_response(request)
        finally:
            session = getattr(request, "session", None)
            if isinstance(session, SessionStore):
                session.release_lock()

    return release_after_sync


def get_async_store() -> AsyncSessionStore:
    """The asyncio twin of :func:`get_store`, for the async methods: it shares that
    store's servers, health table, counters and background thread (only connections
    are its own, one pool per event loop), so sync and async requests of a process
    see one cluster."""
    store = get_store()
    async_store = _async_stores.get(store)
    if async_store is None:
        with _stores_lock:
            async_store = _async_stores.get(store)
            if async_store is None:
                async_store = _async_stores[store] = AsyncSessionStore.from_store(store)
    return async_store


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    # override_settings() in tests: close the stores of the replaced configuration.
    if setting in ("SESSION_MEMSESS", "SESSION_COOKIE_AGE"):
        # The async twins share what close() closes; their loops' connections go
        # with their loops.
        with _stores_lock:
            stores = list(_stores.values())
            _stores.clear()
            _async_stores.clear()
        for store in stores:
            store.close()


setting_changed.connect(_on_setting_changed)


T = TypeVar("T")
#: One store operation of a flow, as a function of the store: ``lambda store:
#: store.fetch(key)`` answers a Snapshot on a SessionStore and an awaitable of one on an
#: AsyncSessionStore, whose methods are the same, awaited.
_Op = Callable[[Any], Any]
#: A backend method as a generator of store operations (httpx's auth_flow way): it
#: yields each operation and receives its result (or its exception, thrown in), so one
#: body holds every decision and two drivers, blocking and async, run it.
_Flow = Generator[_Op, Any, T]


class SessionStore(SessionBase):  # type: ignore[misc]  # SessionBase is untyped (Any)
    """Django sessions in memsess.

    Strict: a key memsess did not issue, or one that is unknown, expired or
    logged out, loads as an empty session whose next save gets a new key; keys
    are memsess ids (43 URL-safe characters). A save after a logout made
    elsewhere raises ``UpdateError`` (Django's middleware turns it into
    ``SessionInterrupted``). When no copy can be read, loading raises
    :class:`memsess.NoServerAvailableError`, never an empty session that a save
    would then write over the real one.

    The async methods (``aload``, ``asave``, ...) make the same decisions on
    :class:`memsess.AsyncSessionStore`, on the running event loop, with no thread.
    """

    # SessionBase's validating property (an annotation only: nothing set at runtime).
    _session_key: str | None

    def __init__(self, session_key: str | None = None) -> None:
        super().__init__(session_key)
        self._snapshot: Snapshot | None = None  # as loaded, for the conditional save
        self._issued: str | None = None  # a key this object made and nobody else has
        self._held: tuple[str, bytes] | None = None  # the lock taken ("lock"): key, token

    @property
    def store(self) -> MemsessStore:
        return get_store()

    # -- a flow run in this thread, or on the running event loop (drivers below) -------

    def _run(self, flow: _Flow[T]) -> T:
        return _drive(flow, self.store)

    async def _arun(self, flow: _Flow[T]) -> T:
        return await _adrive(flow, get_async_store())

    def release_lock(self) -> None:
        """Give back the session's lock if this request took one (SessionLockMiddleware
        calls this at the end of every request)."""
        held, self._held = self._held, None
        if held is not None:
            _lock(self.store, *held, held=True).release()

    async def arelease_lock(self) -> None:
        """:meth:`release_lock`, on the async store."""
        held, self._held = self._held, None
        if held is not None:
            await _lock(get_async_store(), *held, held=True).release()

    # -- the backend's methods, sync and async ----------------------------------------

    def _get_new_session_key(self) -> str:
        # 256 random bits: no need to ask the servers whether the key is taken.
        return self.store.new_id()

    async def _aget_new_session_key(self) -> str:
        return self._get_new_session_key()

    def load(self) -> dict[str, Any]:
        return self._run(self._load())

    async def aload(self) -> dict[str, Any]:
        return await self._arun(self._load())

    def exists(self, session_key: str | None) -> bool:
        return self._run(self._exists(session_key))

    async def aexists(self, session_key: str | None) -> bool:
        return await self._arun(self._exists(session_key))

    def create(self) -> None:
        self._run(self._create())

    async def acreate(self) -> None:
        await self._arun(self._create())

    def save(self, must_create: bool = False) -> None:
        self._run(self._save(must_create))

    async def asave(self, must_create: bool = False) -> None:
        await self._arun(self._save(must_create))

    def delete(self, session_key: str | None = None) -> None:
        self._run(self._delete(session_key))

    async def adelete(self, session_key: str | None = None) -> None:
        await self._arun(self._delete(session_key))

    def cycle_key(self) -> None:
        """A new key for the same data (call at login, as ``django.contrib.auth``
        does): memsess's regenerate, so the old key is logged out everywhere."""
        self._run(self._cycle_key())

    async def acycle_key(self) -> None:
        """The async :meth:`cycle_key`."""
        await self._arun(self._cycle_key())

    @classmethod
    def clear_expired(cls) -> None:
        """Nothing to do: memcached expires sessions by itself."""

    @classmethod
    async def aclear_expired(cls) -> None:
        """Nothing to do: memcached expires sessions by itself."""

    # -- the flows: every decision, once ------------------------------------------------

    def _load(self) -> _Flow[dict[str, Any]]:
        key = self.session_key
        snapshot = None
        if key is not None:
            if self._held is None and is_valid_id(key) and conflict_setting() == "lock":
                token = secrets.token_hex(16).encode("ascii")
                yield lambda store: _lock(store, key, token).acquire()  # awaited when async
                self._held = (key, token)
            snapshot = yield lambda store: store.fetch(key)
        self._snapshot = snapshot
        if snapshot is None:
            self._session_key = None
            return {}
        return dict(snapshot.data)

    def _data(self, no_load: bool = False) -> _Flow[dict[str, Any]]:
        """SessionBase's ``_get_session``, with the load as a step of the flow."""
        if not no_load and self.session_key is not None and not hasattr(self, "_session_cache"):
            self._session_cache = yield from self._load()
        data: dict[str, Any] = self._get_session(no_load=no_load)  # loaded: no I/O
        return data

    def _exists(self, session_key: str | None) -> _Flow[bool]:
        if session_key is None or not is_valid_id(session_key):
            return False  # without a round trip
        data = yield lambda store: store.load(session_key)
        return data is not None

    def _create(self) -> _Flow[None]:
        self._issued = self._get_new_session_key()
        self._session_key = self._issued
        yield from self._save(must_create=True)
        self.modified = True

    def _save(self, must_create: bool) -> _Flow[None]:
        if self.session_key is None:
            return (yield from self._create())
        data = yield from self._data(no_load=must_create)
        key = self.session_key
        if key is None:  # loading just found the key unknown: a fresh session
            return (yield from self._create())
        snapshot = None
        if must_create:
            if key != self._issued and (not is_valid_id(key) or (yield from self._exists(key))):
                raise CreateError
        else:
            snapshot = self._snapshot or (yield lambda store: store.fetch(key))
            if snapshot is None:
                raise UpdateError
        self._snapshot = None  # its CAS tokens are stale after this write
        age = self.get_expiry_age()  # from the loaded data: no I/O
        if age <= 0:  # an expiry in the past: the session ends now
            yield lambda store: store.delete(key)
            return None
        ttl = lifetime_seconds(age, name="session expiry age")  # 0.5 s: 1, never 0 (forever)
        policy = conflict_setting()
        if policy == "lock":  # the lock serializes; the save still merges, should it be lost
            policy = "merge"
        try:
            yield lambda store: store.save(
                key, data, ttl=ttl, snapshot=snapshot, on_conflict=policy
            )
        except (SessionGoneError, SessionConflictError) as exc:
            raise UpdateError from exc
        return None

    def _delete(self, session_key: str | None) -> _Flow[None]:
        if session_key is None:
            if self.session_key is None:
                return
            session_key = self.session_key
            self._snapshot = None
        yield lambda store: store.delete(session_key)

    def _cycle_key(self) -> _Flow[None]:
        data = yield from self._data()
        key = self.session_key
        if key is None:
            yield from self._create()
        else:
            self._issued = yield lambda store: store.regenerate(key, data)
            self._session_key = self._issued
            self._snapshot = None
        self._session_cache = data
        self.modified = True


def _lock(store: Any, key: str, token: bytes, *, held: bool = False) -> Any:
    """``store``'s lock of session ``key`` as owner ``token`` (either store's: a lock
    taken by one can be given back by the other)."""
    lock = store.lock(key)
    lock.token, lock.held = token, held
    return lock


def _drive(flow: _Flow[T], store: MemsessStore) -> T:
    """Run a flow on the blocking store, in this thread."""
    try:
        operation = next(flow)
        while True:
            try:
                result = operation(store)
            except Exception as exc:  # the flow's to handle (thrown in)
                operation = flow.throw(exc)
            else:
                operation = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _adrive(flow: _Flow[T], store: AsyncSessionStore) -> T:
    """Run a flow on the async store, on the running event loop: no thread."""
    try:
        operation = next(flow)
        while True:
            try:
                result = await operation(store)
            except Exception as exc:  # the flow's to handle (thrown in)
                operation = flow.throw(exc)
            else:
                operation = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
