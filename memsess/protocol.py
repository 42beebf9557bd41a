"""memcached's text protocol (doc/protocol.txt), sans-I/O: commands become bytes and
received bytes become replies. No sockets here (the h11 model): every transport reuses it.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Final, NamedTuple, NoReturn, TypeAlias

from memsess._chaining import caused_by
from memsess.errors import ConnectionClosedError, InvalidKeyError, ProtocolError, ServerError

# fmt: off
__all__ = [
    "DEFAULT_MAX_VALUE_SIZE", "MAX_KEY_LENGTH", "MAX_LINE_LENGTH", "MAX_STATS_LINES",
    "MAX_STATS_SIZE", "NEED_DATA",
    "ClientProtocol", "Command", "ErrorReply", "Item", "MetaItem", "NeedData", "Reply",
    "ReplyKind", "Stats", "Status", "Values", "Version",
    "add", "cas", "check_key", "delete", "gat", "get", "meta_get", "set", "stats", "touch",
    "version",
]
# fmt: on

#: protocol.txt, "Keys": "the length limit of a key is set at 250 characters".
MAX_KEY_LENGTH: Final = 250
#: The longest reply line read. The longest valid one, a VALUE line, is ~320 bytes; 8 KiB
#: (h11's header limit is 16 KiB) leaves room for error messages while a peer that never
#: sends \r\n cannot grow the buffer without bound.
MAX_LINE_LENGTH: Final = 8192
#: The most STAT lines one ``stats`` reply may carry. memcached 1.6 sends ~90 for plain
#: ``stats`` (``stats settings`` ~70, ``stats slabs`` ~15 per slab class, 64 classes at
#: most); past this a server streaming STAT lines forever is cut off, not buffered.
MAX_STATS_LINES: Final = 4096
#: The most bytes one ``stats`` reply may carry (its lines, \r\n included): 4096 lines
#: of up to MAX_LINE_LENGTH each would still be 32 MiB.
MAX_STATS_SIZE: Final = 1 << 20

# protocol.txt: "the key must not include control characters or whitespace". memcached
# itself takes control bytes other than space and \n, so this is the only guard against a
# key that smuggles in a second command.
_FORBIDDEN_KEY_BYTES: Final = bytes(range(0x21)) + b"\x7f"
_MAX_FLAGS: Final = 2**32 - 1  # 32 bits since memcached 1.2.1; 1.6 silently truncates more
_MAX_CAS: Final = 2**64 - 1  # "<cas unique> is a unique 64-bit value"
# memcached 1.6.18 keeps times in 32 bits: exptime 2**31 already expires at once, and from
# 2**63 on it answers CLIENT_ERROR, then reads the data block as a command.
_MAX_EXPTIME: Final = 2**31 - 1
# <bytes> is read as an int32; over INT_MAX - 2 the data block is not swallowed either.
_MAX_DATA_LENGTH: Final = 2**31 - 3
#: The longest value a reply may carry unless the parser is told less: a session store
#: tells it its servers' item size (max_item_size), so a server (or anything answering
#: in its place) cannot make it buffer more than a stored session can be.
DEFAULT_MAX_VALUE_SIZE: Final = 64 * 1024 * 1024
# Above this size one copy through a memoryview beats slicing the bytearray and copying
# the slice (1 MiB: ~35 us against ~600 us here); below it the slice is cheaper.
_MEMORYVIEW_COPY_SIZE: Final = 4096


class ReplyKind(enum.Enum):
    """The shape of reply a command expects."""

    RETRIEVAL = "RETRIEVAL"
    STORAGE = "STORAGE"
    DELETE = "DELETE"
    TOUCH = "TOUCH"
    VERSION = "VERSION"
    STATS = "STATS"
    META_GET = "META_GET"

    # Members are singletons compared by identity; hashing them by identity in C keeps
    # the per-reply table lookup off Enum's Python-level __hash__ (~0.1 us).
    __hash__ = object.__hash__


# Command, Item and Values are NamedTuples: one or more of each is made per request, and
# a frozen dataclass sets every field through object.__setattr__ (two to three times the
# cost, measured in bench/hotpaths.py). Where one is made per reply, it is made with
# tuple.__new__ (_new_tuple): a NamedTuple's own __new__ is a Python function, a frame
# of its own (about 0.13 us more, in both builds).


class Command(NamedTuple):
    """A command ready to write: its exact bytes and the kind of reply it expects."""

    data: bytes
    kind: ReplyKind


_RETRIEVAL: Final = ReplyKind.RETRIEVAL
_STATS: Final = ReplyKind.STATS
_VERSION_COMMAND: Final = Command(b"version\r\n", ReplyKind.VERSION)
_STATS_COMMAND: Final = Command(b"stats\r\n", _STATS)
# The meta get's flags (protocol.txt, "Meta Get"): k the key, v the value, f the client
# flags, t the seconds left (-1: never expires), c the cas unique; all in one reply.
_META_GET_FLAGS: Final = b" k v f t c\r\n"
_GAT_WORDS: Final = frozenset({b"gat", b"gats"})  # their first argument is an exptime


def check_key(key: bytes) -> bytes:
    """Return ``key`` if memcached takes it as one key, else raise InvalidKeyError.

    A key is 1 to 250 bytes with no whitespace, control bytes (0x00-0x20) or DEL (0x7f).
    """
    if not isinstance(key, bytes):
        raise TypeError(f"memcached keys are bytes, not {type(key).__name__}")
    allowed = len(key.translate(None, _FORBIDDEN_KEY_BYTES))
    if allowed == len(key) and 0 < allowed <= MAX_KEY_LENGTH:
        return key
    # Name the first bad byte, not the key: a hostile key would carry its payload into logs.
    bad = [byte for byte in key if byte in _FORBIDDEN_KEY_BYTES][:1]
    reason = f"byte 0x{bad[0]:02x} is not allowed" if bad else "it must be 1-250 bytes long"
    raise InvalidKeyError(f"invalid memcached key of {len(key)} bytes: {reason}")


def _check_number(name: str, value: int, maximum: int) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} must be between 0 and {maximum}, got {value}")
    return value


def get(*keys: bytes, cas: bool = False) -> Command:
    """``get k1 k2 ...``, or ``gets`` with ``cas=True`` to read cas uniques. Replies Values."""
    if not keys:
        raise ValueError("get needs at least one key")
    for key in keys:
        check_key(key)
    return Command(b"%b %b\r\n" % (b"gets" if cas else b"get", b" ".join(keys)), _RETRIEVAL)


def _storage(
    name: bytes, key: bytes, value: bytes, flags: int, exptime: int, *, suffix: bytes = b""
) -> Command:
    check_key(key)
    _check_number("flags", flags, _MAX_FLAGS)
    _check_number("exptime", exptime, _MAX_EXPTIME)
    if len(value) > _MAX_DATA_LENGTH:
        raise ValueError(f"a value must be at most {_MAX_DATA_LENGTH} bytes long")
    # Never "noreply": the reply is how a write is known to have landed, and protocol.txt
    # warns that a server may still answer a noreply request, putting the stream out of step.
    data = b"%b %b %d %d %d%b\r\n%b\r\n" % (name, key, flags, exptime, len(value), suffix, value)
    return Command(data, ReplyKind.STORAGE)


def set(key: bytes, value: bytes, *, flags: int = 0, exptime: int = 0) -> Command:
    """``set``: store ``value``. ``exptime`` in seconds: 0 never expires, over 30 days it
    is a Unix time (protocol.txt, "Expiration times"). Replies STORED."""
    return _storage(b"set", key, value, flags, exptime)


def add(key: bytes, value: bytes, *, flags: int = 0, exptime: int = 0) -> Command:
    """``add``: store only if the server holds no item for ``key``. STORED or NOT_STORED."""
    return _storage(b"add", key, value, flags, exptime)


def cas(key: bytes, value: bytes, cas_unique: int, *, flags: int = 0, exptime: int = 0) -> Command:
    """``cas``: store only if the item is unchanged since ``gets`` read ``cas_unique``.
    Replies STORED, EXISTS (changed since) or NOT_FOUND (gone)."""
    suffix = b" %d" % _check_number("cas_unique", cas_unique, _MAX_CAS)
    return _storage(b"cas", key, value, flags, exptime, suffix=suffix)


def delete(key: bytes) -> Command:
    """``delete``: replies DELETED or NOT_FOUND."""
    return Command(b"delete %b\r\n" % check_key(key), ReplyKind.DELETE)


def touch(key: bytes, exptime: int) -> Command:
    """``touch``: a new ``exptime`` (seconds, as for set). Replies TOUCHED or NOT_FOUND."""
    check_key(key)
    exptime = _check_number("exptime", exptime, _MAX_EXPTIME)
    return Command(b"touch %b %d\r\n" % (key, exptime), ReplyKind.TOUCH)


def gat(key: bytes, exptime: int) -> Command:
    """``gat`` (get and touch, memcached >= 1.5.3): a new ``exptime`` (seconds, as for
    set) for the item, which comes back with it. Replies Values, as a get (empty: absent);
    the item is the value as stored, whose record says whether it is a logout."""
    check_key(key)
    exptime = _check_number("exptime", exptime, _MAX_EXPTIME)
    return Command(b"gat %d %b\r\n" % (exptime, key), _RETRIEVAL)


def version() -> Command:
    """``version``: replies a Version; a cheap liveness probe."""
    return _VERSION_COMMAND


def stats() -> Command:
    """``stats``: replies Stats, the server's general-purpose counters (at most
    MAX_STATS_LINES lines and MAX_STATS_SIZE bytes, else a ProtocolError)."""
    return _STATS_COMMAND


def meta_get(key: bytes) -> Command:
    """``mg <key> k v f t c`` (memcached >= 1.6): value, flags, seconds left and cas unique
    of one item in one reply, so they describe the same write. Replies a MetaItem, or
    Status.NOT_FOUND; a server without meta commands answers ErrorReply("ERROR")."""
    return Command(b"mg " + check_key(key) + _META_GET_FLAGS, ReplyKind.META_GET)


class NeedData(enum.Enum):
    """The type of NEED_DATA: an enum of one member, so ``reply is NEED_DATA`` narrows types."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __str__(self) -> str:  # not ``__str__ = __repr__``: mypyc compiles no class-body alias
        return "NEED_DATA"


#: What ClientProtocol.next_reply returns while the next reply is incomplete.
NEED_DATA: Final = NeedData.NEED_DATA


class Item(NamedTuple):
    """One item of a get reply; ``cas`` is its cas unique (None unless read by ``gets``)."""

    key: bytes
    flags: int
    value: bytes
    cas: int | None


class Values(NamedTuple):
    """The reply to a get: the items found, in the server's order (empty: all missed)."""

    items: tuple[Item, ...]


_new_tuple: Final = tuple.__new__


class Status(enum.Enum):
    """The one-word reply to a storage, delete or touch command."""

    STORED = "STORED"
    NOT_STORED = "NOT_STORED"
    EXISTS = "EXISTS"
    NOT_FOUND = "NOT_FOUND"
    DELETED = "DELETED"
    TOUCHED = "TOUCHED"


@dataclass(frozen=True, slots=True)
class Version:
    """The reply to ``version``: the server's version string, e.g. ``"1.6.18"``."""

    version: str


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """ERROR, CLIENT_ERROR or SERVER_ERROR: the whole reply to one command.

    The parser reads it as the whole reply, but the stream is in step after it only for
    a SERVER_ERROR (the server read the command and its data, then failed to do it;
    after a severe one it closes the connection itself). After ERROR or CLIENT_ERROR
    the server may have skipped part of our bytes or may still read some as a command
    (protocol.txt, "Error strings"), so the transport closes the connection
    (memsess.transport.exchange: ``keep``).
    """

    kind: str
    message: str

    def to_exception(self, *, server: str | None = None) -> ServerError:
        """The ServerError for this reply, naming ``server`` (its address) if given."""
        return ServerError(self.kind, self.message, server=server)


@dataclass(frozen=True, slots=True)
class Stats:
    """The reply to ``stats``: each ``STAT <name> <value>`` line, in the server's order,
    both as text (``{"curr_items": "3", "version": "1.6.18", ...}``)."""

    entries: dict[str, str]

    def number(self, name: str) -> int | None:
        """The counter ``name`` as an int; None when absent or not a whole number."""
        value = self.entries.get(name, "")
        return int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else None


class MetaItem(NamedTuple):
    """The reply to meta_get for an item that exists: its value, client flags, seconds
    left (``ttl``; -1 never expires) and cas unique, all as of the same moment."""

    key: bytes
    flags: int
    value: bytes
    ttl: int
    cas: int


Reply: TypeAlias = Values | Status | Version | ErrorReply | Stats | MetaItem


def _words(*statuses: Status) -> dict[bytes, Status]:
    return {status.value.encode(): status for status in statuses}


# The replies protocol.txt lists for each command. Any other word means the stream is out
# of step (a late reply to an earlier command, say), so it is a ProtocolError.
_STATUS_REPLIES: Final = {
    ReplyKind.STORAGE: _words(Status.STORED, Status.NOT_STORED, Status.EXISTS, Status.NOT_FOUND),
    ReplyKind.DELETE: _words(Status.DELETED, Status.NOT_FOUND),
    ReplyKind.TOUCH: _words(Status.TOUCHED, Status.NOT_FOUND),
    ReplyKind.VERSION: _words(),
}
_ERROR_KINDS: Final = {kind.encode(): kind for kind in ("ERROR", "CLIENT_ERROR", "SERVER_ERROR")}


class ClientProtocol:
    """State of one connection (or one UDP request): commands sent, bytes received.

    ``send(command)`` queues the reply it expects and returns the bytes to write;
    ``receive_data(data)`` feeds what was read (``b""`` at EOF); ``next_reply()`` gives
    one complete reply per command sent, oldest first (pipelining), or NEED_DATA.

    After a ProtocolError every call raises again: the transport must close the connection,
    so that a late reply is never read as the answer to a later command.
    """

    __slots__ = (
        "_asked",
        "_buffer",
        "_eof",
        "_error",
        "_expected",
        "_items",
        "_max_value_size",
        "_stats",
    )

    def __init__(self, *, max_value_size: int = DEFAULT_MAX_VALUE_SIZE) -> None:
        """``max_value_size``: the longest value, in bytes, a get or meta get reply may carry
        (default 64 MiB); a longer one is a ProtocolError before its data is buffered."""
        self._max_value_size = _check_number("max_value_size", max_value_size, 2**63)
        self._buffer = bytearray()
        self._eof = False
        self._error: ProtocolError | None = None
        self._expected: deque[Command] = deque()
        self._items: list[Item] = []  # of the get being read, so none is parsed twice
        self._asked: list[bytes] | None = None  # keys of the get being read, once an item came
        self._stats: _StatsReading | None = None  # of the stats reply being read

    @property
    def pending(self) -> int:
        """Commands sent whose reply next_reply has not returned yet."""
        return len(self._expected)

    @property
    def max_value_size(self) -> int:
        """The longest value in bytes a reply may carry (see __init__)."""
        return self._max_value_size

    def send(self, command: Command) -> bytes:
        """Queue the reply ``command`` expects and return the bytes to write."""
        if self._error is not None:
            self._raise_dead()
        if self._eof:
            raise ConnectionClosedError("cannot send: the server closed the connection")
        self._expected.append(command)
        return command.data

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the server; ``b""`` means it closed the connection."""
        if self._error is not None:
            self._raise_dead()
        if data:
            if self._eof:
                raise RuntimeError("receive_data() got data after EOF")
            self._buffer += data
        else:
            self._eof = True

    def next_reply(self) -> Reply | NeedData:
        """The complete reply to the oldest pending command, or NEED_DATA.

        Raises ProtocolError for bytes that break the protocol, such as an item under a key
        the get did not ask for (the object is then dead),
        ConnectionClosedError if the server closed the connection before the reply.
        """
        if self._error is not None:
            self._raise_dead()
        expected = self._expected
        try:
            if not expected:
                if self._buffer:
                    raise ProtocolError(f"{len(self._buffer)} bytes came with no command pending")
                return NEED_DATA
            command = expected[0]
            kind = command.kind
            reply = (
                self._read_values(command) if kind is _RETRIEVAL else self._read_line_reply(kind)
            )
        except ProtocolError as exc:
            self._error = exc
            raise
        if reply is NEED_DATA:
            if self._eof:
                raise ConnectionClosedError(
                    f"the server closed the connection before the reply to a "
                    f"{kind.name.lower()} command ({len(expected)} commands unanswered)"
                )
            return NEED_DATA
        expected.popleft()
        return reply

    def _raise_dead(self) -> NoReturn:
        error = self._error
        raise caused_by(
            ProtocolError(f"connection unusable since a protocol error: {error}"), error
        )

    def _read_line_reply(self, kind: ReplyKind) -> Reply | NeedData:
        try:
            statuses = _STATUS_REPLIES[kind]
        except KeyError:
            # stats and meta get, the admin commands: found here, after the lookup a set
            # needs anyway, they cost the session hot paths nothing.
            return self._read_admin(self._expected[0])
        buf = self._buffer
        eol = buf.find(b"\r\n")
        if eol < 0 or eol > MAX_LINE_LENGTH:
            return _partial_line(buf, 0, eol)
        line = bytes(buf[:eol])
        del buf[: eol + 2]
        status = statuses.get(line)
        if status is not None:
            return status
        # protocol.txt, "version": the server sends "VERSION <version>\r\n".
        if kind is ReplyKind.VERSION and line.startswith(b"VERSION "):
            return Version(line[8:].decode("ascii", "replace"))
        return _error_reply(line, kind)

    def _read_values(self, command: Command) -> Values | ErrorReply | NeedData:
        # protocol.txt, "Retrieval command": zero or more items, each "VALUE <key> <flags>
        # <bytes> [<cas unique>]\r\n<data block>\r\n", then "END\r\n".
        buf = self._buffer
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0 or eol - pos > MAX_LINE_LENGTH:
                _partial_line(buf, pos, eol)
                break
            if buf.startswith(b"VALUE ", pos):
                pos = self._read_item(buf, pos, eol, command)
                if pos < 0:
                    return NEED_DATA
                continue
            items = self._items
            self._items = []
            self._asked = None
            if eol - pos == 3 and buf.startswith(b"END", pos):
                del buf[: eol + 2]
                return _new_tuple(Values, (tuple(items),))
            # An error line ends the reply, even after some items: the server stops there.
            line = bytes(buf[pos:eol])
            del buf[: eol + 2]
            return _error_reply(line, _RETRIEVAL)
        del buf[:pos]
        return NEED_DATA

    def _read_item(self, buf: bytearray, pos: int, eol: int, command: Command) -> int:
        """Move the item whose VALUE line is ``buf[pos:eol]`` into self._items.

        Returns the offset after its data block; if the block is incomplete, drops the
        bytes before ``pos`` (their items are kept) and returns -1.
        """
        fields = bytes(buf[pos + 6 : eol]).split(b" ")
        if len(fields) == 3:
            key, flags_field, size_field = fields
            cas_unique = None
        elif len(fields) == 4 and fields[3].isdigit() and len(fields[3]) <= 20:
            key, flags_field, size_field, cas_field = fields
            cas_unique = int(cas_field)
        else:
            raise _malformed(buf, pos, eol)
        # isdigit() on bytes is ASCII-only: no sign, space or underscore that int() would
        # take. The length caps keep int() cheap.
        if not (key and flags_field.isdigit() and size_field.isdigit()) or (
            len(flags_field) > 10 or len(size_field) > 10
        ):
            raise _malformed(buf, pos, eol)
        self._check_asked(key, command)
        flags = int(flags_field)
        size = int(size_field)
        if flags > _MAX_FLAGS or (cas_unique is not None and cas_unique > _MAX_CAS):
            raise _malformed(buf, pos, eol)
        if size > self._max_value_size:
            raise ProtocolError(
                f"a {size}-byte value exceeds max_value_size {self._max_value_size}"
            )
        start = eol + 2
        end = start + size
        if len(buf) < end + 2:
            del buf[:pos]
            return -1
        # The data block ends where <bytes> says, not at the first \r\n: \r\n may occur
        # inside the data (protocol.txt, "Protocol"). The terminator must be right there.
        if not buf.startswith(b"\r\n", end):
            raise ProtocolError(f"a {size}-byte data block is not followed by \\r\\n")
        if size < _MEMORYVIEW_COPY_SIZE:
            value = bytes(buf[start:end])
        else:
            with memoryview(buf) as view:
                value = view[start:end].tobytes()
        self._items.append(_new_tuple(Item, (key, flags, value, cas_unique)))
        return end + 2

    def _check_asked(self, key: bytes, command: Command) -> None:
        # An item under another key is a late reply to some other command (or a server
        # answering for someone else): taken as this answer, it would pass for the session
        # asked for. The command's keys are split out only once an item arrives.
        asked = self._asked
        if asked is None:
            words = command.data.split()
            # Past "get"/"gets", and past the exptime of "gat"/"gats".
            asked = self._asked = words[2:] if words[0] in _GAT_WORDS else words[1:]
        if key not in asked:
            raise ProtocolError(f"an item under key {_excerpt(key)} that was not asked for")

    # -- admin replies: stats, meta get (off the session hot path) --------------------------

    def _read_admin(self, command: Command) -> Reply | NeedData:
        if command.kind is _STATS:
            return self._read_stats()
        return self._read_meta_get(command)

    def _read_stats(self) -> Stats | ErrorReply | NeedData:
        # protocol.txt, "General-purpose statistics": "STAT <name> <value>\r\n" lines,
        # then "END\r\n". Each complete line is parsed and dropped from the buffer as it
        # comes, so what is held is bounded by MAX_STATS_LINES and MAX_STATS_SIZE.
        buf = self._buffer
        reading = self._stats
        if reading is None:
            reading = self._stats = _StatsReading()
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0 or eol - pos > MAX_LINE_LENGTH:
                _partial_line(buf, pos, eol)
                break
            if not buf.startswith(b"STAT ", pos):
                line = bytes(buf[pos:eol])
                del buf[: eol + 2]
                self._stats = None
                return Stats(reading.entries) if line == b"END" else _error_reply(line, _STATS)
            reading.add(bytes(buf[pos + 5 : eol]))
            pos = eol + 2
        del buf[:pos]
        return NEED_DATA

    def _read_meta_get(self, command: Command) -> MetaItem | Status | ErrorReply | NeedData:
        # protocol.txt, "Meta Get": "VA <size> <flags>*\r\n<data block>\r\n" for a hit
        # (v asked), "EN\r\n" for a miss (1.6.18 adds the k and O flags asked for).
        buf = self._buffer
        eol = buf.find(b"\r\n")
        if eol < 0 or eol > MAX_LINE_LENGTH:
            return _partial_line(buf, 0, eol)
        asked = command.data[3 : -len(_META_GET_FLAGS)]  # past "mg "
        if buf.startswith(b"VA "):
            tokens = bytes(buf[3:eol]).split(b" ")
            size_field = tokens[0]
            if not size_field.isdigit() or len(size_field) > 10:
                raise _malformed(buf, 0, eol, "VA")
            size = int(size_field)
            if size > self._max_value_size:
                raise ProtocolError(
                    f"a {size}-byte value exceeds max_value_size {self._max_value_size}"
                )
            flags, ttl, cas_unique = _meta_flags(tokens[1:], asked, bytes(buf[:eol]))
            end = eol + 2 + size
            if len(buf) < end + 2:
                return NEED_DATA  # the VA line is read again then: one short line
            if not buf.startswith(b"\r\n", end):
                raise ProtocolError(f"a {size}-byte data block is not followed by \\r\\n")
            with memoryview(buf) as view:
                value = view[eol + 2 : end].tobytes()
            del buf[: end + 2]
            return MetaItem(asked, flags, value, ttl, cas_unique)
        line = bytes(buf[:eol])
        del buf[: eol + 2]
        if line == b"EN" or line.startswith(b"EN "):
            for token in line.split(b" ")[1:]:
                if token[:1] == b"k" and token[1:] != asked:
                    raise ProtocolError(f"a miss for key {_excerpt(token[1:])} not asked for")
            return Status.NOT_FOUND
        return _error_reply(line, ReplyKind.META_GET)


class _StatsReading:
    """The STAT lines of the stats reply being read, and what they have cost so far."""

    __slots__ = ("entries", "lines", "size")

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}
        self.lines = 0  # not len(entries): a name sent again and again must count too
        self.size = 0

    def add(self, body: bytes) -> None:
        """One line's ``<name> <value>`` (past "STAT ")."""
        self.lines += 1
        self.size += len(body) + 7  # "STAT " and "\r\n"
        if self.lines > MAX_STATS_LINES:
            raise ProtocolError(f"a stats reply of more than {MAX_STATS_LINES} STAT lines")
        if self.size > MAX_STATS_SIZE:
            raise ProtocolError(f"a stats reply of more than {MAX_STATS_SIZE} bytes")
        name, space, value = body.partition(b" ")
        if not name or not space:
            raise ProtocolError(f"malformed STAT line {_excerpt(b'STAT ' + body)}")
        self.entries[name.decode("ascii", "replace")] = value.decode("ascii", "replace")


def _meta_flags(tokens: list[bytes], asked: bytes, line: bytes) -> tuple[int, int, int]:
    """The client flags, ttl and cas unique of a VA line's flag tokens; ProtocolError
    unless each is there and valid and the ``k`` token is the key asked for."""
    fields = {}
    for token in tokens:
        if not token:  # two spaces in a row, or one at the end
            raise ProtocolError(f"malformed VA line {_excerpt(line)}")
        fields[token[:1]] = token[1:]  # others (O, s, W, X, Z...) are let through
    key, flags, ttl, cas_unique = (fields.get(flag) for flag in (b"k", b"f", b"t", b"c"))
    if key is None or flags is None or ttl is None or cas_unique is None:
        raise ProtocolError(f"malformed VA line {_excerpt(line)}: a flag asked for is missing")
    if key != asked:
        raise ProtocolError(f"an item under key {_excerpt(key)} that was not asked for")
    ttl_digits = ttl[1:] if ttl[:1] == b"-" else ttl
    if not (
        flags.isdigit()
        and len(flags) <= 10
        and int(flags) <= _MAX_FLAGS
        and cas_unique.isdigit()
        and len(cas_unique) <= 20
        and int(cas_unique) <= _MAX_CAS
        and ttl_digits.isdigit()
        and len(ttl_digits) <= 10
        and ttl in (ttl_digits, b"-1")  # no sign, or the -1 of "never expires"
    ):
        raise ProtocolError(f"malformed VA line {_excerpt(line)}")
    return int(flags), int(ttl), int(cas_unique)


def _partial_line(buf: bytearray, pos: int, eol: int) -> NeedData:
    """NEED_DATA while the line at ``pos`` may still end within MAX_LINE_LENGTH."""
    if eol >= 0 or len(buf) - pos > MAX_LINE_LENGTH:
        raise ProtocolError(f"no \\r\\n within {MAX_LINE_LENGTH} bytes of a reply line")
    return NEED_DATA


def _malformed(buf: bytearray, pos: int, eol: int, word: str = "VALUE") -> ProtocolError:
    return ProtocolError(f"malformed {word} line {_excerpt(bytes(buf[pos:eol]))}")


def _error_reply(line: bytes, kind: ReplyKind) -> ErrorReply:
    word, _, message = line.partition(b" ")
    error_kind = _ERROR_KINDS.get(word)
    if error_kind is None:
        raise ProtocolError(f"unexpected reply {_excerpt(line)} to a {kind.name.lower()} command")
    return ErrorReply(error_kind, message.decode("utf-8", "replace"))


def _excerpt(line: bytes) -> str:
    return repr(line[:80]) + ("..." if len(line) > 80 else "")
