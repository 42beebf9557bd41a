"""Every ```python sample of README.md and docs/*.md runs as written, against real
memcached servers (memsess.testing.LocalCluster); the README stands alone on a package
index.

How the samples run (the convention a new sample follows):

- The samples of one file run in order, in one namespace, in a fresh interpreter where
  no adapter module is imported yet (as in an app, where ``memsess.adapters.flask`` must
  work after a bare ``import memsess``): a sample may use a name an earlier sample of its
  file defined. ``__name__`` is not ``"__main__"``.
- Example addresses are rewritten to local servers, nothing else is:
  ``10.0.0.N:11211`` (any scheme) is server N of a local cluster, ``127.0.0.1:11211`` and
  ``localhost:11211`` server 1; ``unix:///run/memcached.sock`` a local unix-socket server;
  ``cache-N:11211`` and ``cache-N.internal:11211`` server N of a local TLS cluster, whose
  CA is ``/etc/memsess/ca.pem``; the Prometheus port 9100 a free port.
- The environment variable samples read is set: ``MEMSESS_KEY`` (a secret key).
- Functions named ``test_*`` that the samples define are called once all of the file's
  samples ran; a Django settings fragment (a sample that sets ``SESSION_ENGINE``) is
  checked by saving and loading a session with those settings.
- A sample that cannot run is marked on the line before its fence with
  ``<!-- sample: not run (the reason) -->``. ```sh, ```text and ```pycon blocks are not run.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from memsess.sealing import generate_key
from memsess.testing import LocalCluster

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Where the README's links point, so that they work on a package index too.
REPOSITORY_URL = "https://github.com/memsess/memsess"
RAW_URL = "https://raw.githubusercontent.com/memsess/memsess/main/"  # images

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,})(?P<info>[^`]*)$")
_NOT_RUN = re.compile(r"^<!-- sample: not run \((?P<reason>[^)]+)\) -->$")
_PLAIN_ADDRESS = re.compile(r"\b(?:10\.0\.0\.(?P<n>[1-9])|127\.0\.0\.1|localhost):11211\b")
_TLS_ADDRESS = re.compile(r"\bcache-(?P<n>[1-9])(?:\.internal)?:11211\b")
_UNIX_ADDRESS = "unix:///run/memcached.sock"
_CA_FILE = "/etc/memsess/ca.pem"
_PROMETHEUS_PORT = re.compile(r"\b9100\b")


@dataclass(frozen=True)
class Sample:
    """A ```python block: its file, the line of its fence (1-based) and its code."""

    path: Path
    line: int
    source: str
    not_run: str | None  # the reason, when marked


def samples_of(path: Path) -> list[Sample]:
    """The ```python blocks of a markdown file, in order (fenced blocks of other kinds,
    indented ones included, are skipped whole)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Sample] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        start, indent, ticks = index, len(opening["indent"]), opening["ticks"]
        index += 1
        while index < len(lines) and lines[index].strip() != ticks:
            index += 1
        if opening["info"].strip() == "python":
            body = "\n".join(line[indent:] for line in lines[start + 1 : index])
            marker = _NOT_RUN.match(lines[start - 1].strip()) if start else None
            found.append(Sample(path, start + 1, body + "\n", marker and marker["reason"]))
        index += 1
    return found


SAMPLES = {path: samples_of(path) for path in DOCUMENTS}


class Clusters:
    """The local servers the samples' addresses are rewritten to, started on first use."""

    def __init__(self) -> None:
        self._started: dict[str, LocalCluster] = {}

    def get(self, kind: str) -> LocalCluster:
        if kind not in self._started:
            options: dict[str, Any] = {"plain": {}, "unix": {"unix": True}, "tls": {"tls": True}}
            cluster = LocalCluster(3 if kind != "unix" else 1, **options[kind])
            cluster.start()
            self._started[kind] = cluster
        return self._started[kind]

    def close(self) -> None:
        for cluster in self._started.values():
            cluster.close()


@pytest.fixture(scope="module")
def clusters() -> Iterator[Clusters]:
    started = Clusters()
    yield started
    started.close()


def localized(source: str, clusters: Clusters) -> str:
    """``source`` with its example addresses on local servers (see the module docstring)."""

    def plain(match: re.Match[str]) -> str:
        return clusters.get("plain").servers[int(match["n"] or 1) - 1].address

    def tls(match: re.Match[str]) -> str:
        # The test certificate names localhost, not cache-N.
        return f"localhost:{clusters.get('tls').servers[int(match['n']) - 1].port}"

    source = _PLAIN_ADDRESS.sub(plain, source)
    source = _TLS_ADDRESS.sub(tls, source)
    if _UNIX_ADDRESS in source:
        source = source.replace(_UNIX_ADDRESS, clusters.get("unix").dsn())
    if _CA_FILE in source:
        certs = clusters.get("tls").certs
        assert certs is not None
        source = source.replace(_CA_FILE, certs.ca)
    return _PROMETHEUS_PORT.sub("0", source)


@pytest.mark.parametrize(
    "path",
    [path for path, samples in SAMPLES.items() if samples],
    ids=lambda path: str(path.relative_to(REPO)),
)
def test_every_python_sample_runs_as_written(path: Path, clusters: Clusters) -> None:
    batch = [
        {"file": str(sample.path.relative_to(REPO)), "line": sample.line,
         "source": localized(sample.source, clusters)}
        for sample in SAMPLES[path]
        if sample.not_run is None
    ]  # fmt: skip
    environment = {**os.environ, "MEMSESS_KEY": generate_key()}
    result = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps(batch),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"a sample of {path.name} failed:\n{result.stderr}"


def test_every_sample_that_is_not_run_says_why() -> None:
    markers = [
        (path, number)
        for path in DOCUMENTS
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "sample:" in line and line.lstrip().startswith("<!--")
    ]
    marked = {(s.path, s.line - 1) for samples in SAMPLES.values() for s in samples if s.not_run}
    assert set(markers) == marked, "a marker must be the line right before a ```python fence"


def test_samples_are_found_in_every_kind_of_fence(tmp_path: Path) -> None:
    document = tmp_path / "doc.md"
    document.write_text(
        "```sh\nmake demo\n```\n\n- item\n\n  ```python\n  x = 1\n  ```\n\n"
        "<!-- sample: not run (a settings fragment) -->\n```python\ny = x\n```\n"
        "````text\n```python\nnot a sample\n```\n````\n",
        encoding="utf-8",
    )
    assert [(s.line, s.source, s.not_run) for s in samples_of(document)] == [
        (7, "x = 1\n", None),
        (12, "y = x\n", "a settings fragment"),
    ]


# -- the README on a package index -------------------------------------------------

README = (REPO / "README.md").read_text(encoding="utf-8")
_LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def test_readme_links_and_images_work_off_github() -> None:
    targets = [match["target"] for match in _LINK.finditer(README)]
    assert targets, "the README links to the docs"
    relative = [target for target in targets if not target.startswith("https://")]
    assert relative == [], "a package index renders no relative link, image or anchor"
    for target in targets:
        for prefix in (f"{REPOSITORY_URL}/blob/main/", RAW_URL):
            if target.startswith(prefix):
                file = target.removeprefix(prefix).partition("#")[0]
                assert (REPO / file).is_file(), f"{target} names no file of the repository"


def test_readme_has_a_quick_start_for_a_pip_user_and_one_for_a_checkout() -> None:
    assert "pip install memsess" in README or "pip install 'memsess[" in README
    assert "apt-get install memcached" in README  # where memcached comes from
    # CI and the checkout's quick start run exactly these.
    assert "make demo   # sets up .venv" in README
    assert "make test   # sets up .venv" in README


def test_the_adapter_docs_list_every_setting_the_adapters_read() -> None:
    from memsess.adapters._config import CONFIG_KEYS
    from memsess.adapters.django import KEYS

    rows = (REPO / "docs" / "adapters.md").read_text(encoding="utf-8").splitlines()
    documented = {
        name for row in rows if row.startswith("| `")
        for name in re.findall(r"`([A-Z_]+)`", row.split("|")[1])
    }  # fmt: skip
    assert set(CONFIG_KEYS) <= documented  # Flask and Quart
    assert set(KEYS) <= documented  # Django


@pytest.mark.parametrize("adapter", ["asgi", "django", "flask", "litestar", "quart", "wsgi"])
def test_each_adapter_is_an_attribute_after_a_bare_import_memsess(adapter: str) -> None:
    from memsess.adapters import FRAMEWORK_MODULES

    assert adapter in FRAMEWORK_MODULES
    # A fresh interpreter: here, the test modules imported every adapter already.
    code = f"import memsess; print(memsess.adapters.{adapter}.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == f"memsess.adapters.{adapter}", result.stderr


# -- run in the fresh interpreter: python tests/test_doc_samples.py < samples.json ----


def run_samples(batch: list[dict[str, Any]]) -> None:
    """Run the samples of one file in one namespace (see the module docstring)."""
    assert "memsess.adapters" not in sys.modules, "a fresh interpreter, as an app's"
    # A module of its own, as an app's code is in (Litestar reads its handlers' hints there).
    module = sys.modules["doc_sample"] = types.ModuleType("doc_sample")
    namespace = module.__dict__
    for sample in batch:
        # Blank lines first: a traceback names the markdown file and its line.
        code = compile("\n" * sample["line"] + sample["source"], sample["file"], "exec")
        exec(code, namespace)  # the documentation's own samples
    tests: list[Callable[[], None]] = [
        value for name, value in namespace.items() if name.startswith("test_") and callable(value)
    ]
    for test in tests:
        test()
    if "SESSION_ENGINE" in namespace:
        check_django_settings(namespace)


def check_django_settings(namespace: dict[str, Any]) -> None:
    """Save and load a session with the ``SESSION_*`` settings a sample set."""
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY="doc-sample",
        **{name: value for name, value in namespace.items() if name.startswith("SESSION_")},
    )
    django.setup()
    engine = importlib.import_module(namespace["SESSION_ENGINE"])
    session = engine.SessionStore()
    session["user_id"] = 42
    session.save()
    assert engine.SessionStore(session.session_key).load() == {"user_id": 42}


if __name__ == "__main__":
    run_samples(json.load(sys.stdin))
