"""parse_dsn reads PHP memcache save_paths as PHP does, rejects nonsense by name,
and format_dsn writes back what it reads."""

from __future__ import annotations

import re

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
    ServerSpec,
    format_dsn,
    parse_dsn,
)
from memsess.errors import DSNError


def tcp(host: str, port: int = DEFAULT_PORT, **options: object) -> ServerSpec:
    return ServerSpec("tcp", host, port, **options)  # type: ignore[arg-type]


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


# --- property: any valid server list survives format_dsn -> parse_dsn ---------

hostnames = st.from_regex(
    r"[A-Za-z][A-Za-z0-9_-]{0,30}(\.[A-Za-z0-9_-]{1,30}){0,3}\.?", fullmatch=True
)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(1, 65535)
timeouts = st.floats(min_value=0, max_value=MAX_TIMEOUT, exclude_min=True)
retry_intervals = st.floats(min_value=0, max_value=MAX_RETRY_INTERVAL)


@st.composite
def server_specs(draw: st.DrawFn) -> ServerSpec:
    scheme = draw(st.sampled_from(["tcp", "udp", "unix"]))
    options = {
        "weight": draw(st.integers(1, 10_000)),
        "timeout": draw(timeouts),
        "retry_interval": draw(retry_intervals),
        "persistent": draw(st.booleans()),
    }
    if scheme == "unix":
        path = draw(st.from_regex(r"/[A-Za-z0-9_./-]{0,40}", fullmatch=True))
        return ServerSpec("unix", path, 0, **options)  # type: ignore[arg-type]
    host = draw(st.one_of(hostnames, ipv4, ipv6))
    udp_port = draw(st.none() | ports) if scheme == "tcp" else None
    return ServerSpec(scheme, host, draw(ports), udp_port=udp_port, **options)  # type: ignore[arg-type]


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
