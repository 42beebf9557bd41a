"""What a load hands back and what a merge applies: Snapshot and Changes.

Interpreted in both builds (memsess/_build.py): a Snapshot is the application's, to
keep, compare, copy or subclass as any dataclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from memsess.records import Record

__all__ = ["Changes", "Snapshot", "check_snapshot"]


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
    #: The record as read: what a merge diffs the saved data against.
    record: Record | None = field(default=None, repr=False, compare=False)


class Changes(NamedTuple):
    """What one request did to a session: the keys it set (to a new value, nested
    changes included) and the keys it deleted, with what each held when loaded."""

    set: dict[str, Any]
    deleted: frozenset[str]
    before: dict[str, Any]  # the loaded value of each key set or deleted (absent: new)

    @classmethod
    def between(cls, loaded: Mapping[str, Any], saved: Mapping[str, Any]) -> Changes:
        changed = {k: v for k, v in saved.items() if k not in loaded or loaded[k] != v}
        deleted = frozenset(k for k in loaded if k not in saved)
        before = {k: loaded[k] for k in (*changed, *deleted) if k in loaded}
        return cls(changed, deleted, before)

    def applied_to(self, current: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        """``current`` with these changes on top, and how many of the keys they set the
        other save had changed too, to another value (this save, the later one, wins
        for those)."""
        merged = dict(current)
        before = self.before
        overwritten = 0
        for k, v in self.set.items():
            theirs = merged.get(k, _ABSENT)
            if theirs != before.get(k, _ABSENT) and theirs != v:
                overwritten += 1
            merged[k] = v
        for k in self.deleted:
            merged.pop(k, None)
        return merged, overwritten


_ABSENT: Final = object()


def check_snapshot(snapshot: Snapshot | None, sid: str) -> None:
    """ValueError unless ``snapshot`` (if any) was loaded for session ``sid``."""
    if snapshot is not None and snapshot.sid != sid:
        # Not the sid itself: ids are secrets, and this ends up in logs.
        raise ValueError(
            "snapshot is of another session: pass the snapshot fetch() gave for this sid"
        )
