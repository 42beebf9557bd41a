"""Test helpers: real memcached servers on loopback, started and stopped per test.

:class:`LocalCluster` runs ``n`` memcached processes (TCP, TCP+UDP or unix sockets) and
can kill, restart, hang (SIGSTOP) and resume each one, and read or plant raw bytes.
As a pytest plugin (entry point ``memsess``) it also provides the ``memcached_cluster``
and ``local_cluster_factory`` fixtures.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import unquote_to_bytes, urlencode

from memsess._local_servers import (
    _admin_exchange,
    _free_ports,
    _kill_all,
    _probe,
    _spawn,
    _Target,
    _wait_all_threads_stopped,
)
from memsess.errors import MemsessError

__all__ = ["LocalCluster", "LocalClusterError", "LocalServer", "MemcachedNotFoundError"]

ANSWER_TIMEOUT: Final = 2.0  # seconds an admin call (flush, keys, stats, ...) waits for a reply
START_TIMEOUT: Final = 5.0  # seconds a launched server has to answer before start fails
_POLL_INTERVAL: Final = 0.002  # seconds; memcached answers ~5 ms after launch here
_FRESH_PORT_ATTEMPTS: Final = 8
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
    _kill_all(processes, timeout=START_TIMEOUT)
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
    ) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one server, not n={n}")
        if udp and unix:
            raise ValueError("udp=True and unix=True exclude each other: memcached -s disables UDP")
        self.binary = _find_memcached(memcached)
        self.n, self.udp, self.unix, self.host = n, udp, unix, host
        self.options = ["-m", str(memory_mb), "-I", item_size, "-t", "1", "-c", "1024"]
        self.extra_args = list(extra_args)
        self.servers: list[LocalServer] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._directory = tempfile.mkdtemp(prefix="memsess-")
        self._finalizer = weakref.finalize(
            self, _reap, os.getpid(), self._processes, self._directory
        )

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

        ``scheme`` defaults to ``"udp"`` with ``udp=True``, ``"unix"`` for unix sockets, else
        ``"tcp"``; ``""`` gives bare ``host:port``. ``params`` become each server's query
        string in the order given (booleans as 1/0).
        """
        if not self.servers:
            raise LocalClusterError("call start() (or use `with`) before dsn()")
        values = {key: int(v) if isinstance(v, bool) else v for key, v in params.items()}
        query = f"?{urlencode(values)}" if values else ""
        return ", ".join(self._url(server, scheme) + query for server in self.servers)

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
            _wait_all_threads_stopped(server.process.pid, deadline=time.monotonic() + 1.0)

    def resume(self, i: int) -> None:
        """SIGCONT hung server ``i``; it then answers everything queued meanwhile."""
        server = self._server(i, "resume", allow_hung=True)
        if server.hung and server.process is not None:
            server.process.send_signal(signal.SIGCONT)
            server.hung = False

    def flush(self, i: int) -> None:
        """Drop every item on server ``i`` (``flush_all``)."""
        with self._client(i, "flush") as client:
            client.flush_all(noreply=False)

    def keys(self, i: int) -> set[bytes]:
        """Every live key on server ``i`` (``lru_crawler metadump all``, URL-decoded)."""
        server = self._server(i, "keys")
        deadline = time.monotonic() + ANSWER_TIMEOUT
        reply = _exchange(server, b"lru_crawler metadump all\r\n", "keys")
        while reply.startswith(b"BUSY") and time.monotonic() < deadline:
            time.sleep(0.01)  # the crawler serves one request at a time, background ones too
            reply = _exchange(server, b"lru_crawler metadump all\r\n", "keys")
        if not (reply == b"END\r\n" or reply.endswith(b"\nEND\r\n")):
            raise LocalClusterError(f"keys on server {i} ({server.address}): {reply[:200]!r}")
        lines = reply.split(b"\n")
        return {unquote_to_bytes(line.split(b" ")[0][4:]) for line in lines if line[:4] == b"key="}

    def get_raw(self, i: int, key: bytes) -> bytes | None:
        """The bytes stored under ``key`` on server ``i``, or None if absent."""
        with self._client(i, "get_raw") as client:
            value: bytes | None = client.get(key)
            return value

    def set_raw(
        self, i: int, key: bytes, value: bytes, *, flags: int = 0, exptime: int = 0
    ) -> None:
        """Store ``value`` as-is under ``key`` on server ``i``; ``exptime`` in seconds, 0 never."""
        with self._client(i, "set_raw") as client:
            client.set(key, value, expire=exptime, noreply=False, flags=flags)

    def stats(self, i: int) -> dict[str, str]:
        """Server ``i``'s ``stats`` as text, e.g. ``{"pid": "123", "curr_items": "0", ...}``."""
        reply = _exchange(self._server(i, "stats"), b"stats\r\n", "stats").decode(errors="replace")
        lines = [line.split(" ", 2) for line in reply.splitlines()]
        return {parts[1]: parts[2] for parts in lines if len(parts) == 3 and parts[0] == "STAT"}

    # -- internals --------------------------------------------------------------------------

    def _new_servers(self) -> list[LocalServer]:
        ports = [0] * self.n if self.unix else _free_ports(self.host, self.n, udp=self.udp)
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
        if os.geteuid() == 0:
            argv += ["-u", "root"]  # memcached refuses to run as root without it
        return argv + self.extra_args

    def _launch(self, server: LocalServer) -> None:
        server.process = _spawn(self._argv(server), server.log_path)
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
        while (state := _probe(server.process, _target(server))) != "up":
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
                server.port = _free_ports(self.host, 1, udp=self.udp)[0]
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

    def _url(self, server: LocalServer, scheme: str | None) -> str:
        if server.socket_path is not None:
            return f"{'unix' if scheme is None else scheme}://{server.socket_path}"
        scheme = ("udp" if self.udp else "tcp") if scheme is None else scheme
        return f"{scheme}://{server.address}" if scheme else server.address

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
    def _client(self, i: int, operation: str) -> Iterator[Any]:
        """A pymemcache client for server ``i``, its errors raised as LocalClusterError."""
        from pymemcache.client.base import Client
        from pymemcache.exceptions import MemcacheError

        server = self._server(i, operation)
        target = _target(server)
        client = Client(
            target, connect_timeout=ANSWER_TIMEOUT, timeout=ANSWER_TIMEOUT, default_noreply=False
        )
        try:
            yield client
        except (OSError, MemcacheError) as exc:
            raise LocalClusterError(
                f"{operation} on server {i} ({server.address}): {exc!r}"
            ) from exc
        finally:
            client.close()


def _find_memcached(memcached: str | None) -> str:
    name = memcached or os.environ.get("MEMSESS_MEMCACHED") or "memcached"
    found = shutil.which(name)
    if found is None:
        where = "on PATH" if name == "memcached" else f"at {name!r}"
        raise MemcachedNotFoundError(f"memcached not found {where}; {_INSTALL_HINT}")
    return found


def _target(server: LocalServer) -> _Target:
    return server.socket_path or (server.host, server.port)


def _exchange(
    server: LocalServer, command: bytes, operation: str, timeout: float | None = None
) -> bytes:
    """Send one command; read until ``END`` or an error line; ``timeout`` in seconds."""
    timeout = ANSWER_TIMEOUT if timeout is None else timeout
    try:
        return _admin_exchange(_target(server), command, timeout)
    except OSError as exc:
        message = f"{operation} on server {server.index} ({server.address}): {exc!r}"
        raise LocalClusterError(message) from exc


try:
    import pytest
except ImportError:  # pragma: no cover - the fixtures exist only where pytest does
    pass
else:

    @pytest.fixture
    def memcached_cluster() -> Iterator[LocalCluster]:
        """Three fresh memcached servers on 127.0.0.1 for one test, all stopped after it."""
        with LocalCluster(3) as cluster:
            yield cluster

    @pytest.fixture
    def local_cluster_factory() -> Iterator[Callable[..., LocalCluster]]:
        """Call it like ``LocalCluster(n, **options)`` for a started cluster; all close after."""
        with ExitStack() as clusters:
            yield lambda n=3, **options: clusters.enter_context(LocalCluster(n, **options))
