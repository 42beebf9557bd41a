"""The raw-socket floor: the least a Python client can do per request.

Blocking sockets, the command bytes built in advance, and just enough parsing
to know where the reply ends. No key checks, no pooling, no error handling
beyond "this is not the reply we expected". What memsess costs above these is
its own overhead: records, versions, fan-out bookkeeping, health.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

__all__ = ["RawTCP", "RawUDP", "raw_fanout_set", "set_command"]

_RECV: Final = 262144
_END: Final = b"END\r\n"
_STORED: Final = b"STORED\r\n"
# memcached's UDP frame header: request id, sequence number, datagram count, reserved.
_UDP_HEADER: Final = struct.Struct(">HHHH")


def _value_from(reply: bytes | bytearray) -> bytes | None:
    """The value of a complete ``get`` reply, None for a miss."""
    if reply.startswith(_END):
        return None
    eol = reply.index(b"\r\n")
    size = int(reply[:eol].rsplit(b" ", 1)[-1])  # "VALUE <key> <flags> <bytes>"
    return bytes(reply[eol + 2 : eol + 2 + size])


def _reply_length(reply: bytes | bytearray) -> int:
    """Bytes a ``get`` reply for one key takes in all, once its first line is in
    (-1 while it is not): header line, value, ``\\r\\n``, ``END\\r\\n``."""
    if reply.startswith(_END):
        return len(_END)
    eol = reply.find(b"\r\n")
    if eol < 0:
        return -1
    # "VALUE <key> <flags> <bytes>" (no cas unique: we send get, not gets)
    size = int(reply[:eol].rsplit(b" ", 1)[-1])
    return eol + 2 + size + 2 + len(_END)


class RawTCP:
    """One blocking TCP connection to one memcached server."""

    def __init__(self, address: tuple[str, int], *, timeout: float = 1.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(self, key: bytes) -> bytes | None:
        """``get key``: the value, or None on a miss."""
        self.sock.sendall(b"get " + key + b"\r\n")
        return _value_from(self.read_get_reply())

    def set(self, key: bytes, value: bytes, exptime: int = 0) -> None:
        """``set key``, waiting for STORED."""
        self.sock.sendall(set_command(key, value, exptime))
        self.expect(_STORED)

    def read_get_reply(self) -> bytearray:
        reply = bytearray(self.sock.recv(_RECV))
        need = _reply_length(reply)
        while need < 0 or len(reply) < need:
            chunk = self.sock.recv(_RECV)
            if not chunk:
                raise ConnectionError("memcached closed the connection mid-reply")
            reply += chunk
            if need < 0:
                need = _reply_length(reply)
        return reply

    def expect(self, line: bytes) -> None:
        reply = self.sock.recv(_RECV)
        if reply != line:
            raise RuntimeError(f"expected {line!r}, got {reply[:60]!r}")

    def close(self) -> None:
        self.sock.close()


def set_command(key: bytes, value: bytes, exptime: int = 0) -> bytes:
    return b"set %b 0 %d %d\r\n%b\r\n" % (key, exptime, len(value), value)


def raw_fanout_set(first: RawTCP, second: RawTCP, command: bytes) -> None:
    """The two-copy floor: send the same ``set`` to both servers, then read both
    replies, so the two round trips overlap."""
    first.sock.sendall(command)
    second.sock.sendall(command)
    first.expect(_STORED)
    second.expect(_STORED)


class RawUDP:
    """``get`` over UDP with memcached's 8-byte frame header; replies of several
    datagrams are put back in sequence order."""

    def __init__(self, address: tuple[str, int], *, timeout: float = 1.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.request_id = 0

    def get(self, key: bytes) -> bytes | None:
        self.request_id = (self.request_id + 1) & 0xFFFF
        request_id = self.request_id
        self.sock.send(_UDP_HEADER.pack(request_id, 0, 1, 0) + b"get " + key + b"\r\n")
        parts: dict[int, bytes] = {}
        total = 1
        while len(parts) < total:
            datagram = self.sock.recv(65536)
            got_id, sequence, total, _ = _UDP_HEADER.unpack_from(datagram)
            if got_id == request_id:  # a late datagram of an earlier request is dropped
                parts[sequence] = datagram[8:]
        reply = parts[0] if total == 1 else b"".join(parts[n] for n in range(total))
        return _value_from(reply)

    def close(self) -> None:
        self.sock.close()
