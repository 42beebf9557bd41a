"""The pure half of the UDP transport, without a server: framing, reassembly, parsing,
the on/off state of UDP, and request ids."""

from __future__ import annotations

import itertools
import random
import threading

import pytest

from memsess.dsn import ServerSpec
from memsess.errors import ProtocolError
from memsess.protocol import ErrorReply, Item, Values, get
from memsess.transport import UdpPool
from memsess.transport.udp_core import (
    DEFAULT_LOSS_THRESHOLD,
    HEADER,
    MAX_DATAGRAM,
    Reassembly,
    UdpState,
    parse_reply,
    udp_after_loss,
    udp_after_reply,
    udp_claim_retry,
)

PAYLOAD = MAX_DATAGRAM - HEADER.size  # reply bytes per full datagram


def datagrams(request_id: int, reply: bytes) -> list[bytes]:
    """``reply`` cut into datagrams the way memcached sends it."""
    chunks = [reply[i : i + PAYLOAD] for i in range(0, len(reply), PAYLOAD)] or [b""]
    return [HEADER.pack(request_id, n, len(chunks), 0) + c for n, c in enumerate(chunks)]


def value_reply(key: bytes, value: bytes, cas: int = 7) -> bytes:
    return b"VALUE %b 0 %d %d\r\n%b\r\nEND\r\n" % (key, len(value), cas, value)


REPLY = value_reply(b"k", bytes(range(256)) * 20)  # 5 KB: 4 datagrams


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_datagrams_in_any_order_reassemble_the_reply(order: tuple[int, ...]) -> None:
    parts = datagrams(9, REPLY)
    frames = Reassembly(9)
    done = [frames.add(parts[n]) for n in order]
    assert done == [False, False, False, True]
    assert frames.payload() == REPLY


def test_duplicates_and_foreign_datagrams_are_discarded() -> None:
    parts = datagrams(9, REPLY)
    stale = datagrams(8, value_reply(b"k", b"an older session") * 4)
    frames = Reassembly(9)
    assert not frames.add(parts[2])
    assert not frames.add(parts[2])  # a duplicate
    for foreign in stale:
        assert not frames.add(foreign)  # another request's reply
    assert not frames.add(b"\x00\x09")  # shorter than a header
    assert not frames.add(HEADER.pack(9, 4, 4, 0) + b"x")  # sequence past the total
    assert not frames.add(HEADER.pack(9, 0, 0, 0))  # a total of none
    assert not frames.add(HEADER.pack(9, 0, 5, 0) + b"x")  # a total that changed
    assert frames.discarded == 1 + len(stale) + 4
    for part in parts[:2] + parts[3:]:
        frames.add(part)
    assert frames.complete
    assert frames.payload() == REPLY


def test_an_incomplete_reply_has_no_payload() -> None:
    frames = Reassembly(1)
    frames.add(datagrams(1, REPLY)[0])
    with pytest.raises(ValueError, match="1 of 4 datagrams"):
        frames.payload()


def test_a_reply_parses_as_it_does_over_tcp() -> None:
    reply = parse_reply(get(b"k", cas=True), REPLY)
    assert reply == Values((Item(b"k", 0, bytes(range(256)) * 20, 7),))
    assert parse_reply(get(b"k"), b"END\r\n") == Values(())
    assert parse_reply(get(b"k"), b"SERVER_ERROR out of memory\r\n") == ErrorReply(
        "SERVER_ERROR", "out of memory"
    )


def test_a_reply_cut_anywhere_is_an_error_never_a_partial_session() -> None:
    reply = value_reply(b"k", b"session \r\n data" * 8)
    for cut in range(len(reply)):
        with pytest.raises(ProtocolError):
            parse_reply(get(b"k"), reply[:cut])


def test_a_reply_missing_a_datagram_is_an_error() -> None:
    parts = [part[HEADER.size :] for part in datagrams(1, REPLY)]
    for missing in range(len(parts)):
        with pytest.raises(ProtocolError):
            parse_reply(get(b"k"), b"".join(parts[:missing] + parts[missing + 1 :]))


def test_bytes_after_the_reply_or_an_unasked_key_are_errors() -> None:
    with pytest.raises(ProtocolError):
        parse_reply(get(b"k"), REPLY + b"END\r\n")
    with pytest.raises(ProtocolError, match="not asked for"):
        parse_reply(get(b"k"), value_reply(b"other", b"someone else's session"))


def test_refused_switches_udp_off_at_once_and_a_reply_back_on() -> None:
    state = udp_after_loss(UdpState(), 10.0, reason="refused", retry_interval=15, refused=True)
    assert (state.on, state.retry_at, state.reason) == (False, 25.0, "refused")
    assert udp_after_reply(state) == UdpState()


def test_silent_losses_switch_udp_off_only_when_in_a_row() -> None:
    state = UdpState()
    for _ in range(DEFAULT_LOSS_THRESHOLD - 1):
        state = udp_after_loss(state, 1.0, reason="lost", retry_interval=15)
    assert state.on
    assert udp_after_reply(state).losses == 0
    state = udp_after_loss(state, 1.0, reason="lost", retry_interval=15)
    assert not state.on


def test_udp_off_is_retried_by_one_read_after_the_retry_interval() -> None:
    off = UdpState(on=False, losses=1, retry_at=25.0, reason="refused")
    assert udp_claim_retry(off, 24.9, retry_interval=15) is None
    claimed = udp_claim_retry(off, 25.0, retry_interval=15)
    assert claimed is not None
    assert claimed.retry_at == 40.0
    assert udp_claim_retry(claimed, 25.1, retry_interval=15) is None  # the others wait
    assert udp_claim_retry(UdpState(), 99.0, retry_interval=15) is None  # on: nothing to do


def test_request_ids_start_at_random_and_count_per_socket() -> None:
    pool = UdpPool(ServerSpec("udp", "127.0.0.1", 9))  # connect() on UDP sends nothing
    socks = [pool.acquire() for _ in range(16)]
    starts = {sock.next_id for sock in socks}
    assert len(starts) > 1
    sock = socks[0]
    sock.next_id = 65535
    assert [sock.take_id() for _ in range(3)] == [65535, 0, 1]
    for sock in socks:
        sock.close()


def test_no_two_reads_in_flight_share_a_socket_and_id_under_threads() -> None:
    pool = UdpPool(ServerSpec("udp", "127.0.0.1", 9))
    in_flight: set[tuple[int, int]] = set()
    seen: dict[int, list[int]] = {}
    lock = threading.Lock()
    clashes: list[tuple[int, int]] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(2000):
            conn = pool.acquire()
            request = (id(conn), conn.take_id())
            with lock:
                if request in in_flight:
                    clashes.append(request)
                in_flight.add(request)
                seen.setdefault(id(conn), []).append(request[1])
            if rng.random() < 0.1:
                threading.Event().wait(0.0001)  # hold it a while, as a read would
            with lock:
                in_flight.discard(request)
            pool.release(conn)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert clashes == []
    for ids in seen.values():  # each socket counts on: no id repeats on one socket
        assert len(set(ids)) == len(ids)
    pool.clear()
