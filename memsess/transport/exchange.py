"""One command to one server as a sans-I/O state machine: the driver reports what its
socket did (bytes sent, bytes or EOF received, an OSError, the deadline passed) and the
exchange answers with what happens next. No sockets and no clock reads here (the h11
way), so the blocking poll loop and an asyncio loop share every decision.

An event method returns None (keep waiting), the Reply, the MemsessError that ends the
exchange, or RECONNECT: close this socket, open a new one to the same server and call
:meth:`Exchange.begin` again. After None the driver writes ``out`` if it is not empty:
a TLS handshake (:mod:`memsess.transport.tls`) answers the server before the command
goes out.

A connection to a server with credentials authenticates in its first exchange: the
``set`` that memcached's ASCII authentication reads as user and password goes out just
before the command, in the same write, so it costs no round trip of its own.
"""

from __future__ import annotations

import errno
import os
import ssl
from typing import Final, Protocol, TypeAlias

from memsess._chaining import caused_by
from memsess.dsn import ServerSpec
from memsess.errors import (
    AuthenticationError,
    ConnectError,
    ConnectionClosedError,
    MemsessError,
    ProtocolError,
    TimeoutError,
    TlsError,
)
from memsess.protocol import (
    NEED_DATA,
    ClientProtocol,
    Command,
    ErrorReply,
    Reply,
    ReplyKind,
    Status,
)
from memsess.transport.tls import HANDSHAKE_WINDOW, TlsLink

__all__ = [
    "AUTH_KEY",
    "RECONNECT",
    "Exchange",
    "Link",
    "Outcome",
    "Ran",
    "Reconnect",
    "Result",
    "connect_error",
]

#: What an exchange ends with: the server's reply or the error that ended it.
Result: TypeAlias = Reply | MemsessError

# Errors from a connection taken from the pool that only mean it went stale while idle
# (the server restarted or closed it): worth one retry on a new connection.
_STALE: Final = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN})
# Nothing listens there: the server is down, not slow (marked down at once, not after
# repeated timeouts).
_REFUSED: Final = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET})


#: The key of the ``set`` that carries credentials. A server started without ``-Y`` stores
#: it, but with exptime -1 (already expired), so nothing of the password can be read back.
AUTH_KEY: Final = b"memsess:auth"
# In every CLIENT_ERROR memcached (1.6) gives a connection that has not authenticated:
# "unauthenticated" to a read, "bad authentication token format" to a write (which it
# takes for an attempt), "authentication failure".
_AUTHENTICATION: Final = "authenticat"


class Link(Protocol):
    """What an exchange needs of its connection, in any driver: the reply parser, the TLS
    state (None: plain TCP or unix), whether the server has taken our credentials, and
    whether the connection came from the idle pool (and so may have gone stale)."""

    protocol: ClientProtocol
    tls: TlsLink | None
    authenticated: bool
    reused: bool


class Ran(Protocol):
    """A batch any driver ran to its end: per slot its result, the seconds from the start
    to it, and its exchange."""

    @property
    def results(self) -> list[Result | None]: ...
    @property
    def latency(self) -> list[float]: ...
    @property
    def exchanges(self) -> list[Exchange]: ...


class Reconnect:
    """The outcome asking the driver for a new connection to the same server."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "RECONNECT"


RECONNECT: Final = Reconnect()
_NO_PROTOCOL: Final = ClientProtocol()

Outcome: TypeAlias = Reply | MemsessError | Reconnect | None


def _auth_command(spec: ServerSpec) -> Command:
    """The ``set`` that memcached's ASCII authentication reads as "user password"."""
    credentials = f"{spec.username} {spec.password}".encode("ascii")
    return Command(
        b"set %b 0 -1 %d\r\n%b\r\n" % (AUTH_KEY, len(credentials), credentials),
        ReplyKind.STORAGE,
    )


def connect_error(spec: ServerSpec, code: int) -> ConnectError:
    """The ConnectError for a connect that failed with errno ``code``."""
    reason = os.strerror(code) if code else "connection failed"
    return ConnectError(
        f"memcached {spec.name}: connect failed: {reason}", refused=code in _REFUSED
    )


class Exchange:
    """One command on its way to one server over a stream connection.

    ``index`` is the server's place in the cluster, ``deadline`` the monotonic time (s)
    after which it has failed. ``keep`` is set by a Reply the connection may be pooled
    again after: not ERROR or CLIENT_ERROR, since the server may have skipped or kept
    part of our bytes.
    """

    __slots__ = (
        "_authing",
        "_held",
        "command",
        "deadline",
        "index",
        "keep",
        "link",
        "out",
        "protocol",
        "received",
        "retried",
        "reused",
        "spec",
        "tls",
    )

    def __init__(self, index: int, spec: ServerSpec, command: Command, deadline: float) -> None:
        self.index = index
        self.spec = spec
        self.command = command
        self.deadline = deadline
        self.out = b""
        self.keep = False
        self.received = False
        self.reused = False
        self.retried = False
        self.protocol = _NO_PROTOCOL  # until begin()
        self.link: Link | None = None
        self.tls: TlsLink | None = None
        self._held = b""  # the command, until the TLS handshake lets it out
        self._authing = False  # the credentials' reply comes before the command's

    def begin(self, link: Link) -> bytes:
        """Start on connection ``link``; returns the bytes to write."""
        self.link = link
        self.protocol = protocol = link.protocol
        self.reused = link.reused
        self.received = False
        self.tls = tls = link.tls
        spec = self.spec
        if spec.username is not None and not link.authenticated:
            self._authing = True
            out = protocol.send(_auth_command(spec)) + protocol.send(self.command)
        else:
            self._authing = False
            out = protocol.send(self.command)
        if tls is None:
            self.out = out
        elif tls.established:
            self.out = tls.wrap(out)
        else:
            self._held = out
            try:
                self.out = tls.start()
            except (ssl.SSLError, ssl.CertificateError) as exc:  # a context that cannot start
                self.out = b""
                raise caused_by(self._tls_error(exc), exc)  # noqa: B904 - see memsess._chaining
        return self.out

    def sent(self, count: int) -> None:
        """``count`` bytes of ``out`` were written."""
        self.out = self.out[count:]

    @property
    def handed_over(self) -> bool:
        """Whether everything this side has to send so far is written, so that what comes
        next is the server's turn: the command, or a TLS handshake's flight while the
        command waits for the server's answer to it. Only then may a driver cut the slot
        as a straggler (a window after this last write): a server that hangs mid-handshake
        is as slow as one that hangs on a command, and is cut off the same way."""
        return not self.out

    def straggler_window(self, window: float) -> float:
        """The seconds this exchange gets after its last write before it may be cut as
        a straggler, given the command's ``window``: at least HANDSHAKE_WINDOW while a
        TLS handshake holds the command back (see memsess.transport.tls)."""
        return max(window, HANDSHAKE_WINDOW) if self._held else window

    def connect_failed(self, code: int) -> MemsessError:
        return connect_error(self.spec, code)

    def data_received(self, data: bytes) -> Outcome:
        """Bytes read from the server (``b""``: it closed the connection)."""
        tls = self.tls
        if tls is not None:
            return self._tls_received(tls, data)
        if not data:
            return self._closed()
        return self._plain_received(data)

    def _error_reply(self, reply: ErrorReply) -> Outcome:
        if reply.kind == "CLIENT_ERROR" and _AUTHENTICATION in reply.message:
            return AuthenticationError(
                self._msg("wants credentials (memcached -Y): give user:password@ in the DSN")
            )
        # After ERROR or CLIENT_ERROR the server may have skipped or kept part of our bytes.
        self.keep = reply.kind == "SERVER_ERROR"
        return reply

    def _closed(self) -> Outcome:
        if self.reused and not self.received:
            return self._retry_once("closed the connection")
        if not self.received and self.tls is None and not self.reused:
            return ConnectionClosedError(
                self._msg("closed the connection before replying (a TLS port? use tls://)")
            )
        return ConnectionClosedError(self._msg("closed the connection mid-reply"))

    def _tls_received(self, tls: TlsLink, data: bytes) -> Outcome:
        handshaking = not tls.established
        try:
            plain = tls.feed(data)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            return self._tls_error(exc)
        if handshaking:
            if plain is None and not self.reused:
                return TlsError(self._msg("closed the connection during the TLS handshake"))
            self._handshake_went_on(tls)
        if plain is None:
            return self._closed()
        return self._plain_received(plain) if plain else None

    def _handshake_went_on(self, tls: TlsLink) -> None:
        """Queue what the handshake sends next, and the command once it is done."""
        pending = tls.pending()
        if tls.established:
            held, self._held = self._held, b""
            pending += tls.wrap(held)
        if pending:
            self.out += pending

    def _plain_received(self, data: bytes) -> Outcome:
        self.received = True
        self.protocol.receive_data(data)
        return self._parse()

    def _parse(self) -> Outcome:
        try:
            reply = self.protocol.next_reply()
        except ProtocolError as exc:
            return exc
        if reply is NEED_DATA:
            return None
        if self._authing:
            return self._authenticated(reply)
        if reply.__class__ is ErrorReply:
            return self._error_reply(reply)
        self.keep = True
        return reply

    def _authenticated(self, reply: Reply) -> Outcome:
        """``reply`` answers the credentials: on success, what the command's reply says
        (None while it is incomplete); else the AuthenticationError that ends the exchange."""
        self._authing = False
        if reply is not Status.STORED:
            detail = reply.message if isinstance(reply, ErrorReply) else repr(reply)
            return AuthenticationError(
                self._msg(
                    f"refused the credentials of user {self.spec.username!r} ({detail}): "
                    "check the user name and password against its -Y auth file"
                )
            )
        link = self.link
        if link is not None:
            link.authenticated = True
        return self._parse()  # the command's reply may be in already

    def _tls_error(self, exc: Exception) -> TlsError:
        verify = getattr(exc, "verify_message", None)
        if verify:
            reason: object = f"certificate verify failed: {verify}"
        else:
            reason = getattr(exc, "reason", None) or exc
        hint = ""
        if "WRONG_VERSION_NUMBER" in str(exc) or "record layer" in str(exc):
            hint = " (is the server started with -Z? a plain port needs tcp://)"
        error = TlsError(self._msg(f"TLS handshake failed: {reason}{hint}"))
        error.__cause__ = exc
        return error

    def failed(self, exc: OSError, operation: str) -> Outcome:
        """A socket call (``operation``: "send", "recv") raised ``exc``."""
        what = f"{operation} failed: {exc.strerror or exc}"
        if exc.errno in _STALE and not self.received:
            if self.reused:
                return self._retry_once(what)
            if self.tls is None:
                what += " before any reply (a TLS port? use tls://)"
        error = ConnectionClosedError(self._msg(what))
        error.__cause__ = exc
        return error

    def expired(self, *, straggler: bool) -> MemsessError:
        """The deadline passed or, with ``straggler``, the operation no longer needs this
        answer. The driver must close the connection: a late reply can then never be read
        as the answer to a later command on a reused connection."""
        what = (
            "no reply within the straggler window after the other copies answered conclusively"
            if straggler
            else f"no reply within its timeout of {self.spec.timeout:g} s"
        )
        return TimeoutError(self._msg(what), straggler=straggler)

    def _retry_once(self, what: str) -> Outcome:
        # A pooled connection that died while idle says nothing about the server now (it
        # may have restarted): one retry on a new connection, never more.
        if self.retried:
            return ConnectionClosedError(self._msg(what))
        self.retried = True
        return RECONNECT

    def _msg(self, what: str) -> str:
        return f"memcached {self.spec.name}: {what}"
