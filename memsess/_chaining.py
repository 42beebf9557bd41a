"""``raise error from cause`` for the modules the compiled build compiles.

mypyc (mypy 2.4) compiles ``raise X from Y`` as ``raise X``: the cause is dropped, and
``from None`` no longer hides the exception being handled. Setting the attributes
itself, as the interpreter's ``raise ... from`` does, works in both builds:
``raise caused_by(X, Y)``. tests/test_build.py checks that each compiled module keeps
its causes.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["caused_by"]

E = TypeVar("E", bound=BaseException)


def caused_by(error: E, cause: BaseException | None) -> E:
    """``error``, its ``__cause__`` set to ``cause`` and the context it is raised in
    hidden, as ``raise error from cause`` (``cause`` None: ``from None``) sets them."""
    error.__cause__ = cause
    error.__suppress_context__ = True
    return error
