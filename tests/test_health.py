"""Server health transitions: pure functions of (health, event, now), no sleeping."""

from __future__ import annotations

from memsess.health import Health, State, claim_probe, on_failure, on_success


def fail(health: Health, now: float, *, immediate: bool = False) -> Health:
    return on_failure(health, now, reason="boom", retry_interval=15.0, immediate=immediate)


def test_refused_connection_marks_down_at_once() -> None:
    health = fail(Health(), 100.0, immediate=True)
    assert health.state is State.DOWN
    assert health.retry_at == 115.0
    assert health.reason == "boom"


def test_timeouts_mark_down_only_after_three_in_a_row() -> None:
    health = fail(Health(), 1.0)
    assert health.state is State.SUSPECT
    assert health.usable
    health = fail(health, 2.0)
    assert health.state is State.SUSPECT
    health = fail(health, 3.0)
    assert health.state is State.DOWN
    assert not health.usable
    assert health.retry_at == 18.0


def test_a_success_between_timeouts_resets_the_count() -> None:
    health = fail(fail(Health(), 1.0), 2.0)
    health = on_success(health, 3.0)
    assert health == Health(State.UP, 0, 0.0, "", 3.0)
    assert fail(health, 4.0).state is State.SUSPECT


def test_success_on_a_healthy_server_returns_the_same_value() -> None:
    health = Health(since=5.0)
    assert on_success(health, 9.0) is health


def test_down_server_is_not_probed_before_its_retry_interval() -> None:
    health = fail(Health(), 100.0, immediate=True)
    assert claim_probe(health, 114.9, probe_timeout=2.0) is None


def test_exactly_one_request_claims_the_probe() -> None:
    health = fail(Health(), 100.0, immediate=True)
    probing = claim_probe(health, 115.0, probe_timeout=2.0)
    assert probing is not None
    assert probing.state is State.PROBING
    # A second request at the same moment sees PROBING and must skip it.
    assert claim_probe(probing, 115.0, probe_timeout=2.0) is None


def test_a_probe_that_never_reports_is_given_up_after_its_timeout() -> None:
    probing = claim_probe(fail(Health(), 0.0, immediate=True), 15.0, probe_timeout=2.0)
    assert probing is not None
    assert claim_probe(probing, 16.9, probe_timeout=2.0) is None
    again = claim_probe(probing, 17.0, probe_timeout=2.0)
    assert again is not None
    assert again.state is State.PROBING


def test_failed_probe_goes_down_again_at_once_with_a_new_interval() -> None:
    probing = claim_probe(fail(Health(), 0.0, immediate=True), 15.0, probe_timeout=2.0)
    assert probing is not None
    health = fail(probing, 15.5)
    assert health.state is State.DOWN
    assert health.retry_at == 30.5


def test_successful_probe_brings_the_server_back_up() -> None:
    probing = claim_probe(fail(Health(), 0.0, immediate=True), 15.0, probe_timeout=2.0)
    assert probing is not None
    health = on_success(probing, 15.1)
    assert health.state is State.UP
    assert health.failures == 0
    assert health.since == 15.1


def test_a_burst_of_timeouts_right_after_a_reply_does_not_mark_down() -> None:
    # A busy host: many concurrent requests cut off within milliseconds of a
    # reply the server did give. It stays usable.
    health = Health()
    for now in (10.001, 10.002, 10.003, 10.004, 10.005):
        health = on_failure(health, now, reason="straggler", retry_interval=15.0, last_reply=10.0)
    assert health.state is State.SUSPECT
    assert health.usable
    assert health.failures == 5


def test_timeouts_mark_down_once_the_server_has_also_been_silent() -> None:
    health = Health()
    for now in (10.1, 10.2, 10.3):
        health = on_failure(health, now, reason="straggler", retry_interval=15.0, last_reply=10.0)
    assert health.state is State.DOWN
    assert health.retry_at == 25.3
