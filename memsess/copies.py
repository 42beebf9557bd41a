"""What one server's copy of a session is (current, stale, missing, corrupt, ...) and what
the copies of a read say of the session: the one classification the store's repairs and
``memsess inspect`` both use, so they never call the same copy by different names.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final, NamedTuple

from memsess.records import SEALED_PREFIX, Record, decode_record
from memsess.sealing import Sealer

__all__ = ["Classified", "Copy", "CopyStatus", "SessionState", "classify", "open_copy"]


# A NamedTuple rather than a frozen dataclass: one is made per copy read, and a frozen
# dataclass's __init__ sets each field through object.__setattr__.
class Copy(NamedTuple):
    """One server's answer to a read of one session."""

    record: Record | None  # None: no item, or an item that is not an intact record
    raw: bytes  # the item as stored; b"" when there is none
    cas: int | None  # the item's cas unique, for a guarded repair
    problem: str  # why an item there is unreadable; "" otherwise
    trusted: bool  # may decide the read alone (see memsess.rules)

    def status(self, newest: int, *, keys_unknown: bool = False) -> CopyStatus:
        """This copy compared with ``newest``, the version a read settles on (0: none).

        ``keys_unknown``: the reader may lack keys the store holds (``memsess inspect``
        without them), so a sealed record it cannot open is SEALED, not judged; the
        store itself knows its keys, and a record it cannot open is CORRUPT to it."""
        record = self.record
        if record is not None:
            version = record.version
            if version == newest:
                return CopyStatus.CURRENT
            return CopyStatus.STALE if version < newest else CopyStatus.NEWER
        if not self.raw:
            return CopyStatus.MISSING
        if keys_unknown and self.raw[:2] == SEALED_PREFIX:
            return CopyStatus.SEALED
        return CopyStatus.CORRUPT


class CopyStatus(enum.Enum):
    """One server's copy, as a read sees it. The values are the words ``memsess
    inspect`` prints and the store's repair log lines use."""

    CURRENT = "current"  # holds the newest version read (data or a tombstone)
    STALE = "stale"  # an older version: a read rewrites it
    NEWER = "newer"  # newer than what it was compared with: a copy outside the replica set
    MISSING = "missing"  # no item: a read writes one
    CORRUPT = "corrupt"  # an item that is not an intact record the store can open
    SEALED = "sealed"  # a sealed record its reader holds no keys for: not judged
    UNREACHABLE = "unreachable"  # the server did not answer: nothing is known

    @property
    def repaired(self) -> bool:
        """Whether a read that found a newer copy elsewhere rewrites this one."""
        return self in _REPAIRED


_REPAIRED: Final = frozenset({CopyStatus.STALE, CopyStatus.MISSING, CopyStatus.CORRUPT})


class SessionState(enum.Enum):
    """What a load of the session answers now, from its copies."""

    LIVE = "live"  # the newest copy holds data
    LOGGED_OUT = "logged out"  # the newest copy is a tombstone: load() returns None
    ABSENT = "absent"  # no copy holds a record: never saved, expired, lost, or unreadable
    SEALED = "sealed"  # no copy could be opened, some for want of keys: not judged


class Classified(NamedTuple):
    """A read's copies, classified: see :func:`classify`."""

    state: SessionState
    newest: Record | None  # the record a load settles on; None: none holds one
    statuses: tuple[CopyStatus, ...]  # one per copy, in the order given


def classify(copies: Sequence[Copy | None], *, keys_unknown: bool = False) -> Classified:
    """The session's state and each copy's status, as a read of ``copies`` (None for a
    server that did not answer) concludes. ``keys_unknown``: see :meth:`Copy.status`.

    Computed when a caller wants the names (inspect, a repair's log line), never per
    copy on the read path: that only compares versions (memsess.plans)."""
    newest: Record | None = None
    for copy in copies:
        record = None if copy is None else copy.record
        if record is not None and (newest is None or record.version > newest.version):
            newest = record
    version = 0 if newest is None else newest.version
    statuses = tuple(
        CopyStatus.UNREACHABLE if copy is None else copy.status(version, keys_unknown=keys_unknown)
        for copy in copies
    )
    if newest is not None:
        state = SessionState.LOGGED_OUT if newest.is_tombstone else SessionState.LIVE
    elif CopyStatus.SEALED in statuses:
        state = SessionState.SEALED
    else:
        state = SessionState.ABSENT
    return Classified(state, newest, statuses)


def open_copy(
    value: bytes | None, flags: int, cas: int | None, key: bytes, sealer: Sealer | None
) -> Copy:
    """The copy of ``key`` stored as ``value`` (None: no item) with ``flags``, decoded as
    the store reads it: with ``sealer`` (its secret keys) only a record sealed for
    ``key`` is intact; without, no sealed record is. Never trusted (no server's floor
    is known here). :meth:`memsess.rules.ReadRule._copy` inlines this decode."""
    if value is None:
        return Copy(None, b"", None, "", False)
    try:
        if sealer is None:
            record = decode_record(value, flags)
        else:  # authenticated before its version counts for anything
            record = sealer.open_record(value, flags, key)
    except ValueError as exc:
        return Copy(None, value, cas, str(exc) or "unreadable", False)
    return Copy(record, value, cas, "", False)
