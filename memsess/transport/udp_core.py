"""The pure half of the UDP transport: memcached's 8-byte frame header, reassembly and
parsing of a reply, and whether UDP is used with a server, as transitions of
(state, event, now). No sockets here; ``memsess.transport.udp`` does the I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Final

from memsess.errors import ProtocolError
from memsess.protocol import MAX_LINE_LENGTH, ClientProtocol, Command, ErrorReply, NeedData, Reply

__all__ = [
    "DEFAULT_LOSS_THRESHOLD",
    "HEADER",
    "MAX_DATAGRAM",
    "Reassembly",
    "UdpRead",
    "UdpState",
    "parse_reply",
    "udp_after_loss",
    "udp_after_reply",
    "udp_claim_retry",
]

#: protocol.txt, "UDP protocol": request id, sequence number, total datagrams in the
#: message, reserved (0); 16-bit integers in network byte order.
HEADER: Final = struct.Struct("!HHHH")
#: memcached's UDP_MAX_PAYLOAD_SIZE: no reply datagram is longer, header included (a
#: 5000-byte value came back as 1400 + 1400 + 1400 + 857 bytes). A request must fit one
#: datagram (the server drops one whose count is not 1); this size also keeps it in one
#: Ethernet frame, never IP fragments.
MAX_DATAGRAM: Final = 1400
#: Reads in a row whose UDP reply was lost before UDP to that server is switched off for
#: its retry_interval: a firewall that drops UDP silently must not cost a wait per read.
DEFAULT_LOSS_THRESHOLD: Final = 5

_HEADER_SIZE: Final = HEADER.size


class Reassembly:
    """The datagrams of one reply, arriving in any order.

    Datagrams of another request, duplicates and malformed ones are dropped and counted
    in ``discarded``; memcached repeats the total count in every datagram of a reply.
    """

    __slots__ = ("_parts", "discarded", "request_id", "total")

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.total = 0  # datagrams in the reply, once one has arrived
        self.discarded = 0
        self._parts: dict[int, bytes] = {}

    def add(self, datagram: bytes) -> bool:
        """Take one datagram (header included); True once the reply is complete."""
        if len(datagram) < _HEADER_SIZE:
            self.discarded += 1
            return False
        request_id: int
        sequence: int
        total: int
        request_id, sequence, total, _ = HEADER.unpack_from(datagram)
        if (
            request_id != self.request_id
            or not sequence < total
            or (self.total and total != self.total)
            or sequence in self._parts
        ):
            self.discarded += 1
            return False
        self.total = total
        self._parts[sequence] = datagram[_HEADER_SIZE:]
        return len(self._parts) == total

    @property
    def complete(self) -> bool:
        return bool(self.total) and len(self._parts) == self.total

    def payload(self) -> bytes:
        """The reply's bytes, datagrams in sequence order; only once complete."""
        if not self.complete:
            raise ValueError(f"{len(self._parts)} of {self.total or '?'} datagrams received")
        return b"".join(self._parts[sequence] for sequence in range(self.total))


def parse_reply(command: Command, payload: bytes, protocol: ClientProtocol | None = None) -> Reply:
    """The one reply ``payload`` holds to ``command``, parsed by a fresh ClientProtocol
    (or ``protocol``, which must be as fresh: nothing pending, nothing buffered).

    Raises ProtocolError unless ``payload`` is exactly one complete reply to ``command``
    (a missing datagram cuts it short, so nothing partial is ever returned), and for an
    item under a key that was not asked for. ``protocol`` is as fresh again on return,
    and must be dropped after an error.
    """
    if not payload:  # receive_data(b"") would mean EOF
        raise ProtocolError("empty UDP reply")
    if protocol is None:
        protocol = ClientProtocol()
    protocol.send(command)
    protocol.receive_data(payload)
    reply = protocol.next_reply()
    if isinstance(reply, NeedData):  # the datagrams ended mid-reply
        raise ProtocolError(f"incomplete UDP reply: {len(payload)} bytes end mid-reply")
    protocol.next_reply()  # raises ProtocolError for any byte after the reply
    return reply  # the parser refused any item under a key that was not asked for


class UdpRead:
    """The UDP half of one get as a sans-I/O state machine: the datagram to send, the
    reassembly of its reply, and when to give up on UDP (then the read goes over TCP).

    ``deadline`` is the end of the UDP wait: ``udp_wait`` seconds after the send, pushed
    back by each datagram that arrives, never past ``tcp_deadline`` (the server's own).
    """

    __slots__ = (
        "command",
        "datagram",
        "deadline",
        "frames",
        "header",
        "max_datagrams",
        "protocol",
        "udp_wait",
    )

    def __init__(
        self, command: Command, request_id: int, protocol: ClientProtocol, udp_wait: float
    ) -> None:
        self.command = command
        self.protocol = protocol
        # The most datagrams a reply the parser would take can fill (one value of at most
        # its max_value_size, and its lines): a reply announced as longer is refused at
        # its first datagram, before the rest is buffered for reassembly.
        longest = protocol.max_value_size + 2 * MAX_LINE_LENGTH
        self.max_datagrams = -(-longest // (MAX_DATAGRAM - _HEADER_SIZE))
        # A single-datagram reply starts with the very header of its request.
        self.header = HEADER.pack(request_id, 0, 1, 0)
        self.datagram = self.header + command.data
        self.frames: Reassembly | None = None  # built only for a multi-datagram reply
        self.udp_wait = udp_wait
        self.deadline = float("inf")

    def sent(self, now: float, tcp_deadline: float) -> None:
        """The datagram went out at ``now``: the wait starts then, not when the read was
        built (a thread that lost the GIL meanwhile must not take its delay for a loss)."""
        self.deadline = min(tcp_deadline, now + self.udp_wait)

    def datagram_received(self, datagram: bytes) -> Reply | str | None:
        """The reply once complete; a reason (str) to go over TCP instead; else None."""
        frames = self.frames
        if frames is None:
            if datagram[:_HEADER_SIZE] == self.header:
                return self._finish(datagram[_HEADER_SIZE:])
            frames = self.frames = Reassembly(HEADER.unpack_from(self.header)[0])
        if frames.add(datagram):
            return self._finish(frames.payload())
        if frames.total > self.max_datagrams:
            return (
                f"a UDP reply of {frames.total} datagrams, longer than any value of at most"
                f" {self.protocol.max_value_size} bytes (max_value_size)"
            )
        return None

    def progressed(self, now: float, tcp_deadline: float) -> None:
        """After a batch of datagrams: while a reply is arriving the wait restarts."""
        if self.frames is not None and self.frames.total:
            self.deadline = min(tcp_deadline, now + self.udp_wait)

    def _finish(self, payload: bytes) -> Reply | str:
        try:
            # The socket's own parser: after a whole reply it is as fresh as a new one,
            # and after an error the socket and the parser are dropped together.
            reply = parse_reply(self.command, payload, self.protocol)
        except ProtocolError as exc:
            return str(exc)
        if isinstance(reply, ErrorReply):  # e.g. out of memory for the UDP reply: ask TCP
            return f"{reply.kind} {reply.message}"
        return reply


# -- whether UDP works to a server -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpState:
    """Whether reads to one server try UDP first: on, or off until ``retry_at``."""

    on: bool = True
    losses: int = 0  # reads in a row whose UDP reply was lost
    retry_at: float = 0.0  # monotonic seconds; meaningful when off
    reason: str = ""  # the last loss


_UDP_ON: Final = UdpState()


def udp_after_reply(state: UdpState) -> UdpState:
    """A complete reply came over UDP: UDP is on, its loss count reset."""
    return _UDP_ON


def udp_after_loss(
    state: UdpState,
    now: float,
    *,
    reason: str,
    retry_interval: float,
    refused: bool = False,
    threshold: int = DEFAULT_LOSS_THRESHOLD,
) -> UdpState:
    """A UDP reply was lost (the read goes on over TCP). ``refused`` (nothing listens on
    the UDP port: ICMP port unreachable) switches UDP off at once, else after
    ``threshold`` losses in a row; it is tried again ``retry_interval`` seconds later."""
    losses = state.losses + 1
    if refused or not state.on or losses >= threshold:
        return UdpState(False, losses, now + retry_interval, reason)
    return replace(state, losses=losses, reason=reason)


def udp_claim_retry(state: UdpState, now: float, *, retry_interval: float) -> UdpState | None:
    """UDP is off and due again: the state to store so that this one read tries UDP and
    the others wait another ``retry_interval``; None when UDP must still be skipped."""
    if state.on or now < state.retry_at:
        return None
    return replace(state, retry_at=now + retry_interval)
