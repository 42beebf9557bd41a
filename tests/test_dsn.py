"""parse_dsn reads PHP memcache save_paths as PHP does, rejects nonsense by name,
and format_dsn writes back what it reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memsess.dsn import (
    DEFAULT_PORT,
    DEFAULT_RETRY_INTERVAL,
    DEFAULT_TIMEOUT,
    DEFAULT_WEIGHT,
    MAX_RETRY_INTERVAL,
    MAX_TIMEOUT,
    Scheme,
    ServerSpec,
    format_dsn,
    parse_dsn,
    with_defaults,
)
from memsess.errors import DSNError


def tcp(host: str, port: int = DEFAULT_PORT, **options: Any) -> ServerSpec:
    return ServerSpec("tcp", host, port, **options)


def tls(host: str, port: int = DEFAULT_PORT, **options: Any) -> ServerSpec:
    return ServerSpec("tls", host, port, **options)


# (save_path, servers PHP's memcache extension would build from it)
PHP_SAVE_PATHS = [
    pytest.param(
        "tcp://10.0.0.1:11211?persistent=1&weight=1&timeout=1&retry_interval=15",
        (tcp("10.0.0.1"),),
        id="php-manual-defaults-spelled-out",
    ),
    pytest.param(
        "tcp://host1:11211?persistent=1&weight=2&timeout=2&retry_interval=10,"
        "  ,tcp://host2:11211  ",
        (tcp("host1", weight=2, timeout=2.0, retry_interval=10.0), tcp("host2")),
        id="php-session-test-comma-and-blank-entries",
    ),
    pytest.param(
        "tcp://host1:11211?persistent=1&udp_port=0&weight=2&timeout=2&retry_interval=10",
        (tcp("host1", weight=2, timeout=2.0, retry_interval=10.0, udp_port=None),),
        id="udp_port-0-means-no-udp",
    ),
    pytest.param(
        "tcp://a:11211 tcp://b:11212\ttcp://c:11213\n,tcp://d:11214",
        (tcp("a"), tcp("b", 11212), tcp("c", 11213), tcp("d", 11214)),
        id="whitespace-and-comma-separators",
    ),
    pytest.param("tcp://cache.example.com", (tcp("cache.example.com"),), id="no-port-is-11211"),
    pytest.param("memcached_1:11212", (tcp("memcached_1", 11212),), id="no-scheme-is-tcp"),
    pytest.param("TCP://Cache:11211", (tcp("Cache"),), id="scheme-case-insensitive"),
    pytest.param("tcp://[::1]:11212", (tcp("::1", 11212),), id="ipv6-in-brackets"),
    pytest.param("[2001:db8::7]", (tcp("2001:db8::7"),), id="ipv6-no-scheme-no-port"),
    pytest.param(
        "unix:///var/run/memcached.sock",
        (ServerSpec("unix", "/var/run/memcached.sock", 0),),
        id="unix-socket",
    ),
    pytest.param(
        "unix:///var/run/memcached.sock:0?weight=3",
        (ServerSpec("unix", "/var/run/memcached.sock", 0, weight=3),),
        id="unix-trailing-port-0-chopped-like-php",
    ),
    pytest.param(
        "unix:/tmp/m.sock, UNIX:///tmp/n.sock",
        (ServerSpec("unix", "/tmp/m.sock", 0), ServerSpec("unix", "/tmp/n.sock", 0)),
        id="unix-single-slash-and-upper-case",
    ),
    pytest.param(
        "udp://10.0.0.2:11311",
        (ServerSpec("udp", "10.0.0.2", 11311, udp_port=11311),),
        id="udp-scheme-reads-from-its-port",
    ),
    pytest.param(
        "udp://10.0.0.2",
        (ServerSpec("udp", "10.0.0.2", DEFAULT_PORT, udp_port=DEFAULT_PORT),),
        id="udp-no-port",
    ),
    pytest.param(
        "tcp://10.0.0.3:11211?udp_port=11311",
        (tcp("10.0.0.3", udp_port=11311),),
        id="tcp-with-udp_port",
    ),
    pytest.param(
        "tcp://h?timeout=0.5&retry_interval=2.5",
        (tcp("h", timeout=0.5, retry_interval=2.5),),
        id="fractional-seconds",
    ),
    pytest.param(
        "tcp://h?retry_interval=0&timeout=.25",
        (tcp("h", timeout=0.25, retry_interval=0.0),),
        id="retry-at-once-and-leading-dot",
    ),
    pytest.param(
        "tcp://10.0.0.1:11211?weight=2&timeout=0.5&retry_interval=15, "
        "udp://10.0.0.2:11211, unix:///run/memcached.sock",
        (
            tcp("10.0.0.1", weight=2, timeout=0.5),
            ServerSpec("udp", "10.0.0.2", 11211),
            ServerSpec("unix", "/run/memcached.sock", 0),
        ),
        id="design-doc-example",
    ),
]


@pytest.mark.parametrize(("save_path", "expected"), PHP_SAVE_PATHS)
def test_php_save_path_parses_to_the_servers_php_builds(
    save_path: str, expected: tuple[ServerSpec, ...]
) -> None:
    assert parse_dsn(save_path) == expected


def test_defaults_are_phps() -> None:
    (server,) = parse_dsn("tcp://h")
    assert (server.port, server.weight, server.timeout, server.retry_interval) == (
        11211,
        1,
        1.0,
        15.0,
    )
    assert (DEFAULT_PORT, DEFAULT_WEIGHT, DEFAULT_TIMEOUT, DEFAULT_RETRY_INTERVAL) == (
        11211,
        1,
        1.0,
        15.0,
    )
    assert server.persistent is True
    assert server.udp_port is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[(word, True) for word in ("1", "true", "yes", "on", "TRUE", "On")],
        *[(word, False) for word in ("0", "false", "no", "off", "False", "OFF")],
    ],
)
def test_persistent_words(text: str, expected: bool) -> None:
    (server,) = parse_dsn(f"tcp://h?persistent={text}")
    assert server.persistent is expected


@pytest.mark.parametrize(
    ("save_path", "name", "address"),
    [
        ("tcp://10.0.0.1:11211", "10.0.0.1:11211", ("10.0.0.1", 11211)),
        ("udp://cache:11311", "cache:11311", ("cache", 11311)),
        ("tcp://[::1]:11211", "[::1]:11211", ("::1", 11211)),
        ("unix:///run/m.sock", "unix:/run/m.sock", "/run/m.sock"),
    ],
)
def test_name_and_address(save_path: str, name: str, address: tuple[str, int] | str) -> None:
    (server,) = parse_dsn(save_path)
    assert server.name == name
    assert server.address == address


# (save_path, the entry the message must quote, the bad part it must name)
MALFORMED = [
    ("", "''", "lists no servers"),
    (" ,\t, \n", "' ,\\t, \\n'", "lists no servers"),
    ("tcp://h?weigth=2", "tcp://h?weigth=2", "unknown parameter 'weigth'"),
    ("tcp://h?Weight=2", "tcp://h?Weight=2", "unknown parameter 'Weight'"),
    ("tcp://h?weight=2&weight=3", "tcp://h?weight=2&weight=3", "duplicate parameter 'weight'"),
    ("tcp://h?weight=0", "tcp://h?weight=0", "weight must be an integer >= 1, got 0"),
    ("tcp://h?weight=-2", "tcp://h?weight=-2", "weight must be an integer >= 1, got -2"),
    ("tcp://h?weight=1.5", "tcp://h?weight=1.5", "weight must be an integer, got '1.5'"),
    ("tcp://h?weight=two", "tcp://h?weight=two", "weight must be an integer, got 'two'"),
    ("tcp://h?weight", "tcp://h?weight", "parameter 'weight' has no value"),
    ("tcp://h?weight=", "tcp://h?weight=", "parameter 'weight' has no value"),
    ("tcp://h?timeout=-1", "tcp://h?timeout=-1", "timeout must be a finite number of seconds > 0"),
    ("tcp://h?timeout=0", "tcp://h?timeout=0", "timeout must be a finite number of seconds > 0"),
    ("tcp://h?timeout=1e999", "tcp://h?timeout=1e999", "timeout must be a finite number"),
    (
        "tcp://h?timeout=nan",
        "tcp://h?timeout=nan",
        "timeout must be a number of seconds, got 'nan'",
    ),
    (
        "tcp://h?timeout=inf",
        "tcp://h?timeout=inf",
        "timeout must be a number of seconds, got 'inf'",
    ),
    ("tcp://h?timeout=1s", "tcp://h?timeout=1s", "timeout must be a number of seconds, got '1s'"),
    ("tcp://h?timeout=1_0", "tcp://h?timeout=1_0", "got '1_0'"),
    ("tcp://h?retry_interval=-1", "tcp://h?retry_interval=-1", "retry_interval must be"),
    ("tcp://h?retry_interval=x", "tcp://h?retry_interval=x", "retry_interval must be a number"),
    ("tcp://h?persistent=maybe", "tcp://h?persistent=maybe", "got 'maybe'"),
    ("tcp://h:0", "tcp://h:0", "port must be an integer 1..65535, got 0"),
    ("tcp://h:70000", "tcp://h:70000", "port must be an integer 1..65535, got 70000"),
    ("tcp://h:http", "tcp://h:http", "port 'http' is not a number"),
    ("tcp://h:+80", "tcp://h:+80", "port '+80' is not a number"),
    ("tcp://h:", "tcp://h:", "port '' is not a number"),
    ("tcp://h:11211?udp_port=70000", "tcp://h:11211?udp_port=70000", "udp_port must be"),
    ("tcp://h:11211?udp_port=u", "tcp://h:11211?udp_port=u", "udp_port must be an integer"),
    ("tcp://h?", "tcp://h?", "'?' is not followed by any parameter"),
    ("tcp://h?weight=2&", "tcp://h?weight=2&", "empty parameter in 'weight=2&'"),
    ("tcp://h?=2", "tcp://h?=2", "empty parameter in '=2'"),
    ("http://h:80", "http://h:80", "unknown scheme 'http'"),
    ("tcp:/h:80", "tcp:/h:80", "write tcp://host:port"),
    ("tcp://::1", "tcp://::1", "write an IPv6 address in brackets"),
    ("tcp://2001:db8::1:11211", "tcp://2001:db8::1:11211", "write an IPv6 address in brackets"),
    ("tcp://[::1", "tcp://[::1", "unclosed '['"),
    ("tcp://[::1]11211", "tcp://[::1]11211", "unexpected '11211' after [::1]"),
    ("tcp://[10.0.0.1]:1", "tcp://[10.0.0.1]:1", "brackets are for IPv6 addresses only"),
    ("tcp://[::g]:1", "tcp://[::g]:1", "invalid IPv6 address '::g'"),
    ("tcp://300.1.1.1", "tcp://300.1.1.1", "invalid IPv4 address '300.1.1.1'"),
    ("tcp://user@h:1", "tcp://user@h:1", "invalid host name 'user@h'"),
    ("tcp://:11211", "tcp://:11211", "host is empty"),
    ("tcp://", "tcp://", "host is empty"),
    ("?weight=2", "?weight=2", "host is empty"),
    ("unix://", "unix://", "unix socket path is empty"),
    ("unix://run/m.sock", "unix://run/m.sock", "unix socket path 'run/m.sock' must be absolute"),
    ("unix:///m.sock?udp_port=1", "unix:///m.sock?udp_port=1", "udp_port does not apply to unix"),
    ("udp://h:1?udp_port=2", "udp://h:1?udp_port=2", "udp_port does not apply to udp"),
    ("tcp://h:1, tcp://h:1", "tcp://h:1", "are the same server h:1"),
    ("tcp://h:1, udp://H:1", "udp://H:1", "are the same server"),
    ("tcp://[::1]:1 [0:0::1]:1", "[0:0::1]:1", "are the same server [0:0::1]:1"),
    ("unix:///m.sock unix:///m.sock:0", "unix:///m.sock:0", "are the same server unix:/m.sock"),
    ("tcp://a:1, tcp://b:0, tcp://c:0", "tcp://b:0", "port must be"),
    # Values that parse but would break every request later, far from the save_path.
    (
        "tcp://h?timeout=3000000",
        "tcp://h?timeout=3000000",
        "timeout must be a finite number of seconds > 0 and at most 3600,",
    ),
    (
        "tcp://h?timeout=3600.5",
        "tcp://h?timeout=3600.5",
        "timeout must be a finite number of seconds > 0 and at most 3600,",
    ),
    ("h?retry_interval=86401", "h?retry_interval=86401", "and at most 86400 (PHP"),
    ("h?retry_interval=1e300", "h?retry_interval=1e300", "and at most 86400 (PHP"),
    (f"tcp://{'a' * 64}.example", "a" * 64, f"label '{'a' * 64}' of 64 characters"),
    (f"h, {'a' * 64}:1", f"{'a' * 64}:1", "of 64 characters (DNS allows 1 to 63)"),
    ("tcp://a..b:1", "tcp://a..b:1", "host name label '' of 0 characters (DNS allows 1 to 63)"),
    ("tcp://.a", "tcp://.a", "host name label '' of 0 characters"),
    (f"tcp://{'.'.join(['a' * 63] * 4)}", "a" * 63, "host name of 255 characters"),
]


@pytest.mark.parametrize(("save_path", "entry", "bad_part"), MALFORMED)
def test_malformed_save_path_names_entry_and_bad_part(
    save_path: str, entry: str, bad_part: str
) -> None:
    with pytest.raises(DSNError, match=re.escape(bad_part)) as raised:
        parse_dsn(save_path)
    assert entry in str(raised.value)


@pytest.mark.parametrize(
    ("save_path", "expected"),
    [
        (f"h?timeout={MAX_TIMEOUT}", tcp("h", timeout=MAX_TIMEOUT)),
        (f"h?retry_interval={MAX_RETRY_INTERVAL}", tcp("h", retry_interval=MAX_RETRY_INTERVAL)),
        (f"tcp://{'a' * 63}.example", tcp(f"{'a' * 63}.example")),
        (
            f"tcp://{'.'.join(['a' * 63] * 3)}.{'b' * 61}",
            tcp(f"{'.'.join(['a' * 63] * 3)}.{'b' * 61}"),
        ),
        ("tcp://cache.example.", tcp("cache.example.")),  # a fully qualified name
    ],
    ids=["timeout", "retry_interval", "63-character label", "253-character name", "root dot"],
)
def test_values_at_the_limits_are_accepted(save_path: str, expected: ServerSpec) -> None:
    assert parse_dsn(save_path) == (expected,)


def test_dsn_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="weight"):
        parse_dsn("tcp://h?weight=0")


def test_first_bad_entry_is_the_one_named() -> None:
    with pytest.raises(DSNError) as raised:
        parse_dsn("tcp://a:1, tcp://b:0, tcp://c:0")
    assert "tcp://a:1" not in str(raised.value)
    assert "tcp://c:0" not in str(raised.value)


@pytest.mark.parametrize(
    ("options", "bad_part"),
    [
        ({"weight": True}, "weight must be an integer >= 1, got True"),
        ({"timeout": float("nan")}, "timeout must be a finite number"),
        ({"retry_interval": float("inf")}, "retry_interval must be a finite number"),
        (
            {"timeout": 3_000_000},
            "timeout must be a finite number of seconds > 0 and at most 3600,",
        ),
        (
            {"retry_interval": 10**6},
            "retry_interval must be a finite number of seconds >= 0 and at most",
        ),
        ({"host": "a" * 64}, "of 64 characters (DNS allows 1 to 63)"),
        ({"persistent": 1}, "persistent must be True or False"),
        ({"udp_port": 0}, "udp_port must be an integer 1..65535"),
        ({"host": "[::1]"}, "invalid IPv6 address '[::1]'"),
        ({"host": "a,b"}, "invalid host name 'a,b'"),
        ({"scheme": "http"}, "unknown scheme 'http'"),
        ({"scheme": "udp", "udp_port": 1}, "udp_port 1 differs from the udp:// port 11211"),
        ({"scheme": "unix", "host": "/m.sock"}, "unix sockets have no port"),
        ({"scheme": "unix", "host": "/m.sock:0", "port": 0}, "ends in ':0'"),
        ({"scheme": "unix", "host": "/a b", "port": 0}, "must be absolute"),
    ],
)
def test_server_spec_validates_direct_construction(
    options: dict[str, object], bad_part: str
) -> None:
    fields: dict[str, object] = {"scheme": "tcp", "host": "h", "port": DEFAULT_PORT, **options}
    with pytest.raises(DSNError, match=re.escape(bad_part)):
        ServerSpec(**fields)  # type: ignore[arg-type]


def test_udp_server_built_directly_reads_from_its_port() -> None:
    assert ServerSpec("udp", "h", 11311).udp_port == 11311


@pytest.mark.parametrize(
    ("save_path", "formatted"),
    [
        ("tcp://h", "tcp://h:11211"),
        ("h:11211?persistent=1&weight=1&timeout=1&retry_interval=15", "tcp://h:11211"),
        (
            "TCP://h:1?retry_interval=10&weight=2&persistent=no&udp_port=2&timeout=0.5",
            "tcp://h:1?persistent=0&weight=2&timeout=0.5&retry_interval=10&udp_port=2",
        ),
        ("tcp://h?timeout=0.00001", "tcp://h:11211?timeout=0.00001"),
        ("udp://[::1]", "udp://[::1]:11211"),
        ("unix:/run/m.sock:0, h", "unix:///run/m.sock, tcp://h:11211"),
        (
            "TLS://u:p%40ss@H:1?tls_verify=off&tls_ca=/a%20b&udp_port=0",
            "tls://u:p%40ss@H:1?tls_ca=/a%20b&tls_verify=0",
        ),
        ("tcp://u:a@b:c@[::1]", "tcp://u:a%40b%3Ac@[::1]:11211"),
        ("tls://h?tls_server_name=::1", "tls://h:11211?tls_server_name=%3A%3A1"),
    ],
)
def test_format_dsn_writes_canonical_save_path(save_path: str, formatted: str) -> None:
    assert format_dsn(parse_dsn(save_path)) == formatted


@pytest.mark.parametrize(("save_path", "expected"), PHP_SAVE_PATHS)
def test_format_dsn_round_trips_php_examples(
    save_path: str, expected: tuple[ServerSpec, ...]
) -> None:
    assert parse_dsn(format_dsn(expected)) == expected


@pytest.mark.parametrize(
    ("servers", "bad_part"),
    [
        ((), "without servers"),
        ((tcp("h"), tcp("H")), "are the same server"),
    ],
)
def test_format_dsn_refuses_what_parse_dsn_would_refuse(
    servers: tuple[ServerSpec, ...], bad_part: str
) -> None:
    with pytest.raises(DSNError, match=bad_part):
        format_dsn(servers)


# --- tls:// and user:password@ -------------------------------------------------

SECRET = "hunter2"  # every password below holds it; no message may show any of it


def assert_no_password_in(error: BaseException) -> None:
    """Neither the error nor any exception chained to it (a traceback prints those
    too) shows a piece of a password."""
    chained: BaseException | None = error
    while chained is not None:
        for piece in ("hunter", "ter2", "pppp"):
            assert piece not in str(chained)
        chained = chained.__cause__ or chained.__context__


TLS_AND_CREDENTIAL_SAVE_PATHS = [
    pytest.param("tls://cache.example", (tls("cache.example"),), id="tls-default-port"),
    pytest.param("TLS://[::1]:11212", (tls("::1", 11212),), id="tls-ipv6-upper-case"),
    pytest.param(
        "tls://h?tls_ca=/etc/ssl/memcached%20ca%2C2024.pem",
        (tls("h", tls_ca="/etc/ssl/memcached ca,2024.pem"),),
        id="percent-encoded-space-and-comma-in-path",
    ),
    pytest.param(
        "tls://h?tls_ca=/etc/caf%C3%A9/ca.pem&tls_cert=rel/c.pem",
        (tls("h", tls_ca="/etc/café/ca.pem", tls_cert="rel/c.pem"),),
        id="utf-8-and-relative-paths",
    ),
    pytest.param(
        "tls://10.0.0.1?tls_cert=/c.pem&tls_key=/k.pem&tls_server_name=cache.internal"
        "&tls_verify=TRUE&timeout=0.5",
        (
            tls(
                "10.0.0.1",
                tls_cert="/c.pem",
                tls_key="/k.pem",
                tls_server_name="cache.internal",
                timeout=0.5,
            ),
        ),
        id="client-certificate-and-server-name",
    ),
    pytest.param("tls://h?tls_cert=/both.pem", (tls("h", tls_cert="/both.pem"),), id="key-in-cert"),
    pytest.param(
        "tls://h?tls_server_name=%3A%3A1, tls://g?tls_server_name=10.0.0.9",
        (tls("h", tls_server_name="::1"), tls("g", tls_server_name="10.0.0.9")),
        id="server-name-ip-addresses",
    ),
    pytest.param("tls://h?tls_verify=0", (tls("h", tls_verify=False),), id="verify-off"),
    pytest.param("tls://h?tls_verify=%6Fff", (tls("h", tls_verify=False),), id="verify-encoded"),
    pytest.param("tls://h?udp_port=0", (tls("h"),), id="udp_port-0-is-no-udp-on-tls-too"),
    pytest.param(
        f"tcp://memsess:{SECRET}@10.0.0.1:11211",
        (tcp("10.0.0.1", username="memsess", password=SECRET),),
        id="tcp-credentials",
    ),
    pytest.param(
        f"tls://memsess:{SECRET}%40%3A%2C%25%3F@[2001:db8::1]:11212?tls_ca=/ca.pem",
        (
            tls(
                "2001:db8::1",
                11212,
                username="memsess",
                password=f"{SECRET}@:,%?",
                tls_ca="/ca.pem",
            ),
        ),
        id="tls-credentials-percent-encoded-ipv6",
    ),
    pytest.param(
        f"tcp://u:{SECRET}@b:c@h:1",
        (tcp("h", 1, username="u", password=f"{SECRET}@b:c"),),
        id="raw-at-and-colon-stay-in-the-password",
    ),
    pytest.param(
        "tcp://us%65r:p/w#x@h",
        (tcp("h", username="user", password="p/w#x"),),
        id="raw-slash-and-hash-in-password",
    ),
    pytest.param(
        f"tcp://a, tls://u:{SECRET}@b, unix:///run/m.sock",
        (tcp("a"), tls("b", username="u", password=SECRET), ServerSpec("unix", "/run/m.sock", 0)),
        id="mixed",
    ),
    pytest.param(
        "unix:///run/memcached@1.sock unix:/run/u:p@2.sock",
        (ServerSpec("unix", "/run/memcached@1.sock", 0), ServerSpec("unix", "/run/u:p@2.sock", 0)),
        id="at-sign-in-socket-path-is-no-credentials",
    ),
]


@pytest.mark.parametrize(("save_path", "expected"), TLS_AND_CREDENTIAL_SAVE_PATHS)
def test_tls_and_credentials_parse(save_path: str, expected: tuple[ServerSpec, ...]) -> None:
    assert parse_dsn(save_path) == expected


@pytest.mark.parametrize(("save_path", "expected"), TLS_AND_CREDENTIAL_SAVE_PATHS)
def test_format_dsn_round_trips_tls_and_credentials(
    save_path: str, expected: tuple[ServerSpec, ...]
) -> None:
    assert parse_dsn(format_dsn(expected)) == expected


def test_tls_defaults() -> None:
    (server,) = parse_dsn("tls://h")
    assert server.tls is True
    assert (server.tls_ca, server.tls_cert, server.tls_key, server.tls_server_name) == (
        None,
        None,
        None,
        None,
    )
    assert server.tls_verify is True
    assert (server.username, server.password, server.udp_port) == (None, None, None)


@pytest.mark.parametrize("save_path", ["tcp://h", "udp://h", "unix:///m.sock"])
def test_only_tls_servers_speak_tls(save_path: str) -> None:
    (server,) = parse_dsn(save_path)
    assert server.tls is False


def test_tls_server_name_and_address_are_those_of_tcp() -> None:
    (server,) = parse_dsn(f"tls://u:{SECRET}@[::1]:11212")
    assert server.name == "[::1]:11212"
    assert server.address == ("::1", 11212)


def test_tcp_and_tls_to_one_host_and_port_are_one_server() -> None:
    with pytest.raises(DSNError, match="are the same server H:1"):
        parse_dsn("tcp://h:1, tls://H:1")


def test_format_dsn_encodes_every_delimiter_in_values() -> None:
    awkward = "/a b,c\td?e&f#g%h@i:j=k+l/é"
    server = tls(
        "h",
        username="u~._-",
        password="p:@/?#&=%,+[]!$'()*;",
        tls_ca=awkward,
        tls_cert=awkward,
        tls_key=awkward,
        tls_server_name="::1",
    )
    save_path = format_dsn([server])
    query = save_path.partition("?")[2]
    assert not re.search(r"[\s,?#@:]", query)
    assert "@" not in save_path.partition("@")[2]  # the one '@' ends the credentials
    assert parse_dsn(save_path) == (server,)


# (save_path, the entry as the message must quote it, the bad part it must name)
MALFORMED_TLS_AND_CREDENTIALS = [
    ("tls://u@h", "tls://u@h", "invalid host name 'u@h': a user name before '@' needs a password"),
    ("tls://u:@h", "tls://u:***@h", "password must be non-empty printable ASCII"),
    (f"tls://:{SECRET}@h", "tls://:***@h", "username must be non-empty printable ASCII"),
    (f"tls://us%20er:{SECRET}@h", "tls://us%20er:***@h", "username must be non-empty printable"),
    (f"tls://u%3Ax:{SECRET}@h", "tls://u%3Ax:***@h", "without whitespace or ':'"),
    (f"tls://u:{SECRET}%20x@h", "tls://u:***@h", "password must be non-empty printable ASCII"),
    (f"tls://u:{SECRET}%C3%A9@h", "tls://u:***@h", "password must be non-empty printable ASCII"),
    (f"tls://u:{SECRET}%zz@h", "tls://u:***@h", "password has a '%' not followed by two hex"),
    (f"tls://u:{SECRET}%@h", "tls://u:***@h", "password has a '%' not followed by two hex"),
    (f"tls://u:{SECRET}%FF@h", "tls://u:***@h", "password is not percent-encoded UTF-8"),
    (f"tls://u%FF:{SECRET}@h", "tls://u%FF:***@h", "username is not percent-encoded UTF-8"),
    (f"tls://u:{'p' * 253}@h", "tls://u:***@h", "username:password is longer than 254"),
    (f"udp://u:{SECRET}@h", "udp://u:***@h", "UDP reads cannot authenticate"),
    (f"tcp://u:{SECRET}@h?udp_port=11311", "tcp://u:***@h?udp_port=11311", "per TCP connection"),
    (
        f"unix://u:{SECRET}@/run/m.sock",
        "server entry 1: ",
        "unix:// takes no user:password@; pass the store's username= and password= options",
    ),
    (f"h, unix:u:{SECRET}@/m.sock", "server entry 2: ", "unix:// takes no user:password@"),
    (f"http://u:{SECRET}@h", "server entry 1 has '@'", "but no tcp:// or tls://"),
    ("http://h", "http://h", "unknown scheme 'http'; expected tcp://, tls://, udp:// or unix://"),
    (f"tls://u:{SECRET}@h:0", "tls://u:***@h:0", "port must be an integer 1..65535, got 0"),
    (f"tls://u:{SECRET}@[::1", "tls://u:***@[::1", "unclosed '['"),
    (f"tls://u:{SECRET}@", "tls://u:***@", "host is empty"),
    (f"tls://u:{SECRET}@h?weight=0", "tls://u:***@h?weight=0", "weight must be an integer >= 1"),
    # Typed raw, ',' or whitespace split an entry, and '?' starts its query, inside the password.
    ("tls://u:hun,ter2@h:1", "server entry 2 has '@'", "but no tcp:// or tls://"),
    ("tls://u:hun ter2@h:1", "server entry 2 has '@'", "with ',' and whitespace in them"),
    ("tls://u:hun\tter2@h:1, tcp://x", "server entry 2 has '@'", "they split the entry in two"),
    ("tls://u:hun?ter2@h", "tls://u:***@h", "'@' in the parameters; write it %40"),
    (f"u:{SECRET}@h", "server entry 1 has '@'", "but no tcp:// or tls://"),
    ("tls://h?tls_ca=/a@b.pem", "tls://h?tls_ca=/a@b.pem", "'@' in the parameters; write it %40"),
    (
        f"tls://u:{SECRET}@h:1 tls://v:{SECRET}@H:1",
        "'tls://u:***@h:1' and 'tls://v:***@H:1'",
        "are the same server H:1",
    ),
    # tls:// and UDP
    ("tls://h?udp_port=11311", "tls://h?udp_port=11311", "memcached has no DTLS: UDP reads"),
    ("tls://h?udp_port=1", "tls://h?udp_port=1", "drop udp_port, or use tcp:// for a trusted"),
    # tls_* parameters
    ("tcp://h?tls_ca=/ca.pem", "tcp://h?tls_ca=/ca.pem", "tls_ca applies to tls:// servers only"),
    ("h?tls_cert=/c.pem", "h?tls_cert=/c.pem", "tls_cert applies to tls:// servers only"),
    ("udp://h?tls_key=/k.pem", "udp://h?tls_key=/k.pem", "tls_key applies to tls:// servers only"),
    (
        "unix:///m.sock?tls_server_name=h",
        "unix:///m.sock?tls_server_name=h",
        "tls_server_name applies to tls:// servers only",
    ),
    ("tcp://h?tls_verify=1", "tcp://h?tls_verify=1", "tls_verify applies to tls:// servers only"),
    ("tls://h?tls_key=/k.pem", "tls://h?tls_key=/k.pem", "tls_key is the private key of a client"),
    ("tls://h?tls_verify=maybe", "tls://h?tls_verify=maybe", "tls_verify must be one of 0/1/"),
    ("tls://h?tls_ca=", "tls://h?tls_ca=", "parameter 'tls_ca' has no value"),
    ("tls://h?tls_ca=/a&tls_ca=/b", "tls://h?tls_ca=/a&tls_ca=/b", "duplicate parameter 'tls_ca'"),
    ("tls://h?tls_ca=%00", "tls://h?tls_ca=%00", "tls_ca must be a file path (a non-empty str"),
    ("tls://h?tls_ca=/a%zz", "tls://h?tls_ca=/a%zz", "tls_ca has a '%' not followed by two hex"),
    ("tls://h?tls_cert=/a%E9", "tls://h?tls_cert=/a%E9", "tls_cert is not percent-encoded UTF-8"),
    (
        "tls://h?tls_server_name=a_b..c",
        "tls://h?tls_server_name=a_b..c",
        "tls_server_name: host name label '' of 0 characters",
    ),
    (
        "tls://h?tls_server_name=%5B%3A%3A1%5D",
        "tls://h?tls_server_name=%5B%3A%3A1%5D",
        "tls_server_name: invalid IPv6 address '[::1]'",
    ),
    (
        "tls://h?tls_server_name=a%20b",
        "tls://h?tls_server_name=a%20b",
        "tls_server_name: invalid host name 'a b'",
    ),
    (
        "tls://h?tls_ca_file=/ca.pem",
        "tls://h?tls_ca_file=/ca.pem",
        "unknown parameter 'tls_ca_file'; expected one of persistent, weight, timeout, "
        "retry_interval, udp_port, tls_ca, tls_cert, tls_key, tls_server_name, tls_verify",
    ),
]


@pytest.mark.parametrize(("save_path", "entry", "bad_part"), MALFORMED_TLS_AND_CREDENTIALS)
def test_malformed_tls_or_credentials_name_the_entry_without_its_password(
    save_path: str, entry: str, bad_part: str
) -> None:
    with pytest.raises(DSNError, match=re.escape(bad_part)) as raised:
        parse_dsn(save_path)
    assert entry in str(raised.value)
    assert_no_password_in(raised.value)


def test_repr_never_shows_the_password() -> None:
    servers = parse_dsn(f"tls://memsess:{SECRET}@h, tcp://memsess:{SECRET}@g")
    for text in (repr(servers), str(servers[0]), repr(servers[1])):
        assert SECRET not in text
        assert "username='memsess'" in text
        assert "password" not in text
    assert servers[0].password == SECRET


def test_unix_socket_credentials_are_options_not_save_path() -> None:
    server = ServerSpec("unix", "/run/m.sock", 0, username="memsess", password=SECRET)
    assert server.username == "memsess"
    with pytest.raises(DSNError, match="pass the store's username= and password= options") as err:
        format_dsn([server])
    assert_no_password_in(err.value)


def test_format_dsn_names_same_servers_without_their_passwords() -> None:
    servers = [tcp("h", username="u", password=SECRET), tls("H", username="v", password=SECRET)]
    with pytest.raises(DSNError, match="are the same server") as raised:
        format_dsn(servers)
    assert_no_password_in(raised.value)
    assert "'tcp://u:***@h:11211' and 'tls://v:***@H:11211'" in str(raised.value)


@pytest.mark.parametrize(
    ("options", "bad_part"),
    [
        ({"username": "u"}, "username and password go together: give both or neither"),
        ({"password": SECRET}, "username and password go together"),
        ({"scheme": "udp", "username": "u", "password": SECRET}, "UDP reads cannot authenticate"),
        ({"udp_port": 11311, "username": "u", "password": SECRET}, "per TCP connection"),
        ({"username": "", "password": SECRET}, "username must be non-empty printable ASCII"),
        ({"username": "a b", "password": SECRET}, "without whitespace or ':'"),
        ({"username": "a:b", "password": SECRET}, "without whitespace or ':'"),
        ({"username": b"u", "password": SECRET}, "username must be"),
        ({"username": "u", "password": ""}, "password must be non-empty printable ASCII"),
        ({"username": "u", "password": f"{SECRET}\t"}, "password must be non-empty printable"),
        ({"username": "u", "password": f"{SECRET}é"}, "password must be non-empty printable"),
        ({"username": "u", "password": SECRET.encode()}, "password must be"),
        ({"username": "u", "password": SECRET * 40}, "username:password is longer than 254"),
        ({"scheme": "tls", "udp_port": 11311}, "memcached has no DTLS"),
        ({"tls_ca": "/ca.pem"}, "tls_ca applies to tls:// servers only"),
        ({"tls_verify": False}, "tls_verify applies to tls:// servers only"),
        ({"scheme": "udp", "tls_cert": "/c.pem"}, "tls_cert applies to tls:// servers only"),
        (
            {"scheme": "unix", "host": "/m.sock", "port": 0, "tls_server_name": "h"},
            "tls_server_name applies to tls:// servers only",
        ),
        ({"scheme": "tls", "tls_key": "/k.pem"}, "tls_key is the private key"),
        ({"scheme": "tls", "tls_verify": 0}, "tls_verify must be True or False, got 0"),
        ({"scheme": "tls", "tls_ca": ""}, "tls_ca must be a file path"),
        ({"scheme": "tls", "tls_cert": "/a\x00b"}, "tls_cert must be a file path"),
        ({"scheme": "tls", "tls_ca": Path("/ca.pem")}, "tls_ca must be a file path"),
        ({"scheme": "tls", "tls_ca": "/caf\udce9.pem"}, "is not UTF-8 text"),
        ({"scheme": "tls", "tls_server_name": ""}, "tls_server_name must be a DNS name or an IP"),
        ({"scheme": "tls", "tls_server_name": "a,b"}, "tls_server_name: invalid host name 'a,b'"),
        ({"scheme": "tls", "tls_server_name": "300.1.1.1"}, "tls_server_name: invalid IPv4"),
    ],
)
def test_server_spec_validates_tls_and_credentials(
    options: dict[str, object], bad_part: str
) -> None:
    fields: dict[str, object] = {"scheme": "tcp", "host": "h", "port": DEFAULT_PORT, **options}
    with pytest.raises(DSNError, match=re.escape(bad_part)) as raised:
        ServerSpec(**fields)  # type: ignore[arg-type]
    assert_no_password_in(raised.value)


def test_credentials_at_the_length_limit_are_accepted() -> None:
    password = "p" * (254 - len("u:"))
    (server,) = parse_dsn(f"tls://u:{password}@h")
    assert server.password == password


# --- property: any valid server list survives format_dsn -> parse_dsn ---------

hostnames = st.from_regex(
    r"[A-Za-z][A-Za-z0-9_-]{0,30}(\.[A-Za-z0-9_-]{1,30}){0,3}\.?", fullmatch=True
)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(1, 65535)
timeouts = st.floats(min_value=0, max_value=MAX_TIMEOUT, exclude_min=True)
retry_intervals = st.floats(min_value=0, max_value=MAX_RETRY_INTERVAL)
usernames = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
    min_size=1,
    max_size=20,
)
passwords = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
# Any text a path can hold: every delimiter of the grammar, spaces, non-ASCII; no NUL.
tls_paths = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30
)


@st.composite
def tls_options(draw: st.DrawFn) -> dict[str, object]:
    tls_cert = draw(st.none() | tls_paths)
    return {
        "tls_ca": draw(st.none() | tls_paths),
        "tls_cert": tls_cert,
        "tls_key": None if tls_cert is None else draw(st.none() | tls_paths),
        "tls_server_name": draw(st.none() | hostnames | ipv4 | ipv6),
        "tls_verify": draw(st.booleans()),
    }


@st.composite
def server_specs(draw: st.DrawFn) -> ServerSpec:
    schemes: list[Scheme] = ["tcp", "udp", "unix", "tls"]
    scheme = draw(st.sampled_from(schemes))
    options: dict[str, Any] = {
        "weight": draw(st.integers(1, 10_000)),
        "timeout": draw(timeouts),
        "retry_interval": draw(retry_intervals),
        "persistent": draw(st.booleans()),
    }
    if scheme == "unix":
        path = draw(st.from_regex(r"/[A-Za-z0-9_./-]{0,40}", fullmatch=True))
        return ServerSpec("unix", path, 0, **options)
    host = draw(st.one_of(hostnames, ipv4, ipv6))
    udp_port = draw(st.none() | ports) if scheme == "tcp" else None
    if scheme in ("tcp", "tls") and udp_port is None and draw(st.booleans()):
        options |= {"username": draw(usernames), "password": draw(passwords)}
    if scheme == "tls":
        options |= draw(tls_options())
    return ServerSpec(scheme, host, draw(ports), udp_port=udp_port, **options)


server_lists = st.lists(server_specs(), min_size=1, max_size=6, unique_by=lambda s: s.name.lower())


@given(server_lists)
def test_parse_dsn_inverts_format_dsn(servers: list[ServerSpec]) -> None:
    assert parse_dsn(format_dsn(servers)) == tuple(servers)


@given(server_lists, st.data())
def test_any_mix_of_separators_gives_the_same_servers(
    servers: list[ServerSpec], data: st.DataObject
) -> None:
    entries = format_dsn(servers).split(", ")
    separators = st.from_regex(r"[ ,\t\r\n]+", fullmatch=True)
    save_path = data.draw(separators | st.just("")) + entries[0]
    for entry in entries[1:]:
        save_path += data.draw(separators) + entry
    save_path += data.draw(separators | st.just(""))
    assert parse_dsn(save_path) == tuple(servers)


# A password typed raw: every delimiter of the grammar, separators included, around
# "XQ", which no message of parse_dsn holds. (A separator followed by "tcp://" or
# "unix:/" would start a real entry; such passwords are left out.)
raw_passwords = st.lists(
    st.sampled_from(["XQ", ",", " ", "\t", "?", "#", "%", "%zz", "%FF", "%2", "@", ":", "/"])
    | st.sampled_from(["&", "=", "[", "]", "://", ",://", ",XQ://", "unix"]),
    max_size=8,
).map(lambda parts: f"XQ{''.join(parts)}XQ")


@given(
    st.sampled_from(["tcp://", "TLS://", "udp://", "unix://", "http://", "tcp:/", ""]),
    st.sampled_from(["u", "", "u%20", "u%3A"]),
    raw_passwords,
    st.sampled_from(["h", "h:1", "[::1]:1", "/run/m.sock", "h?weight=0", "h?tls_ca=/a", "", "h?"]),
)
def test_a_password_typed_raw_never_shows(
    prefix: str, username: str, password: str, after: str
) -> None:
    try:
        servers = parse_dsn(f"{prefix}{username}:{password}@{after}, tcp://h:1")
    except DSNError as error:
        chained: BaseException | None = error
        while chained is not None:
            assert "XQ" not in str(chained)
            chained = chained.__cause__ or chained.__context__
    else:
        assert "XQ" not in repr(servers)
        assert all("XQ" not in server.host for server in servers)


# -- PHP's persistent flag, and php-memcached's save_path ------------------------------


def test_persistent_0_is_read_and_documented_as_changing_nothing() -> None:
    # PHP users copy persistent=0 (the session handler's default) from their config:
    # it parses, and the docs say why memsess pools connections anyway.
    (server,) = parse_dsn("tcp://h:11211?persistent=0")
    assert server.persistent is False
    assert "changes nothing" in (ServerSpec.__doc__ or "")
    assert "pools connections" in (parse_dsn.__doc__ or "")


@pytest.mark.parametrize(
    "save_path",
    [
        "PERSISTENT=myapp 10.0.0.1:11211:1, 10.0.0.2:11211:1",
        "persistent=myapp 10.0.0.1:11211",
        "10.0.0.1:11211:1",
        "tcp://10.0.0.1:11211, cache.example:11211:2",
    ],
)
def test_php_memcached_save_path_says_which_extensions_syntax_memsess_reads(
    save_path: str,
) -> None:
    with pytest.raises(DSNError) as raised:
        parse_dsn(save_path)
    message = str(raised.value)
    assert "PHP memcache's (pecl/memcache) session.save_path, not php-memcached's" in message
    assert "write tcp://host:port" in message


def test_an_ipv6_address_without_brackets_is_still_told_to_use_brackets() -> None:
    with pytest.raises(DSNError, match=r"IPv6 address in brackets"):
        parse_dsn("fe80::1:11211")


# -- store-wide timeout and retry_interval -------------------------------------------


def test_store_wide_timeout_and_retry_interval_apply_only_where_an_entry_has_none() -> None:
    servers = parse_dsn(
        "tcp://a?timeout=2, tcp://b?retry_interval=30, tcp://c?timeout=1&retry_interval=15, d",
        timeout=0.25,
        retry_interval=5,
    )
    timings = [(server.timeout, server.retry_interval) for server in servers]
    # c gives PHP's defaults itself: given as the default is still given.
    assert timings == [(2.0, 5.0), (0.25, 30.0), (1.0, 15.0), (0.25, 5.0)]


def test_without_store_wide_values_entries_keep_phps_defaults() -> None:
    (server,) = parse_dsn("tcp://a")
    assert (server.timeout, server.retry_interval) == (DEFAULT_TIMEOUT, DEFAULT_RETRY_INTERVAL)
    assert server.defaulted == {"timeout", "retry_interval"}
    (written,) = parse_dsn("tcp://a?timeout=1")
    assert written.defaulted == {"retry_interval"}
    assert written == server  # what was written down does not change what a spec is


def test_with_defaults_leaves_a_spec_made_by_hand_alone() -> None:
    by_hand = tcp("a")
    assert with_defaults([by_hand], timeout=0.25, retry_interval=3) == (by_hand,)
    (parsed,) = with_defaults(parse_dsn("tcp://a"), timeout=0.25)
    assert (parsed.timeout, parsed.defaulted) == (0.25, frozenset({"retry_interval"}))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": float("nan")}, "timeout must be a finite number of seconds > 0"),
        ({"timeout": 0}, "timeout must be a finite number of seconds > 0"),
        ({"timeout": True}, "timeout must be a finite number of seconds > 0"),
        ({"retry_interval": -1}, "retry_interval must be a finite number of seconds >= 0"),
        ({"retry_interval": float("inf")}, "retry_interval must be a finite number"),
    ],
)
def test_store_wide_values_are_checked_even_when_every_entry_has_its_own(
    options: dict[str, float], message: str
) -> None:
    with pytest.raises(DSNError, match=message):
        parse_dsn("tcp://a?timeout=1&retry_interval=15", **options)


# -- a save_path given as a list of servers ------------------------------------------


@pytest.mark.parametrize(
    "save_path",
    [
        ["tcp://a:1", "b:2?weight=2"],
        ("tcp://a:1", "b:2?weight=2"),
        ["tcp://a:1, b:2?weight=2"],
        ["tcp://a:1", " b:2?weight=2 "],
    ],
)
def test_a_list_or_tuple_of_server_strings_reads_as_one_save_path(
    save_path: list[str] | tuple[str, ...],
) -> None:
    assert parse_dsn(save_path) == parse_dsn("tcp://a:1, tcp://b:2?weight=2")


@pytest.mark.parametrize(
    ("save_path", "named"),
    [
        (b"tcp://a:1", "not bytes"),
        ({"tcp://a:1"}, "not set"),
        ({"a": "tcp://a:1"}, "not dict"),
        (iter(["tcp://a:1"]), "not list_iterator"),
        (None, "not NoneType"),
        (["tcp://a:1", 11211], r"save_path\[1\] must be a str .*not int"),
        ([b"tcp://a:1"], r"save_path\[0\] must be a str .*not bytes"),
    ],
)
def test_anything_else_is_a_type_error_naming_what_was_given(save_path: object, named: str) -> None:
    with pytest.raises(TypeError, match=named):
        parse_dsn(save_path)  # type: ignore[arg-type]


def test_an_empty_list_lists_no_servers() -> None:
    with pytest.raises(DSNError, match="lists no servers"):
        parse_dsn([])
