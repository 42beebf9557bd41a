"""SessionStore: session ids, versioned records and their serialization, and the
blocking driver that runs the plans (memsess.plans) through the cluster's fan-out.

What each operation asks and when its answer is conclusive is decided in memsess.plans,
sans-I/O, so an asyncio driver runs the very same plans.
"""

from __future__ import annotations

import logging
import random
import secrets
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Final, TypeVar

from memsess.cluster import Cluster, ServerStatus, check_straggler_window
from memsess.dsn import ServerSpec, parse_dsn, with_defaults
from memsess.errors import (
    SessionGoneError,
    SessionLockError,
)
from memsess.maintenance import Maintenance
from memsess.metrics import Metrics
from memsess.operations import ON_CONFLICT, Operations, exptime_of
from memsess.plans import LOCK_SUFFIX, Flow, Plans, Step
from memsess.protocol import MAX_KEY_LENGTH
from memsess.records import (
    DEFAULT_MAX_SESSION_SIZE,
    VersionClock,
    codec_id,
    lifetime_seconds,
    new_id,
    storage_key,
)
from memsess.rules import AllAnswers
from memsess.sealing import Sealer
from memsess.serializers import Serializer, get_serializer
from memsess.snapshots import Changes, Snapshot, check_snapshot

__all__ = [
    "DEFAULT_LOCK_LEASE",
    "DEFAULT_LOCK_WAIT",
    "DEFAULT_MAX_ITEM_SIZE",
    "DEFAULT_REDUNDANCY",
    "DEFAULT_TTL",
    "MAX_KEY_PREFIX",
    "ON_CONFLICT",
    "Changes",
    "SessionLock",
    "SessionStore",
    "Snapshot",
    "StoreCore",
]

log = logging.getLogger("memsess.store")

DEFAULT_TTL: Final = 1440  # seconds; PHP's session.gc_maxlifetime
DEFAULT_REDUNDANCY: Final = 2  # PHP's memcache.session_redundancy
DEFAULT_MAX_ITEM_SIZE: Final = 1024 * 1024  # memcached's default -I (1 MiB)
# memcached's -I takes 1k to 1024m (memcached.c: "Item max size cannot be less than 1024
# bytes" and "...cannot be larger than 1GB").
_MIN_ITEM_SIZE: Final = 1024
_MAX_ITEM_SIZE: Final = 1024 * 1024 * 1024
#: A session lock's lease (seconds): it ends by itself if its holder never releases it.
DEFAULT_LOCK_LEASE: Final = 10.0
#: How long (seconds) a request waits for a session's lock before SessionLockError.
DEFAULT_LOCK_WAIT: Final = 2.0
_LOCK_PAUSE: Final = 0.005  # seconds before the first retry of a lock; doubles each time
_LOCK_MAX_PAUSE: Final = 0.1
# Room memcached needs in an item besides the value: item header, key, suffix.
_ITEM_OVERHEAD: Final = 512
#: The longest key_prefix in bytes: memcached keys are at most 250 bytes, and a session's
#: lock key is the prefix, the id's digest and LOCK_SUFFIX (the marker key is shorter).
MAX_KEY_PREFIX: Final = MAX_KEY_LENGTH - len(storage_key(b"", new_id())) - len(LOCK_SUFFIX)

T = TypeVar("T")
S = TypeVar("S", bound="StoreCore")


class SessionLock:
    """A session's lock, taken by :meth:`acquire` (or ``with``), given back by
    :meth:`release`; ``token`` says who owns it."""

    def __init__(self, store: SessionStore, sid: str, *, lease: float, wait: float) -> None:
        self.store, self.sid, self.lease, self.wait = store, sid, lease, wait
        self.token = secrets.token_hex(16).encode("ascii")
        self.held = False

    def acquire(self) -> None:
        self.store._run(self.store._lock(self.sid, self.token, self.lease, self.wait))
        self.held = True

    def release(self) -> None:
        """Give the lock back, where it is still this owner's (a lease that ran out may
        have let another request take it: that one keeps it)."""
        if self.held:
            self.held = False
            self.store._run(self.store._unlock(self.sid, self.token))

    def __enter__(self) -> SessionLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _with_credentials(
    servers: Sequence[ServerSpec], username: str | None, password: str | None
) -> Sequence[ServerSpec]:
    """``servers``, with the store-wide credentials on those that have none of their own."""
    if username is None and password is None:
        return servers
    if username is None or password is None:
        raise ValueError("username and password go together: give both or neither")
    return [
        spec if spec.username is not None else replace(spec, username=username, password=password)
        for spec in servers
    ]


def _byte_count(value: object, name: str, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is a whole number of bytes of at least ``minimum`` (and at most
    ``maximum``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number of bytes, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum} bytes, not {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum} bytes, not {value}")
    return value


def _key_prefix_bytes(key_prefix: object) -> bytes:
    """The bytes that start every key of the store, from its ``key_prefix`` option (a str
    of printable ASCII, or bytes): TypeError or ValueError naming it and why not."""
    if not isinstance(key_prefix, (str, bytes)):
        raise TypeError(f"key_prefix must be a str (or bytes), not {type(key_prefix).__name__}")
    if not key_prefix.isascii():  # keys are ASCII end to end: the hash ring reads them as text
        raise ValueError(f"key_prefix {key_prefix!r} is not ASCII, as memcached keys are here")
    prefix = key_prefix.encode("ascii") if isinstance(key_prefix, str) else key_prefix
    for byte in prefix:
        if byte <= 0x20 or byte == 0x7F:  # protocol.check_key's rule, for every key
            what = "a space" if byte == 0x20 else "a control character"
            raise ValueError(
                f"key_prefix {key_prefix!r} holds {what} (byte 0x{byte:02x}), which no"
                " memcached key may hold: use e.g. '_' or ':' instead"
            )
    if len(prefix) > MAX_KEY_PREFIX:
        raise ValueError(
            f"key_prefix is {len(prefix)} bytes long: at most {MAX_KEY_PREFIX} leave room in"
            f" memcached's {MAX_KEY_LENGTH}-byte keys for the session's digest"
        )
    return prefix


def _check_servers(servers: object) -> Sequence[ServerSpec]:
    if isinstance(servers, (str, bytes)):
        raise TypeError(
            "servers is a sequence of ServerSpec; for a save_path string use"
            " from_dsn(save_path, ...)"
        )
    if not isinstance(servers, Sequence) or not all(
        isinstance(spec, ServerSpec) for spec in servers
    ):
        raise TypeError(
            "servers must be a sequence of memsess.ServerSpec (memsess.parse_dsn gives"
            f" one), not {type(servers).__name__}; or use from_dsn(save_path, ...)"
        )
    return servers


class StoreCore:
    """What the blocking :class:`SessionStore` and :class:`memsess.aio.AsyncSessionStore`
    share: the configuration, the cluster and its background thread, and every operation
    as a plan (a generator of steps, see memsess.plans) that either driver runs."""

    def __init__(
        self,
        servers: Sequence[ServerSpec],
        *,
        redundancy: int | None = None,
        ttl: float = DEFAULT_TTL,
        serializer: str | Serializer = "msgpack",
        key_prefix: str | bytes = "memsess:",
        straggler_window: float | None = None,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
        secret_keys: Sequence[str | bytes] | None = None,
        compress_threshold: int | None = None,
        compression: str = "zlib",
        max_session_size: int = DEFAULT_MAX_SESSION_SIZE,
        ssl_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float | None = None,
        retry_interval: float | None = None,
    ) -> None:
        """``redundancy``: copies of each session (default 2, or fewer when the
        DSN lists fewer servers). ``ttl``: seconds a session lives after its
        last save or touch (default 1440; a fraction is rounded up to whole
        seconds, memcached's unit). ``key_prefix``: what every memcached key of the
        store starts with (default "memsess:"; printable ASCII without spaces, at most
        MAX_KEY_PREFIX bytes), kept as given (a str stays a str). ``straggler_window``:
        seconds the copies still silent get once the others' answers are conclusive
        (default: adapted to each server's latency, see docs/consistency.md).
        ``max_item_size``: the servers' ``-I`` item size in bytes (default 1 MiB, as
        memcached's): a larger session is refused before anything is sent, and no reply
        may carry a longer value. Set it to the servers' ``-I`` when that is smaller.

        ``timeout`` and ``retry_interval``: seconds, for every server whose save_path
        entry does not set its own (default: PHP's, 1 and 15 s); see
        :func:`memsess.dsn.with_defaults`.

        ``secret_keys``: seal every record written (AES-256-GCM, see memsess.sealing)
        with the first of these keys (each a str of 32+ characters or 32+ bytes, e.g.
        from :func:`memsess.generate_key`); records sealed with any of them open, and
        nothing else reads as a session. Default None: records are plain, and a sealed
        one reads as no session. ``compress_threshold``: compress the serialized data
        of sessions larger than this many bytes (default None: never), with
        ``compression`` "zlib" (default) or "zstd" (the ``zstd`` extra); both are read
        whatever the option says. ``max_session_size``: the largest serialized session
        in bytes (default 16 MiB): a larger save raises SessionTooLargeError, and a
        compressed copy that expands past it reads as no session (a decompression bomb
        costs at most this much memory).

        ``ssl_context``: the client context for every ``tls://`` server, for what its
        DSN entry cannot say (default: built from the entry's ``tls_*`` parameters).
        ``username``/``password``: memcached ASCII authentication (``-Y``) for every
        server whose DSN entry has no ``user:password@`` of its own."""
        # Every option is checked here, before anything else is made: a bad value is an
        # error at start-up, never at the first request (or the first slow one).
        servers = _with_credentials(_check_servers(servers), username, password)
        servers = with_defaults(servers, timeout=timeout, retry_interval=retry_interval)
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            kind = type(ssl_context).__name__
            raise TypeError(f"ssl_context must be an ssl.SSLContext, not {kind}")
        if ssl_context is not None and not any(spec.tls for spec in servers):
            raise ValueError(
                "ssl_context is given but no server is reached over TLS: write tls://host:port"
            )
        if redundancy is None:
            redundancy = min(DEFAULT_REDUNDANCY, len(servers))
        if straggler_window is not None:
            straggler_window = check_straggler_window(straggler_window)
        seconds = lifetime_seconds(ttl)
        exptime_of(seconds)  # ValueError now for a lifetime that ends past 2038
        chosen = get_serializer(serializer)
        #: As given: a str stays a str. The hot path uses the bytes, encoded once.
        self.key_prefix = key_prefix
        self._prefix = _key_prefix_bytes(key_prefix)
        max_item_size = _byte_count(max_item_size, "max_item_size", _MIN_ITEM_SIZE, _MAX_ITEM_SIZE)
        # Sealing and compression are off by default: a memsess older than them reads a
        # sealed or compressed record as no session (a corrupt copy), so turning either
        # on is a deliberate rollout step, once every process that reads these servers
        # is new enough (see memsess.records).
        self._sealer = None if secret_keys is None else Sealer(secret_keys)
        if compress_threshold is not None:
            compress_threshold = _byte_count(compress_threshold, "compress_threshold", 0)
        codec = codec_id(compression)
        max_session_size = _byte_count(max_session_size, "max_session_size", 1)
        self._metrics = Metrics()
        self._clock = VersionClock()
        self._cluster = Cluster(
            servers,
            redundancy=redundancy,
            clock=self._clock,
            straggler_window=straggler_window,
            metrics=self._metrics,
            ssl_context=ssl_context,
            # No reply can carry more than an item holds: a longer value is refused
            # before it is buffered.
            max_value_size=max_item_size,
        )
        self._plans = Plans(
            self._cluster,
            self._metrics,
            key_prefix=self._prefix,
            sealer=self._sealer,
            exptime=self._exptime,
            # Lambdas: the maintenance is built next, and runs these very plans.
            missed=lambda key, servers: self._maintenance.hint(key, servers),  # noqa: PLW0108
            degraded=lambda: self._maintenance.wake(),  # noqa: PLW0108
        )
        self._ops = Operations(
            cluster=self._cluster,
            plans=self._plans,
            metrics=self._metrics,
            clock=self._clock,
            serializer=chosen,
            prefix=self._prefix,
            ttl=seconds,
            sealer=self._sealer,
            compress_threshold=compress_threshold,
            codec=codec,
            max_session_size=max_session_size,
            max_item_size=max_item_size,
            max_value_size=max_item_size - _ITEM_OVERHEAD - len(self._prefix),
        )
        # Probes and repairs run on a thread of their own with the blocking driver,
        # whichever driver the requests use: no request ever waits for them.
        self._maintenance = Maintenance(self._cluster, self._plans, self._ops.run)
        self._cluster.on_down = self._maintenance.wake
        if self._cluster.next_probe_at() is not None:  # a host that did not resolve
            self._maintenance.wake()
        self._shared_init()

    @classmethod
    def from_dsn(cls: type[S], dsn: str | Sequence[str], **options: Any) -> S:
        """A store for the servers of a PHP-style save_path, e.g.
        ``"tcp://10.0.0.1:11211?weight=2&timeout=0.5, unix:///run/memcached.sock"``, or
        of a list or tuple of such strings (``["10.0.0.1:11211", "10.0.0.2:11211"]``);
        ``options`` are the constructor's (``timeout=`` and ``retry_interval=`` apply to
        the entries without their own)."""
        return cls(parse_dsn(dsn), **options)

    @classmethod
    def from_store(cls: type[S], other: StoreCore) -> S:
        """A store of this kind sharing ``other``'s servers, settings, health table,
        counters and background thread: e.g. the async store of a process whose sync
        code uses ``other``. Connections are not shared (each driver has its own)."""
        store = cls.__new__(cls)
        store.__dict__.update(other.__dict__)
        store._shared_init()
        return store

    def _shared_init(self) -> None:
        """Set up what a store of this kind holds beyond the shared core (called by
        __init__ and by from_store)."""

    @property
    def redundancy(self) -> int:
        return self._cluster.redundancy

    # The settings the operations use, read-only: each request reads them from there.

    @property
    def ttl(self) -> int:
        """Seconds a session lives after its last save or touch."""
        return self._ops.ttl

    @property
    def serializer(self) -> Serializer:
        return self._ops.serializer

    @property
    def max_item_size(self) -> int:
        return self._ops.max_item_size

    @property
    def max_value_size(self) -> int:
        """The longest record that fits the servers' items: max_item_size less room."""
        return self._ops.max_value_size

    @property
    def compress_threshold(self) -> int | None:
        return self._ops.compress_threshold

    @property
    def max_session_size(self) -> int:
        return self._ops.max_session_size

    new_id = staticmethod(new_id)

    def storage_key(self, sid: str) -> bytes:
        """The memcached key of ``sid``'s copies (``key_prefix`` + a digest of the id):
        what ``memsess inspect`` shows, and what a test reads with a raw client."""
        return storage_key(self._prefix, sid)

    def locate(self, sid: str) -> tuple[str, ...]:
        """The addresses of the servers that hold (or would hold) the copies of
        ``sid``, in ring order, whether they are up or not."""
        key = storage_key(self._prefix, sid).decode("ascii")
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

    # -- the operations, as plans any driver runs (memsess.operations) ---------------

    def _fetch(self, sid: str, *, count: bool = True) -> Flow[Snapshot | None]:
        return self._ops.fetch(sid, count)

    def _load(self, sid: str) -> Flow[dict[str, Any] | None]:
        return self._ops.load(sid)

    def _save(
        self,
        sid: str,
        data: Mapping[str, Any],
        ttl: float | None,
        snapshot: Snapshot | None,
        on_conflict: str = "error",
    ) -> Flow[None]:
        return self._ops.save(sid, data, ttl, snapshot, on_conflict)

    def _touch(self, sid: str, ttl: float | None) -> Flow[bool]:
        return self._ops.touch(sid, ttl)

    def _delete(self, sid: str) -> Flow[None]:
        return self._ops.delete(sid)

    def _regenerate(
        self,
        sid: str,
        data: Mapping[str, Any] | None,
        ttl: float | None,
        snapshot: Snapshot | None,
    ) -> Flow[str]:
        check_snapshot(snapshot, sid)
        if snapshot is not None and (yield from self._fetch(sid)) is None:
            raise SessionGoneError("the session was logged out since it was loaded")
        if data is None:
            current = yield from self._fetch(sid)
            if current is None:
                raise SessionGoneError("no session to regenerate: absent, expired or logged out")
            data = current.data
        fresh = new_id()
        yield from self._save(fresh, data, ttl, None)
        yield from self._delete(sid)
        return fresh

    def _lock(self, sid: str, token: bytes, lease: float, wait: float) -> Flow[None]:
        key = storage_key(self._prefix, sid)
        seconds = lifetime_seconds(lease, name="lease")
        deadline = time.monotonic() + wait
        pause = _LOCK_PAUSE
        while not (yield from self._plans.acquire(key, token, seconds)):
            left = deadline - time.monotonic()
            if left <= 0:
                self._metrics.add("lock_timeouts")
                raise SessionLockError(
                    f"the session's lock is held by another request; not had within {wait:g} s"
                )
            nap = min(left, random.uniform(pause / 2, pause))
            yield Step([], AllAnswers(self._cluster, []), False, nap)
            pause = min(pause * 2, _LOCK_MAX_PAUSE)
        self._metrics.add("locks")

    def _unlock(self, sid: str, token: bytes) -> Flow[None]:
        yield from self._plans.release(storage_key(self._prefix, sid), token)

    def _run(self, flow: Flow[T]) -> T:
        """Run a plan with the blocking driver, in this thread (memsess.operations)."""
        return self._ops.run(flow)

    def _exptime(self, seconds: int | None) -> int:
        """memcached's exptime for a lifetime of whole ``seconds`` (default: the ttl)."""
        return exptime_of(self.ttl if seconds is None else seconds)


class SessionStore(StoreCore):
    """Sessions in a cluster of memcached servers, ``redundancy`` copies each.

    One store is shared by every thread of a process and survives a fork. Its
    operations block the calling thread; :class:`memsess.aio.AsyncSessionStore` is
    the same store for asyncio.
    """

    # -- the public API --------------------------------------------------------

    def load(self, sid: str) -> dict[str, Any] | None:
        """The session's data, or None when absent, expired, logged out or not
        a valid id (nothing is sent then). Raises NoServerAvailableError when
        no copy could be read."""
        ops = self._ops
        return ops.run(ops.load(sid))

    def fetch(self, sid: str) -> Snapshot | None:
        """Like :meth:`load`, with the version and CAS tokens for a conditional save."""
        ops = self._ops
        return ops.run(ops.fetch(sid))

    def save(
        self,
        sid: str,
        data: Mapping[str, Any],
        *,
        ttl: float | None = None,
        snapshot: Snapshot | None = None,
        on_conflict: str = "error",
    ) -> None:
        """Store ``data`` as the newest version on every live copy, in parallel,
        to live ``ttl`` seconds (default: the store's; rounded up to whole seconds).

        With the ``snapshot`` the data was loaded as, the save is conditional. A
        logout made since then wins: nothing is stored and SessionGoneError is
        raised. A save made elsewhere since then (another request of the same
        user) is a conflict, handled as ``on_conflict`` says: "error" (default)
        raises SessionConflictError, whose ``current`` is the session as it is
        now; "merge" applies the keys this save set or deleted (against the
        snapshot) on top of the current session and saves that, the later value
        winning for a key both changed; "overwrite" stores ``data`` over it (last
        writer wins). Raises SessionIdError for a malformed id,
        SessionTooLargeError for data over the item size and ValueError for a
        snapshot of another session (nothing is sent in each case), WriteError when
        no copy could be stored (each server's error named in it)."""
        ops = self._ops
        ops.run(ops.save(sid, data, ttl, snapshot, on_conflict))

    def touch(self, sid: str, *, ttl: float | None = None) -> bool:
        """Extend the lifetime of every copy to ``ttl`` seconds (default: the
        store's); True when the session exists, False when no copy exists, the
        session was logged out (as :meth:`load` would say) or the id is malformed.
        Each copy comes back with its touch (memcached's ``gat``), so a touch costs
        the session's bytes once more, in the same single round trip."""
        ops = self._ops
        return ops.run(ops.touch(sid, ttl))

    def delete(self, sid: str) -> None:
        """Log out: write a tombstone, newer than every copy, to every live copy,
        so a copy that missed the logout loses to it when its server returns. The
        tombstone lives as long as a session of the store's ttl."""
        ops = self._ops
        ops.run(ops.delete(sid))

    def regenerate(
        self,
        sid: str,
        data: Mapping[str, Any] | None = None,
        *,
        ttl: float | None = None,
        snapshot: Snapshot | None = None,
    ) -> str:
        """Move the session to a new id (against session fixation, e.g. at login):
        the same data (or ``data``) under a new id with ``ttl`` seconds to live,
        and the old id logged out. Raises SessionGoneError when there is no
        session to move and no data given, or when ``snapshot`` is given and
        the session was logged out since it was loaded."""
        return self._run(self._regenerate(sid, data, ttl, snapshot))

    def lock(
        self, sid: str, *, lease: float = DEFAULT_LOCK_LEASE, wait: float = DEFAULT_LOCK_WAIT
    ) -> SessionLock:
        """The session's lock, for requests that must not run at once
        (``with store.lock(sid): ...``): held by one owner at a time, for at most
        ``lease`` seconds (it ends by itself if its holder crashes), waited for at most
        ``wait`` seconds (then SessionLockError), released only by its owner. It lives
        on the session's replica set; under a server fault it is best effort, see
        docs/consistency.md. Saves stay conditional under it."""
        return SessionLock(self, sid, lease=lease, wait=wait)

    def close(self) -> None:
        """Close every idle connection and stop the background thread. The store can
        still be used afterwards (connections are reopened), which keeps close()
        safe in any order."""
        self._maintenance.close()
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
