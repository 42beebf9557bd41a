"""``memsess demo --secure``: the five faults over TLS with authentication and sealed
records; one scenario here (the whole demo is `make demo`), and the check that finds
session data stored in clear."""

from __future__ import annotations

import io

import pytest

from memsess import SessionStore
from memsess.demo import SCENARIOS, Security, _exposed, run_scenario
from memsess.testing import LocalCluster

pytest.importorskip("cryptography")


def test_a_hang_logout_and_resume_over_tls_with_sealed_records_loses_nothing() -> None:
    (scenario,) = [s for s in SCENARIOS if s.name == "hang, logout, resume"]
    out = io.StringIO()
    tally = run_scenario(scenario, out, Security.secure())
    assert (tally.lost, tally.stale, tally.resurrected, tally.errors) == (0, 0, 0, 0), (
        out.getvalue()
    )
    assert tally.ok == 1000
    assert tally.exposed == 0


def test_the_exposure_check_finds_session_data_stored_in_clear() -> None:
    with LocalCluster(1) as cluster:
        with SessionStore.from_dsn(cluster.dsn()) as store:
            store.save(store.new_id(), {"user_id": 7, "version": 1})
        assert _exposed(cluster) == 1
