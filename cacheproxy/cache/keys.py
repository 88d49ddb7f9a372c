"""Cache keys: what must be equal for a stored result to be the answer a client would get from PostgreSQL.

A key holds the database and user, a digest of the session state that can change results, the statement text
(the exact bytes sent), and for extended protocol the declared parameter types, the Bind arguments (formats and
values, as bytes) and the Execute row limit. Keys are NamedTuples, so their parts have names (`key.sql`), while
they stay tuples: as cheap to hash and compare as plain ones, equal to the plain tuple of the same parts, and
stable across processes (the digest is blake2b, not Python's salted hash), which the snapshot needs (it writes them
as plain tuples and reads them back with `typed`). The first part names the kind of key ("q", "x", "d").
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Mapping
from typing import Final, NamedTuple

# Startup parameters that cannot change a query's result (options, TimeZone, DateStyle, search_path... can).
NEUTRAL_STARTUP: Final = frozenset(("application_name", "fallback_application_name", "user", "database", "replication"))
# Reported parameters (ParameterStatus) that cannot change a result.
NEUTRAL_REPORTED: Final = frozenset(("application_name",))


class QueryKey(NamedTuple):
    """The result of a simple-protocol Query."""

    kind: str  # "q"
    database: str
    user: str
    state: bytes  # state_digest()
    sql: bytes


class ExecuteKey(NamedTuple):
    """The result of an Execute of a bound statement (extended protocol)."""

    kind: str  # "x"
    database: str
    user: str
    state: bytes
    sql: bytes
    param_types: tuple[int, ...]
    arguments: bytes
    max_rows: int


class DescribeKey(NamedTuple):
    """The ParameterDescription and RowDescription of a statement (its Describe)."""

    kind: str  # "d"
    database: str
    user: str
    state: bytes
    sql: bytes
    param_types: tuple[int, ...]


CacheKey = QueryKey | ExecuteKey | DescribeKey
# Built with tuple.__new__ directly: a NamedTuple's own __new__ is a Python function, one call more per lookup.
_new: Final = tuple.__new__
_TYPED: Final = {("q", 5): QueryKey, ("x", 8): ExecuteKey, ("d", 6): DescribeKey}


def state_digest(startup: Mapping[str, str], reported: Mapping[str, str], set_history: Iterable[bytes]) -> bytes:
    """Digest of the session state that can change results.

    `startup`: the StartupMessage parameters (options may carry -c settings). `reported`: the values the server
    reports by ParameterStatus (TimeZone, DateStyle, IntervalStyle, client_encoding, session_authorization...),
    authoritative even after a rollback. `set_history`: the text of every SET/RESET the session ran outside a
    transaction block, in order, for the settings the server does not report (search_path, role...).

    >>> state_digest({"user": "a"}, {}, []) == state_digest({"user": "b"}, {}, [])  # user is keyed on its own
    True
    >>> state_digest({}, {"TimeZone": "UTC"}, []) == state_digest({}, {"TimeZone": "Asia/Tokyo"}, [])
    False
    """
    parts = [f"{k}={v}" for k, v in sorted(startup.items()) if k not in NEUTRAL_STARTUP]
    parts.append("\x02")
    parts += [f"{k}={v}" for k, v in sorted(reported.items()) if k not in NEUTRAL_REPORTED]
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\x00".join(parts).encode())
    for statement in set_history:
        digest.update(b"\x01" + statement)
    return digest.digest()


def query_key(database: str, user: str, state: bytes, sql: bytes) -> QueryKey:
    """A simple-protocol query: its exact text (literals included)."""
    return _new(QueryKey, ("q", database, user, state, sql))


def execute_key(
    database: str,
    user: str,
    state: bytes,
    sql: bytes,
    param_types: tuple[int, ...],
    arguments: bytes,
    max_rows: int,
) -> ExecuteKey:
    """An Execute of a bound statement. `arguments` is the Bind message after its two names (parameter formats,
    values, result formats); `max_rows` because a result cut at a row limit replays only for that limit."""
    return _new(ExecuteKey, ("x", database, user, state, sql, param_types, arguments, max_rows))


def describe_key(database: str, user: str, state: bytes, sql: bytes, param_types: tuple[int, ...]) -> DescribeKey:
    """A Describe of a statement: its ParameterDescription and RowDescription."""
    return _new(DescribeKey, ("d", database, user, state, sql, param_types))


def typed(key: Hashable) -> Hashable:
    """A key read back as a plain tuple (a snapshot) as the NamedTuple it was; anything else as it is.

    >>> typed(("q", "db", "u", b"s", b"SELECT 1")).sql
    b'SELECT 1'
    """
    if isinstance(key, tuple) and key and not isinstance(key, QueryKey | ExecuteKey | DescribeKey):
        cls = _TYPED.get((key[0], len(key)))
        if cls is not None:
            return _new(cls, key)
    return key
