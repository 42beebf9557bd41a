"""The nemesis's history and checker (tests/nemesis.py runs the traffic and the faults):
what each operation expected and got, the verdict on it (ok, error, or a wrong answer:
lost, stale, resurrected, phantom), the tally of a process, and the report of a run."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    from nemesis import NemesisConfig

OK, ERROR = "ok", "error"
LOST, STALE, RESURRECTED, PHANTOM = WRONG_KINDS = ("lost", "stale", "resurrected", "phantom")
# Relative weights; a hang lasts 2 s, so fewer of them keep the fault count up.
FAULT_WEIGHTS: Final = {"stall": 30, "hang": 12, "kill": 18, "restart-empty": 18, "flush": 22}
LOGGED_OUT: Final = -1  # a token's state after an acknowledged logout
ABSENT: Final = 0  # a token's state before its session's first acknowledged save
TAIL: Final = 16  # operations of history a token carries
KEEP: Final = 200  # wrong answers and errors kept in full per process (all are counted)


class HarnessError(RuntimeError):
    """The nemesis itself failed (not memsess): a lost token, a dead process."""


class Op(NamedTuple):
    """One operation of the history."""

    op: str  # load, save, logout, final (a load after the run), sweep, quiesce
    sid: str
    expected: str
    got: str
    start: float  # time.monotonic(), seconds
    end: float
    who: str  # "A/3": process and worker thread; "nemesis"
    verdict: str  # OK, a WRONG_KINDS entry, or ERROR


class Anomaly(NamedTuple):
    op: Op
    history: tuple[Op, ...]  # the session's operations before it


@dataclass
class Token:
    """A session and what its owner knows about it; one owner at a time."""

    slot: int
    sid: str
    state: int = ABSENT  # n of the last acknowledged save, LOGGED_OUT or ABSENT
    maybe: tuple[int, ...] = ()  # states of writes that raised since (may have landed)
    writes: int = 0
    checks_after_logout: int = 0
    tail: deque[Op] = field(default_factory=lambda: deque(maxlen=TAIL))


def value_of(token: Token, n: int) -> dict[str, Any]:
    return {"s": token.sid[:8], "n": n}


def judge(token: Token, got: dict[str, Any] | None) -> str:
    """The verdict on a load of ``token``'s session that returned ``got``."""
    accepted = (token.state, *token.maybe)
    if got is None:
        return OK if any(state <= ABSENT for state in accepted) else LOST
    n = got.get("n") if got == {"s": token.sid[:8], "n": got.get("n")} else None
    if isinstance(n, int) and n > ABSENT and n in accepted:
        return OK
    if token.state == LOGGED_OUT:
        return RESURRECTED
    if isinstance(n, int) and 0 < n < token.state:
        return STALE
    return PHANTOM


def describe(state: int) -> str:
    return {LOGGED_OUT: "logged out", ABSENT: "nothing"}.get(state, f"n={state}")


def expectation(token: Token) -> str:
    maybe = f" (or {', '.join(map(describe, token.maybe))} from a write that raised)"
    return describe(token.state) + (maybe if token.maybe else "")


def shown(got: dict[str, Any] | None, token: Token) -> str:
    if got is None:
        return "nothing"
    return f"n={got['n']}" if got.get("s") == token.sid[:8] and "n" in got else repr(got)[:80]


@dataclass
class Tally:
    """Counts and kept anomalies of one worker thread, process or run."""

    ops: Counter[str] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    wrong_sids: set[str] = field(default_factory=set)
    handoffs: int = 0  # tokens passed to the other process
    relogins: int = 0  # logged-out slots that moved on to a new session
    anomalies: list[Anomaly] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # store.stats() per process

    def note(self, op: Op, token: Token | None = None) -> None:
        self.ops[op.op] += 1
        if op.verdict != OK:
            if op.verdict == ERROR:
                self.errors[op.got.split(":")[0]] += 1
            else:
                self.wrong[op.verdict] += 1
                self.wrong_sids.add(op.sid)
            if len(self.anomalies) < KEEP:
                self.anomalies.append(Anomaly(op, tuple(token.tail) if token else ()))
        if token is not None:
            token.tail.append(op)

    def add(self, other: Tally) -> Tally:
        self.ops += other.ops
        self.wrong += other.wrong
        self.errors += other.errors
        self.wrong_sids |= other.wrong_sids
        self.handoffs += other.handoffs
        self.relogins += other.relogins
        self.anomalies += other.anomalies
        self.harness_errors += other.harness_errors
        self.stats.update(other.stats)
        return self


class Event(NamedTuple):
    kind: str  # a FAULT_WEIGHTS key, or "sweep"
    server: int  # -1 for a sweep
    start: float
    end: float


@dataclass
class Report:
    config: NemesisConfig
    tally: Tally
    events: list[Event]
    began: float  # monotonic time the faults began
    duration: float  # seconds from then to the end of the final check
    copies: dict[str, tuple[int, ...]]  # sid -> indexes of its servers, for anomalies

    @property
    def faults(self) -> Counter[str]:
        return Counter(event.kind for event in self.events if event.kind != "sweep")

    @property
    def operations(self) -> int:
        return sum(self.tally.ops.values())

    @property
    def wrong_answers(self) -> int:
        return sum(self.tally.wrong.values())

    @property
    def errors(self) -> int:
        return sum(self.tally.errors.values())

    def counts(self) -> dict[str, int]:
        """Flat counts for a closing note or pytest's ``record_property``."""
        tally, faults = self.tally, self.faults
        return {
            "operations": self.operations,
            **{f"ops_{op}": tally.ops[op] for op in ("load", "save", "logout", "final", "sweep")},
            "handoffs": tally.handoffs,
            "relogins": tally.relogins,
            "faults": sum(faults.values()),
            **{f"faults_{kind}": faults[kind] for kind in FAULT_WEIGHTS},
            "sweeps": len(self.events) - sum(faults.values()),
            "wrong_answers": self.wrong_answers,
            **{f"wrong_{kind}": tally.wrong[kind] for kind in WRONG_KINDS},
            "wrong_sessions": len(tally.wrong_sids),
            "errors": self.errors,
        }

    def summary(self) -> str:
        c, config, tally = self.counts(), self.config, self.tally
        ops = ", ".join(f"{op} {n}" for op, n in sorted(tally.ops.items()))
        faults = ", ".join(f"{kind} {c['faults_' + kind]}" for kind in FAULT_WEIGHTS)
        wrong = ", ".join(f"{kind} {c['wrong_' + kind]}" for kind in WRONG_KINDS)
        errors = ", ".join(f"{name} {n}" for name, n in tally.errors.most_common()) or "none"
        interesting = ("partial_writes", "straggler_drops", "repairs", "failovers")
        stats = "; ".join(
            f"{name}: " + ", ".join(f"{key} {values[key]}" for key in interesting)
            for name, values in sorted(tally.stats.items())
        )
        return (
            f"nemesis run: {self.duration:.1f} s, seed {config.seed}, 2 processes x "
            f"{config.threads} threads, {config.sessions} sessions, {config.burners} CPU burners\n"
            f"  operations {c['operations']} ({ops}); {c['handoffs']} handoffs between "
            f"processes, {c['relogins']} logged-out slots moved to new sessions\n"
            f"  faults {c['faults']} ({faults}); {c['sweeps']} repair sweeps\n"
            f"  wrong answers {c['wrong_answers']} ({wrong}) on {c['wrong_sessions']} sessions;"
            f" errors {c['errors']} ({errors})\n"
            f"  store counters {stats}"
        )

    def diagnosis(self, limit: int = 20) -> str:
        """The summary, then the first ``limit`` wrong answers and errors, each with
        the faults around it and its session's operations before it."""
        anomalies = sorted(self.tally.anomalies, key=lambda anomaly: anomaly.op.start)
        lines = [
            self.summary(),
            f"first {min(limit, len(anomalies))} of {self.wrong_answers + self.errors} wrong"
            " answers and errors (t: seconds since the faults began; who: process/thread):",
        ]
        for number, (op, history) in enumerate(anomalies[:limit], 1):
            copies = ", ".join(map(str, self.copies.get(op.sid, ()))) or "-"
            lines += [
                f"{number:2}. {op.verdict.upper()}: {op.who} {op.op} of session {op.sid[:8]}"
                f" (copies on servers {copies}) t={self._t(op.start)}..{self._t(op.end)}:"
                f" expected {op.expected}, got {op.got}",
                f"    faults around it: {self._faults_near(op)}",
            ]
            if history:
                steps = "; ".join(self._step(h) for h in history[-8:])
                lines.append(f"    its operations before: {steps}")
        return "\n".join(lines)

    def _t(self, moment: float) -> str:
        return f"{moment - self.began:.3f}"

    def _faults_near(self, op: Op) -> str:
        near = [e for e in self.events if e.start <= op.end and e.end >= op.start - 1.0]
        if not near:
            before = [e for e in self.events if e.end < op.start]
            near = before[-1:]
        shown = [
            f"{e.kind}{'' if e.server < 0 else f' server {e.server}'} t={self._t(e.start)}.."
            f"{self._t(e.end)}"
            for e in near
        ]
        return "; ".join(shown) or "none before it"

    def _step(self, op: Op) -> str:
        what = op.got if op.op in ("load", "final") or op.verdict == ERROR else op.expected
        mark = "" if op.verdict == OK else f" [{op.verdict}]"
        return f"t={self._t(op.start)} {op.who} {op.op} {what}{mark}"


REPORTS: list[Report] = []  # every run of this process, for a closing note


def totals() -> dict[str, int]:
    """Counts summed over every run so far, with ``runs``."""
    total: Counter[str] = Counter({"runs": len(REPORTS)})
    for report in REPORTS:
        total.update(report.counts())
    return dict(total)
