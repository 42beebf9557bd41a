"""What an app's configuration may tell an adapter, checked before a store is built: the
``MEMSESS_*`` keys of Flask and Quart, names nobody reads (refused, with the close match),
and a save_path given as a string or as a list of servers."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any, Final, TypeVar

from memsess.errors import DSNError
from memsess.records import lifetime_seconds
from memsess.store import StoreCore

__all__ = [
    "CONFIG_KEYS",
    "CONFIG_OPTIONS",
    "CONFLICT_KEY",
    "SAVE_PATH_KEY",
    "build_store",
    "check_config_keys",
    "check_save_path",
    "check_store_options",
    "permanent_lifetime",
    "store_options",
    "unknown_names",
]

S = TypeVar("S", bound=StoreCore)

#: ``app.config`` keys read by the Flask and Quart ``init_app``, and the store option each sets.
CONFIG_OPTIONS: Final = {
    "MEMSESS_REDUNDANCY": "redundancy",
    "MEMSESS_SERIALIZER": "serializer",
    "MEMSESS_KEY_PREFIX": "key_prefix",
    "MEMSESS_STRAGGLER_WINDOW": "straggler_window",
    "MEMSESS_MAX_ITEM_SIZE": "max_item_size",
    "MEMSESS_SECRET_KEYS": "secret_keys",  # a list: the first key seals, all open
    "MEMSESS_COMPRESS_THRESHOLD": "compress_threshold",
    "MEMSESS_COMPRESSION": "compression",
    "MEMSESS_MAX_SESSION_SIZE": "max_session_size",
    "MEMSESS_USERNAME": "username",  # memcached -Y credentials, out of the save path
    "MEMSESS_PASSWORD": "password",
    "MEMSESS_SSL_CONTEXT": "ssl_context",  # an ssl.SSLContext for every tls:// server
    # Seconds, for the save_path entries without their own ?timeout= / ?retry_interval=.
    "MEMSESS_TIMEOUT": "timeout",
    "MEMSESS_RETRY_INTERVAL": "retry_interval",
}
#: The ``app.config`` key of the servers (Flask and Quart): required.
SAVE_PATH_KEY: Final = "MEMSESS_SAVE_PATH"
#: The ``app.config`` key of the conflict policy (Flask and Quart): "merge" by default.
CONFLICT_KEY: Final = "MEMSESS_ON_CONFLICT"
#: Every ``MEMSESS_*`` key the Flask and Quart adapters read.
CONFIG_KEYS: Final = (SAVE_PATH_KEY, *CONFIG_OPTIONS, CONFLICT_KEY)
# Keys guessed from other libraries, and where their meaning is set.
_CONFIG_GUESSES: Final = {
    "MEMSESS_TTL": "the lifetime of a session is PERMANENT_SESSION_LIFETIME",
    "MEMSESS_LIFETIME": "the lifetime of a session is PERMANENT_SESSION_LIFETIME",
    "MEMSESS_SERVERS": f"the servers are {SAVE_PATH_KEY}",
    "MEMSESS_LOCATION": f"the servers are {SAVE_PATH_KEY}",
    "MEMSESS_DSN": f"the servers are {SAVE_PATH_KEY}",
}


def unknown_names(
    given: Collection[str],
    known: Sequence[str],
    *,
    what: str,
    instead: Mapping[str, str] | None = None,
) -> str | None:
    """None when every name in ``given`` is ``known``; otherwise the message of the error
    to raise: each unknown name with where its meaning lives (``instead``) or its close
    match, then every known name. ``what`` says what the names are ("app.config key")."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return None
    named = []
    for name in unknown:
        hint = (instead or {}).get(name)
        if hint is None:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else None
        named.append(f"{name!r}" + (f" ({hint})" if hint else ""))
    return (
        f"memsess: unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(named)};"
        f" the known ones are {', '.join(known)}"
    )


def check_config_keys(config: Mapping[str, Any]) -> None:
    """ValueError naming each ``MEMSESS_*`` key of an app's config that memsess does not
    read (a misspelt or guessed key would otherwise be ignored without a word)."""
    given = [key for key in config if isinstance(key, str) and key.startswith("MEMSESS_")]
    message = unknown_names(given, CONFIG_KEYS, what="app.config key", instead=_CONFIG_GUESSES)
    if message is not None:
        raise ValueError(message)


def permanent_lifetime(lifetime: timedelta) -> int:
    """Seconds every session lives in memcached: ``PERMANENT_SESSION_LIFETIME``,
    rounded up to whole seconds; ValueError if it is not positive."""
    return lifetime_seconds(lifetime.total_seconds(), name="PERMANENT_SESSION_LIFETIME")


def store_options(config: Mapping[str, Any], *, ttl: int) -> tuple[Any, dict[str, Any]]:
    """The save_path and store options an app's config asks for: ``MEMSESS_SAVE_PATH``
    (required: RuntimeError without it; a string or a list of servers) and the keys of
    :data:`CONFIG_OPTIONS`, with ``ttl`` seconds to live."""
    save_path = config.get(SAVE_PATH_KEY)
    if not save_path:
        raise RuntimeError(
            f"memsess: set app.config[{SAVE_PATH_KEY!r}], e.g. 'tcp://127.0.0.1:11211'"
        )
    options = {option: config[key] for key, option in CONFIG_OPTIONS.items() if key in config}
    options["ttl"] = ttl
    return save_path, options


def check_save_path(save_path: object, *, setting: str) -> None:
    """TypeError, naming ``setting``, unless ``save_path`` is a string or a list or tuple
    of strings (one server each, as Flask-Session and Django's cache LOCATION take them)."""
    if isinstance(save_path, str):
        return
    if isinstance(save_path, list | tuple) and all(isinstance(entry, str) for entry in save_path):
        return
    raise TypeError(
        f"{setting}: a save_path string ('tcp://10.0.0.1:11211, tcp://10.0.0.2:11211')"
        f" or a list of server strings, not {type(save_path).__name__}"
    )


def check_store_options(
    store_class: type[StoreCore], options: Mapping[str, Any], *, setting: str
) -> None:
    """TypeError naming ``setting`` and each option that ``store_class`` does not take
    (with its close match), rather than Python's message about ``__init__``."""
    parameters = inspect.signature(store_class).parameters.values()
    known = [parameter.name for parameter in parameters if parameter.kind is parameter.KEYWORD_ONLY]
    message = unknown_names(options, known, what=f"{setting} option")
    if message is not None:
        raise TypeError(message)


def build_store(
    store_class: type[S], save_path: Any, options: Mapping[str, Any], *, setting: str
) -> S:
    """``store_class.from_dsn(save_path, **options)``, with the errors of the save_path
    naming the ``setting`` it came from: TypeError for one that is neither a string nor
    a list of strings, :class:`memsess.DSNError` for one that does not parse."""
    check_save_path(save_path, setting=setting)
    try:
        return store_class.from_dsn(save_path, **options)
    except DSNError as exc:
        raise DSNError(f"{setting}: {exc}") from exc
