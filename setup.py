"""The build switch for the compiled hot path (everything else is in pyproject.toml).

memsess is pure Python. A wheel build also compiles its hot-path modules with
mypyc (the same source: they are already ``mypy --strict``) when it can, as
black and mypy ship theirs; the .py files stay in the wheel as the fallback.
``MEMSESS_COMPILE`` decides:

- unset or ``auto``: compile a wheel (``python -m build``, ``pip install .``)
  when mypyc and a C compiler are there, else build it pure and say why; never
  compile an editable install (``pip install -e .``, what ``make setup`` does);
- ``1``: compile, and fail when that cannot be done;
- ``0``: never compile.

``import memsess; memsess.__compiled__`` (and ``memsess check``) tells which
build runs. The list of compiled modules is memsess/_build.py's, read from
here without importing memsess.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    """memsess/_build.py's COMPILED, as source paths (the file is data, not imported)."""
    namespace: dict[str, object] = {}
    exec((HERE / "memsess" / "_build.py").read_text(), namespace)  # noqa: S102
    modules = namespace["COMPILED"]
    assert isinstance(modules, tuple)  # noqa: S101 - our own constant
    return [str(Path(*module.split(".")).with_suffix(".py")) for module in modules]


def cannot_compile() -> str | None:
    """Why this machine cannot compile the hot path, or None when it can."""
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed (pip install mypy)"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(os.environ.get("CC", compiler).split()[0]) is None:
        return f"no C compiler ({compiler}) on PATH"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python.h (install the python3-dev package)"
    return None


def wants_compiled() -> bool:
    switch = os.environ.get("MEMSESS_COMPILE", "auto").strip().lower()
    if switch in {"0", "no", "false"}:
        return False
    if switch in {"1", "yes", "true"}:
        reason = cannot_compile()
        if reason is not None:
            sys.exit(f"MEMSESS_COMPILE=1, but the hot path cannot be compiled: {reason}")
        return True
    if switch != "auto":
        sys.exit(f"MEMSESS_COMPILE={switch!r}: use 1, 0 or auto")
    building = set(sys.argv[1:])
    if "editable_wheel" in building or not building & {"bdist_wheel", "build_ext", "build"}:
        return False
    reason = cannot_compile()
    if reason is not None:
        print(f"memsess: building pure Python: {reason}", file=sys.stderr)
        return False
    return True


def extensions() -> list[object]:
    if not wants_compiled():
        return []
    from mypyc.build import mypycify

    # opt_level 3 is mypyc's default; the group name keeps the shared library's name
    # stable; the C sources go to ./build unless MEMSESS_MYPYC_DIR names another folder
    # (scripts/build-compiled gives each run its own, so two builds never share one).
    config = ["--config-file", str(HERE / "build_backend" / "mypyc.ini")]
    return list(
        mypycify(
            [*config, *compiled_modules()],
            opt_level="3",
            group_name="memsess_compiled",
            target_dir=os.environ.get("MEMSESS_MYPYC_DIR", "build"),
        )
    )


setup(ext_modules=extensions())
