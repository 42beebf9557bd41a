"""Fixtures for the steady-state benchmarks: one local cluster of 3 for the
whole run (another with UDP on, only if a UDP benchmark runs), and every
client built once against it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.baselines import NaivePair, PymemcacheClient, PymemcacheHash
from bench.common import (
    RETRY_INTERVAL,
    TIMEOUT,
    TTL,
    LocalCluster,
    addresses,
    local_cluster,
    memsess_store,
)
from memsess import SessionStore


@pytest.fixture(scope="session")
def bench_cluster() -> Iterator[LocalCluster]:
    with local_cluster(3) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def udp_cluster() -> Iterator[LocalCluster]:
    with local_cluster(3, udp=True) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def stores(bench_cluster: LocalCluster) -> Iterator[dict[int, SessionStore]]:
    """A memsess store per redundancy (1, 2, 3)."""
    built = {r: memsess_store(bench_cluster, redundancy=r) for r in (1, 2, 3)}
    yield built
    for store in built.values():
        store.close()


@pytest.fixture(scope="session")
def pymemcache_client(bench_cluster: LocalCluster) -> Iterator[PymemcacheClient]:
    client = PymemcacheClient(addresses(bench_cluster)[0], ttl=TTL, timeout=TIMEOUT)
    yield client
    client.close()


@pytest.fixture(scope="session")
def hash_client(bench_cluster: LocalCluster) -> Iterator[PymemcacheHash]:
    client = PymemcacheHash(
        addresses(bench_cluster), ttl=TTL, timeout=TIMEOUT, dead_timeout=RETRY_INTERVAL
    )
    yield client
    client.close()


@pytest.fixture(scope="session")
def naive_pair(bench_cluster: LocalCluster) -> Iterator[NaivePair]:
    pair = NaivePair(addresses(bench_cluster), ttl=TTL, timeout=TIMEOUT)
    yield pair
    pair.close()
