"""The rules that decide when a read or a write has heard enough (memsess.rules), and the
names of what a read found (memsess.copies), fed replies by hand: no server, no clock
(time is an argument)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from memsess.cluster import Cluster
from memsess.copies import CopyStatus, SessionState, classify, open_copy
from memsess.dsn import ServerSpec
from memsess.errors import TimeoutError
from memsess.plans import MARKER_SUFFIX
from memsess.protocol import Item, Status, Values
from memsess.records import DATA, FLAGS, TOMBSTONE, encode_record
from memsess.rules import ReadRule, WriteRule
from memsess.sealing import Sealer, generate_key

INF = float("inf")
KEY = b"memsess:" + b"a" * 40
MARKER = b"memsess:" + MARKER_SUFFIX
NOW = 100.0


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # Ports nobody listens on: the rules never touch a socket.
    specs = [ServerSpec("tcp", "127.0.0.1", port, timeout=0.5) for port in (1, 2, 3)]
    built = Cluster(specs, redundancy=3)
    yield built
    built.close()


def copy(version: int, *, kind: int = DATA, marker: int | None = None) -> Values:
    items = [Item(KEY, FLAGS, encode_record(version, kind, 1, b"\x80", ttl=60), 7)]
    if marker is not None:
        items.append(Item(MARKER, 0, b"%d" % marker, 8))
    return Values(tuple(items))


MISS = Values(())


def read_rule(cluster: Cluster, *, marker_asked: bool = True) -> ReadRule:
    return ReadRule(cluster, [0, 1, 2], KEY, marker_asked=[marker_asked] * 3)


def test_a_miss_never_ends_a_read_while_another_copy_is_silent(cluster: Cluster) -> None:
    rule = read_rule(cluster)
    assert rule.on_result(0, MISS, NOW) == INF
    assert rule.on_result(1, MISS, NOW) == INF


def test_a_trusted_copy_gives_the_silent_ones_their_window(cluster: Cluster) -> None:
    rule = read_rule(cluster)
    cut_at = rule.on_result(1, copy(50), NOW)
    assert NOW < cut_at <= NOW + 0.5  # a window, never above the timeout
    assert rule.on_result(0, MISS, NOW + 0.001) == cut_at  # later answers do not move it


def test_a_copy_below_its_servers_trust_floor_does_not_decide_alone(cluster: Cluster) -> None:
    cluster.raise_trust_floor(1, 60)  # server 1 failed when version 60 was current
    rule = read_rule(cluster)
    assert rule.on_result(1, copy(50), NOW) == INF
    assert rule.on_result(0, copy(70), NOW) < INF  # server 0 never failed: it decides


def test_a_marker_on_the_server_raises_its_floor_for_this_read(cluster: Cluster) -> None:
    rule = read_rule(cluster)
    assert rule.on_result(1, copy(50, marker=60), NOW) == INF
    rule = read_rule(cluster)
    assert rule.on_result(1, copy(61, marker=60), NOW) < INF


def test_a_marker_read_once_counts_for_the_reads_that_do_not_ask_for_it(
    cluster: Cluster,
) -> None:
    assert read_rule(cluster).on_result(1, copy(50, marker=60), NOW) == INF
    assert cluster.marker_due[1] > NOW
    later = read_rule(cluster, marker_asked=False)
    assert later.on_result(1, copy(55), NOW + 0.1) == INF  # still under the marker
    again = read_rule(cluster)  # asked again, and gone (the server was flushed)
    assert again.on_result(1, copy(55), NOW + 2) < INF


def test_a_marker_that_is_not_a_number_trusts_nothing(cluster: Cluster) -> None:
    rule = read_rule(cluster)
    values = copy(50)
    hostile = Values((*values.items, Item(MARKER, 0, b"-1\r\nset x", 9)))
    assert rule.on_result(0, hostile, NOW) == INF
    copied = rule.copies[0]
    assert copied is not None
    assert not copied.trusted


def test_a_tombstone_is_a_record_and_decides_like_one(cluster: Cluster) -> None:
    rule = read_rule(cluster)
    assert rule.on_result(2, copy(80, kind=TOMBSTONE), NOW) < INF


def test_a_corrupt_copy_decides_nothing(cluster: Cluster) -> None:
    rule = read_rule(cluster)
    corrupt = Values((Item(KEY, FLAGS, b"\xd5garbage", 1),))
    assert rule.on_result(0, corrupt, NOW) == INF
    copied = rule.copies[0]
    assert copied is not None
    assert copied.problem


def test_a_patient_read_waits_for_every_copy(cluster: Cluster) -> None:
    rule = ReadRule(cluster, [0, 1, 2], KEY, patient=True)
    assert rule.on_result(0, copy(50), NOW) == INF


def test_a_write_waits_for_its_window_after_the_first_answer(cluster: Cluster) -> None:
    rule = WriteRule(cluster, [0, 1, 2])
    error = TimeoutError("memcached 127.0.0.1:1: no reply")
    assert rule.on_result(0, error, NOW) == INF  # an error starts nothing
    cut_at = rule.on_result(1, Status.STORED, NOW)
    read_cut = read_rule(cluster).on_result(1, copy(50), NOW)
    assert cut_at > read_cut  # writes wait longer than reads


def test_the_window_adapts_to_latency_and_stays_under_the_timeout(cluster: Cluster) -> None:
    floor = cluster.window(0, write=False)
    for _ in range(50):
        cluster._srtt[0], cluster._rttvar[0] = 0.040, 0.010  # a slow server
    assert cluster.window(0, write=False) > floor
    cluster._srtt[0] = 10.0
    assert cluster.window(0, write=False) == 0.5  # its timeout


def test_a_fixed_straggler_window_overrides_the_adaptive_one() -> None:
    specs = [ServerSpec("tcp", "127.0.0.1", port) for port in (1, 2)]
    fixed = Cluster(specs, redundancy=2, straggler_window=0.25)
    assert fixed.window(0, write=False) == fixed.window(1, write=True) == 0.25


def test_skewed_weights_still_give_every_key_redundancy_distinct_servers() -> None:
    specs = [
        ServerSpec("tcp", "127.0.0.1", 1, weight=100),
        ServerSpec("tcp", "127.0.0.1", 2, weight=1),
    ]
    skewed = Cluster(specs, redundancy=2)
    for n in range(500):
        members = skewed.replica_set(f"memsess:{n}")
        assert sorted(members) == [0, 1]


# -- what a read found, named once (memsess.copies) -------------------------------------


def read(cluster: Cluster, *answers: Values | None, sealer: Sealer | None = None) -> ReadRule:
    """A read of the three servers that got ``answers`` (None: no answer)."""
    rule = ReadRule(cluster, [0, 1, 2], KEY, sealer=sealer)
    for slot, answer in enumerate(answers):
        if answer is not None:
            rule.on_result(slot, answer, NOW)
    return rule


def test_a_read_names_its_copies_current_stale_missing_and_unreachable(cluster: Cluster) -> None:
    found = classify(read(cluster, copy(50), copy(40), MISS).copies)
    assert found.statuses == (CopyStatus.CURRENT, CopyStatus.STALE, CopyStatus.MISSING)
    assert found.state is SessionState.LIVE
    assert found.newest is not None
    assert found.newest.version == 50
    unanswered = classify(read(cluster, copy(50), None, MISS).copies)
    assert unanswered.statuses[1] is CopyStatus.UNREACHABLE


def test_a_corrupt_copy_is_named_corrupt_and_the_read_absent_without_another(
    cluster: Cluster,
) -> None:
    corrupt = Values((Item(KEY, FLAGS, b"\xd5garbage", 1),))
    found = classify(read(cluster, corrupt, MISS, MISS).copies)
    assert found.statuses == (CopyStatus.CORRUPT, CopyStatus.MISSING, CopyStatus.MISSING)
    assert (found.state, found.newest) == (SessionState.ABSENT, None)


def test_a_newest_tombstone_is_a_logout_and_older_data_is_stale(cluster: Cluster) -> None:
    found = classify(
        read(cluster, copy(40), copy(80, kind=TOMBSTONE), copy(80, kind=TOMBSTONE)).copies
    )
    assert found.state is SessionState.LOGGED_OUT
    assert found.statuses == (CopyStatus.STALE, CopyStatus.CURRENT, CopyStatus.CURRENT)


def test_only_stale_missing_and_corrupt_copies_are_repaired() -> None:
    assert {status for status in CopyStatus if status.repaired} == {
        CopyStatus.STALE,
        CopyStatus.MISSING,
        CopyStatus.CORRUPT,
    }


def test_a_copy_newer_than_what_it_is_compared_with_is_newer(cluster: Cluster) -> None:
    (extra, _, _) = read(cluster, copy(90)).copies
    assert extra is not None
    assert extra.status(50) is CopyStatus.NEWER  # an extra copy beside the replica set's


def sealed_copy(sealer: Sealer, version: int) -> Values:
    raw = sealer.seal(KEY, encode_record(version, DATA, 1, b"\x80", ttl=60))
    return Values((Item(KEY, FLAGS, raw, 7),))


def test_a_sealed_copy_is_corrupt_to_the_store_and_sealed_to_a_reader_without_keys(
    cluster: Cluster,
) -> None:
    sealer = Sealer([generate_key()])
    keyless = read(cluster, sealed_copy(sealer, 50), MISS, MISS).copies
    store = classify(keyless)  # the store knows it has no keys: it cannot read the copy
    assert (store.statuses[0], store.state) == (CopyStatus.CORRUPT, SessionState.ABSENT)
    inspect = classify(keyless, keys_unknown=True)  # the store may hold keys that open it
    assert (inspect.statuses[0], inspect.state) == (CopyStatus.SEALED, SessionState.SEALED)
    opened = classify(read(cluster, sealed_copy(sealer, 50), MISS, MISS, sealer=sealer).copies)
    assert opened.statuses[0] is CopyStatus.CURRENT


@pytest.mark.parametrize(
    ("raw", "flags", "sealed"),
    [
        (encode_record(50, DATA, 1, b"\x80", ttl=60), FLAGS, False),
        (encode_record(50, TOMBSTONE, 1, ttl=60), FLAGS, False),
        (b"\xd5garbage", FLAGS, False),
        (encode_record(50, DATA, 1, b"\x80", ttl=60), 0, False),
        (encode_record(50, DATA, 1, b"\x80", ttl=60), FLAGS, True),
        (b"\xd5\x04sealed with another key", FLAGS, True),
    ],
    ids=["data", "tombstone", "garbage", "foreign-flags", "sealed", "forged-seal"],
)
@pytest.mark.parametrize("with_keys", [False, True], ids=["no-keys", "keys"])
def test_open_copy_decodes_as_the_read_rule_does(
    cluster: Cluster, raw: bytes, flags: int, sealed: bool, with_keys: bool
) -> None:
    # ReadRule inlines open_copy's decode (one per copy read): they must not drift apart.
    sealer = Sealer([generate_key()])
    if sealed and raw[:2] != b"\xd5\x04":
        raw = sealer.seal(KEY, raw)
    opener = sealer if with_keys else None
    rule = read(cluster, Values((Item(KEY, flags, raw, 7),)), sealer=opener)
    in_read = rule.copies[0]
    assert in_read is not None
    assert open_copy(raw, flags, 7, KEY, opener) == in_read._replace(trusted=False)


def test_open_copy_of_no_item_is_what_the_read_rule_makes_of_a_miss(cluster: Cluster) -> None:
    assert open_copy(None, 0, None, KEY, None) == read(cluster, MISS).copies[0]
