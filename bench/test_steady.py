"""Steady state with pytest-benchmark: memsess against pymemcache and the raw floor.

Each benchmark group is one operation on one session size ("load 2KB"), so
the table pytest-benchmark prints compares, side by side: memsess at
redundancy 1, 2 and 3, pymemcache Client and HashClient, the naive two-client
pair, and the raw-socket floor (TCP, and UDP for reads).

Not part of the test suite (its testpaths is ``tests/``): run it with
``python -m bench --only steady`` or ``pytest bench/test_steady.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

from bench.baselines import Baseline, NaivePair, PymemcacheClient, PymemcacheHash
from bench.common import (
    SIZES,
    TTL,
    LocalCluster,
    addresses,
    make_session,
    memsess_store,
    udp_addresses,
)
from bench.floor import RawTCP, RawUDP, raw_fanout_set, set_command
from memsess import SessionStore

Benchmark = Any  # pytest-benchmark's fixture has no public type
OPS = ("load", "save", "touch", "delete")
size_labels = pytest.mark.parametrize("size", list(SIZES))
redundancies = pytest.mark.parametrize("redundancy", [1, 2, 3], ids=lambda r: f"r{r}")


def _group(op: str, size: str) -> str:
    return f"{op} {size}"


def _key(name: str, size: str) -> bytes:
    # As long as a memsess key (prefix + 40 hex digits), so the wire bytes match.
    return f"bench:{name}:{size}:".encode().ljust(48, b"0")


# -- memsess ------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@redundancies
@size_labels
def test_memsess(
    benchmark: Benchmark, stores: dict[int, SessionStore], op: str, redundancy: int, size: str
) -> None:
    store = stores[redundancy]
    data = make_session(SIZES[size])
    sid = store.new_id()
    store.save(sid, data)
    benchmark.group = _group(op, size)
    if op == "load":
        assert benchmark(store.load, sid) == data
    elif op == "save":
        benchmark(store.save, sid, data)
    elif op == "touch":
        assert benchmark(store.touch, sid)
    else:
        benchmark(store.delete, sid)


@redundancies
@size_labels
def test_memsess_udp_load(
    benchmark: Benchmark, udp_cluster: LocalCluster, redundancy: int, size: str
) -> None:
    with memsess_store(udp_cluster, redundancy=redundancy) as store:
        data = make_session(SIZES[size])
        sid = store.new_id()
        store.save(sid, data)
        benchmark.group = _group("load", size)
        assert benchmark(store.load, sid) == data


# -- pymemcache -----------------------------------------------------------------


def _run_baseline(benchmark: Benchmark, client: Baseline | NaivePair, op: str, size: str) -> None:
    data = make_session(SIZES[size])
    key = _key(type(client).__name__, size)
    client.save(key, data)
    benchmark.group = _group(op, size)
    if op == "load":
        assert benchmark(client.load, key) == data
    elif op == "save":
        benchmark(client.save, key, data)
    elif op == "touch":
        assert benchmark(client.touch, key)
    else:
        benchmark(client.delete, key)


@pytest.mark.parametrize("op", OPS)
@size_labels
def test_pymemcache_client(
    benchmark: Benchmark, pymemcache_client: PymemcacheClient, op: str, size: str
) -> None:
    _run_baseline(benchmark, pymemcache_client, op, size)


@pytest.mark.parametrize("op", OPS)
@size_labels
def test_pymemcache_hashclient(
    benchmark: Benchmark, hash_client: PymemcacheHash, op: str, size: str
) -> None:
    _run_baseline(benchmark, hash_client, op, size)


@pytest.mark.parametrize("op", OPS)
@size_labels
def test_naive_two_clients(benchmark: Benchmark, naive_pair: NaivePair, op: str, size: str) -> None:
    _run_baseline(benchmark, naive_pair, op, size)


# -- the raw-socket floor ---------------------------------------------------------


@pytest.fixture(scope="module")
def raw_tcp(bench_cluster: LocalCluster) -> Iterator[list[RawTCP]]:
    connections = [RawTCP(address) for address in addresses(bench_cluster)]
    yield connections
    for conn in connections:
        conn.close()


def _raw_value(size: str) -> bytes:
    # memsess stores a 16-byte record header before the msgpack payload.
    payload: bytes = msgpack.packb(make_session(SIZES[size]))
    return bytes(16) + payload


@pytest.mark.parametrize("op", ["get", "set", "fanout_set"])
@size_labels
def test_raw_tcp(benchmark: Benchmark, raw_tcp: list[RawTCP], op: str, size: str) -> None:
    key = _key("raw", size)
    value = _raw_value(size)
    raw_tcp[0].set(key, value)
    run: Callable[[], object]
    if op == "get":
        benchmark.group = _group("load", size)
        run = lambda: raw_tcp[0].get(key)  # noqa: E731
    elif op == "set":
        benchmark.group = _group("save", size)
        run = lambda: raw_tcp[0].set(key, value, TTL)  # noqa: E731
    else:
        benchmark.group = _group("save", size)
        command = set_command(key, value, TTL)
        run = lambda: raw_fanout_set(raw_tcp[0], raw_tcp[1], command)  # noqa: E731
    result = benchmark(run)
    if op == "get":
        assert result == value


@size_labels
def test_raw_udp_get(benchmark: Benchmark, udp_cluster: LocalCluster, size: str) -> None:
    key = _key("raw-udp", size)
    value = _raw_value(size)
    tcp = RawTCP(addresses(udp_cluster)[0])
    udp = RawUDP(udp_addresses(udp_cluster)[0])
    try:
        tcp.set(key, value)
        benchmark.group = _group("load", size)
        assert benchmark(udp.get, key) == value
    finally:
        tcp.close()
        udp.close()
