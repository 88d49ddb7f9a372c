"""Reads each database's catalog over the proxy's own control connection (asyncpg), and keeps it fresh.

The control connection logs in as the upstream URL's user (the proxy never has the clients' passwords). One load per
database on first use and after DDL seen through the proxy; until a database's catalog is loaded, nothing of it is
cached, and a database whose catalog cannot be read is not cached at all (logged once).

A session's next cacheable query waits for the reload that DDL starts, so a load must be quick (a driver's test
suite creates and drops tables in almost every test): the connection is kept between loads of a database, with its
queries prepared on it (one round trip each, planned once), until `release` (the database has no sessions, is being
dropped, or the upstream failed over) or until the upstream address changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from cacheproxy.advice.queryids import read_queryids
from cacheproxy.catalog.model import Catalog, HiddenCode, Relation
from cacheproxy.config import UpstreamConfig
from cacheproxy.upstream import control_connection, upstream_address

log = logging.getLogger("cacheproxy.catalog")

# The fourth column: a write to the relation may change other tables. Rules and user triggers, and also column
# defaults and CHECK constraints (the table's own, or its columns' domains') that call a user function that may write:
# VOLATILE (PostgreSQL refuses writes in STABLE and IMMUTABLE SQL and PL functions) and in a procedural or SQL
# language (C functions of extensions, such as uuid-ossp's uuid_generate_v4() in a DEFAULT, are taken not to write).
_RELATIONS = """
WITH calls AS (
  SELECT d.classid, d.objid FROM pg_depend d
  JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND p.oid = d.refobjid
  JOIN pg_language l ON l.oid = p.prolang
  WHERE p.provolatile = 'v' AND l.lanname NOT IN ('c', 'internal') AND p.pronamespace <> 'pg_catalog'::regnamespace
), effects AS (
  SELECT ad.adrelid AS rel FROM pg_attrdef ad
  JOIN calls ON calls.classid = 'pg_attrdef'::regclass AND calls.objid = ad.oid
  UNION
  SELECT k.conrelid FROM pg_constraint k
  JOIN calls ON calls.classid = 'pg_constraint'::regclass AND calls.objid = k.oid
  WHERE k.conrelid <> 0
  UNION
  SELECT a.attrelid FROM pg_attribute a
  JOIN calls ON calls.classid = 'pg_type'::regclass AND calls.objid = a.atttypid
  WHERE a.attnum > 0 AND NOT a.attisdropped
  UNION
  SELECT a.attrelid FROM pg_attribute a JOIN pg_constraint k ON k.contypid = a.atttypid
  JOIN calls ON calls.classid = 'pg_constraint'::regclass AND calls.objid = k.oid
  WHERE a.attnum > 0 AND NOT a.attisdropped
)
SELECT n.nspname, c.relname, c.relkind::text,
       c.relhasrules OR EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal)
         OR c.oid IN (SELECT rel FROM effects),
       c.relrowsecurity
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm', 'v', 'f', 'S')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast%'
"""
_INHERITS = """
SELECT c.relname, p.relname FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
"""
# Foreign keys whose ON DELETE / ON UPDATE action changes the referencing table: cascade, set null, set default.
_CASCADES = """
SELECT p.relname, c.relname FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid JOIN pg_class p ON p.oid = k.confrelid
WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))
"""
_FUNCTIONS = """
SELECT n.nspname, p.proname, p.provolatile = 'i' FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
"""


# Single-column integer primary keys of ordinary tables: the candidates for row-level invalidation. Not generated
# columns: an UPDATE of another column would move the row to another key.
_PRIMARY_KEYS = """
SELECT n.nspname, c.relname, a.attname
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
WHERE i.indisprimary AND i.indnkeyatts = 1 AND c.relkind = 'r' AND a.attgenerated = ''
  AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)
"""


# Code that runs without a call written (issue 14, item 2): one query per kind of object, each row (kind, name,
# schema, may write, extra). "May write": not immutable and outside pg_catalog, as for a call (Catalog.may_write).
# User operators and casts are those created after initdb (oid >= FirstNormalObjectId, 16384).
_HIDDEN_CODE = """
SELECT 'operator', o.oprname::text, '', f.pronamespace <> 'pg_catalog'::regnamespace, ''
FROM pg_operator o JOIN pg_proc f ON f.oid = o.oprcode
WHERE o.oid >= 16384 AND f.provolatile <> 'i'
UNION ALL
SELECT 'cast', t.typname::text, '', f.pronamespace <> 'pg_catalog'::regnamespace, c.castcontext::text
FROM pg_cast c JOIN pg_proc f ON f.oid = c.castfunc JOIN pg_type t ON t.oid = c.casttarget
WHERE c.oid >= 16384 AND f.provolatile <> 'i'
UNION ALL
SELECT 'row_function', p.proname::text, '', p.pronamespace <> 'pg_catalog'::regnamespace, ''
FROM pg_proc p JOIN pg_type t ON t.oid = p.proargtypes[0]
WHERE p.prokind = 'f' AND p.pronargs >= 1 AND p.pronargs - p.pronargdefaults <= 1 AND p.provolatile <> 'i'
  AND (t.typtype IN ('c', 'd') OR t.typname IN ('record', 'anyelement', 'anynonarray', 'anycompatible',
                                                 'anycompatiblenonarray', 'any'))
UNION ALL
SELECT 'aggregate', p.proname::text, n.nspname::text, false, ''
FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE EXISTS (SELECT 1 FROM pg_proc f WHERE f.provolatile <> 'i' AND f.oid IN
              (a.aggtransfn, a.aggfinalfn, a.aggcombinefn, a.aggserialfn, a.aggdeserialfn, a.aggmtransfn,
               a.aggminvtransfn, a.aggmfinalfn))
"""
# Views whose query (or a view it reads, transitively) calls a function that may write, directly, through an
# operator, or through an aggregate's support functions; set_config() too (it changes the session's settings). As
# for _RELATIONS: a VOLATILE function in a procedural or SQL language (STABLE and IMMUTABLE ones cannot write; C
# functions of extensions, such as pg_stat_statements(), are taken not to). System views are not listed.
_WRITING_VIEWS = """
WITH RECURSIVE writers AS (
  SELECT p.oid FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
  WHERE (p.provolatile = 'v' AND l.lanname NOT IN ('c', 'internal') AND p.pronamespace <> 'pg_catalog'::regnamespace)
     OR p.oid = 'pg_catalog.set_config(text,text,boolean)'::regprocedure
), code AS (
  SELECT 'pg_proc'::regclass AS cls, oid FROM writers
  UNION ALL
  SELECT 'pg_proc'::regclass, a.aggfnoid FROM pg_aggregate a
  WHERE a.aggtransfn IN (SELECT oid FROM writers) OR a.aggfinalfn IN (SELECT oid FROM writers)
     OR a.aggcombinefn IN (SELECT oid FROM writers) OR a.aggmtransfn IN (SELECT oid FROM writers)
     OR a.aggmfinalfn IN (SELECT oid FROM writers)
  UNION ALL
  SELECT 'pg_operator'::regclass, o.oid FROM pg_operator o WHERE o.oprcode IN (SELECT oid FROM writers)
), deps AS (
  SELECT DISTINCT r.ev_class AS view, d.refclassid, d.refobjid FROM pg_rewrite r
  JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
  WHERE d.refobjid <> r.ev_class
), bad(view) AS (
  SELECT deps.view FROM deps JOIN code ON code.cls = deps.refclassid AND code.oid = deps.refobjid
  UNION
  SELECT deps.view FROM deps JOIN bad ON deps.refclassid = 'pg_class'::regclass AND deps.refobjid = bad.view
)
SELECT n.nspname, c.relname FROM bad JOIN pg_class c ON c.oid = bad.view JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
"""
# Every column of the relations a read may name, and whether its type cannot hold text (date/time, interval,
# numeric, boolean, range; arrays by their element): a cast of such a column to a date/time type never reads 'now'.
_COLUMNS = """
SELECT n.nspname, c.relname, a.attname,
       COALESCE(e.typcategory, t.typcategory) IN ('D', 'T', 'N', 'B', 'R')
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid LEFT JOIN pg_type e ON t.typcategory = 'A' AND e.oid = t.typelem
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'm', 'v', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast%'
"""


def hidden_code(rows: list[asyncpg.Record], views: list[asyncpg.Record], columns: list[asyncpg.Record]) -> HiddenCode:
    """HiddenCode from the rows of _HIDDEN_CODE, _WRITING_VIEWS and _COLUMNS."""
    found: dict[str, dict[str, bool]] = {"operator": {}, "cast": {}, "row_function": {}}
    aggregates: set[tuple[str, str]] = set()
    implicit: bool | None = None
    for kind, name, schema, writes, context in rows:
        if kind == "aggregate":
            aggregates.add((schema, name))
            continue
        found[kind][name] = found[kind].get(name, False) or bool(writes)
        if kind == "cast" and context in ("i", "a"):
            implicit = bool(implicit) or bool(writes)
    by_relation: dict[tuple[str, str], dict[str, bool]] = {}
    for schema, relation, column, safe in columns:
        by_relation.setdefault((schema, relation), {})[column] = bool(safe)
    return HiddenCode(
        operators=found["operator"],
        casts=found["cast"],
        implicit_casts=implicit,
        row_functions=found["row_function"],
        aggregates=frozenset(aggregates),
        writing_views=frozenset((r[0], r[1]) for r in views),
        columns=by_relation,
    )


class CatalogLoader:
    """Owns the per-database catalogs: `get` returns the current one (or None), `refresh` reloads in the background."""

    def __init__(self, upstream: UpstreamConfig, on_load: Callable[[bool], None] | None = None) -> None:
        self._upstream = upstream
        self._on_load = on_load
        self._catalogs: dict[str, Catalog] = {}
        self._loading: dict[str, asyncio.Task[Catalog | None]] = {}
        self._failed: set[str] = set()
        self._stale: set[str] = set()
        # What `get` answers, kept as a dict: the loaded catalogs that are not stale. The request path (compiled)
        # reads it directly, for every query; only `_publish` changes it.
        self.fresh: dict[str, Catalog] = {}
        self._ddl_epochs: dict[str, int] = {}  # bumped by mark_stale: a load that started before is not fresh
        self._versions = 0
        # database -> the function rows of its last load, and the immutable and system function names they gave
        self._functions: dict[str, tuple[list[tuple[str, str, bool]], frozenset[str], frozenset[str]]] = {}
        # database -> its kept control connection, the address it went to, and the queries prepared on it
        self._conns: dict[str, tuple[asyncpg.Connection, tuple[str, int], dict[str, object]]] = {}
        self._released: set[str] = set()  # databases released while a load of theirs was in flight
        # The pg_stat_statements queryids the rules name: resolved to statement ids with each load (issue 17).
        self.queryids: frozenset[int] = frozenset()

    def get(self, database: str) -> Catalog | None:
        """The catalog to decide with, or None (not loaded yet, stale after DDL, or unreadable)."""
        return self.fresh.get(database)

    def install(self, database: str, catalog: Catalog) -> None:
        """Decide with `catalog` from now on, as if just loaded (in-process benchmarks and tools)."""
        self._catalogs[database] = catalog
        self._stale.discard(database)
        self._publish(database)

    def _publish(self, database: str) -> None:
        catalog = self._catalogs.get(database)
        if catalog is None or database in self._stale:
            self.fresh.pop(database, None)
        else:
            self.fresh[database] = catalog

    def last_known(self, database: str) -> Catalog | None:
        """The newest catalog even if stale: for invalidation, where an older picture is still a useful superset."""
        return self._catalogs.get(database)

    def loaded(self) -> list[str]:
        """The databases whose catalog has been read."""
        return list(self._catalogs)

    def ensure(self, database: str) -> asyncio.Task[Catalog | None] | None:
        """Start loading `database` if needed; return the task to wait on, or None when nothing is pending."""
        if database in self._loading:
            return self._loading[database]
        if (database in self._catalogs and database not in self._stale) or database in self._failed:
            return None
        return self._start(database)

    async def close(self) -> None:
        """Cancel loads in flight (shutdown) and close the kept connections."""
        tasks = list(self._loading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for database in list(self._conns):
            await self.release(database)

    def connected(self, database: str) -> bool:
        """A connection to `database` is kept open for its loads."""
        return database in self._conns

    async def release(self, database: str) -> None:
        """Close the connection kept for `database` (a load in flight finishes on it, then closes it)."""
        kept = self._conns.pop(database, None)
        if database in self._loading:
            # A load in flight closes its connection when it ends, including one it has not opened yet (else that
            # one would be kept, and a DROP DATABASE made elsewhere would meet it).
            self._released.add(database)
        elif kept is not None:
            await _close_quietly(kept[0])

    def mark_stale(self, database: str) -> None:
        """DDL went through: decisions must wait for a reload (one started before now does not count)."""
        self._stale.add(database)
        self._publish(database)
        self._ddl_epochs[database] = self._ddl_epochs.get(database, 0) + 1

    def reload(self, database: str) -> None:
        """Read `database`'s catalog again in the background, deciding with the current one meanwhile (a load in
        flight started before now does not count: another follows it)."""
        self._ddl_epochs[database] = self._ddl_epochs.get(database, 0) + 1
        if database in self._catalogs and database not in self._loading:
            self._start(database)

    def _start(self, database: str) -> asyncio.Task[Catalog | None]:
        task = asyncio.get_running_loop().create_task(self._load(database), name=f"catalog-{database}")
        self._loading[database] = task
        return task

    async def _load(self, database: str) -> Catalog | None:
        started = time.monotonic()
        epoch = self._ddl_epochs.get(database, 0)
        try:
            try:
                catalog = await self._read(database)
            finally:
                self._released.discard(database)  # (this load's connection, if released meanwhile, is closed)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ssl.SSLError) as exc:
            del self._loading[database]
            if database not in self._failed:
                log.warning(
                    "catalog of database %r could not be read as %r (%s): its queries are not cached",
                    database,
                    self._upstream.user,
                    exc.__class__.__name__ + (f": {exc}" if str(exc) else ""),
                )
            self._failed.add(database)
            if self._on_load is not None:
                self._on_load(False)
            return None
        except BaseException:
            del self._loading[database]
            raise
        del self._loading[database]
        self._catalogs[database] = catalog
        self._publish(database)
        if self._on_load is not None:
            self._on_load(True)
        if self._ddl_epochs.get(database, 0) != epoch:
            # DDL (or a reload) was asked for while we read: what we read may predate it. It stays stale; read again.
            self._start(database)
            return catalog
        self._stale.discard(database)
        self._publish(database)
        log.info(
            "catalog of database %r loaded: %d relations, %d immutable functions (%.0f ms)",
            database,
            len(catalog.relations),
            len(catalog.immutable),
            (time.monotonic() - started) * 1000,
        )
        return catalog

    async def _read(self, database: str) -> Catalog:
        kept = self._conns.get(database)
        if kept is not None and (kept[0].is_closed() or kept[1] != upstream_address(self._upstream)):
            del self._conns[database]  # lost, or the upstream failed over to another server since
            await _close_quietly(kept[0])
            kept = None
        if kept is not None:
            try:
                return await self._read_on(database, *kept)
            except (OSError, asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError):
                # The kept connection went stale between loads (a server restart, an idle timeout): once more on a
                # new one, as a first load would.
                self._conns.pop(database, None)
                await _close_quietly(kept[0])
        address = upstream_address(self._upstream)
        conn = await control_connection(self._upstream, database, "catalog", address)
        self._conns[database] = (conn, address, {})
        return await self._read_on(database, conn, address, {})

    async def _read_on(
        self, database: str, conn: asyncpg.Connection, address: tuple[str, int], prepared: dict[str, object]
    ) -> Catalog:
        async def fetch(query: str) -> list[asyncpg.Record]:
            statement: Any = prepared.get(query)
            if statement is None:
                statement = prepared[query] = await conn.prepare(query)
            rows: list[asyncpg.Record] = await statement.fetch()
            return rows

        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                relations = await fetch(_RELATIONS)
                inherits = await fetch(_INHERITS)
                cascades = await fetch(_CASCADES)
                functions = await fetch(_FUNCTIONS)
                primary_keys = await fetch(_PRIMARY_KEYS)
                hidden = hidden_code(await fetch(_HIDDEN_CODE), await fetch(_WRITING_VIEWS), await fetch(_COLUMNS))
            queryids = await read_queryids(conn, database, self.queryids) if self.queryids else {}
        except BaseException:
            if self._conns.get(database, (None,))[0] is conn:
                del self._conns[database]
            await _close_quietly(conn)
            raise
        if database in self._released or self._conns.get(database, (None,))[0] is not conn:
            if self._conns.get(database, (None,))[0] is conn:
                del self._conns[database]
            await _close_quietly(conn)  # released while we read
        self._versions += 1
        catalog = self._build(database, relations, inherits, cascades, functions)
        catalog = catalog.with_primary_keys((r[0], r[1], r[2]) for r in primary_keys).with_hidden_code(hidden)
        return dataclasses.replace(catalog, queryids=queryids) if queryids else catalog

    def _build(
        self,
        database: str,
        relations: list[asyncpg.Record],
        inherits: list[asyncpg.Record],
        cascades: list[asyncpg.Record],
        functions: list[asyncpg.Record],
    ) -> Catalog:
        rows = [(str(r[0]), str(r[1]), bool(r[2])) for r in functions]
        known = self._functions.get(database)
        same = known is not None and known[0] == rows
        catalog = Catalog.build(
            database,
            self._versions,
            relations=[Relation(r[0], r[1], r[2], bool(r[3]), bool(r[4])) for r in relations],
            inherits=[(r[0], r[1]) for r in inherits],
            cascades=[(r[0], r[1]) for r in cascades],
            functions=() if same else rows,
        )
        if known is not None and same:
            # The thousands of functions rarely change between loads (DDL is mostly on tables): what they give is
            # reused rather than computed again; the rows are compared whole, so any change is seen.
            return dataclasses.replace(catalog, immutable=known[1], system_functions=known[2])
        self._functions[database] = (rows, catalog.immutable, catalog.system_functions)
        return catalog


async def _close_quietly(conn: asyncpg.Connection) -> None:
    """Close a control connection; one already lost is just dropped."""
    try:
        await conn.close(timeout=5)
    except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError, TimeoutError):
        conn.terminate()
