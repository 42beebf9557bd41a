"""Which modules the compiled build compiles with mypyc, and which build runs.

setup.py runs this file (without importing memsess) for COMPILED.

The hot path of a request: wire protocol, the exchange, fan-out and connection
pools of the blocking driver, records and copies, health and the cluster, the
rules and plans, and a store's operations with their blocking driver
(memsess.operations). Everything else stays interpreted in both builds: it
runs once per process or per fault, or leans on what mypyc's classes do not
do. The stores (store.py, aio.py) are public classes that users and the
adapters subclass, wrap and weakly reference, and they check their options
with their own messages, which mypyc's argument checks would pre-empt; a
Snapshot (snapshots.py) is the application's to keep and copy.
"""

from __future__ import annotations

import importlib
import importlib.machinery
from pathlib import Path

__all__ = ["COMPILED", "compiled_modules", "describe", "stale_modules"]

COMPILED = (
    "memsess.protocol",
    "memsess.transport.exchange",
    "memsess.transport.fanout",
    "memsess.transport.pool",
    "memsess.records",
    "memsess.copies",
    "memsess.health",
    "memsess.cluster",
    "memsess.rules",
    "memsess.plans",
    "memsess.operations",
)


def compiled_modules() -> tuple[str, ...]:
    """Those of COMPILED that this process imported as extension modules (importing
    them if need be): all of them in the compiled build, none in the pure one."""
    return tuple(module for module in COMPILED if _is_extension(module))


def stale_modules() -> tuple[str, ...]:
    """Compiled modules whose .py source was changed after they were built: an
    in-place build (scripts/build-compiled) that no longer runs the code on disk."""
    stale = []
    for module in compiled_modules():
        binary = Path(importlib.import_module(module).__file__ or "")
        source = binary.parent / (module.rpartition(".")[2] + ".py")
        if source.exists() and source.stat().st_mtime > binary.stat().st_mtime:
            stale.append(module)
    return tuple(stale)


def describe() -> str:
    """One line for ``memsess check``: which build runs."""
    compiled = compiled_modules()
    if not compiled:
        return "pure Python"
    if len(compiled) < len(COMPILED):
        missing = ", ".join(sorted(set(COMPILED) - set(compiled)))
        return f"partly compiled: {missing} pure (a broken build: reinstall memsess)"
    stale = stale_modules()
    if stale:
        return f"compiled (mypyc), but older than the source of {', '.join(stale)}: rebuild"
    return f"compiled (mypyc, {len(compiled)} modules)"


def _is_extension(module: str) -> bool:
    path = importlib.import_module(module).__file__ or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
