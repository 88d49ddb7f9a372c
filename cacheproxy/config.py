"""Configuration: YAML -> frozen, validated, typed config objects; every error names the file and the key.

Each key is declared once, as a field of its section below: its default, how it is read and rendered (a
:class:`Kind`), and for a few the ``--flag`` / ``CACHEPROXY_*`` variable that overrides it. Reading
(:func:`build_config`), rendering (:func:`render_config`) and the overrides are driven by those declarations;
checks across keys of one section live in that section's ``validate()``, as in PgCat.

Everything here is pure except :func:`load_config`, which reads the one file. The environment arrives as a
mapping argument, never from ``os.environ``. Precedence, highest first: keyword flags, ``CACHEPROXY_*``
environment variables, the file, the declared defaults.

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
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Generic, TypeVar
from urllib.parse import unquote

import yaml

__all__ = [
    "Address",
    "AdminConfig",
    "AuthConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "FailoverConfig",
    "InvalidationConfig",
    "Kind",
    "LimitsConfig",
    "LoggingConfig",
    "Rule",
    "SharedCacheConfig",
    "ShutdownConfig",
    "SnapshotConfig",
    "TLSConfig",
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
# libpq's target_session_attrs and load_balance_hosts values (libpq-connect, Parameter Key Words).
TARGET_SESSION_ATTRS: Final = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
LOAD_BALANCE_HOSTS: Final = ("disable", "random")
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_UPSTREAM_PORT: Final = 5432
DEFAULT_MYSQL_PORT: Final = 3306
MYSQL_SCHEMES: Final = ("mysql", "mariadb")
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
FLAGS: Final = "<flags>"
ENV: Final = "<env>"

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
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # Which front end the proxy runs: "postgres" (postgres://, postgresql://), or "mysql" / "mariadb" (mysql://,
    # mariadb://: the MySQL protocol, cacheproxy/mysql).
    kind: str = "postgres"
    # Every host of a multi-host URL (`host`/`port` are the first), tried in order as libpq does (see
    # cacheproxy/upstream_hosts.py); one host for a plain URL.
    hosts: tuple[tuple[str, int], ...] = ()
    target_session_attrs: str = "any"
    load_balance_hosts: str = "disable"

    @property
    def is_mysql(self) -> bool:
        return self.kind in ("mysql", "mariadb")

    @classmethod
    def from_url(cls, url: str, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> UpstreamConfig:
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
            f"connect_timeout={self.connect_timeout!r}, hosts={self.hosts!r}, "
            f"target_session_attrs={self.target_session_attrs!r}, load_balance_hosts={self.load_balance_hosts!r})"
        )


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


_URL_PARAMS: Final = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "target_session_attrs",
    "load_balance_hosts",
)
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
    if scheme not in ("postgres", "postgresql", *MYSQL_SCHEMES):
        raise ValueError("must be a URL starting with postgres:// or postgresql:// (or mysql://, mariadb://)")
    _, userinfo, tail = _split_userinfo(url)
    match = _URL_TAIL.fullmatch(tail)
    assert match is not None  # every group is optional and the last one takes the rest
    user, colon, password = userinfo.partition(":")
    default_port = DEFAULT_MYSQL_PORT if scheme in MYSQL_SCHEMES else DEFAULT_UPSTREAM_PORT
    hosts = _upstream_hosts(match.group("hostport"), default_port)
    host, port = hosts[0]
    params = _url_params(match.group("query") or "")
    sslmode = params.get("sslmode", "prefer")
    if sslmode not in SSLMODES:
        raise ValueError(f"unknown sslmode {sslmode!r} (allowed: {', '.join(SSLMODES)})")
    target = params.get("target_session_attrs", "any")
    if target not in TARGET_SESSION_ATTRS:
        raise ValueError(f"unknown target_session_attrs {target!r} (allowed: {', '.join(TARGET_SESSION_ATTRS)})")
    balance = params.get("load_balance_hosts", "disable")
    if balance not in LOAD_BALANCE_HOSTS:
        raise ValueError(f"unknown load_balance_hosts {balance!r} (allowed: {', '.join(LOAD_BALANCE_HOSTS)})")
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
        kind="postgres" if scheme.startswith("postgres") else scheme,
        hosts=hosts,
        target_session_attrs=target,
        load_balance_hosts=balance,
    )


def _upstream_hosts(hostports: str, default_port: int) -> tuple[tuple[str, int], ...]:
    """libpq's multi-host form ``h1:p1,h2:p2`` (libpq-connect, Specifying Multiple Hosts): each host may have its
    own port; one without a port gets `default_port` (5432, or 3306 for MySQL)."""
    hosts = tuple(_upstream_host_port(item, default_port) for item in hostports.split(","))
    if len(set(hosts)) != len(hosts):
        raise ValueError("a host is given twice in the upstream URL")
    return hosts


def _upstream_host_port(hostport: str, default_port: int) -> tuple[str, int]:
    host, port = _split_host_port(hostport)
    return unquote(host) or DEFAULT_HOST, default_port if port is None else _parse_port(port, minimum=1)


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


# --- kinds: how a value is read from YAML and written back ----------------------------------------
# A kind's parse takes a raw YAML value and returns a typed one or raises ValueError saying what is wrong (or
# ConfigError with a key relative to the value, for an item of a list). Strings are accepted for numbers and
# booleans because ${VAR} interpolation always produces strings.


def _same(value: Any) -> object:
    return value


@dataclass(frozen=True, slots=True)
class Kind(Generic[_T]):
    """How one key is read (``parse``) and how :func:`render_config` writes it back (``show``)."""

    parse: Callable[[object], _T]
    show: Callable[[Any], object] = _same


def optional(kind: Kind[_T]) -> Kind[_T | None]:
    """``kind``, or null."""
    return Kind(
        lambda value: None if value is None else kind.parse(value),
        lambda value: None if value is None else kind.show(value),
    )


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {_type(value) if value != '' else 'empty string'}")
    return value


_BOOL_WORDS: Final = dict.fromkeys(("true", "yes", "on", "1"), True) | dict.fromkeys(("false", "no", "off", "0"), False)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"must be true or false, got {_show(value)}")


STRING: Final = Kind(_string)
BOOLEAN: Final = Kind(_boolean)


def integer(minimum: int, maximum: int | None = None) -> Kind[int]:
    def parse(value: object) -> int:
        if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_show(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    return Kind(parse)


def number(*, positive: bool) -> Kind[float]:
    def parse(value: object) -> float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value.strip())
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"must be a number, got {_show(value)}")
        if value < 0 or (positive and value == 0):
            raise ValueError(f"must be {'greater than 0' if positive else 'at least 0'}, got {value}")
        return float(value)

    return Kind(parse)


def duration(*, positive: bool) -> Kind[float]:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be greater than 0, got {_show(value)}")
        return seconds

    return Kind(parse, format_duration)


def size(minimum: int) -> Kind[int]:
    def parse(value: object) -> int:
        amount = parse_size(value)
        if amount < minimum:
            raise ValueError(f"must be at least {format_size(minimum)}, got {_show(value)}")
        return amount

    return Kind(parse, format_size)


def choice(*allowed: str) -> Kind[str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value.strip().lower() in allowed:
            return value.strip().lower()
        raise ValueError(f"must be one of {', '.join(allowed)}, got {_show(value)}")

    return Kind(parse)


def _address(value: object) -> Address:
    if not isinstance(value, str):
        raise ValueError(f"must be an address string like '127.0.0.1:6432', got {_type(value)}")
    return Address.parse(value)


def _address_or_off(value: object) -> Address | None:
    # YAML 1.1 reads a bare `off` / `false` as the boolean False.
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    return _address(value)


ADDRESS: Final = Kind(_address, str)
ADDRESS_OR_OFF: Final = Kind(_address_or_off, lambda address: None if address is None else str(address))

_CHANNEL = re.compile(r"[a-z_][a-z0-9_$]{0,62}")


def _channel(value: object) -> str:
    # Written into LISTEN/NOTIFY unquoted: a plain lower-case identifier only.
    if not isinstance(value, str) or not _CHANNEL.fullmatch(value):
        raise ValueError(f"must be a lower-case identifier (letters, digits, _), got {_show(value)}")
    return value


CHANNEL: Final = Kind(_channel)


def _upstream(value: object) -> UpstreamConfig:
    if value is None:
        raise ValueError("required: set it in the config file, with --upstream or with CACHEPROXY_UPSTREAM")
    if not isinstance(value, str):
        raise ValueError(f"must be a postgres:// (or mysql://) URL string, got {_type(value)}")
    return UpstreamConfig.from_url(value)


UPSTREAM: Final = Kind(_upstream, UpstreamConfig.masked_url)


def items(item: Kind[_T], what: str, *, required: bool = False) -> Kind[tuple[_T, ...]]:
    """A list of ``what``, each item read by ``item`` (an error names it as ``[i]``). Null is an empty list unless
    ``required``; then the list must not be empty, and a lone string stands for a list of one."""

    def parse(value: object) -> tuple[_T, ...]:
        if required and isinstance(value, str):
            value = [value]
        if value is None and not required:
            return ()
        if not isinstance(value, list) or (required and not value):
            got = _show(value) if required else _type(value)
            raise ValueError(f"must be {'a non-empty' if required else 'a'} list of {what}, got {got}")
        return tuple(_at(f"[{i}]", item.parse, each) for i, each in enumerate(value))

    return Kind(parse, lambda values: [item.show(each) for each in values])


ROLE_NAMES: Final = items(STRING, "role names")

# Table names or globs: one to three dot-separated parts, each a "quoted" identifier or unquoted text.
_IDENT: Final = r'(?:"(?:[^"]|"")+"|[^\s".]+)'
_TABLE_PATTERN = re.compile(rf"{_IDENT}(?:\.{_IDENT}){{0,2}}")


def _table(value: object) -> str:
    if not isinstance(value, str) or not _TABLE_PATTERN.fullmatch(value):
        raise ValueError(f'not a table name or pattern: {_show(value)} (e.g. orders, public.*, "Quoted"."T")')
    return value


def _rule(value: object) -> Rule:
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping with 'tables' (or 'fingerprints', 'queryids'), got {_type(value)}")
    return _read(Rule, value)


_TABLE_LIST: Final = items(Kind(_table), "table names")
# A lone string stands for a list of one; empty is allowed here (a statement rule), Rule.validate says when not.
TABLES: Final = Kind(lambda value: _TABLE_LIST.parse([value] if isinstance(value, str) else value), _TABLE_LIST.show)


def _show_rule(rule: Rule) -> dict[str, object]:
    # A table rule renders as before statement rules existed; a statement rule without its empty `tables`.
    shown = _render(rule)
    for name in ("tables", "fingerprints", "queryids"):
        if not shown[name]:
            del shown[name]
    return shown


RULES: Final = items(Kind(_rule, lambda rule: _show_rule(rule)), "rules")


# --- statement rules (issue 17): a rule may name statements instead of tables ----------------------


def _statement_text(value: object) -> str:
    # A fingerprint id as the proxy shows it (16 hex digits), or the statement's SQL (fingerprinted by the rules).
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a fingerprint (16 hex digits, as CACHEPROXY SHOW ADVICE shows) or SQL text, got "
                         f"{_show(value)}")  # fmt: skip
    return value.strip()


FINGERPRINTS: Final = items(Kind(_statement_text), "statement fingerprints")
QUERYIDS: Final = items(integer(-(2**63), 2**63 - 1), "pg_stat_statements queryids")


# --- the keys -------------------------------------------------------------------------------------
# One declaration per key: `name: type = setting(default, kind)`. A section is a field made with `section(...)`;
# a required key is a plain `field(metadata=_spec(kind))` (absent, its kind is asked to read null and says why).


@dataclass(frozen=True, slots=True)
class _Spec:
    kind: Kind[Any]
    override: str | None = None  # "log_level": the flag log_level= (--log-level) and CACHEPROXY_LOG_LEVEL
    section: type[_Section] | None = None  # set for a sub-section, whose own keys may have overrides


_SPEC: Final = "cacheproxy.config"


def _spec(kind: Kind[Any], override: str | None = None) -> dict[str, _Spec]:
    return {_SPEC: _Spec(kind, override=override)}


def setting(default: _T, kind: Kind[_T], *, override: str | None = None) -> _T:
    """Declare a key with its default, its kind and (optionally) the flag and variable that override it."""
    return field(default=default, metadata=_spec(kind, override))


_S = TypeVar("_S", bound="_Section")


def section(cls: type[_S]) -> _S:
    """Declare a sub-section; absent or null, it takes its own defaults."""
    kind = Kind(lambda value: _read(cls, value), lambda value: _render(value))
    return field(default_factory=cls, metadata={_SPEC: _Spec(kind, section=cls)})


class _Section:
    """What every section has: ``validate()`` for the checks that span its keys."""

    __slots__ = ()

    def validate(self) -> None:
        """Raise ConfigError whose key is relative to this section; nothing to check by default."""


@dataclass(frozen=True, slots=True)
class LimitsConfig(_Section):
    """Resource limits protecting the proxy from clients and a slow upstream."""

    max_client_connections: int = setting(1000, integer(1))
    # A floor of 1KiB catches "64" meant as megabytes; a startup packet alone can take hundreds of bytes.
    max_message_size: int = setting(64 * MiB, size(KiB))
    idle_client_timeout: float | None = setting(None, optional(duration(positive=True)))
    connect_timeout: float = setting(DEFAULT_CONNECT_TIMEOUT, duration(positive=True))
    startup_timeout: float = setting(60.0, duration(positive=True))
    # Upstream connections kept open ahead of new clients (TCP, sslmode and the server's fork done), while clients
    # keep connecting (proxy/spare_upstream.py); 0 = each session opens its own when its client connects.
    spare_upstream_connections: int = setting(1, integer(0))
    # Named prepared statements the proxy tracks per session; past it the session ends with 53400, rather than the
    # proxy's memory growing with a client that prepares without ever closing.
    max_prepared_statements: int = setting(10000, integer(1))
    # Extended-protocol messages held while waiting for Sync (to answer the batch from the cache): past this many
    # bytes the batch is forwarded upstream as it is, and flow control (paused reads) bounds the rest.
    max_pipeline_bytes: int = setting(1 * MiB, size(KiB))


@dataclass(frozen=True, slots=True)
class ShutdownConfig(_Section):
    """How long a graceful shutdown waits for in-flight work before cancelling it."""

    timeout: float = setting(30.0, duration(positive=False))


@dataclass(frozen=True, slots=True)
class AdminConfig(_Section):
    """The admin HTTP endpoint (metrics, health); ``listen=None`` disables it."""

    listen: Address | None = setting(Address(DEFAULT_HOST, 9187), ADDRESS_OR_OFF, override="admin_listen")
    users: tuple[str, ...] = setting((), ROLE_NAMES)


@dataclass(frozen=True, slots=True)
class LoggingConfig(_Section):
    """Log level and format; ``slow_query`` logs queries slower than this many seconds (None = off)."""

    level: str = setting("info", choice("debug", "info", "warning", "error"), override="log_level")
    format: str = setting("text", choice("text", "json"), override="log_format")
    slow_query: float | None = setting(None, optional(duration(positive=False)))


def _mask_password(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host`` (rendered configs never show a password)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


def _url_or_off(value: object) -> str | None:
    """A URL; null or "" is off (so that `url: ${SHARED_URL:-}` turns it off where the variable is unset)."""
    return None if value is None or value == "" else _string(value)


SECRET_URL_OR_OFF: Final = Kind(_url_or_off, lambda value: None if value is None else _mask_password(value))


@dataclass(frozen=True, slots=True)
class SharedCacheConfig(_Section):
    """The optional shared tier (Redis / Valkey) behind the in-process cache (cache/shared.py).

    ``url``: ``redis://`` or ``rediss://`` (user and password for ACLs; TLS options as redis-py URL parameters, such
    as ``ssl_ca_certs``), null or "" = off. ``cluster``: a Redis Cluster. ``consistency``: ``bounded`` serves in-process
    hits as they are (stale across sidecars for at most the invalidation bus delay), ``strict`` checks each against
    the shared generations first. ``timeout``: per call; slower calls open the circuit breaker for ``cooldown``.
    ``namespace``: overrides the cluster's system identifier in keys (when the proxy's user cannot read it).
    ``compress_above``: values larger than this are stored zstd-compressed. ``lock_wait``: how long a miss waits for
    another sidecar's fill of the same key (single flight across sidecars; 0 = never)."""

    url: str | None = setting(None, SECRET_URL_OR_OFF)
    cluster: bool = setting(False, BOOLEAN)
    consistency: str = setting("bounded", choice("bounded", "strict"))
    timeout: float = setting(0.25, duration(positive=True))
    cooldown: float = setting(5.0, duration(positive=True))
    namespace: str | None = setting(None, optional(STRING))
    compress_above: int = setting(4 * KiB, size(0))
    lock_wait: float = setting(0.5, duration(positive=False))

    def validate(self) -> None:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "valkey://", "valkeys://")):
            raise ConfigError(f"must be a redis:// or rediss:// URL, got {self.url.split(':', 1)[0]}:...", key="url")


@dataclass(frozen=True, slots=True)
class CacheConfig(_Section):
    """The result cache: memory budget, sharding and the TTL used when a rule does not give one."""

    enabled: bool = setting(True, BOOLEAN)
    max_memory: int = setting(256 * MiB, size(1))
    max_entry_size: int = setting(1 * MiB, size(1))
    shards: int = setting(16, integer(1, 4096))
    default_ttl: float = setting(60.0, duration(positive=True))
    analysis_cache_size: int = setting(10000, integer(0))
    shared: SharedCacheConfig = section(SharedCacheConfig)

    def validate(self) -> None:
        if self.shards & (self.shards - 1):
            raise ConfigError(f"must be a power of two (1, 2, 4, ... 4096), got {self.shards}", key="shards")
        # Each shard gets an equal slice of the budget, so the largest entry must fit in one slice.
        per_shard = self.max_memory // self.shards
        if self.max_entry_size > per_shard:
            raise ConfigError(
                f"must not exceed max_memory / shards ({format_size(per_shard)}), "
                f"got {format_size(self.max_entry_size)}",
                key="max_entry_size",
            )


@dataclass(frozen=True, slots=True)
class InvalidationConfig(_Section):
    """How writes the proxy does not see itself reach its cache.

    ``bus``: every invalidation is published with NOTIFY on ``channel`` and every proxy LISTENs there (one control
    connection per database); while that connection is down, the database's entries are not served.
    ``catalog_poll``: how often the bus connection checks the catalog for changes made straight on the database
    (GRANT/REVOKE, row security, DDL, roles), which drop the database's entries; None = never.
    ``idle_release``: how long after a database's last client session its control connections (and replication
    stream) stay open; closing them drops the database's entries (nothing would see writes meanwhile) and lets a
    DROP DATABASE made elsewhere succeed; None = never.
    ``unknown_writes``: what a statement with unknown effects (DO, CALL, a function that may write) does:
    ``invalidate_database`` (default) or ``ignore``. ``replication``: also follow a logical replication stream
    (publication ``publication``, a temporary slot named ``slot_prefix`` + a per-instance suffix), which sees
    writes that bypass every proxy.
    """

    bus: bool = setting(True, BOOLEAN)
    channel: str = setting("cacheproxy_invalidation", CHANNEL)
    catalog_poll: float | None = setting(1.0, optional(duration(positive=True)))
    idle_release: float | None = setting(60.0, optional(duration(positive=True)))
    unknown_writes: str = setting("invalidate_database", choice("invalidate_database", "ignore"))
    replication: bool = setting(False, BOOLEAN)
    publication: str = setting("cacheproxy", CHANNEL)
    slot_prefix: str = setting("cacheproxy", CHANNEL)
    # MySQL / MariaDB upstreams (cacheproxy/mysql/binlog.py): follow the server's row-based binlog as a replica, which
    # sees writes that bypass every proxy; needs REPLICATION SLAVE and REPLICATION CLIENT for the URL's user.
    binlog: bool = setting(False, BOOLEAN)


@dataclass(frozen=True, slots=True)
class WriteThroughConfig(_Section):
    """Refreshes of `strategy: write_through` entries after a committed write: at most ``concurrency`` run after
    one commit, at most ``per_second`` in all."""

    concurrency: int = setting(4, integer(1, 64))
    per_second: float = setting(1000.0, number(positive=True))


@dataclass(frozen=True, slots=True)
class VerifyConfig(_Section):
    """Shadow verification (cacheproxy/verify): ``sample`` is the share of cache hits (0 to 1; 0 = off) re-run
    against PostgreSQL in the background and compared with what the cache served, at most ``per_second`` checks a
    second and ``queue`` waiting; ``on_mismatch``: ``log`` only, or ``bypass`` (also stop serving that statement from
    the cache until a reload). A mismatch is counted only if its entry's tables are still not invalidated ``settle``
    after the check (a racing write's invalidation may arrive that late)."""

    sample: float = setting(0.0, number(positive=False))
    per_second: float = setting(10.0, number(positive=True))
    on_mismatch: str = setting("log", choice("log", "bypass"))
    queue: int = setting(100, integer(1, 100_000))
    settle: float = setting(1.0, duration(positive=False))

    def validate(self) -> None:
        if self.sample > 1:
            raise ConfigError(f"must be from 0 to 1, got {self.sample:g}", key="sample")


@dataclass(frozen=True, slots=True)
class SnapshotConfig(_Section):
    """Optional persistence of the cache to a file, every ``interval`` seconds and at shutdown."""

    path: str | None = setting(None, optional(STRING))
    interval: float | None = setting(None, optional(duration(positive=True)))

    def validate(self) -> None:
        if self.interval is not None and self.path is None:
            raise ConfigError("needs snapshot.path to be set", key="interval")


@dataclass(frozen=True, slots=True)
class FailoverConfig(_Section):
    """What the proxy does when its upstream goes away (cacheproxy/upstream_hosts.py, cacheproxy/proxy/reattach.py).

    ``wait``: how long a session that lost its upstream waits for a server to answer again (the same host, or the
    next one of a multi-host URL that passes target_session_attrs) before it ends with 08006; 0 = never wait (the
    session ends at once, as without this feature). ``reattach_concurrency``: how many sessions log in again at the
    same time (the rest queue: no thundering herd on the new primary). ``check_interval``: how often the proxy
    probes the chosen host of a multi-host URL (a standby promoted, a primary that became read-only).
    """

    wait: float = setting(30.0, duration(positive=False))
    reattach_concurrency: int = setting(16, integer(1, 1024))
    check_interval: float = setting(2.0, duration(positive=True))


@dataclass(frozen=True, slots=True)
class TLSConfig(_Section):
    """TLS towards clients. ``mode``: disable (SSLRequest answered 'N'), allow (TLS when the client asks),
    require (plaintext clients are refused). ``cert`` and ``key`` are PEM files, required unless disabled."""

    mode: str = setting("disable", choice("disable", "allow", "require"))
    cert: str | None = setting(None, optional(STRING))
    key: str | None = setting(None, optional(STRING))

    def validate(self) -> None:
        if self.mode != "disable":
            for name, path in (("cert", self.cert), ("key", self.key)):
                if not path:
                    raise ConfigError(f"required when tls.mode is {self.mode}", key=name)
                if not os.path.isfile(path):
                    raise ConfigError(f"no such file: {path}", key=name)


@dataclass(frozen=True, slots=True)
class AuthConfig(_Section):
    """Client authentication. ``mode``: ``relay`` (the default: the client authenticates with the upstream through
    the proxy) or ``terminate`` (the proxy authenticates the client itself, against a verifier from ``file``, a
    PgBouncer userlist.txt, or from ``query``, run on the database as ``user``; it then logs in upstream with the
    SCRAM keys the client's own exchange yields, so no password is stored). ``user``: the role that runs the
    query (default: the upstream URL's user; another role needs its password in ``file``)."""

    mode: str = setting("relay", choice("relay", "terminate"))
    file: str | None = setting(None, optional(STRING))
    query: str = setting("SELECT usename, passwd FROM pg_shadow WHERE usename=$1", STRING)
    user: str | None = setting(None, optional(STRING))

    def validate(self) -> None:
        if self.file is not None and not os.path.isfile(self.file):
            raise ConfigError(f"no such file: {self.file}", key="file")


@dataclass(frozen=True, slots=True)
class Rule(_Section):
    """A caching rule for tables, or for statements. ``tables`` holds names or globs exactly as written (no case
    folding); ``fingerprints`` and ``queryids`` name statements instead (a rule names one kind or the other)."""

    tables: tuple[str, ...] = setting((), TABLES)
    ttl: float | None = setting(None, optional(duration(positive=True)))
    strategy: str = setting("lazy", choice("lazy", "write_through", "none"))
    in_transaction: str = setting("until_write", choice("never", "until_write", "always"))
    fingerprints: tuple[str, ...] = setting((), FINGERPRINTS)
    queryids: tuple[int, ...] = setting((), QUERYIDS)
    # Stale-if-error: while the upstream cannot be reached, results expired less than this long ago are served
    # (with a NOTICE). None (the default): nothing stale is ever served.
    stale_if_error: float | None = setting(None, optional(duration(positive=True)))

    def validate(self) -> None:
        statements = bool(self.fingerprints or self.queryids)
        if not self.tables and not statements:
            raise ConfigError(
                f"must be a non-empty list of table names (or name statements with fingerprints or queryids), "
                f"got {list(self.tables)}",
                key="tables",
            )
        if self.tables and statements:
            raise ConfigError("a rule names tables or statements, not both: make it two rules", key="tables")

    @property
    def names_statements(self) -> bool:
        return bool(self.fingerprints or self.queryids)


# --- server.workers (cacheproxy/workers): several processes serving one listen address ---------------

MAX_WORKERS: Final = 64
# `auto` never starts more than this many workers: past it, the shared invalidation channel and the per-worker
# caches cost more than the cores give (and a sidecar's pod rarely has more).
AUTO_WORKERS_CAP: Final = 8


def _workers(value: object) -> int:
    """A worker count, or `auto` (stored as 0: resolved to the CPU count when the proxy starts)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    return integer(1, MAX_WORKERS).parse(value)


WORKERS: Final = Kind(_workers, lambda value: "auto" if value == 0 else value)


@dataclass(frozen=True, slots=True)
class ServerConfig(_Section):
    """How the proxy uses the host's cores."""

    workers: int = setting(1, WORKERS)  # 0: auto

    def worker_count(self, cpus: int | None) -> int:
        """The number of worker processes to run: `workers`, or for auto the CPU count capped at 8."""
        if self.workers:
            return self.workers
        return max(1, min(cpus or 1, AUTO_WORKERS_CAP))


@dataclass(frozen=True, slots=True, kw_only=True)
class Config(_Section):
    """The whole, validated configuration. ``source`` is the file it was read from, if any."""

    upstream: UpstreamConfig = field(metadata=_spec(UPSTREAM, override="upstream"))
    listen: Address = setting(Address(DEFAULT_HOST, 6432), ADDRESS, override="listen")
    admin: AdminConfig = section(AdminConfig)
    limits: LimitsConfig = section(LimitsConfig)
    shutdown: ShutdownConfig = section(ShutdownConfig)
    logging: LoggingConfig = section(LoggingConfig)
    cache: CacheConfig = section(CacheConfig)
    snapshot: SnapshotConfig = section(SnapshotConfig)
    tls: TLSConfig = section(TLSConfig)
    invalidation: InvalidationConfig = section(InvalidationConfig)
    write_through: WriteThroughConfig = section(WriteThroughConfig)
    auth: AuthConfig = section(AuthConfig)
    verify: VerifyConfig = section(VerifyConfig)
    failover: FailoverConfig = section(FailoverConfig)
    server: ServerConfig = section(ServerConfig)
    rules: tuple[Rule, ...] = setting((), RULES)
    source: str | None = None  # not a key


# --- building Config from a parsed tree -----------------------------------------------------------


def _join(prefix: str | None, name: str | None) -> str:
    """``"cache" + "shards"`` -> ``"cache.shards"``; ``"rules" + "[0].ttl"`` -> ``"rules[0].ttl"``."""
    if not prefix or not name:
        return prefix or name or ""
    return prefix + name if name.startswith("[") else f"{prefix}.{name}"


def _settings(cls: type[_Section]) -> list[tuple[Field[Any], _Spec]]:
    return [(f, f.metadata[_SPEC]) for f in fields(cls) if _SPEC in f.metadata]  # type: ignore[arg-type]


def _keys(cls: type[_Section]) -> tuple[str, ...]:
    return tuple(f.name for f, _ in _settings(cls))


def _overrides(cls: type[_Section] = Config, prefix: str = "") -> dict[str, str]:
    """Override name (``"log_level"``) -> dotted key (``"logging.level"``), from the declarations."""
    found: dict[str, str] = {}
    for f, spec in _settings(cls):
        if spec.section is not None:
            found |= _overrides(spec.section, _join(prefix, f.name))
        elif spec.override is not None:
            found[spec.override] = _join(prefix, f.name)
    return found


OVERRIDES: Final = _overrides()
# Environment variable -> dotted key it overrides. CACHEPROXY_LOG_FORMAT is here for symmetry with the flag.
ENV_OVERRIDES: Final = tuple((f"CACHEPROXY_{name.upper()}", key) for name, key in OVERRIDES.items())


def _at(key: str, parse: Callable[[object], _T], value: object) -> _T:
    """``parse(value)``, with any error's key put under ``key``."""
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(str(exc), key=key) from None
    except ConfigError as exc:
        raise ConfigError(exc.message, key=_join(key, exc.key)) from None


def _read(cls: type[_S], value: object) -> _S:
    """Section ``cls`` from its mapping (null reads as empty), validated; error keys are relative to it."""
    m = _mapping(value, _keys(cls))
    values: dict[str, object] = {}
    for f, spec in _settings(cls):
        if f.name in m or (f.default is MISSING and f.default_factory is MISSING):
            values[f.name] = _at(f.name, spec.kind.parse, m.get(f.name))
    built = cls(**values)
    built.validate()
    return built


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


def _mapping(value: object, allowed: Sequence[str]) -> Mapping[str, object]:
    """Check that ``value`` is a mapping with string keys drawn from ``allowed``; None reads as empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"must be a mapping, got {_type(value)}")
    for name in value:
        if not isinstance(name, str):
            raise ConfigError(f"keys must be strings, got {_show(name)}")
        if name not in allowed:
            raise ConfigError(_unknown_key(name, allowed), key=name)
    return value


def _unknown_key(name: str, allowed: Sequence[str]) -> str:
    message = f"unknown key (allowed: {', '.join(allowed)})"
    close = difflib.get_close_matches(name, allowed, n=1)
    return f"{message}; did you mean {close[0]!r}?" if close else message


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


def _build(data: object, where: _Where) -> Config:
    if not isinstance(data, Mapping):
        raise where.error(None, f"top level must be a mapping of keys, got {_type(data)}")
    try:
        config = _read(Config, data)
    except ConfigError as exc:
        raise where.error(exc.key, exc.message) from None
    # The URL's own ?connect_timeout= wins; limits.connect_timeout is the default for it.
    upstream = UpstreamConfig.from_url(config.upstream.url, connect_timeout=config.limits.connect_timeout)
    return replace(config, upstream=upstream, source=where.source)


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
        "admin_listen": admin_listen,
        "log_level": log_level,
        "log_format": log_format,
    }
    for name, flag in flags.items():
        if flag is not None:
            _override(tree, OVERRIDES[name], flag)
            origins[OVERRIDES[name]] = FLAGS
    return _build(tree, _Where(path, origins))


# --- rendering ------------------------------------------------------------------------------------


def _render(section: _Section) -> dict[str, object]:
    return {f.name: spec.kind.show(getattr(section, f.name)) for f, spec in _settings(type(section))}


def render_config(config: Config) -> str:
    """The effective configuration as YAML, password masked; ``build_config`` reads it back."""
    origin = f" (from {config.source})" if config.source else ""
    header = f"# Effective cacheproxy configuration{origin}; the upstream password is masked.\n"
    return header + yaml.safe_dump(_render(config), sort_keys=False, allow_unicode=True)
