"""Unit tests for cacheproxy.config: parsing, validation, precedence, interpolation, masking. No sockets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cacheproxy.config import (
    Address,
    AdminConfig,
    CacheConfig,
    Config,
    ConfigError,
    InvalidationConfig,
    LimitsConfig,
    LoggingConfig,
    Rule,
    ShutdownConfig,
    SnapshotConfig,
    UpstreamConfig,
    WriteThroughConfig,
    build_config,
    format_duration,
    format_size,
    interpolate,
    load_config,
    parse_duration,
    parse_size,
    render_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "cacheproxy.yaml"
SECRET = "s3cr3t-P@ss"

FULL_YAML = """\
listen: "[::1]:7432"
upstream: "postgresql://app:s3cr3t-P%40ss@db.internal:5433/shop?sslmode=verify-full&sslrootcert=/etc/ca.pem"
admin:
  listen: "0.0.0.0:9999"
  users: [ops, monitor]
limits:
  max_client_connections: 50
  max_message_size: 8MiB
  idle_client_timeout: 5m
  connect_timeout: 3s
shutdown:
  timeout: 45s
logging:
  level: debug
  format: json
  slow_query: 250ms
cache:
  enabled: false
  max_memory: 1GiB
  max_entry_size: 2MiB
  shards: 64
  default_ttl: 90s
  analysis_cache_size: 500
snapshot:
  path: /var/lib/cacheproxy/snap.bin
  interval: 1h
rules:
  - tables: [public.audit_log]
    strategy: none
  - tables: ["public.*", orders, '"Quoted"."T"']
    ttl: 30s
    strategy: write_through
    in_transaction: always
"""

MINIMAL = {"upstream": "postgres://127.0.0.1/postgres"}


def write(tmp_path: Path, text: str, name: str = "cacheproxy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def build_error(data: dict[str, object]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_config({**MINIMAL, **data}, source="conf.yaml")
    return info.value


# --- a full file ----------------------------------------------------------------------------------


def test_full_file_loads_every_key(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_YAML)
    config = load_config(path, env={})

    assert config.source == path
    assert config.listen == Address("::1", 7432)
    up = config.upstream
    assert (up.host, up.port, up.database, up.user, up.password) == (
        "db.internal",
        5433,
        "shop",
        "app",
        SECRET,
    )
    assert (up.sslmode, up.sslrootcert, up.sslcert, up.sslkey) == ("verify-full", "/etc/ca.pem", None, None)
    assert up.connect_timeout == 3.0  # from limits.connect_timeout: the URL has none
    assert config.admin == AdminConfig(Address("0.0.0.0", 9999), ("ops", "monitor"))
    assert config.limits == LimitsConfig(50, 8 * 2**20, 300.0, 3.0)
    assert config.shutdown == ShutdownConfig(45.0)
    assert config.logging == LoggingConfig("debug", "json", 0.25)
    assert config.cache == CacheConfig(False, 2**30, 2 * 2**20, 64, 90.0, 500)
    assert config.snapshot == SnapshotConfig("/var/lib/cacheproxy/snap.bin", 3600.0)
    assert config.rules == (
        Rule(("public.audit_log",), None, "none", "until_write"),
        Rule(("public.*", "orders", '"Quoted"."T"'), 30.0, "write_through", "always"),
    )


def test_render_round_trips_except_the_masked_password(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_YAML), env={})
    rendered = render_config(config)

    again = build_config(yaml.safe_load(rendered), source=config.source)
    assert again.upstream.password == "****"
    masked_upstream = UpstreamConfig.from_url(config.upstream.masked_url(), connect_timeout=3.0)
    assert again == dataclasses.replace(config, upstream=masked_upstream)


def test_render_round_trips_exactly_without_a_password() -> None:
    config = build_config(
        {
            **MINIMAL,
            "logging": {"slow_query": 0.0001},
            "cache": {"max_memory": 1000, "max_entry_size": 500, "shards": 2},
        }
    )
    assert build_config(yaml.safe_load(render_config(config))) == config


def test_defaults_from_minimal_mapping() -> None:
    config = build_config(MINIMAL)
    assert config == Config(upstream=UpstreamConfig.from_url(MINIMAL["upstream"]))
    assert config.listen == Address("127.0.0.1", 6432)
    assert config.admin.listen == Address("127.0.0.1", 9187)
    assert config.limits.max_message_size == 64 * 2**20
    assert config.cache.max_memory == 256 * 2**20
    assert config.upstream.sslmode == "prefer"
    assert config.rules == ()
    assert config.source is None


def test_empty_file_with_upstream_from_env(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), env={"CACHEPROXY_UPSTREAM": "postgres://h"})
    assert config.upstream.host == "h"


# --- the example file -----------------------------------------------------------------------------


def test_example_file_loads() -> None:
    config = load_config(str(EXAMPLE), env={})
    assert config.upstream.url == "postgres://postgres@127.0.0.1:5432/postgres"
    assert [rule.strategy for rule in config.rules] == ["none", "lazy"]
    assert config.rules[1].tables == ("public.*",)


def test_example_file_documents_the_real_defaults() -> None:
    config = load_config(str(EXAMPLE), env={})
    defaults = Config(upstream=config.upstream, source=config.source, rules=config.rules)
    assert config == defaults


def test_example_file_names_every_key() -> None:
    text = EXAMPLE.read_text()
    sections = (AdminConfig, LimitsConfig, ShutdownConfig, LoggingConfig, CacheConfig, SnapshotConfig, Rule,
                InvalidationConfig, WriteThroughConfig)  # fmt: skip
    for cls in sections:
        for f in dataclasses.fields(cls):
            assert f"{f.name}:" in text, f"{cls.__name__}.{f.name} missing from {EXAMPLE.name}"


def test_example_upstream_follows_env() -> None:
    config = load_config(str(EXAMPLE), env={"CACHEPROXY_UPSTREAM": "postgres://u:pw@other:6000/x"})
    assert (config.upstream.host, config.upstream.port) == ("other", 6000)


# --- errors: each names the file and the dotted key -----------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"cache": {"max_memroy": 1}}, "cache.max_memroy", "unknown key (allowed: enabled, max_memory,"),
        ({"bogus": 1}, "bogus", "unknown key (allowed: upstream, listen, admin,"),
        ({"admin": {"listen": "x", "port": 1}}, "admin.port", "unknown key"),
        ({"rules": [{"tables": ["a"], "ttl_s": 1}]}, "rules[0].ttl_s", "unknown key"),
        ({"cache": "big"}, "cache", "must be a mapping, got string"),
        ({"cache": {"enabled": "maybe"}}, "cache.enabled", "must be true or false"),
        ({"cache": {"shards": 3}}, "cache.shards", "power of two"),
        ({"cache": {"shards": 8192}}, "cache.shards", "from 1 to 4096"),
        ({"cache": {"shards": 2.5}}, "cache.shards", "must be an integer"),
        ({"cache": {"shards": "\u00b2"}}, "cache.shards", "must be an integer"),
        ({"cache": {"default_ttl": 0}}, "cache.default_ttl", "greater than 0"),
        ({"cache": {"max_memory": "lots"}}, "cache.max_memory", "not a size"),
        ({"cache": {"max_entry_size": "32MiB"}}, "cache.max_entry_size", "max_memory / shards"),
        ({"limits": {"connect_timeout": "soon"}}, "limits.connect_timeout", "not a duration"),
        ({"limits": {"idle_client_timeout": "-5s"}}, "limits.idle_client_timeout", "negative"),
        ({"limits": {"max_client_connections": 0}}, "limits.max_client_connections", "at least 1"),
        ({"limits": {"max_message_size": 64}}, "limits.max_message_size", "at least 1KiB"),
        ({"logging": {"level": "loud"}}, "logging.level", "must be one of debug, info, warning, error"),
        ({"logging": {"format": "xml"}}, "logging.format", "must be one of text, json"),
        ({"snapshot": {"interval": "10s"}}, "snapshot.interval", "needs snapshot.path"),
        ({"snapshot": {"path": "/x", "interval": 0}}, "snapshot.interval", "greater than 0"),
        ({"admin": {"users": "ops"}}, "admin.users", "list of role names"),
        ({"admin": {"users": ["ops", ""]}}, "admin.users[1]", "non-empty string"),
        ({"admin": {"listen": "localhost"}}, "admin.listen", "missing port"),
        ({"listen": "127.0.0.1:70000"}, "listen", "bad port"),
        ({"listen": "::1:6432"}, "listen", "brackets"),
        ({"listen": "[nothost]:6432"}, "listen", "not an IPv6 address"),
        ({"listen": 6432}, "listen", "address string"),
        ({"rules": {"tables": ["a"]}}, "rules", "must be a list"),
        ({"rules": ["a"]}, "rules[0]", "must be a mapping"),
        ({"rules": [{"strategy": "lazy"}]}, "rules[0].tables", "non-empty list"),
        ({"rules": [{"tables": []}]}, "rules[0].tables", "non-empty list"),
        ({"rules": [{"tables": ["a"]}, {"tables": ["a..b"]}]}, "rules[1].tables[0]", "not a table name"),
        (
            {"rules": [{"tables": ["a"]}] * 2 + [{"tables": ["b"], "strategy": "eager"}]},
            "rules[2].strategy",
            "",
        ),
        ({"rules": [{"tables": ["a"], "in_transaction": "sometimes"}]}, "rules[0].in_transaction", "never"),
        ({"rules": [{"tables": ["a"], "ttl": "0s"}]}, "rules[0].ttl", "greater than 0"),
    ],
)
def test_errors_name_file_and_key(data: dict[str, object], key: str, fragment: str) -> None:
    error = build_error(data)
    assert error.file == "conf.yaml"
    assert error.key == key
    assert str(error).startswith(f"conf.yaml: {key}: ")
    assert fragment in str(error)
    assert "\n" not in str(error)


def test_rule_strategy_error_text_is_exact() -> None:
    error = build_error({"rules": [{"tables": ["a"]}, {"tables": ["b"]}, {"tables": ["c"], "strategy": "x"}]})
    assert str(error) == "conf.yaml: rules[2].strategy: must be one of lazy, write_through, none, got 'x'"


def test_unknown_key_suggests_the_close_one() -> None:
    assert "did you mean 'max_memory'?" in str(build_error({"cache": {"max_memroy": 1}}))


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("mysqlx://h/db", "(or mysql://, mariadb://)"),
        ("h:5432/db", "postgres:// or postgresql://"),
        ("postgres://h:notaport/db", "bad port 'notaport'"),
        ("postgres://h:0/db", "bad port"),
        ("postgres://h/db?sslmode=sometimes", "unknown sslmode 'sometimes'"),
        ("postgres://h/db?application_name=x", "unknown query parameter 'application_name'"),
        ("postgres://h/db?sslmode", "needs a value"),
        ("postgres://h/db?sslmode=require&sslmode=disable", "given twice"),
        ("postgres://h/db?connect_timeout=soon", "whole number of seconds"),
        ("postgres://h/db?connect_timeout=0", "at least 1 second"),
        ("postgres://a,a/db", "given twice"),  # (several hosts are allowed: tests/unit/test_failover_rules.py)
    ],
)
def test_bad_upstream_urls(url: str, fragment: str) -> None:
    error = build_error({"upstream": f"{url}".replace("://", "://user:hunter2@", 1) if "://" in url else url})
    assert str(error).startswith("conf.yaml: upstream: ")
    assert fragment in str(error)
    assert "hunter2" not in str(error)


def test_missing_upstream_names_all_three_ways() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={})
    assert str(info.value).startswith("upstream: required")
    assert info.value.file is None
    assert "--upstream" in str(info.value) and "CACHEPROXY_UPSTREAM" in str(info.value)


def test_missing_upstream_in_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: ':6432'\n")
    with pytest.raises(ConfigError, match=f"^{path}: upstream: required"):
        load_config(path, env={})


def test_file_not_found(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: file not found"


def test_yaml_syntax_error_has_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: ':6432'\ncache:\n  shards: [1, 2\nlogging: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    assert text.startswith(f"{path}: line 4, column 8: invalid YAML: expected ',' or ']'")
    assert "\n" not in text


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream: postgres://h\ncache:\n  shards: 4\n  shards: 8\n")
    with pytest.raises(ConfigError, match=r"line 4, column 3: invalid YAML: duplicate key 'shards'"):
        load_config(path, env={})


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "string")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: top level must be a mapping of keys, got {kind}"


def test_build_config_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^top level must be a mapping"):
        build_config([], source=None)  # type: ignore[arg-type]


def test_error_in_a_file_value_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream: postgres://h\nlogging:\n  level: loud\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert (info.value.file, info.value.key) == (path, "logging.level")


# --- interpolation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("pre-${A}-post", {"A": "x"}, "pre-x-post"),
        ("${A:-fallback}", {}, "fallback"),
        ("${A:-fallback}", {"A": ""}, "fallback"),
        ("${A:-fallback}", {"A": "set"}, "set"),
        ("${A:-}", {}, ""),
        ("${A:-a:b/c}", {}, "a:b/c"),
        ("$${A}", {"A": "x"}, "${A}"),
        ("cost: $$5", {}, "cost: $5"),
        ("pa$word", {}, "pa$word"),
        ("trailing $", {}, "trailing $"),
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
        ("${A}", {"A": ""}, ""),
    ],
)
def test_interpolate(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("${MISSING}", "environment variable MISSING is not set"),
        ("${", "unterminated"),
        ("${1BAD}", "invalid variable name '1BAD'"),
        ("${}", "invalid variable name ''"),
    ],
)
def test_interpolate_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        interpolate(text, {})


def test_interpolation_applies_to_every_string_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "upstream: postgres://${DB_HOST}:${DB_PORT:-5432}/app\n"
        "listen: ':${PORT}'\n"
        "cache:\n  enabled: ${CACHE_ON:-true}\n  shards: ${SHARDS}\n  max_memory: ${MEM:-1GiB}\n"
        "admin:\n  users: ['${ADMIN_ROLE}']\n"
        "rules:\n  - tables: ['${SCHEMA:-public}.*']\n    ttl: ${TTL:-5s}\n"
        "snapshot:\n  path: '$${literal}'\n",
    )
    env = {"DB_HOST": "db", "PORT": "7000", "SHARDS": "32", "ADMIN_ROLE": "ops", "CACHE_ON": "false"}
    config = load_config(path, env=env)
    assert (config.upstream.host, config.upstream.port) == ("db", 5432)
    assert config.listen == Address("127.0.0.1", 7000)
    assert (config.cache.enabled, config.cache.shards, config.cache.max_memory) == (False, 32, 2**30)
    assert config.admin.users == ("ops",)
    assert config.rules[0] == Rule(("public.*",), 5.0)
    assert config.snapshot.path == "${literal}"


def test_interpolation_keeps_yaml_quoting(tmp_path: Path) -> None:
    # The value holds YAML-special characters; substituting in the raw text would break the document.
    path = write(tmp_path, "upstream: postgres://h\nsnapshot:\n  path: '${P}'\n")
    assert load_config(path, env={"P": "/tmp/a: b # c"}).snapshot.path == "/tmp/a: b # c"


def test_missing_variable_names_file_key_and_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream: postgres://h\nrules:\n  - tables: ['${NOPE}']\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: rules[0].tables[0]: environment variable NOPE is not set")


def test_build_config_does_not_interpolate() -> None:
    assert build_config({**MINIMAL, "snapshot": {"path": "${X}"}}).snapshot.path == "${X}"


# --- precedence: flags > env > file > defaults ----------------------------------------------------

PRECEDENCE_YAML = """\
listen: "127.0.0.1:1001"
upstream: postgres://file-host/db
admin:
  listen: "127.0.0.1:1002"
logging:
  level: warning
  format: text
"""


def test_file_beats_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, PRECEDENCE_YAML), env={})
    assert config.listen.port == 1001
    assert config.upstream.host == "file-host"
    assert config.admin.listen == Address("127.0.0.1", 1002)
    assert config.logging.level == "warning"


def test_env_beats_file(tmp_path: Path) -> None:
    env = {
        "CACHEPROXY_LISTEN": ":2001",
        "CACHEPROXY_UPSTREAM": "postgres://env-host/db",
        "CACHEPROXY_ADMIN_LISTEN": "[::1]:2002",
        "CACHEPROXY_LOG_LEVEL": "DEBUG",
        "CACHEPROXY_LOG_FORMAT": "json",
    }
    config = load_config(write(tmp_path, PRECEDENCE_YAML), env=env)
    assert config.listen == Address("127.0.0.1", 2001)
    assert config.upstream.host == "env-host"
    assert config.admin.listen == Address("::1", 2002)
    assert (config.logging.level, config.logging.format) == ("debug", "json")


def test_flags_beat_env(tmp_path: Path) -> None:
    env = {"CACHEPROXY_LISTEN": ":2001", "CACHEPROXY_UPSTREAM": "postgres://env-host/db"}
    config = load_config(
        write(tmp_path, PRECEDENCE_YAML),
        env=env,
        listen=":3001",
        upstream="postgres://flag-host/db",
        admin_listen="off",
        log_level="error",
        log_format="json",
    )
    assert config.listen.port == 3001
    assert config.upstream.host == "flag-host"
    assert config.admin.listen is None
    assert (config.logging.level, config.logging.format) == ("error", "json")


def test_empty_env_value_counts_as_unset(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, PRECEDENCE_YAML), env={"CACHEPROXY_UPSTREAM": ""})
    assert config.upstream.host == "file-host"


def test_no_file_environment_only() -> None:
    config = load_config(None, env={"CACHEPROXY_UPSTREAM": "postgres://h/db", "CACHEPROXY_LISTEN": ":0"})
    assert config.source is None
    assert config.listen == Address("127.0.0.1", 0)


def test_bad_values_from_env_and_flags_name_their_origin(tmp_path: Path) -> None:
    path = write(tmp_path, PRECEDENCE_YAML)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"CACHEPROXY_LISTEN": "nope"})
    assert str(info.value).startswith("<env>: listen: ")

    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, upstream="http://x")
    assert str(info.value).startswith("<flags>: upstream: ")

    with pytest.raises(ConfigError) as info:
        load_config(path, env={"CACHEPROXY_LOG_LEVEL": "info"}, log_level="chatty")
    assert str(info.value).startswith("<flags>: logging.level: ")


def test_overrides_create_missing_sections() -> None:
    config = load_config(None, env={}, upstream="postgres://h", admin_listen=":9", log_level="debug")
    assert config.admin.listen == Address("127.0.0.1", 9)
    assert config.logging.level == "debug"


# --- masking --------------------------------------------------------------------------------------


def test_password_never_shown(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_YAML), env={})
    assert config.upstream.password == SECRET
    for text in (render_config(config), repr(config), repr(config.upstream), str(config.upstream)):
        assert SECRET not in text
        assert "s3cr3t-P%40ss" not in text
    assert "****" in render_config(config)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgres://u:pw@h/db", "postgres://u:****@h/db"),
        ("postgresql://u:p%40w@h:1/db?sslmode=require", "postgresql://u:****@h:1/db?sslmode=require"),
        ("postgres://u:p@ss?@h/db", "postgres://u:****@h/db"),  # '@' and '?' unencoded in the password
        ("postgres://u:@h/db", "postgres://u:****@h/db"),
        ("postgres://u@h/db", "postgres://u@h/db"),
        ("postgres://h/db", "postgres://h/db"),
    ],
)
def test_masked_url(url: str, masked: str) -> None:
    upstream = UpstreamConfig.from_url(url)
    assert upstream.masked_url() == masked
    assert upstream.url == url


# --- upstream URLs --------------------------------------------------------------------------------


def test_url_percent_decoding() -> None:
    up = UpstreamConfig.from_url("postgres://j%C3%B6rg:p%2Fa%3As%40s@h/my%20db")
    assert (up.user, up.password, up.database) == ("jörg", "p/a:s@s", "my db")


def test_url_unencoded_at_and_question_mark_in_password() -> None:
    up = UpstreamConfig.from_url("postgres://u:p@ss?@h:6000/db")
    assert (up.user, up.password, up.host, up.port, up.database) == ("u", "p@ss?", "h", 6000, "db")


@pytest.mark.parametrize(
    ("url", "host", "port", "database", "user"),
    [
        ("postgres://", "127.0.0.1", 5432, None, None),
        ("postgresql://h", "h", 5432, None, None),
        ("postgres://h:6000", "h", 6000, None, None),
        ("postgres://:6000/db", "127.0.0.1", 6000, "db", None),
        ("postgres://[::1]/db", "::1", 5432, "db", None),
        ("postgres://u@[2001:db8::2]:6543/db", "2001:db8::2", 6543, "db", "u"),
        ("postgres://%2Fvar%2Frun%2Fpostgresql/db", "/var/run/postgresql", 5432, "db", None),
    ],
)
def test_url_hosts_ports_databases(url: str, host: str, port: int, database: str | None, user: str | None) -> None:
    up = UpstreamConfig.from_url(url)
    assert (up.host, up.port, up.database, up.user, up.password) == (host, port, database, user, None)


def test_url_ssl_params_and_connect_timeout() -> None:
    up = UpstreamConfig.from_url(
        "postgres://h/db?sslmode=verify-ca&sslrootcert=%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem&connect_timeout=7",
        connect_timeout=99.0,
    )
    assert (up.sslmode, up.sslrootcert, up.sslcert, up.sslkey) == ("verify-ca", "/ca.pem", "/c.pem", "/k.pem")
    assert up.connect_timeout == 7.0


def test_url_connect_timeout_of_one_is_two_as_in_libpq() -> None:
    assert UpstreamConfig.from_url("postgres://h?connect_timeout=1").connect_timeout == 2.0


def test_url_connect_timeout_defaults_to_limits() -> None:
    config = build_config({**MINIMAL, "limits": {"connect_timeout": "4s"}})
    assert config.upstream.connect_timeout == 4.0


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"])
def test_every_sslmode(mode: str) -> None:
    assert UpstreamConfig.from_url(f"postgres://h?sslmode={mode}").sslmode == mode


# --- addresses ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:6432", Address("127.0.0.1", 6432)),
        ("localhost:1", Address("localhost", 1)),
        ("0.0.0.0:0", Address("0.0.0.0", 0)),
        (":6432", Address("127.0.0.1", 6432)),
        ("[::1]:6432", Address("::1", 6432)),
        ("[::]:0", Address("::", 0)),
        ("[2001:db8::1]:65535", Address("2001:db8::1", 65535)),
        ("  [fe80::1%eth0]:5  ", Address("fe80::1%eth0", 5)),
    ],
)
def test_address_parse(text: str, expected: Address) -> None:
    assert Address.parse(text) == expected
    assert Address.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "6432",
        "host",
        "::1",
        "::1:6432",
        "[::1]",
        "[::1:6432",
        "h:-1",
        "h:65536",
        "a b:1",
        "h:\u00b2",
        "h:\u0661",
    ],
)
def test_address_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Address.parse(text)


def test_address_str_brackets_ipv6() -> None:
    assert str(Address("::1", 6432)) == "[::1]:6432"
    assert str(Address("127.0.0.1", 6432)) == "127.0.0.1:6432"


@pytest.mark.parametrize("value", [None, False, "off", "OFF"])
def test_admin_listen_can_be_disabled(value: object) -> None:
    assert build_config({**MINIMAL, "admin": {"listen": value}}).admin.listen is None


def test_bare_yaml_off_disables_admin(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream: postgres://h\nadmin:\n  listen: off\n")
    assert load_config(path, env={}).admin.listen is None


# --- durations and sizes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("100ms", 0.1),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        (" 10 s ", 10.0),
        ("30", 30.0),
        ("0.5", 0.5),
        ("0s", 0.0),
        (0, 0.0),
        (12, 12.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("-5s", "negative"),
        (-1, "negative"),
        ("5", None),
        ("five seconds", "not a duration"),
        ("5x", "not a duration"),
        ("\u0665s", "not a duration"),
        ("5S", "not a duration"),
        ("s", "not a duration"),
        ("", "not a duration"),
        (True, "not a duration"),
        (None, "not a duration"),
        ([1], "not a duration"),
        (float("inf"), "finite"),
        (float("nan"), "finite"),
    ],
)
def test_parse_duration_rejects(value: object, fragment: str | None) -> None:
    if fragment is None:
        assert parse_duration(value) == 5.0
        return
    with pytest.raises(ValueError, match=fragment):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("64MiB", 64 * 2**20),
        ("1GiB", 2**30),
        ("512KiB", 512 * 1024),
        ("10MB", 10_000_000),
        ("100kB", 100_000),
        ("100KB", 100_000),
        ("1.5GiB", 3 * 2**29),
        ("123", 123),
        ("123B", 123),
        ("2 MiB", 2 * 2**20),
        ("1TiB", 2**40),
        (123, 123),
        (0, 0),
        (4096.0, 4096),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("lots", "not a size"),
        ("10XB", "not a size"),
        ("10M", "not a size"),
        ("1.5B", "whole number of bytes"),
        ("-1MiB", "negative"),
        (-1, "negative"),
        (1.5, "whole number"),
        (True, "not a size"),
        (None, "not a size"),
        ("", "not a size"),
    ],
)
def test_parse_size_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.25, "250ms"),
        (30.0, "30s"),
        (60.0, "1m"),
        (90.0, "90s"),
        (3600.0, "1h"),
        (86400.0, "1d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("size", "text"), [(0, 0), (123, 123), (1024, "1KiB"), (64 * 2**20, "64MiB"), (1000, 1000)])
def test_format_size(size: int, text: str | int) -> None:
    assert format_size(size) == text


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=2**50))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


# --- the objects themselves -----------------------------------------------------------------------


def test_config_objects_are_frozen() -> None:
    config = build_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen = Address("h", 1)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache.shards = 2  # type: ignore[misc]


def test_config_error_text_leaves_out_missing_parts() -> None:
    assert str(ConfigError("bad")) == "bad"
    assert str(ConfigError("bad", key="a.b")) == "a.b: bad"
    assert str(ConfigError("bad", file="f.yaml")) == "f.yaml: bad"
    assert str(ConfigError("bad", key="a.b", file="<env>")) == "<env>: a.b: bad"
    error = ConfigError("bad", key="k", file="f")
    assert (error.file, error.key, error.message) == ("f", "k", "bad")


def test_choices_are_case_insensitive_and_normalised() -> None:
    config = build_config({**MINIMAL, "logging": {"level": "WARNING"}, "rules": [{"tables": "t", "strategy": "None"}]})
    assert config.logging.level == "warning"
    assert config.rules == (Rule(("t",), None, "none"),)


# --- invalidation, write-through and the new limits ------------------------------------------------


def test_invalidation_and_write_through_sections() -> None:
    config = build_config(
        {
            "upstream": "postgres://u@h/db",
            "invalidation": {"bus": "off", "channel": "app_cache", "unknown_writes": "ignore", "replication": True},
            "write_through": {"concurrency": 2, "per_second": "50"},
            "limits": {"max_prepared_statements": 5, "max_pipeline_bytes": "64KiB"},
        }
    )
    assert config.invalidation == InvalidationConfig(
        bus=False, channel="app_cache", unknown_writes="ignore", replication=True
    )
    assert config.write_through == WriteThroughConfig(concurrency=2, per_second=50.0)
    assert (config.limits.max_prepared_statements, config.limits.max_pipeline_bytes) == (5, 64 * 1024)
    assert build_config(yaml.safe_load(render_config(config))).invalidation == config.invalidation


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("invalidation", {"channel": "Bad-Name"}, "invalidation.channel: must be a lower-case identifier"),
        ("invalidation", {"unknown_writes": "sometimes"}, "invalidation.unknown_writes: must be one of"),
        ("write_through", {"per_second": 0}, "write_through.per_second: must be greater than 0"),
        ("write_through", {"concurrency": 0}, "write_through.concurrency: must be from 1 to 64"),
        ("limits", {"max_prepared_statements": 0}, "limits.max_prepared_statements: must be at least 1"),
    ],
)
def test_invalidation_settings_are_checked(section: str, value: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"upstream": "postgres://u@h/db", section: value})


def test_mysql_and_mariadb_urls_choose_the_mysql_front_end() -> None:
    mysql = UpstreamConfig.from_url("mysql://app:pw@db/shop")
    assert (mysql.kind, mysql.port, mysql.database, mysql.user, mysql.is_mysql) == ("mysql", 3306, "shop", "app", True)
    assert UpstreamConfig.from_url("mariadb://a@127.0.0.1:3307/x").port == 3307
    assert not UpstreamConfig.from_url("postgres://a@h/x").is_mysql
