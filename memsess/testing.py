"""Test helpers: real memcached servers on loopback, started and stopped per test.

:class:`LocalCluster` runs ``n`` memcached processes (TCP, TCP+UDP or unix sockets) and
can kill, restart, hang (SIGSTOP) and resume each one, and read or plant raw bytes.
With ``tls=True`` the servers speak TLS only, with throw-away certificates made for the
cluster (:func:`make_test_certs`, needs ``pip install memsess[crypto]``); with
``auth=(user, password)`` they demand memcached's ASCII authentication first.
As a pytest plugin (entry point ``memsess``) it also provides the ``memcached_cluster``
and ``local_cluster_factory`` fixtures.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import quote, unquote_to_bytes, urlencode

from memsess._local_servers import (
    PLAIN,
    AdminConnection,
    Security,
    Target,
    admin_exchange,
    free_ports,
    kill_all,
    probe,
    spawn,
    wait_all_threads_stopped,
)
from memsess._test_certs import TestCerts, make_test_certs
from memsess.errors import MemsessError

__all__ = [
    "LocalCluster",
    "LocalClusterError",
    "LocalServer",
    "MemcachedNotFoundError",
    "TestCerts",
    "make_test_certs",
]

ANSWER_TIMEOUT: Final = 2.0  # seconds an admin call (flush, keys, stats, ...) waits for a reply
START_TIMEOUT: Final = 5.0  # seconds a launched server has to answer before start fails
_POLL_INTERVAL: Final = 0.002  # seconds; memcached answers ~5 ms after launch here
_FRESH_PORT_ATTEMPTS: Final = 8
_MAX_KEY: Final = 250  # bytes; memcached's KEY_MAX_LENGTH
# memcached's authfile.c reads each 'user:password' line with fgets(line, 256): 254 and '\n'.
_MAX_AUTH_LINE: Final = 254
_AUTH_USER: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # printable ASCII but ':'
_AUTH_PASSWORD: Final = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space
_INSTALL_HINT: Final = (
    "install it (Debian/Ubuntu: apt-get install memcached; macOS: brew install memcached) "
    "or pass memcached='/path/to/memcached'"
)


class MemcachedNotFoundError(MemsessError, RuntimeError):
    """The memcached binary is not on PATH (or not at the path given)."""


class LocalClusterError(MemsessError, RuntimeError):
    """A local test server did not start, is not running, is hung, or did not answer."""


@dataclass
class LocalServer:
    """One memcached process of a :class:`LocalCluster`; its address survives restarts."""

    index: int
    host: str  # "127.0.0.1", or the socket path for a unix socket server
    port: int  # TCP port; 0 for a unix socket server
    udp_port: int | None  # == port when started with udp=True, else None
    socket_path: str | None
    process: subprocess.Popen[bytes] | None = None
    hung: bool = False  # stopped with SIGSTOP by LocalCluster.hang()
    log_path: str = field(default="", repr=False)  # memcached's stdout and stderr

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"`` (``"[::1]:PORT"`` for IPv6) or ``"unix:PATH"``."""
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive (a hung server is running); reaps it if it died."""
        return self.process is not None and self.process.poll() is None


def _reap(owner_pid: int, processes: list[subprocess.Popen[bytes]], directory: str) -> None:
    """Kill and reap every process, remove the temp dir: the body of ``LocalCluster.close``."""
    if os.getpid() != owner_pid:
        return  # a forked child must never stop the servers of its parent
    kill_all(processes, timeout=START_TIMEOUT)
    processes.clear()
    shutil.rmtree(directory, ignore_errors=True)


class LocalCluster:
    """``n`` memcached servers on loopback for integration tests; a context manager.

    Servers start in parallel on free ports (``udp=True`` adds a UDP listener on the same
    port number; ``unix=True`` uses unix sockets in a temp dir instead). ``memory_mb``
    (default 64) and ``item_size`` (default ``"1m"``) are memcached's ``-m`` and ``-I``;
    ``extra_args`` are appended to its command line. ``memcached`` is the binary (default:
    ``$MEMSESS_MEMCACHED``, else ``memcached`` on PATH). Every process is SIGKILLed and
    reaped by :meth:`close`, on garbage collection, at interpreter exit, and (Linux) by the
    kernel if this process dies first. Not thread-safe: drive it from one thread.

    ``tls=True`` makes every server speak TLS only (``memcached -Z``; TCP only: memcached has
    no DTLS and no TLS on unix sockets) with a certificate for ``localhost``, 127.0.0.1 and
    ::1 (and ``host``) signed by a throw-away CA: all made once per cluster in its temp dir
    (:attr:`certs`, needs ``pip install memsess[crypto]``) and kept across restarts.
    ``client_certs=True`` (with ``tls``) also makes the servers require a client certificate
    from that CA. ``auth=(user, password)`` starts them with an auth file (``memcached -Y``),
    so every connection must first authenticate with memcached's ASCII auth (a ``set`` whose
    data is ``"user password"``); both printable ASCII without spaces, no ``:`` in the user
    name; not with ``udp`` (memcached refuses). :meth:`ssl_context` gives a client context
    for the cluster; :meth:`dsn` carries the credentials and CA paths. Every admin call
    (stats, flush, keys, get_raw, ...) and the readiness check speak TLS and authenticate.
    """

    def __init__(
        self,
        n: int = 3,
        *,
        udp: bool = False,
        unix: bool = False,
        memory_mb: int = 64,
        item_size: str = "1m",
        extra_args: Sequence[str] = (),
        memcached: str | None = None,
        host: str = "127.0.0.1",
        tls: bool = False,
        client_certs: bool = False,
        auth: tuple[str, str] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one server, not n={n}")
        if udp and unix:
            raise ValueError("udp=True and unix=True exclude each other: memcached -s disables UDP")
        _check_security(udp=udp, unix=unix, tls=tls, client_certs=client_certs, auth=auth)
        self.binary = _find_memcached(memcached)
        self.n, self.udp, self.unix, self.host = n, udp, unix, host
        self.tls, self.client_certs, self.auth = tls, client_certs, auth
        self.options = ["-m", str(memory_mb), "-I", item_size, "-t", "1", "-c", "1024"]
        self.extra_args = list(extra_args)
        self.servers: list[LocalServer] = []
        #: The PEM files of the cluster's CA, server and client certificates; None without TLS.
        self.certs: TestCerts | None = None
        self._auth_file: str | None = None
        self._security = PLAIN
        self._processes: list[subprocess.Popen[bytes]] = []
        self._directory = tempfile.mkdtemp(prefix="memsess-")
        self._finalizer = weakref.finalize(
            self, _reap, os.getpid(), self._processes, self._directory
        )
        try:
            self._prepare_security()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start every server that is not running; returns once all answer (at most 5 s)."""
        if not self._finalizer.alive:
            raise LocalClusterError("this LocalCluster is closed; create a new one")
        try:
            if not self.servers:
                self.servers = self._new_servers()
                self._bring_up(self.servers, same_address=False)
            else:
                self._bring_up([s for s in self.servers if not s.running], same_address=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """SIGCONT and SIGKILL every server, reap them, remove the temp dir; idempotent.

        In a forked child it does nothing: the servers belong to the parent.
        """
        self._finalizer()
        for server in self.servers:
            server.hung = False

    def dsn(self, scheme: str | None = None, **params: object) -> str:
        """A save_path for every server, e.g. ``"tcp://127.0.0.1:4001?timeout=0.5, ..."``.

        ``scheme`` defaults to ``"tls"`` with ``tls=True``, ``"udp"`` with ``udp=True``,
        ``"unix"`` for unix sockets, else ``"tcp"``; ``""`` gives bare ``host:port`` (not
        with ``tls`` or ``auth``: it could not say so). With ``auth`` every URL starts with
        ``user:password@`` (not ``unix://``, which takes none: give the store ``username=``
        and ``password=`` from :attr:`auth`). With the ``"tls"`` scheme the query starts
        with ``tls_ca`` (and with ``client_certs``, ``tls_cert`` and ``tls_key``), the paths
        of :attr:`certs`: ``"tls://u:p@127.0.0.1:4001?tls_ca=%2Ftmp%2F...%2Fca.pem"``. User
        name, password and paths are percent-encoded (``quote(safe="")``). ``params`` follow
        in the order given (booleans as 1/0); one named like a ``tls_*`` parameter replaces it.
        """
        if not self.servers:
            raise LocalClusterError("call start() (or use `with`) before dsn()")
        if scheme == "" and (self.tls or (self.auth is not None and not self.unix)):
            raise ValueError(
                "dsn('') gives bare host:port, which cannot carry TLS or credentials; "
                "pass a scheme or none"
            )
        scheme = self._default_scheme() if scheme is None else scheme
        values = {key: int(v) if isinstance(v, bool) else v for key, v in params.items()}
        fields = [
            f"{key}={quote(path, safe='')}"
            for key, path in self._tls_params(scheme).items()
            if key not in values
        ]
        if values:
            fields.append(urlencode(values))
        query = f"?{'&'.join(fields)}" if fields else ""
        return ", ".join(self._url(server, scheme) + query for server in self.servers)

    def ssl_context(self) -> ssl.SSLContext:
        """A new client context for this TLS cluster: it trusts the cluster's CA only, checks
        host names (the certificate names ``localhost``, 127.0.0.1 and ::1), and with
        ``client_certs=True`` presents the cluster's client certificate.
        """
        if self.certs is None:
            raise LocalClusterError("this LocalCluster has no TLS; create it with tls=True")
        return self._new_ssl_context(with_client_cert=self.client_certs)

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` and reap it; it stays in ``servers``, not running. Idempotent."""
        server = self.servers[i]
        if server.process is not None:
            process, server.process, server.hung = server.process, None, False
            if process.poll() is None:
                process.kill()
            process.wait(timeout=START_TIMEOUT)
            if process in self._processes:  # not after close()
                self._processes.remove(process)

    def start_server(self, i: int) -> None:
        """Start killed server ``i`` again on the same port or socket path, with an empty cache."""
        if self.servers[i].running:
            raise LocalClusterError(f"server {i} is already running; restart({i}) empties it")
        self._bring_up([self.servers[i]], same_address=True)

    def restart(self, i: int) -> None:
        """Kill server ``i`` if running and start it again: same port, empty cache."""
        self.kill(i)
        self.start_server(i)

    def hang(self, i: int) -> None:
        """SIGSTOP server ``i``: the kernel still accepts connections, nothing answers them.

        Returns once every thread of the process has stopped (Linux; at most 1 s).
        """
        server = self._server(i, "hang", allow_hung=True)
        if not server.hung and server.process is not None:
            server.process.send_signal(signal.SIGSTOP)
            server.hung = True
            wait_all_threads_stopped(server.process.pid, deadline=time.monotonic() + 1.0)

    def resume(self, i: int) -> None:
        """SIGCONT hung server ``i``; it then answers everything queued meanwhile."""
        server = self._server(i, "resume", allow_hung=True)
        if server.hung and server.process is not None:
            server.process.send_signal(signal.SIGCONT)
            server.hung = False

    def flush(self, i: int) -> None:
        """Drop every item on server ``i`` (``flush_all``)."""
        with self._connection(i, "flush") as connection:
            connection.sendall(b"flush_all\r\n")
            self._expect(i, "flush", connection.readline(), b"OK\r\n")

    def keys(self, i: int) -> set[bytes]:
        """Every live key on server ``i`` (``lru_crawler metadump all``, URL-decoded)."""
        server = self._server(i, "keys")
        deadline = time.monotonic() + ANSWER_TIMEOUT
        reply = self._exchange(server, b"lru_crawler metadump all\r\n", "keys")
        while reply.startswith(b"BUSY") and time.monotonic() < deadline:
            time.sleep(0.01)  # the crawler serves one request at a time, background ones too
            reply = self._exchange(server, b"lru_crawler metadump all\r\n", "keys")
        if not (reply == b"END\r\n" or reply.endswith(b"\nEND\r\n")):
            raise LocalClusterError(f"keys on server {i} ({server.address}): {reply[:200]!r}")
        lines = reply.split(b"\n")
        return {unquote_to_bytes(line.split(b" ")[0][4:]) for line in lines if line[:4] == b"key="}

    def get_raw(self, i: int, key: bytes) -> bytes | None:
        """The bytes stored under ``key`` on server ``i``, or None if absent."""
        key = _checked_key(key)
        with self._connection(i, "get_raw") as connection:
            connection.sendall(b"get %s\r\n" % key)
            header = connection.readline()
            if header == b"END\r\n":
                return None
            parts = header.split()
            if len(parts) != 4 or parts[0] != b"VALUE" or not parts[3].isdigit():
                self._expect(i, "get_raw", header, b"VALUE ...")
            value = connection.read_exact(int(parts[3]) + 2)[:-2]
            self._expect(i, "get_raw", connection.readline(), b"END\r\n")
            return value

    def set_raw(
        self, i: int, key: bytes, value: bytes, *, flags: int = 0, exptime: int = 0
    ) -> None:
        """Store ``value`` as-is under ``key`` on server ``i``; ``exptime`` in seconds, 0 never."""
        key = _checked_key(key)
        with self._connection(i, "set_raw") as connection:
            header = b"set %s %d %d %d\r\n" % (key, flags, exptime, len(value))
            connection.sendall(header + value + b"\r\n")
            self._expect(i, "set_raw", connection.readline(), b"STORED\r\n")

    def stats(self, i: int) -> dict[str, str]:
        """Server ``i``'s ``stats`` as text, e.g. ``{"pid": "123", "curr_items": "0", ...}``."""
        reply = self._exchange(self._server(i, "stats"), b"stats\r\n", "stats")
        text = reply.decode(errors="replace")
        lines = [line.split(" ", 2) for line in text.splitlines()]
        return {parts[1]: parts[2] for parts in lines if len(parts) == 3 and parts[0] == "STAT"}

    # -- internals --------------------------------------------------------------------------

    def _prepare_security(self) -> None:
        """Write the certificates and the auth file into the temp dir; kept across restarts."""
        ssl_context = None
        if self.tls:
            if "," in self._directory:  # memcached -o splits its option list at commas
                raise LocalClusterError(
                    f"TLS needs a temp dir without ',' (memcached -o): {self._directory}"
                )
            hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
            hosts += (self.host,) if self.host not in hosts else ()
            self.certs = make_test_certs(os.path.join(self._directory, "tls"), hosts=hosts)
            ssl_context = self._new_ssl_context(with_client_cert=True)
        if self.auth is not None:
            self._auth_file = os.path.join(self._directory, "auth")
            descriptor = os.open(self._auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as auth_file:
                auth_file.write(f"{self.auth[0]}:{self.auth[1]}\n")
        self._security = Security(ssl_context, self.auth)

    def _new_ssl_context(self, *, with_client_cert: bool) -> ssl.SSLContext:
        # Called where certs are made (tls=True) or after ssl_context() checked for them.
        assert self.certs is not None  # noqa: S101 - invariant, for the type checker
        context = ssl.create_default_context(cafile=self.certs.ca)
        if with_client_cert:
            context.load_cert_chain(self.certs.client_cert, self.certs.client_key)
        return context

    def _default_scheme(self) -> str:
        if self.unix:
            return "unix"
        return "tls" if self.tls else "udp" if self.udp else "tcp"

    def _tls_params(self, scheme: str) -> dict[str, str]:
        """The ``tls_*`` query parameters of a ``tls://`` URL: the files of :attr:`certs`."""
        if scheme != "tls" or self.certs is None:
            return {}
        params = {"tls_ca": self.certs.ca}
        if self.client_certs:
            params |= {"tls_cert": self.certs.client_cert, "tls_key": self.certs.client_key}
        return params

    def _new_servers(self) -> list[LocalServer]:
        ports = [0] * self.n if self.unix else free_ports(self.host, self.n, udp=self.udp)
        servers = []
        for index, port in enumerate(ports):
            path = os.path.join(self._directory, f"m{index}.sock") if self.unix else None
            log = os.path.join(self._directory, f"m{index}.log")
            udp_port = port if self.udp else None
            servers.append(
                LocalServer(index, path or self.host, port, udp_port, path, log_path=log)
            )
        return servers

    def _argv(self, server: LocalServer) -> list[str]:
        argv = [self.binary, *self.options]
        if server.socket_path is not None:
            argv += ["-s", server.socket_path, "-a", "0700"]
        else:
            argv += ["-l", server.host, "-p", str(server.port), "-U", str(server.udp_port or 0)]
        if self.certs is not None:
            tls = f"ssl_chain_cert={self.certs.server_cert},ssl_key={self.certs.server_key}"
            if self.client_certs:  # ssl_verify_mode 2 is "Require" in memcached -h
                tls += f",ssl_ca_cert={self.certs.ca},ssl_verify_mode=2"
            argv += ["-Z", "-o", tls]
        if self._auth_file is not None:
            argv += ["-Y", self._auth_file]
        if os.geteuid() == 0:
            argv += ["-u", "root"]  # memcached refuses to run as root without it
        return argv + self.extra_args

    def _launch(self, server: LocalServer) -> None:
        server.process = spawn(self._argv(server), server.log_path)
        self._processes.append(server.process)

    def _bring_up(self, servers: list[LocalServer], *, same_address: bool) -> None:
        """Launch all, then wait for each in turn (they start meanwhile): parallel start."""
        for server in servers:
            self._launch(server)
        deadline = time.monotonic() + START_TIMEOUT
        for server in servers:
            self._await(server, same_address=same_address, deadline=deadline)

    def _await(self, server: LocalServer, *, same_address: bool, deadline: float) -> None:
        """Wait until ``server`` answers; relaunch it if another process took its port."""
        fresh_ports = _FRESH_PORT_ATTEMPTS
        while (state := probe(server.process, _target(server), self._security)) != "up":
            if time.monotonic() > deadline:
                self._fail(server, f"did not answer ({state})")
            if state == "starting":
                time.sleep(_POLL_INTERVAL)
                continue
            lost_port = b"Address already in use" in Path(server.log_path).read_bytes()
            if state == "exited" and not lost_port:
                self._fail(server, "exited")
            if same_address:  # the port of a killed server: wait for its taker to let go
                time.sleep(0.02)
            else:
                fresh_ports -= 1
                if fresh_ports == 0:
                    self._fail(server, f"found no free port in {_FRESH_PORT_ATTEMPTS} tries")
                server.port = free_ports(self.host, 1, udp=self.udp)[0]
                server.udp_port = server.port if self.udp else None
            self.kill(server.index)
            self._launch(server)

    def _fail(self, server: LocalServer, reason: str) -> NoReturn:
        argv = " ".join(self._argv(server))
        said = Path(server.log_path).read_bytes()[:4000].decode(errors="replace").strip()
        self.kill(server.index)
        raise LocalClusterError(
            f"memcached server {server.index} ({server.address}) {reason} within "
            f"{START_TIMEOUT} s; command: {argv}; memcached said: {said or '(nothing)'}"
        )

    def _url(self, server: LocalServer, scheme: str) -> str:
        if server.socket_path is not None:  # unix:// takes no user:password@ in memsess.dsn
            return f"{scheme}://{server.socket_path}"
        userinfo = ""
        if self.auth is not None:
            user, password = (quote(part, safe="") for part in self.auth)
            userinfo = f"{user}:{password}@"
        return f"{scheme}://{userinfo}{server.address}" if scheme else server.address

    def _server(self, i: int, operation: str, *, allow_hung: bool = False) -> LocalServer:
        """Server ``i``, or a LocalClusterError telling what to call first."""
        server = self.servers[i]
        if not server.running:
            problem = f"not running; call start_server({i}) first"
        elif server.hung and not allow_hung:
            problem = f"hung (SIGSTOP); call resume({i}) first"
        else:
            return server
        raise LocalClusterError(f"{operation} on server {i} ({server.address}): {problem}")

    @contextmanager
    def _connection(self, i: int, operation: str) -> Iterator[AdminConnection]:
        """A connection to server ``i`` (TLS and auth done), its errors as LocalClusterError."""
        server = self._server(i, operation)
        try:
            with AdminConnection(_target(server), ANSWER_TIMEOUT, self._security) as connection:
                yield connection
        except OSError as exc:
            raise LocalClusterError(
                f"{operation} on server {i} ({server.address}): {exc!r}"
            ) from exc

    def _expect(self, i: int, operation: str, reply: bytes, expected: bytes) -> None:
        if reply != expected:
            raise LocalClusterError(
                f"{operation} on server {i} ({self.servers[i].address}): "
                f"expected {expected!r}, got {reply[:200]!r}"
            )

    def _exchange(
        self, server: LocalServer, command: bytes, operation: str, timeout: float | None = None
    ) -> bytes:
        """Send one command; read until ``END`` or an error line; ``timeout`` in seconds."""
        timeout = ANSWER_TIMEOUT if timeout is None else timeout
        try:
            return admin_exchange(_target(server), command, timeout, self._security)
        except OSError as exc:
            message = f"{operation} on server {server.index} ({server.address}): {exc!r}"
            raise LocalClusterError(message) from exc


def _find_memcached(memcached: str | None) -> str:
    name = memcached or os.environ.get("MEMSESS_MEMCACHED") or "memcached"
    found = shutil.which(name)
    if found is None:
        where = "on PATH" if name == "memcached" else f"at {name!r}"
        raise MemcachedNotFoundError(f"memcached not found {where}; {_INSTALL_HINT}")
    return found


def _target(server: LocalServer) -> Target:
    return server.socket_path or (server.host, server.port)


def _check_security(
    *, udp: bool, unix: bool, tls: bool, client_certs: bool, auth: tuple[str, str] | None
) -> None:
    """ValueError for a TLS or auth option memcached cannot honour, naming why."""
    if tls and udp:
        raise ValueError("tls=True and udp=True exclude each other: memcached has no DTLS")
    if tls and unix:
        raise ValueError("tls=True and unix=True exclude each other: memcached -Z is TCP only")
    if client_certs and not tls:
        raise ValueError("client_certs=True needs tls=True")
    if auth is None:
        return
    if udp:
        raise ValueError("auth and udp=True exclude each other: memcached -Y refuses UDP")
    user, password = auth
    if not (_AUTH_USER.fullmatch(user) and _AUTH_PASSWORD.fullmatch(password)):
        raise ValueError(
            "auth needs a user name and a password of printable ASCII, no spaces, and no ':' "
            "in the user name (memcached's auth file holds 'user:password' lines, its auth "
            "data is 'user password')"
        )
    if len(user) + 1 + len(password) > _MAX_AUTH_LINE:
        raise ValueError(f"auth: 'user:password' exceeds memcached's {_MAX_AUTH_LINE} characters")


def _checked_key(key: bytes) -> bytes:
    """``key`` if memcached's text protocol can carry it, else ValueError."""
    if not key or len(key) > _MAX_KEY or len(key.split()) != 1 or key.split()[0] != key:
        raise ValueError(f"not a memcached key (1 to {_MAX_KEY} bytes, no whitespace): {key!r}")
    if b"\x00" in key:
        raise ValueError(f"not a memcached key (holds a NUL byte): {key!r}")
    return key


try:
    import pytest
except ImportError:  # pragma: no cover - the fixtures exist only where pytest does
    pass
else:

    @pytest.fixture
    def memcached_cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
        """Three fresh memcached servers on 127.0.0.1 for one test, all stopped after it.

        Parametrize it indirectly with LocalCluster options for others, e.g. TLS and auth:
        ``@pytest.mark.parametrize("memcached_cluster", [{"tls": True, "auth": ("u", "p")}],
        indirect=True)``.
        """
        options: dict[str, Any] = dict(getattr(request, "param", None) or {})
        with LocalCluster(options.pop("n", 3), **options) as cluster:
            yield cluster

    @pytest.fixture
    def local_cluster_factory() -> Iterator[Callable[..., LocalCluster]]:
        """Call it like ``LocalCluster(n, **options)`` for a started cluster; all close after.

        E.g. ``local_cluster_factory(2, tls=True, client_certs=True, auth=("u", "p"))``.
        """
        with ExitStack() as clusters:
            yield lambda n=3, **options: clusters.enter_context(LocalCluster(n, **options))
