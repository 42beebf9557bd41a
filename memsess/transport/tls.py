"""TLS to memcached (``memcached -Z``) as a sans-I/O layer: an :class:`ssl.SSLObject` over
memory buffers, so the handshake is steps of the same exchange that carries the command,
driven by whichever driver moves its bytes (the blocking poll loop or an event loop).

A TLS handshake therefore never blocks another copy's I/O, and a server that hangs in
the middle of one costs what a hung TCP server costs: its exchange's deadline.
"""

from __future__ import annotations

import ssl
from typing import Final

from memsess.dsn import ServerSpec

__all__ = ["HANDSHAKE_WINDOW", "TlsClient", "TlsLink", "client_context"]

# Plaintext asked of one SSLObject.read(); a reply larger than this takes more calls.
_READ_SIZE: Final = 65536

#: Seconds a server has to answer a handshake's flight before a connection still
#: handshaking may be cut off as a straggler (when the other copies have answered). A
#: command's window adapts to the server's round trip, about a millisecond on a LAN; a
#: handshake also costs the server key exchange and a signature, and a server that has
#: just come back from a stall has a backlog of them. So a hung server costs a new
#: connection this much, not its whole timeout, and a healthy one is never cut for the
#: price of a handshake.
HANDSHAKE_WINDOW: Final = 0.05


def client_context(spec: ServerSpec, ssl_context: ssl.SSLContext | None = None) -> ssl.SSLContext:
    """The client context for tls:// server ``spec``: ``ssl_context`` when given (it then
    decides everything: CA, client certificate, verification), else one built from the
    DSN's ``tls_ca``, ``tls_cert``/``tls_key`` and ``tls_verify``, on Python's secure
    defaults (TLS 1.2 or newer, certificate and host name checked)."""
    if ssl_context is not None:
        return ssl_context
    try:
        context = ssl.create_default_context(cafile=spec.tls_ca)
        if spec.tls_cert is not None:
            context.load_cert_chain(spec.tls_cert, spec.tls_key)
    except (OSError, ssl.SSLError) as exc:  # a missing or unreadable file: say which server
        raise ValueError(f"memcached {spec.name}: cannot load its TLS files: {exc}") from exc
    if not spec.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class TlsClient:
    """TLS to one server, shared by every connection to it in any driver: the context,
    the name its certificate must carry, and the last session, which new connections
    resume (a shorter handshake) where the server allows it."""

    __slots__ = ("context", "server_hostname", "session")

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self.context = context
        self.server_hostname = server_hostname
        self.session: ssl.SSLSession | None = None

    @classmethod
    def for_server(cls, spec: ServerSpec, ssl_context: ssl.SSLContext | None) -> TlsClient | None:
        """The TLS client of ``spec``, or None for a server not reached over TLS."""
        if not spec.tls:
            return None
        return cls(client_context(spec, ssl_context), spec.tls_server_name or spec.host)

    def start(self) -> TlsLink:
        """The TLS state of a new connection."""
        return TlsLink(self)


class TlsLink:
    """The TLS state of one connection. ``start()`` gives the first bytes to send; every
    read goes through :meth:`feed`, every write through :meth:`wrap`. Raises
    :class:`ssl.SSLError` (or :class:`ssl.CertificateError`) when the peer cannot be
    trusted or speaks no TLS."""

    __slots__ = ("_client", "_incoming", "_obj", "_outgoing", "_ticketed", "established")

    def __init__(self, client: TlsClient) -> None:
        self._client = client
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        session = client.session
        self._obj = client.context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=False,
            server_hostname=client.server_hostname,
            session=session,
        )
        self.established = False
        self._ticketed = False

    def start(self) -> bytes:
        """The bytes that open the handshake (the ClientHello)."""
        self._handshake()
        return self._outgoing.read()

    def feed(self, data: bytes) -> bytes | None:
        """Bytes read from the socket (``b""``: it was closed); returns the plaintext they
        complete (``b""``: none yet, e.g. mid-handshake), or None once the peer has closed.
        Bytes the handshake must send next are in :meth:`pending`."""
        if not data:
            return None
        self._incoming.write(data)
        if not self.established and not self._handshake():
            return b""
        chunks: list[bytes] = []
        obj = self._obj
        try:
            while True:
                chunk = obj.read(_READ_SIZE)
                if not chunk:  # an orderly close_notify
                    return b"".join(chunks) if chunks else None
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            return b"".join(chunks) if chunks else None
        if chunks and not self._ticketed:
            # TLS 1.3 sends its session tickets after the handshake, so the session is
            # worth keeping only once data has come back; and only from a full handshake
            # (reading it out costs ~0.2 ms of CPU; a resumed one is kept already).
            self._ticketed = True
            if not obj.session_reused:
                self._client.session = obj.session
        return b"".join(chunks)

    def pending(self) -> bytes:
        """Bytes the TLS layer needs sent now (the rest of a handshake), or b""."""
        return self._outgoing.read()

    def wrap(self, plaintext: bytes) -> bytes:
        """``plaintext`` as records to send, after anything still pending."""
        self._obj.write(plaintext)
        return self._outgoing.read()

    @property
    def resumed(self) -> bool:
        """Whether the handshake resumed an earlier session."""
        return self.established and self._obj.session_reused

    def _handshake(self) -> bool:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.established = True
        return True
