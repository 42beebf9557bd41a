"""SessionStore: session ids, versioned records, read repair and tombstones.

Each operation is a plan written as a generator: it yields batches of
``(server, command)`` and receives their results, so the blocking driver here
and a later asyncio driver run the same logic (httpx's ``auth_flow`` way).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

from memsess import protocol
from memsess.cluster import Cluster, ServerStatus
from memsess.dsn import ServerSpec, parse_dsn
from memsess.errors import (
    MemsessError,
    NoServerAvailableError,
    SessionGoneError,
    SessionTooLargeError,
    WriteError,
)
from memsess.errors import TimeoutError as MemsessTimeoutError
from memsess.metrics import Metrics
from memsess.protocol import Command, ErrorReply, Status, Values
from memsess.records import (
    DATA,
    FLAGS,
    TOMBSTONE,
    Record,
    VersionClock,
    decode_record,
    encode_record,
    is_valid_id,
    new_id,
    storage_key,
)
from memsess.serializers import SERIALIZERS, Serializer, get_serializer
from memsess.transport import DEFAULT_STRAGGLER_WINDOW, Result

__all__ = ["DEFAULT_TTL", "SessionStore", "Snapshot"]

log = logging.getLogger("memsess.store")

DEFAULT_TTL: Final = 1440  # seconds; PHP's session.gc_maxlifetime
DEFAULT_REDUNDANCY: Final = 2  # PHP's memcache.session_redundancy
DEFAULT_MAX_ITEM_SIZE: Final = 1024 * 1024  # memcached's default -I (1 MiB)
# memcached refuses an exptime over 30 days as relative: it reads it as a Unix time.
_MAX_RELATIVE_EXPTIME: Final = 30 * 24 * 3600
# Room memcached needs in an item besides the value: item header, key, suffix.
_ITEM_OVERHEAD: Final = 512

Batch = list[tuple[int, Command]]
T = TypeVar("T")
Flow = Generator[Batch, list[Result], T]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A session as loaded: its data, its version, and the CAS token of the
    copy read from each server (None where the server had no copy). Passing it
    back to :meth:`SessionStore.save` makes the save conditional: a logout made
    elsewhere since the load wins."""

    sid: str
    data: dict[str, Any]
    version: int
    tokens: Mapping[int, int | None]


class SessionStore:
    """Sessions in a cluster of memcached servers, ``redundancy`` copies each.

    One store is shared by every thread of a process and survives a fork.
    """

    def __init__(
        self,
        servers: Sequence[ServerSpec],
        *,
        redundancy: int | None = None,
        ttl: int = DEFAULT_TTL,
        serializer: str | Serializer = "msgpack",
        key_prefix: str = "memsess:",
        straggler_window: float = DEFAULT_STRAGGLER_WINDOW,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
    ) -> None:
        """``redundancy``: copies of each session (default 2, or fewer when the
        DSN lists fewer servers). ``ttl``: seconds a session lives after its
        last save or touch (default 1440). ``straggler_window``: seconds the
        other copies get once one has answered (default 0.005).
        ``max_item_size``: the servers' ``-I`` item size in bytes (default 1 MiB)."""
        if redundancy is None:
            redundancy = min(DEFAULT_REDUNDANCY, len(servers))
        if ttl <= 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl}")
        self.ttl = ttl
        self.serializer = get_serializer(serializer)
        self.key_prefix = key_prefix.encode("ascii")
        self.max_value_size = max_item_size - _ITEM_OVERHEAD - len(self.key_prefix)
        self._metrics = Metrics()
        self._cluster = Cluster(
            servers,
            redundancy=redundancy,
            straggler_window=straggler_window,
            metrics=self._metrics,
        )
        self._clock = VersionClock()

    @classmethod
    def from_dsn(cls, dsn: str, **options: Any) -> SessionStore:
        """A store for the servers of a PHP-style save_path, e.g.
        ``"tcp://10.0.0.1:11211?weight=2&timeout=0.5, unix:///run/memcached.sock"``."""
        return cls(parse_dsn(dsn), **options)

    @property
    def redundancy(self) -> int:
        return self._cluster.redundancy

    # -- the public API --------------------------------------------------------

    new_id = staticmethod(new_id)

    def load(self, sid: str) -> dict[str, Any] | None:
        """The session's data, or None when absent, expired, logged out or not
        a valid id (nothing is sent then). Raises NoServerAvailableError when
        no copy could be asked."""
        snapshot = self.fetch(sid)
        return None if snapshot is None else snapshot.data

    def fetch(self, sid: str) -> Snapshot | None:
        """Like :meth:`load`, with the version and CAS tokens for a conditional save."""
        if not is_valid_id(sid):
            return None
        snapshot = self._run(self._fetch_flow(sid, storage_key(self.key_prefix, sid)))
        self._metrics.add("hits" if snapshot is not None else "misses")
        return snapshot

    def save(
        self,
        sid: str,
        data: Mapping[str, Any],
        *,
        ttl: int | None = None,
        snapshot: Snapshot | None = None,
    ) -> None:
        """Store ``data`` as the newest version on every live copy, in parallel.

        With the ``snapshot`` the data was loaded as, a logout made since then
        wins: nothing is stored and SessionGoneError is raised. Raises
        SessionIdError for a malformed id and SessionTooLargeError for data over
        the item size (nothing is sent either way), WriteError when no copy
        could be stored."""
        key = storage_key(self.key_prefix, sid)
        payload = self.serializer.dumps(data)
        record = encode_record(self._clock.tick(), DATA, self.serializer.id, payload)
        if len(record) > self.max_value_size:
            raise SessionTooLargeError(
                f"session data is {len(record)} bytes serialized, over the servers' item size"
                f" ({self.max_value_size} bytes usable); nothing was stored"
            )
        self._metrics.add("saves")
        self._run(self._save_flow(key, record, self._exptime(ttl), snapshot))

    def touch(self, sid: str, *, ttl: int | None = None) -> bool:
        """Extend the lifetime of every copy to ``ttl`` seconds (default: the
        store's); False when no copy exists or the id is malformed."""
        if not is_valid_id(sid):
            return False
        key = storage_key(self.key_prefix, sid)
        command = protocol.touch(key, self._exptime(ttl))
        self._metrics.add("touches")
        results = self._run(self._one_batch_flow(key, command))
        return any(result is Status.TOUCHED for result in results)

    def delete(self, sid: str) -> None:
        """Log out: write a tombstone, newer than every copy, to every live copy,
        so a copy that missed the logout loses to it when its server returns."""
        if not is_valid_id(sid):
            return
        key = storage_key(self.key_prefix, sid)
        tombstone = encode_record(self._clock.tick(), TOMBSTONE, self.serializer.id)
        command = protocol.set(key, tombstone, flags=FLAGS, exptime=self._exptime(None))
        self._metrics.add("deletes")
        results = self._run(self._one_batch_flow(key, command))
        self._require_stored(results, "delete")

    def regenerate(
        self,
        sid: str,
        data: Mapping[str, Any] | None = None,
        *,
        ttl: int | None = None,
        snapshot: Snapshot | None = None,
    ) -> str:
        """Move the session to a new id (against session fixation, e.g. at login):
        the same data (or ``data``) under a new id with ``ttl`` seconds to live,
        and the old id logged out. Raises SessionGoneError when there is no
        session to move and no data given, or when ``snapshot`` is given and
        the session was logged out since it was loaded."""
        if snapshot is not None and self.fetch(sid) is None:
            raise SessionGoneError("the session was logged out since it was loaded")
        if data is None:
            data = self.load(sid)
            if data is None:
                raise SessionGoneError("no session to regenerate: absent, expired or logged out")
        fresh = new_id()
        self.save(fresh, data, ttl=ttl)
        self.delete(sid)
        return fresh

    def locate(self, sid: str) -> tuple[str, ...]:
        """The addresses of the servers that hold (or would hold) the copies of
        ``sid``, in ring order, whether they are up or not."""
        key = storage_key(self.key_prefix, sid).decode("ascii")
        servers = self._cluster.servers
        return tuple(servers[index].name for index in self._cluster.replica_set(key))

    def stats(self) -> dict[str, int]:
        """Counters since the store was made: loads, hits, misses, saves,
        touches, deletes, repairs, corrupt_records, partial_writes,
        straggler_drops, failovers, server_state_changes (see memsess.metrics)."""
        return self._metrics.snapshot()

    def health(self) -> list[ServerStatus]:
        """One entry per server: address, state, consecutive failures, last
        failure, seconds until a down server is probed again."""
        return self._cluster.status()

    def close(self) -> None:
        """Close every idle connection. The store can still be used afterwards
        (connections are reopened), which keeps close() safe in any order."""
        self._cluster.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plans ------------------------------------------------------------------

    def _targets(self, key: bytes) -> list[int]:
        targets = self._cluster.targets(key.decode("ascii"))
        if len(targets) < self._cluster.redundancy:
            self._metrics.add("failovers")
        return targets

    def _fetch_flow(self, sid: str, key: bytes) -> Flow[Snapshot | None]:
        self._metrics.add("loads")
        targets = self._targets(key)
        command = protocol.get(key, cas=True)
        results = yield [(index, command) for index in targets]
        copies = self._read_copies(key, targets, results)
        newest = max(
            ((rec, raw) for rec, raw, _ in copies.values() if rec is not None),
            key=lambda copy: copy[0].version,
            default=None,
        )
        if newest is None:
            return None
        record, raw = newest
        self._clock.observe(record.version)
        lagging = {  # server index -> why its copy is rewritten
            index: "missing" if not stored else "corrupt" if rec is None else "stale"
            for index, (rec, stored, _) in copies.items()
            if rec is None or rec.version < record.version
        }
        if lagging:
            servers = self._cluster.servers
            log.info(
                "repairing %s: %s",
                _short(key),
                ", ".join(f"{why} on memcached {servers[i].name}" for i, why in lagging.items()),
            )
            self._metrics.add("repairs", len(lagging))
            exptime = self._exptime(None)
            yield [(i, _guarded_write(key, raw, copies[i][2], exptime)) for i in lagging]
        if record.is_tombstone:
            return None
        data = self._decode_payload(key, record)
        if data is None:
            return None
        tokens = {index: token for index, (_, _, token) in copies.items()}
        return Snapshot(sid, data, record.version, tokens)

    def _save_flow(
        self, key: bytes, record: bytes, exptime: int, snapshot: Snapshot | None
    ) -> Flow[None]:
        targets = self._targets(key)
        if snapshot is None:
            command = protocol.set(key, record, flags=FLAGS, exptime=exptime)
            results = yield [(index, command) for index in targets]
        else:
            results = yield [
                (index, _guarded_write(key, record, snapshot.tokens.get(index), exptime))
                for index in targets
            ]
            conflicts = [
                index
                for index, result in zip(targets, results, strict=True)
                if result in (Status.EXISTS, Status.NOT_STORED, Status.NOT_FOUND)
            ]
            if conflicts:
                results = yield from self._resolve_conflicts(
                    key,
                    record,
                    exptime,
                    snapshot,
                    targets=targets,
                    results=results,
                    conflicts=conflicts,
                )
        self._require_stored(results, "save")

    def _resolve_conflicts(
        self,
        key: bytes,
        record: bytes,
        exptime: int,
        snapshot: Snapshot,
        *,
        targets: list[int],
        results: list[Result],
        conflicts: list[int],
    ) -> Generator[Batch, list[Result], list[Result]]:
        """Some copies changed since the load: a newer logout wins, anything
        else (a concurrent save) is overwritten by this newer version."""
        command = protocol.get(key)
        current = yield [(index, command) for index in conflicts]
        copies = self._read_copies(key, conflicts, current)
        logged_out = any(
            rec is not None and rec.is_tombstone and rec.version > snapshot.version
            for rec, _, _ in copies.values()
        )
        if logged_out:
            tombstone = encode_record(self._clock.tick(), TOMBSTONE, self.serializer.id)
            command = protocol.set(key, tombstone, flags=FLAGS, exptime=exptime)
            yield [(index, command) for index in targets]
            raise SessionGoneError("the session was logged out since it was loaded; not saved")
        command = protocol.set(key, record, flags=FLAGS, exptime=exptime)
        rewritten = yield [(index, command) for index in conflicts]
        merged = dict(zip(targets, results, strict=True))
        merged.update(zip(conflicts, rewritten, strict=True))
        return list(merged.values())

    def _one_batch_flow(self, key: bytes, command: Command) -> Flow[list[Result]]:
        targets = self._targets(key)
        results = yield [(index, command) for index in targets]
        return results

    # -- helpers ----------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        """The blocking driver: run each batch through the cluster's fan-out."""
        execute = self._cluster.execute
        try:
            batch = next(flow)
            while True:
                results = execute(batch)
                for result in results:
                    if isinstance(result, MemsessError):
                        self._count_failure(result)
                batch = flow.send(results)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _count_failure(self, error: MemsessError) -> None:
        if isinstance(error, MemsessTimeoutError) and error.straggler:
            self._metrics.add("straggler_drops")
        self._metrics.add("failovers")

    def _require_stored(self, results: list[Result], operation: str) -> None:
        """Raise WriteError when no copy was stored; count (and log what is new
        about) a write that reached fewer copies than the redundancy."""
        stored = sum(result is Status.STORED for result in results)
        if not stored:
            raise WriteError(
                f"{operation}: no copy could be stored: "
                + "; ".join(str(result) for result in results)
            )
        if stored < self._cluster.redundancy:
            self._metrics.add("partial_writes")
            failed = [str(result) for result in results if result is not Status.STORED]
            # A server skipped as down was logged once, when it was marked down;
            # only a copy that was asked and failed is news.
            if failed:
                log.info(
                    "%s reached %d of %d copies: %s",
                    operation,
                    stored,
                    self._cluster.redundancy,
                    "; ".join(failed),
                )

    def _read_copies(
        self, key: bytes, targets: list[int], results: list[Result]
    ) -> dict[int, tuple[Record | None, bytes, int | None]]:
        """The copies servers answered with: (record or None, raw bytes, CAS
        token); a server that did not answer is left out. Raises
        NoServerAvailableError when no server answered."""
        copies: dict[int, tuple[Record | None, bytes, int | None]] = {}
        for index, result in zip(targets, results, strict=True):
            if not isinstance(result, Values):
                if isinstance(result, ErrorReply):
                    log.warning(
                        "memcached %s: %s %s",
                        self._cluster.servers[index].name,
                        result.kind,
                        result.message,
                    )
                continue
            if not result.items:
                copies[index] = (None, b"", None)
                continue
            item = result.items[0]
            try:
                record: Record | None = decode_record(item.value, item.flags)
            except ValueError as exc:
                self._metrics.add("corrupt_records")
                log.warning(
                    "corrupt record for %s on memcached %s, read as no session: %s",
                    _short(key),
                    self._cluster.servers[index].name,
                    exc,
                )
                record = None
            copies[index] = (record, item.value, item.cas)
        if not copies:
            raise NoServerAvailableError(
                "no copy of this session could be read: "
                + "; ".join(str(result) for result in results)
            )
        return copies

    def _decode_payload(self, key: bytes, record: Record) -> dict[str, Any] | None:
        serializer = SERIALIZERS.get(record.serializer_id)
        if serializer is None and record.serializer_id == self.serializer.id:
            serializer = self.serializer
        try:
            if serializer is None:
                raise ValueError(f"unknown serializer id {record.serializer_id}")
            return serializer.loads(record.payload)
        except ValueError as exc:
            log.warning("undecodable session data for %s, read as no session: %s", _short(key), exc)
            return None

    def _exptime(self, ttl: int | None) -> int:
        seconds = self.ttl if ttl is None else ttl
        if seconds <= 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {seconds}")
        if seconds > _MAX_RELATIVE_EXPTIME:
            return int(time.time()) + seconds
        return int(seconds)


def _guarded_write(key: bytes, raw: bytes, token: int | None, exptime: int) -> Command:
    # cas/add, never set: a write that lands between our read and the repair
    # is newer than what we read and must not be overwritten.
    if token is None:
        return protocol.add(key, raw, flags=FLAGS, exptime=exptime)
    return protocol.cas(key, raw, token, flags=FLAGS, exptime=exptime)


def _short(key: bytes) -> str:
    # Logs name a session by a few digest characters, never by its id.
    return key[-40:-32].decode("ascii", "replace") + "…"
