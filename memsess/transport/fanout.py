"""Send one command to each of several servers before reading any reply.

Writing two copies costs about one round trip, not two. Once a server has
answered, the others get a short straggler window; a server that is still
silent then is cut off (its connection closed) so one hung server adds
milliseconds to a request, not its full timeout.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Callable, Sequence
from math import ceil
from time import monotonic
from typing import Final

from memsess.errors import (
    ConnectError,
    ConnectionClosedError,
    MemsessError,
    ProtocolError,
    TimeoutError,
)
from memsess.protocol import NEED_DATA, Command, ErrorReply, Reply
from memsess.transport.pool import Connection, ServerPool, connect_error

__all__ = ["DEFAULT_STRAGGLER_WINDOW", "Result", "fanout"]

# Seconds the other copies get once one copy has answered. A loopback or LAN
# round trip is well under a millisecond; a few milliseconds absorb scheduling
# noise on a busy 2-core machine without letting a hung server be felt.
DEFAULT_STRAGGLER_WINDOW: Final = 0.005

Result = Reply | MemsessError

_RECV_SIZE: Final = 262144
_POLLIN: Final = select.POLLIN
_POLLOUT: Final = select.POLLOUT
_POLL_FAILED: Final = select.POLLERR | select.POLLHUP | select.POLLNVAL
# Errors from a connection taken from the pool that only mean it went stale
# while idle (the server restarted or closed it): worth one retry on a new one.
_STALE: Final = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN})


class _Exchange:
    """One command on its way to one server."""

    __slots__ = ("command", "conn", "deadline", "index", "out", "pool", "received")

    def __init__(self, index: int, pool: ServerPool, command: Command, deadline: float) -> None:
        self.index = index
        self.pool = pool
        self.command = command
        self.deadline = deadline
        self.conn: Connection = pool.acquire()
        self.out = self.conn.protocol.send(command)
        self.received = False

    def fail(self, error: MemsessError) -> MemsessError:
        self.conn.close()
        return error

    def send(self) -> Result | _Again | None:
        """Write what is left of the command; None while more remains."""
        try:
            sent = self.conn.sock.send(self.out)
        except BlockingIOError:
            return None
        except OSError as exc:
            return self._stale_or(exc, "send")
        self.out = self.out[sent:]
        return None

    def receive(self) -> Result | _Again | None:
        """Read what arrived; the reply once complete, else None."""
        conn = self.conn
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            return self._stale_or(exc, "recv")
        if not data:
            return self._closed_by_server()
        self.received = True
        conn.protocol.receive_data(data)
        try:
            reply = conn.protocol.next_reply()
        except ProtocolError as exc:
            return self.fail(exc)
        if reply is NEED_DATA:
            return None
        assert not isinstance(reply, type(NEED_DATA))
        if isinstance(reply, ErrorReply) and reply.kind != "SERVER_ERROR":
            # After ERROR / CLIENT_ERROR the server may have skipped or kept
            # part of our bytes: the stream can no longer be trusted.
            conn.close()
        else:
            self.pool.release(conn)
        return reply

    def expire(self, straggler: bool) -> Result | _Again:
        """The deadline (or, with ``straggler``, the straggler window) has passed.

        Gives up here; a subclass may move to another socket instead (returns _AGAIN).
        """
        # Closing is what makes a late reply harmless: it can never be read
        # as the answer to a later command on a reused connection.
        spec = self.pool.spec
        what = (
            "no reply within the straggler window after the other copies answered"
            if straggler
            else f"no reply within its timeout of {spec.timeout:g} s"
        )
        return self.fail(TimeoutError(f"memcached {spec.name}: {what}", straggler=straggler))

    def _closed_by_server(self) -> MemsessError | _Again:
        if self.conn.reused and not self.received:
            return self._retry(ConnectionClosedError(self._msg("closed the connection")))
        return self.fail(ConnectionClosedError(self._msg("closed the connection mid-reply")))

    def finish_connect(self) -> Result | _Again | None:
        code = self.conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            return self.fail(connect_error(self.pool.spec, code))
        self.conn.connected = True
        return None

    def _stale_or(self, exc: OSError, op: str) -> MemsessError | _Again:
        error = ConnectionClosedError(self._msg(f"{op} failed: {exc.strerror or exc}"))
        error.__cause__ = exc
        if exc.errno in _STALE and self.conn.reused and not self.received:
            return self._retry(error)
        return self.fail(error)

    def _retry(self, error: MemsessError) -> MemsessError | _Again:
        # A pooled connection that died while idle says nothing about the
        # server now (it may have restarted): one retry on a new connection.
        self.conn.close()
        try:
            self.conn = self.pool.open()
        except ConnectError as exc:
            exc.__context__ = error
            return exc
        self.out = self.conn.protocol.send(self.command)
        self.received = False
        return _AGAIN

    @property
    def interest(self) -> int:
        """The poll events this exchange waits for next."""
        return _POLLOUT if self.out or not self.conn.connected else _POLLIN

    def _msg(self, what: str) -> str:
        return f"memcached {self.pool.spec.name}: {what}"


class _Again:
    """Marker: the exchange moved to a new connection; poll it again."""


_AGAIN: Final = _Again()

#: Builds the exchange of one (index, pool, command, deadline); the UDP transport
#: passes its own, so its reads share this poll loop and its straggler window.
ExchangeFactory = Callable[[int, ServerPool, Command, float], _Exchange]


def fanout(
    pools: Sequence[ServerPool],
    commands: Sequence[Command],
    *,
    straggler_window: float = DEFAULT_STRAGGLER_WINDOW,
    exchange_factory: ExchangeFactory | None = None,
) -> list[Result]:
    """Send ``commands[i]`` to ``pools[i]`` for every i at once; return one
    result per server, in order: its reply, or the error that ended it.

    Each server has its own deadline (its DSN ``timeout``, seconds); once any
    server has replied, the rest have ``straggler_window`` seconds more.
    ``exchange_factory`` builds each exchange (default: over the pool's stream).
    """
    start = _Exchange if exchange_factory is None else exchange_factory
    now = monotonic()
    results: list[Result | None] = [None] * len(pools)
    live: dict[int, _Exchange] = {}
    poller = select.poll()
    for index, (pool, command) in enumerate(zip(pools, commands, strict=True)):
        try:
            exchange = start(index, pool, command, now + pool.spec.timeout)
        except ConnectError as exc:
            results[index] = exc
            continue
        except OSError as exc:  # no socket to be had (e.g. out of file descriptors)
            error = ConnectError(f"memcached {pool.spec.name}: cannot open a socket: {exc}")
            error.__cause__ = exc
            results[index] = error
            continue
        if exchange.conn.connected:
            outcome = exchange.send()
            if outcome is _AGAIN and exchange.conn.connected:
                outcome = exchange.send()
            if isinstance(outcome, MemsessError):
                results[index] = outcome
                continue
        live[exchange.conn.fd] = exchange
        poller.register(exchange.conn.fd, exchange.interest)
    if live:
        _wait(live, poller, results, straggler_window)
    return results  # type: ignore[return-value]  # every slot is filled by now


def _wait(
    live: dict[int, _Exchange],
    poller: select.poll,
    results: list[Result | None],
    straggler_window: float,
) -> None:
    cutoff = float("inf")  # set once the first copy has answered
    while live:
        limit = min(cutoff, *(x.deadline for x in live.values()))
        wait_ms = max(0, ceil((limit - monotonic()) * 1000))
        events = poller.poll(wait_ms)
        for fd, mask in events:
            exchange = live.pop(fd)
            poller.unregister(fd)
            outcome = _step(exchange, mask)
            if outcome is None or outcome is _AGAIN:
                live[exchange.conn.fd] = exchange
                poller.register(exchange.conn.fd, exchange.interest)
                continue
            assert not isinstance(outcome, _Again)
            results[exchange.index] = outcome
            if cutoff == float("inf") and not isinstance(outcome, MemsessError):
                cutoff = monotonic() + straggler_window
        if not events:
            # Only after a poll that found nothing ready: a reply that already
            # arrived is never thrown away because this thread ran late.
            _expire(live, poller, results, cutoff)


def _step(exchange: _Exchange, mask: int) -> Result | _Again | None:
    conn = exchange.conn
    if not conn.connected:
        outcome = exchange.finish_connect()
        if outcome is not None:
            return outcome
    if exchange.out:
        # Fully sent or not, the reply is awaited on the next poll.
        return exchange.send()
    if mask & (_POLLIN | _POLL_FAILED):
        return exchange.receive()
    return None


def _expire(
    live: dict[int, _Exchange],
    poller: select.poll,
    results: list[Result | None],
    cutoff: float,
) -> None:
    now = monotonic()
    for fd, exchange in list(live.items()):
        straggler = now >= cutoff and now < exchange.deadline
        if not straggler and now < exchange.deadline:
            continue
        del live[fd]
        poller.unregister(fd)
        outcome = exchange.expire(straggler)
        if outcome is _AGAIN:  # moved to another socket (a UDP read retried over TCP)
            live[exchange.conn.fd] = exchange
            poller.register(exchange.conn.fd, exchange.interest)
            continue
        assert not isinstance(outcome, _Again)
        results[exchange.index] = outcome
