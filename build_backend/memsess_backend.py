"""setuptools' build backend, with mypyc added to what a wheel build needs.

A wheel build compiles memsess's hot path when it can (setup.py): the isolated
build environment then needs mypy, which carries mypyc. An editable install
(``pip install -e .``, ``make setup``) never compiles, and MEMSESS_COMPILE=0
turns compiling off, so neither asks for mypy. Everything else is setuptools'.
"""

from __future__ import annotations

import os

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403 - this backend is setuptools' plus one hook

#: The mypyc that compiles the hot path: the oldest mypy the [dev] extra accepts.
MYPYC = "mypy>=1.10"


def get_requires_for_build_wheel(
    config_settings: dict[str, str | list[str]] | None = None,
) -> list[str]:
    requires = list(build_meta.get_requires_for_build_wheel(config_settings))
    if os.environ.get("MEMSESS_COMPILE", "auto").strip().lower() not in {"0", "no", "false"}:
        requires.append(MYPYC)
    return requires
