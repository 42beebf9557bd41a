"""memsess.protocol: exact command bytes, replies fed whole and split at every byte,
malformed replies, EOF, and a round trip through a real memcached."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memsess import protocol
from memsess.errors import ConnectionClosedError, InvalidKeyError, ProtocolError, ServerError
from memsess.protocol import (
    MAX_LINE_LENGTH,
    MAX_STATS_LINES,
    MAX_STATS_SIZE,
    NEED_DATA,
    ClientProtocol,
    Command,
    ErrorReply,
    Item,
    MetaItem,
    Reply,
    ReplyKind,
    Stats,
    Status,
    Values,
    Version,
)

TRICKY_VALUE = b"a\r\nEND\r\nVALUE x 0 1\r\nb\r\n"
BINARY_VALUE = bytes(range(256))


def parse(commands: Iterable[Command], chunks: Iterable[bytes], **options: int) -> list[Reply]:
    """Send ``commands``, feed ``chunks`` one by one, collect every reply."""
    proto = ClientProtocol(**options)
    for command in commands:
        proto.send(command)
    replies: list[Reply] = []
    for chunk in chunks:
        proto.receive_data(chunk)
        while (reply := proto.next_reply()) is not NEED_DATA:
            replies.append(reply)
    assert proto.pending == 0
    return replies


def all_splits(data: bytes) -> Iterator[list[bytes]]:
    """Every way to cut ``data`` in two non-empty chunks (b"" would mean EOF)."""
    for offset in range(1, len(data)):
        yield [data[:offset], data[offset:]]


def test_builders_produce_exact_bytes() -> None:
    assert protocol.get(b"k") == Command(b"get k\r\n", ReplyKind.RETRIEVAL)
    assert protocol.get(b"a", b"b", cas=True).data == b"gets a b\r\n"
    assert protocol.set(b"k", b"abc") == Command(b"set k 0 0 3\r\nabc\r\n", ReplyKind.STORAGE)
    assert protocol.set(b"k", b"", flags=2**32 - 1, exptime=60).data == (
        b"set k 4294967295 60 0\r\n\r\n"
    )
    assert protocol.set(b"k", TRICKY_VALUE).data == b"set k 0 0 24\r\n" + TRICKY_VALUE + b"\r\n"
    assert protocol.add(b"k", b"v", flags=3, exptime=2**31 - 1).data == (
        b"add k 3 2147483647 1\r\nv\r\n"
    )
    assert protocol.cas(b"k", b"v", 2**64 - 1, flags=1, exptime=5).data == (
        b"cas k 1 5 1 18446744073709551615\r\nv\r\n"
    )
    assert protocol.cas(b"k", b"v", 0).kind is ReplyKind.STORAGE
    assert protocol.delete(b"k") == Command(b"delete k\r\n", ReplyKind.DELETE)
    assert protocol.touch(b"k", 1440) == Command(b"touch k 1440\r\n", ReplyKind.TOUCH)
    assert protocol.version() == Command(b"version\r\n", ReplyKind.VERSION)
    assert protocol.stats() == Command(b"stats\r\n", ReplyKind.STATS)
    assert protocol.meta_get(b"k") == Command(b"mg k k v f t c\r\n", ReplyKind.META_GET)


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (protocol.get, ValueError),
        (lambda: protocol.set(b"k", b"v", flags=-1), ValueError),
        (lambda: protocol.set(b"k", b"v", flags=2**32), ValueError),  # memcached truncates it
        (lambda: protocol.add(b"k", b"v", exptime=-1), ValueError),
        (lambda: protocol.set(b"k", b"v", exptime=2**31), ValueError),  # wraps in memcached
        (lambda: protocol.touch(b"k", -1), ValueError),
        (lambda: protocol.cas(b"k", b"v", -1), ValueError),
        (lambda: protocol.cas(b"k", b"v", 2**64), ValueError),
        (lambda: protocol.set(b"k", b"v", flags=1.5), TypeError),  # type: ignore[arg-type]
        (lambda: protocol.get("k"), TypeError),  # type: ignore[arg-type]
    ],
)
def test_builders_reject_values_memcached_would_misread(
    build: Callable[[], Command], error: type[Exception]
) -> None:
    with pytest.raises(error):
        build()


HOSTILE_KEYS = [
    b"",
    b"a b",
    b"a\r\nset x 0 0 1",
    b"\x00",
    b"k" * 251,
    b"\x7f",
    b"a\tb",
    b"a\nb",
    b"a\rb",
    b"\x1b[31m",
]
BUILDERS: list[Callable[[bytes], Command]] = [
    lambda key: protocol.get(b"ok", key),
    lambda key: protocol.set(key, b"v"),
    lambda key: protocol.add(key, b"v"),
    lambda key: protocol.cas(key, b"v", 1),
    protocol.delete,
    lambda key: protocol.touch(key, 1),
    protocol.meta_get,
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_are_refused_by_check_key_and_every_builder(key: bytes) -> None:
    with pytest.raises(InvalidKeyError):
        protocol.check_key(key)
    for build in BUILDERS:
        with pytest.raises(InvalidKeyError):
            build(key)


def test_check_key_accepts_every_other_key_up_to_250_bytes() -> None:
    for key in (b"k" * 250, "sessiön:é".encode(), b"memsess:abc-_.~!", bytes(range(0x80, 0x100))):
        assert protocol.check_key(key) is key


# (command, the server's reply, the parsed reply); every reply kind and error line.
REPLIES = [
    (protocol.get(b"k"), b"END\r\n", Values(())),
    (protocol.get(b"k"), b"VALUE k 5 3\r\nabc\r\nEND\r\n", Values((Item(b"k", 5, b"abc", None),))),
    (protocol.get(b"k"), b"VALUE k 0 0\r\n\r\nEND\r\n", Values((Item(b"k", 0, b"", None),))),
    (
        protocol.get(b"a", b"b", b"c", cas=True),
        b"VALUE a 1 24 7\r\n" + TRICKY_VALUE + b"\r\nVALUE c 4294967295 256 18446744073709551615"
        b"\r\n" + BINARY_VALUE + b"\r\nEND\r\n",
        Values((Item(b"a", 1, TRICKY_VALUE, 7), Item(b"c", 2**32 - 1, BINARY_VALUE, 2**64 - 1))),
    ),
    # An error line ends a get even after some items; the next reply still parses.
    (
        protocol.get(b"k", b"l"),
        b"VALUE k 0 1\r\nx\r\nSERVER_ERROR out of memory writing get response\r\n",
        ErrorReply("SERVER_ERROR", "out of memory writing get response"),
    ),
    (protocol.set(b"k", b"v"), b"STORED\r\n", Status.STORED),
    (protocol.add(b"k", b"v"), b"NOT_STORED\r\n", Status.NOT_STORED),
    (protocol.cas(b"k", b"v", 1), b"EXISTS\r\n", Status.EXISTS),
    (protocol.cas(b"k", b"v", 1), b"NOT_FOUND\r\n", Status.NOT_FOUND),
    (protocol.delete(b"k"), b"DELETED\r\n", Status.DELETED),
    (protocol.delete(b"k"), b"NOT_FOUND\r\n", Status.NOT_FOUND),
    (protocol.touch(b"k", 1), b"TOUCHED\r\n", Status.TOUCHED),
    (protocol.touch(b"k", 1), b"NOT_FOUND\r\n", Status.NOT_FOUND),
    (protocol.version(), b"VERSION 1.6.18\r\n", Version("1.6.18")),
    (protocol.version(), b"ERROR\r\n", ErrorReply("ERROR", "")),
    (
        protocol.set(b"k", b"v"),
        b"CLIENT_ERROR bad data chunk\r\n",
        ErrorReply("CLIENT_ERROR", "bad data chunk"),
    ),
    (
        protocol.stats(),
        b"STAT pid 25772\r\nSTAT version 1.6.18\r\nSTAT libevent 2.1.12-stable\r\n"
        b"STAT rusage_user 0.000000\r\nSTAT odd value with spaces\r\nSTAT empty \r\nEND\r\n",
        Stats(
            {
                "pid": "25772",
                "version": "1.6.18",
                "libevent": "2.1.12-stable",
                "rusage_user": "0.000000",
                "odd": "value with spaces",
                "empty": "",
            }
        ),
    ),
    (protocol.stats(), b"END\r\n", Stats({})),
    (
        protocol.stats(),
        b"STAT pid 1\r\nSERVER_ERROR out of memory\r\n",
        ErrorReply("SERVER_ERROR", "out of memory"),
    ),
    (
        protocol.meta_get(b"k"),
        b"VA 24 kk f5 t100 c7\r\n" + TRICKY_VALUE + b"\r\n",
        MetaItem(b"k", 5, TRICKY_VALUE, 100, 7),
    ),
    (  # flags in any order, ones not asked for (O, s, W) let through, -1: never expires
        protocol.meta_get(b"k"),
        b"VA 0 t-1 W c18446744073709551615 O123 s0 f4294967295 kk\r\n\r\n",
        MetaItem(b"k", 2**32 - 1, b"", -1, 2**64 - 1),
    ),
    (protocol.meta_get(b"k"), b"EN\r\n", Status.NOT_FOUND),
    (protocol.meta_get(b"k"), b"EN kk\r\n", Status.NOT_FOUND),  # memcached 1.6.18 adds k
    (protocol.meta_get(b"k"), b"ERROR\r\n", ErrorReply("ERROR", "")),  # memcached < 1.6
    (
        protocol.set(b"k", b"v"),
        b"SERVER_ERROR object too large for cache\r\n",
        ErrorReply("SERVER_ERROR", "object too large for cache"),
    ),
]


@pytest.mark.parametrize(("command", "data", "expected"), REPLIES)
def test_reply_parses_the_same_fed_whole_split_anywhere_or_byte_by_byte(
    command: Command, data: bytes, expected: Reply
) -> None:
    assert parse([command], [data]) == [expected]
    for head, tail in all_splits(data):
        proto = ClientProtocol()
        proto.send(command)
        proto.receive_data(head)
        assert proto.next_reply() is NEED_DATA
        proto.receive_data(tail)
        assert [proto.next_reply(), proto.next_reply()] == [expected, NEED_DATA]
    assert parse([command], [data[i : i + 1] for i in range(len(data))]) == [expected]


def test_pipelined_replies_come_out_in_order_however_they_are_split() -> None:
    commands = [command for command, _, _ in REPLIES]
    data = b"".join(wire for _, wire, _ in REPLIES)
    expected = [reply for _, _, reply in REPLIES]
    assert parse(commands, [data]) == expected
    for chunks in all_splits(data):
        assert parse(commands, chunks) == expected
    assert parse(commands, [data[i : i + 7] for i in range(0, len(data), 7)]) == expected


def test_error_reply_becomes_server_error() -> None:
    error = ErrorReply("SERVER_ERROR", "out of memory").to_exception()
    assert isinstance(error, ServerError)
    assert (error.kind, error.message, str(error)) == (
        "SERVER_ERROR",
        "out of memory",
        "SERVER_ERROR out of memory",
    )


def test_server_error_names_its_server_when_known() -> None:
    error = ErrorReply("SERVER_ERROR", "object too large for cache").to_exception(
        server="10.0.0.1:11211"
    )
    assert str(error) == "memcached 10.0.0.1:11211: SERVER_ERROR object too large for cache"
    assert (error.kind, error.message, error.server) == (
        "SERVER_ERROR",
        "object too large for cache",
        "10.0.0.1:11211",
    )


def test_gat_touches_and_reads_like_a_get() -> None:
    command = protocol.gat(b"k", 1440)
    assert command == Command(b"gat 1440 k\r\n", ReplyKind.RETRIEVAL)
    wire = b"VALUE k 7 3\r\nabc\r\nEND\r\n"
    expected = [Values((Item(b"k", 7, b"abc", None),))]
    for chunks in [[wire], *all_splits(wire)]:
        # The exptime is not a key: an item under "1440" was never asked for.
        assert parse([command], chunks) == expected
    assert parse([command], [b"END\r\n"]) == [Values(())]
    with pytest.raises(ProtocolError, match="not asked for"):
        parse([command], [b"VALUE 1440 0 1\r\nx\r\nEND\r\n"])
    with pytest.raises(InvalidKeyError):
        protocol.gat(b"a b", 60)
    with pytest.raises(ValueError, match="exptime"):
        protocol.gat(b"k", -1)


def test_large_value_in_many_chunks() -> None:
    value = os.urandom(1 << 20)
    data = b"VALUE big 0 %d 1\r\n%b\r\nEND\r\n" % (len(value), value)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    assert parse([protocol.get(b"big")], chunks) == [Values((Item(b"big", 0, value, 1),))]


MALFORMED = [
    (protocol.get(b"k"), b"STORED\r\n"),
    (protocol.get(b"k"), b"VALUE k 0 3\r\nabcd\r\nEND\r\n"),  # block longer than announced
    (protocol.get(b"k"), b"VALUE k 0 3\r\nab\r\nEND\r\n"),  # shorter
    (protocol.get(b"k"), b"VALUE k 0 1\r\naXYEND\r\n"),  # no \r\n right after the block
    (protocol.get(b"k"), b"VALUE k 0\r\n"),
    (protocol.get(b"k"), b"VALUE k 0 1 2 3\r\n"),
    (protocol.get(b"k"), b"VALUE  k 0 1\r\n"),
    (protocol.get(b"k"), b"VALUE k x 1\r\n"),
    (protocol.get(b"k"), b"VALUE k 0 -1\r\n"),
    (protocol.get(b"k"), b"VALUE k 0 +1\r\n"),
    (protocol.get(b"k"), b"VALUE k 0 1_0\r\n"),
    (protocol.get(b"k"), b"VALUE k 4294967296 1\r\n"),
    (protocol.get(b"k"), b"VALUE k 0 1 18446744073709551616\r\n"),
    (protocol.get(b"k"), b"VALUE k 0 1 -5\r\n"),
    (protocol.get(b"k"), b"VALUE k 0 11\r\n"),  # over max_value_size (10), data never sent
    (protocol.get(b"k"), b"END \r\n"),
    (protocol.get(b"k"), b"x" * 9000),  # no line end within MAX_LINE_LENGTH
    (protocol.set(b"k", b"v"), b"DELETED\r\n"),
    (protocol.set(b"k", b"v"), b"stored\r\n"),
    (protocol.set(b"k", b"v"), b"STORED \r\n"),
    (protocol.delete(b"k"), b"STORED\r\n"),
    (protocol.touch(b"k", 1), b"DELETED\r\n"),
    (protocol.version(), b"VERSION\r\n"),
    (protocol.version(), b"STORED\r\n"),
    (protocol.version(), b"\r\n"),
    (protocol.version(), b"y" * 9000 + b"\r\n"),
    (protocol.get(b"k"), b"VALUE other 0 1\r\nx\r\nEND\r\n"),  # see UNASKED
    (protocol.stats(), b"STAT\r\n"),
    (protocol.stats(), b"STAT \r\n"),  # no name
    (protocol.stats(), b"STAT  1\r\n"),
    (protocol.stats(), b"STAT pid\r\n"),  # no value
    (protocol.stats(), b"STATS pid 1\r\nEND\r\n"),
    (protocol.stats(), b"STAT pid 1\r\nEND \r\n"),
    (protocol.stats(), b"STAT pid 1\r\nVALUE k 0 1\r\nx\r\nEND\r\n"),
    (protocol.stats(), b"STAT pid " + b"1" * 9000 + b"\r\n"),
    (protocol.meta_get(b"k"), b"HD kk f0 t1 c1\r\n"),  # v was asked: VA or EN
    (protocol.meta_get(b"k"), b"VALUE k 0 1\r\nx\r\nEND\r\n"),
    (protocol.meta_get(b"k"), b"VA\r\n"),
    (protocol.meta_get(b"k"), b"VA x kk f0 t1 c1\r\n"),
    (protocol.meta_get(b"k"), b"VA -1 kk f0 t1 c1\r\n"),
    (protocol.meta_get(b"k"), b"VA 11 kk f0 t1 c1\r\n"),  # over max_value_size (10)
    (protocol.meta_get(b"k"), b"VA 1 f0 t1 c1\r\nx\r\n"),  # k asked for, not sent
    (protocol.meta_get(b"k"), b"VA 1 kk t1 c1\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk f0 c1\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk f0 t1\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk  f0 t1 c1\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk f0 t1 c1 \r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk f-1 t1 c1\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk f4294967296 t1 c1\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk f0 t-2 c1\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk f0 t+1 c1\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk f0 t c1\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk f0 t1 c18446744073709551616\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"VA 1 kk f0 t1 c1\r\nxYZ"),  # no \r\n right after the block
    (protocol.meta_get(b"k"), b"VA 1 kother f0 t1 c1\r\nx\r\n"),  # a late reply
    (protocol.meta_get(b"k"), b"VA 1 kkk f0 t1 c1\r\nx\r\n"),
    (protocol.meta_get(b"k"), b"EN kother\r\n"),
    (protocol.meta_get(b"k"), b"z" * 9000),
]


@pytest.mark.parametrize(("command", "data"), MALFORMED)
def test_malformed_reply_raises_and_the_protocol_stays_dead(command: Command, data: bytes) -> None:
    proto = ClientProtocol(max_value_size=10)
    proto.send(command)
    proto.receive_data(data)
    with pytest.raises(ProtocolError) as raised:
        proto.next_reply()
    assert not isinstance(raised.value, ServerError)
    proto_calls: list[Callable[[], object]] = [
        proto.next_reply,
        lambda: proto.receive_data(b"END\r\n"),
        proto.next_reply,
        lambda: proto.send(protocol.version()),
    ]
    for call in proto_calls:
        with pytest.raises(ProtocolError, match="unusable"):
            call()


# Items under keys the command did not ask for: a late reply to another command, or a
# server answering for someone else. Read as this command's answer, the item would be
# taken for the session asked for.
UNASKED = [
    (protocol.get(b"k"), b"VALUE other 0 1\r\nx\r\nEND\r\n"),
    (protocol.get(b"k"), b"VALUE k 0 1\r\nx\r\nVALUE kk 0 1\r\ny\r\nEND\r\n"),
    (protocol.get(b"kk"), b"VALUE k 0 1\r\nx\r\nEND\r\n"),  # a prefix of the key asked
    (
        protocol.get(b"k1", b"k2", cas=True),
        b"VALUE k2 0 1 5\r\nx\r\nVALUE k3 0 1 6\r\ny\r\nEND\r\n",
    ),
    (protocol.get(b"k"), b"VALUE get 0 1\r\nx\r\nEND\r\n"),  # the command's name is no key
    (protocol.get(b"k", cas=True), b"VALUE gets 0 1 1\r\nx\r\nEND\r\n"),
]


@pytest.mark.parametrize(("command", "data"), UNASKED)
def test_an_item_under_a_key_not_asked_for_is_refused_however_split(
    command: Command, data: bytes
) -> None:
    bytewise = [data[i : i + 1] for i in range(len(data))]
    for chunks in [[data], *all_splits(data), bytewise]:
        with pytest.raises(ProtocolError, match="not asked for"):
            parse([command], chunks)


def test_items_of_a_multi_get_may_come_in_any_order_and_repeat_a_key() -> None:
    sent = ((b"k3", b"c", 3), (b"k1", b"a", 1), (b"k3", b"c", 3))  # key, value, cas
    items = tuple(Item(key, 0, value, cas) for key, value, cas in sent)
    data = b"".join(b"VALUE %b 0 1 %d\r\n%b\r\n" % (key, cas, value) for key, value, cas in sent)
    command = protocol.get(b"k1", b"k2", b"k3", cas=True)
    assert parse([command], [data + b"END\r\n"]) == [Values(items)]


def test_reply_with_no_command_pending_is_a_protocol_error() -> None:
    proto = ClientProtocol()
    assert proto.next_reply() is NEED_DATA
    proto.send(protocol.set(b"k", b"v"))
    # A late second reply (say, to a command of a connection given up on) must never be
    # taken as the answer to the next command.
    proto.receive_data(b"STORED\r\nSTORED\r\n")
    assert proto.next_reply() is Status.STORED
    with pytest.raises(ProtocolError, match="no command pending"):
        proto.next_reply()
    with pytest.raises(ProtocolError):
        proto.send(protocol.set(b"k", b"v"))


@pytest.mark.parametrize(("command", "data", "expected"), REPLIES)
def test_eof_before_the_reply_is_complete_raises_connection_closed(
    command: Command, data: bytes, expected: Reply
) -> None:
    for offset in range(len(data)):
        proto = ClientProtocol()
        proto.send(command)
        proto.receive_data(data[:offset])
        proto.receive_data(b"")
        for _ in range(2):
            with pytest.raises(ConnectionClosedError):
                proto.next_reply()
    # A reply completed before the close is still delivered.
    proto = ClientProtocol()
    proto.send(command)
    proto.receive_data(data)
    proto.receive_data(b"")
    assert proto.next_reply() == expected
    assert proto.next_reply() is NEED_DATA
    with pytest.raises(ConnectionClosedError):
        proto.send(command)


def test_pending_counts_commands_whose_reply_is_not_returned() -> None:
    proto = ClientProtocol()
    assert proto.send(protocol.get(b"k")) == b"get k\r\n"
    proto.send(protocol.delete(b"k"))
    assert proto.pending == 2
    proto.receive_data(b"VALUE k 0 1\r\nx")
    assert (proto.next_reply(), proto.pending) == (NEED_DATA, 2)
    proto.receive_data(b"\r\nEND\r\nDELE")
    assert (proto.next_reply(), proto.pending) == (Values((Item(b"k", 0, b"x", None),)), 1)
    assert (proto.next_reply(), proto.pending) == (NEED_DATA, 1)
    proto.receive_data(b"TED\r\n")
    assert (proto.next_reply(), proto.pending) == (Status.DELETED, 0)
    assert repr(NEED_DATA) == "NEED_DATA"


KEY_BYTES = [byte for byte in range(0x21, 0x100) if byte != 0x7F]
ITEMS = st.lists(
    st.builds(
        Item,
        key=st.lists(st.sampled_from(KEY_BYTES), min_size=1, max_size=250).map(bytes),
        flags=st.integers(0, 2**32 - 1),
        value=st.binary(max_size=3000) | st.sampled_from([TRICKY_VALUE, b"END\r\n", b"\r\n"]),
        cas=st.none() | st.integers(0, 2**64 - 1),
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(items=ITEMS, cuts=st.lists(st.integers(0, 20000), max_size=8))
def test_random_get_replies_survive_random_splits(items: list[Item], cuts: list[int]) -> None:
    data = b"".join(
        b"VALUE %b %d %d%b\r\n%b\r\n"
        % (i.key, i.flags, len(i.value), b"" if i.cas is None else b" %d" % i.cas, i.value)
        for i in items
    )
    data += b"END\r\nSTORED\r\n"
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    keys = [item.key for item in items] or [b"k"]
    commands = [protocol.get(*keys, cas=True), protocol.set(b"k", b"v")]
    assert parse(commands, chunks) == [Values(tuple(items)), Status.STORED]


# --- against a real memcached ---------------------------------------------------------

MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"


@pytest.fixture(scope="module")
def memcached_address() -> Iterator[tuple[str, int]]:
    if not os.access(MEMCACHED, os.X_OK):
        pytest.fail(
            "memcached is not installed: apt-get install memcached (scripts/ensure-memcached)"
        )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [MEMCACHED, "-p", str(port), "-l", "127.0.0.1", "-U", "0"]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]  # memcached refuses to run as root otherwise
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield ("127.0.0.1", port)
    finally:
        server.kill()
        server.wait(timeout=5)


def round_trip(address: tuple[str, int], *commands: Command) -> list[Reply]:
    """Pipeline ``commands`` on a fresh blocking socket and read every reply."""
    proto = ClientProtocol()
    replies: list[Reply] = []
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"".join(proto.send(command) for command in commands))
        while proto.pending:
            reply = proto.next_reply()
            if reply is NEED_DATA:
                proto.receive_data(sock.recv(65536))
            else:
                replies.append(reply)
    return replies


def test_real_memcached_replies_parse(memcached_address: tuple[str, int]) -> None:
    key = b"memsess-test:" + uuid.uuid4().hex.encode()
    other = key + b":other"
    value = BINARY_VALUE + TRICKY_VALUE
    stored, hit, missing = round_trip(
        memcached_address,
        protocol.set(key, value, flags=7, exptime=60),
        protocol.get(key),
        protocol.get(other),
    )
    assert (stored, hit, missing) == (
        Status.STORED,
        Values((Item(key, 7, value, None),)),
        Values(()),
    )
    (gets,) = round_trip(memcached_address, protocol.get(other, key, cas=True))
    assert isinstance(gets, Values)
    (item,) = gets.items
    assert item.cas is not None
    assert (item.key, item.flags, item.value) == (key, 7, value)
    replies = round_trip(
        memcached_address,
        protocol.cas(key, b"new", item.cas),
        protocol.cas(key, b"stale", item.cas),
        protocol.cas(other, b"v", item.cas),
        protocol.add(key, b"v"),
        protocol.add(other, b"v", exptime=60),
        protocol.touch(key, 120),
        protocol.delete(key),
        protocol.delete(key),
        protocol.touch(key, 120),
        protocol.get(key, other),
        protocol.set(key, b"x" * (1024 * 1024 + 1)),  # over memcached's default 1 MB item
        protocol.version(),
    )
    too_large, version = replies[-2:]
    assert replies[:-2] == [
        *(Status.STORED, Status.EXISTS, Status.NOT_FOUND, Status.NOT_STORED, Status.STORED),
        *(Status.TOUCHED, Status.DELETED, Status.NOT_FOUND, Status.NOT_FOUND),
        Values((Item(other, 0, b"v", None),)),
    ]
    assert too_large == ErrorReply("SERVER_ERROR", "object too large for cache")
    assert isinstance(version, Version)
    assert version.version.startswith("1.")


# --- stats: bounded however the server streams it ------------------------------------


def stat_lines(count: int, *, width: int = 1) -> bytes:
    return b"".join(b"STAT n%d %b\r\n" % (i, b"v" * width) for i in range(count))


def test_stats_of_exactly_the_line_limit_parse_and_one_more_line_is_refused() -> None:
    (reply,) = parse([protocol.stats()], [stat_lines(MAX_STATS_LINES) + b"END\r\n"])
    assert isinstance(reply, Stats)
    assert len(reply.entries) == MAX_STATS_LINES
    with pytest.raises(ProtocolError, match=f"more than {MAX_STATS_LINES} STAT lines"):
        parse([protocol.stats()], [stat_lines(MAX_STATS_LINES + 1)])


def test_a_stat_name_sent_again_and_again_counts_against_the_line_limit() -> None:
    with pytest.raises(ProtocolError, match="STAT lines"):
        parse([protocol.stats()], [b"STAT pid 1\r\n" * (MAX_STATS_LINES + 1)])


def test_stats_over_the_size_limit_are_refused_before_the_line_limit() -> None:
    width = 8000  # a line just under MAX_LINE_LENGTH: the size limit comes first
    lines = MAX_STATS_SIZE // width + 1
    assert lines < MAX_STATS_LINES
    assert width < MAX_LINE_LENGTH
    with pytest.raises(ProtocolError, match=f"more than {MAX_STATS_SIZE} bytes"):
        parse([protocol.stats()], [stat_lines(lines, width=width)])


def test_endless_stat_lines_stop_within_the_limit_and_hold_bounded_memory() -> None:
    # A server streaming STAT lines forever, read 64 KiB at a time as the transport does.
    chunk = stat_lines(2000, width=20)[: 64 * 1024]
    proto = ClientProtocol()
    proto.send(protocol.stats())
    fed = 0

    def feed_forever() -> None:
        nonlocal fed
        while fed < 100 * MAX_STATS_SIZE:
            proto.receive_data(chunk)
            fed += len(chunk)
            assert proto.next_reply() is NEED_DATA

    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="stats reply of more than"):
            feed_forever()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fed <= MAX_STATS_SIZE + len(chunk)
    assert peak < 4 * MAX_STATS_SIZE  # the entries of at most MAX_STATS_LINES lines


def test_stats_number_reads_whole_counters_only() -> None:
    stats = Stats({"curr_items": "3", "rusage_user": "0.5", "odd": "\u00b2", "neg": "-1"})
    assert stats.number("curr_items") == 3
    assert [stats.number(name) for name in ("rusage_user", "odd", "neg", "absent")] == [None] * 4


def test_a_meta_value_arriving_in_many_chunks() -> None:
    value = os.urandom(1 << 20)
    data = b"VA %d kbig f3 t-1 c9\r\n%b\r\n" % (len(value), value)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    assert parse([protocol.meta_get(b"big")], chunks) == [MetaItem(b"big", 3, value, -1, 9)]


def test_real_memcached_stats_and_meta_get(memcached_address: tuple[str, int]) -> None:
    key = b"memsess-test:" + uuid.uuid4().hex.encode()
    value = BINARY_VALUE + TRICKY_VALUE
    stored, hit, missing, stats = round_trip(
        memcached_address,
        protocol.set(key, value, flags=7, exptime=60),
        protocol.meta_get(key),
        protocol.meta_get(key + b":other"),
        protocol.stats(),
    )
    (gets,) = round_trip(memcached_address, protocol.get(key, cas=True))
    assert stored is Status.STORED
    assert missing is Status.NOT_FOUND
    assert isinstance(hit, MetaItem)
    assert isinstance(gets, Values)
    assert (hit.key, hit.flags, hit.value, hit.cas) == (key, 7, value, gets.items[0].cas)
    assert 59 <= hit.ttl <= 60
    round_trip(memcached_address, protocol.set(key, b"v"))
    (forever,) = round_trip(memcached_address, protocol.meta_get(key))
    assert isinstance(forever, MetaItem)
    assert forever.ttl == -1
    assert isinstance(stats, Stats)
    assert stats.entries["version"].startswith("1.6")
    assert stats.number("curr_items") is not None
    assert stats.number("limit_maxbytes")
