"""Session reads over memcached's UDP protocol (protocol.txt, "UDP protocol").

A get goes out as one datagram behind an 8-byte frame header; the datagrams of its reply
are put back in order and parsed by the same ClientProtocol as TCP. A reply that is lost,
late, truncated or malformed is retried over TCP to the same server, within fanout's loop.
"""

from __future__ import annotations

import errno
import logging
import secrets
import socket
import threading
from collections import deque
from collections.abc import Mapping
from time import monotonic
from typing import Final

from memsess.dsn import ServerSpec
from memsess.errors import ConnectError, ProtocolError, TimeoutError
from memsess.protocol import Command, ErrorReply, ReplyKind
from memsess.transport.fanout import _AGAIN, DEFAULT_STRAGGLER_WINDOW, Result, _Again, _Exchange
from memsess.transport.pool import (
    DEFAULT_MAX_IDLE,
    Connection,
    ServerPool,
    close_all,
    reset_after_fork,
    resolve,
)
from memsess.transport.udp_core import (
    HEADER,
    MAX_DATAGRAM,
    Reassembly,
    UdpState,
    parse_reply,
    udp_after_loss,
    udp_after_reply,
    udp_claim_retry,
)

__all__ = ["DEFAULT_UDP_WAIT", "DatagramLostError", "UdpExchange", "UdpPool", "UdpRoutes"]

log = logging.getLogger("memsess.transport.udp")

#: Seconds without a new datagram after which a UDP reply counts as lost and the read is
#: retried over TCP. A LAN answers in tens of microseconds; 2 ms absorbs scheduling noise
#: on a busy 2-core box, and leaves 3 ms of the 5 ms straggler window for the TCP retry
#: (~0.1 ms) once the other copies have answered. Too short costs a spurious TCP round
#: trip, never a wrong answer; too long delays a read whose every copy was lost.
DEFAULT_UDP_WAIT: Final = 0.002

_RETRIEVAL: Final = ReplyKind.RETRIEVAL
_HEADER_SIZE: Final = HEADER.size
_ID_SPACE: Final = 1 << 16
_RECV_SIZE: Final = 65536  # over any datagram's size: a datagram is never cut by recv
# A 1 MiB item arrives as ~750 datagrams of ~2.3 KB kernel truesize each; the default
# 208 KiB buffer drops most of them before a busy client reads them. The kernel caps this
# request at net.core.rmem_max (and doubles it); memory is only used while data waits.
_RECEIVE_BUFFER: Final = 1 << 20


class DatagramLostError(TimeoutError):
    """No UDP reply before the straggler window closed, and no time was left to ask over
    TCP. Says nothing about the server (the datagram may be lost), so it is not counted
    against the server's health."""


# -- sockets ---------------------------------------------------------------------------


class _UdpConnection(Connection):
    """A connected UDP socket and the request id it sends next.

    Ids are counted per socket, from a random start: only this socket's own requests can
    reach it (the kernel filters a connected socket by source address), a stale datagram
    is read and dropped by the very next request on the socket, and that request's id
    differs from the last 65,535 sent on it.
    """

    __slots__ = ("next_id",)

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, connected=True)
        self.next_id = secrets.randbelow(_ID_SPACE)

    def take_id(self) -> int:
        request_id = self.next_id
        self.next_id = (request_id + 1) % _ID_SPACE
        return request_id


class UdpPool:
    """Idle connected UDP sockets to one server's UDP port, shared by every thread, and
    whether UDP works there (:class:`UdpState`). A socket is held by one read at a time
    and pooled again only after a complete reply; a forked child drops them all."""

    __slots__ = (
        "__weakref__",
        "_address",
        "_family",
        "_idle",
        "_lock",
        "fallbacks",
        "max_idle",
        "replies",
        "spec",
        "state",
    )

    def __init__(self, spec: ServerSpec, *, max_idle: int = DEFAULT_MAX_IDLE) -> None:
        if spec.udp_port is None:
            raise ValueError(f"memcached {spec.name} has no udp_port")
        self.spec = spec
        self.max_idle = max_idle
        self.state = UdpState()
        # Counts of reads answered over UDP and retried over TCP; a diagnostic (a +=
        # racing in two threads may lose one), not a figure anything depends on.
        self.replies = 0
        self.fallbacks = 0
        self._idle: deque[_UdpConnection] = deque()
        self._lock = threading.Lock()
        self._family, self._address = resolve(spec, spec.udp_port, socket.SOCK_DGRAM)
        reset_after_fork(self)

    def acquire(self) -> _UdpConnection:
        """An idle socket, or a new one; raises OSError if none can be opened."""
        try:
            return self._idle.pop()  # deque.pop is atomic: no lock needed
        except IndexError:
            pass
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
            # Connected: the kernel drops datagrams from anyone else, and reports ICMP
            # "port unreachable" (no -U) as ECONNREFUSED on this socket.
            sock.connect(self._address)
        except OSError:
            sock.close()
            raise
        return _UdpConnection(sock)

    def release(self, conn: Connection) -> None:
        """Pool again a socket whose reply was read in full."""
        if len(self._idle) < self.max_idle and isinstance(conn, _UdpConnection):
            self._idle.append(conn)
        else:
            conn.close()

    def clear(self) -> None:
        """Close every idle socket."""
        close_all(self._idle)

    def usable(self) -> bool:
        """True when this read should try UDP (off and due again: one read claims it)."""
        if self.state.on:
            return True
        now = monotonic()
        with self._lock:
            claimed = udp_claim_retry(self.state, now, retry_interval=self.spec.retry_interval)
            if claimed is not None:
                self.state = claimed
        return claimed is not None

    def replied(self, conn: Connection) -> None:
        """A complete reply came over ``conn``: pool it again, and UDP is on."""
        self.release(conn)
        self.replies += 1
        if self.state.on and not self.state.losses:
            return
        with self._lock:
            before, self.state = self.state, udp_after_reply(self.state)
        if not before.on:
            log.warning("memcached %s: session reads over UDP again", self.spec.name)

    def record_loss(self, reason: str, *, refused: bool = False) -> None:
        self.fallbacks += 1
        now = monotonic()
        with self._lock:
            before = self.state
            self.state = udp_after_loss(
                before, now, reason=reason, retry_interval=self.spec.retry_interval, refused=refused
            )
        if before.on and not self.state.on:
            log.warning(
                "memcached %s: session reads over TCP for %g s: %s",
                self.spec.name,
                self.spec.retry_interval,
                reason,
            )

    def status(self, now: float) -> str:
        """``"on"``, or ``"off (<last loss>; retried in <s> s)"`` for health()."""
        state = self.state
        if state.on:
            return "on"
        return f"off ({state.reason}; retried in {max(0.0, state.retry_at - now):.1f} s)"

    def _forget_after_fork(self) -> None:
        # The child must not read its parent's datagrams, and a lock held by a thread
        # that does not exist in the child would never be released.
        self._lock = threading.Lock()
        self.clear()


# -- one read over UDP, retried over TCP -----------------------------------------------


class UdpExchange(_Exchange):
    """One get, sent over UDP, that moves to a TCP connection of the same server's pool
    when its reply is lost, late, truncated or malformed (fanout re-polls it then).

    While on UDP, ``deadline`` is the end of the UDP wait, counted from the send and
    pushed back by each datagram that arrives; on TCP it is the server's own deadline.
    """

    __slots__ = ("frames", "header", "tcp_deadline", "udp", "udp_wait", "via_udp")

    def __init__(
        self,
        index: int,
        pool: ServerPool,
        command: Command,
        deadline: float,
        *,
        udp: UdpPool,
        udp_wait: float,
    ) -> None:
        # Not _Exchange.__init__: it would open a TCP connection this read may not need.
        conn = udp.acquire()
        self.index = index
        self.pool = pool
        self.command = command
        self.conn = conn
        # A single-datagram reply starts with the very header of its request.
        self.header = HEADER.pack(conn.take_id(), 0, 1, 0)
        self.out = self.header + command.data
        self.received = False
        self.frames: Reassembly | None = None  # built only for a multi-datagram reply
        self.udp = udp
        self.udp_wait = udp_wait
        self.via_udp = True
        self.tcp_deadline = self.deadline = deadline  # until the datagram is sent

    def send(self) -> Result | _Again | None:
        if not self.via_udp:
            return super().send()
        try:
            self.conn.sock.send(self.out)  # a datagram goes out whole or not at all
        except BlockingIOError:
            return None
        except OSError as exc:
            return self._over_tcp(exc)
        self.out = b""
        # The wait starts once the datagram is out: a thread that lost the GIL between
        # building this exchange and sending must not take its own delay for a loss.
        self.deadline = min(self.tcp_deadline, monotonic() + self.udp_wait)
        return None

    def receive(self) -> Result | _Again | None:
        if not self.via_udp:
            return super().receive()
        recv = self.conn.sock.recv
        while True:
            try:
                datagram = recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                return self._over_tcp(exc)
            if self.frames is None and datagram[:_HEADER_SIZE] == self.header:
                return self._finish(datagram[_HEADER_SIZE:])
            if self.frames is None:
                self.frames = Reassembly(HEADER.unpack_from(self.header)[0])
            if self.frames.add(datagram):
                return self._finish(self.frames.payload())
        if self.frames is not None and self.frames.total:
            # Datagrams are arriving: the wait restarts from the latest one.
            self.deadline = min(self.tcp_deadline, monotonic() + self.udp_wait)
        return None

    def expire(self, straggler: bool) -> Result | _Again:
        if not self.via_udp:
            return super().expire(straggler)
        if not straggler:
            return self._over_tcp(f"no complete reply within {self.udp_wait * 1000:g} ms")
        self.udp.record_loss("no reply within the straggler window")
        message = "no UDP reply within the straggler window after the other copies answered"
        return self.fail(DatagramLostError(self._msg(message), straggler=True))

    def _finish(self, payload: bytes) -> Result | _Again:
        try:
            # The socket's own parser: after a whole reply it is as fresh as a new one,
            # and after an error the socket and the parser are dropped together.
            reply = parse_reply(self.command, payload, self.conn.protocol)
        except ProtocolError as exc:
            return self._over_tcp(str(exc))
        if isinstance(reply, ErrorReply):  # e.g. out of memory for the UDP reply: ask TCP
            return self._over_tcp(f"{reply.kind} {reply.message}")
        self.udp.replied(self.conn)
        return reply

    def _over_tcp(self, cause: OSError | str) -> Result | _Again:
        """Drop the UDP socket (a late datagram then has nowhere to land) and send the
        command over a TCP connection of the same server, under the server's deadline."""
        self.conn.close()
        refused = isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED
        if isinstance(cause, OSError):
            cause = "nothing listens on the UDP port (refused)" if refused else f"UDP: {cause}"
        log.debug("memcached %s: read retried over TCP: %s", self.pool.spec.name, cause)
        self.udp.record_loss(cause, refused=refused)
        self.via_udp = False
        self.deadline = self.tcp_deadline
        try:
            self.conn = self.pool.acquire()
        except ConnectError as exc:
            return exc
        self.out = self.conn.protocol.send(self.command)
        self.received = False
        return _AGAIN


class UdpRoutes:
    """fanout's exchange factory for a cluster with UDP: a get to a server with a UDP
    pool goes over UDP (while UDP works there), everything else over its stream pool.

    ``udp_wait``: seconds without a datagram before a read is retried over TCP; by
    default 2 ms, or half of ``straggler_window`` if that is shorter, so that a read
    whose datagram was lost still has half the window to be answered over TCP after
    the other copies have answered (a TCP retry cut short counts against the server).
    """

    __slots__ = ("_routes", "udp_wait")

    def __init__(
        self,
        routes: Mapping[ServerPool, UdpPool],
        *,
        straggler_window: float = DEFAULT_STRAGGLER_WINDOW,
        udp_wait: float | None = None,
    ) -> None:
        if udp_wait is None:
            # A window of 0 cuts every copy but the first anyway: keep the default then.
            udp_wait = min(DEFAULT_UDP_WAIT, straggler_window / 2 or DEFAULT_UDP_WAIT)
        if udp_wait <= 0:
            raise ValueError(f"udp_wait must be > 0 seconds, got {udp_wait}")
        self._routes = dict(routes)
        self.udp_wait = udp_wait

    def __call__(
        self, index: int, pool: ServerPool, command: Command, deadline: float
    ) -> _Exchange:
        udp = self._routes.get(pool)
        if (
            udp is None
            or command.kind is not _RETRIEVAL
            or len(command.data) > MAX_DATAGRAM - _HEADER_SIZE
            or not (udp.state.on or udp.usable())
        ):
            return _Exchange(index, pool, command, deadline)
        try:
            return UdpExchange(index, pool, command, deadline, udp=udp, udp_wait=self.udp_wait)
        except OSError as exc:  # no socket to be had (EMFILE...): this read goes over TCP
            log.warning("memcached %s: no UDP socket, read over TCP: %s", pool.spec.name, exc)
            return _Exchange(index, pool, command, deadline)
