"""What bench/cpu.py sets memsess beside, measured in the bench's own process.

pymemcache ``HashClient`` (pooled and not, one copy: get + msgpack, msgpack + set with
noreply off), the raw two-copy floor (a get sent to two servers, then both replies read),
``aiomcache.Client`` and the raw asyncio floor (bench/aio.py's), and PHP's session
handlers in a PHP process of their own, both through bench/php_session_cycle.php:
pecl memcache (php-memcache, the issue's reference) and php-memcached (bench/
concurrency.py's runs), each skipped when its extension is absent. Timed with bench/cpu_worker.py's
helpers, so that memsess (timed in its workers) and its peers are timed by one code.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
from collections.abc import Callable
from typing import Any, Final

import msgpack

from bench.aio import AIOMCACHE_DEFAULT_POOL, AiomcacheSessions, RawFloor
from bench.baselines import PymemcacheHash
from bench.common import RETRY_INTERVAL, TIMEOUT, TTL, LocalCluster, addresses
from bench.concurrency import php_cycles, php_session_cycle, php_with_memcached
from bench.cpu_worker import async_timed, run_threads, timed
from bench.floor import RawTCP

__all__ = ["PHP_MEMCACHE", "Peers", "Php", "two_gets"]

#: pecl memcache's memcache.session_redundancy for two copies (its default; checked).
PHP_MEMCACHE_REDUNDANCY: Final = 2
#: The pecl memcache row's name (php-memcached's are bench/concurrency.py's).
PHP_MEMCACHE: Final = "PHP pecl memcache"
SESSIONS_PER_THREAD: Final = 20


def _key(name: str) -> bytes:
    """A key as long as memsess's (``memsess:`` + a 43-character id)."""
    return f"bench:cpu:{name}:".encode().ljust(51, b"0")


def two_gets(first: RawTCP, second: RawTCP, line: bytes) -> None:
    """The two-copy read floor: the get sent to both servers, then both replies read,
    so that the two round trips overlap."""
    first.sock.sendall(line)
    second.sock.sendall(line)
    first.read_get_reply()
    second.read_get_reply()


class Peers:
    """The peers on ``cluster``, their sessions saved, connections open."""

    def __init__(self, cluster: LocalCluster, data: dict[str, Any]) -> None:
        servers = addresses(cluster)
        self.data = data
        self.hash = PymemcacheHash(
            servers, ttl=TTL, timeout=TIMEOUT, dead_timeout=RETRY_INTERVAL, use_pooling=True
        )
        # Without a pool: one connection per server, as a single-threaded app holds it
        # (no pool's lock and bookkeeping per call): the cheapest HashClient there is.
        self.hash_single = PymemcacheHash(
            servers, ttl=TTL, timeout=TIMEOUT, dead_timeout=RETRY_INTERVAL, use_pooling=False
        )
        self.raw = [RawTCP(address) for address in servers[:2]]
        self.loop = asyncio.new_event_loop()
        self.aiomcache = AiomcacheSessions(servers[0], pool_size=AIOMCACHE_DEFAULT_POOL)
        self.async_floor = RawFloor(self.loop, servers[:2])
        # A key per client: the floors' copies carry memsess's 16-byte record header.
        self.key, self.cycle_key, self.floor_key = _key("load"), _key("cycle"), _key("floor")
        for client in (self.hash, self.hash_single):
            client.save(self.key, data)
            client.save(self.cycle_key, data)
        value = bytes(16) + msgpack.packb(data)
        for index in range(2):  # both floors read servers 0 and 1
            cluster.set_raw(index, self.floor_key, value, exptime=TTL)
        self.get_line = b"get " + self.floor_key + b"\r\n"
        run = self.loop.run_until_complete
        run(self.async_floor.open())
        run(self.aiomcache.save(self.key, data))
        run(self.aiomcache.save(self.cycle_key, data))

    def cycle(self, key: bytes | None = None, *, pooled: bool = True) -> None:
        key = key or self.cycle_key
        client = self.hash if pooled else self.hash_single
        loaded = client.load(key)
        if loaded is None:
            raise RuntimeError("HashClient: a saved session read as missing")
        client.save(key, loaded)

    async def async_cycle(self) -> None:
        loaded = await self.aiomcache.load(self.cycle_key)
        if loaded is None:
            raise RuntimeError("aiomcache: a saved session read as missing")
        await self.aiomcache.save(self.cycle_key, loaded)

    def round(self, calls: int) -> dict[str, dict[str, list[float]]]:
        """Each peer's operations, ``calls`` each: {peer: {op: [wall, cpu]}}."""
        hash_client, key, data, loop = self.hash, self.key, self.data, self.loop
        single = self.hash_single
        first, second = self.raw
        aiomc = self.aiomcache
        return {
            "hash": {
                "load": timed(lambda: hash_client.load(key), calls),
                "save": timed(lambda: hash_client.save(key, data), calls),
                "load+save": timed(self.cycle, calls),
            },
            "hash single": {
                "load": timed(lambda: single.load(key), calls),
                "save": timed(lambda: single.save(key, data), calls),
                "load+save": timed(lambda: self.cycle(pooled=False), calls),
            },
            "floor": {"load": timed(lambda: two_gets(first, second, self.get_line), calls)},
            "aiomcache": {
                "load": async_timed(loop, lambda: aiomc.load(key), calls),
                "save": async_timed(loop, lambda: aiomc.save(key, data), calls),
                "load+save": async_timed(loop, self.async_cycle, calls),
            },
            "async floor": {
                "load": async_timed(loop, lambda: self.async_floor.load(self.floor_key), calls)
            },
        }

    def threads(self, threads: int, seconds: float, max_cycles: int) -> dict[str, float]:
        """HashClient (pooled) shared by ``threads`` threads, load+save cycles."""
        keys = [[_key(f"t{n}-{i}") for i in range(SESSIONS_PER_THREAD)] for n in range(threads)]
        for own in keys:
            for key in own:
                self.hash.save(key, self.data)

        def make_cycle(n: int) -> Callable[[], None]:
            own = itertools.cycle(keys[n]).__next__
            return lambda: self.cycle(own())

        return run_threads(threads, make_cycle, seconds=seconds, max_cycles=max_cycles)

    def close(self) -> None:
        self.hash.close()
        for conn in self.raw:
            conn.close()
        self.async_floor.close()
        self.loop.run_until_complete(self.aiomcache.close())
        self.loop.close()


class Php:
    """PHP's session handlers on the bench's cluster, a load+save cycle being
    ``session_start()`` + ``session_write_close()`` (lock, read, write, unlock); CPU is
    the PHP process's (getrusage)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.memcache = _php_with("memcache")
        self.memcached = php_with_memcached()

    @property
    def missing(self) -> str | None:
        """Why the pecl memcache row (the goal's reference) is not measured, or None."""
        if self.memcache is not None:
            return None
        if shutil.which("php") is None:
            return "php is not installed"
        return "php has no memcache extension"

    def round(self, iterations: int) -> dict[str, list[float]]:
        """One run of ``iterations`` cycles per handler: {row: [wall, cpu]}, seconds."""
        found: dict[str, list[float]] = {}
        if self.memcache is not None:
            found[PHP_MEMCACHE] = self._memcache_run(self.memcache, iterations)
        if self.memcached is not None:
            runs = php_cycles(self.memcached, self.cluster, iterations=iterations, rounds=1)
            for name, (wall, cpu) in runs.items():  # with sess_locking, and without
                found[name] = [wall / 1e6, cpu / 1e6]
        return found

    def _memcache_run(self, php: str, iterations: int) -> list[float]:
        save_path = ", ".join(f"tcp://{server.address}" for server in self.cluster.servers)
        redundancy = f"memcache.session_redundancy={PHP_MEMCACHE_REDUNDANCY}"
        result = php_session_cycle(php, save_path, iterations, "memcache", redundancy)
        key = result["key"].encode()
        copies = sum(
            self.cluster.get_raw(index, key) is not None
            for index in range(len(self.cluster.servers))
        )
        if copies != 2:
            raise RuntimeError(f"pecl memcache kept {copies} copies of its session, not 2")
        return [result["wall_us"] / 1e6, result["cpu_us"] / 1e6]


def _php_with(extension: str) -> str | None:
    """The php command when it loads ``extension``, else None."""
    php = shutil.which("php")
    if php is None:
        return None
    modules = subprocess.run([php, "-m"], capture_output=True, text=True, check=False).stdout
    return php if extension in modules.split() else None
