"""Django session backend: ``SESSION_ENGINE = "memsess.adapters.django"``, configured by
the ``SESSION_MEMSESS`` setting; one memsess store per process and configuration.

``SESSION_MEMSESS = {"SAVE_PATH": "tcp://10.0.0.1:11211, tcp://10.0.0.2:11211",
"REDUNDANCY": 2}``; the other keys are in :data:`OPTIONS`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Final, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings  # type: ignore[import-untyped]  # Django ships no types
from django.contrib.sessions.backends.base import (  # type: ignore[import-untyped]
    CreateError,
    SessionBase,
    UpdateError,
)
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.core.signals import setting_changed  # type: ignore[import-untyped]

from memsess.errors import SessionGoneError
from memsess.records import is_valid_id, lifetime_seconds
from memsess.store import SessionStore as MemsessStore
from memsess.store import Snapshot

__all__ = ["OPTIONS", "SessionStore", "get_store"]

#: Keys of ``settings.SESSION_MEMSESS`` besides the required ``SAVE_PATH``, and the
#: SessionStore option each sets. The store's ttl is ``SESSION_COOKIE_AGE``.
OPTIONS: Final = {
    "REDUNDANCY": "redundancy",
    "SERIALIZER": "serializer",  # "msgpack" (default) or "json"
    "KEY_PREFIX": "key_prefix",
    "STRAGGLER_WINDOW": "straggler_window",
    "MAX_ITEM_SIZE": "max_item_size",
}

_stores: dict[tuple[Any, ...], MemsessStore] = {}
_stores_lock = threading.Lock()


def _renew_stores_lock() -> None:
    # A child forked while another thread held the lock would wait on it forever.
    global _stores_lock  # noqa: PLW0603 - the module's one lock, replaced in the child
    _stores_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_stores_lock)
P = ParamSpec("P")
R = TypeVar("R")


def _in_thread(func: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    # The store is thread-safe, so the async methods run in any executor thread
    # rather than all in the one thread that thread_sensitive=True would share.
    return sync_to_async(func, thread_sensitive=False)


def get_store() -> MemsessStore:
    """The store for the current settings: built on first use, then shared by every
    thread of the process (a changed configuration gets a store of its own)."""
    config = getattr(settings, "SESSION_MEMSESS", None)
    if not isinstance(config, dict) or not config.get("SAVE_PATH"):
        raise ImproperlyConfigured(
            'memsess: set SESSION_MEMSESS = {"SAVE_PATH": "tcp://127.0.0.1:11211", ...}'
        )
    unknown = set(config) - set(OPTIONS) - {"SAVE_PATH"}
    if unknown:
        raise ImproperlyConfigured(f"memsess: unknown SESSION_MEMSESS keys {sorted(unknown)}")
    options = {OPTIONS[key]: value for key, value in config.items() if key != "SAVE_PATH"}
    options["ttl"] = lifetime_seconds(settings.SESSION_COOKIE_AGE, name="SESSION_COOKIE_AGE")
    cache_key = (config["SAVE_PATH"], *sorted(options.items()))
    store = _stores.get(cache_key)
    if store is None:
        with _stores_lock:
            store = _stores.get(cache_key)
            if store is None:
                store = MemsessStore.from_dsn(config["SAVE_PATH"], **options)
                _stores[cache_key] = store
    return store


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    # override_settings() in tests: close the stores of the replaced configuration.
    if setting in ("SESSION_MEMSESS", "SESSION_COOKIE_AGE"):
        with _stores_lock:
            stores = list(_stores.values())
            _stores.clear()
        for store in stores:
            store.close()


setting_changed.connect(_on_setting_changed)


class SessionStore(SessionBase):  # type: ignore[misc]  # SessionBase is untyped (Any)
    """Django sessions in memsess.

    Strict: a key memsess did not issue, or one that is unknown, expired or
    logged out, loads as an empty session whose next save gets a new key; keys
    are memsess ids (43 URL-safe characters). A save after a logout made
    elsewhere raises ``UpdateError`` (Django's middleware turns it into
    ``SessionInterrupted``). When no copy can be read, loading raises
    :class:`memsess.NoServerAvailableError`, never an empty session that a save
    would then write over the real one.
    """

    # SessionBase's validating property (an annotation only: nothing set at runtime).
    _session_key: str | None

    def __init__(self, session_key: str | None = None) -> None:
        super().__init__(session_key)
        self._snapshot: Snapshot | None = None  # as loaded, for the conditional save
        self._issued: str | None = None  # a key this object made and nobody else has

    @property
    def store(self) -> MemsessStore:
        return get_store()

    def _get_new_session_key(self) -> str:
        # 256 random bits: no need to ask the servers whether the key is taken.
        return self.store.new_id()

    async def _aget_new_session_key(self) -> str:
        return self._get_new_session_key()

    def load(self) -> dict[str, Any]:
        key = self.session_key
        self._snapshot = None if key is None else self.store.fetch(key)
        if self._snapshot is None:
            self._session_key = None
            return {}
        return dict(self._snapshot.data)

    def exists(self, session_key: str | None) -> bool:
        if session_key is None or not is_valid_id(session_key):
            return False  # without a round trip
        return self.store.load(session_key) is not None

    def create(self) -> None:
        self._issued = self._get_new_session_key()
        self._session_key = self._issued
        self.save(must_create=True)
        self.modified = True

    def save(self, must_create: bool = False) -> None:
        if self.session_key is None:
            return self.create()
        data = self._get_session(no_load=must_create)
        key = self.session_key
        if key is None:  # loading just found the key unknown: a fresh session
            return self.create()
        snapshot = None
        if must_create:
            if key != self._issued and (not is_valid_id(key) or self.exists(key)):
                raise CreateError
        else:
            snapshot = self._snapshot or self.store.fetch(key)
            if snapshot is None:
                raise UpdateError
        self._snapshot = None  # its CAS tokens are stale after this write
        self._write(key, data, snapshot)
        return None

    def _write(self, key: str, data: dict[str, Any], snapshot: Snapshot | None) -> None:
        age = self.get_expiry_age()
        if age <= 0:  # an expiry in the past: the session ends now
            self.store.delete(key)
            return
        ttl = lifetime_seconds(age, name="session expiry age")  # 0.5 s: 1, never 0 (forever)
        try:
            self.store.save(key, data, ttl=ttl, snapshot=snapshot)
        except SessionGoneError as exc:
            raise UpdateError from exc

    def delete(self, session_key: str | None = None) -> None:
        if session_key is None:
            if self.session_key is None:
                return
            session_key = self.session_key
            self._snapshot = None
        self.store.delete(session_key)

    def cycle_key(self) -> None:
        """A new key for the same data (call at login, as ``django.contrib.auth``
        does): memsess's regenerate, so the old key is logged out everywhere."""
        data = self._session
        key = self.session_key
        if key is None:
            self.create()
        else:
            self._issued = self.store.regenerate(key, data)
            self._session_key = self._issued
            self._snapshot = None
        self._session_cache = data
        self.modified = True

    @classmethod
    def clear_expired(cls) -> None:
        """Nothing to do: memcached expires sessions by itself."""

    async def aload(self) -> dict[str, Any]:
        return await _in_thread(self.load)()

    async def aexists(self, session_key: str | None) -> bool:
        return await _in_thread(self.exists)(session_key)

    async def acreate(self) -> None:
        await _in_thread(self.create)()

    async def asave(self, must_create: bool = False) -> None:
        await _in_thread(self.save)(must_create)

    async def adelete(self, session_key: str | None = None) -> None:
        await _in_thread(self.delete)(session_key)

    async def acycle_key(self) -> None:
        await _in_thread(self.cycle_key)()

    @classmethod
    async def aclear_expired(cls) -> None:
        """Nothing to do: memcached expires sessions by itself."""
