"""Sockets and deadlines: pooled non-blocking connections, the sans-I/O exchange of one
command with one server, the blocking fan-out loop that drives them, and UDP reads."""

from memsess.transport.exchange import Exchange, Ran, Result
from memsess.transport.fanout import (
    DEFAULT_STRAGGLER_WINDOW,
    Fanout,
    FirstReply,
    WaitRule,
    fanout,
)
from memsess.transport.pool import Connection, ServerPool
from memsess.transport.udp import DEFAULT_UDP_WAIT, DatagramLostError, UdpPool, UdpRoutes

__all__ = [
    "DEFAULT_STRAGGLER_WINDOW",
    "DEFAULT_UDP_WAIT",
    "Connection",
    "DatagramLostError",
    "Exchange",
    "Fanout",
    "FirstReply",
    "Ran",
    "Result",
    "ServerPool",
    "UdpPool",
    "UdpRoutes",
    "WaitRule",
    "fanout",
]
