"""Fresh locks in a forked child: only the forking thread survives a fork, so a lock
another thread held at that moment would stay held, and hang the child, forever."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

__all__ = ["renew_locks_after_fork"]

_Factory = Callable[[], object]
# (id(owner), attribute name) -> (weak reference to owner, lock factory). Keyed by id,
# not a WeakSet, so owners need not be hashable; each reference's callback drops its
# entry when the owner dies, before its id can be reused.
_RENEWALS: dict[tuple[int, str], tuple[weakref.ref[object], _Factory]] = {}


def renew_locks_after_fork(owner: object, *names: str, factory: _Factory = threading.Lock) -> None:
    """In every child forked from now on, set ``owner.<name>`` to a new ``factory()``
    (a ``threading.Lock`` by default) for each of ``names``, before the child runs.

    ``owner`` must support weak references (``"__weakref__"`` in its ``__slots__``);
    registering does not keep it alive. Call it from ``__init__``, after the locks
    are created."""
    for name in names:
        entry = (id(owner), name)

        def forget(_: weakref.ref[object], entry: tuple[int, str] = entry) -> None:
            _RENEWALS.pop(entry, None)

        _RENEWALS[entry] = (weakref.ref(owner, forget), factory)


def _after_fork_in_child() -> None:
    # The child runs only this thread: no lock is needed to walk the table.
    for (_, name), (ref, factory) in list(_RENEWALS.items()):
        owner = ref()
        if owner is not None:
            setattr(owner, name, factory())


os.register_at_fork(after_in_child=_after_fork_in_child)
