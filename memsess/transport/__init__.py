"""Sockets and deadlines: pooled non-blocking connections, the fan-out loop, and UDP reads."""

from memsess.transport.fanout import DEFAULT_STRAGGLER_WINDOW, Result, fanout
from memsess.transport.pool import Connection, ServerPool
from memsess.transport.udp import DEFAULT_UDP_WAIT, DatagramLostError, UdpPool, UdpRoutes

__all__ = [
    "DEFAULT_STRAGGLER_WINDOW",
    "DEFAULT_UDP_WAIT",
    "Connection",
    "DatagramLostError",
    "Result",
    "ServerPool",
    "UdpPool",
    "UdpRoutes",
    "fanout",
]
