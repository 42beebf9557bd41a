"""Fresh locks in a forked child: only the forking thread survives a fork, so a lock
another thread held at that moment would stay held, and hang the child, forever. And
what else a child must do before it runs (drop its parent's sockets, say): once its
locks are free."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["call_after_fork", "fork_safe_lock", "renew_locks_after_fork"]

_T = TypeVar("_T")

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


# Every lock fork_safe_lock() made that is still alive (a lock takes weak references;
# the classes mypyc compiles do not, so they cannot be owners of the renewals above).
_LOCKS: weakref.WeakSet[threading.Lock] = weakref.WeakSet()


def fork_safe_lock() -> threading.Lock:
    """A ``threading.Lock`` that is free in every child forked from now on: held by
    another thread at the fork, it is released in the child before the child runs.

    For owners that cannot be weakly referenced (the compiled build's classes); the
    lock is not kept alive by this."""
    lock = threading.Lock()
    _LOCKS.add(lock)
    return lock


# (id(owner), action) -> weak reference to owner; as _RENEWALS.
_CALLS: dict[tuple[int, Callable[[Any], None]], weakref.ref[Any]] = {}


def call_after_fork(owner: _T, action: Callable[[_T], None]) -> None:
    """In every child forked from now on, call ``action(owner)`` before the child runs,
    after the locks above are free, for as long as ``owner`` lives.

    ``owner`` must support weak references: an object of a class mypyc compiled does
    not, so such an object registers something it owns instead (the deque of its idle
    connections, say). Registering does not keep ``owner`` alive; ``action`` must not
    either (a module-level function, not a bound method of it). Called once per owner
    and action, however often registered."""
    entry = (id(owner), action)

    def forget(_: weakref.ref[Any], entry: tuple[int, Callable[[Any], None]] = entry) -> None:
        _CALLS.pop(entry, None)

    _CALLS[entry] = weakref.ref(owner, forget)


def _after_fork_in_child() -> None:
    # The child runs only this thread: no lock is needed to walk the tables (copied
    # whole first: a collection while walking one could fire a callback that drops an
    # entry). A plain Lock may be released by any thread, and no thread in the child
    # holds one.
    for lock in list(_LOCKS):
        if lock.locked():
            lock.release()
    for (_, name), (ref, factory) in _RENEWALS.copy().items():
        owner = ref()
        if owner is not None:
            setattr(owner, name, factory())
    for (_, action), called in _CALLS.copy().items():
        owner = called()
        if owner is not None:
            action(owner)


os.register_at_fork(after_in_child=_after_fork_in_child)
