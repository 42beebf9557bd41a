"""The framework adapters, installed as ``memsess.adapters``: ``flask``, ``django``
and ``wsgi``. This module holds the request :class:`Session` that the Flask and
WSGI adapters share; importing it imports no framework."""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator, MutableMapping
from typing import Any

from memsess.errors import SessionGoneError
from memsess.records import is_valid_id
from memsess.store import SessionStore, Snapshot

__all__ = ["Outcome", "Session"]

log = logging.getLogger("memsess.adapters")


class Outcome(enum.Enum):
    """What the response must do with the session cookie after :meth:`Session.persist`."""

    NOTHING = "nothing"
    SET = "set"  # send the cookie with Session.sid
    DELETE = "delete"  # expire the cookie


class Session(MutableMapping[str, Any]):
    """One request's session: a mapping loaded from the store on first use.

    ``sid`` is the id the client may keep: None until the session exists in the
    store. A cookie value the store did not issue (malformed, unknown, expired,
    logged out) is never adopted: such a session starts empty and gets a new id.
    Loading raises :class:`memsess.NoServerAvailableError` when no copy can be
    read, rather than pretending the session is empty.
    """

    def __init__(self, store: SessionStore, cookie_value: str | None) -> None:
        self.store = store
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

    def _loaded(self) -> dict[str, Any]:
        data = self._data
        if data is None:
            sid = self._cookie_sid  # only ever a well-formed id, see __init__
            self._snapshot = None if sid is None else self.store.fetch(sid)
            self.sid = None if self._snapshot is None else sid
            data = self._data = {} if self._snapshot is None else dict(self._snapshot.data)
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

    def persist(self, ttl: int, *, refresh: bool) -> Outcome:
        """Write this request's changes with a lifetime of ``ttl`` seconds and say
        what to do with the cookie. Unchanged, with ``refresh``: a touch, not a
        rewrite. A session that was never loaded costs no round trip."""
        data = self._data
        if data is None:
            return Outcome.NOTHING
        modified, self.modified = self.modified, False
        if not data:
            if not modified:
                return Outcome.NOTHING
            if self.sid is not None:
                self.store.delete(self.sid)
                self.sid = None
            return Outcome.DELETE
        if modified:
            return self._write(data, ttl)
        if refresh and self.sid is not None and self.store.touch(self.sid, ttl=ttl):
            return Outcome.SET
        return Outcome.NOTHING

    def _write(self, data: dict[str, Any], ttl: int) -> Outcome:
        store, sid, snapshot = self.store, self.sid, self._snapshot
        self._snapshot = None  # its CAS tokens are stale after this write
        if sid is None:
            self.sid = store.new_id()
            store.save(self.sid, data, ttl=ttl)
        elif self._regenerate:
            self._regenerate = False
            # No snapshot: a login carries the data to the new id even if the old
            # one was logged out meanwhile, as Django's own backends do.
            self.sid = store.regenerate(sid, data, ttl=ttl)
        else:
            try:
                store.save(sid, data, ttl=ttl, snapshot=snapshot)
            except SessionGoneError:
                log.info("session logged out elsewhere during this request; changes dropped")
                self.sid = None
                return Outcome.DELETE
        return Outcome.SET
