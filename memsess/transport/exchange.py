"""One command to one server as a sans-I/O state machine: the driver reports what its
socket did (bytes sent, bytes or EOF received, an OSError, the deadline passed) and the
exchange answers with what happens next. No sockets and no clock reads here (the h11
way), so the blocking poll loop and an asyncio loop share every decision.

An event method returns None (keep waiting), the Reply, the MemsessError that ends the
exchange, or RECONNECT: close this socket, open a new one to the same server and call
:meth:`Exchange.begin` again.
"""

from __future__ import annotations

import errno
import os
from typing import Final, Protocol, TypeAlias

from memsess.dsn import ServerSpec
from memsess.errors import (
    ConnectError,
    ConnectionClosedError,
    MemsessError,
    ProtocolError,
    TimeoutError,
)
from memsess.protocol import NEED_DATA, ClientProtocol, Command, ErrorReply, Reply

__all__ = ["RECONNECT", "Exchange", "Outcome", "Ran", "Reconnect", "Result", "connect_error"]

#: What an exchange ends with: the server's reply or the error that ended it.
Result: TypeAlias = Reply | MemsessError

# Errors from a connection taken from the pool that only mean it went stale while idle
# (the server restarted or closed it): worth one retry on a new connection.
_STALE: Final = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN})
# Nothing listens there: the server is down, not slow (DESIGN: "marked down at once").
_REFUSED: Final = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET})


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
        "command",
        "deadline",
        "index",
        "keep",
        "out",
        "protocol",
        "received",
        "retried",
        "reused",
        "spec",
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

    def begin(self, protocol: ClientProtocol, reused: bool) -> bytes:
        """Start on a connection whose parser is ``protocol``; returns the bytes to write.
        ``reused``: the connection came from the idle pool (it may have gone stale)."""
        self.protocol = protocol
        self.reused = reused
        self.received = False
        self.out = protocol.send(self.command)
        return self.out

    def sent(self, count: int) -> None:
        """``count`` bytes of ``out`` were written."""
        self.out = self.out[count:]

    def connect_failed(self, code: int) -> MemsessError:
        return connect_error(self.spec, code)

    def data_received(self, data: bytes) -> Outcome:
        """Bytes read from the server (``b""``: it closed the connection)."""
        if not data:
            if self.reused and not self.received:
                return self._retry_once("closed the connection")
            return ConnectionClosedError(self._msg("closed the connection mid-reply"))
        protocol = self.protocol
        self.received = True
        protocol.receive_data(data)
        try:
            reply = protocol.next_reply()
        except ProtocolError as exc:
            return exc
        if reply is NEED_DATA:
            return None
        # True only here, for a reply: the driver pools the connection again when set.
        self.keep = reply.__class__ is not ErrorReply or reply.kind == "SERVER_ERROR"
        return reply

    def failed(self, exc: OSError, operation: str) -> Outcome:
        """A socket call (``operation``: "send", "recv") raised ``exc``."""
        what = f"{operation} failed: {exc.strerror or exc}"
        if exc.errno in _STALE and self.reused and not self.received:
            return self._retry_once(what)
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
