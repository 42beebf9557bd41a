"""Litestar server-side sessions in memsess: :class:`MemsessStore` is a Litestar store
(``Litestar(stores={"sessions": MemsessStore(...)})``, for ``ServerSideSessionConfig`` or
any other user of a store); :class:`MemsessSessionConfig` adds memsess's strict ids."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import timedelta
from types import TracebackType
from typing import Any, Final

from litestar.connection import ASGIConnection
from litestar.middleware.session.server_side import (
    ServerSideSessionBackend,
    ServerSideSessionConfig,
)
from litestar.stores.base import NamespacedStore, Store
from litestar.types import Empty, Message, ScopeSession

from memsess.adapters._config import build_store, check_store_options
from memsess.aio import AsyncSessionStore
from memsess.errors import SerializationError, SessionConflictError, SessionGoneError
from memsess.records import lifetime_seconds, new_id
from memsess.store import Changes, Snapshot

__all__ = ["MemsessSessionBackend", "MemsessSessionConfig", "MemsessStore"]

_MERGE_ROUNDS: Final = 16  # merges of one set against other requests that keep winning

log = logging.getLogger("memsess.adapters")

# Domain separation: a memsess id derived from a Litestar key is never one derived for
# another purpose from the same text.
_DERIVATION: Final = b"memsess.adapters.litestar\0"
# How many loaded snapshots one context keeps: a request reads one session, maybe two.
_REMEMBERED: Final = 4

#: The session id this request's cookie loaded a session with, if any: set when the
#: middleware loads (in the request's context), read when it stores the session.
_cookie_loaded: ContextVar[str | None] = ContextVar("memsess_litestar_cookie_loaded", default=None)
#: The snapshots the current context (a request's task) loaded, newest first, as
#: (store, memsess id, snapshot): a later set() of the same key in the same request
#: saves conditionally on it, so a logout made meanwhile by another request wins.
_loaded: ContextVar[tuple[tuple[AsyncSessionStore, str, Snapshot], ...]] = ContextVar(
    "memsess_litestar_loaded", default=()
)


class MemsessStore(NamespacedStore):
    """A Litestar store on a :class:`memsess.AsyncSessionStore`: every value in
    ``redundancy`` copies, failover and read repair as for any memsess session, and a
    delete that is a tombstone, so a server that missed it cannot bring the value back.

    Keys are any text: each is mapped to a memsess id by a SHA-256 digest of the
    namespace and the key, so no key (a cookie value, for the sessions) ever reaches
    memcached, nor can pick another key's id. Values are stored as memsess session
    data, so the store's serializer must keep bytes (msgpack, the default, does).

    Within Litestar's contract, the differences from its own stores:

    - a value set without ``expires_in`` lives the memsess store's ``ttl`` (memcached
      needs a bound), and ``expires_in()`` reports the expiry given at the last
      ``set()``: a renewal by ``get(renew_for=...)`` extends the copies (a touch) without
      rewriting the value, so ``expires_in()`` may under-report after one;
    - a ``set()`` of a key that the same request (asyncio context) loaded with
      ``get()`` is conditional: when another request deleted the key in between (a
      logout), the value is not stored again, and the write is dropped and logged;
    - ``delete_all()`` raises NotImplementedError: memcached cannot list or delete a
      namespace's keys without a flush, which would delete other applications' data.
    """

    __slots__ = ("store",)

    def __init__(self, store: AsyncSessionStore, *, namespace: str | None = None) -> None:
        """``store``: the memsess store the values live in (also usable elsewhere in
        the app). ``namespace``: keeps keys apart from other stores on the same one."""
        try:
            store.serializer.dumps({"value": b""})
        except SerializationError as exc:
            raise ValueError(
                f"MemsessStore stores bytes, which the {store.serializer.name!r} serializer"
                " cannot hold: build the AsyncSessionStore with serializer='msgpack'"
            ) from exc
        self.store = store
        self.namespace = namespace

    @classmethod
    def from_dsn(
        cls, dsn: str | Sequence[str], *, namespace: str | None = None, **options: Any
    ) -> MemsessStore:
        """A store on a new :class:`memsess.AsyncSessionStore` for the servers of a
        PHP-style save_path (or a list of server strings), with its ``options``
        (``redundancy=``, ``ttl=``, ``timeout=``, ...; TypeError for one it does not take)."""
        check_store_options(AsyncSessionStore, options, setting="MemsessStore.from_dsn")
        return cls(build_store(AsyncSessionStore, dsn, options, setting="dsn"), namespace=namespace)

    def with_namespace(self, namespace: str) -> MemsessStore:
        """A store on the same memsess store, in a child namespace of this one."""
        child = f"{self.namespace}_{namespace}" if self.namespace else namespace
        return type(self)(self.store, namespace=child)

    def memsess_id(self, key: str) -> str:
        """The memsess id ``key`` is stored under (43 characters, as memsess issues),
        e.g. for ``memsess inspect``."""
        namespace = (self.namespace or "").encode("utf-8", "surrogatepass")
        material = b"%d:%b:%b" % (len(namespace), namespace, key.encode("utf-8", "surrogatepass"))
        digest = hashlib.sha256(_DERIVATION + material).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")  # 43 characters

    async def set(
        self, key: str, value: str | bytes, expires_in: int | timedelta | None = None
    ) -> None:
        """Store ``value`` under ``key`` for ``expires_in`` seconds (None or 0: the
        memsess store's ttl); conditional on what this request loaded, see the class."""
        if isinstance(value, str):
            value = value.encode("utf-8")
        seconds = _seconds(expires_in)
        sid = self.memsess_id(key)
        data = {"value": value, "expires": None if seconds is None else time.time() + seconds}
        try:
            await self._save(sid, data, seconds, self._forget(sid))
        except SessionGoneError:
            log.info("store key deleted elsewhere (a logout?) during this request; set dropped")

    async def _save(
        self, sid: str, data: dict[str, Any], seconds: int | None, snapshot: Snapshot | None
    ) -> None:
        """Save conditionally on ``snapshot``. When another request set the key since
        (two requests of one user at once) and both values are JSON objects (a Litestar
        session is one), merge by key: this request's changes, against what it loaded,
        on top of the other's; any other value: the later set wins."""
        for round_ in range(_MERGE_ROUNDS):
            if round_:  # as the store's own merges: writers that met spread out
                await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**round_)))
            try:
                await self.store.save(sid, data, ttl=seconds, snapshot=snapshot)
                return
            except SessionConflictError as conflict:
                # The store's conflict carries the Snapshot it read (typed `object` only
                # because memsess.errors, a leaf, cannot import the store's types).
                current = conflict.current
                assert isinstance(current, Snapshot)  # noqa: S101 - invariant, for the type checker
                merged = _merged(_value(snapshot), data["value"], _value(current))
                if merged is None:
                    await self.store.save(
                        sid, data, ttl=seconds, snapshot=current, on_conflict="overwrite"
                    )
                    return
                data, snapshot = {**data, "value": merged}, current
        raise SessionConflictError("the key kept being set elsewhere; not set", snapshot)

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        """The value of ``key``, or None; with ``renew_for`` (seconds), a value set
        with an expiry has every copy's lifetime extended to that."""
        sid = self.memsess_id(key)
        self._forget(sid)
        snapshot = await self.store.fetch(sid)
        value = _value(snapshot)
        if snapshot is None or value is None:
            return None
        _loaded.set(((self.store, sid, snapshot), *_loaded.get()[: _REMEMBERED - 1]))
        renewal = _seconds(renew_for)
        if renewal is not None and snapshot.data.get("expires") is not None:
            await self.store.touch(sid, ttl=renewal)
        return value

    async def delete(self, key: str) -> None:
        """Delete ``key``: a tombstone on every copy, which wins over any copy that
        missed it. Deleting a key that does not exist is a no-op."""
        sid = self.memsess_id(key)
        self._forget(sid)
        await self.store.delete(sid)

    async def delete_all(self) -> None:
        """Not possible: raises NotImplementedError (see the class)."""
        raise NotImplementedError(
            "MemsessStore cannot delete all values: memcached can neither list a"
            " namespace's keys nor delete them without flushing every other application's"
            " data. Delete keys one by one, or use a new namespace or key_prefix."
        )

    async def exists(self, key: str) -> bool:
        """True when ``key`` has a value (not expired, not deleted)."""
        return _value(await self.store.fetch(self.memsess_id(key))) is not None

    async def expires_in(self, key: str) -> int | None:
        """Seconds before ``key`` expires, as set by its last ``set()``; None when it
        does not exist or was set without an expiry."""
        snapshot = await self.store.fetch(self.memsess_id(key))
        if snapshot is None or _value(snapshot) is None:
            return None
        expires = snapshot.data.get("expires")
        return None if expires is None else max(0, int(expires - time.time()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        # Litestar enters and exits the stores of app.stores with the app's lifespan.
        await self.store.aclose()

    def _forget(self, sid: str) -> Snapshot | None:
        """Drop (and return) this context's snapshot of ``sid``: a write makes its CAS
        tokens stale."""
        remembered = _loaded.get()
        for index, (store, loaded_sid, snapshot) in enumerate(remembered):
            if loaded_sid == sid and store is self.store:
                _loaded.set(remembered[:index] + remembered[index + 1 :])
                return snapshot
        return None


def _merged(loaded: bytes | None, mine: bytes, theirs: bytes | None) -> bytes | None:
    """``mine``'s changes against ``loaded``, on top of ``theirs``, when all three are
    JSON objects; else None."""
    try:
        documents = [json.loads(value) for value in (loaded or b"{}", mine, theirs or b"{}")]
    except ValueError:
        return None
    if not all(isinstance(document, dict) for document in documents):
        return None
    before, after, current = documents
    merged, _ = Changes.between(before, after).applied_to(current)
    return json.dumps(merged, separators=(",", ":")).encode("utf-8")


def _value(snapshot: Snapshot | None) -> bytes | None:
    value = None if snapshot is None else snapshot.data.get("value")
    return value if isinstance(value, bytes) else None


def _seconds(duration: int | timedelta | None) -> int | None:
    """Litestar's expiry (seconds or a timedelta; None or 0: none) in whole seconds,
    rounded up. ValueError for a negative one."""
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else duration
    return lifetime_seconds(seconds, name="expiry") if seconds else None


class MemsessSessionBackend(ServerSideSessionBackend):
    """Litestar's server-side session backend with memsess's strict ids: new sessions
    get memsess ids, and a cookie value that loads no session (made up, expired, logged
    out) is never adopted; the session gets a new id instead. ``clear_session()`` then
    ``set_session(...)`` in one request (a login) moves the session to a new id and
    logs the old one out, against session fixation."""

    def generate_session_id(self) -> str:
        return new_id()

    async def load_from_connection(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> dict[str, Any]:
        _cookie_loaded.set(None)  # this request's answer, whatever ran in this context before
        return await super().load_from_connection(connection)

    async def get(self, session_id: str, store: Store) -> bytes | None:
        data = await super().get(session_id, store)
        if data is not None:
            _cookie_loaded.set(session_id)
        return data

    def get_session_id(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str:
        loaded = _cookie_loaded.get()
        if loaded is not None and connection.cookies.get(self.config.key) == loaded:
            return loaded
        return connection.get_session_id() or self.generate_session_id()

    async def store_in_message(
        self,
        scope_session: ScopeSession,
        message: Message,
        connection: ASGIConnection[Any, Any, Any, Any],
    ) -> None:
        loaded = _cookie_loaded.get()
        # clear_session() forgets the request's session id; data set after it is a
        # new session (a login): it gets a new id, and the old one is logged out.
        if scope_session is not Empty and loaded is not None and not connection.get_session_id():
            await self.delete(loaded, store=self.config.get_store_from_app(connection.scope["app"]))
            _cookie_loaded.set(None)
        await super().store_in_message(scope_session, message, connection)


class MemsessSessionConfig(ServerSideSessionConfig):
    """``ServerSideSessionConfig`` with :class:`MemsessSessionBackend`: the same
    options, strict ids. Its ``store`` (default ``"sessions"``) names a
    :class:`MemsessStore` in ``app.stores``."""

    _backend_class = MemsessSessionBackend
