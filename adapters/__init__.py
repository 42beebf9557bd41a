"""The framework adapters, installed as ``memsess.adapters`` (flask, django, wsgi,
asgi, quart, litestar). This module holds what they share and imports no framework: the
request session, sync (:class:`Session`) and async (:class:`AsyncSession`) on one
set of decisions, the session cookie, and the ``MEMSESS_*`` config keys (checked in
``memsess.adapters._config``). Each framework's module is imported on first use, also as
an attribute after a plain ``import memsess`` (``memsess.adapters.flask.init_app(app)``)."""

from __future__ import annotations

import enum
import importlib
import logging
import re
import time
from collections.abc import Iterator, MutableMapping
from email.utils import formatdate
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from memsess.adapters._config import (
    CONFIG_OPTIONS,
    CONFLICT_KEY,
    permanent_lifetime,
    store_options,
)
from memsess.errors import ClusterError, MemsessError, SessionGoneError
from memsess.records import is_valid_id, new_id
from memsess.store import ON_CONFLICT, SessionLock, SessionStore, Snapshot

if TYPE_CHECKING:
    from memsess.aio import AsyncSessionLock, AsyncSessionStore

__all__ = [
    "CONFIG_OPTIONS",
    "CONFLICT_KEY",
    "FRAMEWORK_MODULES",
    "POLICIES",
    "AsyncSession",
    "Outcome",
    "Session",
    "SessionCookie",
    "SessionNotLoadedError",
    "StoreCall",
    "conflict_policy",
    "permanent_lifetime",
    "store_options",
]

log = logging.getLogger("memsess.adapters")


class Outcome(enum.Enum):
    """What the response must do with the session cookie after the session is persisted."""

    NOTHING = "nothing"
    SET = "set"  # send the cookie with the session's sid
    DELETE = "delete"  # expire the cookie


class StoreCall(NamedTuple):
    """The one store call that persisting a session needs, decided without I/O:
    ``method`` of SessionStore (awaited, of AsyncSessionStore) called as
    ``method(sid, **kwargs)``. A sync and an async driver make it."""

    method: Literal["save", "touch", "delete", "regenerate"]
    sid: str
    kwargs: dict[str, Any]


class SessionNotLoadedError(MemsessError, RuntimeError):
    """An :class:`AsyncSession` was read or written before it was loaded: loading
    is a round trip, which a sync mapping access must not make in an event loop."""


class _SessionState(MutableMapping[str, Any]):
    """One request's session as a mapping, and what persisting it must do.

    ``sid`` is the id the client may keep: None until the session exists in the
    store. A cookie value the store did not issue (malformed, unknown, expired,
    logged out) is never adopted: such a session starts empty and gets a new id.
    Subclasses load (:meth:`_load`) and run the :class:`StoreCall` of :meth:`_plan`.
    """

    def __init__(self, cookie_value: str | None, *, on_conflict: str = "merge") -> None:
        self.on_conflict = conflict_policy(on_conflict)
        self.locking = self.on_conflict == "lock"
        self._save_policy = "merge" if self.locking else self.on_conflict
        self.sid: str | None = None
        self.modified = False
        self.accessed = False
        self._cookie_sid = cookie_value if is_valid_id(cookie_value) else None
        self._data: dict[str, Any] | None = None
        self._snapshot: Snapshot | None = None
        self._regenerate = False

    @property
    def loaded(self) -> bool:
        """True once the data was read from the store (so it may have changed)."""
        return self._data is not None

    def _load(self, sid: str) -> dict[str, Any]:
        """The data of the well-formed cookie id ``sid``, read from the store."""
        raise NotImplementedError

    def _adopt(self, snapshot: Snapshot | None) -> dict[str, Any]:
        """Take what the store answered for the cookie's id as this session."""
        self._snapshot = snapshot
        self.sid = None if snapshot is None else snapshot.sid
        data = self._data = {} if snapshot is None else dict(snapshot.data)
        return data

    def _loaded(self) -> dict[str, Any]:
        data = self._data
        if data is None:
            sid = self._cookie_sid  # only ever a well-formed id, see __init__
            data = self._adopt(None) if sid is None else self._load(sid)
        self.accessed = True
        return data

    def __getitem__(self, key: str) -> Any:
        return self._loaded()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._loaded()[key] = value
        self.modified = True

    def __delitem__(self, key: str) -> None:
        del self._loaded()[key]
        self.modified = True

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    def __repr__(self) -> str:
        # Never the data nor the id: both end up in logs and tracebacks.
        state = "loaded" if self.loaded else "not loaded"
        return f"<{type(self).__name__} {state}{', modified' if self.modified else ''}>"

    def clear(self) -> None:
        """Empty the session (logout): its copies and its cookie are deleted at the end."""
        self._loaded().clear()
        self.modified = True

    def regenerate(self) -> None:
        """Move the session to a new id when it is saved (call it at login, against
        session fixation): the same data, and the old id logged out everywhere."""
        self._loaded()
        self._regenerate = True
        self.modified = True

    def _plan(self, ttl: int, refresh: bool) -> Outcome | StoreCall:
        """What persisting this request's changes takes: an outcome at once, or
        the store call to make first (then :meth:`_settle` its result)."""
        data = self._data
        if data is None:  # never loaded: no round trip
            return Outcome.NOTHING
        modified, self.modified = self.modified, False
        regenerate, self._regenerate = self._regenerate, False
        if modified:
            return self._plan_write(data, ttl, regenerate=regenerate)
        if refresh and data and self.sid is not None and self.accessed:
            return StoreCall("touch", self.sid, {"ttl": ttl})
        return Outcome.NOTHING

    def _plan_write(
        self, data: dict[str, Any], ttl: int, *, regenerate: bool
    ) -> Outcome | StoreCall:
        sid = self.sid
        if not data:  # emptied: logout
            return Outcome.DELETE if sid is None else StoreCall("delete", sid, {})
        snapshot, self._snapshot = self._snapshot, None  # its CAS tokens are stale after this
        if sid is None:
            return StoreCall("save", new_id(), {"data": data, "ttl": ttl})
        if regenerate:
            # No snapshot: a login carries the data to the new id even if the old
            # one was logged out meanwhile, as Django's own backends do.
            return StoreCall("regenerate", sid, {"data": data, "ttl": ttl})
        return StoreCall(
            "save",
            sid,
            {"data": data, "ttl": ttl, "snapshot": snapshot, "on_conflict": self._save_policy},
        )

    def _settle(self, call: StoreCall, result: Any) -> Outcome:
        """The outcome of ``call`` once the store answered ``result``."""
        if call.method == "touch":
            return Outcome.SET if result else Outcome.NOTHING
        if call.method == "delete":
            self.sid = None
            return Outcome.DELETE
        self.sid = result if call.method == "regenerate" else call.sid
        return Outcome.SET

    def _gone(self) -> Outcome:
        """A conditional save met a logout made elsewhere: the logout stands, and this
        request's changes are dropped. The cookie is left alone: the browser may hold
        a newer one by now (a login in another request moved the session to a new id;
        expiring the cookie here would log the user out again), and the old id reads
        as no session anyway."""
        log.info("session logged out elsewhere during this request; changes dropped")
        self.sid = None
        return Outcome.NOTHING


class Session(_SessionState):
    """One request's session over a :class:`~memsess.SessionStore`: a mapping
    loaded on first use (the Flask and WSGI adapters).

    Loading raises :class:`memsess.NoServerAvailableError` when no copy can be
    read, rather than pretending the session is empty.
    """

    def __init__(
        self, store: SessionStore, cookie_value: str | None, *, on_conflict: str = "merge"
    ) -> None:
        super().__init__(cookie_value, on_conflict=on_conflict)
        self.store = store
        self._held: SessionLock | None = None

    def _load(self, sid: str) -> dict[str, Any]:
        if self.locking and self._held is None:  # held from the load to the save
            lock = self.store.lock(sid)
            lock.acquire()  # SessionLockError when not had within its wait
            self._held = lock
        return self._adopt(self.store.fetch(sid))

    def release(self) -> None:
        """Give back the session's lock if this request holds it (the adapters call
        this at the end of every request, however it ended)."""
        held, self._held = self._held, None
        if held is not None:
            held.release()

    def persist(self, ttl: int, *, refresh: bool) -> Outcome:
        """Write this request's changes with a lifetime of ``ttl`` seconds and say
        what to do with the cookie. Unchanged, with ``refresh``: a touch, not a
        rewrite. A session that was never loaded costs no round trip."""
        try:
            call = self._plan(ttl, refresh)
            if isinstance(call, Outcome):
                return call
            try:
                result = getattr(self.store, call.method)(call.sid, **call.kwargs)
            except SessionGoneError:
                return self._gone()
            return self._settle(call, result)
        finally:
            self.release()


class AsyncSession(_SessionState):
    """One request's session over an :class:`~memsess.AsyncSessionStore` (the
    ASGI and Quart adapters): ``await session.aload()`` reads it, then it is a
    plain mapping; ``await session.apersist(ttl, refresh=...)`` writes it.

    Without a well-formed cookie there is nothing to read: the session is an
    empty mapping at once. Otherwise reading or writing it before ``aload()``
    raises :class:`SessionNotLoadedError` (a sync access must not block the event
    loop); after a failed ``aload()`` it raises that load's
    :class:`memsess.ClusterError` again, never passing for an empty session.
    """

    def __init__(
        self, store: AsyncSessionStore, cookie_value: str | None, *, on_conflict: str = "merge"
    ) -> None:
        super().__init__(cookie_value, on_conflict=on_conflict)
        self.store = store
        self.load_error: ClusterError | None = None
        self._held: AsyncSessionLock | None = None

    async def aload(self) -> AsyncSession:
        """Read the session from the store, once (later calls return at once).
        Raises :class:`memsess.NoServerAvailableError` when no copy can be read."""
        sid = self._cookie_sid
        if self._data is None and sid is not None:
            if self.locking and self._held is None:  # held from the load to the save
                lock = self.store.lock(sid)
                await lock.acquire()  # SessionLockError when not had within its wait
                self._held = lock
            try:
                snapshot = await self.store.fetch(sid)
            except ClusterError as exc:
                self.load_error = exc
                raise
            self.load_error = None
            self._adopt(snapshot)
        return self

    def _load(self, sid: str) -> dict[str, Any]:
        if self.load_error is not None:
            raise self.load_error
        raise SessionNotLoadedError(
            "the session is not loaded yet: `await memsess.adapters.asgi.load_session(request)`"
            " (or `await session.aload()`) before using it, or let the adapter load it"
            " (lazy=False)"
        )

    async def apersist(self, ttl: int, *, refresh: bool) -> Outcome:
        """:meth:`Session.persist`, awaited."""
        try:
            call = self._plan(ttl, refresh)
            if isinstance(call, Outcome):
                return call
            try:
                result = await getattr(self.store, call.method)(call.sid, **call.kwargs)
            except SessionGoneError:
                return self._gone()
            return self._settle(call, result)
        finally:
            await self.arelease()

    async def arelease(self) -> None:
        """:meth:`Session.release`, awaited."""
        held, self._held = self._held, None
        if held is not None:
            await held.release()


# -- the cookie --------------------------------------------------------------------

_EXPIRED: Final = "Thu, 01 Jan 1970 00:00:00 GMT"
# RFC 6265 cookie-name (an RFC 7230 token) and attribute values without ";" or controls.
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ATTRIBUTE: Final = re.compile(r"[\x20-\x3a\x3c-\x7e]*")


class SessionCookie:
    """The session cookie of a middleware: its attributes, checked once (ValueError
    for a name that is not a token, ``;`` or controls in ``path``/``domain``,
    ``samesite="None"`` without ``secure``), and the Set-Cookie header of each
    :class:`Outcome`. ``max_age``: whole seconds; ``samesite``: "Lax", "Strict",
    "None" or None for no attribute."""

    def __init__(
        self,
        name: str,
        *,
        max_age: int,
        secure: bool = False,
        httponly: bool = True,
        samesite: str | None = "Lax",
        path: str = "/",
        domain: str | None = None,
        expire_at_browser_close: bool = False,
    ) -> None:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"cookie_name {name!r} is not an RFC 6265 cookie name")
        for option, value in (("path", path), ("domain", domain or "")):
            if not _ATTRIBUTE.fullmatch(value):
                raise ValueError(f"{option} {value!r} holds ';' or control characters")
        if samesite not in ("Lax", "Strict", "None", None):
            raise ValueError(f'samesite must be "Lax", "Strict", "None" or None, got {samesite!r}')
        if samesite == "None" and not secure:
            raise ValueError('samesite="None" needs secure=True (browsers drop the cookie)')
        self.name, self.max_age = name, max_age
        self.expire_at_browser_close = expire_at_browser_close
        flags = {f"Domain={domain}": bool(domain), "Secure": secure, "HttpOnly": httponly}
        flags[f"SameSite={samesite}"] = samesite is not None
        self._attributes = "; ".join([f"Path={path}", *(flag for flag, on in flags.items() if on)])

    def value(self, header: str) -> str | None:
        """This cookie's value in a ``Cookie`` request header, unchecked (the
        session checks it against the id format); None when absent."""
        for chunk in header.split(";"):
            name, sep, value = chunk.partition("=")
            if sep and name.strip() == self.name:
                return value.strip()
        return None

    def header(self, outcome: Outcome, sid: str | None) -> str | None:
        """The Set-Cookie header ``outcome`` asks for, or None for none."""
        if outcome is Outcome.DELETE:
            return f"{self.name}=; Max-Age=0; Expires={_EXPIRED}; {self._attributes}"
        if outcome is Outcome.NOTHING or sid is None:
            return None
        if self.expire_at_browser_close:
            return f"{self.name}={sid}; {self._attributes}"
        expires = formatdate(time.time() + self.max_age, usegmt=True)
        return f"{self.name}={sid}; Max-Age={self.max_age}; Expires={expires}; {self._attributes}"


# -- the conflict policy -------------------------------------------------------------


#: An adapter's conflict policies: the store's (see SessionStore.save), with
#: "last-write-wins" for "overwrite", and "lock": each request holds the session's lock
#: from its load to its save (its save still merges, should the lock be lost to a fault).
POLICIES: Final = (*ON_CONFLICT, "last-write-wins", "lock")


def conflict_policy(value: str) -> str:
    """``value`` if it names a policy for requests of one user that run at once
    (:data:`POLICIES`; "last-write-wins" is read as "overwrite"), else ValueError at
    configuration time rather than at the first conflict."""
    if value not in POLICIES:
        raise ValueError(
            f"memsess: the conflict policy is one of {', '.join(POLICIES)}, not {value!r}"
        )
    return "overwrite" if value == "last-write-wins" else value


# -- the framework modules, imported on first use ---------------------------------------

#: The adapter modules; each imports its framework, an optional dependency.
FRAMEWORK_MODULES: Final = ("asgi", "django", "flask", "litestar", "quart", "wsgi")

if not TYPE_CHECKING:  # mypy resolves the submodules itself, and checks every other name

    def __getattr__(name: str) -> ModuleType:
        # `import memsess` then `memsess.adapters.flask...`: an attribute access, which a
        # package answers only for submodules imported already.
        if name in FRAMEWORK_MODULES:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
