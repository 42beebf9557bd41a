"""ASGI middleware: an :class:`~memsess.adapters.AsyncSession` in ``scope["session"]``,
which is ``request.session`` in Starlette and FastAPI, read before the app runs (or by
``await load_session(request)``) and written back, conditionally, as the response starts."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, Final

from memsess.adapters import AsyncSession, SessionCookie, conflict_policy
from memsess.adapters._config import build_store, check_store_options
from memsess.aio import AsyncSessionStore
from memsess.errors import ClusterError, SessionLockError
from memsess.records import lifetime_seconds

__all__ = ["SCOPE_KEY", "AsyncSession", "SessionMiddleware", "load_session"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCOPE_KEY: Final = "session"  # where Starlette's request.session looks
_SAME_SITE: Final = {"lax": "Lax", "strict": "Strict", "none": "None", None: None}
# The ASGI extension that lets a websocket handshake be answered with an HTTP response.
_DENIAL: Final = "websocket.http.response"
# RFC 6455 close code 1013: "Try Again Later" (the server is overloaded or down).
_TRY_AGAIN_LATER: Final = 1013
_UNAVAILABLE_BODY: Final = b"Sessions are unavailable, please retry in a minute.\n"

log = logging.getLogger("memsess.adapters")


async def load_session(connection: Mapping[str, Any]) -> AsyncSession:
    """Read the session of a request (a Starlette/FastAPI ``Request`` or
    ``WebSocket``, or an ASGI scope) from the store, once, and return it; needed
    before ``request.session`` is used with ``lazy=True``. Raises
    :class:`memsess.NoServerAvailableError` when no copy can be read."""
    session = connection.get(SCOPE_KEY)
    if not isinstance(session, AsyncSession):
        raise RuntimeError("memsess.adapters.asgi.SessionMiddleware is not installed")
    return await session.aload()


class SessionMiddleware:
    """Puts an :class:`AsyncSession` in ``scope["session"]`` for http and websocket
    connections (lifespan passes through), and saves it before the response starts.

    The session is read before the app runs when the request carries a well-formed
    session cookie (none: an empty session, no round trip); with ``lazy=True`` only
    when the app awaits :func:`load_session`. Changed: a conditional save (a logout
    made elsewhere meanwhile wins); unchanged but read, with ``refresh``: a touch;
    a 5xx response or a websocket saves nothing. A :class:`memsess.ClusterError` from
    the load, or from the app before its response started, is answered 503, never
    served as an empty session (a websocket handshake too, where the server offers
    the ``websocket.http.response`` extension; elsewhere it is closed with code 1013).

    ``store``: an :class:`~memsess.AsyncSessionStore`, or ``dsn=`` a save_path (or a
    list of server strings) to build one with (closed at lifespan shutdown),
    ``store_options`` its other options (``redundancy``, ``timeout``, ``secret_keys``,
    ...; TypeError for one the store does not take). ``max_age``: seconds
    a session lives, in the store and in the cookie's Max-Age/Expires (default: the
    store's ttl). ``same_site``: "lax", "strict", "none" (needs ``secure``) or None.
    ``expire_at_browser_close``: a cookie without Max-Age/Expires.
    """

    def __init__(
        self,
        app: ASGIApp,
        store: AsyncSessionStore | None = None,
        *,
        dsn: str | Sequence[str] | None = None,
        store_options: Mapping[str, Any] | None = None,
        cookie_name: str = "session",
        max_age: float | None = None,
        path: str = "/",
        domain: str | None = None,
        secure: bool = False,
        httponly: bool = True,
        same_site: str | None = "lax",
        expire_at_browser_close: bool = False,
        lazy: bool = False,
        refresh: bool = True,
        on_conflict: str = "merge",
    ) -> None:
        if (store is None) == (dsn is None):
            raise TypeError("SessionMiddleware takes a store or a dsn, not both nor neither")
        if store is not None and store_options:
            raise TypeError("store_options go with dsn=; a store given is built already")
        if same_site not in _SAME_SITE:
            raise ValueError(
                f'same_site must be "lax", "strict", "none" or None, not {same_site!r}'
            )
        ttl = None if max_age is None else lifetime_seconds(max_age, name="max_age")
        self.owns_store = store is None
        if store is None:
            check_store_options(AsyncSessionStore, store_options or {}, setting="store_options")
            options = dict(store_options or {}) | ({} if ttl is None else {"ttl": ttl})
            store = build_store(AsyncSessionStore, dsn, options, setting="dsn")
        self.app, self.store, self.lazy, self.refresh = app, store, lazy, refresh
        self.on_conflict = conflict_policy(on_conflict)
        self.cookie = SessionCookie(
            cookie_name, max_age=store.ttl if ttl is None else ttl, secure=secure,
            httponly=httponly, samesite=_SAME_SITE[same_site], path=path, domain=domain,
            expire_at_browser_close=expire_at_browser_close,
        )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan" and self.owns_store:
            await self.app(scope, receive, self._closing_store(send))
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = scope[SCOPE_KEY] = self._session(scope)
        started = replaced = False

        async def send_with_cookie(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return  # the app's own error page, after a failed load: 503 sent instead
            if message["type"] == "http.response.start":
                if message["status"] == 500 and session.load_error is not None:
                    # A framework (Starlette's ServerErrorMiddleware) answered the
                    # load's ClusterError with a generic 500 before re-raising it.
                    replaced = True
                    await self._unavailable(send)
                    return
                message = await self._commit(session, message)
                started = True
            await send(message)

        try:
            if not self.lazy:
                await session.aload()
            await self.app(scope, receive, send_with_cookie)
        except (ClusterError, SessionLockError) as exc:
            if started:
                raise
            log.warning("sessions unavailable, answered 503: %s", exc)
            if not replaced:
                await self._unavailable(send)
        finally:
            await session.arelease()  # the lock, if the policy took one

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = scope[SCOPE_KEY] = self._session(scope)
        answered = False  # the handshake: accepted or refused

        async def send_tracking(message: Message) -> None:
            nonlocal answered
            answered = True
            await send(message)

        try:
            if not self.lazy:
                await session.aload()
            await self.app(scope, receive, send_tracking)
        except ClusterError as exc:
            if answered:
                raise
            log.warning("sessions unavailable, websocket refused: %s", exc)
            if _DENIAL in scope.get("extensions", {}):
                await self._unavailable(send, _DENIAL)
            else:
                await send({"type": "websocket.close", "code": _TRY_AGAIN_LATER})
            return
        if session.modified:
            # A websocket has no response to carry a cookie, as in Starlette and Quart.
            log.warning("session changed during a websocket connection: not saved")

    def _session(self, scope: Scope) -> AsyncSession:
        cookies = [value for name, value in scope["headers"] if name == b"cookie"]
        value = self.cookie.value(b"; ".join(cookies).decode("latin-1")) if cookies else None
        return AsyncSession(self.store, value, on_conflict=self.on_conflict)

    async def _commit(self, session: AsyncSession, message: Message) -> Message:
        """Persist the session, and the response start ``message`` with its headers."""
        headers = list(message.get("headers", ()))
        if session.accessed:  # a shared cache must not serve this page to others
            headers.append((b"vary", b"Cookie"))
        if message["status"] < 500:  # an error page saves nothing, as in the WSGI middleware
            outcome = await session.apersist(self.cookie.max_age, refresh=self.refresh)
            cookie = self.cookie.header(outcome, session.sid)
            if cookie is not None:
                headers.append((b"set-cookie", cookie.encode("latin-1")))
        return {**message, "headers": headers}

    @staticmethod
    async def _unavailable(send: Send, kind: str = "http.response") -> None:
        """Answer 503, as an http response or (``kind`` _DENIAL) a websocket's."""
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(_UNAVAILABLE_BODY)).encode()),
            (b"retry-after", b"60"),
        ]
        await send({"type": f"{kind}.start", "status": 503, "headers": headers})
        await send({"type": f"{kind}.body", "body": _UNAVAILABLE_BODY})

    def _closing_store(self, send: Send) -> Send:
        """``send`` for the lifespan protocol, closing the store this middleware built
        before the app's shutdown is reported complete."""

        async def send_closing(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.store.aclose()
            await send(message)

        return send_closing
