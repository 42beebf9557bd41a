"""Non-blocking stream connections (TCP, unix) to one server and their idle pool.

A connection is held by one thread at a time: it is popped from the pool,
used for one exchange, and pushed back only when no reply is outstanding.
"""

from __future__ import annotations

import errno
import os
import socket
import weakref
from collections import deque
from typing import Final, Protocol, TypeVar

from memsess.dsn import ServerSpec
from memsess.errors import ConnectError
from memsess.protocol import ClientProtocol
from memsess.transport.exchange import connect_error
from memsess.transport.tls import TlsClient, TlsLink

__all__ = [
    "Connection",
    "ServerPool",
    "close_all",
    "connect_error",
    "reset_after_fork",
    "resolve",
]

# Idle connections kept per server. A request holds one connection per server,
# so this bounds sockets at (threads in flight) while idle.
DEFAULT_MAX_IDLE: Final = 32

_IN_PROGRESS: Final = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY})


class Connection:
    """One socket with its protocol state: the reply parser, the TLS state of a tls://
    server, and whether the server has taken our credentials."""

    __slots__ = ("authenticated", "connected", "fd", "protocol", "reused", "sock", "tls")

    def __init__(self, sock: socket.socket, *, connected: bool, tls: TlsLink | None = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.connected = connected
        self.protocol = ClientProtocol()
        self.reused = False
        self.tls = tls
        self.authenticated = False

    def close(self) -> None:
        self.sock.close()


class ServerPool:
    """Idle connections to one server, shared by every thread of the process."""

    __slots__ = ("__weakref__", "_idle", "address", "family", "max_idle", "spec", "tls")

    def __init__(
        self,
        spec: ServerSpec,
        *,
        max_idle: int = DEFAULT_MAX_IDLE,
        tls: TlsClient | None = None,
    ) -> None:
        """``tls``: how to reach a tls:// server (default: from its DSN entry alone)."""
        self.spec = spec
        self.max_idle = max_idle
        #: Shared with the event loops' pools of the same server (memsess.transport.aio).
        self.tls = TlsClient.for_server(spec, None) if tls is None else tls
        self._idle: deque[Connection] = deque()
        #: Resolved once, here: a DNS lookup must never sit in a request (any driver's).
        self.family, self.address = _resolve_stream(spec)
        reset_after_fork(self)

    def acquire(self) -> Connection:
        """An idle connection, or a new one whose connect may still be in progress.

        Raises ConnectError when the connect fails at once."""
        try:
            conn = self._idle.pop()  # deque.pop is atomic: no lock needed
        except IndexError:
            return self.open()
        conn.reused = True
        return conn

    def open(self) -> Connection:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.family != socket.AF_UNIX:
            # Commands are one small write each; Nagle would hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(self.address)
        tls = self.tls
        link = None if tls is None else tls.start()
        if code == 0:
            return Connection(sock, connected=True, tls=link)
        if code in _IN_PROGRESS and self.family != socket.AF_UNIX:
            return Connection(sock, connected=False, tls=link)
        sock.close()
        raise connect_error(self.spec, code)

    def release(self, conn: Connection) -> None:
        """Give back a connection with no reply outstanding."""
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    def clear(self) -> None:
        """Close every idle connection."""
        close_all(self._idle)

    def _forget_after_fork(self) -> None:
        # A forked child must not share sockets with its parent (a reply meant
        # for one could be read by the other). Closing the child's copy of a
        # descriptor sends nothing: the parent still holds the socket open.
        self.clear()


_Conn = TypeVar("_Conn", bound="Connection")


def close_all(idle: deque[_Conn]) -> None:
    """Close every connection in ``idle``, emptying it; safe while other
    threads pop from it (deque.pop is atomic)."""
    while True:
        try:
            idle.pop().close()
        except IndexError:
            return


def _resolve_stream(spec: ServerSpec) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    address = spec.address
    if isinstance(address, str):
        return socket.AF_UNIX, address
    return resolve(spec, address[1], socket.SOCK_STREAM)


def resolve(
    spec: ServerSpec, port: int, kind: socket.SocketKind
) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """The address family and address of ``spec.host:port``, for sockets of ``kind``.

    Called once, at start-up: a DNS lookup must never sit in a request."""
    try:
        infos = socket.getaddrinfo(spec.host, port, type=kind)
    except socket.gaierror as exc:
        raise ConnectError(f"memcached {spec.name}: cannot resolve host: {exc}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


class _ForkAware(Protocol):
    def _forget_after_fork(self) -> None: ...


_FORK_AWARE: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def reset_after_fork(pool: _ForkAware) -> None:
    """Have ``pool._forget_after_fork()`` called in every forked child, so a
    child never shares a socket with its parent."""
    _FORK_AWARE.add(pool)


def _after_fork_in_child() -> None:
    for pool in list(_FORK_AWARE):
        pool._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
