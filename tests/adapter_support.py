"""Helpers shared by the adapter tests: where a session's copies live, cookie
parsing, hostile cookie values, and a real HTTP server on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pymemcache.client.base import Client
from werkzeug.serving import make_server

from memsess import SessionStore
from memsess.records import storage_key
from memsess.testing import LocalCluster

# A hung server is given up on fast, and a down one is probed again soon.
TIMEOUT = 0.5
RETRY_INTERVAL = 0.2

# Cookie values a client may send that memsess never issued. None of them may
# be adopted, and none may ever reach memcached as (part of) a key.
BAD_COOKIES = {
    "tampered": "x" * 42 + "!",  # the right length, a character outside the alphabet
    "garbage": "not-a-session-id",
    "crlf": "abc\r\nset injected 0 60 3\r\nbad",
    "over-long": "A" * 8192,
    "empty": "",
    "quoted": '"' + "A" * 43 + '"',
}


def make_store(cluster: LocalCluster, **options: Any) -> SessionStore:
    options.setdefault("redundancy", 2)
    dsn = cluster.dsn(timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)
    return SessionStore.from_dsn(dsn, **options)


def key_of(store: SessionStore, sid: str) -> bytes:
    prefix = store.key_prefix  # the option as given: a str, or bytes
    return storage_key(prefix.encode("ascii") if isinstance(prefix, str) else prefix, sid)


def version_of(store: SessionStore, sid: str) -> int:
    """The version of the newest copy of ``sid`` (it changes on every write, not on a touch)."""
    snapshot = store.fetch(sid)
    assert snapshot is not None, "no such session"
    return snapshot.version


def holders(cluster: LocalCluster, store: SessionStore, sid: str) -> list[int]:
    """Indexes of the running servers that hold a copy (or tombstone) of ``sid``.

    Asked with a get, not read from ``cluster.keys()``: memcached's crawler
    (``lru_crawler metadump``) skips items that were just read or touched."""
    key = key_of(store, sid)
    running = [s.index for s in cluster.servers if s.running and not s.hung]
    return [index for index in running if cluster.get_raw(index, key) is not None]


def all_keys(cluster: LocalCluster) -> set[tuple[int, bytes]]:
    """Every key the crawler lists (it may skip items just read: use for "no more than")."""
    return {(s.index, key) for s in cluster.servers for key in cluster.keys(s.index)}


def assert_only_key(cluster: LocalCluster, store: SessionStore, sid: str) -> None:
    """``sid``'s copies are the only keys in the cluster, and no injected key exists."""
    copies = holders(cluster, store, sid)
    assert len(copies) == store.redundancy
    assert all_keys(cluster) <= {(index, key_of(store, sid)) for index in copies}
    for server in cluster.servers:
        assert cluster.get_raw(server.index, b"injected") is None


def gets_served(cluster: LocalCluster) -> int:
    """Total ``get`` commands the servers have answered so far."""
    return sum(int(cluster.stats(s.index)["cmd_get"]) for s in cluster.servers)


def ttl_left(cluster: LocalCluster, index: int, key: bytes) -> int:
    """Seconds before ``key`` expires on server ``index`` (meta get's ``t`` flag)."""
    server = cluster.servers[index]
    client = Client((server.host, server.port), timeout=2, default_noreply=False)
    try:
        reply: bytes = client.raw_command(b"mg " + key + b" t", b"\r\n")
    finally:
        client.close()
    flags = {token[:1]: token[1:] for token in reply.split()[1:]}
    assert reply.startswith(b"HD"), reply
    return int(flags[b"t"])


def settle() -> None:
    """Let the retry interval of a server marked down pass, so it is probed again."""
    time.sleep(RETRY_INTERVAL * 1.5)


def parse_set_cookie(header: str) -> tuple[str, str, dict[str, str | bool]]:
    """``"a=b; Path=/; HttpOnly"`` -> ``("a", "b", {"path": "/", "httponly": True})``."""
    first, *attributes = (part.strip() for part in header.split(";"))
    name, _, value = first.partition("=")
    parsed: dict[str, str | bool] = {}
    for attribute in attributes:
        key, sep, val = attribute.partition("=")
        parsed[key.lower()] = val if sep else True
    return name, value, parsed


def cookies_named(headers: list[str], name: str) -> list[tuple[str, dict[str, str | bool]]]:
    """The (value, attributes) of every Set-Cookie header for cookie ``name``."""
    found = []
    for header in headers:
        cookie, value, attributes = parse_set_cookie(header)
        if cookie == name:
            found.append((value, attributes))
    return found


@contextmanager
def serve(app: Any) -> Iterator[tuple[str, int]]:
    """Serve the WSGI ``app`` over real HTTP on a free loopback port, in a thread."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_port
    finally:
        server.shutdown()
        thread.join(timeout=5)


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free loopback port, in a thread; yields
    its URL. The socket is bound and listening first, so requests wait in its backlog,
    never fail to connect."""
    import uvicorn

    listener = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", ws="wsproto", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()
    assert not thread.is_alive(), "uvicorn did not stop"
