"""The per-request operations of a store, as plans any driver runs, and the blocking
driver that runs them: load, fetch, save, touch and delete, with what they share
(encoding and decoding session data, write outcomes, expiry times).

StoreCore (memsess.store) checks the options, builds the cluster, the plans and the
background thread, and owns one Operations; both drivers run its plans. This module is
compiled in the compiled build (memsess/_build.py) and the stores are not: the stores
are public classes to subclass and wrap, this is the work of every request.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from memsess import protocol
from memsess._chaining import caused_by
from memsess.cluster import Cluster
from memsess.errors import (
    MemsessError,
    ServerError,
    SessionConflictError,
    SessionGoneError,
    SessionIdError,
    SessionTooLargeError,
    WriteError,
)
from memsess.metrics import Metrics
from memsess.plans import Conflict, Flow, Found, Plans, Step, short
from memsess.protocol import Status
from memsess.records import (
    DATA,
    FLAGS,
    TOMBSTONE,
    Record,
    VersionClock,
    compress,
    encode_record,
    is_valid_id,
    lifetime_seconds,
    plain_payload,
    storage_key,
)
from memsess.rules import AllAnswers
from memsess.sealing import Sealer
from memsess.serializers import SERIALIZERS, Serializer
from memsess.snapshots import Changes, Snapshot, check_snapshot
from memsess.transport import Result

__all__ = ["ON_CONFLICT", "Operations", "exptime_of"]

# The store's logger: these are its operations.
log = logging.getLogger("memsess.store")

T = TypeVar("T")

#: What a conditional save does when the session was saved elsewhere since its load.
ON_CONFLICT: Final = ("error", "merge", "overwrite")
_MERGE_ROUNDS: Final = 16  # merges of one save against writers that keep winning the race
# Seconds: the pause before a merge's retry is random, up to this doubled each round
# (capped at _MERGE_JITTER_CAP): writers that met spread out instead of meeting again.
_MERGE_JITTER: Final = 0.001
_MERGE_JITTER_CAP: Final = 0.05
# memcached refuses an exptime over 30 days as relative: it reads it as a Unix time.
_MAX_RELATIVE_EXPTIME: Final = 30 * 24 * 3600
# memcached 1.6 keeps times in 32 bits (protocol._MAX_EXPTIME).
_MAX_EXPTIME: Final = 2**31 - 1


def exptime_of(seconds: int) -> int:
    """memcached's exptime for a lifetime of whole ``seconds``: relative up to 30 days,
    else a Unix time; ValueError past 2038."""
    if seconds <= _MAX_RELATIVE_EXPTIME:
        return seconds
    exptime = int(time.time()) + seconds
    if exptime > _MAX_EXPTIME:
        raise ValueError(f"a lifetime of {seconds} s ends past 2038, which memcached cannot store")
    return exptime


class Operations:
    """A store's operations as plans (generators of steps, see memsess.plans), with its
    settings, already checked by StoreCore."""

    def __init__(
        self,
        *,
        cluster: Cluster,
        plans: Plans,
        metrics: Metrics,
        clock: VersionClock,
        serializer: Serializer,
        prefix: bytes,
        ttl: int,
        sealer: Sealer | None,
        compress_threshold: int | None,
        codec: int,
        max_session_size: int,
        max_item_size: int,
        max_value_size: int,
    ) -> None:
        self.cluster = cluster
        self.plans = plans
        self.metrics = metrics
        self.clock = clock
        self.serializer = serializer
        self.prefix = prefix
        self.ttl = ttl
        self.sealer = sealer
        self.compress_threshold = compress_threshold
        self.codec = codec
        self.max_session_size = max_session_size
        self.max_item_size = max_item_size
        self.max_value_size = max_value_size

    # -- the operations, as plans any driver runs ------------------------------------

    def fetch(self, sid: str, count: bool = True) -> Flow[Snapshot | None]:
        try:
            key = storage_key(self.prefix, sid)  # memoized: no regex for a known id
        except SessionIdError:
            return None
        try:
            found = yield from self.plans.read(key)
        except BaseException:
            if count:  # a load all the same
                self.metrics.add("loads")
            raise
        data = self.data(key, found, count)
        if found is None or data is None:
            return None
        return Snapshot(sid, data, found.record.version, found.tokens, found.record)

    def load(self, sid: str) -> Flow[dict[str, Any] | None]:
        """fetch for load(): the data alone, with no Snapshot to make."""
        try:
            key = storage_key(self.prefix, sid)
        except SessionIdError:
            return None
        try:
            found = yield from self.plans.read(key)
        except BaseException:
            self.metrics.add("loads")  # a load all the same
            raise
        return self.data(key, found, True)

    def data(self, key: bytes, found: Found | None, count: bool) -> dict[str, Any] | None:
        """The session data of what a read found (None: none, a logout, or corrupt);
        with ``count``, counted as a load and a hit or a miss."""
        data = None
        if found is not None and not found.record.is_tombstone:
            data = self.decode_payload(key, found.record)
        if count:
            self.metrics.add_both("loads", "hits" if data is not None else "misses")
        return data

    def save(
        self,
        sid: str,
        data: Mapping[str, Any],
        ttl: float | None,
        snapshot: Snapshot | None,
        on_conflict: str = "error",
    ) -> Flow[None]:
        key = storage_key(self.prefix, sid)  # SessionIdError before anything is done
        if on_conflict not in ON_CONFLICT:
            raise ValueError(
                f"on_conflict must be one of {', '.join(ON_CONFLICT)}: {on_conflict!r}"
            )
        check_snapshot(snapshot, sid)
        seconds = self.ttl if ttl is None else lifetime_seconds(ttl)
        exptime = exptime_of(seconds)
        self.metrics.add("saves")
        changes: Changes | None = None
        for round_ in range(_MERGE_ROUNDS):
            version, record = self.encode(key, data, seconds)
            since = None if snapshot is None else (snapshot.version, dict(snapshot.tokens))
            try:
                results = yield from self.plans.save(
                    key, record, version, exptime, since=since, conflicts=on_conflict != "overwrite"
                )
            except Conflict:
                # Plans.save raises Conflict only given `since`, which is made of the snapshot.
                assert snapshot is not None  # noqa: S101 - invariant, for the type checker
                self.metrics.add("conflicts")
                current = yield from self.fetch(sid, False)
                if current is None:
                    gone = SessionGoneError(
                        "the session was logged out since it was loaded; not saved"
                    )
                    raise caused_by(gone, None)  # noqa: B904 - see memsess._chaining
                if on_conflict == "error":
                    conflict = SessionConflictError(
                        "the session was saved elsewhere since it was loaded; not saved",
                        current,
                    )
                    raise caused_by(conflict, None)  # noqa: B904 - see memsess._chaining
                if changes is None:  # what this save changed, against what it loaded
                    changes = Changes.between(self.loaded_data(key, snapshot), data)
                data, overwritten = changes.applied_to(current.data)
                if overwritten:
                    self.metrics.add("merge_overwrites", overwritten)
                snapshot = current
                # Jitter: writers that met in this round spread out before the next.
                pause = random.uniform(0, min(_MERGE_JITTER_CAP, _MERGE_JITTER * 2**round_))
                yield Step([], AllAnswers(self.cluster, []), False, pause)
                continue
            self.require_stored(results, "save", len(record))
            return
        raise SessionConflictError(
            f"the session kept being saved elsewhere: {_MERGE_ROUNDS} merges lost the race",
            snapshot,
        )

    def touch(self, sid: str, ttl: float | None) -> Flow[bool]:
        if not is_valid_id(sid):
            return False
        key = storage_key(self.prefix, sid)
        exptime = exptime_of(self.ttl if ttl is None else lifetime_seconds(ttl))
        self.metrics.add("touches")
        return (yield from self.plans.touch(key, exptime))

    def delete(self, sid: str) -> Flow[None]:
        if not is_valid_id(sid):
            return
        key = storage_key(self.prefix, sid)
        tombstone = encode_record(self.clock.tick(), TOMBSTONE, self.serializer.id, ttl=self.ttl)
        if self.sealer is not None:  # else anyone could forge the logout's version
            tombstone = self.sealer.seal(key, tombstone)
        command = protocol.set(key, tombstone, flags=FLAGS, exptime=exptime_of(self.ttl))
        self.metrics.add("deletes")
        results = yield from self.plans.write(key, command)
        self.require_stored(results, "delete", len(tombstone))

    # -- the blocking driver ------------------------------------------------------------

    def run(self, flow: Flow[T]) -> T:
        """Run each step of a plan through the cluster's fan-out, in this thread (the
        requests of a SessionStore, and every store's background thread)."""
        execute: Callable[..., list[Result]] = self.cluster.execute
        try:
            step = next(flow)
            while True:
                if step.pause:
                    time.sleep(step.pause)
                step = flow.send(execute(step.batch, step.rule, step.record))
        except StopIteration as stop:
            value: T = stop.value
            return value

    # -- what the operations share ------------------------------------------------------

    def encode(self, key: bytes, data: Mapping[str, Any], seconds: int) -> tuple[int, bytes]:
        """A new version and the record of ``data`` under it, to be stored under ``key``
        (compressed and sealed as the store's options say)."""
        payload = self.serializer.dumps(data)
        if len(payload) > self.max_session_size:
            raise SessionTooLargeError(
                f"session data is {len(payload)} bytes serialized, over max_session_size"
                f" ({self.max_session_size} bytes); nothing was stored"
            )
        codec = 0
        threshold = self.compress_threshold
        if threshold is not None and len(payload) > threshold:
            packed = compress(payload, self.codec)
            if len(packed) < len(payload):  # else kept as it is: as small, and faster to read
                payload, codec = packed, self.codec
        version = self.clock.tick()
        record = encode_record(version, DATA, self.serializer.id, payload, ttl=seconds, codec=codec)
        if self.sealer is not None:
            record = self.sealer.seal(key, record)
        if len(record) > self.max_value_size:
            raise SessionTooLargeError(
                f"session data is {len(record)} bytes serialized, over the servers' item size"
                f" ({self.max_value_size} bytes usable); nothing was stored"
            )
        return version, record

    def loaded_data(self, key: bytes, snapshot: Snapshot) -> dict[str, Any]:
        """The session as ``snapshot`` was loaded, decoded afresh from its record: the
        caller may have changed the snapshot's data in place (nested values too)."""
        record = snapshot.record
        if record is None:  # a snapshot made by hand: its data is all there is
            return dict(snapshot.data)
        loaded = self.decode_payload(key, record)
        return {} if loaded is None else loaded

    def decode_payload(self, key: bytes, record: Record) -> dict[str, Any] | None:
        serializer = SERIALIZERS.get(record.serializer_id)
        if serializer is None and record.serializer_id == self.serializer.id:
            serializer = self.serializer
        try:
            if serializer is None:
                raise ValueError(f"unknown serializer id {record.serializer_id}")
            payload = record.payload
            if record.codec:  # bounded by max_session_size: a bomb reads as no session
                payload = plain_payload(record, max_size=self.max_session_size)
            return serializer.loads(payload)
        except ValueError as exc:
            self.metrics.add("corrupt_records")
            log.warning("undecodable session data for %s, read as no session: %s", short(key), exc)
            return None

    def require_stored(self, results: list[Result], operation: str, size: int) -> None:
        """Raise WriteError when no copy was stored (of ``size`` bytes), its cause the
        first server's error; count (and log what is new about) a write that reached
        fewer copies than the redundancy. Each server's error names the server."""
        stored = 0
        for result in results:
            if result is Status.STORED:
                stored += 1
        if not stored:
            error = WriteError(
                f"{operation}: no copy could be stored: "
                + "; ".join(str(result) for result in results)
                + self.item_size_hint(results, size)
            )
            cause = next((r for r in results if isinstance(r, MemsessError)), None)
            raise caused_by(error, cause)
        if stored < self.cluster.redundancy:
            self.metrics.add("partial_writes")
            failed = [str(result) for result in results if result is not Status.STORED]
            # A server skipped as down was logged once, when it was marked down;
            # only a copy that was asked and failed is news.
            if failed:
                log.info(
                    "%s reached %d of %d copies: %s (repaired in the background when it answers)%s",
                    operation,
                    stored,
                    self.cluster.redundancy,
                    "; ".join(failed),
                    self.item_size_hint(results, size),
                )

    def item_size_hint(self, results: list[Result], size: int) -> str:
        """What to do when a server refused the record as too large for its items: the
        store's max_item_size is over that server's -I, so the size check that refuses
        such a session before sending anything let it through."""
        if not any(
            isinstance(result, ServerError) and "too large" in result.message for result in results
        ):
            return ""
        return (
            f"; the record is {size} bytes, over those servers' item size (memcached -I),"
            f" while max_item_size is {self.max_item_size} bytes: set max_item_size to the"
            " servers' -I (so that a session too large raises SessionTooLargeError before"
            " anything is sent), or start memcached with a larger -I"
        )
