"""WSGI middleware: a lazily loaded :class:`~memsess.adapters.Session` in
``environ["memsess.session"]``, written back (conditionally, so a logout made
elsewhere wins) when the response starts."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Final

from memsess.adapters import Outcome, Session
from memsess.records import lifetime_seconds
from memsess.store import SessionStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ENVIRON_KEY", "Session", "SessionMiddleware"]

ENVIRON_KEY: Final = "memsess.session"
_EXPIRED: Final = "Thu, 01 Jan 1970 00:00:00 GMT"
# RFC 6265 cookie-name (an RFC 7230 token) and attribute values without ";" or controls.
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ATTRIBUTE: Final = re.compile(r"[\x20-\x3a\x3c-\x7e]*")


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
    ) -> None:
        if not _TOKEN.fullmatch(cookie_name):
            raise ValueError(f"cookie_name {cookie_name!r} is not an RFC 6265 cookie name")
        for name, value in (("path", path), ("domain", domain or "")):
            if not _ATTRIBUTE.fullmatch(value):
                raise ValueError(f"{name} {value!r} holds ';' or control characters")
        if samesite not in ("Lax", "Strict", "None", None):
            raise ValueError(f'samesite must be "Lax", "Strict", "None" or None, got {samesite!r}')
        if samesite == "None" and not secure:
            raise ValueError('samesite="None" needs secure=True (browsers drop the cookie)')
        self.app, self.store, self.cookie_name = app, store, cookie_name
        # Whole seconds: memcached's exptime is an integer (0.5 would become 0, "never
        # expires"), and so is a cookie's Max-Age.
        self.max_age = lifetime_seconds(store.ttl if max_age is None else max_age, name="max_age")
        self.expire_at_browser_close = expire_at_browser_close
        self.refresh_each_request = refresh_each_request
        flags = {f"Domain={domain}": bool(domain), "Secure": secure, "HttpOnly": httponly}
        flags[f"SameSite={samesite}"] = samesite is not None
        self._attributes = "; ".join([f"Path={path}", *(flag for flag, on in flags.items() if on)])

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        session = Session(self.store, self._cookie_value(environ))
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

        return self.app(environ, start)

    def _cookie_value(self, environ: WSGIEnvironment) -> str | None:
        header: str = environ.get("HTTP_COOKIE", "")
        for chunk in header.split(";"):
            name, sep, value = chunk.partition("=")
            if sep and name.strip() == self.cookie_name:
                return value.strip()  # checked against the id format by Session
        return None

    def _commit(self, session: Session) -> str | None:
        outcome = session.persist(self.max_age, refresh=self.refresh_each_request)
        if outcome is Outcome.DELETE:
            return f"{self.cookie_name}=; Max-Age=0; Expires={_EXPIRED}; {self._attributes}"
        if outcome is Outcome.NOTHING or session.sid is None:
            return None
        if self.expire_at_browser_close:
            return f"{self.cookie_name}={session.sid}; {self._attributes}"
        expires = formatdate(time.time() + self.max_age, usegmt=True)
        return (
            f"{self.cookie_name}={session.sid}; Max-Age={self.max_age}; Expires={expires}; "
            + self._attributes
        )
