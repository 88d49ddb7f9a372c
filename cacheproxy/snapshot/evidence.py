"""Change evidence read from the upstream: which cluster it is, and per table a digest of its write counters.

Read over short-lived asyncpg control connections logged in as the upstream URL's user, the same recipe as the
catalog loader's. A table's evidence is a digest of, for every relation of that name in any schema and every
partition or inheritance child below it: its schema and name, relfilenode (changed by TRUNCATE, VACUUM FULL, CLUSTER
and rewriting ALTERs) and pg_stat_user_tables' n_tup_ins / n_tup_upd / n_tup_del / n_tup_hot_upd. Names are
unqualified because the cache's unit of invalidation, `TableId`, is (database, unqualified table name). The
database's own dependency id (`WHOLE_DATABASE`, which every entry has) is vouched for by the catalog digest that the
invalidation bus polls (function bodies, types, privileges... : what a result that reads no table depends on).
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass

import asyncpg

from cacheproxy.cache.entry import WHOLE_DATABASE
from cacheproxy.config import UpstreamConfig
from cacheproxy.feeds.bus import CATALOG_DIGEST
from cacheproxy.upstream import control_connection

# Every plain / partitioned table and materialized view outside the system schemas (pg_% covers pg_catalog, pg_toast
# and the pg_temp_N of sessions), with its inheritance tree below it; stats are NULL for relations without a row.
_TABLES = r"""
WITH RECURSIVE tree(root, oid) AS (
    SELECT c.oid, c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%'
  UNION
    SELECT t.root, i.inhrelid FROM tree t JOIN pg_inherits i ON i.inhparent = t.oid
)
SELECT r.relname AS name, rn.nspname || '.' || r.relname || '>' || n.nspname || '.' || c.relname AS member,
       c.relfilenode::bigint, s.n_tup_ins, s.n_tup_upd, s.n_tup_del, s.n_tup_hot_upd
FROM tree t
JOIN pg_class r ON r.oid = t.root JOIN pg_namespace rn ON rn.oid = r.relnamespace
JOIN pg_class c ON c.oid = t.oid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_user_tables s ON s.relid = t.oid
ORDER BY 1, 2
"""
_DATABASE = "SELECT oid::bigint FROM pg_database WHERE datname = current_database()"
_CLUSTER = """
SELECT system_identifier::text,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
       CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END
FROM pg_control_system()
"""
_QUERY_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Cluster:
    system_identifier: str
    wal_lsn: str | None
    # The WAL timeline: a promoted standby keeps the system identifier but starts a new timeline, so a snapshot
    # written before a failover is recognized (and refused) after it.
    timeline: int | None = None


async def connect(upstream: UpstreamConfig, database: str) -> asyncpg.Connection:
    return await control_connection(upstream, database, "snapshot")


async def read_cluster(upstream: UpstreamConfig, database: str) -> Cluster:
    conn = await connect(upstream, database)
    try:
        row = await conn.fetchrow(_CLUSTER, timeout=_QUERY_TIMEOUT)
    finally:
        await conn.close()
    return Cluster(str(row[0]), row[1], row[2])


async def read_database(upstream: UpstreamConfig, database: str) -> dict[str, object]:
    """{"oid": the database's oid, "tables": {table name: evidence digest (hex)}} for one database."""
    conn = await connect(upstream, database)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            oid = await conn.fetchval(_DATABASE, timeout=_QUERY_TIMEOUT)
            rows = await conn.fetch(_TABLES, timeout=_QUERY_TIMEOUT)
            catalog = await conn.fetchval(CATALOG_DIGEST, timeout=_QUERY_TIMEOUT)
    finally:
        await conn.close()
    members: dict[str, list[str]] = {}
    for row in rows:
        members.setdefault(row[0], []).append(repr(tuple(row[1:])))
    tables = {
        name: hashlib.blake2b("\n".join(lines).encode(), digest_size=16).hexdigest() for name, lines in members.items()
    }
    tables[WHOLE_DATABASE] = str(catalog)
    return {"oid": int(oid), "tables": tables}


# What a connection or query to the upstream can raise; the caller decides what a failure means.
ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ssl.SSLError)
