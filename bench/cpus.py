"""Where the bench and the servers run: pinned to different CPUs by default.

On loopback the cost of a round trip is mostly the wake-up of the other side,
and it depends on where the scheduler puts each process: the client and
memcached on the same core make a get cost ~10 us, on two cores ~60 us, and an
unpinned run flips between the two from round to round. So by default
(``MEMSESS_BENCH_PIN=split``) the bench pins itself to the first CPU and every
memcached server and delay relay to the others, as if the servers were other
machines; ``MEMSESS_BENCH_PIN=none`` leaves placement to the kernel.
"""

from __future__ import annotations

import contextlib
import os
from typing import Final

__all__ = ["PIN_ENV", "pin_client", "pin_process", "placement"]

#: "split" (default) or "none": see the module docstring.
PIN_ENV: Final = "MEMSESS_BENCH_PIN"


def _cpu_split() -> tuple[set[int], set[int]] | None:
    """(client CPUs, server CPUs), or None when not pinning."""
    if os.environ.get(PIN_ENV, "split") == "none" or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


# Read once at import, before pin_client() narrows this process to one CPU.
_SPLIT: Final = _cpu_split()


def placement() -> str:
    """Where the bench and the servers run, for report headers."""
    if _SPLIT is None:
        return "not pinned (MEMSESS_BENCH_PIN=none, or one CPU)"
    client, servers = _SPLIT
    return f"bench on CPU {min(client)}, servers on CPU {','.join(map(str, sorted(servers)))}"


def pin_client() -> None:
    """Pin the calling thread (and threads it starts later) to the client CPU."""
    if _SPLIT is not None:
        # A container may forbid it (EPERM, EINVAL): the bench then runs unpinned.
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, _SPLIT[0])


def pin_process(pid: int) -> None:
    """Pin every thread of process ``pid`` to the server CPUs (threads it starts
    later inherit from their creator)."""
    if _SPLIT is None:
        return
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return
    for task in tasks:
        try:
            os.sched_setaffinity(int(task), _SPLIT[1])
        except OSError:
            continue  # the thread has exited, or pinning is not allowed here
