"""Sockets and deadlines: pooled non-blocking connections and the fan-out loop."""

from memsess.transport.fanout import DEFAULT_STRAGGLER_WINDOW, Result, fanout
from memsess.transport.pool import Connection, ServerPool

__all__ = ["DEFAULT_STRAGGLER_WINDOW", "Connection", "Result", "ServerPool", "fanout"]
