"""Random single-server faults under two processes of session traffic (the nemesis in
tests/nemesis.py): no session lost, stale or brought back after logout, and no error.

NEMESIS_SECONDS sets the seconds of faults per test (default 10; `make soak` runs 180),
NEMESIS_SEED the fault schedule and traffic (default random, printed in the report).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace

import nemesis
import nemesis_history
import pytest
from conftest import TEST_RETRY_INTERVAL, TEST_TIMEOUT

from memsess.testing import LocalCluster

SECONDS = float(os.environ.get("NEMESIS_SECONDS", "10"))
SEED = os.environ.get("NEMESIS_SEED")
RecordProperty = Callable[[str, object], None]

# Startup, sweeps and the final check add seconds to the faults; a hang may overrun.
pytestmark = pytest.mark.timeout(max(120.0, 3 * SECONDS + 60))


@pytest.fixture(scope="module", autouse=True)
def closing_note() -> Iterator[None]:
    yield
    if nemesis_history.REPORTS:
        counts = ", ".join(f"{name} {n}" for name, n in nemesis_history.totals().items())
        print(f"\nnemesis totals: {counts}")


def run_and_check(
    cluster: LocalCluster,
    record_property: RecordProperty,
    *,
    burners: int,
    drivers: tuple[str, str],
) -> None:
    config = nemesis.NemesisConfig(
        seconds=SECONDS,
        burners=burners,
        drivers=drivers,
        timeout=TEST_TIMEOUT,
        retry_interval=TEST_RETRY_INTERVAL,
    )
    if SEED:
        config = replace(config, seed=int(SEED))
    report = nemesis.run(cluster, config)
    for name, value in report.counts().items():
        record_property(name, value)
    print(f"\n{report.summary()}")
    # Plain numbers in the asserts: pytest would print the whole report's repr.
    harness_errors = report.tally.harness_errors
    assert not harness_errors, "the harness itself failed:\n" + "\n".join(harness_errors)
    wrong_answers, errors = report.wrong_answers, report.errors
    assert wrong_answers == 0, report.diagnosis()
    assert errors == 0, report.diagnosis()
    # Not vacuous: enough traffic and faults happened for the zeros to mean something.
    operations, faults = report.operations, sum(report.faults.values())
    assert operations >= 100 * SECONDS, report.summary()
    assert faults >= config.min_faults, report.summary()


# Each run pairs the two stores: one process's workers on the blocking SessionStore, the
# other's on the AsyncSessionStore, handing the same sessions to each other.
def test_no_wrong_answer_or_error_under_random_single_server_faults(
    cluster: LocalCluster, record_property: RecordProperty
) -> None:
    run_and_check(cluster, record_property, burners=0, drivers=("sync", "async"))


def test_no_wrong_answer_or_error_under_faults_beside_three_cpu_burners(
    cluster: LocalCluster, record_property: RecordProperty
) -> None:
    run_and_check(cluster, record_property, burners=3, drivers=("async", "sync"))
