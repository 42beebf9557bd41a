"""Shared fixtures: a real local memcached cluster and stores on it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from blocking_async import store_for

import memsess
from memsess import SessionStore
from memsess._build import COMPILED, compiled_modules, describe, stale_modules
from memsess.protocol import Command
from memsess.store import StoreCore
from memsess.testing import LocalCluster
from memsess.transport import DEFAULT_STRAGGLER_WINDOW, FirstReply, Result, ServerPool
from memsess.transport import fanout as blocking_fanout
from memsess.transport.aio import AsyncFanout, LoopPools

#: ``make test`` sets it to "pure", ``make test-compiled`` to "compiled": the suite then
#: refuses to run on the other build, so a run can never test what it did not mean to.
EXPECTED_BUILD_ENV = "MEMSESS_EXPECT_BUILD"


def pytest_report_header() -> str:
    return f"memsess build: {describe()}"


def pytest_sessionstart(session: pytest.Session) -> None:
    expected = os.environ.get(EXPECTED_BUILD_ENV, "")
    running = "compiled" if memsess.__compiled__ else "pure"
    if expected and expected != running:
        pytest.exit(
            f"{EXPECTED_BUILD_ENV}={expected}, but the {running} build runs ({describe()});"
            " scripts/build-compiled builds in place, scripts/build-compiled --clean removes it",
            returncode=3,
        )
    if 0 < len(compiled_modules()) < len(COMPILED):
        pytest.exit(f"a broken build: {describe()}", returncode=3)
    if stale := stale_modules():
        pytest.exit(
            f"the compiled build in place is older than the source of {', '.join(stale)}:"
            " run scripts/build-compiled again, or scripts/build-compiled --clean",
            returncode=3,
        )


# Short enough that a hung server is noticed quickly in tests, long enough that
# a loaded 2-core machine never times out a healthy one.
TEST_TIMEOUT = 0.5
TEST_RETRY_INTERVAL = 0.3

StoreFactory = Callable[..., SessionStore]

#: How the fault tests reach their servers: plain TCP, and TLS with ASCII authentication
#: (memcached -Z -Y), where a hung server may be hung in the middle of a handshake.
WIRES = ["tcp", "tls"]
TLS_AUTH = ("memsess", "fault-test-password")


def wire_cluster(n: int, wire: str) -> LocalCluster:
    """A LocalCluster of ``n`` servers reached over ``wire`` (one of WIRES)."""
    if wire == "tls":
        return LocalCluster(n, tls=True, auth=TLS_AUTH)
    return LocalCluster(n)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(3) as local:
        yield local


@pytest.fixture
def driver() -> str:
    """Which store the store fixtures make: "sync" here; a module that runs its tests on
    both overrides this with a fixture parametrized over DRIVERS."""
    return "sync"


@pytest.fixture
def make_store(cluster: LocalCluster, driver: str) -> Iterator[StoreFactory]:
    """Stores on ``cluster``, redundancy 2 unless told otherwise; all closed at teardown."""
    stores: list[SessionStore] = []

    def make(**options: Any) -> SessionStore:
        timeout = options.pop("timeout", TEST_TIMEOUT)
        retry_interval = options.pop("retry_interval", TEST_RETRY_INTERVAL)
        options.setdefault("redundancy", 2)
        dsn = cluster.dsn(timeout=timeout, retry_interval=retry_interval)
        store = store_for(driver, dsn, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    return make_store()


def server_indexes(cluster: LocalCluster, store: StoreCore, sid: str) -> list[int]:
    """Indexes in ``cluster`` of the servers holding ``sid``'s copies, in ring order."""
    by_address = {server.address: server.index for server in cluster.servers}
    return [by_address[address] for address in store.locate(sid)]


def key_of(store: SessionStore, sid: str) -> bytes:
    return store.storage_key(sid)


def all_keys(cluster: LocalCluster) -> set[tuple[int, bytes]]:
    return {(server.index, key) for server in cluster.servers for key in cluster.keys(server.index)}


#: A CPU burner's code; ``{parent}`` is the pid of the process that starts it.
BURNER = """
import os
while os.getppid() == {parent}:
    for _ in range(100_000):
        pass
"""


@contextmanager
def cpu_burners(count: int) -> Iterator[None]:
    """``count`` processes spinning on the CPU while the block runs (a busy host). Each
    also ends within a few ms once the test process is gone (killed, say, where no
    ``finally`` runs), so none is left spinning behind an interrupted run."""
    code = BURNER.format(parent=os.getpid())
    burners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


Fanout = Callable[..., list[Result]]


@pytest.fixture(params=["sync", "async"])
def fanout(request: pytest.FixtureRequest) -> Iterator[Fanout]:
    """``fanout(pools, commands, straggler_window=)`` on the blocking driver, or on the
    asyncio one (one loop for the test, one LoopPools per list of pools, so that its
    connections are reused from call to call as the blocking pools' are)."""
    if request.param == "sync":
        yield blocking_fanout
        return
    loop = asyncio.new_event_loop()
    loop_pools: dict[tuple[int, ...], LoopPools] = {}

    def run(
        pools: Sequence[ServerPool],
        commands: Sequence[Command],
        *,
        straggler_window: float = DEFAULT_STRAGGLER_WINDOW,
    ) -> list[Result]:
        key = tuple(id(pool) for pool in pools)
        if key not in loop_pools:
            loop_pools[key] = LoopPools(loop, list(pools), on_reset=lambda index: None)
        batch = list(enumerate(commands))
        fan = AsyncFanout(loop_pools[key], batch, FirstReply(straggler_window))
        # Every slot holds its result once run() has returned.
        return loop.run_until_complete(fan.run()).results  # type: ignore[return-value]

    yield run
    for pools in loop_pools.values():
        pools.close()
    loop.run_until_complete(asyncio.sleep(0))  # the closed transports let go
    loop.close()
