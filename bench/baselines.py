"""What memsess is compared with: pymemcache used the way an app would use it.

Each baseline offers the store's four operations on a memcached key and
session data: ``load`` (get + msgpack), ``save`` (msgpack + set, confirmed:
``noreply=False``), ``touch`` and ``delete`` (both confirmed too).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import msgpack
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import MemcacheError

__all__ = ["Baseline", "NaivePair", "PymemcacheClient", "PymemcacheHash"]


class _Memcache(Protocol):
    def get(self, key: bytes, default: Any = None) -> Any: ...
    def set(self, key: bytes, value: Any, expire: int = 0, noreply: bool | None = None) -> Any: ...
    def touch(self, key: bytes, expire: int = 0, noreply: bool | None = None) -> Any: ...
    def delete(self, key: bytes, noreply: bool | None = None) -> Any: ...
    def close(self) -> None: ...


class Baseline:
    """One pymemcache client, sessions as msgpack."""

    def __init__(self, client: _Memcache, *, ttl: int) -> None:
        self.client = client
        self.ttl = ttl

    def load(self, key: bytes) -> dict[str, Any] | None:
        raw = self.client.get(key)
        if raw is None:
            return None
        data: dict[str, Any] = msgpack.unpackb(raw)
        return data

    def save(self, key: bytes, data: dict[str, Any]) -> None:
        self.client.set(key, msgpack.packb(data), expire=self.ttl, noreply=False)

    def touch(self, key: bytes) -> bool:
        return bool(self.client.touch(key, expire=self.ttl, noreply=False))

    def delete(self, key: bytes) -> None:
        self.client.delete(key, noreply=False)

    def close(self) -> None:
        self.client.close()


class PymemcacheClient(Baseline):
    """pymemcache ``Client``: one server, no redundancy."""

    def __init__(self, address: tuple[str, int], *, ttl: int, timeout: float) -> None:
        super().__init__(_client(address, timeout), ttl=ttl)


class PymemcacheHash(Baseline):
    """pymemcache ``HashClient`` over every server: one copy per key; a dead
    server's keys move to the others (rendezvous hashing)."""

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        *,
        ttl: int,
        timeout: float,
        dead_timeout: float,
        use_pooling: bool = False,
    ) -> None:
        client = HashClient(
            list(servers),
            connect_timeout=timeout,
            timeout=timeout,
            no_delay=True,
            dead_timeout=dead_timeout,
            use_pooling=use_pooling,
            # A cache client in a web app does not fail the request when a server
            # does: a miss (None) instead of an exception, as PHP's handler does.
            ignore_exc=True,
            default_noreply=False,
        )
        super().__init__(client, ttl=ttl)
        self.hash_client = client

    def server_of(self, key: bytes) -> tuple[str, int]:
        """The (host, port) this client sends ``key`` to now."""
        server: tuple[str, int] = self.hash_client._get_client(key).server
        return server


class NaivePair:
    """Two copies the obvious way: one pymemcache ``Client`` per server; a key's
    two servers are picked by CRC-32; writes go to both in turn; a read asks the
    first and, on a miss or an error, the second. A failing server is simply
    tried again on the next request (nothing marks it down)."""

    def __init__(self, servers: Sequence[tuple[str, int]], *, ttl: int, timeout: float) -> None:
        if len(servers) < 2:
            raise ValueError("two copies need two servers")
        self.clients = [_client(address, timeout) for address in servers]
        self.ttl = ttl

    def pair(self, key: bytes) -> tuple[Client, Client]:
        first = zlib.crc32(key) % len(self.clients)
        return self.clients[first], self.clients[(first + 1) % len(self.clients)]

    def load(self, key: bytes) -> dict[str, Any] | None:
        for client in self.pair(key):
            try:
                raw = client.get(key)
            except (OSError, MemcacheError):
                continue
            if raw is not None:
                data: dict[str, Any] = msgpack.unpackb(raw)
                return data
        return None

    def save(self, key: bytes, data: dict[str, Any]) -> None:
        value = msgpack.packb(data)
        stored = 0
        for client in self.pair(key):
            try:
                stored += bool(client.set(key, value, expire=self.ttl, noreply=False))
            except (OSError, MemcacheError):
                continue
        if not stored:
            raise RuntimeError("naive pair: no copy stored")

    def touch(self, key: bytes) -> bool:
        touched = False
        for client in self.pair(key):
            try:
                touched |= bool(client.touch(key, expire=self.ttl, noreply=False))
            except (OSError, MemcacheError):
                continue
        return touched

    def delete(self, key: bytes) -> None:
        for client in self.pair(key):
            try:
                client.delete(key, noreply=False)
            except (OSError, MemcacheError):
                continue

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _client(address: tuple[str, int], timeout: float) -> Client:
    return Client(
        address, connect_timeout=timeout, timeout=timeout, no_delay=True, default_noreply=False
    )
