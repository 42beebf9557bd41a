"""Flask adapter: :class:`MemsessSessionInterface`, a ``flask.sessions.SessionInterface``
on a memsess store, and :func:`init_app` to build one from ``app.config``."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask import session as flask_session
from flask.sessions import SessionInterface, SessionMixin
from flask.wrappers import Request, Response

from memsess.adapters import Outcome, Session, conflict_policy
from memsess.adapters._config import (
    CONFIG_OPTIONS,
    CONFLICT_KEY,
    SAVE_PATH_KEY,
    build_store,
    check_config_keys,
    permanent_lifetime,
    store_options,
)
from memsess.store import SessionStore

__all__ = ["CONFIG_OPTIONS", "MemsessSession", "MemsessSessionInterface", "init_app"]


class MemsessSession(Session, SessionMixin):
    """``flask.session``: a memsess :class:`~memsess.adapters.Session` (loaded on
    first use; ``regenerate()`` at login) with Flask's ``permanent`` flag."""


class MemsessSessionInterface(SessionInterface):
    """Sessions in memsess, the cookie holding only the session id.

    Honours ``SESSION_COOKIE_NAME/DOMAIN/PATH/SECURE/HTTPONLY/SAMESITE/PARTITIONED``,
    ``PERMANENT_SESSION_LIFETIME`` (the lifetime in memcached of every session,
    and the cookie's Expires for a permanent one) and ``SESSION_REFRESH_EACH_REQUEST``
    (an unchanged permanent session is touched, not rewritten). Flask's default
    ``SESSION_COOKIE_SAMESITE = None`` is sent as ``samesite_default`` ("Lax");
    set it to "Strict" or "None" explicitly to change that.

    A request that never reads the session costs no memcached round trip; one
    that reads it when no copy can be read raises
    :class:`memsess.NoServerAvailableError` inside the view, so
    ``@app.errorhandler(memsess.ClusterError)`` can answer it.
    """

    session_class = MemsessSession

    def __init__(self, store: SessionStore, *, samesite_default: str = "Lax") -> None:
        self.store = store
        self.samesite_default = samesite_default

    def get_cookie_samesite(self, app: Flask) -> str | None:
        return super().get_cookie_samesite(app) or self.samesite_default

    def open_session(self, app: Flask, request: Request) -> MemsessSession:
        # No I/O here: the session loads when the view first reads it.
        return self.session_class(
            self.store,
            request.cookies.get(self.get_cookie_name(app)),
            on_conflict=app.config.get(CONFLICT_KEY, "merge"),
        )

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, MemsessSession):
            raise TypeError(f"not a memsess session: {type(session).__name__}")
        if session.accessed:
            response.vary.add("Cookie")
        # should_set_cookie() reads session.permanent: ask only once it is loaded anyway.
        refresh = session.loaded and self.should_set_cookie(app, session)
        outcome = session.persist(self.lifetime(app), refresh=refresh)
        if outcome is Outcome.NOTHING:
            return
        name, options = self.get_cookie_name(app), self._cookie_options(app)
        if outcome is Outcome.DELETE or session.sid is None:
            response.delete_cookie(name, **options)
        else:
            expires = self.get_expiration_time(app, session)
            response.set_cookie(name, session.sid, expires=expires, **options)
        response.vary.add("Cookie")

    @staticmethod
    def lifetime(app: Flask) -> int:
        """Seconds every session lives in memcached: ``PERMANENT_SESSION_LIFETIME``,
        rounded up to whole seconds; ValueError if it is not positive."""
        return permanent_lifetime(app.permanent_session_lifetime)

    def _cookie_options(self, app: Flask) -> dict[str, Any]:
        options = {
            "domain": self.get_cookie_domain(app),
            "path": self.get_cookie_path(app),
            "secure": self.get_cookie_secure(app),
            "httponly": self.get_cookie_httponly(app),
            "samesite": self.get_cookie_samesite(app),
        }
        if app.config.get("SESSION_COOKIE_PARTITIONED"):  # Flask >= 3.1 and Werkzeug >= 3.1
            options["partitioned"] = self.get_cookie_partitioned(app)
        return options


def init_app(app: Flask, store: SessionStore | None = None) -> MemsessSessionInterface:
    """Store the sessions of ``app`` in memsess and return the session interface.

    Without ``store``, one is built from ``app.config``: ``MEMSESS_SAVE_PATH``
    (required, a PHP-style save_path or a list of server strings) and the optional keys of
    :data:`CONFIG_OPTIONS`, its ttl being ``PERMANENT_SESSION_LIFETIME``. The
    store is kept in ``app.extensions["memsess"]``. Any other ``MEMSESS_*`` key is a
    ValueError naming the known ones."""
    check_config_keys(app.config)
    # MEMSESS_ON_CONFLICT: what a save does when another request of the same user
    # saved the session meanwhile ("merge", the default; "error"; "overwrite").
    conflict_policy(app.config.get(CONFLICT_KEY, "merge"))  # ValueError now, not later
    if store is None:
        save_path, options = store_options(app.config, ttl=MemsessSessionInterface.lifetime(app))
        store = build_store(SessionStore, save_path, options, setting=SAVE_PATH_KEY)
    app.extensions["memsess"] = store
    interface = MemsessSessionInterface(store)
    app.session_interface = interface
    app.teardown_request(_release_lock)
    return interface


def _release_lock(exc: BaseException | None) -> None:
    """After every request, however it ended: give back the session's lock if the
    "lock" policy took one and no save did (a view that raised)."""
    found = flask_session._get_current_object()  # type: ignore[attr-defined]
    if isinstance(found, MemsessSession):
        found.release()
