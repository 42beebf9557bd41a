"""The build switch (setup.py's MEMSESS_COMPILE) and what tells which build runs.

The compiled build itself is tested by the whole suite, run a second time on it
(``make test-compiled`` in CI); scripts/check-dist builds the compiled wheel and a
pure install from the sdist and checks each says so."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import memsess
from memsess._build import COMPILED, compiled_modules, describe
from memsess._chaining import caused_by

ROOT = Path(__file__).resolve().parent.parent


def setup_py(*args: str, tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """setup.py from the checkout, its build folders under ``tmp``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "setup.py"), *args],
        cwd=ROOT,
        env={**os.environ, **env, "MEMSESS_MYPYC_DIR": str(tmp / "mypyc")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_running_build_is_all_or_nothing_and_says_which() -> None:
    compiled = compiled_modules()
    assert memsess.__compiled__ is (compiled == COMPILED)
    assert compiled in ((), COMPILED)  # a partial build would be a broken install
    assert describe() == (
        f"compiled (mypyc, {len(COMPILED)} modules)" if memsess.__compiled__ else "pure Python"
    )


def test_the_compiled_modules_are_named_as_they_are_imported() -> None:
    for module in COMPILED:
        source = ROOT / Path(*module.split(".")).with_suffix(".py")
        assert source.exists(), module


def test_an_unknown_switch_value_is_an_error_naming_the_choices(tmp_path: Path) -> None:
    done = setup_py("--version", tmp=tmp_path, MEMSESS_COMPILE="maybe")
    assert done.returncode != 0
    assert "MEMSESS_COMPILE='maybe': use 1, 0 or auto" in done.stderr


def test_compile_on_demand_without_a_compiler_fails_and_says_why(tmp_path: Path) -> None:
    done = setup_py("--version", tmp=tmp_path, MEMSESS_COMPILE="1", CC="/nonexistent/cc")
    assert done.returncode != 0
    assert "MEMSESS_COMPILE=1, but the hot path cannot be compiled: no C compiler" in done.stderr


@pytest.mark.parametrize(
    ("switch", "cc"), [("auto", "/nonexistent/cc"), ("0", "")], ids=["no-compiler", "off"]
)
def test_a_wheel_without_compiling_is_pure_and_whole(tmp_path: Path, switch: str, cc: str) -> None:
    env = {"MEMSESS_COMPILE": switch} | ({"CC": cc} if cc else {})
    build = ["build", "--build-base", str(tmp_path / "build")]
    done = setup_py(*build, "bdist_wheel", "--dist-dir", str(tmp_path), tmp=tmp_path, **env)
    assert done.returncode == 0, done.stderr
    if cc:
        assert "memsess: building pure Python: no C compiler" in done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")  # no extension module: any platform
    names = zipfile.ZipFile(wheel).namelist()
    for module in COMPILED:
        assert f"{module.replace('.', '/')}.py" in names
    assert not [name for name in names if name.endswith((".so", ".pyd", ".c"))]


def test_no_compiled_module_raises_from_which_mypyc_would_drop() -> None:
    # mypyc compiles ``raise X from Y`` as ``raise X``: the compiled modules set causes
    # with memsess._chaining.caused_by, which both builds honour.
    found = []
    for module in COMPILED:
        source = ROOT / Path(*module.split(".")).with_suffix(".py")
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.cause is not None:
                found.append(f"{source.relative_to(ROOT)}:{node.lineno}")
    assert found == [], "use raise caused_by(error, cause) in a compiled module"


@pytest.mark.parametrize("cause", [KeyError("k"), None], ids=["cause", "from-None"])
def test_caused_by_sets_what_raise_from_sets(cause: BaseException | None) -> None:
    def fail_while_handling() -> None:
        try:
            raise ValueError("the context")
        except ValueError:
            raise caused_by(RuntimeError("x"), cause)  # noqa: B904 - what is tested

    with pytest.raises(RuntimeError) as raised:
        fail_while_handling()
    assert raised.value.__cause__ is cause
    assert raised.value.__suppress_context__ is True
