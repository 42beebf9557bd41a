"""A TCP relay that adds a one-way delay to every byte, in both directions.

This machine's kernel has no ``tc netem``, so a realistic network round trip
(0.5-1 ms) is made by putting this relay between the client and memcached.
Each relay runs in its own process (``python -m bench.relay``), so it never
competes with the measured client for the GIL. Each direction of each
connection has one thread: it reads a chunk, sleeps until the chunk's due time
(arrival + delay; ``time.sleep`` is precise to tens of microseconds, unlike an
epoll timeout, which rounds up to whole milliseconds) and forwards it. Clients
that wait for each reply (memcached clients do) see exactly the added delay.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import Final

from bench.cpus import pin_process

__all__ = ["DelayRelay"]

_CHUNK: Final = 262144


def _pump(source: socket.socket, target: socket.socket, delay: float) -> None:
    """Forward ``source`` to ``target``, each chunk ``delay`` seconds after it arrived."""
    try:
        while True:
            chunk = source.recv(_CHUNK)
            due = time.perf_counter() + delay
            if not chunk:
                break
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            target.sendall(chunk)
    except OSError:
        pass  # either side went away: close both
    finally:
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _serve(listener: socket.socket, upstream: tuple[str, int], delay: float) -> None:
    while True:
        client, _ = listener.accept()
        server = socket.create_connection(upstream)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pump, args=(client, server, delay), daemon=True).start()
        threading.Thread(target=_pump, args=(server, client, delay), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Relay a free loopback port to ``--upstream``; print the port, serve until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="host:port of the memcached server")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay in ms")
    args = parser.parse_args(argv)
    host, port = args.upstream.rsplit(":", 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    threading.Thread(
        target=_serve, args=(listener, (host, int(port)), args.delay_ms / 1000), daemon=True
    ).start()
    print(listener.getsockname()[1], flush=True)
    sys.stdin.read()  # the parent closes our stdin (or dies): stop


class DelayRelay:
    """A relay process in front of one server: ``with DelayRelay(addr, 0.25) as relay:``
    then connect to ``relay.address``. ``delay_ms`` is one-way: the round trip
    grows by twice that."""

    def __init__(self, upstream: tuple[str, int], delay_ms: float) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.relay",
                "--upstream",
                f"{upstream[0]}:{upstream[1]}",
                "--delay-ms",
                str(delay_ms),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the delay relay did not start (said {line!r})")
        self.address = ("127.0.0.1", int(line))
        pin_process(self.process.pid)  # with the servers: the relay is "the network"

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


if __name__ == "__main__":
    main()
