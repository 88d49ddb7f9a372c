"""`cacheproxy advise --upstream URL`: the advice before deployment, from the database's own statistics.

pg_stat_statements gives, per statement, its runs and PostgreSQL's time; the proxy's analyzer says which statements
are reads it could cache and which tables each reads or writes; write statements' runs are the tables' writes.
Where pg_stat_statements has no write to a table that changed, pg_stat_user_tables' updated + deleted rows stand in
(an upper bound; inserted rows are left out, or a table's initial bulk load would make it look written too often).
Nothing is cached yet, so what a cache would save is estimated (advisor.py).
"""

from __future__ import annotations

import asyncpg

from cacheproxy.advice.advisor import Advice, advise
from cacheproxy.advice.statements import id_of, loose
from cacheproxy.advice.workload import Observed, StatementSample
from cacheproxy.analysis.analyzer import Analyzer
from cacheproxy.analysis.fingerprint import fingerprint
from cacheproxy.config import UpstreamConfig
from cacheproxy.upstream import control_connection

_EXTENSION = "SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'"
_STATEMENTS = """
SELECT s.query, sum(s.calls)::bigint, sum(s.{time})::float8 / 1000
FROM pg_stat_statements s
WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND s.calls > 0
GROUP BY s.query
"""
_TABLES = "SELECT relname, n_tup_upd + n_tup_del FROM pg_stat_user_tables"
_SINCE = "SELECT extract(epoch FROM now() - stats_reset)::float8 FROM pg_stat_statements_info"


class AdviseError(Exception):
    """The statistics cannot be read; the message says why and what to do."""


def not_installed(database: str) -> str:
    return (
        f"pg_stat_statements is not installed in database {database!r}. It records what each statement costs, which "
        "the advice is made of. To install it: add pg_stat_statements to shared_preload_libraries in "
        "postgresql.conf and restart PostgreSQL, run CREATE EXTENSION pg_stat_statements; in this database (as a "
        "superuser), let the application run a while, and ask again. Or deploy the proxy and ask it: CACHEPROXY "
        "SHOW ADVICE, or GET /advice on its admin listener."
    )


def not_preloaded(database: str, detail: str) -> str:
    return (
        f"pg_stat_statements is installed in database {database!r} but not loaded ({detail}): add it to "
        "shared_preload_libraries in postgresql.conf (e.g. shared_preload_libraries = 'pg_stat_statements') and "
        "restart PostgreSQL, let the application run a while, and ask again."
    )


async def advise_upstream(upstream: UpstreamConfig) -> Advice:
    """Read `upstream`'s database's statistics and advise; AdviseError with a clear message when they are missing."""
    database = upstream.database or upstream.user or "postgres"
    conn = await control_connection(upstream, database, "advise")
    try:
        if await conn.fetchval(_EXTENSION) is None:
            raise AdviseError(not_installed(database))
        try:
            rows = await _statements(conn)
        except asyncpg.ObjectNotInPrerequisiteStateError as exc:
            raise AdviseError(not_preloaded(database, str(exc))) from None
        except asyncpg.InsufficientPrivilegeError as exc:
            raise AdviseError(f"cannot read pg_stat_statements as this user: {exc}") from None
        tables = [(str(r[0]), int(r[1] or 0)) for r in await conn.fetch(_TABLES)]
        try:
            seconds = float(await conn.fetchval(_SINCE) or 0.0)
        except asyncpg.PostgresError:  # pg_stat_statements_info is PostgreSQL 14+
            seconds = 0.0
    finally:
        await conn.close()
    return advise(observed_from(database, rows, tables, seconds))


async def _statements(conn: asyncpg.Connection) -> list[tuple[str, int, float]]:
    try:
        found = await conn.fetch(_STATEMENTS.format(time="total_exec_time"))
    except asyncpg.UndefinedColumnError:  # before PostgreSQL 13 it was total_time
        found = await conn.fetch(_STATEMENTS.format(time="total_time"))
    return [(str(r[0]), int(r[1]), float(r[2])) for r in found if r[0]]


def observed_from(
    database: str, statements: list[tuple[str, int, float]], tables: list[tuple[str, int]], seconds: float
) -> Observed:
    """An Observed built from (query text, calls, total seconds) rows and (table, rows changed) rows. Pure."""
    analyzer = Analyzer(0)
    samples: dict[str, StatementSample] = {}
    writes: dict[tuple[str, str], int] = {}
    for text, calls, total in statements:
        if text.startswith("<"):  # "<insufficient privilege>": another role's statement
            continue
        fingerprinted = fingerprint(text)
        info = analyzer.analyze(text)
        kind = {"transaction": "tx"}.get(info.kind.value, info.kind.value)
        if kind == "write":
            for _, name in info.writes:
                writes[(database, name)] = writes.get((database, name), 0) + calls
        statement = id_of(fingerprinted)
        previous = samples.get(statement)  # several texts can share an id (case, spacing): add them up
        if previous is not None:
            calls += previous.bypasses
            total += previous.upstream_seconds
        names = tuple(sorted({name for _, name in info.reads}))
        cacheable = kind == "read" and info.cacheable and info.statement_count == 1
        samples[statement] = StatementSample(
            database, statement, loose(fingerprinted)[:1000], kind, names, cacheable,
            None if cacheable else info.reason, "", 0.0, "lazy", 0, 0, calls, total, calls,
        )  # fmt: skip
    for name, changed in tables:
        if changed and (database, name) not in writes:
            writes[(database, name)] = changed
    return Observed(seconds, tuple(samples.values()), writes, {})
