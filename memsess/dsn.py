"""Parse PHP memcache's ``session.save_path`` into frozen :class:`ServerSpec` values.

Pure functions, no I/O: :func:`parse_dsn` and its inverse :func:`format_dsn`. A save_path
may hold passwords (``tls://user:password@host``): no error message or repr shows one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Final, Literal, TypeVar
from urllib.parse import quote, unquote

from memsess.errors import DSNError

__all__ = [
    "DEFAULT_PERSISTENT",
    "DEFAULT_PORT",
    "DEFAULT_RETRY_INTERVAL",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WEIGHT",
    "MAX_PORT",
    "MAX_RETRY_INTERVAL",
    "MAX_TIMEOUT",
    "Scheme",
    "ServerSpec",
    "format_dsn",
    "parse_dsn",
    "with_defaults",
]

Scheme = Literal["tcp", "udp", "unix", "tls"]

# PHP's defaults: memcache.default_port, MMC_DEFAULT_TIMEOUT (1 s) and
# MMC_DEFAULT_RETRY (15 s) in the memcache extension.
DEFAULT_PORT: Final = 11211
DEFAULT_WEIGHT: Final = 1
DEFAULT_TIMEOUT: Final = 1.0
DEFAULT_RETRY_INTERVAL: Final = 15.0
# PHP's session handler defaults to persistent=0, but a Python process keeps its
# connections open between requests anyway: memsess always pools them (ServerSpec).
DEFAULT_PERSISTENT: Final = True
MAX_PORT: Final = 65535
#: Seconds. poll() takes its timeout as a C int of milliseconds (~24.8 days at most, then
#: OverflowError in every request); an hour is already far past any useful deadline.
MAX_TIMEOUT: Final = 3600.0
#: Seconds. A server skipped for longer than a day is as good as removed: a larger value
#: is a mistake (milliseconds written for seconds?), not a policy.
MAX_RETRY_INTERVAL: Final = 86400.0
# RFC 1035 2.3.4: labels of 1 to 63 octets, names of at most 255 octets on the wire, which
# is 253 characters written out. socket.getaddrinfo() raises UnicodeError past them.
_MAX_LABEL: Final = 63
_MAX_NAME: Final = 253
# memcached's authfile.c reads each user:password line with fgets(line, 256, ...): a longer
# pair is cut, so no auth file can hold it and the server could never accept it.
_MAX_CREDENTIALS: Final = 254

_T = TypeVar("_T")

# C isspace() and ',' end a server entry in memcache_session.c; re.ASCII keeps
# \s to the same six characters, so a stray U+00A0 is an error, not a separator.
_SEPARATORS: Final = re.compile(r"[,\s]+", re.ASCII)
_INTEGER: Final = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)  # bounded: int() caps digits
_DECIMAL: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
_DOTTED_DIGITS: Final = re.compile(r"[0-9.]+", re.ASCII)
# A socket path may hold anything but what ends an entry, starts a query, or
# (in PHP's URL parser) starts a fragment.
_UNIX_PATH: Final = re.compile(r"/[^\s,?#\x00]*", re.ASCII)
_PORT: Final = re.compile(r"[0-9]{1,18}", re.ASCII)
_BOOLEANS: Final = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}
_TLS_PARAMETERS: Final = ("tls_ca", "tls_cert", "tls_key", "tls_server_name", "tls_verify")
_PHP_PARAMETERS: Final = ("persistent", "weight", "timeout", "retry_interval", "udp_port")
_PARAMETERS: Final = (*_PHP_PARAMETERS, *_TLS_PARAMETERS)
#: The parameters a store-wide option sets on the entries that leave them out.
_STORE_DEFAULTS: Final = frozenset({"timeout", "retry_interval"})
_SCHEMES: Final[dict[str, Scheme]] = {"tcp": "tcp", "udp": "udp", "tls": "tls"}
# memcached's ASCII authentication sends "user password" as one line, split at the space,
# and its auth file holds user:password lines split at the first ':'.
_USERNAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # printable ASCII but ':'
_PASSWORD: Final = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space
_SCHEME_PREFIX: Final = re.compile(r"(?:tcp|udp|tls)://", re.ASCII | re.IGNORECASE)
_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# php-memcached's save_path: "PERSISTENT=<id> host:port:weight, ..." (pecl/memcache's
# is memsess's). Told apart so that the error says which syntax to write.
_PHP_MEMCACHED_PERSISTENT: Final = re.compile(r"persistent=", re.ASCII | re.IGNORECASE)
_PHP_MEMCACHED_SERVER: Final = re.compile(r"[^:\[\]/]+:[0-9]+:[0-9]+", re.ASCII)
_PHP_MEMCACHED: Final = (
    "memsess reads PHP memcache's (pecl/memcache) session.save_path, not php-memcached's "
    "('PERSISTENT=id host:port:weight'): write tcp://host:port, or tcp://host:port?weight=N, "
    "for each server, separated by ','"
)
_NO_DTLS: Final = (
    "memcached has no DTLS: UDP reads would go unencrypted; drop udp_port, "
    "or use tcp:// for a trusted network"
)
_NO_UDP_AUTH: Final = (
    "memcached's ASCII authentication is per TCP connection; UDP reads cannot authenticate"
)
_STORE_CREDENTIALS: Final = "pass the store's username= and password= options instead"


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """One memcached server of a save_path, validated on construction.

    ``host`` is a host name or an IP address without brackets, or for ``unix``
    the absolute socket path (``port`` is then 0). ``timeout`` (connect and I/O
    deadline, default 1 s) and ``retry_interval`` (how long a down server is
    skipped before it is probed again, default 15 s) are in seconds.
    ``udp_port`` is where session reads go over UDP: the port of a ``udp://``
    server, ``?udp_port=`` of a ``tcp://`` one, else None.

    ``persistent`` is read for PHP compatibility and changes nothing: memsess always
    keeps its connections in a pool between requests. In PHP the flag decides whether a
    connection outlives the request of the PHP process that opened it (every request
    connects again without it); a Python process serves many requests, and connecting
    anew for each would only add a round trip or two (a TLS handshake, authentication)
    to every request, the cost PHP's flag exists to avoid.

    ``defaulted`` names the parameters its save_path entry left out (``timeout``,
    ``retry_interval``), which a store's options of those names then set; a ServerSpec
    made by hand sets all of its own.

    ``username`` and ``password`` (both or neither) are memcached's ASCII
    authentication (``-Y``), sent first on every TCP, TLS or unix socket connection;
    the password is left out of the repr. ``tls_*`` apply to ``tls://`` servers only:
    ``tls_ca`` is a CA bundle (default None: the system's trust store), ``tls_cert``
    and ``tls_key`` a client certificate and its key (the key may sit in the
    certificate file), ``tls_server_name`` the name the certificate must carry, also
    sent as SNI (default None: ``host``), and ``tls_verify=False`` turns the
    certificate and name checks off. Paths are not checked here: no I/O.
    """

    scheme: Scheme
    host: str
    port: int
    weight: int = DEFAULT_WEIGHT
    timeout: float = DEFAULT_TIMEOUT
    retry_interval: float = DEFAULT_RETRY_INTERVAL
    persistent: bool = DEFAULT_PERSISTENT
    udp_port: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    tls_verify: bool = True
    defaulted: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.scheme not in ("tcp", "udp", "unix", "tls"):
            raise DSNError(
                f"unknown scheme {self.scheme!r}; expected 'tcp', 'udp', 'unix' or 'tls'"
            )
        _check_host(self.scheme, self.host)
        _check_ports(self.scheme, self.port, self.udp_port)
        if self.scheme == "udp" and self.udp_port is None:
            # udp://host:port reads over UDP from that same port.
            object.__setattr__(self, "udp_port", self.port)
        if not _is_integer(self.weight) or self.weight < 1:
            raise DSNError(f"weight must be an integer >= 1, got {self.weight!r}")
        _check_timeout(self.timeout)
        _check_retry_interval(self.retry_interval)
        if not isinstance(self.defaulted, frozenset) or not self.defaulted <= _STORE_DEFAULTS:
            raise DSNError(
                f"defaulted names parameters among {', '.join(sorted(_STORE_DEFAULTS))}, "
                f"got {self.defaulted!r}"
            )
        if not isinstance(self.persistent, bool):
            raise DSNError(f"persistent must be True or False, got {self.persistent!r}")
        _check_credentials(self.udp_port, self.username, self.password)
        _check_tls_options(self)

    @property
    def tls(self) -> bool:
        """Whether connections to this server speak TLS (a ``tls://`` server)."""
        return self.scheme == "tls"

    @property
    def name(self) -> str:
        """Stable display and hash-ring name: ``10.0.0.1:11211``, ``[::1]:11211``,
        ``unix:/run/memcached.sock``."""
        if self.scheme == "unix":
            return f"unix:{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def address(self) -> tuple[str, int] | str:
        """What ``socket.connect`` takes: ``(host, port)``, or the socket path."""
        return self.host if self.scheme == "unix" else (self.host, self.port)


def _check_timeout(value: object) -> None:
    if not (_is_real(value) and isinstance(value, (int, float)) and 0 < value <= MAX_TIMEOUT):
        raise DSNError(
            f"timeout must be a finite number of seconds > 0 and at most {MAX_TIMEOUT:g}, "
            f"got {value!r}"
        )


def _check_retry_interval(value: object) -> None:
    if not (
        _is_real(value) and isinstance(value, (int, float)) and 0 <= value <= MAX_RETRY_INTERVAL
    ):
        raise DSNError(
            f"retry_interval must be a finite number of seconds >= 0 and at most "
            f"{MAX_RETRY_INTERVAL:g} (PHP's -1, 'never retry', is not supported), "
            f"got {value!r}"
        )


def with_defaults(
    servers: Iterable[ServerSpec],
    *,
    timeout: float | None = None,
    retry_interval: float | None = None,
) -> tuple[ServerSpec, ...]:
    """``servers`` with the store-wide ``timeout`` and ``retry_interval`` (seconds; None:
    memsess's defaults, 1 and 15) set on each server whose save_path entry left that
    parameter out (:attr:`ServerSpec.defaulted`); an entry's own value is kept. Raises
    DSNError for a value a save_path entry could not hold either."""
    given: dict[str, float] = {}
    if timeout is not None:
        _check_timeout(timeout)
        given["timeout"] = float(timeout)
    if retry_interval is not None:
        _check_retry_interval(retry_interval)
        given["retry_interval"] = float(retry_interval)
    return tuple(_with_given(spec, given) for spec in servers)


def _with_given(spec: ServerSpec, given: dict[str, float]) -> ServerSpec:
    changes = {name: value for name, value in given.items() if name in spec.defaulted}
    if not changes:
        return spec
    defaulted = spec.defaulted.difference(changes)
    return replace(spec, defaulted=defaulted, **changes)  # type: ignore[arg-type]


def _is_integer(value: object) -> bool:
    # bool is an int subclass; weight=True is a bug in the caller, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_host(scheme: str, host: str) -> None:
    """Raise DSNError unless ``host`` can be written into a save_path and read back."""
    if not isinstance(host, str) or not host:
        raise DSNError(f"host is empty ({host!r})")
    if scheme == "unix":
        if not _UNIX_PATH.fullmatch(host):
            raise DSNError(
                f"unix socket path {host!r} must be absolute, as in unix:///run/memcached.sock, "
                "without whitespace, ',', '?' or '#'"
            )
        if host.endswith(":0"):
            raise DSNError(f"unix socket path {host!r} ends in ':0', which PHP reads as a port")
        return
    if ":" in host:
        _check_ip(host, ipaddress.IPv6Address, "IPv6")
    elif _DOTTED_DIGITS.fullmatch(host):
        _check_ip(host, ipaddress.IPv4Address, "IPv4")
    elif not _HOSTNAME.fullmatch(host):
        raise DSNError(f"invalid host name {host!r}: use letters, digits, '-', '.' and '_'")
    else:
        _check_dns_name(host)


def _check_dns_name(host: str) -> None:
    """Raise DSNError for a name that DNS, or the IDNA codec sockets encode it with, refuses."""
    name = host.removesuffix(".")  # a trailing dot only says the name is fully qualified
    for label in name.split("."):
        if not 0 < len(label) <= _MAX_LABEL:
            length = len(label)
            raise DSNError(f"host name label {label!r} of {length} characters (DNS allows 1 to 63)")
    if len(name) > _MAX_NAME:
        raise DSNError(f"host name of {len(name)} characters (DNS allows up to {_MAX_NAME})")
    try:
        host.encode("idna")
    except UnicodeError as exc:  # what every connect would raise, found now
        raise DSNError(f"host name {host!r} cannot be encoded for DNS: {exc}") from None


def _check_ip(host: str, parse: Callable[[str], object], family: str) -> None:
    try:
        parse(host)
    except ValueError:
        raise DSNError(f"invalid {family} address {host!r}") from None


def _check_ports(scheme: str, port: int, udp_port: int | None) -> None:
    if scheme == "unix":
        if port != 0 or udp_port is not None:
            raise DSNError(
                f"unix sockets have no port or udp_port, got port={port!r} udp_port={udp_port!r}"
            )
        return
    if not _is_integer(port) or not 1 <= port <= MAX_PORT:
        raise DSNError(f"port must be an integer 1..{MAX_PORT}, got {port!r}")
    if udp_port is None:
        return
    if not _is_integer(udp_port) or not 1 <= udp_port <= MAX_PORT:
        raise DSNError(f"udp_port must be an integer 1..{MAX_PORT} or 0 for none, got {udp_port!r}")
    if scheme == "udp" and udp_port != port:
        raise DSNError(f"udp_port {udp_port!r} differs from the udp:// port {port!r}")
    if scheme == "tls":
        raise DSNError(_NO_DTLS)


def _check_credentials(udp_port: int | None, username: str | None, password: str | None) -> None:
    # Neither value is ever quoted: a password typed into the wrong place would show.
    if username is None and password is None:
        return
    if username is None or password is None:
        raise DSNError("username and password go together: give both or neither")
    if udp_port is not None:  # also every udp:// server
        raise DSNError(_NO_UDP_AUTH)
    if not isinstance(username, str) or not _USERNAME.fullmatch(username):
        raise DSNError(
            "username must be non-empty printable ASCII without whitespace or ':' "
            "(memcached's auth file holds user:password lines)"
        )
    if not isinstance(password, str) or not _PASSWORD.fullmatch(password):
        raise DSNError(
            "password must be non-empty printable ASCII without whitespace "
            "(memcached's ASCII authentication sends 'user password' as one line)"
        )
    if len(username) + 1 + len(password) > _MAX_CREDENTIALS:
        raise DSNError(
            f"username:password is longer than {_MAX_CREDENTIALS} characters, "
            "more than a line of memcached's auth file holds"
        )


def _check_tls_options(server: ServerSpec) -> None:
    paths = {"tls_ca": server.tls_ca, "tls_cert": server.tls_cert, "tls_key": server.tls_key}
    for name, path in paths.items():
        if path is not None:
            _check_path(name, path)
    if server.tls_server_name is not None:
        _check_server_name(server.tls_server_name)
    if not isinstance(server.tls_verify, bool):
        raise DSNError(f"tls_verify must be True or False, got {server.tls_verify!r}")
    if server.scheme != "tls":
        given = {**paths, "tls_server_name": server.tls_server_name}
        named = [name for name, value in given.items() if value is not None]
        named += [] if server.tls_verify else ["tls_verify"]
        if named:
            raise DSNError(f"{named[0]} applies to tls:// servers only")
    if server.tls_key is not None and server.tls_cert is None:
        raise DSNError(
            "tls_key is the private key of a client certificate: give tls_cert too "
            "(or leave tls_key out when the key is in the tls_cert file)"
        )


def _check_path(name: str, path: str) -> None:
    if not isinstance(path, str) or not path or "\x00" in path:
        raise DSNError(f"{name} must be a file path (a non-empty str without NUL), got {path!r}")
    if _SURROGATE.search(path):  # os.fsdecode() of a non-UTF-8 name: no UTF-8 spelling
        raise DSNError(f"{name} {path!r} is not UTF-8 text, which a save_path cannot carry")


def _check_server_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise DSNError(f"tls_server_name must be a DNS name or an IP address, got {name!r}")
    try:
        _check_host("tcp", name)
    except DSNError as exc:
        raise DSNError(f"tls_server_name: {exc}") from None


def parse_dsn(
    save_path: str | Sequence[str],
    *,
    timeout: float | None = None,
    retry_interval: float | None = None,
) -> tuple[ServerSpec, ...]:
    """Parse a PHP memcache (pecl/memcache) ``session.save_path`` into its servers, in order.

    Entries are separated by commas and/or whitespace, e.g.
    ``"tcp://10.0.0.1:11211?weight=2&timeout=0.5, unix:///run/memcached.sock"``; a list
    or tuple of such strings (Flask-Session's and Django's cache LOCATION way) is read as
    their entries one after another. ``tcp://`` and ``tls://`` entries may carry
    ``user:password@`` and ``tls://`` ones ``tls_ca``, ``tls_cert``, ``tls_key``,
    ``tls_server_name`` and ``tls_verify``; those and the credentials are
    percent-decoded (``%2C`` for ',', ``%40`` for '@'). ``persistent`` is read and
    changes nothing: memsess always pools connections (see :class:`ServerSpec`).

    ``timeout`` and ``retry_interval`` (seconds) are set on the entries that leave that
    parameter out; None keeps memsess's defaults (1 and 15 s, PHP's).

    Raises :class:`~memsess.errors.DSNError` naming the offending entry and part, with
    any password in it written ``***``; TypeError for a save_path that is neither a
    str nor a list or tuple of str.
    """
    text = _save_path_text(save_path)
    entries = [entry for entry in _SEPARATORS.split(text) if entry]
    if not entries:
        raise DSNError(f"save_path {save_path!r} lists no servers")
    _check_credentials_placement(entries)
    for entry in entries:
        if _PHP_MEMCACHED_PERSISTENT.match(entry):
            raise DSNError(f"server {_redact(entry)!r}: {_PHP_MEMCACHED}")
    servers = tuple(_parse_server(entry) for entry in entries)
    _check_distinct(servers, entries)
    return with_defaults(servers, timeout=timeout, retry_interval=retry_interval)


def _save_path_text(save_path: object) -> str:
    """``save_path`` as one string of entries: itself, or a list's items joined."""
    if isinstance(save_path, str):
        return save_path
    if not isinstance(save_path, (list, tuple)):
        raise TypeError(
            "save_path must be a str, or a list or tuple of str (one or more servers"
            f" each), not {type(save_path).__qualname__}"
        )
    for position, item in enumerate(save_path):
        if not isinstance(item, str):
            raise TypeError(
                f"save_path[{position}] must be a str (one or more servers), "
                f"not {type(item).__qualname__}"
            )
    return ", ".join(save_path)


def format_dsn(servers: Iterable[ServerSpec]) -> str:
    """Write servers as a save_path that :func:`parse_dsn` reads back unchanged;
    parameters at their defaults are left out. The result holds the servers'
    passwords: keep it as secret as they are."""
    servers = tuple(servers)
    entries = [_format_server(server) for server in servers]
    if not entries:
        raise DSNError("cannot format a save_path without servers")
    _check_distinct(servers, entries)
    return ", ".join(entries)


def _check_distinct(servers: tuple[ServerSpec, ...], entries: list[str]) -> None:
    # Two entries for one server would share its points on the hash ring, and a
    # replica set could hold both "copies" on one machine.
    seen: dict[tuple[str, int], str] = {}
    for server, entry in zip(servers, entries, strict=True):
        key = _identity(server)
        if key in seen:
            raise DSNError(
                f"servers {_redact(seen[key])!r} and {_redact(entry)!r} are the same server "
                f"{server.name}; list each server once"
            )
        seen[key] = entry


def _identity(server: ServerSpec) -> tuple[str, int]:
    """The server regardless of scheme, letter case and IPv6 spelling."""
    if server.scheme == "unix":
        return server.name, 0
    try:
        host = ipaddress.ip_address(server.host).compressed
    except ValueError:
        host = server.host.lower()
    return host, server.port


def _check_credentials_placement(entries: list[str]) -> None:
    """Refuse credentials outside a tcp://, udp:// or tls:// entry, before any entry is parsed.

    A ',' or space typed raw in a password splits its entry in two, "tcp://u:pa" and
    "ss@host"; parsing the first would report "port 'pa'", a piece of the password.
    (Only a password holding a separator followed by "tcp://" or "unix:/" slips through.)
    """
    for number, entry in enumerate(entries, 1):
        path = _unix_path(entry)
        if path is not None:
            if "@" in path and not path.startswith("/"):
                # Neither entry is quoted: after a split, all of it may be a piece of a password.
                raise DSNError(
                    f"server entry {number}: unix:// takes no user:password@; {_STORE_CREDENTIALS}"
                )
        elif "@" in entry and not _SCHEME_PREFIX.match(entry):
            raise DSNError(
                f"server entry {number} has '@' but no tcp:// or tls://; write credentials as "
                "tls://user:password@host:port, with ',' and whitespace in them "
                "percent-encoded (%2C, %20): typed raw, they split the entry in two"
            )


def _redact(entry: str) -> str:
    """``entry`` with any password in it written ``***``: everything from the first ':'
    after the user name up to the last '@', however the password is spelled."""
    if _unix_path(entry) is not None:
        return entry  # an '@' in a socket path (_check_credentials_placement refused the rest)
    scheme = _SCHEME_PREFIX.match(entry)
    if scheme is None:  # _check_credentials_placement refused these when they hold an '@'
        return "***" if "@" in entry else entry
    userinfo, has_at, after = entry[scheme.end() :].rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    return f"{scheme.group()}{user}:***@{after}" if has_at and has_password else entry


def _parse_server(entry: str) -> ServerSpec:
    location, has_query, query = entry.partition("?")
    try:
        if "@" in query:  # also where a '?' typed raw in a password would put its tail
            raise DSNError("'@' in the parameters; write it %40 (and '?' in a password %3F)")
        params = _parse_query(query) if has_query else {}
        scheme, host, port, credentials = _parse_location(location)
        _check_parameters_apply(scheme, params)
        username, password = credentials or (None, None)
        return ServerSpec(
            scheme,
            host,
            port,
            weight=_param(params, "weight", _parse_integer, DEFAULT_WEIGHT),
            timeout=_param(params, "timeout", _parse_seconds, DEFAULT_TIMEOUT),
            retry_interval=_param(params, "retry_interval", _parse_seconds, DEFAULT_RETRY_INTERVAL),
            persistent=_param(params, "persistent", _parse_boolean, DEFAULT_PERSISTENT),
            udp_port=_param(params, "udp_port", _parse_udp_port, None),
            username=username,
            password=password,
            tls_ca=_param(params, "tls_ca", _percent_decode, None),
            tls_cert=_param(params, "tls_cert", _percent_decode, None),
            tls_key=_param(params, "tls_key", _percent_decode, None),
            tls_server_name=_param(params, "tls_server_name", _percent_decode, None),
            tls_verify=_param(params, "tls_verify", _parse_encoded_boolean, True),
            defaulted=_STORE_DEFAULTS.difference(params),
        )
    except DSNError as exc:
        raise DSNError(f"server {_redact(entry)!r}: {exc}") from None


def _check_parameters_apply(scheme: Scheme, params: dict[str, str]) -> None:
    if "udp_port" in params and scheme in ("udp", "unix"):
        raise DSNError(
            f"udp_port does not apply to {scheme}:// servers; "
            "write tcp://host:port?udp_port=N or udp://host:port"
        )
    for name in _TLS_PARAMETERS:
        if name in params and scheme != "tls":
            raise DSNError(f"{name} applies to tls:// servers only")


def _parse_query(query: str) -> dict[str, str]:
    if not query:
        raise DSNError("'?' is not followed by any parameter")
    params: dict[str, str] = {}
    for item in query.split("&"):
        name, has_value, value = item.partition("=")
        if not name:
            raise DSNError(f"empty parameter in {query!r} (a stray '&', or '=' without a name)")
        if name not in _PARAMETERS:
            raise DSNError(f"unknown parameter {name!r}; expected one of {', '.join(_PARAMETERS)}")
        if name in params:
            raise DSNError(f"duplicate parameter {name!r}")
        if not has_value or not value:
            raise DSNError(f"parameter {name!r} has no value")
        params[name] = value
    return params


def _param(params: dict[str, str], name: str, convert: Callable[[str, str], _T], default: _T) -> _T:
    return convert(name, params[name]) if name in params else default


def _parse_location(location: str) -> tuple[Scheme, str, int, tuple[str, str] | None]:
    """Split ``[scheme://][user:password@]host[:port]`` or ``unix://path`` into its parts."""
    path = _unix_path(location)
    if path is not None:
        if not path:
            raise DSNError("unix socket path is empty")
        # PHP chops a trailing ":0" port off the path ("unix:///path:0").
        return "unix", path.removesuffix(":0"), 0, None
    scheme_text, has_scheme, rest = location.partition("://")
    if not has_scheme:
        if "/" in location:  # a mistyped "tcp:/host" would otherwise read as a host
            raise DSNError(f"'/' in {location!r}; write tcp://host:port or unix:///path")
        scheme_text, rest = "tcp", location
    scheme = _SCHEMES.get(scheme_text.lower())
    if scheme is None:
        raise DSNError(
            f"unknown scheme {scheme_text.lower()!r}; expected tcp://, tls://, udp:// or unix://"
        )
    # The last '@', as in RFC 3986 parsers: one typed raw in a password stays in it.
    userinfo, has_userinfo, host_port = rest.rpartition("@")
    host, port = _split_host_port(host_port)
    if not has_userinfo:
        return scheme, host, port, None
    username, has_password, password = userinfo.partition(":")
    if not has_password:
        raise DSNError(
            f"invalid host name {f'{userinfo}@{host}'!r}: a user name before '@' needs a "
            f"password too, as in {scheme}://user:password@host"
        )
    credentials = _percent_decode("username", username), _percent_decode("password", password)
    return scheme, host, port, credentials


def _unix_path(text: str) -> str | None:
    """The socket path of a unix entry, else None."""
    # memcache_session.c treats any entry starting with "unix:" as a socket:
    # unix:///path and unix:/path both name /path.
    if text[:5].lower() != "unix:":
        return None
    return text[7:] if text[5:7] == "//" else text[5:]


def _split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, closed, after = text[1:].partition("]")
        if not closed:
            raise DSNError(f"unclosed '[' in {text!r}")
        if ":" not in host:
            raise DSNError(f"brackets are for IPv6 addresses only, got [{host}]")
        if after and not after.startswith(":"):
            raise DSNError(f"unexpected {after!r} after [{host}]")
        return host, _parse_port(after[1:]) if after else DEFAULT_PORT
    if text.count(":") > 1:
        if _PHP_MEMCACHED_SERVER.fullmatch(text):  # host:port:weight
            raise DSNError(_PHP_MEMCACHED)
        raise DSNError(
            f"more than one ':' in {text!r}; write an IPv6 address in brackets, "
            "as in tcp://[::1]:11211"
        )
    host, has_port, port = text.partition(":")
    return host, _parse_port(port) if has_port else DEFAULT_PORT


def _parse_port(text: str) -> int:
    if not _PORT.fullmatch(text):
        raise DSNError(f"port {text!r} is not a number")
    return int(text)


def _parse_integer(name: str, text: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise DSNError(f"{name} must be an integer, got {text!r}")
    return int(text)


def _parse_seconds(name: str, text: str) -> float:
    if not _DECIMAL.fullmatch(text):
        raise DSNError(f"{name} must be a number of seconds, got {text!r}")
    return float(text)


def _parse_boolean(name: str, text: str) -> bool:
    # Unlike PHP, where any string but "" and "0" is true (so "false" is true).
    value = _BOOLEANS.get(text.lower())
    if value is None:
        raise DSNError(f"{name} must be one of 0/1/true/false/yes/no/on/off, got {text!r}")
    return value


def _parse_encoded_boolean(name: str, text: str) -> bool:
    return _parse_boolean(name, _percent_decode(name, text))


def _percent_decode(name: str, text: str) -> str:
    """``text`` with its %XX escapes decoded as UTF-8; never quotes it (it may be a password)."""
    if _BAD_PERCENT.search(text):
        raise DSNError(f"{name} has a '%' not followed by two hex digits; write '%' itself as %25")
    try:
        decoded: str | None = unquote(text, errors="strict")
    except UnicodeDecodeError:  # its message would quote the password's bytes
        decoded = None
    if decoded is None:
        raise DSNError(f"{name} is not percent-encoded UTF-8")
    return decoded


def _parse_udp_port(name: str, text: str) -> int | None:
    # udp_port=0 is PHP's default, "no UDP"; its own session test passes it.
    port = _parse_integer(name, text)
    return None if port == 0 else port


def _format_server(server: ServerSpec) -> str:
    if server.scheme == "unix":
        if server.username is not None:
            raise DSNError(
                f"server {server.name}: a unix socket's credentials cannot be written "
                f"into a save_path; {_STORE_CREDENTIALS}"
            )
        location = f"unix://{server.host}"
    elif server.username is not None and server.password is not None:
        # safe="": ':', '@', '/', '?', '#', '%' and ',' all encoded, so the entry reads back.
        userinfo = f"{quote(server.username, safe='')}:{quote(server.password, safe='')}"
        location = f"{server.scheme}://{userinfo}@{server.name}"
    else:
        location = f"{server.scheme}://{server.name}"
    params: list[str] = []
    if server.persistent != DEFAULT_PERSISTENT:
        params.append(f"persistent={int(server.persistent)}")
    if server.weight != DEFAULT_WEIGHT:
        params.append(f"weight={server.weight}")
    if server.timeout != DEFAULT_TIMEOUT:
        params.append(f"timeout={_format_seconds(server.timeout)}")
    if server.retry_interval != DEFAULT_RETRY_INTERVAL:
        params.append(f"retry_interval={_format_seconds(server.retry_interval)}")
    if server.scheme == "tcp" and server.udp_port is not None:
        params.append(f"udp_port={server.udp_port}")
    params += _format_tls_parameters(server)
    return f"{location}?{'&'.join(params)}" if params else location


def _format_tls_parameters(server: ServerSpec) -> list[str]:
    values = {
        "tls_ca": server.tls_ca,
        "tls_cert": server.tls_cert,
        "tls_key": server.tls_key,
        "tls_server_name": server.tls_server_name,
    }
    # safe="/": a path keeps its slashes; ',', whitespace, '?', '&', '#', '%', '@', ':'
    # and '=' are encoded, and anything outside ASCII as UTF-8.
    params = [
        f"{name}={quote(value, safe='/')}" for name, value in values.items() if value is not None
    ]
    return params if server.tls_verify else [*params, "tls_verify=0"]


def _format_seconds(seconds: float) -> str:
    # repr() is the shortest text that reads back as the same float; Decimal
    # writes it without an exponent (1e-05 -> 0.00001), and whole seconds lose
    # their ".0" so PHP, whose retry_interval is an integer, reads them too.
    text = format(Decimal(repr(float(seconds))), "f")
    return text.removesuffix(".0")
