"""What each operation asks the servers, what their answers mean, and what to repair.

Sans-I/O (httpx's ``auth_flow`` way): a plan is a generator that yields :class:`Step`
values — a batch of ``(server, command)`` and the rule (memsess.rules) that sees each
reply as it arrives and says when the answer is conclusive — and receives the results.
The blocking driver (:meth:`SessionStore._run`) and an asyncio driver run the same plans.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from time import monotonic
from typing import Final, NamedTuple, TypeVar

from memsess import protocol
from memsess.cluster import Cluster
from memsess.copies import SessionState, classify, open_copy
from memsess.errors import MemsessError, NoServerAvailableError, SessionGoneError
from memsess.metrics import Metrics
from memsess.protocol import Command, ErrorReply, ReplyKind, Status, Values
from memsess.records import FLAGS, Record
from memsess.rules import AllAnswers, Copy, ReadRule, WriteRule
from memsess.sealing import Sealer
from memsess.transport import Result, WaitRule

__all__ = ["LOCK_SUFFIX", "MARKER_SUFFIX", "Conflict", "Flow", "Found", "Plans", "Step", "short"]

log = logging.getLogger("memsess.store")

T = TypeVar("T")
_INF: Final = float("inf")
_RETRIEVAL: Final = ReplyKind.RETRIEVAL
_STORAGE: Final = ReplyKind.STORAGE
#: The marker key on every server is the store's key prefix plus this. Its value is the
#: decimal version below which copies on that server may predate a write it missed.
MARKER_SUFFIX: Final = b"missed-writes"
_CONFLICT_ROUNDS: Final = 3  # cas retries of one save against concurrent writers
_CONFLICTS: Final = frozenset({Status.EXISTS, Status.NOT_STORED, Status.NOT_FOUND})
#: A session's lock lives under its storage key plus this, on its replica set. Its value
#: is a random token, never sealed (secret_keys): whoever can write to memcached can
#: delete a lock as easily as plant one, so sealing would stop nothing. A lock keeps
#: well-behaved requests apart; a forged one only makes them wait (SessionLockError) or
#: run at once, and their saves stay conditional, versioned and sealed.
LOCK_SUFFIX: Final = b".lock"
# An exptime over 30 days is a Unix time; one in 1970 expires the item at once: what a
# release writes with cas (memcached's classic delete takes no cas token).
_EXPIRED_AT_ONCE: Final = 30 * 24 * 3600 + 1


# NamedTuples rather than frozen dataclasses: several are made per request, and a
# frozen dataclass's __init__ sets each field through object.__setattr__. On the paths
# every request takes they are made with tuple.__new__ (_new_tuple), every field given:
# a NamedTuple's own __new__ is a Python function, a frame of its own.


class Step(NamedTuple):
    """One batch to run at once, and the rule saying when it has heard enough; or, with
    ``pause`` (seconds) and no batch, a wait before the next step (a retry's jitter)."""

    batch: list[tuple[int, Command]]
    rule: WaitRule
    record: bool = True  # update the servers' health from the outcomes
    pause: float = 0.0


class Conflict(Exception):  # noqa: N818 - a signal between plans, never seen by callers
    """Raised by :meth:`Plans.save` with ``conflicts=True``: a copy holds a save made
    since the load. Nothing was written where it was found."""


_new_tuple: Final = tuple.__new__

#: A plan: yields the batches to send, receives each batch's results, returns its answer.
Flow = Generator[Step, list[Result], T]


class Found(NamedTuple):
    """What a read concluded: the newest record, and each answering server's cas token."""

    record: Record
    tokens: dict[int, int | None]


def guarded_write(key: bytes, raw: bytes, token: int | None, exptime: int) -> Command:
    """cas/add, never set: a write that lands between our read and this one is newer
    than what we read and must not be overwritten."""
    if token is None:
        return protocol.add(key, raw, flags=FLAGS, exptime=exptime)
    return protocol.cas(key, raw, token, flags=FLAGS, exptime=exptime)


class Plans:
    """The plans of one store. ``exptime(ttl)`` turns seconds into memcached's exptime;
    ``missed(key, servers)`` is told of copies a write could not store (for repair),
    ``degraded()`` of a request that found a server of its replica set down; ``sealer``
    opens the records read (None: the store seals none, see memsess.sealing).

    Records are moved only under their own key (a repair copies a copy's bytes as they
    are), which keeps a sealed record valid: sealing binds it to its key."""

    def __init__(
        self,
        cluster: Cluster,
        metrics: Metrics,
        *,
        key_prefix: bytes,
        exptime: Callable[[int | None], int],
        missed: Callable[[bytes, list[int]], None],
        degraded: Callable[[], None],
        sealer: Sealer | None = None,
    ) -> None:
        self.cluster = cluster
        self.sealer = sealer
        self.metrics = metrics
        self.marker = protocol.check_key(key_prefix + MARKER_SUFFIX)
        self._marker_suffix = b" " + self.marker + b"\r\n"
        self._exptime = exptime
        self._missed = missed
        self._degraded = degraded

    def targets(self, key: bytes) -> list[int]:
        try:
            targets = self.cluster.targets(key.decode("ascii"))
        except NoServerAvailableError:
            # Every copy's server is down: the probes must be running to bring one back
            # (the thread ends with close(), and only requests that need it start it).
            self._degraded()
            raise
        if len(targets) < self.cluster.redundancy:
            self.metrics.add("failovers")
            self._degraded()
        return targets

    # -- reads ------------------------------------------------------------------------

    def read(self, key: bytes, *, patient: bool = False) -> Flow[Found | None]:
        """The newest record of ``key`` (None: no copy holds one); copies found missing,
        corrupt or older are repaired (cas/add) before it returns. ``patient``: wait for
        every live copy, never ending early (a repair pass)."""
        targets = self.targets(key)
        # Built here rather than by protocol.get: the key is storage_key's (prefix and a
        # hex digest) and the marker was checked once, so no check per read.
        command = _new_tuple(Command, (b"gets " + key + b"\r\n", _RETRIEVAL))
        batch = [(index, command) for index in targets]
        # A server's marker is asked for along with the session once its last reading is
        # MARKER_MAX_AGE old: an extra key costs the server and the parser a little, and
        # a reply that is more often late for the poll.
        due = self.cluster.marker_due
        now = monotonic()
        asked = None
        for slot, index in enumerate(targets):
            if due[index] <= now:
                if asked is None:
                    asked = [False] * len(targets)
                asked[slot] = True
                batch[slot] = (index, Command(b"gets " + key + self._marker_suffix, _RETRIEVAL))
        rule = ReadRule(
            self.cluster, targets, key, marker_asked=asked, patient=patient, sealer=self.sealer
        )
        results = yield _new_tuple(Step, (batch, rule, True, 0.0))
        newest: Record | None = None
        newest_raw = b""
        tokens: dict[int, int | None] = {}
        lagging = False
        for slot, copy in enumerate(rule.copies):
            if copy is None:
                continue
            tokens[targets[slot]] = copy.cas
            record = copy.record
            if record is None:
                lagging = True  # missing or corrupt
            elif newest is None:
                newest, newest_raw = record, copy.raw
            elif record.version != newest.version:
                lagging = True
                if record.version > newest.version:
                    newest, newest_raw = record, copy.raw
        if len(tokens) < len(targets) or lagging:
            self._note_problems(key, targets, results, rule.copies)
        if newest is None:
            return None
        self.cluster.clock.observe(newest.version)
        if lagging:
            yield from self._repair(key, newest, newest_raw, targets, rule.copies)
        return _new_tuple(Found, (newest, tokens))

    def _note_problems(
        self, key: bytes, targets: list[int], results: list[Result], copies: list[Copy | None]
    ) -> None:
        """Log error replies and corrupt copies; NoServerAvailableError if none answered."""
        for index, copy, result in zip(targets, copies, results, strict=True):
            if isinstance(result, ErrorReply):
                self._log_error(index, result)
            elif copy is not None and copy.problem:
                self._log_corrupt(key, index, copy.problem)
        if all(copy is None for copy in copies):
            raise NoServerAvailableError(
                "no copy of this session could be read: "
                + "; ".join(str(result) for result in self._named(targets, results))
            )

    def _repair(
        self,
        key: bytes,
        newest: Record,
        raw: bytes,
        targets: list[int],
        copies: list[Copy | None],
    ) -> Flow[None]:
        lagging = {  # server index -> (why its copy is rewritten, its cas token)
            index: (why.value, c.cas)
            for index, c in zip(targets, copies, strict=True)
            if c is not None and (why := c.status(newest.version)).repaired
        }
        servers = self.cluster.servers
        log.info(
            "repairing %s: %s",
            short(key),
            ", ".join(f"{why} on memcached {servers[i].name}" for i, (why, _) in lagging.items()),
        )
        self.metrics.add("repairs", len(lagging))
        exptime = self._exptime(newest.ttl or None)  # 0: a format 1 record
        batch = [(i, guarded_write(key, raw, cas, exptime)) for i, (_, cas) in lagging.items()]
        yield Step(batch, WriteRule(self.cluster, list(lagging)))

    def _log_error(self, index: int, reply: ErrorReply) -> None:
        log.warning(
            "memcached %s: %s %s", self.cluster.servers[index].name, reply.kind, reply.message
        )

    def _log_corrupt(self, key: bytes, index: int, problem: str) -> None:
        self.metrics.add("corrupt_records")
        log.warning(
            "corrupt record for %s on memcached %s, read as no session: %s",
            short(key),
            self.cluster.servers[index].name,
            problem,
        )

    # -- writes -----------------------------------------------------------------------

    def write(
        self, key: bytes, command: Command, *, ok: Status = Status.STORED
    ) -> Flow[list[Result]]:
        """``command`` (a set, a touch) to every live copy; returns each server's result,
        an error reply as the ServerError naming its server. A copy that did not answer
        ``ok`` is handed to ``missed`` for repair."""
        targets = self.targets(key)
        results = yield Step([(i, command) for i in targets], WriteRule(self.cluster, targets))
        self._note_missed(key, targets, results, ok=ok)
        return self._named(targets, results)

    def touch(self, key: bytes, exptime: int) -> Flow[bool]:
        """Give every live copy of ``key`` the lifetime ``exptime`` (memcached's) with
        ``gat``, which returns each copy as it touches it. True when the newest copy that
        came back holds a session; False when none came back or the newest is a logout's
        tombstone (touched too, which only keeps the logout longer). A server older than
        memcached 1.5.3 (no gat) gets a plain touch, which cannot tell a logout: a copy it
        touched counts as a session when no other copy says otherwise."""
        targets = self.targets(key)
        command = protocol.gat(key, exptime)
        results = yield Step([(i, command) for i in targets], WriteRule(self.cluster, targets))
        copies = []
        touched = []
        without_gat = []
        for index, result in zip(targets, results, strict=True):
            copy = None
            if result.__class__ is Values:
                item = result.items[0] if result.items else None
                if item is not None:
                    touched.append(index)
                    copy = open_copy(item.value, item.flags, item.cas, key, self.sealer)
                else:
                    copy = open_copy(None, 0, None, key, self.sealer)
            elif isinstance(result, ErrorReply) and result.kind == "ERROR":  # unknown command
                without_gat.append(index)
            copies.append(copy)
        blind = []  # touched without being read
        if without_gat:
            plain = protocol.touch(key, exptime)
            step = Step([(i, plain) for i in without_gat], WriteRule(self.cluster, without_gat))
            answers = yield step
            blind = [i for i, r in zip(without_gat, answers, strict=True) if r is Status.TOUCHED]
        self._hint_missed(key, touched + blind)
        state = classify(copies).state
        return state is SessionState.LIVE or (state is SessionState.ABSENT and bool(blind))

    def save(
        self,
        key: bytes,
        record: bytes,
        version: int,
        exptime: int,
        *,
        since: tuple[int, dict[int, int | None]] | None = None,
        conflicts: bool = False,
    ) -> Flow[list[Result]]:
        """Store ``record`` (of ``version``) on every live copy. With ``since`` (the
        version and cas tokens the session was loaded with) each copy is written only
        if unchanged since (cas/add): a copy changed meanwhile is read again, a newer
        logout found there wins (SessionGoneError), and a save made since the load
        raises :class:`Conflict` with ``conflicts``, else is overwritten."""
        targets = self.targets(key)
        if since is None:  # self.write, inlined: one generator less per save
            # protocol.set's checks, done once upstream: the key is storage_key's, the
            # exptime the store's (_exptime bounds it), the record under the item size.
            data = b"set %b %d %d %d\r\n%b\r\n" % (key, FLAGS, exptime, len(record), record)
            command = _new_tuple(Command, (data, _STORAGE))
            batch = [(i, command) for i in targets]
            results = yield _new_tuple(Step, (batch, WriteRule(self.cluster, targets), True, 0.0))
            self._note_missed(key, targets, results, ok=Status.STORED)
            return self._named(targets, results)
        loaded_version, tokens = since
        raise_on_save = conflicts
        batch = [(i, guarded_write(key, record, tokens.get(i), exptime)) for i in targets]
        results = yield Step(batch, WriteRule(self.cluster, targets))
        outcome = dict(zip(targets, results, strict=True))
        for _ in range(_CONFLICT_ROUNDS):
            changed = [i for i, result in outcome.items() if result in _CONFLICTS]
            if not changed:
                break
            rewritten = yield from self._resolve(
                key,
                record,
                version,
                exptime=exptime,
                loaded=loaded_version,
                conflicts=changed,
                raise_on_save=raise_on_save,
            )
            outcome.update(rewritten)
        final = [outcome[i] for i in targets]
        self._note_missed(key, targets, final, ok=Status.STORED)
        return self._named(targets, final)

    def _resolve(
        self,
        key: bytes,
        record: bytes,
        version: int,
        *,
        exptime: int,
        loaded: int,
        conflicts: list[int],
        raise_on_save: bool,
    ) -> Generator[Step, list[Result], dict[int, Result]]:
        """Copies that changed since the load: read them again with ``gets`` and write
        with ``cas`` on what was just read, so a logout landing in between still wins
        (and, with ``raise_on_save``, a save made since the load raises Conflict)."""
        command = protocol.get(key, cas=True)
        rule = ReadRule(self.cluster, conflicts, key, sealer=self.sealer)
        yield Step([(i, command) for i in conflicts], rule)
        logged_out = [
            copy
            for copy in rule.copies
            if copy is not None
            and copy.record is not None
            and copy.record.is_tombstone
            and copy.record.version > loaded
        ]
        if logged_out:
            raise SessionGoneError("the session was logged out since it was loaded; not saved")
        if raise_on_save and any(
            copy is not None and copy.record is not None and loaded < copy.record.version != version
            for copy in rule.copies
        ):
            raise Conflict
        outcome: dict[int, Result] = {}
        batch = []
        for index, copy in zip(conflicts, rule.copies, strict=True):
            if copy is None:
                continue  # unreadable now: left as it was, repaired by a later read
            if copy.record is not None and copy.record.version > version:
                outcome[index] = Status.STORED  # superseded by a newer save: it stands
                continue
            batch.append((index, guarded_write(key, record, copy.cas, exptime)))
        if batch:
            results = yield Step(batch, WriteRule(self.cluster, [i for i, _ in batch]))
            outcome.update(zip((i for i, _ in batch), results, strict=True))
        return outcome

    def _named(self, targets: list[int], results: list[Result]) -> list[Result]:
        """``results``, each error reply (a server's SERVER_ERROR...) as the ServerError
        naming its server: what a caller reports when a write fails."""
        for result in results:
            if result.__class__ is ErrorReply:
                break
        else:
            return results  # the common case: no error reply
        servers = self.cluster.servers
        return [
            result.to_exception(server=servers[index].name)
            if isinstance(result, ErrorReply)
            else result
            for index, result in zip(targets, results, strict=True)
        ]

    def _note_missed(
        self, key: bytes, targets: list[int], results: list[Result], *, ok: Status
    ) -> None:
        self._hint_missed(
            key, [i for i, result in zip(targets, results, strict=True) if result is ok]
        )

    def _hint_missed(self, key: bytes, done: list[int]) -> None:
        """Hand the copies of ``key``'s replica set not in ``done`` to ``missed``, for
        repair, when at least one copy was done (there is something to copy)."""
        if len(done) == self.cluster.redundancy:
            return  # every copy done: the common case
        members = self.cluster.replica_set(key.decode("ascii"))
        missed = [i for i in members if i not in done]
        if missed and done:
            self._missed(key, missed)

    # -- locks ------------------------------------------------------------------------

    def acquire(self, key: bytes, token: bytes, lease: int) -> Flow[bool]:
        """One try at ``key``'s lock: ``add`` of ``token`` (living ``lease`` seconds) on
        every live copy. True when every copy that answered took it; when another holds
        it on any, the copies this try took are released and it is False. A copy that
        failed or was cut off decides nothing (its server is faulty: best effort)."""
        targets = self.targets(key)
        command = protocol.add(key + LOCK_SUFFIX, token, exptime=lease)
        results = yield Step([(i, command) for i in targets], WriteRule(self.cluster, targets))
        taken = [i for i, result in zip(targets, results, strict=True) if result is Status.STORED]
        held = any(result is Status.NOT_STORED for result in results)
        if taken and not held:
            return True
        if not taken and not held:
            raise NoServerAvailableError(
                "no server of this session's replica set could take its lock: "
                + "; ".join(str(result) for result in self._named(targets, results))
            )
        if taken:
            yield from self.release(key, token, taken)
        return False

    def release(self, key: bytes, token: bytes, servers: list[int] | None = None) -> Flow[None]:
        """Release ``key``'s lock where it is still ``token``'s: read it with ``gets`` and
        expire it with ``cas``, never a blind delete, so a lock that expired and was
        taken by another request meanwhile stays that request's."""
        targets = self.targets(key) if servers is None else servers
        lock_key = key + LOCK_SUFFIX
        read = protocol.get(lock_key, cas=True)
        results = yield Step([(i, read) for i in targets], WriteRule(self.cluster, targets))
        batch = [
            (i, protocol.cas(lock_key, b"", result.items[0].cas or 0, exptime=_EXPIRED_AT_ONCE))
            for i, result in zip(targets, results, strict=True)
            if isinstance(result, Values) and result.items and result.items[0].value == token
        ]
        if batch:
            yield Step(batch, WriteRule(self.cluster, [i for i, _ in batch]))

    # -- markers ----------------------------------------------------------------------

    def mark(self, index: int, version: int) -> Flow[Result]:
        """Record on server ``index`` that copies older than ``version`` may predate a
        write it missed (raise its marker, never lower it). Returns the last outcome."""
        marker = self.marker
        result: Result = Status.NOT_STORED
        for _ in range(_CONFLICT_ROUNDS):
            (result,) = yield Step(
                [(index, protocol.get(marker, cas=True))], AllAnswers(self.cluster, [index]), False
            )
            if not isinstance(result, Values):
                return result
            current = result.items[0] if result.items else None
            if current is not None and current.value.isdigit() and int(current.value) >= version:
                return Status.STORED
            value = b"%d" % version
            command = (
                protocol.add(marker, value)
                if current is None
                else protocol.cas(marker, value, current.cas or 0)
            )
            (result,) = yield Step([(index, command)], AllAnswers(self.cluster, [index]), False)
            if result is Status.STORED or isinstance(result, MemsessError):
                return result
        return result


def short(key: bytes) -> str:
    """A session named in logs: a few digest characters, never its id."""
    return key[-40:-32].decode("ascii", "replace") + "…"
