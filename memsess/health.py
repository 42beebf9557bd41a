"""Server health as a value: pure transitions of (health, event, now) -> health.

The cluster keeps one :class:`Health` per server in a lock-protected table and
only ever stores what these functions return; time is always passed in, so the
retry interval is tested without sleeping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Final

__all__ = [
    "DEFAULT_DOWN_AFTER_SILENCE",
    "DEFAULT_FAILURE_THRESHOLD",
    "READ_WINDOW_FLOOR",
    "SUSPECT_READ_WINDOW",
    "SUSPECT_WRITE_WINDOW",
    "WINDOW_MULTIPLE",
    "WRITE_WINDOW_FLOOR",
    "Health",
    "State",
    "claim_probe",
    "on_failure",
    "on_success",
    "straggler_window",
]

# Consecutive timeouts (or dropped stragglers) before a server is marked down.
# One slow reply on a loaded 2-core machine is noise; three in a row is a hang.
DEFAULT_FAILURE_THRESHOLD: Final = 3
# Seconds a server must also have been silent (no reply to anyone) before
# timeouts mark it down. On a busy host a burst of concurrent requests can all
# be cut off as stragglers within a few milliseconds while the server is fine;
# a hung server is silent for good. Seen in the threads bench: without this,
# healthy servers were marked down for a whole retry interval.
DEFAULT_DOWN_AFTER_SILENCE: Final = 0.25


class State(enum.Enum):
    UP = "up"
    SUSPECT = "suspect"  # failed recently, still used
    DOWN = "down"  # skipped until retry_at
    PROBING = "probing"  # one request is trying it again


@dataclass(frozen=True, slots=True)
class Health:
    """What memsess believes about one server at one moment."""

    state: State = State.UP
    failures: int = 0  # consecutive failures
    retry_at: float = 0.0  # monotonic seconds; meaningful when DOWN
    reason: str = ""  # last failure, for health() and logs
    since: float = 0.0  # monotonic seconds of the last state change
    #: True when requests include this server (UP or SUSPECT). A field, not a property:
    #: every request reads it for every copy.
    usable: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "usable", self.state in (State.UP, State.SUSPECT))


def on_success(health: Health, now: float) -> Health:
    """A reply arrived: the server is up."""
    if health.state is State.UP and health.failures == 0:
        return health
    since = health.since if health.state is State.UP else now
    return Health(State.UP, 0, 0.0, "", since)


def on_failure(
    health: Health,
    now: float,
    *,
    reason: str,
    retry_interval: float,
    immediate: bool = False,
    threshold: int = DEFAULT_FAILURE_THRESHOLD,
    last_reply: float = float("-inf"),
    down_after_silence: float = DEFAULT_DOWN_AFTER_SILENCE,
) -> Health:
    """A request failed. ``immediate`` (a refused connection, a failed probe)
    marks the server down at once; otherwise it goes down after ``threshold``
    consecutive failures once it has also not replied to anything since
    ``last_reply`` for ``down_after_silence`` seconds."""
    failures = health.failures + 1
    silent = now - last_reply >= down_after_silence
    if immediate or health.state is State.PROBING or (failures >= threshold and silent):
        since = health.since if health.state is State.DOWN else now
        return Health(State.DOWN, failures, now + retry_interval, reason, since)
    since = health.since if health.state is State.SUSPECT else now
    return replace(health, state=State.SUSPECT, failures=failures, reason=reason, since=since)


def claim_probe(health: Health, now: float, *, probe_timeout: float) -> Health | None:
    """A down server whose retry interval has passed is handed to exactly one
    request as a probe: returns the PROBING health to store, or None when the
    server must still be skipped (not due, or another request is probing).

    A probe that never reported back (its thread died) is given up after
    ``probe_timeout`` seconds so the server cannot stay PROBING forever."""
    due = health.state is State.DOWN or health.state is State.PROBING
    if due and now >= health.retry_at:
        return replace(health, state=State.PROBING, retry_at=now + probe_timeout, since=now)
    return None


# -- how long to wait for a straggler -------------------------------------------------

# The straggler window is how long the servers still silent get once what has arrived
# decides the answer. It never decides correctness (plans only cut a copy off once the
# rest is conclusive); it decides how often a healthy but busy server is cut off, which
# costs a repair, a hint and a trust floor raised. Hence floors well above the noise
# measured here: a Python process on a busy 2-core machine is descheduled for 1-10 ms,
# and memcached beside three CPU-bound processes answers 5-20 ms late now and then.
#: Reads: a cut-off read loses nothing, a late answer only feeds read repair.
READ_WINDOW_FLOOR: Final = 0.010
#: Writes wait longer: a write cut off is a copy missing until a repair lands, and
#: under CPU load that must stay rare (redundancy must not drop silently).
WRITE_WINDOW_FLOOR: Final = 0.050
#: A server that already failed recently (SUSPECT) gets these, whatever its round trip:
#: while one hangs, every request that includes it pays them until it is marked down
#: (0.25 s of silence at least), so a load and a save together stay under 5 ms. A healthy
#: server answers within them (its replies arrive microseconds after the others'), and
#: its next reply makes it UP again; a write cut off meanwhile is repaired (hinted).
SUSPECT_READ_WINDOW: Final = 0.001
SUSPECT_WRITE_WINDOW: Final = 0.002
#: The window is this many times the server's high-percentile round trip: the smoothed
#: round trip + 4 mean deviations, RFC 6298's retransmission timeout formula, updated by
#: Cluster.execute on every reply (gains 1/8 and 1/4, RFC 6298 section 2).
WINDOW_MULTIPLE: Final = 4.0


def straggler_window(
    health: Health, srtt: float, rttvar: float, *, write: bool, timeout: float
) -> float:
    """Seconds a silent server gets once the others' answers are conclusive: a multiple
    of its recent high-percentile round trip above a floor, never above its ``timeout``;
    a server that failed recently gets SUSPECT_READ_WINDOW or SUSPECT_WRITE_WINDOW."""
    if health.state is not State.UP:
        return min(timeout, SUSPECT_WRITE_WINDOW if write else SUSPECT_READ_WINDOW)
    floor = WRITE_WINDOW_FLOOR if write else READ_WINDOW_FLOOR
    return min(timeout, max(floor, WINDOW_MULTIPLE * (srtt + 4 * rttvar)))
