"""What a MySQL database's catalog says about invalidation: base tables, views' base tables, triggers, FK cascades.

Read from information_schema with the proxy's own aiomysql connection (the upstream URL's user), once per database
and again after DDL. A read may be cached only if every name it reads is a known base table or view; a write to a
table with triggers drops every entry (a trigger may write anywhere); a write to a parent table also invalidates the
children its foreign keys cascade to (ON DELETE/UPDATE CASCADE, SET NULL, SET DEFAULT).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cacheproxy.analysis.mysql import analyze_mysql
from cacheproxy.config import UpstreamConfig
from cacheproxy.mysql.tls import check_driver_tls, driver_ssl

log = logging.getLogger("cacheproxy.mysql.catalog")

TableId = tuple[str, str]


@dataclass(slots=True)
class Catalog:
    """One database's relations (lower-cased names)."""

    database: str
    tables: set[str] = field(default_factory=set)
    views: dict[str, frozenset[TableId]] = field(default_factory=dict)  # view -> base tables it reads
    triggers: set[str] = field(default_factory=set)  # tables with at least one trigger
    cascades: dict[str, set[TableId]] = field(default_factory=dict)  # parent -> children changed by its FKs
    uncacheable: set[str] = field(default_factory=set)  # views whose definition is not cacheable (NOW(), f()...)

    def relation(self, name: str) -> frozenset[TableId] | None:
        """The tables a read of `name` depends on, or None when `name` is not a known table or view."""
        if name in self.tables:
            return frozenset(((self.database, name),))
        return None if name in self.uncacheable else self.views.get(name)


async def load_catalog(upstream: UpstreamConfig, database: str) -> Catalog:
    """Read one database's catalog. Raises on any connection or query error (the caller stops caching it)."""
    import aiomysql

    conn = await aiomysql.connect(
        host=upstream.host,
        port=upstream.port,
        user=upstream.user or "root",
        password=upstream.password or "",
        connect_timeout=upstream.connect_timeout,
        autocommit=True,
        ssl=driver_ssl(upstream),
    )
    try:
        check_driver_tls(upstream, conn.server_capabilities)
        async with conn.cursor() as cur:
            catalog = Catalog(database.lower())
            await cur.execute(
                "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (database,)
            )
            view_names = []
            for name, kind in await cur.fetchall():
                if kind == "VIEW":
                    view_names.append(name.lower())
                else:
                    catalog.tables.add(name.lower())
            await cur.execute(
                "SELECT TABLE_NAME, VIEW_DEFINITION FROM information_schema.VIEWS WHERE TABLE_SCHEMA = %s", (database,)
            )
            definitions = {name.lower(): text for name, text in await cur.fetchall()}
            await cur.execute(
                "SELECT DISTINCT EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS WHERE EVENT_OBJECT_SCHEMA = %s",
                (database,),
            )
            catalog.triggers = {row[0].lower() for row in await cur.fetchall()}
            await cur.execute(
                "SELECT REFERENCED_TABLE_NAME, CONSTRAINT_SCHEMA, TABLE_NAME, UPDATE_RULE, DELETE_RULE "
                "FROM information_schema.REFERENTIAL_CONSTRAINTS WHERE UNIQUE_CONSTRAINT_SCHEMA = %s",
                (database,),
            )
            for parent, child_db, child, on_update, on_delete in await cur.fetchall():
                if {on_update, on_delete} - {"RESTRICT", "NO ACTION"}:
                    catalog.cascades.setdefault(parent.lower(), set()).add((child_db.lower(), child.lower()))
    finally:
        conn.close()
    for name in view_names:
        catalog.views[name] = _view_tables(catalog, name, definitions, set())
    return catalog


def _view_tables(catalog: Catalog, name: str, definitions: dict[str, str], seen: set[str]) -> frozenset[TableId]:
    """The base tables a view reads, through views it reads (the view's own name included, for its DDL)."""
    found: set[TableId] = {(catalog.database, name)}
    text = definitions.get(name)
    info = analyze_mysql(text) if text else None
    if info is None or not info.cacheable:
        catalog.uncacheable.add(name)
        return frozenset(found)
    for db, table in info.reads:
        db = db or catalog.database
        if db == catalog.database and table in definitions and table not in seen:
            found |= _view_tables(catalog, table, definitions, seen | {name})
            if table in catalog.uncacheable:
                catalog.uncacheable.add(name)
        else:
            found.add((db, table))
    return frozenset(found)
