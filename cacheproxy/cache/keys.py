"""Cache keys: what must be equal for a stored result to be the answer a client would get from PostgreSQL.

A key holds the database and user, a digest of the session state that can change results, the statement text
(the exact bytes sent), and for extended protocol the declared parameter types, the Bind arguments (formats and
values, as bytes) and the Execute row limit. Keys are plain tuples: cheap to hash, and stable across processes
(the digest is blake2b, not Python's salted hash), which the snapshot needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

# Startup parameters that cannot change a query's result (options, TimeZone, DateStyle, search_path... can).
NEUTRAL_STARTUP = frozenset(("application_name", "fallback_application_name", "user", "database", "replication"))
# Reported parameters (ParameterStatus) that cannot change a result.
NEUTRAL_REPORTED = frozenset(("application_name",))

QueryKey = tuple[str, str, str, bytes, bytes]
ExecuteKey = tuple[str, str, str, bytes, bytes, tuple[int, ...], bytes, int]
DescribeKey = tuple[str, str, str, bytes, bytes, tuple[int, ...]]


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
    return ("q", database, user, state, sql)


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
    return ("x", database, user, state, sql, param_types, arguments, max_rows)


def describe_key(database: str, user: str, state: bytes, sql: bytes, param_types: tuple[int, ...]) -> DescribeKey:
    """A Describe of a statement: its ParameterDescription and RowDescription."""
    return ("d", database, user, state, sql, param_types)
