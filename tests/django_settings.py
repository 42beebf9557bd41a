"""Django settings for the adapter tests, and Django's own session-backend suite
(``tests/sessions_tests`` of the sdist of the installed Django, fetched once with
pip and cached under ``.cache/django-sdist/``)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import django
from django.conf import settings

REPO = Path(__file__).resolve().parent.parent
SDIST_CACHE = REPO / ".cache" / "django-sdist"

SETTINGS: dict[str, Any] = {
    "SECRET_KEY": "memsess-adapter-tests",
    "ALLOWED_HOSTS": ["testserver", "127.0.0.1", "localhost"],
    # Django's suite imports its own models: their app and a database must exist.
    "INSTALLED_APPS": ["django.contrib.sessions", "sessions_tests"],
    "DATABASES": {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    "MIDDLEWARE": ["django.contrib.sessions.middleware.SessionMiddleware"],
    "ROOT_URLCONF": "django_urls",
    "SESSION_ENGINE": "memsess.adapters.django",
    "USE_TZ": True,
    "DEFAULT_AUTO_FIELD": "django.db.models.AutoField",
}


def sessions_tests_dir(version: str = django.__version__) -> Path:
    """The folder holding Django's ``sessions_tests`` package for ``version``,
    downloaded and extracted on first use. Raises RuntimeError if it cannot be."""
    root = SDIST_CACHE / f"django-{version}-tests"
    if (root / "sessions_tests" / "tests.py").is_file():
        return root
    archive = SDIST_CACHE / f"django-{version}.tar.gz"
    if not archive.is_file():
        _download(version)
    prefix = f"django-{version}/tests/"
    with tempfile.TemporaryDirectory(dir=SDIST_CACHE) as tmp:
        try:
            with tarfile.open(archive) as tar:
                wanted = prefix + "sessions_tests/"
                members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
                if not members:
                    raise tarfile.TarError(f"no {prefix}sessions_tests/ in it")
                # Only regular files and folders, nothing outside tmp (PEP 706's "data").
                tar.extractall(tmp, members=members, filter="data")
        except tarfile.TarError as exc:
            raise RuntimeError(f"{archive} is unusable ({exc}); delete it and retry") from exc
        root.mkdir(parents=True, exist_ok=True)
        try:
            (Path(tmp) / prefix / "sessions_tests").rename(root / "sessions_tests")
        except OSError:  # another test process extracted it first
            if not (root / "sessions_tests" / "tests.py").is_file():
                raise
    return root


def _download(version: str) -> None:
    SDIST_CACHE.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--timeout", "30", f"django=={version}", "-d", str(SDIST_CACHE)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        output = (getattr(exc, "stderr", None) or "")[-2000:]
        raise RuntimeError(
            f"could not download the Django {version} sdist for Django's session tests "
            f"({' '.join(command)}): {exc}\n{output}\n"
            f"Put django-{version}.tar.gz from PyPI into {SDIST_CACHE} to run offline."
        ) from exc


def setup() -> None:
    """Configure Django once per process, with Django's ``sessions_tests`` importable."""
    if settings.configured:
        return
    tests_dir = str(sessions_tests_dir())
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    settings.configure(**SETTINGS)
    django.setup()
