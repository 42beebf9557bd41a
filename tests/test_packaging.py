"""What the installed distribution says and does without a server: its metadata, its
runtime dependencies, and `memsess demo` on a machine without memcached.

Building and installing the wheel and the sdist is scripts/check-dist (`make check-dist`),
too slow for the test suite; these read the editable install the suite runs against.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

META = metadata("memsess")
REQUIREMENTS = [Requirement(line) for line in META.get_all("Requires-Dist") or []]


def requirements_of(extra: str) -> set[str]:
    return {r.name for r in REQUIREMENTS if r.marker and r.marker.evaluate({"extra": extra})}


def run_demo(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m memsess demo` with an empty PATH (no memcached on it) and ``env``."""
    environ = {k: v for k, v in os.environ.items() if k != "MEMSESS_MEMCACHED"}
    environ.update(PATH=str(tmp_path), **env)
    return subprocess.run(
        [sys.executable, "-m", "memsess", "demo"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_demo_without_memcached_says_in_one_line_how_to_install_it(tmp_path: Path) -> None:
    ran = run_demo(tmp_path)
    assert ran.returncode == 2
    assert ran.stdout == ""
    (line,) = ran.stderr.splitlines()
    assert line.startswith("memsess demo: memcached not found on PATH;")
    assert "apt-get install memcached" in line
    assert "brew install memcached" in line
    assert "MEMSESS_MEMCACHED" in line


def test_demo_names_a_memsess_memcached_that_is_not_there(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-memcached-here")
    ran = run_demo(tmp_path, MEMSESS_MEMCACHED=missing)
    assert ran.returncode == 2
    (line,) = ran.stderr.splitlines()
    assert f"not found at MEMSESS_MEMCACHED={missing!r}" in line


def test_the_license_is_mit_and_shipped() -> None:
    assert META["License-Expression"] == "MIT"
    assert META.get_all("License-File") == ["LICENSE"]
    assert not [c for c in META.get_all("Classifier") or [] if c.startswith("License ::")]


@pytest.mark.parametrize(
    "classifier",
    [
        "Typing :: Typed",
        "Framework :: Flask",
        "Framework :: Django",
        "Framework :: FastAPI",
        "Framework :: AsyncIO",
        *(f"Programming Language :: Python :: 3.{minor}" for minor in range(10, 14)),
    ],
)
def test_classifiers_say_what_memsess_supports(classifier: str) -> None:
    assert classifier in (META.get_all("Classifier") or [])


def test_project_urls_lead_to_home_documentation_and_issues() -> None:
    urls = dict(line.split(", ", 1) for line in META.get_all("Project-URL") or [])
    assert urls["Homepage"] == "https://github.com/memsess/memsess"
    assert urls["Documentation"].startswith("https://github.com/memsess/memsess/")
    assert urls["Documentation"].endswith("/docs")
    assert urls["Issues"] == "https://github.com/memsess/memsess/issues"
    assert META["Author"] == "the memsess authors"


def test_pymemcache_is_no_runtime_dependency() -> None:
    runtime = {r.name for r in REQUIREMENTS if r.marker is None}
    assert runtime == {"msgpack", "uhashring"}
    assert "pymemcache" in requirements_of("dev")  # tests/adapter_support.py
    assert "pymemcache" in requirements_of("bench")


def test_no_memsess_module_imports_pymemcache() -> None:
    """Every module but the adapters (whose frameworks are extras), in a fresh process."""
    code = (
        "import pkgutil, sys, importlib, memsess\n"
        "for m in pkgutil.walk_packages(memsess.__path__, 'memsess.'):\n"
        "    if not m.name.startswith('memsess.adapters'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'pymemcache'))\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert ran.stdout == "[]\n"


def test_the_test_extra_is_what_a_users_suite_needs_and_no_lint_tools() -> None:
    assert requirements_of("test") == {"pytest", "cryptography"}
    assert {"ruff", "mypy", "import-linter", "build"} <= requirements_of("dev")
