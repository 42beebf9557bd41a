"""Sockets for session reads over memcached's UDP protocol (protocol.txt, "UDP protocol"):
a pool of connected UDP sockets per server, whether UDP works there, and which reads go
over it. The read itself is :class:`memsess.transport.udp_core.UdpRead`, driven by
fanout's loop, which retries a lost, late, truncated or malformed reply over TCP.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from collections import deque
from collections.abc import Mapping
from time import monotonic
from typing import Final

from memsess.dsn import ServerSpec
from memsess.errors import ConnectError, TimeoutError
from memsess.protocol import DEFAULT_MAX_VALUE_SIZE, Command, Reply, ReplyKind
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
    UdpRead,
    UdpState,
    udp_after_loss,
    udp_after_reply,
    udp_claim_retry,
)

__all__ = [
    "DEFAULT_UDP_WAIT",
    "DatagramLostError",
    "UdpConnection",
    "UdpPool",
    "UdpRoutes",
    "cut_off",
    "read_datagrams",
    "record_fallback",
]

log = logging.getLogger("memsess.transport.udp")

_UDP_RECV_SIZE: Final = 65536  # over any datagram's size: a datagram is never cut by recv

#: Seconds without a new datagram after which a UDP reply counts as lost and the read is
#: retried over TCP. A LAN answers in tens of microseconds; 2 ms absorbs scheduling noise
#: on a busy 2-core box and stays well inside the straggler window, so a read whose
#: datagram was lost is still answered over TCP once the other copies have answered. Too
#: short costs a spurious TCP round trip, never a wrong answer; too long delays a read
#: whose every copy was lost.
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
    """No UDP reply before the read was cut off (the other copies had answered
    conclusively), and no time was left to ask over TCP. Says nothing about the server
    (the datagram may be lost), so it is not counted against the server's health."""


# -- sockets ---------------------------------------------------------------------------


class UdpConnection(Connection):
    """A connected UDP socket and the request id it sends next.

    Ids are counted per socket, from a random start: only this socket's own requests can
    reach it (the kernel filters a connected socket by source address), a stale datagram
    is read and dropped by the very next request on the socket, and that request's id
    differs from the last 65,535 sent on it.
    """

    __slots__ = ("next_id",)

    def __init__(self, sock: socket.socket, max_value_size: int = DEFAULT_MAX_VALUE_SIZE) -> None:
        super().__init__(sock, connected=True, max_value_size=max_value_size)
        self.next_id = secrets.randbelow(_ID_SPACE)

    def take_id(self) -> int:
        request_id = self.next_id
        self.next_id = (request_id + 1) % _ID_SPACE
        return request_id


class UdpPool:
    """Idle connected UDP sockets to one server's UDP port, shared by every thread, and
    whether UDP works there (:class:`UdpState`). A socket is held by one read at a time
    and pooled again only after a complete reply; a forked child drops them all.

    A host that does not resolve is handled as :class:`ServerPool` does: ``acquire``
    raises ConnectError until :meth:`resolve` succeeds (on the maintenance thread)."""

    __slots__ = (
        "__weakref__",
        "_address",
        "_family",
        "_idle",
        "_lock",
        "fallbacks",
        "max_idle",
        "max_value_size",
        "replies",
        "spec",
        "state",
        "unresolved",
    )

    def __init__(
        self,
        spec: ServerSpec,
        *,
        max_idle: int = DEFAULT_MAX_IDLE,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
    ) -> None:
        """``max_value_size``: as for :class:`ServerPool`."""
        if spec.udp_port is None:
            raise ValueError(f"memcached {spec.name} has no udp_port")
        self.spec = spec
        self.max_idle = max_idle
        self.max_value_size = max_value_size
        self.state = UdpState()
        # Counts of reads answered over UDP and retried over TCP; a diagnostic (a +=
        # racing in two threads may lose one), not a figure anything depends on.
        self.replies = 0
        self.fallbacks = 0
        self._idle: deque[UdpConnection] = deque()
        self._lock = threading.Lock()
        self._family = socket.AF_INET
        self._address: tuple[str, int] | None = None
        self.unresolved: ConnectError | None = None
        self.resolve()
        reset_after_fork(self)

    def resolve(self) -> ConnectError | None:
        """As :meth:`ServerPool.resolve`, for the UDP port."""
        if self._address is not None:
            return None
        assert self.spec.udp_port is not None  # noqa: S101 - invariant: __init__ refused None
        try:
            family, address = resolve(self.spec, self.spec.udp_port, socket.SOCK_DGRAM)
        except ConnectError as exc:
            self.unresolved = exc
            return exc
        self._family = family
        self._address = address  # last: a reader that sees it sees the family too
        self.unresolved = None
        return None

    def acquire(self) -> UdpConnection:
        """An idle socket, or a new one; raises OSError if none can be opened
        (ConnectError while the host has not resolved)."""
        try:
            return self._idle.pop()  # deque.pop is atomic: no lock needed
        except IndexError:
            pass
        address = self._address
        if address is None:
            why = self.unresolved
            raise ConnectError(str(why) if why else f"memcached {self.spec.name}: not resolved")
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
            # Connected: the kernel drops datagrams from anyone else, and reports ICMP
            # "port unreachable" (no -U) as ECONNREFUSED on this socket.
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return UdpConnection(sock, self.max_value_size)

    def release(self, conn: Connection) -> None:
        """Pool again a socket whose reply was read in full."""
        if len(self._idle) < self.max_idle and isinstance(conn, UdpConnection):
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


class UdpRoutes:
    """Which reads fanout sends over UDP: a get to a server with a UDP pool (while UDP
    works there); everything else goes over the server's stream pool.

    ``udp_wait``: seconds without a datagram before a read is retried over TCP (default
    2 ms, or half of ``straggler_window`` when one is given and shorter, so that a read
    whose datagram was lost still has half the window to be answered over TCP).
    """

    __slots__ = ("_routes", "udp_wait")

    def __init__(
        self,
        routes: Mapping[ServerPool, UdpPool],
        *,
        straggler_window: float | None = None,
        udp_wait: float | None = None,
    ) -> None:
        if udp_wait is None:
            # A window of 0 cuts every copy but the first anyway: keep the default then.
            half = (straggler_window or 0) / 2
            udp_wait = min(DEFAULT_UDP_WAIT, half or DEFAULT_UDP_WAIT)
        if udp_wait <= 0:
            raise ValueError(f"udp_wait must be > 0 seconds, got {udp_wait}")
        self._routes = dict(routes)
        self.udp_wait = udp_wait

    def route(self, pool: ServerPool, command: Command) -> UdpPool | None:
        """The UDP pool to send ``command`` through, or None for the stream pool."""
        udp = self._routes.get(pool)
        if (
            udp is None
            or command.kind is not _RETRIEVAL
            or len(command.data) > MAX_DATAGRAM - _HEADER_SIZE
            # memcached 1.6 answers each key of a multi-key get over UDP as a message
            # of its own, each framed "1 of 1": those go over TCP.
            or command.data.count(b" ") != 1
            or not (udp.state.on or udp.usable())
        ):
            return None
        return udp


def read_datagrams(sock: socket.socket, read: UdpRead) -> Reply | str | OSError | None:
    """Feed ``read`` every datagram waiting on ``sock``: the reply once it is whole,
    why to retry over TCP (a str, or the OSError ``recv`` raised), or None (wait on)."""
    while True:
        try:
            datagram = sock.recv(_UDP_RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            return exc
        outcome = read.datagram_received(datagram)
        if outcome is not None:
            return outcome


def record_fallback(udp: UdpPool, cause: OSError | str) -> None:
    """A read on ``udp`` is retried over TCP because of ``cause``: note it for the
    server's UDP state (refused: nothing listens there, so UDP is off for a while)."""
    refused = isinstance(cause, ConnectionRefusedError)  # ICMP port unreachable: no -U
    if isinstance(cause, OSError):
        cause = "nothing listens on the UDP port (refused)" if refused else f"UDP: {cause}"
    log.debug("memcached %s: read retried over TCP: %s", udp.spec.name, cause)
    udp.record_loss(cause, refused=refused)


def cut_off(udp: UdpPool) -> DatagramLostError:
    """A read on ``udp`` cut off by the straggler window: the datagram may just be lost,
    which says nothing about the server, so the error is one health does not count."""
    udp.record_loss("no reply within the straggler window")
    return DatagramLostError(
        f"memcached {udp.spec.name}: no UDP reply within the straggler window", straggler=True
    )
