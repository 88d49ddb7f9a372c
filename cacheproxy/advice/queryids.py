"""Statement rules by pg_stat_statements queryid: the queryids named by the rules, looked up in the database's
pg_stat_statements when its catalog is loaded, become statement ids (the proxy cannot compute a queryid: the server
derives it from the parsed statement). The text pg_stat_statements keeps has its constants as `$n`, which the
statement id treats as any literal or parameter (advice/statements.py)."""

from __future__ import annotations

import logging

import asyncpg

from cacheproxy.advice.statements import statement_id

log = logging.getLogger("cacheproxy.catalog")

_LOOKUP = """
SELECT s.queryid, s.query FROM pg_stat_statements s
WHERE s.queryid = ANY($1::bigint[]) AND s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

_warned: set[tuple[str, str]] = set()  # (database, what) already logged: a catalog is read again often


async def read_queryids(conn: asyncpg.Connection, database: str, queryids: frozenset[int]) -> dict[str, int]:
    """Statement id -> queryid for those of `queryids` pg_stat_statements knows in `database`; never raises for a
    missing extension (logged once: the rules naming queryids then apply to nothing there)."""
    try:
        rows = await conn.fetch(_LOOKUP, sorted(queryids))
    except asyncpg.PostgresError as exc:
        _warn_once(database, "error", "rules name queryids, but pg_stat_statements cannot be read in database %r "
                   "(%s): those rules apply to nothing there", database, exc)  # fmt: skip
        return {}
    found: dict[str, int] = {}
    for queryid, text in rows:
        if text and not text.startswith("<"):  # "<insufficient privilege>": another role's statement
            found[statement_id(text)] = int(queryid)
    missing = queryids - set(found.values())
    if missing:
        _warn_once(database, ",".join(map(str, sorted(missing))), "database %r: queryids %s are not in "
                   "pg_stat_statements (not run yet, reset, or another role's without pg_read_all_stats): their "
                   "rules apply once the catalog is read again after they ran", database, sorted(missing))  # fmt: skip
    return found


def _warn_once(database: str, what: str, message: str, *args: object) -> None:
    if (database, what) not in _warned:
        _warned.add((database, what))
        log.warning(message, *args)
