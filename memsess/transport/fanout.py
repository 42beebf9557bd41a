"""The blocking driver: send one command to each of several servers before reading any
reply, then carry bytes and timers for all of them in one ``poll`` loop.

Writing two copies costs about one round trip, not two. Nothing here decides: what a
socket event means is the :class:`~memsess.transport.exchange.Exchange`'s (and
:class:`~memsess.transport.udp_core.UdpRead`'s) call, and when the operation has heard
enough to cut off the servers still silent is the :class:`WaitRule`'s, which the plan
of the operation passes in. This loop moves bytes, opens and closes sockets, reads the
clock.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Sequence
from math import ceil
from time import monotonic
from typing import Final, Protocol

from memsess.errors import ConnectError, MemsessError, TlsError
from memsess.protocol import Command
from memsess.transport.exchange import Exchange, Outcome, Reconnect, Result
from memsess.transport.pool import Connection, ServerPool
from memsess.transport.udp import (
    UdpConnection,
    UdpPool,
    UdpRoutes,
    cut_off,
    read_datagrams,
    record_fallback,
)
from memsess.transport.udp_core import UdpRead

__all__ = ["DEFAULT_STRAGGLER_WINDOW", "Fanout", "FirstReply", "Result", "WaitRule", "fanout"]

log = logging.getLogger("memsess.transport")

#: Seconds the other servers get once one has replied, for :func:`fanout` without a
#: rule (the stores pass rules of their own, with windows that adapt to latency).
DEFAULT_STRAGGLER_WINDOW: Final = 0.005

_INF: Final = float("inf")
# Bytes asked of one recv. Under glibc's mmap threshold (128 KiB): recv(n) allocates n
# bytes before it reads, and 256 KiB cost an mmap, an mremap and a munmap per call (three
# system calls around every reply, seen with strace -c); a larger reply takes more calls.
_RECV_SIZE: Final = 65536
_POLLIN: Final = select.POLLIN
_POLLOUT: Final = select.POLLOUT
_POLL_FAILED: Final = select.POLLERR | select.POLLHUP | select.POLLNVAL


class WaitRule(Protocol):
    """When an operation has heard enough: told of each server's result as it arrives."""

    def on_result(self, slot: int, result: Result, now: float) -> float:
        """``slot`` ended with ``result`` at monotonic ``now``; returns the monotonic time
        from which the slots still waiting may be cut off (inf: each waits for its own
        deadline; ``now`` or earlier: at once)."""
        ...


class FirstReply:
    """The simplest rule: once any server has replied, the others get ``window`` s more."""

    __slots__ = ("cut_at", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.cut_at = _INF

    def on_result(self, slot: int, result: Result, now: float) -> float:
        if self.cut_at == _INF and not isinstance(result, MemsessError):
            self.cut_at = now + self.window
        return self.cut_at


def fanout(
    pools: Sequence[ServerPool],
    commands: Sequence[Command],
    *,
    straggler_window: float = DEFAULT_STRAGGLER_WINDOW,
    rule: WaitRule | None = None,
    routes: UdpRoutes | None = None,
) -> list[Result]:
    """Send ``commands[i]`` to ``pools[i]`` for every i at once; return one result per
    server, in order: its reply, or the error that ended it.

    Each server has its own deadline (its DSN ``timeout``, seconds). ``rule`` says when
    the servers still silent are cut off (default: ``straggler_window`` seconds after the
    first reply); ``routes`` sends reads over UDP where a server has a UDP port.
    """
    run = Fanout(pools, commands, rule or FirstReply(straggler_window), routes).run()
    return run.results  # type: ignore[return-value]  # every slot is filled by now


class Fanout:
    """One batch in flight. After :meth:`run`: ``results``, ``latency`` (seconds from
    the start to each result) and ``exchanges`` (``retried``: a pooled connection had
    gone stale, so the server was reset since this process last used it)."""

    __slots__ = (
        "_by_fd",
        "_conns",
        "_cut_at",
        "_poller",
        "_pools",
        "_routes",
        "_rule",
        "_sent_at",
        "_start",
        "_udp",
        "_window",
        "exchanges",
        "latency",
        "results",
    )

    def __init__(
        self,
        pools: Sequence[ServerPool],
        commands: Sequence[Command],
        rule: WaitRule,
        routes: UdpRoutes | None = None,
    ) -> None:
        self._start = start = monotonic()
        self._pools = pools
        self._rule = rule
        self._routes = routes
        self._cut_at = _INF
        self._window = 0.0  # the straggler window the rule gave when it set _cut_at
        self._poller = select.poll()
        self._by_fd: dict[int, int] = {}  # socket fd -> slot, for the slots still waiting
        count = len(pools)
        self._conns: list[Connection | None] = [None] * count
        self._udp: list[tuple[UdpPool, UdpRead] | None] = [None] * count
        self._sent_at = [_INF] * count  # when each slot last wrote all it had (inf: not yet)
        self.results: list[Result | None] = [None] * count
        self.latency = [0.0] * count
        exchanges: list[Exchange] = []
        self.exchanges = exchanges
        for slot in range(count):
            spec = pools[slot].spec
            exchanges.append(Exchange(slot, spec, commands[slot], start + spec.timeout))

    def run(self) -> Fanout:
        begin = self._open_stream if self._routes is None else self._begin
        for slot in range(len(self.exchanges)):
            begin(slot)
        by_fd = self._by_fd
        wait = self._wait
        while by_fd:
            wait()
        return self

    # -- starting ------------------------------------------------------------------------

    def _begin(self, slot: int) -> None:
        exchange = self.exchanges[slot]
        routes = self._routes
        udp = None if routes is None else routes.route(self._pools[slot], exchange.command)
        if udp is not None:
            try:
                conn = udp.acquire()
            except OSError as exc:  # no socket to be had (EMFILE...): this read goes by TCP
                log.warning("memcached %s: no UDP socket, read over TCP: %s", udp.spec.name, exc)
            else:
                assert routes is not None  # noqa: S101 - invariant: udp came from routes
                read = UdpRead(exchange.command, conn.take_id(), conn.protocol, routes.udp_wait)
                self._udp[slot] = (udp, read)
                self._conns[slot] = conn
                self._send_datagram(slot, conn, read)
                return
        self._open_stream(slot)

    def _open_stream(self, slot: int, fresh: bool = False) -> None:
        pool = self._pools[slot]
        try:
            conn = pool.open() if fresh else pool.acquire()
        except ConnectError as exc:
            self._finish(slot, exc)
            return
        except OSError as exc:  # no socket to be had (e.g. out of file descriptors)
            error = ConnectError(f"memcached {pool.spec.name}: cannot open a socket: {exc}")
            error.__cause__ = exc
            self._finish(slot, error)
            return
        self._conns[slot] = conn
        exchange = self.exchanges[slot]
        try:
            out = exchange.begin(conn)
        except TlsError as exc:
            conn.close()
            self._conns[slot] = None
            self._finish(slot, exc)
            return
        if conn.connected:
            try:
                sent = conn.sock.send(out)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._act(slot, exchange.failed(exc, "send"))
                return  # finished, or moved to another connection
            if sent:
                exchange.sent(sent)
                if not exchange.out:
                    self._sent_at[slot] = monotonic()
        fd = conn.fd
        self._by_fd[fd] = slot
        self._poller.register(fd, _POLLOUT if exchange.out or not conn.connected else _POLLIN)

    def _send_datagram(self, slot: int, conn: Connection, read: UdpRead) -> None:
        try:
            conn.sock.send(read.datagram)  # a datagram goes out whole or not at all
        except BlockingIOError:
            pass  # the send buffer is full: polled for POLLOUT like a stream
        except OSError as exc:
            self._over_tcp(slot, exc)
            return
        else:
            read.datagram = b""
            self._sent_at[slot] = now = monotonic()
            read.sent(now, self.exchanges[slot].deadline)
        self._watch(slot, conn)

    # -- the loop ------------------------------------------------------------------------

    def _watch(self, slot: int, conn: Connection) -> None:
        """(Re)register ``conn`` for what ``slot`` waits for next."""
        fd = conn.fd
        udp = self._udp[slot]
        if udp is not None:
            interest = _POLLOUT if udp[1].datagram else _POLLIN
        else:
            exchange = self.exchanges[slot]
            interest = _POLLOUT if exchange.out or not conn.connected else _POLLIN
        if fd in self._by_fd:
            self._poller.modify(fd, interest)
        else:
            self._by_fd[fd] = slot
            self._poller.register(fd, interest)

    def _unwatch(self, slot: int) -> Connection | None:
        conn = self._conns[slot]
        if conn is not None and self._by_fd.pop(conn.fd, None) is not None:
            self._poller.unregister(conn.fd)
        self._conns[slot] = None
        return conn

    def _wait(self) -> None:
        # The earliest time a slot still waiting may end (not of all slots: with unequal
        # timeouts, a finished server's deadline passing must not make the loop spin): its
        # deadline, or the straggler cut once its command is with the kernel.
        limit = _INF
        for slot in self._by_fd.values():
            limit = min(limit, self._slot_deadline(slot), self._cut_of(slot))
        wait_ms = max(0, ceil((limit - monotonic()) * 1000))
        events = self._poller.poll(wait_ms)
        for fd, mask in events:
            ready = self._by_fd.get(fd)
            if ready is not None:
                self._step(ready, mask)
        if not events:
            # Only after a poll that found nothing ready: a reply that already arrived is
            # never thrown away because this thread ran late.
            self._expire(monotonic())
        elif limit <= (now := monotonic()):
            # A server that keeps sending (a reply dripped byte by byte, STAT lines without
            # end) never leaves a poll empty: its deadline is its deadline all the same.
            self._expire(now, cut=False)

    def _slot_deadline(self, slot: int) -> float:
        pending = self._udp[slot]
        return self.exchanges[slot].deadline if pending is None else pending[1].deadline

    def _cut_of(self, slot: int) -> float:
        """When ``slot`` may be cut off as a straggler: the rule's cut, and never before a
        window has passed since it last wrote all it had (its command, or a TLS
        handshake's flight: then the server's answer is what is missing). Never while it
        still has bytes to write: a write cut then would be a copy skipped because this
        process was slow (a connect still in progress), not because the server was."""
        pending = self._udp[slot]
        if pending is not None:
            if pending[1].datagram:
                return _INF
        else:
            conn = self._conns[slot]
            exchange = self.exchanges[slot]
            if conn is None or not conn.connected or not exchange.handed_over:
                return _INF
            return max(self._cut_at, self._sent_at[slot] + exchange.straggler_window(self._window))
        return max(self._cut_at, self._sent_at[slot] + self._window)

    def _step(self, slot: int, mask: int) -> None:
        conn: Connection = self._conns[slot]  # type: ignore[assignment]  # polled: it has one
        udp = self._udp[slot]
        if udp is not None:
            self._step_udp(slot, conn, *udp)
            return
        exchange = self.exchanges[slot]
        if not conn.connected:
            code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._end(slot, exchange.connect_failed(code), keep=False)
                return
            conn.connected = True
        if exchange.out:
            self._send(slot, conn)  # fully sent or not, the reply is awaited on a next poll
            if self._conns[slot] is conn:
                self._watch(slot, conn)
        elif mask & (_POLLIN | _POLL_FAILED):
            self._read(slot, conn, exchange)

    def _read(self, slot: int, conn: Connection, exchange: Exchange) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._act(slot, exchange.failed(exc, "recv"))
            return
        outcome = exchange.data_received(data)
        if outcome is None:
            if exchange.out:  # a TLS handshake goes on, or the command may go out now
                self._send(slot, conn)
                if self._conns[slot] is conn:
                    self._watch(slot, conn)
            return
        if exchange.keep:  # (then outcome is the Reply)
            # The common case, kept short: a whole reply on a connection worth keeping.
            reply: Result = outcome  # type: ignore[assignment]
            fd = conn.fd
            del self._by_fd[fd]
            self._poller.unregister(fd)
            self._pools[slot].release(conn)  # (_conns[slot] stays: nothing reads it now)
            now = monotonic()  # _finish, inlined
            self.results[slot] = reply
            self.latency[slot] = now - self._start
            cut_at = self._rule.on_result(slot, reply, now)
            if cut_at != self._cut_at:
                self._cut_at = cut_at
                self._window = max(0.0, cut_at - now)
            return
        self._act(slot, outcome)

    def _send(self, slot: int, conn: Connection) -> None:
        exchange = self.exchanges[slot]
        try:
            sent = conn.sock.send(exchange.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._act(slot, exchange.failed(exc, "send"))
            return
        exchange.sent(sent)
        if not exchange.out:
            self._sent_at[slot] = monotonic()

    def _act(self, slot: int, outcome: Outcome) -> None:
        """Do what the exchange said: wait on, reconnect, or end with a result."""
        if outcome is None:
            return
        if isinstance(outcome, Reconnect):
            conn = self._unwatch(slot)
            if conn is not None:
                conn.close()
            self._open_stream(slot, True)
            return
        keep = not isinstance(outcome, MemsessError) and self.exchanges[slot].keep
        self._end(slot, outcome, keep=keep)

    def _step_udp(self, slot: int, conn: Connection, udp: UdpPool, read: UdpRead) -> None:
        if read.datagram:  # the send buffer had no room for it at first
            self._unwatch(slot)
            self._send_datagram(slot, conn, read)
            return
        outcome = read_datagrams(conn.sock, read)
        if outcome is None:
            read.progressed(monotonic(), self.exchanges[slot].deadline)
        elif isinstance(outcome, (str, OSError)):
            self._over_tcp(slot, outcome)
        else:
            self._unwatch(slot)
            self._udp[slot] = None
            udp.replied(conn)  # pools the socket again
            self._finish(slot, outcome)

    def _over_tcp(self, slot: int, cause: OSError | str) -> None:
        """Drop the UDP socket (a late datagram then has nowhere to land) and send the
        command over a stream connection of the same server, under its own deadline."""
        udp = self._udp[slot]
        assert udp is not None  # noqa: S101 - invariant: called for a slot reading over UDP
        conn = self._unwatch(slot)
        if conn is not None:
            conn.close()
        self._udp[slot] = None
        record_fallback(udp[0], cause)
        self._open_stream(slot)

    def _expire(self, now: float, *, cut: bool = True) -> None:
        """End the slots past their deadline and, with ``cut``, the stragglers."""
        for slot in list(self._by_fd.values()):
            exchange = self.exchanges[slot]
            udp = self._udp[slot]
            deadline = exchange.deadline if udp is None else udp[1].deadline
            straggler = cut and self._cut_of(slot) <= now < exchange.deadline
            if not straggler and now < deadline:
                continue
            if udp is None:
                self._end(slot, exchange.expired(straggler=straggler), keep=False)
            elif not straggler:
                self._over_tcp(slot, f"no complete reply within {udp[1].udp_wait * 1000:g} ms")
            else:
                self._end(slot, cut_off(udp[0]), keep=False)

    # -- ending --------------------------------------------------------------------------

    def _end(self, slot: int, result: Result, *, keep: bool) -> None:
        conn = self._unwatch(slot)
        if conn is not None:
            if keep and not isinstance(conn, UdpConnection):
                self._pools[slot].release(conn)
            else:
                # Closing is what makes a late reply harmless: it can never be read as
                # the answer to a later command on a reused connection.
                conn.close()
        self._udp[slot] = None
        self._finish(slot, result)

    def _finish(self, slot: int, result: Result) -> None:
        now = monotonic()
        self.results[slot] = result
        self.latency[slot] = now - self._start
        cut_at = self._rule.on_result(slot, result, now)
        if cut_at != self._cut_at:
            self._cut_at = cut_at
            self._window = max(0.0, cut_at - now)
