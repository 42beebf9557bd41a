"""memsess: web sessions in a cluster of memcached servers, with redundancy.

``SessionStore.from_dsn("tcp://a:11211, tcp://b:11211", redundancy=2)`` is the
whole entry point (``AsyncSessionStore`` for asyncio); see the README for the adapters
(Flask, Django, WSGI, ASGI: Starlette and FastAPI, Quart, Litestar).
"""

from memsess.aio import AsyncSessionStore
from memsess.cluster import ServerStatus
from memsess.dsn import ServerSpec, parse_dsn
from memsess.errors import (
    AuthenticationError,
    ClusterError,
    ConnectError,
    ConnectionClosedError,
    DSNError,
    InvalidKeyError,
    MemsessError,
    NoServerAvailableError,
    ProtocolError,
    SerializationError,
    ServerError,
    SessionConflictError,
    SessionGoneError,
    SessionIdError,
    SessionLockError,
    SessionTooLargeError,
    TimeoutError,
    TlsError,
    TransportError,
    WriteError,
)
from memsess.sealing import generate_key
from memsess.store import SessionStore, Snapshot

__version__ = "0.1.0"

__all__ = [
    "AsyncSessionStore",
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
    "ServerSpec",
    "ServerStatus",
    "SessionConflictError",
    "SessionGoneError",
    "SessionIdError",
    "SessionLockError",
    "SessionStore",
    "SessionTooLargeError",
    "Snapshot",
    "TimeoutError",
    "TlsError",
    "TransportError",
    "WriteError",
    "__version__",
    "generate_key",
    "parse_dsn",
]
