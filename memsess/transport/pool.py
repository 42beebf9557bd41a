"""Non-blocking stream connections (TCP, unix) to one server and their idle pool.

A connection is held by one thread at a time: it is popped from the pool,
used for one exchange, and pushed back only when no reply is outstanding.
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from typing import Any, Final, Protocol, TypeVar

from memsess._chaining import caused_by
from memsess._forksafe import call_after_fork
from memsess.dsn import ServerSpec
from memsess.errors import ConnectError
from memsess.protocol import DEFAULT_MAX_VALUE_SIZE, ClientProtocol
from memsess.transport.exchange import connect_error
from memsess.transport.tls import TlsClient, TlsLink

try:  # installed with mypy; mypyc reads the decorator off the source, never calls it
    from mypy_extensions import mypyc_attr
except ImportError:  # not a dependency of memsess: the pure build applies a no-op

    def mypyc_attr(*_: object, **__: object) -> Any:  # type: ignore[misc]
        return lambda cls: cls


__all__ = [
    "DEFAULT_MAX_IDLE",
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


@mypyc_attr(allow_interpreted_subclasses=True)  # udp.UdpConnection
class Connection:
    """One socket with its protocol state: the reply parser (refusing a value over
    ``max_value_size`` bytes before buffering it), the TLS state of a tls:// server, and
    whether the server has taken our credentials."""

    __slots__ = ("authenticated", "connected", "fd", "protocol", "reused", "sock", "tls")

    def __init__(
        self,
        sock: socket.socket,
        *,
        connected: bool,
        tls: TlsLink | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.connected = connected
        self.protocol = ClientProtocol(max_value_size=max_value_size)
        self.reused = False
        self.tls = tls
        self.authenticated = False

    def close(self) -> None:
        self.sock.close()


class ServerPool:
    """Idle connections to one server, shared by every thread of the process.

    Its host is looked up when the pool is made. If that fails, the pool is made all the
    same, with ``address`` None and ``unresolved`` saying why: every connect then fails
    at once (ConnectError, ``refused``) until :meth:`resolve` succeeds, which the
    cluster has the maintenance thread try when the server's probe is due. A DNS lookup
    never sits in a request, in any driver."""

    __slots__ = (
        "_idle",
        "address",
        "family",
        "max_idle",
        "max_value_size",
        "spec",
        "tls",
        "unresolved",
    )

    def __init__(
        self,
        spec: ServerSpec,
        *,
        max_idle: int = DEFAULT_MAX_IDLE,
        tls: TlsClient | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
    ) -> None:
        """``tls``: how to reach a tls:// server (default: from its DSN entry alone).
        ``max_value_size``: the longest value in bytes a reply may carry (the store's
        item size): a longer one is a protocol error before anything of it is buffered."""
        self.spec = spec
        self.max_idle = max_idle
        self.max_value_size = max_value_size
        #: Shared with the event loops' pools of the same server (memsess.transport.aio).
        self.tls = TlsClient.for_server(spec, None) if tls is None else tls
        self._idle: deque[Connection] = deque()
        #: What sockets to the server are opened with, once its host resolved.
        self.family: socket.AddressFamily = socket.AF_UNIX
        self.address: str | tuple[str, int] | None = None
        self.unresolved: ConnectError | None = None
        self.resolve()
        # A forked child must not share sockets with its parent (a reply meant for one
        # could be read by the other): it closes its copies of the idle ones (that sends
        # nothing: the parent still holds them open). The deque is registered, not the
        # pool: the compiled build's pools do not take weak references.
        call_after_fork(self._idle, close_all)

    def resolve(self) -> ConnectError | None:
        """Look the server's host up if that has not succeeded yet (a blocking DNS
        lookup: never call it in a request); returns why it still has no address, or
        None once it has one."""
        if self.address is not None:
            return None
        try:
            family, address = _resolve_stream(self.spec)
        except ConnectError as exc:
            self.unresolved = exc
            return exc
        self.family = family
        self.address = address  # last: a reader that sees it sees the family too
        self.unresolved = None
        return None

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
        address = self.address
        if address is None:
            raise self.unresolved_error()
        family = self.family
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            # Commands are one small write each; Nagle would hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        tls = self.tls
        link = None if tls is None else tls.start()
        size = self.max_value_size
        if code == 0:
            return Connection(sock, connected=True, tls=link, max_value_size=size)
        if code in _IN_PROGRESS and family != socket.AF_UNIX:
            return Connection(sock, connected=False, tls=link, max_value_size=size)
        sock.close()
        raise connect_error(self.spec, code)

    def unresolved_error(self) -> ConnectError:
        """The ConnectError of a connect to a server whose host has not resolved yet: a
        fresh one each time (an exception raised twice would grow its traceback)."""
        why = self.unresolved
        reason = str(why) if why is not None else f"memcached {self.spec.name}: not resolved"
        return ConnectError(reason, refused=True)

    def release(self, conn: Connection) -> None:
        """Give back a connection with no reply outstanding."""
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    def clear(self) -> None:
        """Close every idle connection."""
        close_all(self._idle)


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
    """The address family and address of ``spec.host:port``, for sockets of ``kind``;
    ConnectError when the host does not resolve.

    Called when a pool is made, and by the maintenance thread for a server whose host
    did not resolve then: a DNS lookup must never sit in a request."""
    try:
        infos = socket.getaddrinfo(spec.host, port, type=kind)
    except socket.gaierror as exc:
        error = ConnectError(f"memcached {spec.name}: cannot resolve host: {exc}")
        raise caused_by(error, exc)  # noqa: B904 - see memsess._chaining
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


class _ForkAware(Protocol):
    def _forget_after_fork(self) -> None: ...


def reset_after_fork(owner: _ForkAware) -> None:
    """Have ``owner._forget_after_fork()`` called in every forked child (once its locks
    are free), so a child never shares a socket with its parent. ``owner`` must take
    weak references (see memsess._forksafe.call_after_fork); it is not kept alive."""
    call_after_fork(owner, _forget_after_fork)


def _forget_after_fork(owner: _ForkAware) -> None:
    owner._forget_after_fork()
