"""The errors memsess raises, all under :class:`MemsessError`.

::

    MemsessError
    ├── DSNError(ValueError)            a save_path that does not make sense
    ├── SessionIdError(ValueError)      an id that memsess did not issue (malformed)
    ├── SessionTooLargeError(ValueError) data over the servers' item size; nothing sent
    ├── SerializationError(TypeError)   a value the serializer cannot encode
    ├── InvalidKeyError(ValueError)     a memcached key memsess refuses to send
    ├── ProtocolError                   bytes that break the memcached text protocol
    │   └── ServerError                 the server's own CLIENT_ERROR / SERVER_ERROR / ERROR
    ├── TransportError(OSError)         a socket failed (one server's result, see below)
    │   ├── ConnectError                connection refused or could not be opened
    │   │   ├── TlsError                the TLS handshake failed (untrusted, not TLS)
    │   │   └── AuthenticationError     the server refused our credentials, or wants some
    │   ├── TimeoutError                no answer within the server's timeout
    │   └── ConnectionClosedError       the server closed the connection
    └── ClusterError
        ├── NoServerAvailableError      every server of a replica set is down
        ├── WriteError                  no copy of a write could be stored
        └── SessionGoneError(KeyError)  a conditional save met a logout made elsewhere

The stores raise ClusterErrors, never a TransportError or a ServerError of one server:
memsess.transport returns those as values, one per server of a fan-out, and an operation
that fails as a whole reports each server's in its message (a WriteError's ``__cause__``
is the first server's error). memsess.admin, which talks to one server at a time, raises
them as they are.
"""

from __future__ import annotations

import builtins

__all__ = [
    "AuthenticationError",
    "ClusterError",
    "ConnectError",
    "ConnectionClosedError",
    "DSNError",
    "InvalidKeyError",
    "MemsessError",
    "NoServerAvailableError",
    "ProtocolError",
    "SerializationError",
    "ServerError",
    "SessionConflictError",
    "SessionGoneError",
    "SessionIdError",
    "SessionLockError",
    "SessionTooLargeError",
    "TimeoutError",
    "TlsError",
    "TransportError",
    "WriteError",
]


class MemsessError(Exception):
    """Base of every error memsess raises on purpose."""


class DSNError(MemsessError, ValueError):
    """A save_path (DSN) string, or one part of it, does not make sense."""


class SessionIdError(MemsessError, ValueError):
    """A session id is not of the form memsess issues; nothing was sent."""


class SessionTooLargeError(MemsessError, ValueError):
    """Serialized session data exceeds the servers' item size; nothing was sent."""


class SerializationError(MemsessError, TypeError):
    """The serializer cannot encode a value put in the session."""


class InvalidKeyError(MemsessError, ValueError):
    """A memcached key is empty, too long, or holds whitespace or control bytes."""


class ProtocolError(MemsessError):
    """The bytes exchanged do not follow memcached's text protocol."""


class ServerError(ProtocolError):
    """The server answered ERROR, CLIENT_ERROR or SERVER_ERROR: ``kind`` is that word,
    ``message`` the rest of its line, ``server`` its address when known."""

    def __init__(self, kind: str, message: str, *, server: str | None = None) -> None:
        text = f"{kind} {message}".strip()
        super().__init__(text if server is None else f"memcached {server}: {text}")
        self.kind = kind
        self.message = message
        self.server = server


class TransportError(MemsessError, OSError):
    """A connection to one server failed. memsess.transport returns it as that server's
    result (a fan-out goes on with the others) rather than raising it."""


class ConnectError(TransportError):
    """The connection was refused or could not be opened.

    ``refused`` is True when the server actively refused (nothing listens):
    such a server is marked down at once, without waiting for more failures.
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class TlsError(ConnectError):
    """The TLS handshake with a tls:// server failed: its certificate is not trusted or
    not for its name, or it speaks no TLS. Marks the server down at once (a retry within
    its retry_interval would fail the same way)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, refused=True)


class AuthenticationError(ConnectError):
    """memcached's ASCII authentication (``-Y``) refused the DSN's user name and password,
    or the server wants credentials and none were given. Marks the server down at once,
    so a wrong password costs one attempt per retry_interval, not one per request."""

    def __init__(self, message: str) -> None:
        super().__init__(message, refused=True)


class TimeoutError(TransportError, builtins.TimeoutError):
    """The server did not answer within its timeout.

    ``straggler`` is True when the request was cut short because the other
    copies had already answered and the straggler window had passed.
    """

    def __init__(self, message: str, *, straggler: bool = False) -> None:
        super().__init__(message)
        self.straggler = straggler


class ConnectionClosedError(TransportError):
    """The server closed the connection before the reply was complete."""


class ClusterError(MemsessError):
    """The cluster as a whole could not serve a request."""


class NoServerAvailableError(ClusterError):
    """Every server that could hold this session is down or unreachable."""


class WriteError(ClusterError):
    """No copy of a write could be stored on any server of its replica set."""


class SessionConflictError(MemsessError):
    """A conditional save found the session saved by someone else since it was loaded
    (another request of the same user): nothing of this save was applied where the
    other one landed. ``current`` is the session as it is now (a
    :class:`memsess.Snapshot`): merge into it and save again with it as the snapshot,
    or let ``on_conflict="merge"`` do that."""

    def __init__(self, message: str, current: object = None) -> None:
        super().__init__(message)
        self.current = current


class SessionLockError(MemsessError):
    """The session's lock could not be had within the wait given: another request
    holds it (or held it and crashed: its lease ends it)."""


class SessionGoneError(ClusterError, KeyError):
    """A conditional save found the session logged out (a tombstone) since it was
    loaded: the save was not applied, and the logout stands.

    A KeyError too, for code written against older versions; its ``str()`` is the
    message itself (KeyError's would quote it, as it does a missing key)."""

    def __str__(self) -> str:
        return Exception.__str__(self)
