"""Quart adapter: :class:`MemsessSessionInterface`, a ``quart.sessions.SessionInterface``
on an :class:`~memsess.AsyncSessionStore`, and :func:`init_app` to build one from
``app.config``, as the Flask adapter does."""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart
from quart import session as quart_session
from quart.sessions import SessionInterface, SessionMixin
from quart.wrappers import BaseRequestWebsocket, Response
from werkzeug.wrappers import Response as WerkzeugResponse

from memsess.adapters import AsyncSession, Outcome, conflict_policy
from memsess.adapters._config import (
    CONFIG_OPTIONS,
    CONFLICT_KEY,
    SAVE_PATH_KEY,
    build_store,
    check_config_keys,
    permanent_lifetime,
    store_options,
)
from memsess.aio import AsyncSessionStore
from memsess.errors import ClusterError

__all__ = ["CONFIG_OPTIONS", "MemsessSession", "MemsessSessionInterface", "init_app"]

log = logging.getLogger("memsess.adapters")


class MemsessSession(AsyncSession, SessionMixin):
    """``quart.session``: a memsess :class:`~memsess.adapters.AsyncSession`, read
    before the view runs, with Flask's ``permanent`` flag; ``regenerate()`` at login."""


class MemsessSessionInterface(SessionInterface):
    """Sessions in memsess, the cookie holding only the session id; the same
    settings as the Flask adapter (``SESSION_COOKIE_*``, ``PERMANENT_SESSION_LIFETIME``,
    ``SESSION_REFRESH_EACH_REQUEST``; ``SESSION_COOKIE_SAMESITE = None`` is sent as
    ``samesite_default``, "Lax").

    ``quart.session`` is a sync mapping, so the session is read in
    :meth:`open_session`, when the request carries a well-formed session cookie
    (otherwise no round trip). When no copy can be read, the
    :class:`memsess.NoServerAvailableError` is raised where the view first uses
    the session, so ``@app.errorhandler(memsess.ClusterError)`` can answer it and a
    view that never uses the session is served. Websockets get the session too,
    never written back (no response carries a cookie).
    """

    session_class = MemsessSession

    def __init__(self, store: AsyncSessionStore, *, samesite_default: str = "Lax") -> None:
        self.store = store
        self.samesite_default = samesite_default

    def get_cookie_samesite(self, app: Quart) -> str:
        return super().get_cookie_samesite(app) or self.samesite_default

    async def open_session(self, app: Quart, request: BaseRequestWebsocket) -> MemsessSession:
        session = self.session_class(
            self.store,
            request.cookies.get(self.get_cookie_name(app)),
            on_conflict=app.config.get(CONFLICT_KEY, "merge"),
        )
        try:
            await session.aload()
        except ClusterError as exc:
            # Kept by the session and raised again where the view uses it: Quart
            # opens the session outside the view's error handling.
            log.warning("sessions unavailable: %s", exc)
        return session

    async def save_session(
        self, app: Quart, session: SessionMixin, response: Response | WerkzeugResponse | None
    ) -> None:
        if not isinstance(session, MemsessSession):
            raise TypeError(f"not a memsess session: {type(session).__name__}")
        if response is None:  # the end of a websocket: no cookie can be set
            if session.modified:
                log.warning("session changed during a websocket connection: not saved")
            return
        if session.accessed:
            response.vary.add("Cookie")
        # Refresh only a session the view used (read up front, it may not have been);
        # should_set_cookie() reads session.permanent, which counts as a use.
        refresh = session.accessed and self.should_set_cookie(app, session)
        lifetime = permanent_lifetime(app.permanent_session_lifetime)
        outcome = await session.apersist(lifetime, refresh=refresh)
        if outcome is Outcome.NOTHING:
            return
        name = self.get_cookie_name(app)
        options: dict[str, Any] = {
            "domain": self.get_cookie_domain(app),
            "path": self.get_cookie_path(app),
            "secure": self.get_cookie_secure(app),
            "httponly": self.get_cookie_httponly(app),
            "samesite": self.get_cookie_samesite(app),
        }
        if app.config.get("SESSION_COOKIE_PARTITIONED"):
            options["partitioned"] = True
        if outcome is Outcome.DELETE or session.sid is None:
            response.delete_cookie(name, **options)
        else:
            expires = self.get_expiration_time(app, session)
            response.set_cookie(name, session.sid, expires=expires, **options)
        response.vary.add("Cookie")


def init_app(app: Quart, store: AsyncSessionStore | None = None) -> MemsessSessionInterface:
    """Store the sessions of ``app`` in memsess and return the session interface.

    Without ``store``, one is built from ``app.config`` as the Flask adapter's
    ``init_app`` does: ``MEMSESS_SAVE_PATH`` (required) and the optional keys of
    :data:`CONFIG_OPTIONS`, its ttl being ``PERMANENT_SESSION_LIFETIME``; it is
    closed when the app shuts down. The store is kept in
    ``app.extensions["memsess"]``. Any other ``MEMSESS_*`` key is a ValueError naming
    the known ones."""
    check_config_keys(app.config)
    # MEMSESS_ON_CONFLICT: what a save does when another request of the same user
    # saved the session meanwhile ("merge", the default; "error"; "overwrite").
    conflict_policy(app.config.get(CONFLICT_KEY, "merge"))  # ValueError now, not later
    if store is None:
        lifetime = permanent_lifetime(app.permanent_session_lifetime)
        save_path, options = store_options(app.config, ttl=lifetime)
        store = build_store(AsyncSessionStore, save_path, options, setting=SAVE_PATH_KEY)
        app.after_serving(store.aclose)
    app.extensions["memsess"] = store
    interface = MemsessSessionInterface(store)
    app.session_interface = interface  # type: ignore[assignment]  # typed as Quart's default
    app.teardown_request(_release_lock)
    return interface


async def _release_lock(exc: BaseException | None) -> None:
    """After every request, however it ended: give back the session's lock if the
    "lock" policy took one and no save did (a view that raised)."""
    found = quart_session._get_current_object()  # type: ignore[attr-defined]
    if isinstance(found, MemsessSession):
        await found.arelease()
