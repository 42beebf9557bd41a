"""Process and socket plumbing behind memsess.testing: free ports, memcached processes, raw I/O.

Knows nothing of LocalCluster: failures surface as OSError, which memsess.testing translates.
Private to memsess.testing, which uses what ``__all__`` lists.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PLAIN",
    "AdminConnection",
    "Security",
    "Target",
    "admin_exchange",
    "free_ports",
    "kill_all",
    "probe",
    "spawn",
    "wait_all_threads_stopped",
]

# Ports are drawn below the kernel's ephemeral range (32768+ on Linux), so no outgoing
# connection of the test itself can take a killed server's port before restart() rebinds it.
_PORT_RANGE: Final = (20000, 32768)
_ERROR_REPLIES: Final = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR", b"BUSY")

#: Where a server listens: its unix socket path, or (host, port).
Target = str | tuple[str, int]


def free_ports(host: str, count: int, *, udp: bool) -> list[int]:
    """``count`` distinct ports nobody listens on now (TCP, and UDP with ``udp``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(*_PORT_RANGE)
        if port not in ports and all(_bindable(family, kind, host, port) for kind in kinds):
            ports.append(port)
    return ports


def _bindable(family: socket.AddressFamily, kind: socket.SocketKind, host: str, port: int) -> bool:
    with socket.socket(family, kind) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def spawn(argv: list[str], log_path: str) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its stdout and stderr in ``log_path``; it dies with us on Linux."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(  # noqa: S603 - argv built by LocalCluster, no shell
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=_die_with_parent_hook(),  # noqa: PLW1509 - only prctl, see the hook
        )


def kill_all(processes: list[subprocess.Popen[bytes]], *, timeout: float) -> None:
    """SIGKILL every live process and reap it; ``timeout`` in seconds per process."""
    alive = [process for process in processes if process.poll() is None]
    for process in alive:  # signal all first, then wait: they die in parallel
        process.send_signal(signal.SIGCONT)  # harmless when running, wakes a hung one
        process.kill()
    for process in alive:
        process.wait(timeout=timeout)


@dataclass(frozen=True)
class Security:
    """How admin connections reach a server: a TLS client context and credentials, if any."""

    ssl_context: ssl.SSLContext | None = None
    auth: tuple[str, str] | None = None  # (user, password), sent as memcached's ASCII auth


#: No TLS and no credentials: the default of every admin connection.
PLAIN: Final = Security()


def _auth_command(user: str, password: str) -> bytes:
    """memcached's ASCII auth: a ``set`` whose data is ``user password``.

    exptime -1: a server without ``-Y`` stores the item already expired, so nothing readable.
    """
    data = f"{user} {password}".encode()
    return b"set memsess:auth 0 -1 %d\r\n%s\r\n" % (len(data), data)


class AdminConnection:
    """One blocking connection to a server, TLS handshake and authentication done on open.

    ``timeout`` (seconds) bounds connect, handshake and every read. Every failure is an
    OSError: refused credentials a PermissionError, a close mid-reply a ConnectionError.
    """

    def __init__(self, target: Target, timeout: float, security: Security = PLAIN) -> None:
        if isinstance(target, str):
            family = socket.AF_UNIX
        else:
            family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        self._buffer = bytearray()
        try:
            sock.settimeout(timeout)
            sock.connect(target)
            if security.ssl_context is not None:
                host = "localhost" if isinstance(target, str) else target[0]
                sock = security.ssl_context.wrap_socket(sock, server_hostname=host)
            self._sock = sock
            if security.auth is not None:
                self.sendall(_auth_command(*security.auth))
                answer = self.readline()
                if answer != b"STORED\r\n":
                    raise PermissionError(
                        f"memcached refused the credentials of user {security.auth[0]!r}: "
                        f"{answer[:200]!r}"
                    )
        except BaseException:
            sock.close()
            raise

    def __enter__(self) -> AdminConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def readline(self) -> bytes:
        """The next line, its CRLF included."""
        while (end := self._buffer.find(b"\n")) < 0:
            self._fill()
        return self._take(end + 1)

    def read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        return self._take(size)

    def read_until_end(self) -> bytes:
        """Everything up to and with ``END``, or a one-line error reply."""
        buffer = self._buffer
        while not (buffer == b"END\r\n" or buffer.endswith(b"\nEND\r\n")):
            if buffer.startswith(_ERROR_REPLIES) and buffer.endswith(b"\r\n"):
                break  # a one-line refusal instead of the data
            self._fill()
        return self._take(len(buffer))

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection before the end of its reply")
        self._buffer += chunk

    def _take(self, size: int) -> bytes:
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken


def admin_exchange(
    target: Target, command: bytes, timeout: float, security: Security = PLAIN
) -> bytes:
    """Send one command; read until ``END`` or an error line; ``timeout`` in seconds.

    Over TLS and authenticated first as ``security`` says. Every failure (refused, timed
    out, handshake failed, credentials refused, closed before ``END``) is an OSError.
    """
    with AdminConnection(target, timeout, security) as connection:
        connection.sendall(command)
        return connection.read_until_end()


def probe(
    process: subprocess.Popen[bytes] | None, target: Target, security: Security = PLAIN
) -> str:
    """``"up"``, ``"starting"``, ``"exited"`` (or never started: None), or ``"taken"``
    (another process answers)."""
    if process is None or process.poll() is not None:
        return "exited"
    try:
        reply = admin_exchange(target, b"stats\r\n", timeout=0.25, security=security)
    except PermissionError:  # a server with other credentials: ours would know them
        return "taken"
    except OSError:  # refused, no socket file yet, or a listener that never answers
        return "starting"
    # The pid proves the answer came from our process, not one that won the port race.
    return "up" if f"STAT pid {process.pid}\r\n".encode() in reply else "taken"


def wait_all_threads_stopped(pid: int, deadline: float) -> None:
    """SIGSTOP returns before every thread has stopped; a request sent at once may get an answer."""
    tasks = f"/proc/{pid}/task"
    while os.path.isdir(tasks) and time.monotonic() < deadline:
        states = set()
        for task in os.listdir(tasks):
            try:
                with open(f"{tasks}/{task}/stat", "rb") as stat:
                    states.add(stat.read().rpartition(b") ")[2][:1])
            except OSError:
                continue  # the thread is gone
        if states <= {b"T"}:
            return
        time.sleep(0.001)


def _die_with_parent_hook() -> Callable[[], None] | None:
    """On Linux, have the kernel SIGKILL memcached if this process dies without cleaning up.

    Only from the main thread: the kernel sends the signal when the *thread* that started
    the child exits. The hook runs between fork and exec and only calls prctl.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook
