"""Configuration: YAML -> frozen, validated, typed config objects; every error names the file and the key.

Everything here is pure except :func:`load_config`, which reads the one file. The environment arrives as a
mapping argument, never from ``os.environ``. Precedence, highest first: keyword flags, ``CACHEPROXY_*``
environment variables, the file, the defaults written on the dataclasses below.

Reload is the caller's job, done the PgCat way: build a whole new :class:`Config` (building validates it),
then swap it in; nothing here is mutable.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from typing import Final, TypeVar
from urllib.parse import unquote

import yaml

__all__ = [
    "Address",
    "AdminConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "InvalidationConfig",
    "LimitsConfig",
    "LoggingConfig",
    "Rule",
    "ShutdownConfig",
    "SnapshotConfig",
    "UpstreamConfig",
    "WriteThroughConfig",
    "build_config",
    "format_duration",
    "format_size",
    "interpolate",
    "load_config",
    "parse_duration",
    "parse_size",
    "render_config",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
TiB: Final = 1024 * GiB

SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
TLS_MODES: Final = ("disable", "allow", "require")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")
STRATEGIES: Final = ("lazy", "write_through", "none")
IN_TRANSACTION: Final = ("never", "until_write", "always")
UNKNOWN_WRITES: Final = ("invalidate_database", "ignore")

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_UPSTREAM_PORT: Final = 5432
FLAGS: Final = "<flags>"
ENV: Final = "<env>"

# Environment variable -> dotted key it overrides. CACHEPROXY_LOG_FORMAT is here for symmetry with the flag.
ENV_OVERRIDES: Final = (
    ("CACHEPROXY_UPSTREAM", "upstream"),
    ("CACHEPROXY_LISTEN", "listen"),
    ("CACHEPROXY_ADMIN_LISTEN", "admin.listen"),
    ("CACHEPROXY_LOG_LEVEL", "logging.level"),
    ("CACHEPROXY_LOG_FORMAT", "logging.format"),
)

_T = TypeVar("_T")


class ConfigError(Exception):
    """A bad configuration. ``str(e)`` is one line: ``"<file>: <dotted.key>: <what is wrong>"``.

    ``file`` is the config file path, or ``"<flags>"`` / ``"<env>"`` when the value came from there; parts
    that are unknown (no file, no key) are left out of the text.
    """

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, self.key, self.message) if part)


# --- value objects --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP address to listen on. IPv6 hosts are kept without brackets; port 0 asks for an ephemeral port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``"host:port"``, ``"[::1]:6432"`` or ``":6432"`` (host 127.0.0.1). Raises ValueError."""
        host, port = _split_host_port(text.strip())
        if port is None:
            raise ValueError(f"missing port in {text!r} (expected host:port, [ipv6]:port or :port)")
        return cls(host or DEFAULT_HOST, _parse_port(port, minimum=0))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


DEFAULT_LISTEN: Final = Address(DEFAULT_HOST, 6432)
DEFAULT_ADMIN_LISTEN: Final = Address(DEFAULT_HOST, 9187)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Where the real PostgreSQL server is: a libpq-style URL and the fields parsed out of it.

    The repr never shows the password; use :meth:`masked_url` anywhere the URL is shown or logged.
    """

    url: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_UPSTREAM_PORT
    database: str | None = None
    user: str | None = None
    password: str | None = None
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    connect_timeout: float = 10.0

    @classmethod
    def from_url(cls, url: str, *, connect_timeout: float = 10.0) -> UpstreamConfig:
        """Parse a ``postgres://`` or ``postgresql://`` URL. Raises ValueError (whose text never holds the
        password). ``connect_timeout`` is used unless the URL has ``?connect_timeout=``."""
        return _parse_upstream_url(url, connect_timeout)

    def masked_url(self) -> str:
        """The URL with the password replaced by ``****``."""
        prefix, userinfo, rest = _split_userinfo(self.url)
        user, colon, _ = userinfo.partition(":")
        return f"{prefix}{user}:****@{rest}" if colon else self.url

    def __repr__(self) -> str:
        return (
            f"UpstreamConfig(url={self.masked_url()!r}, host={self.host!r}, port={self.port}, "
            f"database={self.database!r}, user={self.user!r}, sslmode={self.sslmode!r}, "
            f"sslrootcert={self.sslrootcert!r}, sslcert={self.sslcert!r}, sslkey={self.sslkey!r}, "
            f"connect_timeout={self.connect_timeout!r})"
        )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Resource limits protecting the proxy from clients and a slow upstream."""

    max_client_connections: int = 1000
    max_message_size: int = 64 * MiB
    idle_client_timeout: float | None = None
    connect_timeout: float = 10.0
    startup_timeout: float = 60.0
    # Named prepared statements the proxy tracks per session; past it the session ends with 53400, rather than the
    # proxy's memory growing with a client that prepares without ever closing.
    max_prepared_statements: int = 10000
    # Extended-protocol messages held while waiting for Sync (to answer the batch from the cache): past this many
    # bytes the batch is forwarded upstream as it is, and flow control (paused reads) bounds the rest.
    max_pipeline_bytes: int = 1 * MiB


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    """How long a graceful shutdown waits for in-flight work before cancelling it."""

    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin HTTP endpoint (metrics, health); ``listen=None`` disables it."""

    listen: Address | None = DEFAULT_ADMIN_LISTEN
    users: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log level and format; ``slow_query`` logs queries slower than this many seconds (None = off)."""

    level: str = "info"
    format: str = "text"
    slow_query: float | None = None


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The result cache: memory budget, sharding and the TTL used when a rule does not give one."""

    enabled: bool = True
    max_memory: int = 256 * MiB
    max_entry_size: int = 1 * MiB
    shards: int = 16
    default_ttl: float = 60.0
    analysis_cache_size: int = 10000


@dataclass(frozen=True, slots=True)
class InvalidationConfig:
    """How writes the proxy does not see itself reach its cache.

    ``bus``: every invalidation is published with NOTIFY on ``channel`` and every proxy LISTENs there (one control
    connection per database); while that connection is down, the database's entries are not served.
    ``catalog_poll``: how often the bus connection checks the catalog for changes made straight on the database
    (GRANT/REVOKE, row security, DDL, roles), which drop the database's entries; None = never.
    ``unknown_writes``: what a statement with unknown effects (DO, CALL, a function that may write) does:
    ``invalidate_database`` (default) or ``ignore``. ``replication``: also follow a logical replication stream
    (publication ``publication``, a temporary slot named ``slot_prefix`` + a per-instance suffix), which sees
    writes that bypass every proxy.
    """

    bus: bool = True
    channel: str = "cacheproxy_invalidation"
    catalog_poll: float | None = 1.0
    unknown_writes: str = "invalidate_database"
    replication: bool = False
    publication: str = "cacheproxy"
    slot_prefix: str = "cacheproxy"


@dataclass(frozen=True, slots=True)
class WriteThroughConfig:
    """Refreshes of `strategy: write_through` entries after a committed write: at most ``concurrency`` run after
    one commit, at most ``per_second`` in all."""

    concurrency: int = 4
    per_second: float = 1000.0


@dataclass(frozen=True, slots=True)
class SnapshotConfig:
    """Optional persistence of the cache to a file, every ``interval`` seconds and at shutdown."""

    path: str | None = None
    interval: float | None = None


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS towards clients. ``mode``: disable (SSLRequest answered 'N'), allow (TLS when the client asks),
    require (plaintext clients are refused). ``cert`` and ``key`` are PEM files, required unless disabled."""

    mode: str = "disable"
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """A per-table caching rule. ``tables`` holds names or globs exactly as written (no case folding)."""

    tables: tuple[str, ...]
    ttl: float | None = None
    strategy: str = "lazy"
    in_transaction: str = "until_write"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole, validated configuration. ``source`` is the file it was read from, if any."""

    upstream: UpstreamConfig
    listen: Address = DEFAULT_LISTEN
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    invalidation: InvalidationConfig = field(default_factory=InvalidationConfig)
    write_through: WriteThroughConfig = field(default_factory=WriteThroughConfig)
    rules: tuple[Rule, ...] = ()
    source: str | None = None


# --- durations and sizes --------------------------------------------------------------------------

_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# re.ASCII: \d would otherwise accept any Unicode digit, which float() partly accepts too.
_DIGITS = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?", re.ASCII)
_DURATION = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*(?:ms|s|m|h|d))+\s*", re.ASCII)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.ASCII)
_DURATION_HELP: Final = "use seconds or a number with a unit ms, s, m, h, d, e.g. 250ms, 30s, 5m, 1h30m"

_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", re.ASCII)
_SIZE_HELP: Final = "use bytes or a number with a unit B, kB, MB, GB, TB, KiB, MiB, GiB, TiB, e.g. 64MiB"


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1d"``, ``"1h30m"`` or a plain number.

    >>> parse_duration("250ms"), parse_duration("1m30s"), parse_duration(2)
    (0.25, 90.0, 2.0)

    Raises ValueError for negative, non-finite or unreadable values.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"not a duration: {_type(value)} ({_DURATION_HELP})")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"duration must not be negative: {text!r}")
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(_duration_part(number, unit) for number, unit in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"not a duration: {_show(value)} ({_DURATION_HELP})")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"duration must be finite, got {_show(value)}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative: {_show(value)}")
    return seconds


def _duration_part(number: str, unit: str) -> float:
    # Divide for milliseconds so that "100ms" is exactly the float 0.1 (0.001 * 100 is not).
    return float(number) / 1000 if unit == "ms" else float(number) * _DURATION_UNITS[unit]


def parse_size(value: object) -> int:
    """Bytes from ``"64MiB"``, ``"1GiB"``, ``"512KiB"``, ``"10MB"``, ``"100kB"``, ``"123"`` or an int.

    >>> parse_size("64MiB"), parse_size("10MB"), parse_size(123)
    (67108864, 10000000, 123)

    Units are case-insensitive; ``kB``/``MB``/... are powers of 1000, ``KiB``/``MiB``/... powers of 1024.
    Raises ValueError for negative, fractional-byte or unreadable values.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"not a size: {_type(value)} ({_SIZE_HELP})")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"size must be finite, got {value!r}")
        amount = Decimal(repr(value))
    else:
        amount = _parse_size_text(value)
    if amount < 0:
        raise ValueError(f"size must not be negative: {_show(value)}")
    if amount != amount.to_integral_value():
        raise ValueError(f"size is not a whole number of bytes: {_show(value)}")
    return int(amount)


def _parse_size_text(value: str) -> Decimal:
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"size must not be negative: {text!r}")
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {_show(value)} ({_SIZE_HELP})")
    try:
        return Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    except InvalidOperation:  # pragma: no cover - the regex admits only plain decimals
        raise ValueError(f"not a size: {_show(value)} ({_SIZE_HELP})") from None


def format_duration(seconds: float) -> str | float:
    """The shortest exact text for a duration (``"5m"``, ``"250ms"``); a plain number if no unit is exact."""
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        factor = _DURATION_UNITS[unit]
        count = seconds / factor
        if count >= 1 and count.is_integer() and count * factor == seconds:
            return f"{int(count)}{unit}"
    millis = round(seconds * 1000)
    if millis / 1000 == seconds:
        return f"{millis}ms"
    return seconds


def format_size(size: int) -> str | int:
    """The text for a size in the largest binary unit that is exact (``"64MiB"``); plain bytes otherwise."""
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return size


# --- ${VAR} interpolation -------------------------------------------------------------------------

_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` with values from ``env``; ``$$`` is a literal ``$``.

    As in the shell, the default is used when the variable is unset or empty. A ``$`` followed by anything
    else is kept as is. An unset ``${VAR}`` without a default raises ConfigError naming the variable.

    >>> interpolate("${HOST:-localhost}:$${PORT}", {})
    'localhost:${PORT}'
    """
    out: list[str] = []
    pos = 0
    while (dollar := text.find("$", pos)) >= 0:
        out.append(text[pos:dollar])
        follower = text[dollar + 1 : dollar + 2]
        if follower == "$":
            out.append("$")
            pos = dollar + 2
        elif follower == "{":
            end = text.find("}", dollar + 2)
            if end < 0:
                raise ConfigError("unterminated '${' (write '$$' for a literal '$')")
            out.append(_expand(text[dollar + 2 : end], env))
            pos = end + 1
        else:
            out.append("$")
            pos = dollar + 1
    out.append(text[pos:])
    return "".join(out)


def _expand(expression: str, env: Mapping[str, str]) -> str:
    name, has_default, default = expression.partition(":-")
    if not _VAR_NAME.fullmatch(name):
        raise ConfigError(f"invalid variable name {name!r} in '${{...}}'")
    value = env.get(name)
    if has_default:
        return value or default
    if value is None:
        raise ConfigError(f"environment variable {name} is not set (write ${{{name}:-default}} for a default)")
    return value


def _interpolate_tree(node: object, env: Mapping[str, str], key: str, source: str | None) -> object:
    """Interpolate every string value of a parsed YAML tree (keys are left alone)."""
    if isinstance(node, str):
        try:
            return interpolate(node, env)
        except ConfigError as exc:
            raise ConfigError(exc.message, key=key or None, file=source) from None
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env, _join(key, str(k)), source) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, env, f"{key}[{i}]", source) for i, v in enumerate(node)]
    return node


# --- addresses and URLs ---------------------------------------------------------------------------


def _split_host_port(text: str) -> tuple[str, str | None]:
    """``"h:p"`` -> (h, p); ``"[v6]:p"`` -> (v6, p); no port -> (host, None). Hosts are not decoded."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']' in {text!r}")
        return host, (rest[1:] if rest else None)
    host, colon, port = text.rpartition(":")
    if not colon:
        return text, None
    if ":" in host:
        raise ValueError(f"IPv6 addresses must be in brackets, e.g. [::1]:6432 (got {text!r})")
    if any(c.isspace() for c in host):
        raise ValueError(f"host must not contain spaces (got {host!r})")
    return host, port


def _parse_port(text: str, *, minimum: int) -> int:
    if not _DIGITS.fullmatch(text) or not minimum <= int(text) <= 65535:
        raise ValueError(f"bad port {text!r} (must be a number from {minimum} to 65535)")
    return int(text)


_URL_PARAMS: Final = ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout")
_URL_TAIL = re.compile(r"(?P<hostport>[^/?]*)(?:/(?P<path>[^?]*))?(?:\?(?P<query>.*))?", re.DOTALL)


def _split_userinfo(url: str) -> tuple[str, str, str]:
    """``"postgres://u:p@h/db"`` -> ("postgres://", "u:p", "h/db"); userinfo is "" when there is none.

    As in libpq, the user info ends at the last '@' before the first '/', so a password may hold '@' or '?'
    but a '/' in it must be percent-encoded.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url
    userinfo, at, _ = rest.split("/", 1)[0].rpartition("@")
    if not at:
        return scheme + sep, "", rest
    return scheme + sep, userinfo, rest[len(userinfo) + 1 :]


def _parse_upstream_url(url: str, default_connect_timeout: float) -> UpstreamConfig:
    # Error messages below must never include the URL itself: it may hold the password.
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("postgres", "postgresql"):
        raise ValueError("must be a URL starting with postgres:// or postgresql://")
    _, userinfo, tail = _split_userinfo(url)
    match = _URL_TAIL.fullmatch(tail)
    assert match is not None  # every group is optional and the last one takes the rest
    user, colon, password = userinfo.partition(":")
    host, port = _upstream_host_port(match.group("hostport"))
    params = _url_params(match.group("query") or "")
    sslmode = params.get("sslmode", "prefer")
    if sslmode not in SSLMODES:
        raise ValueError(f"unknown sslmode {sslmode!r} (allowed: {', '.join(SSLMODES)})")
    timeout = params.get("connect_timeout")
    return UpstreamConfig(
        url=url,
        host=host,
        port=port,
        database=unquote(match.group("path") or "") or None,
        user=unquote(user) or None,
        password=unquote(password) if colon else None,
        sslmode=sslmode,
        sslrootcert=params.get("sslrootcert"),
        sslcert=params.get("sslcert"),
        sslkey=params.get("sslkey"),
        connect_timeout=default_connect_timeout if timeout is None else _libpq_connect_timeout(timeout),
    )


def _upstream_host_port(hostport: str) -> tuple[str, int]:
    if "," in hostport:
        raise ValueError("multiple hosts are not supported; give one host")
    host, port = _split_host_port(hostport)
    return unquote(host) or DEFAULT_HOST, DEFAULT_UPSTREAM_PORT if port is None else _parse_port(port, minimum=1)


def _url_params(query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        raw_name, eq, raw_value = item.partition("=")
        name, value = unquote(raw_name), unquote(raw_value)
        if name not in _URL_PARAMS:
            raise ValueError(f"unknown query parameter {name!r} (allowed: {', '.join(_URL_PARAMS)})")
        if not eq or not value:
            raise ValueError(f"query parameter {name!r} needs a value")
        if name in params:
            raise ValueError(f"query parameter {name!r} is given twice")
        params[name] = value
    return params


def _libpq_connect_timeout(text: str) -> float:
    # libpq: "Maximum time to wait while connecting, in seconds (write as a decimal integer) ... Zero,
    # negative, or not specified means wait indefinitely. The minimum allowed timeout is 2 seconds, therefore
    # a value of 1 is interpreted as 2." (libpq-connect, Parameter Key Words). Waiting forever is not offered.
    try:
        seconds = int(text.strip())
    except ValueError:
        raise ValueError(f"connect_timeout must be a whole number of seconds, got {text!r}") from None
    if seconds <= 0:
        raise ValueError("connect_timeout must be at least 1 second (libpq's 0 = wait forever is not supported)")
    return float(max(seconds, 2))


# --- building Config from a parsed tree -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Where:
    """Which file each key came from, so that an error can name it."""

    source: str | None
    origins: Mapping[str, str] = field(default_factory=dict)  # dotted key -> "<flags>" / "<env>"

    def error(self, key: str | None, message: str) -> ConfigError:
        file = self.source
        for overridden, label in self.origins.items():
            if key is not None and (key == overridden or key.startswith(overridden + ".")):
                file = label
        return ConfigError(message, key=key or None, file=file)


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name != "source")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type(value: object) -> str:
    if value is None:
        return "null"
    names: tuple[tuple[type, str], ...] = (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (Mapping, "mapping"),
        (list, "list"),
    )
    return next((name for kind, name in names if isinstance(value, kind)), type(value).__name__)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(value: object, key: str, allowed: Sequence[str], where: _Where) -> Mapping[str, object]:
    """Check that ``value`` is a mapping with string keys drawn from ``allowed``; None reads as empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise where.error(key or None, f"must be a mapping, got {_type(value)}")
    for name in value:
        if not isinstance(name, str):
            raise where.error(key or None, f"keys must be strings, got {_show(name)}")
        if name not in allowed:
            raise where.error(_join(key, name), _unknown_key(name, allowed))
    return value


def _unknown_key(name: str, allowed: Sequence[str]) -> str:
    message = f"unknown key (allowed: {', '.join(allowed)})"
    close = difflib.get_close_matches(name, allowed, n=1)
    return f"{message}; did you mean {close[0]!r}?" if close else message


def _get(m: Mapping[str, object], key: str, default: _T, convert: Callable[[object], _T], where: _Where) -> _T:
    """``convert(m[name])`` for the last part of the dotted ``key``, or ``default`` when absent."""
    name = key.rpartition(".")[2]
    return _convert(m[name], key, convert, where) if name in m else default


def _convert(value: object, key: str, convert: Callable[[object], _T], where: _Where) -> _T:
    try:
        return convert(value)
    except ValueError as exc:
        raise where.error(key, str(exc)) from None


# Converters: take a raw YAML value, return a typed one or raise ValueError saying what is wrong. Strings are
# accepted for numbers and booleans because ${VAR} interpolation always produces strings.


def _optional(convert: Callable[[object], _T]) -> Callable[[object], _T | None]:
    return lambda value: None if value is None else convert(value)


def _str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {_type(value) if value != '' else 'empty string'}")
    return value


_BOOL_WORDS: Final = dict.fromkeys(("true", "yes", "on", "1"), True) | dict.fromkeys(("false", "no", "off", "0"), False)


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"must be true or false, got {_show(value)}")


def _int(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_show(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    return convert


def _number(*, positive: bool) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value.strip())
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"must be a number, got {_show(value)}")
        if value < 0 or (positive and value == 0):
            raise ValueError(f"must be {'greater than 0' if positive else 'at least 0'}, got {value}")
        return float(value)

    return convert


def _duration(*, positive: bool) -> Callable[[object], float]:
    def convert(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be greater than 0, got {_show(value)}")
        return seconds

    return convert


def _size(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        size = parse_size(value)
        if size < minimum:
            raise ValueError(f"must be at least {format_size(minimum)}, got {_show(value)}")
        return size

    return convert


def _choice(allowed: Sequence[str]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if isinstance(value, str) and value.strip().lower() in allowed:
            return value.strip().lower()
        raise ValueError(f"must be one of {', '.join(allowed)}, got {_show(value)}")

    return convert


def _address(value: object) -> Address:
    if not isinstance(value, str):
        raise ValueError(f"must be an address string like '127.0.0.1:6432', got {_type(value)}")
    return Address.parse(value)


def _address_or_off(value: object) -> Address | None:
    # YAML 1.1 reads a bare `off` / `false` as the boolean False.
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    return _address(value)


def _limits(m: Mapping[str, object], where: _Where) -> LimitsConfig:
    d = LimitsConfig()
    return LimitsConfig(
        max_client_connections=_get(m, "limits.max_client_connections", d.max_client_connections, _int(1), where),
        # A floor of 1KiB catches "64" meant as megabytes; a startup packet alone can take hundreds of bytes.
        max_message_size=_get(m, "limits.max_message_size", d.max_message_size, _size(KiB), where),
        idle_client_timeout=_get(
            m, "limits.idle_client_timeout", d.idle_client_timeout, _optional(_duration(positive=True)), where
        ),
        connect_timeout=_get(m, "limits.connect_timeout", d.connect_timeout, _duration(positive=True), where),
        startup_timeout=_get(m, "limits.startup_timeout", d.startup_timeout, _duration(positive=True), where),
        max_prepared_statements=_get(m, "limits.max_prepared_statements", d.max_prepared_statements, _int(1), where),
        max_pipeline_bytes=_get(m, "limits.max_pipeline_bytes", d.max_pipeline_bytes, _size(KiB), where),
    )


def _upstream(data: Mapping[str, object], limits: LimitsConfig, where: _Where) -> UpstreamConfig:
    value = data.get("upstream")
    if value is None:
        raise where.error(
            "upstream", "required: set it in the config file, with --upstream or with CACHEPROXY_UPSTREAM"
        )
    if not isinstance(value, str):
        raise where.error("upstream", f"must be a postgres:// URL string, got {_type(value)}")
    try:
        return UpstreamConfig.from_url(value, connect_timeout=limits.connect_timeout)
    except ValueError as exc:
        raise where.error("upstream", str(exc)) from None


def _admin(m: Mapping[str, object], where: _Where) -> AdminConfig:
    d = AdminConfig()
    users = m.get("users")
    if users is not None and not isinstance(users, list):
        raise where.error("admin.users", f"must be a list of role names, got {_type(users)}")
    return AdminConfig(
        listen=_get(m, "admin.listen", d.listen, _address_or_off, where),
        users=tuple(_convert(user, f"admin.users[{i}]", _str, where) for i, user in enumerate(users or ())),
    )


def _logging(m: Mapping[str, object], where: _Where) -> LoggingConfig:
    d = LoggingConfig()
    return LoggingConfig(
        level=_get(m, "logging.level", d.level, _choice(LOG_LEVELS), where),
        format=_get(m, "logging.format", d.format, _choice(LOG_FORMATS), where),
        slow_query=_get(m, "logging.slow_query", d.slow_query, _optional(_duration(positive=False)), where),
    )


def _cache(m: Mapping[str, object], where: _Where) -> CacheConfig:
    d = CacheConfig()
    cache = CacheConfig(
        enabled=_get(m, "cache.enabled", d.enabled, _bool, where),
        max_memory=_get(m, "cache.max_memory", d.max_memory, _size(1), where),
        max_entry_size=_get(m, "cache.max_entry_size", d.max_entry_size, _size(1), where),
        shards=_get(m, "cache.shards", d.shards, _int(1, 4096), where),
        default_ttl=_get(m, "cache.default_ttl", d.default_ttl, _duration(positive=True), where),
        analysis_cache_size=_get(m, "cache.analysis_cache_size", d.analysis_cache_size, _int(0), where),
    )
    if cache.shards & (cache.shards - 1):
        raise where.error("cache.shards", f"must be a power of two (1, 2, 4, ... 4096), got {cache.shards}")
    # Each shard gets an equal slice of the budget, so the largest entry must fit in one slice.
    per_shard = cache.max_memory // cache.shards
    if cache.max_entry_size > per_shard:
        raise where.error(
            "cache.max_entry_size",
            f"must not exceed max_memory / shards ({format_size(per_shard)}), got {format_size(cache.max_entry_size)}",
        )
    return cache


def _snapshot(m: Mapping[str, object], where: _Where) -> SnapshotConfig:
    snapshot = SnapshotConfig(
        path=_get(m, "snapshot.path", None, _optional(_str), where),
        interval=_get(m, "snapshot.interval", None, _optional(_duration(positive=True)), where),
    )
    if snapshot.interval is not None and snapshot.path is None:
        raise where.error("snapshot.interval", "needs snapshot.path to be set")
    return snapshot


def _tls(m: Mapping[str, object], where: _Where) -> TLSConfig:
    tls = TLSConfig(
        mode=_get(m, "tls.mode", "disable", _choice(TLS_MODES), where),
        cert=_get(m, "tls.cert", None, _optional(_str), where),
        key=_get(m, "tls.key", None, _optional(_str), where),
    )
    if tls.mode != "disable":
        for name, path in (("cert", tls.cert), ("key", tls.key)):
            if not path:
                raise where.error(f"tls.{name}", f"required when tls.mode is {tls.mode}")
            if not os.path.isfile(path):
                raise where.error(f"tls.{name}", f"no such file: {path}")
    return tls


_CHANNEL = re.compile(r"[a-z_][a-z0-9_$]{0,62}")


def _channel(value: object) -> str:
    # Written into LISTEN/NOTIFY unquoted: a plain lower-case identifier only.
    if not isinstance(value, str) or not _CHANNEL.fullmatch(value):
        raise ValueError(f"must be a lower-case identifier (letters, digits, _), got {_show(value)}")
    return value


def _invalidation(m: Mapping[str, object], where: _Where) -> InvalidationConfig:
    d = InvalidationConfig()
    return InvalidationConfig(
        bus=_get(m, "invalidation.bus", d.bus, _bool, where),
        channel=_get(m, "invalidation.channel", d.channel, _channel, where),
        catalog_poll=_get(m, "invalidation.catalog_poll", d.catalog_poll, _optional(_duration(positive=True)), where),
        unknown_writes=_get(m, "invalidation.unknown_writes", d.unknown_writes, _choice(UNKNOWN_WRITES), where),
        replication=_get(m, "invalidation.replication", d.replication, _bool, where),
        publication=_get(m, "invalidation.publication", d.publication, _channel, where),
        slot_prefix=_get(m, "invalidation.slot_prefix", d.slot_prefix, _channel, where),
    )


def _write_through(m: Mapping[str, object], where: _Where) -> WriteThroughConfig:
    d = WriteThroughConfig()
    return WriteThroughConfig(
        concurrency=_get(m, "write_through.concurrency", d.concurrency, _int(1, 64), where),
        per_second=_get(m, "write_through.per_second", d.per_second, _number(positive=True), where),
    )


# Table names or globs: one to three dot-separated parts, each a "quoted" identifier or unquoted text.
_IDENT: Final = r'(?:"(?:[^"]|"")+"|[^\s".]+)'
_TABLE_PATTERN = re.compile(rf"{_IDENT}(?:\.{_IDENT}){{0,2}}")


def _table(value: object) -> str:
    if not isinstance(value, str) or not _TABLE_PATTERN.fullmatch(value):
        raise ValueError(f'not a table name or pattern: {_show(value)} (e.g. orders, public.*, "Quoted"."T")')
    return value


def _rule(value: object, key: str, where: _Where) -> Rule:
    if not isinstance(value, Mapping):
        raise where.error(key, f"must be a mapping with at least 'tables', got {_type(value)}")
    m = _mapping(value, key, _keys(Rule), where)
    tables = m.get("tables")
    if isinstance(tables, str):
        tables = [tables]
    if not isinstance(tables, list) or not tables:
        raise where.error(f"{key}.tables", f"must be a non-empty list of table names, got {_show(tables)}")
    return Rule(
        tables=tuple(_convert(t, f"{key}.tables[{i}]", _table, where) for i, t in enumerate(tables)),
        ttl=_get(m, f"{key}.ttl", None, _optional(_duration(positive=True)), where),
        strategy=_get(m, f"{key}.strategy", "lazy", _choice(STRATEGIES), where),
        in_transaction=_get(m, f"{key}.in_transaction", "until_write", _choice(IN_TRANSACTION), where),
    )


def _rules(value: object, where: _Where) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise where.error("rules", f"must be a list of rules, got {_type(value)}")
    return tuple(_rule(item, f"rules[{i}]", where) for i, item in enumerate(value))


def _build(data: object, where: _Where) -> Config:
    if not isinstance(data, Mapping):
        raise where.error(None, f"top level must be a mapping of keys, got {_type(data)}")
    top = _mapping(data, "", _keys(Config), where)
    limits = _limits(_mapping(top.get("limits"), "limits", _keys(LimitsConfig), where), where)
    return Config(
        listen=_get(top, "listen", DEFAULT_LISTEN, _address, where),
        upstream=_upstream(top, limits, where),
        admin=_admin(_mapping(top.get("admin"), "admin", _keys(AdminConfig), where), where),
        limits=limits,
        shutdown=ShutdownConfig(
            timeout=_get(
                _mapping(top.get("shutdown"), "shutdown", _keys(ShutdownConfig), where),
                "shutdown.timeout",
                ShutdownConfig().timeout,
                _duration(positive=False),
                where,
            )
        ),
        logging=_logging(_mapping(top.get("logging"), "logging", _keys(LoggingConfig), where), where),
        cache=_cache(_mapping(top.get("cache"), "cache", _keys(CacheConfig), where), where),
        snapshot=_snapshot(_mapping(top.get("snapshot"), "snapshot", _keys(SnapshotConfig), where), where),
        tls=_tls(_mapping(top.get("tls"), "tls", _keys(TLSConfig), where), where),
        invalidation=_invalidation(
            _mapping(top.get("invalidation"), "invalidation", _keys(InvalidationConfig), where), where
        ),
        write_through=_write_through(
            _mapping(top.get("write_through"), "write_through", _keys(WriteThroughConfig), where), where
        ),
        rules=_rules(top.get("rules"), where),
        source=where.source,
    )


def build_config(data: Mapping[str, object], *, source: str | None = None) -> Config:
    """Validate an already-parsed mapping (no interpolation, no overrides) into a :class:`Config`."""
    return _build(data, _Where(source))


# --- the one function that does I/O ---------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys; plain PyYAML silently keeps the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[object, object]:
    loader.flatten_mapping(node)
    seen: set[str] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, str):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError("file not found", file=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror or exc}", file=path) from None
    except UnicodeDecodeError:
        raise ConfigError("file is not UTF-8 text", file=path) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise ConfigError(f"{at}invalid YAML: {problem}", file=path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {' '.join(str(exc).split())}", file=path) from None


def _override(data: dict[str, object], key: str, value: str) -> None:
    section, _, name = key.rpartition(".")
    target: object = data
    if section:
        if data.get(section) is None:
            data[section] = {}
        target = data[section]
    # A section of the wrong type is left alone: building reports it, naming the file.
    if isinstance(target, dict):
        target[name] = value


def load_config(
    path: str | None,
    *,
    env: Mapping[str, str],
    listen: str | None = None,
    upstream: str | None = None,
    admin_listen: str | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
) -> Config:
    """Read ``path`` (or nothing, when None), interpolate ``${VAR}`` from ``env``, apply the ``CACHEPROXY_*``
    variables from ``env`` and then the keyword flags (None = not given), and validate the result."""
    data = {} if path is None else _read_yaml(path)
    if data is None:  # an empty file
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping of keys, got {_type(data)}", file=path)
    tree = _interpolate_tree(data, env, "", path)
    assert isinstance(tree, dict)
    origins: dict[str, str] = {}
    for variable, key in ENV_OVERRIDES:
        if env.get(variable):  # set-but-empty counts as unset, as compose files often leave them
            _override(tree, key, env[variable])
            origins[key] = ENV
    flags = {
        "listen": listen,
        "upstream": upstream,
        "admin.listen": admin_listen,
        "logging.level": log_level,
        "logging.format": log_format,
    }
    for key, flag in flags.items():
        if flag is not None:
            _override(tree, key, flag)
            origins[key] = FLAGS
    return _build(tree, _Where(path, origins))


# --- rendering ------------------------------------------------------------------------------------


def _optional_duration(seconds: float | None) -> str | float | None:
    return None if seconds is None else format_duration(seconds)


def render_config(config: Config) -> str:
    """The effective configuration as YAML, password masked; ``build_config`` reads it back."""
    tree = {
        "listen": str(config.listen),
        "upstream": config.upstream.masked_url(),
        "admin": {
            "listen": None if config.admin.listen is None else str(config.admin.listen),
            "users": list(config.admin.users),
        },
        "limits": {
            "max_client_connections": config.limits.max_client_connections,
            "max_message_size": format_size(config.limits.max_message_size),
            "idle_client_timeout": _optional_duration(config.limits.idle_client_timeout),
            "connect_timeout": format_duration(config.limits.connect_timeout),
            "startup_timeout": format_duration(config.limits.startup_timeout),
            "max_prepared_statements": config.limits.max_prepared_statements,
            "max_pipeline_bytes": format_size(config.limits.max_pipeline_bytes),
        },
        "shutdown": {"timeout": format_duration(config.shutdown.timeout)},
        "logging": {
            "level": config.logging.level,
            "format": config.logging.format,
            "slow_query": _optional_duration(config.logging.slow_query),
        },
        "cache": {
            "enabled": config.cache.enabled,
            "max_memory": format_size(config.cache.max_memory),
            "max_entry_size": format_size(config.cache.max_entry_size),
            "shards": config.cache.shards,
            "default_ttl": format_duration(config.cache.default_ttl),
            "analysis_cache_size": config.cache.analysis_cache_size,
        },
        "snapshot": {"path": config.snapshot.path, "interval": _optional_duration(config.snapshot.interval)},
        "tls": {"mode": config.tls.mode, "cert": config.tls.cert, "key": config.tls.key},
        "invalidation": {
            "bus": config.invalidation.bus,
            "channel": config.invalidation.channel,
            "catalog_poll": _optional_duration(config.invalidation.catalog_poll),
            "unknown_writes": config.invalidation.unknown_writes,
            "replication": config.invalidation.replication,
            "publication": config.invalidation.publication,
            "slot_prefix": config.invalidation.slot_prefix,
        },
        "write_through": {
            "concurrency": config.write_through.concurrency,
            "per_second": config.write_through.per_second,
        },
        "rules": [
            {
                "tables": list(rule.tables),
                "ttl": _optional_duration(rule.ttl),
                "strategy": rule.strategy,
                "in_transaction": rule.in_transaction,
            }
            for rule in config.rules
        ],
    }
    origin = f" (from {config.source})" if config.source else ""
    header = f"# Effective cacheproxy configuration{origin}; the upstream password is masked.\n"
    return header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
