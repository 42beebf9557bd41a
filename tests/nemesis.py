"""A nemesis and history checker for memsess (Jepsen's, scaled down): random
single-server faults under two processes of session traffic, every answer checked.

Traffic. Two processes, this one ("A") and a spawned one ("B"), run worker
threads on one store per process. Sessions travel as tokens (slot, id, expected
state, write count, the session's recent history) through multiprocessing
queues, so a session has one owner at a time and its expected state is exact:
the holder loads and checks it, saves a new value or logs out, then hands the
token on, half the time to the other process, whose store may not have seen the
fault that hit the session's copies meanwhile. A logged-out session is only
loaded (expecting None) for a while, then its slot logs in as a new session.

Checker. A load must return the last acknowledged write, or a write that raised
(it may have landed); after an acknowledged logout, None forever. Anything else
is a wrong answer: lost (None instead of data), stale (an older value),
resurrected (data after a logout) or phantom (a value never written to that
session or never acknowledged). Any exception from the store is an error: with
one server faulty at a time there must be none.

Nemesis. One server is faulty at a time and each fault is healed before the next:
a stall (SIGSTOP, SIGCONT 10-300 ms later), a 2 s hang, a kill (started again
0.1-1 s later), a restart with an empty cache, a flush. A healed server may still
lack copies (it came back empty, or missed writes), so a fault on a different
server next would really be a double fault. Before the next fault hits a
different server the nemesis therefore runs a repair sweep: it waits until every
process's store sees every server usable again and every worker has finished
the operation it was in (no write that skipped the healed server is still in
flight), then loads, through a fresh store of its own, every current session
with a copy on a server faulted since the last sweep, which makes memsess
rewrite the missing and stale copies. Faults on the same server in a row need
no sweep: the other servers still hold every acknowledged copy. Session ids are
written to shared memory (one slot per token) before their first save, so the
sweep knows every session without a message.

History (tests/nemesis_history.py: the checker, the tally and the report). Every
operation is recorded as (op, session, expected, got, start, end,
process/thread, verdict); times are the system-wide monotonic clock, comparable
across processes. A token carries its session's last operations; each wrong
answer or error keeps a copy of them, and the report shows the faults around it.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import queue
import random
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial, reduce
from typing import Any, Final, NamedTuple, TypeVar

from blocking_async import store_for
from nemesis_history import (
    ABSENT,
    ERROR,
    FAULT_WEIGHTS,
    LOGGED_OUT,
    OK,
    REPORTS,
    Event,
    HarnessError,
    Op,
    Report,
    Tally,
    Token,
    describe,
    expectation,
    judge,
    shown,
    value_of,
)

from memsess import SessionStore
from memsess.testing import LocalCluster

SID_LENGTH: Final = 43  # characters of a memsess session id
P_LOAD, P_LOGOUT, P_HANDOFF = 0.5, 0.015, 0.5  # per operation / per turn
# Turns a logged-out session is still loaded (expecting None) before its slot moves on.
CHECKS_AFTER_LOGOUT: Final = 16
IDLE_WAIT: Final = 0.05  # seconds a worker waits for a token before counting itself idle
QUIESCE_TIMEOUT: Final = 10.0  # seconds for every store to see a healed server usable again
REPLY_TIMEOUT: Final = 60.0  # seconds process B has to start, answer or stop (spawn under load)
USABLE: Final = frozenset({"up", "suspect"})  # health states a request still goes to
SWEEPERS: Final = 4  # threads of a repair sweep or the final check
T = TypeVar("T")


class Progress:
    """Operations finished per worker thread, and a wait for all of them to move on."""

    def __init__(self, threads: int) -> None:
        self.done = [0] * threads
        self._changed = threading.Condition()
        self._waiters = 0

    def advance(self, index: int) -> None:
        self.done[index] += 1  # one writer per slot
        if self._waiters:
            with self._changed:
                self._changed.notify_all()

    def wait_quiet(self, healthy: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``healthy()`` holds, then until every worker has finished the
        operation it was in at that moment (an idle worker counts its wait). Both
        are checked again whenever a worker finishes an operation."""
        baseline: list[int] = []

        def settled() -> bool:
            if not baseline:
                if not healthy():
                    return False
                baseline.extend(self.done)
            return all(now > then for now, then in zip(self.done, baseline, strict=True))

        with self._changed:
            self._waiters += 1
            try:
                return self._changed.wait_for(settled, timeout)
            finally:
                self._waiters -= 1


def read_sids(table: Any, slots: int) -> list[str]:
    raw = bytes(table[: slots * SID_LENGTH]).decode("ascii")
    return [raw[i * SID_LENGTH : (i + 1) * SID_LENGTH] for i in range(slots)]


def publish_sid(table: Any, token: Token) -> None:
    table[token.slot * SID_LENGTH : (token.slot + 1) * SID_LENGTH] = token.sid.encode("ascii")


@dataclass(frozen=True)
class NemesisConfig:
    seconds: float = 10.0  # of faults (a hang in progress finishes)
    threads: int = 8  # per process; two processes
    sessions: int = 1024  # tokens in circulation
    burners: int = 0  # CPU-burning processes beside the run
    min_faults: int = 5
    seed: int = field(default_factory=lambda: random.randrange(1 << 32))
    timeout: float = 0.5  # the DSN's, seconds
    retry_interval: float = 0.3
    store_options: dict[str, Any] = field(default_factory=dict)  # e.g. straggler_window
    # The store of process A and of process B: "sync" (SessionStore) or "async" (an
    # AsyncSessionStore, each worker thread driving it on its own event loop).
    drivers: tuple[str, str] = ("sync", "sync")

    @property
    def lifetime(self) -> float:
        """Seconds after which helper processes give up on their own."""
        return 3 * self.seconds + 2 * REPLY_TIMEOUT

    def open_store(self, dsn: str, driver: str = "sync") -> SessionStore:
        return store_for(driver, dsn, redundancy=2, **self.store_options)


class Client:
    """Checked, recorded operations on sessions through one store."""

    def __init__(
        self, store: SessionStore, who: str, tally: Tally, after: Callable[[], None] = lambda: None
    ) -> None:
        self.store, self.who, self.tally, self.after = store, who, tally, after

    def load(self, token: Token, op: str = "load") -> None:
        expected, start = expectation(token), time.monotonic()
        ok, got = attempt(lambda: self.store.load(token.sid))
        verdict, got = (judge(token, got), shown(got, token)) if ok else (ERROR, got)
        self._note(
            Op(op, token.sid, expected, got, start, time.monotonic(), self.who, verdict), token
        )

    def save(self, token: Token) -> None:
        token.writes += 1
        n = token.writes
        self._write(token, "save", n, lambda: self.store.save(token.sid, value_of(token, n)))

    def logout(self, token: Token) -> None:
        token.checks_after_logout = 0
        self._write(token, "logout", LOGGED_OUT, lambda: self.store.delete(token.sid))

    def log_in_anew(self, token: Token, table: Any) -> None:
        """The slot moves on to a new session, published before its first save."""
        token.sid, token.state, token.maybe, token.writes = self.store.new_id(), ABSENT, (), 0
        token.tail.clear()
        publish_sid(table, token)
        self.tally.relogins += 1
        self.save(token)

    def sweep(self, sid: str) -> None:
        """A load for its read repair alone: owners may be writing meanwhile."""
        start = time.monotonic()
        ok, got = attempt(lambda: self.store.load(sid))
        verdict, got = (OK, "-") if ok else (ERROR, got)
        self._note(Op("sweep", sid, "any", got, start, time.monotonic(), self.who, verdict))

    def _write(self, token: Token, op: str, state: int, action: Callable[[], None]) -> None:
        start = time.monotonic()
        ok, got = attempt(action)
        if ok:
            token.state, token.maybe, got = state, (), "stored"
        else:
            token.maybe += (state,)  # it may still land
        verdict = OK if ok else ERROR
        self._note(
            Op(op, token.sid, describe(state), got, start, time.monotonic(), self.who, verdict),
            token,
        )

    def _note(self, op: Op, token: Token | None = None) -> None:
        self.tally.note(op, token)
        self.after()


def attempt(action: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, what ``action`` returned), or (False, the exception it raised, as text)."""
    try:
        return True, action()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"[:300]


def take_turn(client: Client, token: Token, rng: random.Random, table: Any) -> None:
    """A few operations on a session by its current owner."""
    if token.state == LOGGED_OUT:
        client.load(token)
        token.checks_after_logout += 1
        if token.checks_after_logout >= CHECKS_AFTER_LOGOUT:
            client.log_in_anew(token, table)
        return
    for _ in range(rng.randint(1, 4)):
        draw = rng.random()
        if draw < P_LOAD:
            client.load(token)
        elif draw < 1 - P_LOGOUT:
            client.save(token)
        else:
            client.logout(token)
            return


class Links(NamedTuple):
    """What one process's workers share with the rest: queues and the id table."""

    inbox: Any  # multiprocessing queue of this process's tokens
    outbox: Any  # the other process's inbox
    table: Any  # shared memory: the current session id of every slot


class Party:
    """One process's workers: ``threads`` threads sharing ``store``, taking tokens
    from their inbox and handing each on to it or to the other process's."""

    def __init__(
        self, name: str, store: SessionStore, links: Links, *, threads: int, seed: int
    ) -> None:
        self.name, self.store, self.links = name, store, links
        self.progress = Progress(threads)
        self.tallies = [Tally() for _ in range(threads)]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._work, args=(i, seed), name=f"nemesis-{name}{i}", daemon=True
            )
            for i in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the workers; each puts the token it holds back in its inbox."""
        self._stop.set()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout=REPLY_TIMEOUT)
            if thread.is_alive():
                raise HarnessError(f"worker {thread.name} did not stop")

    def quiesce(self, timeout: float = QUIESCE_TIMEOUT) -> str | None:
        """None once this store sees every server usable and every worker has moved
        on; else what is wrong after ``timeout`` seconds."""

        def healthy() -> bool:
            return all(status.state in USABLE for status in self.store.health())

        if self.progress.wait_quiet(healthy, timeout):
            return None
        states = ", ".join(f"{s.address} {s.state} ({s.reason})" for s in self.store.health())
        return f"NotRecovered: process {self.name}'s store {timeout:g} s after the heal: {states}"

    def summary(self) -> Tally:
        total = Tally(stats={self.name: self.store.stats()})
        for tally in self.tallies:
            total.add(tally)
        return total

    def _work(self, index: int, seed: int) -> None:
        inbox, outbox, table = self.links
        rng, tally = random.Random(f"{seed}/{self.name}/{index}"), self.tallies[index]
        client = Client(self.store, f"{self.name}/{index}", tally)
        client.after = partial(self.progress.advance, index)
        while not self._stop.is_set():
            try:
                token = inbox.get(timeout=IDLE_WAIT)
            except queue.Empty:
                self.progress.advance(index)
                continue
            onward = inbox
            try:
                take_turn(client, token, rng, table)
                if rng.random() < P_HANDOFF and not self._stop.is_set():
                    onward = outbox
                    tally.handoffs += 1
            except Exception:  # a harness bug: keep the token, report the traceback
                if len(tally.harness_errors) < 5:
                    tally.harness_errors.append(f"{client.who}: {traceback.format_exc()}")
            finally:
                onward.put(token)  # the last touch: the queue pickles it later


# -- process B ---------------------------------------------------------------------


def child_main(config: NemesisConfig, dsn: str, links: Links, control: Any, replies: Any) -> None:
    """Process B (started with "spawn"): run a party until told to stop; answer
    each (kind, seq) request on ``control`` with (kind, seq, payload) on ``replies``."""
    # Warnings are expected during faults (a server marked down) and would flood a soak's
    # output; the report carries the store's counters and every error.
    logging.basicConfig(format="process B: %(levelname)s %(name)s: %(message)s", level="ERROR")
    try:
        store = config.open_store(dsn, config.drivers[1])
        party = Party("B", store, links, threads=config.threads, seed=config.seed)
        party.start()
        replies.put(("start", 0, None))
        parent, deadline = os.getppid(), time.monotonic() + config.lifetime
        while time.monotonic() < deadline and os.getppid() == parent:
            try:
                kind, seq = control.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind == "quiesce":
                replies.put((kind, seq, party.quiesce()))
            elif kind == "stop":
                party.stop()
                replies.put((kind, seq, party.summary()))
                return
        party.stop()
    except BaseException:
        replies.put(("fatal", 0, traceback.format_exc()))
        raise


class ChildLink:
    """Requests to process B and the wait for its answers, noticing if it dies."""

    def __init__(self, process: Any, control: Any, replies: Any) -> None:
        self.process, self.control, self.replies = process, control, replies
        self._seq = 0

    def send(self, kind: str) -> int:
        self._seq += 1
        self.control.put((kind, self._seq))
        return self._seq

    def expect(self, kind: str, seq: int, timeout: float = REPLY_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got_kind, got_seq, payload = self.replies.get(timeout=0.2)
            except queue.Empty:
                if not self.process.is_alive():
                    raise HarnessError(
                        f"process B exited ({self.process.exitcode}) before answering {kind!r}"
                    ) from None
                if time.monotonic() > deadline:
                    raise HarnessError(
                        f"process B did not answer {kind!r} in {timeout:g} s"
                    ) from None
                continue
            if got_kind == "fatal":
                raise HarnessError(f"process B failed:\n{payload}")
            if (got_kind, got_seq) == (kind, seq):
                return payload


# -- the nemesis -------------------------------------------------------------------


class Nemesis:
    """Faults one server at a time on ``cluster``, with repair sweeps between servers."""

    def __init__(
        self, cluster: LocalCluster, dsn: str, config: NemesisConfig, party: Party, link: ChildLink
    ) -> None:
        self.cluster, self.dsn, self.config = cluster, dsn, config
        self.party, self.link = party, link
        self.rng = random.Random(config.seed)
        self.events: list[Event] = []
        self.swept = 0  # events before the last sweep
        self.tally = Tally()

    def faults(self) -> int:
        return sum(event.kind != "sweep" for event in self.events)

    def run(self) -> None:
        """Fault for ``seconds``, and on until ``min_faults`` (at most ``seconds`` more)."""
        seconds, min_faults, start = self.config.seconds, self.config.min_faults, time.monotonic()
        last: int | None = None
        while time.monotonic() < start + seconds or (
            self.faults() < min_faults and time.monotonic() < start + 2 * seconds
        ):
            server = self.rng.randrange(len(self.cluster.servers))
            kind = self.rng.choices(list(FAULT_WEIGHTS), weights=list(FAULT_WEIGHTS.values()))[0]
            if last is not None and server != last:
                self.sweep()
            self.inflict(kind, server)
            last = server
            time.sleep(self.rng.uniform(0.05, 0.4))  # traffic between faults: pacing, not a sync

    def inflict(self, kind: str, server: int) -> None:
        cluster, start = self.cluster, time.monotonic()
        try:
            if kind in ("stall", "hang"):
                cluster.hang(server)
                time.sleep(self.rng.uniform(0.01, 0.3) if kind == "stall" else 2.0)
            elif kind == "kill":
                cluster.kill(server)
                time.sleep(self.rng.uniform(0.1, 1.0))
            elif kind == "restart-empty":
                cluster.restart(server)
            else:
                cluster.flush(server)
        finally:
            if cluster.servers[server].hung:
                cluster.resume(server)
            if not cluster.servers[server].running:
                cluster.start_server(server)
            self.events.append(Event(kind, server, start, time.monotonic()))

    def sweep(self) -> None:
        """Wait for every store to see every server usable and every worker to move
        on, then load every current session with a copy on a server faulted since
        the last sweep through a fresh store (read repair)."""
        start = time.monotonic()
        seq = self.link.send("quiesce")
        for problem in (self.party.quiesce(), self.link.expect("quiesce", seq)):
            if problem is not None:
                when = (start, time.monotonic())
                self.tally.note(Op("quiesce", "-", "all usable", problem, *when, "nemesis", ERROR))
        faulted = {event.server for event in self.events[self.swept :]}
        by_address = {server.address: server.index for server in self.cluster.servers}
        sids = [
            sid
            for sid in read_sids(self.party.links.table, self.config.sessions)
            if faulted.intersection(by_address[a] for a in self.party.store.locate(sid))
        ]
        self.tally.add(self.load_all(sids, Client.sweep))
        self.events.append(Event("sweep", -1, start, time.monotonic()))
        self.swept = len(self.events)

    def load_all(self, items: Sequence[T], load: Callable[[Client, T], None]) -> Tally:
        """``load(client, item)`` for every item, from SWEEPERS threads sharing one
        fresh store: its health sees every server up."""
        tallies = [Tally() for _ in range(SWEEPERS)]

        def share(index: int) -> None:
            client = Client(store, "nemesis", tallies[index])
            for item in items[index::SWEEPERS]:
                load(client, item)

        with self.config.open_store(self.dsn) as store, ThreadPoolExecutor(SWEEPERS) as pool:
            list(pool.map(share, range(SWEEPERS)))
        return reduce(Tally.add, tallies, Tally())


# -- the run and its report --------------------------------------------------------


@contextmanager
def cpu_burners(count: int, lifetime: float) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` processes spinning a CPU each; killed on exit, and each stops by
    itself after ``lifetime`` seconds or once this process is gone."""
    code = (
        f"import os, time\nend = time.monotonic() + {lifetime}\n"
        f"while time.monotonic() < end and os.getppid() == {os.getpid()}:\n    pass\n"
    )
    burners: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            burners.append(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL))
        yield burners
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait(timeout=REPLY_TIMEOUT)


def seed_sessions(store: SessionStore, table: Any, count: int, inboxes: Sequence[Any]) -> None:
    for slot in range(count):
        token = Token(slot, store.new_id())
        publish_sid(table, token)
        token.writes = token.state = 1
        start = time.monotonic()
        store.save(token.sid, value_of(token, 1))
        token.tail.append(
            Op("save", token.sid, "n=1", "stored", start, time.monotonic(), "seed", OK)
        )
        inboxes[slot % len(inboxes)].put(token)


def collect_tokens(
    inboxes: Sequence[Any], count: int, timeout: float = REPLY_TIMEOUT
) -> list[Token]:
    """Every token back from the inboxes once all workers have stopped."""
    tokens: list[Token] = []
    deadline = time.monotonic() + timeout
    while len(tokens) < count and time.monotonic() < deadline:
        for inbox in inboxes:  # drain each until it has been silent for a moment
            try:
                while len(tokens) < count:
                    tokens.append(inbox.get(timeout=0.05))
            except queue.Empty:
                continue
    slots = sorted(token.slot for token in tokens)
    if slots != list(range(count)):
        raise HarnessError(f"tokens lost or duplicated: {len(tokens)} of {count} came back")
    return tokens


def run(cluster: LocalCluster, config: NemesisConfig) -> Report:
    """One nemesis run on ``cluster`` (3 servers); the report is also kept in REPORTS."""
    spawn = multiprocessing.get_context("spawn")  # never fork a process that has threads
    dsn = cluster.dsn(timeout=config.timeout, retry_interval=config.retry_interval)
    inbox_a, inbox_b, control, replies = channels = [spawn.Queue() for _ in range(4)]
    table = spawn.RawArray(ctypes.c_char, config.sessions * SID_LENGTH)
    links_b = Links(inbox_b, inbox_a, table)
    child = spawn.Process(
        target=child_main,
        args=(config, dsn, links_b, control, replies),
        name="nemesis-B",
        daemon=True,
    )
    store = config.open_store(dsn, config.drivers[0])
    party = Party(
        "A", store, Links(inbox_a, inbox_b, table), threads=config.threads, seed=config.seed
    )
    link = ChildLink(child, control, replies)
    nemesis = Nemesis(cluster, dsn, config, party, link)
    try:
        with cpu_burners(config.burners, config.lifetime):
            child.start()
            seed_sessions(store, table, config.sessions, (inbox_a, inbox_b))
            link.expect("start", 0)
            party.start()
            began = time.monotonic()
            nemesis.run()
            stopping = link.send("stop")
            party.stop()
            tally = party.summary().add(link.expect("stop", stopping)).add(nemesis.tally)
            tokens = collect_tokens((inbox_a, inbox_b), config.sessions)
            child.join(timeout=REPLY_TIMEOUT)
            tally.add(nemesis.load_all(tokens, partial(Client.load, op="final")))
    finally:
        party.stop()
        if child.is_alive():
            child.kill()
        if child.pid is not None:
            child.join(timeout=REPLY_TIMEOUT)
        for channel in channels:
            channel.close()
            channel.cancel_join_thread()
        store.close()
    report = Report(config, tally, nemesis.events, began, time.monotonic() - began, {})
    by_address = {server.address: server.index for server in cluster.servers}
    for anomaly in tally.anomalies:
        if anomaly.op.sid != "-":
            report.copies[anomaly.op.sid] = tuple(
                by_address[a] for a in store.locate(anomaly.op.sid)
            )
    REPORTS.append(report)
    return report
