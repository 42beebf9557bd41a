"""WSGI middleware: a lazily loaded :class:`~memsess.adapters.Session` in
``environ["memsess.session"]``, written back (conditionally, so a logout made
elsewhere wins) when the response starts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from memsess.adapters import Session, SessionCookie, conflict_policy
from memsess.records import lifetime_seconds
from memsess.store import SessionStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ENVIRON_KEY", "Session", "SessionMiddleware"]

ENVIRON_KEY: Final = "memsess.session"


class SessionMiddleware:
    """Puts a :class:`Session` in ``environ["memsess.session"]``; loads it only when
    the app reads it, and saves it when the app calls ``start_response``, so change
    the session before that. Responses with a 5xx status save nothing (as Django).

    ``max_age``: seconds a session lives after its last change (or its last
    request with ``refresh_each_request``), in the store and in the cookie's
    Max-Age/Expires, rounded up to whole seconds; default: the store's ttl.
    ``expire_at_browser_close``: send the cookie without Max-Age/Expires.
    ``samesite``: "Lax" (default), "Strict", "None" (needs ``secure``) or None for
    no attribute.
    """

    def __init__(
        self,
        app: WSGIApplication,
        store: SessionStore,
        *,
        cookie_name: str = "session",
        secure: bool = False,
        httponly: bool = True,
        samesite: str | None = "Lax",
        path: str = "/",
        domain: str | None = None,
        max_age: float | None = None,
        expire_at_browser_close: bool = False,
        refresh_each_request: bool = True,
        on_conflict: str = "merge",
    ) -> None:
        self.app, self.store = app, store
        self.on_conflict = conflict_policy(on_conflict)
        # Whole seconds: memcached's exptime is an integer (0.5 would become 0, "never
        # expires"), and so is a cookie's Max-Age.
        self.max_age = lifetime_seconds(store.ttl if max_age is None else max_age, name="max_age")
        self.refresh_each_request = refresh_each_request
        self.cookie = SessionCookie(
            cookie_name, max_age=self.max_age, secure=secure, httponly=httponly,
            samesite=samesite, path=path, domain=domain,
            expire_at_browser_close=expire_at_browser_close,
        )  # fmt: skip

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        session = Session(self.store, self._cookie_value(environ), on_conflict=self.on_conflict)
        environ[ENVIRON_KEY] = session
        cookie: list[str | None] = []  # computed once, even if start_response is called again

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if not cookie:
                cookie.append(None if status.startswith("5") else self._commit(session))
            if session.accessed:  # a shared cache must not serve this page to others
                headers = [*headers, ("Vary", "Cookie")]
            if cookie[0] is not None:
                headers = [*headers, ("Set-Cookie", cookie[0])]
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, start)
        except BaseException:
            session.release()  # the lock, if the policy took one: never held past the request
            raise

    def _cookie_value(self, environ: WSGIEnvironment) -> str | None:
        return self.cookie.value(environ.get("HTTP_COOKIE", ""))

    def _commit(self, session: Session) -> str | None:
        outcome = session.persist(self.max_age, refresh=self.refresh_each_request)
        return self.cookie.header(outcome, session.sid)
