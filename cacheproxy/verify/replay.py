"""The re-run of a cache hit, sans-IO: the wire messages that reproduce the hit's session state and statement on one
of the proxy's own connections, and the reading of their reply.

What reproduces a session's results is what its cache key's state digest covers (cache/keys.py `state_digest`):
the startup parameters (`options` with its `-c name=value` settings, any GUC sent at startup), the parameters the
server reports (TimeZone, DateStyle, IntervalStyle, client_encoding, standard_conforming_strings...) and the
SET/RESET statements the session ran, in order; and the key's user. All of it runs inside one transaction:

    BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY
    SET ROLE <the key's user>
    set_config(...) for the startup settings      (one extended batch: settings not settable here are skipped)
    <each SET/RESET of the session, as sent>
    set_config(...) for the reported parameters   (the values in force at the hit: they win)
    SET LOCAL statement_timeout
    <the statement: a Query, or Parse/Bind/Execute/Sync with the key's text, parameter types, arguments, row limit>
    ROLLBACK

A plain SET inside a transaction that rolls back is undone (PostgreSQL docs, SET), so the connection is left as it
was, whatever the session's statements set. Every Query and every Sync ends one "segment" of the reply (one
ReadyForQuery each); `Rerun.statement` is the statement's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cacheproxy.cache.keys import NEUTRAL_STARTUP, ExecuteKey, QueryKey
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import encode, split_messages

# Reported parameters that change results and that a session may set (the others are read-only, or are the user's:
# session_authorization and is_superuser are reproduced by SET ROLE).
SETTABLE_REPORTED = ("TimeZone", "DateStyle", "IntervalStyle", "client_encoding", "standard_conforming_strings",
                     "search_path")  # fmt: skip
# Only settings a session may change are applied from the startup packet (pg_settings.context): a backend-only one
# (log_connections...) cannot differ between sessions in a way SET could reproduce anyway.
_SET_STARTUP = (
    b"SELECT set_config(s.name, $2, false) FROM pg_catalog.pg_settings s "
    b"WHERE s.name = pg_catalog.lower($1) AND s.context IN ('user', 'superuser')"
)
_SET_REPORTED = b"SELECT pg_catalog.set_config($1, $2, false)"
_INT16 = struct.Struct("!H")
_INT32 = struct.Struct("!I")
_SYNC = encode(b"S")


@dataclass(frozen=True, slots=True)
class SessionState:
    """What of a session changes its results (a copy taken when the hit was sampled)."""

    startup: tuple[tuple[str, str], ...]
    reported: tuple[tuple[str, str], ...]
    set_history: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Rerun:
    """The messages to send, how many segments their reply has, and which one is the statement's."""

    payload: bytes
    segments: int
    statement: int


def startup_settings(startup: Mapping[str, str]) -> list[tuple[str, str]]:
    """The settings a StartupMessage carries: its GUC parameters, and those `options` sets (`-c name=value`,
    `--name=value`; a backslash escapes the next character, as libpq's PGOPTIONS).

    >>> startup_settings({"user": "u", "TimeZone": "UTC", "options": r"-c search_path=a,b --DateStyle=ISO\\ ,\\ DMY"})
    [('TimeZone', 'UTC'), ('search_path', 'a,b'), ('DateStyle', 'ISO , DMY')]
    """
    settings = [(name, value) for name, value in startup.items() if name not in NEUTRAL_STARTUP and name != "options"]
    words = _split_options(startup.get("options", ""))
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-c" and index + 1 < len(words):
            index += 1
            word = words[index]
        elif word.startswith("-c") or word.startswith("--"):
            word = word[2:]
        else:
            index += 1
            continue  # another backend switch: none of them changes what a query returns
        name, eq, value = word.partition("=")
        if eq:
            settings.append((name.replace("-", "_"), value))
        index += 1
    return settings


def _split_options(options: str) -> list[str]:
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        words.append("".join(current))
    return words


def quote_ident(name: str) -> str:
    """A role name as a quoted identifier.

    >>> quote_ident('we"ird')
    '"we""ird"'
    """
    return '"' + name.replace('"', '""') + '"'


def rerun(key: QueryKey | ExecuteKey, state: SessionState, timeout_ms: int) -> Rerun:
    """The re-run of the result cached under `key`, in `state` (see the module docstring)."""
    parts: list[bytes] = []
    segments = 0

    def query(sql: bytes) -> None:
        nonlocal segments
        parts.append(encode(b"Q", sql + b"\x00"))
        segments += 1

    query(b"BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY")
    query(f"SET ROLE {quote_ident(key.user)}".encode())
    segments += _set_configs(parts, _SET_STARTUP, startup_settings(dict(state.startup)))
    for setting in state.set_history:
        query(setting)
    reported = [(name, value) for name, value in state.reported if name in SETTABLE_REPORTED]
    reported.append(("statement_timeout", str(timeout_ms)))
    segments += _set_configs(parts, _SET_REPORTED, reported)
    statement = segments
    if isinstance(key, ExecuteKey):
        parts.append(_parse(key.sql, key.param_types))
        parts.append(encode(b"B", b"\x00\x00" + key.arguments))
        parts.append(encode(b"E", b"\x00" + _INT32.pack(key.max_rows)))
        parts.append(_SYNC)
        segments += 1
    else:
        query(key.sql)
    query(b"ROLLBACK")
    return Rerun(b"".join(parts), segments, statement)


def _parse(sql: bytes, param_types: tuple[int, ...]) -> bytes:
    types = b"".join(_INT32.pack(oid) for oid in param_types)
    return encode(b"P", b"\x00" + sql + b"\x00" + _INT16.pack(len(param_types)) + types)


def _set_configs(parts: list[bytes], sql: bytes, settings: Iterable[tuple[str, str]]) -> int:
    """One extended batch calling `sql`($1 = name, $2 = value) for each setting; the segments it adds (0 or 1)."""
    batch = [_bind_text(name, value) + encode(b"E", b"\x00" + _INT32.pack(0)) for name, value in settings]
    if not batch:
        return 0
    parts.append(_parse(sql, (25, 25)))  # text, text
    parts.extend(batch)
    parts.append(_SYNC)
    return 1


def _bind_text(*values: str) -> bytes:
    body = [b"\x00\x00", _INT16.pack(0), _INT16.pack(len(values))]  # portal, statement, all parameters in text
    for value in values:
        data = value.encode("utf-8", "surrogateescape")
        body.append(_INT32.pack(len(data)) + data)
    body.append(_INT16.pack(0))  # results in text
    return encode(b"B", b"".join(body))


@dataclass(frozen=True, slots=True)
class Reply:
    """A re-run's reply read: the statement's messages (whole, header included), or why it cannot be compared."""

    statement: list[tuple[int, bytes]]
    error: str | None


def read_reply(data: bytes, plan: Rerun) -> Reply:
    """Split the reply to `plan` into its segments; an ErrorResponse up to the statement's makes it an error."""
    segment = 0
    found: list[tuple[int, bytes]] = []
    for msg_type, body in split_messages(data):
        if msg_type == m.READY_FOR_QUERY:
            segment += 1
            if segment > plan.statement:
                break
            continue
        if msg_type == m.ERROR_RESPONSE:
            fields = m.decode_error_fields(body)
            where = "the statement" if segment == plan.statement else "applying the session's settings"
            return Reply([], f"{where} failed: {fields.get('M', '?')} (SQLSTATE {fields.get('C', '?')})")
        if segment == plan.statement:
            found.append((msg_type, body))
    return Reply(found, None)
