"""memsess: web sessions in a cluster of memcached servers, with redundancy.

``SessionStore.from_dsn("tcp://a:11211, tcp://b:11211", redundancy=2)`` is the
whole entry point (``AsyncSessionStore`` for asyncio); see the README for the adapters
(Flask, Django, WSGI, ASGI: Starlette and FastAPI, Quart, Litestar), reached as
``memsess.adapters.flask`` and so on once ``memsess`` is imported.
"""

import importlib
import logging
from types import ModuleType
from typing import TYPE_CHECKING

from memsess._build import COMPILED, compiled_modules
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
#: True when the hot path runs compiled (mypyc: a wheel built with a C compiler at hand,
#: or scripts/build-compiled), False in the pure-Python build; the same source either way.
__compiled__: bool = len(compiled_modules()) == len(COMPILED)

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
    "__compiled__",
    "__version__",
    "generate_key",
    "parse_dsn",
]

# A library logs, the application decides where to: without this, an application that
# configured no logging would get memsess's warnings on stderr from logging's
# last-resort handler (the logging HOWTO's advice for libraries; urllib3 does the same).
logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from . import adapters as adapters
else:

    def __getattr__(name: str) -> ModuleType:
        # The adapters import optional frameworks (Flask, Django...), so they are imported
        # on first use, never with memsess itself (PEP 562); memsess.adapters does the
        # same for its framework modules, so ``memsess.adapters.flask`` needs no import.
        if name == "adapters":
            return importlib.import_module("memsess.adapters")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
