"""The asyncio driver: the same exchanges (memsess.transport.exchange), UDP reads
(memsess.transport.udp_core), wait rules and deadlines as the blocking fan-out, carried
by an event loop's callbacks instead of a ``poll`` loop.

A stream connection is an :class:`asyncio.Protocol` of one event loop, pooled per loop
and server (:class:`LoopPools`); it is held by one batch at a time and pooled again only
with no reply outstanding. Every way a batch can end early — a deadline, the straggler
cut, the awaiting task being cancelled — closes the connections still waiting, so a late
reply can never be read as the answer to a later command.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from functools import partial
from math import inf
from time import monotonic
from typing import Final

from memsess.dsn import ServerSpec
from memsess.errors import ConnectError, MemsessError, TlsError
from memsess.protocol import ClientProtocol, Command
from memsess.transport.exchange import Exchange, Outcome, Reconnect, Result, connect_error
from memsess.transport.fanout import WaitRule
from memsess.transport.pool import ServerPool
from memsess.transport.udp import (
    UdpConnection,
    UdpPool,
    UdpRoutes,
    cut_off,
    read_datagrams,
    record_fallback,
)
from memsess.transport.udp_core import UdpRead

__all__ = ["AsyncFanout", "LoopPools", "StreamConnection"]

log = logging.getLogger("memsess.transport")

#: Idle connections kept per server and event loop. More than a thread pool needs: one
#: loop runs many requests at once (100 tasks keep ~70 commands in flight per server),
#: and with fewer the loop opens and closes connections all the time, each connect
#: costing loop turns that a busy loop may not have within a straggler window.
LOOP_MAX_IDLE: Final = 128


class StreamConnection(asyncio.Protocol):
    """One stream connection of an event loop to server ``index``, with its parser. While
    a batch holds it, ``batch`` and ``slot`` say whom its bytes are for; an idle
    connection that receives anything is closed (nothing was asked, so nothing may be
    read later)."""

    __slots__ = (
        "authenticated",
        "batch",
        "closed",
        "index",
        "pools",
        "protocol",
        "reused",
        "slot",
        "sock",
        "tls",
        "transport",
    )

    def __init__(self, pools: LoopPools, index: int) -> None:
        self.pools = pools
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None  # ours: closable even after its loop closed
        pool = pools.stream[index]
        self.protocol = ClientProtocol(max_value_size=pool.max_value_size)
        tls = pool.tls
        self.tls = None if tls is None else tls.start()
        self.authenticated = False
        self.batch: AsyncFanout | None = None
        self.slot = 0
        self.closed = False  # set first by every close of ours
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        batch = self.batch
        if batch is None:
            self._idle_received(data)
            return
        batch._received(self.slot, self, data)

    def _idle_received(self, data: bytes) -> None:
        tls = self.tls
        if tls is not None and tls.established:
            # TLS records that carry no reply (a session ticket sent after the handshake)
            # may come while idle; anything else was never asked for.
            try:
                if tls.feed(data) == b"" and not tls.pending():
                    return
            except (OSError, ValueError):
                pass
        self.abort()

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    def _ended(self, exc: Exception | None) -> None:
        ours = self.closed
        self.closed = True
        batch = self.batch
        if batch is not None:
            if exc is None:
                batch._received(self.slot, self, b"")
            else:
                error = exc if isinstance(exc, OSError) else OSError(str(exc))
                batch._lost(self.slot, self, error)
        elif not ours:
            # The server closed an idle connection: it restarted, or dropped us. Where
            # the blocking driver learns this from a stale connection, here it is heard
            # at once; either way the server's copies may predate a write it missed.
            self.pools.on_reset(self.index)

    def abort(self) -> None:
        """Close at once, dropping whatever is buffered either way."""
        self.closed = True
        self.batch = None
        if self.transport is not None:
            self.transport.abort()


class LoopPools:
    """The idle stream connections of one event loop, per server."""

    __slots__ = ("_factories", "_idle", "closer", "loop", "max_idle", "on_reset", "stream")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pools: Sequence[ServerPool],
        *,
        on_reset: Callable[[int], None],
        max_idle: int = LOOP_MAX_IDLE,
    ) -> None:
        """``pools``: the blocking pools of the same servers (their resolved addresses);
        ``on_reset(index)``: server ``index`` closed an idle connection."""
        self.loop = loop
        self.stream = pools
        self.on_reset = on_reset
        self.max_idle = max_idle
        #: Set by the store: what closes these pools when the loop shuts down.
        self.closer: object | None = None
        self._factories = [partial(StreamConnection, self, index) for index in range(len(pools))]
        self._idle: list[list[StreamConnection]] = [[] for _ in pools]

    def take(self, index: int) -> StreamConnection | None:
        """An idle connection to server ``index`` still open, or None."""
        idle = self._idle[index]
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    def release(self, index: int, conn: StreamConnection) -> None:
        """Give back a connection with no reply outstanding."""
        idle = self._idle[index]
        if len(idle) < self.max_idle and not conn.closed:
            idle.append(conn)
        else:
            conn.abort()

    async def connect(self, index: int) -> StreamConnection:
        """A new connection to server ``index``; raises OSError when it cannot be made
        (ConnectError while its host has not resolved). The address is the blocking
        pool's, resolved when the store was made or by the maintenance thread, so no
        lookup (and no thread) sits in here."""
        pool = self.stream[index]
        address = pool.address
        if address is None:
            raise pool.unresolved_error()
        loop = self.loop
        sock = socket.socket(pool.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            # (The transport sets TCP_NODELAY on a TCP socket itself.)
            _, conn = await loop.create_connection(self._factories[index], sock=sock)
        except BaseException:
            sock.close()
            raise
        conn.sock = sock
        return conn

    def forget(self) -> None:
        """In a forked child: close this process's copy of every idle socket, touching
        no transport (the loop is the parent's)."""
        for idle in self._idle:
            while idle:
                conn = idle.pop()
                conn.closed = True
                if conn.sock is not None:
                    conn.sock.close()

    def close(self) -> None:
        """Close every idle connection. Once the loop itself is closed its transports
        can no longer be closed, so their sockets are (the transports, unreferenced,
        then go with the garbage)."""
        closed = self.loop.is_closed()
        for idle in self._idle:
            while idle:
                conn = idle.pop()
                if not closed:
                    conn.abort()
                elif conn.sock is not None:
                    conn.closed = True
                    conn.sock.close()


class AsyncFanout:
    """One batch in flight on an event loop: one command per server, ``(index, command)``.
    After ``await run()``: ``results``, ``latency`` and ``exchanges``, as
    :class:`memsess.transport.Fanout` gives them."""

    __slots__ = (
        "_conns",
        "_cut_at",
        "_done",
        "_indexes",
        "_loop",
        "_pending",
        "_pools",
        "_routes",
        "_rule",
        "_sent_at",
        "_start",
        "_stream_pools",
        "_tasks",
        "_timer",
        "_timer_at",
        "_udp",
        "_window",
        "exchanges",
        "latency",
        "results",
    )

    def __init__(
        self,
        pools: LoopPools,
        batch: Sequence[tuple[int, Command]],
        rule: WaitRule,
        *,
        routes: UdpRoutes | None = None,
    ) -> None:
        self._start = start = monotonic()
        self._loop = pools.loop
        self._pools = pools
        self._stream_pools = stream_pools = pools.stream
        self._indexes = indexes = [index for index, _ in batch]
        self._rule = rule
        self._routes = routes
        self._cut_at = inf
        self._window = 0.0  # the straggler window the rule gave when it set _cut_at
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = inf
        self._done: asyncio.Future[None] | None = None
        count = len(indexes)
        self._pending = count
        self._sent_at = [inf] * count  # when each command was written (inf: not yet)
        self._conns: list[StreamConnection | None] = [None] * count
        self._tasks: list[asyncio.Task[None] | None] = [None] * count
        self._udp: list[tuple[UdpPool, UdpRead, UdpConnection] | None] = [None] * count
        self.results: list[Result | None] = [None] * count
        self.latency = [0.0] * count
        exchanges = []
        for index, command in batch:
            spec = stream_pools[index].spec
            exchanges.append(Exchange(index, spec, command, start + spec.timeout))
        self.exchanges = exchanges

    async def run(self) -> AsyncFanout:
        self._done = self._loop.create_future()
        for slot in range(len(self.exchanges)):
            self._begin(slot)
        if self._pending:
            self._arm()
            try:
                await self._done
            except BaseException:  # cancelled: nothing may be left to answer later
                self._abandon()
                raise
        return self

    # -- starting ------------------------------------------------------------------------

    def _begin(self, slot: int) -> None:
        routes = self._routes
        if routes is not None:
            index = self._indexes[slot]
            udp = routes.route(self._stream_pools[index], self.exchanges[slot].command)
            if udp is not None and self._begin_udp(slot, udp, routes.udp_wait):
                return
        self._open_stream(slot)

    def _open_stream(self, slot: int, fresh: bool = False) -> None:
        self._sent_at[slot] = inf  # until written on the new connection
        conn = None if fresh else self._pools.take(self._indexes[slot])
        if conn is None:
            self._tasks[slot] = self._loop.create_task(self._connect(slot))
            return
        self._attach(slot, conn)

    async def _connect(self, slot: int) -> None:
        pools = self._pools
        index = self._indexes[slot]
        try:
            conn = await pools.connect(index)
        except OSError as exc:
            if self._tasks[slot] is asyncio.current_task():
                self._tasks[slot] = None
                error = exc if isinstance(exc, ConnectError) else self._connect_error(slot, exc)
                self._end(slot, error, keep=False)
            return
        if self._tasks[slot] is not asyncio.current_task():  # ended meanwhile: keep it
            pools.release(index, conn)
            return
        self._tasks[slot] = None
        self._attach(slot, conn)

    def _connect_error(self, slot: int, exc: OSError) -> ConnectError:
        spec: ServerSpec = self.exchanges[slot].spec
        if exc.errno:
            error = connect_error(spec, exc.errno)
        else:  # e.g. every address of the host failed, each its own way
            error = ConnectError(f"memcached {spec.name}: connect failed: {exc}")
        error.__cause__ = exc
        return error

    def _attach(self, slot: int, conn: StreamConnection) -> None:
        conn.batch = self
        conn.slot = slot
        self._conns[slot] = conn
        exchange = self.exchanges[slot]
        try:
            out = exchange.begin(conn)
        except TlsError as exc:
            self._end(slot, exc, keep=False)
            return
        self._write(slot, conn, exchange, out)

    def _write(self, slot: int, conn: StreamConnection, exchange: Exchange, out: bytes) -> None:
        transport = conn.transport
        # A connection is attached to a batch only once connection_made() set its transport.
        assert transport is not None  # noqa: S101 - invariant, for the type checker
        transport.write(out)  # buffered by the transport if the socket takes less
        exchange.sent(len(out))
        if exchange.handed_over:
            # Each write (a command, a TLS handshake's flight) gives the server a straggler
            # window of its own from now.
            self._sent_at[slot] = monotonic()
            if self._cut_at != inf:  # sent after the cut was set: its own window from now
                self._arm()

    def _begin_udp(self, slot: int, udp: UdpPool, udp_wait: float) -> bool:
        try:
            conn = udp.acquire()
        except OSError as exc:  # no socket to be had (EMFILE...): this read goes by TCP
            log.warning("memcached %s: no UDP socket, read over TCP: %s", udp.spec.name, exc)
            return False
        exchange = self.exchanges[slot]
        read = UdpRead(exchange.command, conn.take_id(), conn.protocol, udp_wait)
        self._udp[slot] = (udp, read, conn)
        try:
            conn.sock.send(read.datagram)  # a datagram goes out whole or not at all
        except BlockingIOError:
            self._over_tcp(slot, "the socket's send buffer is full")
            return True
        except OSError as exc:
            self._over_tcp(slot, exc)
            return True
        read.datagram = b""
        self._sent_at[slot] = now = monotonic()
        read.sent(now, exchange.deadline)
        self._loop.add_reader(conn.fd, self._udp_ready, slot)
        return True

    # -- events --------------------------------------------------------------------------

    def _received(self, slot: int, conn: StreamConnection, data: bytes) -> None:
        if self._conns[slot] is not conn:
            return
        exchange = self.exchanges[slot]
        outcome = exchange.data_received(data)
        if outcome is None:
            if exchange.out:  # a TLS handshake goes on, or lets the command out now
                self._write(slot, conn, exchange, exchange.out)
            return
        if exchange.keep:  # a whole reply on a connection worth keeping: the common case
            conn.batch = None
            self._conns[slot] = None
            self._pools.release(self._indexes[slot], conn)
            self._finish(slot, outcome)  # type: ignore[arg-type]  # keep: a Reply
            return
        self._act(slot, outcome)

    def _lost(self, slot: int, conn: StreamConnection, exc: OSError) -> None:
        if self._conns[slot] is conn:
            self._act(slot, self.exchanges[slot].failed(exc, "recv"))

    def _act(self, slot: int, outcome: Outcome) -> None:
        """Do what the exchange said: wait on, reconnect, or end with a result."""
        if outcome is None:
            return
        if isinstance(outcome, Reconnect):
            conn = self._conns[slot]
            self._conns[slot] = None
            if conn is not None:
                conn.abort()
            self._open_stream(slot, fresh=True)
            return
        keep = not isinstance(outcome, MemsessError) and self.exchanges[slot].keep
        self._end(slot, outcome, keep=keep)

    def _udp_ready(self, slot: int) -> None:
        pending = self._udp[slot]
        if pending is None:
            return
        udp, read, conn = pending
        outcome = read_datagrams(conn.sock, read)
        if outcome is None:
            read.progressed(monotonic(), self.exchanges[slot].deadline)
        elif isinstance(outcome, (str, OSError)):
            self._over_tcp(slot, outcome)
        else:
            self._loop.remove_reader(conn.fd)
            self._udp[slot] = None
            udp.replied(conn)  # pools the socket again
            self._finish(slot, outcome)

    def _over_tcp(self, slot: int, cause: OSError | str) -> None:
        """Drop the UDP socket (a late datagram then has nowhere to land) and send the
        command over a stream connection of the same server, under its own deadline."""
        pending = self._udp[slot]
        assert pending is not None  # noqa: S101 - invariant: called for a slot reading over UDP
        udp, _, conn = pending
        self._udp[slot] = None
        self._loop.remove_reader(conn.fd)
        conn.close()
        record_fallback(udp, cause)
        self._open_stream(slot)

    # -- time ----------------------------------------------------------------------------

    def _cut_of(self, slot: int) -> float:
        """When ``slot`` may be cut off as a straggler: the rule's cut, and never before
        the window has passed since its command was written. A command not yet written
        (its connect waits for this loop) is never cut: a write cut then would skip a
        copy because the loop was busy, not because the server was."""
        window = self.exchanges[slot].straggler_window(self._window)
        return max(self._cut_at, self._sent_at[slot] + window)

    def _arm(self) -> None:
        """Have :meth:`_expire` called at the earliest time a waiting slot may end."""
        limit = inf
        exchanges = self.exchanges
        for slot, result in enumerate(self.results):
            if result is None:
                pending = self._udp[slot]
                deadline = exchanges[slot].deadline if pending is None else pending[1].deadline
                limit = min(limit, deadline, self._cut_of(slot))
        if limit == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = limit
        self._timer = self._loop.call_later(max(0.0, limit - monotonic()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._timer_at = inf
        now = monotonic()
        for slot, result in enumerate(self.results):
            if result is not None:
                continue
            exchange = self.exchanges[slot]
            pending = self._udp[slot]
            deadline = exchange.deadline if pending is None else pending[1].deadline
            straggler = self._cut_of(slot) <= now < exchange.deadline
            if not straggler and now < deadline:
                continue
            if pending is None:
                self._end(slot, exchange.expired(straggler=straggler), keep=False)
            elif not straggler:
                self._over_tcp(slot, f"no complete reply within {pending[1].udp_wait * 1000:g} ms")
            else:
                self._end(slot, cut_off(pending[0]), keep=False)
        if self._pending:
            self._arm()

    # -- ending --------------------------------------------------------------------------

    def _end(self, slot: int, result: Result, *, keep: bool) -> None:
        self._drop(slot, keep=keep)
        self._finish(slot, result)

    def _drop(self, slot: int, *, keep: bool = False) -> None:
        """Let go of whatever ``slot`` holds: its connection (pooled with ``keep``, else
        closed, so a late reply is never read), its connect, its UDP socket."""
        conn = self._conns[slot]
        if conn is not None:
            self._conns[slot] = None
            conn.batch = None
            if keep:
                self._pools.release(self._indexes[slot], conn)
            else:
                conn.abort()
        task = self._tasks[slot]
        if task is not None:
            self._tasks[slot] = None
            task.cancel()
        pending = self._udp[slot]
        if pending is not None:
            self._udp[slot] = None
            self._loop.remove_reader(pending[2].fd)
            pending[2].close()

    def _finish(self, slot: int, result: Result) -> None:
        if self.results[slot] is not None:
            return
        now = monotonic()
        self.results[slot] = result
        self.latency[slot] = now - self._start
        cut_at = self._rule.on_result(slot, result, now)
        if cut_at != self._cut_at:
            self._cut_at = cut_at
            self._window = max(0.0, cut_at - now)
        self._pending -= 1
        if not self._pending:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            done = self._done
            if done is not None and not done.done():
                done.set_result(None)
        elif cut_at < self._timer_at:
            self._arm()

    def _abandon(self) -> None:
        """The awaiting task was cancelled: close every connection still waiting."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for slot, result in enumerate(self.results):
            if result is None:
                self._drop(slot)
