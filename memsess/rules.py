"""When an operation has heard enough: the rules that see each server's reply as it
arrives and say when the servers still silent may be cut off (sans-I/O, time passed in).

The read rule (docs/consistency.md states it as a guarantee): a read may end before every
live copy has answered only once a *trusted* copy is in — a record whose version is at or
above its server's trust floor, i.e. written after the last moment that server may have
missed a write, as this process saw it (:attr:`Cluster.trust_floor`) or as any process
recorded it on the server itself (its *marker*, read with the session now and then). A
miss, a corrupt copy or an older copy decides nothing while another live copy is silent.
"""

from __future__ import annotations

from typing import Final

from memsess.cluster import Cluster
from memsess.copies import Copy
from memsess.errors import MemsessError
from memsess.protocol import Item, Values
from memsess.records import FLAGS, Record, decode_record
from memsess.sealing import Sealer
from memsess.transport import Result

__all__ = ["MARKER_MAX_AGE", "AllAnswers", "Copy", "ReadRule", "WriteRule"]

_INF: Final = float("inf")
#: Seconds a reading of a server's marker is used before a read asks for it again.
MARKER_MAX_AGE: Final = 1.0
# A marker that is not a plain number is read as "trust nothing older than anything".
_UNTRUSTED: Final = 2**64
# Copies are made with tuple.__new__: a NamedTuple's own __new__ is a Python frame.
_new_tuple: Final = tuple.__new__
_MISSING: Final = Copy(None, b"", None, "", False)


class _Rule:
    """Shared by the rules: which slots are still waiting, and their straggler window."""

    __slots__ = ("_cluster", "_cut_at", "_open", "_pending", "_servers")

    def __init__(self, cluster: Cluster, servers: list[int]) -> None:
        self._cluster = cluster
        self._servers = servers
        self._open = [True] * len(servers)
        self._pending = len(servers)
        self._cut_at = _INF

    def _start_window(self, now: float, write: bool) -> None:
        cluster = self._cluster
        windows = cluster.write_windows if write else cluster.read_windows
        servers = self._servers
        longest = 0.0
        for slot, left in enumerate(self._open):
            if left:
                longest = max(longest, windows[servers[slot]])
        self._cut_at = now + longest


class ReadRule(_Rule):
    """Reads: conclusive once a trusted copy is in (then the rest get their straggler
    window), else only when every live copy has answered or failed."""

    __slots__ = ("_key", "_marker_asked", "_opened", "_opened_raw", "_patient", "_sealer", "copies")

    def __init__(
        self,
        cluster: Cluster,
        servers: list[int],
        key: bytes,
        *,
        marker_asked: list[bool] | None = None,
        patient: bool = False,
        sealer: Sealer | None = None,
    ) -> None:
        """``marker_asked``: per server, whether its command also asked for the marker
        (then its answer, or its absence, refreshes the cluster's copy of it).
        ``patient``: never end early (a repair pass wants every copy's answer).
        ``sealer``: the store's secret keys: only a record sealed for ``key`` is a copy
        (anything else, plain records included, is corrupt); None: no sealed record is."""
        # _Rule.__init__ inlined: one is made for every read.
        count = len(servers)
        self._cluster = cluster
        self._servers = servers
        self._open = [True] * count
        self._pending = count
        self._cut_at = _INF
        self._key = key
        self._marker_asked = marker_asked
        self._patient = patient
        self._sealer = sealer
        self.copies: list[Copy | None] = [None] * count
        # The last copy opened, and its bytes: a copy that is byte for byte the same (as
        # every copy of a session in step is) is the same record, not opened again.
        self._opened_raw = b""
        self._opened: Record | None = None

    def on_result(self, slot: int, result: Result, now: float) -> float:
        self._open[slot] = False
        self._pending -= 1
        if result.__class__ is Values:
            asked = self._marker_asked is not None and self._marker_asked[slot]
            items = result.items
            copy = self.copies[slot] = self._copy(self._servers[slot], items, asked, now)
            if copy.trusted and self._pending and self._cut_at == _INF and not self._patient:
                self._start_window(now, False)
        return self._cut_at

    def _copy(self, server: int, items: tuple[Item, ...], asked: bool, now: float) -> Copy:
        cluster = self._cluster
        if asked:
            found = None
            marked = 0  # a marker asked for and absent: the server holds none (flushed, new)
            for item in items:
                if item.key == self._key:
                    found = item
                else:  # the marker: the parser admits only keys that were asked for
                    value = item.value
                    marked = int(value) if value.isdigit() and len(value) <= 20 else _UNTRUSTED
            cluster.marker_floor[server] = marked
            # Never kept longer than the server's retry interval: a process that saw the
            # server fail writes its marker no sooner than that after the failure, so a
            # reading from before the failure has expired by then.
            cluster.marker_due[server] = now + min(
                MARKER_MAX_AGE, cluster.servers[server].retry_interval
            )
        else:  # only the session was asked for: the parser admits no other key
            found = items[0] if items else None
        if found is None:
            return _MISSING
        # memsess.copies.open_copy's decode, inlined (one per copy read), then the trust
        # this server's floors give the copy: tests/test_rules.py pins that they agree.
        raw = found.value
        record = self._opened
        # Decoding is a function of the bytes, the flags and the key (the rule's own):
        # the same bytes under our FLAGS (the only ones that open) are the same record.
        if record is None or found.flags != FLAGS or raw != self._opened_raw:
            sealer = self._sealer
            try:
                if sealer is None:
                    record = decode_record(raw, found.flags)
                else:  # authenticated before its version counts for anything
                    record = sealer.open_record(raw, found.flags, self._key)
            except ValueError as exc:
                return Copy(None, raw, found.cas, str(exc) or "unreadable", False)
            self._opened_raw = raw
            self._opened = record
        version = record.version
        trusted = version >= cluster.trust_floor[server] and version >= cluster.marker_floor[server]
        return _new_tuple(Copy, (record, raw, found.cas, "", trusted))


class WriteRule(_Rule):
    """Writes: once one copy has answered, the others get their (longer) write window;
    a copy cut off is not stored, and the plan reports it for repair."""

    __slots__ = ()

    def on_result(self, slot: int, result: Result, now: float) -> float:
        self._open[slot] = False
        self._pending -= 1
        if self._pending and self._cut_at == _INF and not isinstance(result, MemsessError):
            self._start_window(now, True)
        return self._cut_at


class AllAnswers(_Rule):
    """Wait for every server until its own deadline (probes, conflict reads)."""

    __slots__ = ()

    def on_result(self, slot: int, result: Result, now: float) -> float:
        return _INF
