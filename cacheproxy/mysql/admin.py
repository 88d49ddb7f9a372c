"""`CACHEPROXY ...` commands on a MySQL connection: EXPLAIN, SHOW STATS, SHOW CACHES, INVALIDATE TABLE, FLUSH.

The same commands as the PostgreSQL front end's admin console (cacheproxy/proxy/admin_console.py), for the users in
`admin.users`, answered by the proxy as text result sets (or OK / ERR packets).
"""

from __future__ import annotations

import re
import time

from cacheproxy.cache.entry import WHOLE_DATABASE, base_table
from cacheproxy.mysql import codec
from cacheproxy.mysql.codec import Capability
from cacheproxy.mysql.interfaces import FrontEnd
from cacheproxy.mysql.state import SessionState

_PREFIX = re.compile(rb"\s*cacheproxy\b", re.IGNORECASE)
USAGE = "CACHEPROXY EXPLAIN <query> | SHOW STATS | SHOW CACHES [n] | INVALIDATE TABLE <name> | FLUSH"
ER_SPECIFIC_ACCESS_DENIED = 1227
ER_SYNTAX_ERROR = 1064

Rows = list[tuple[bytes | None, ...]]


def is_admin_command(sql: bytes) -> bool:
    return _PREFIX.match(sql) is not None


async def run_admin(server: FrontEnd, state: SessionState, sql: bytes) -> bytes:
    """The reply (wire bytes, sequence ids from 1) to one CACHEPROXY command."""
    text = sql.decode(errors="replace").strip().rstrip(";")
    words = text.split()
    command = " ".join(w.upper() for w in words[1:3])
    if state.user not in server.config.admin.users:
        return _err(ER_SPECIFIC_ACCESS_DENIED, "42000", "cacheproxy: CACHEPROXY commands are for admin.users")
    deprecate = bool(state.capabilities & Capability.DEPRECATE_EOF)

    def table(columns: list[str], rows: Rows) -> bytes:
        return codec.text_result_set([c.encode() for c in columns], rows, state.status, deprecate_eof=deprecate)

    if words[1:2] and words[1].upper() == "EXPLAIN" and len(words) > 2:
        query = text.split(None, 2)[2].encode()
        return table(["property", "value"], await _explain(server, state, query))
    if command == "SHOW STATS":
        return table(["stat", "value"], _stats(server))
    if command == "SHOW CACHES":
        limit = int(words[3]) if len(words) > 3 and words[3].isdigit() else 20
        return table(["query", "tables", "hits", "bytes", "age_s", "ttl_left_s", "rule"], _caches(server, limit))
    if command == "INVALIDATE TABLE" and len(words) == 4 and server.engine is not None:
        db, _, name = words[3].lower().strip("`").rpartition(".")
        database = db.strip("`") or (state.database or "").lower()
        removed = server.engine.invalidate_tables([(database, name.strip("`"))])
        return codec.encode_packet(1, codec.ok_payload(state.status, affected=removed))
    if command == "FLUSH" and server.engine is not None:
        removed = server.engine.flush()
        return codec.encode_packet(1, codec.ok_payload(state.status, affected=removed))
    return _err(ER_SYNTAX_ERROR, "42000", f"cacheproxy: unknown CACHEPROXY command; use {USAGE}")


def _err(code: int, sqlstate: str, message: str) -> bytes:
    return codec.encode_packet(1, codec.err_payload(code, sqlstate, message))


async def _explain(server: FrontEnd, state: SessionState, sql: bytes) -> Rows:
    info = server.analyze(sql)
    plan = await server.cache_plan(state, info, sql=sql)
    if plan is None:
        cacheable, reason, depends, rule, ttl = "no", "the cache is disabled", "", "", ""
    elif isinstance(plan, str):
        cacheable, reason, depends, rule, ttl = "no", plan, "", "", ""
    else:
        _, tables, decision = plan
        names = sorted(f"{db}.{base_table(t)}" for db, t in tables if t != WHOLE_DATABASE)
        cacheable, reason, depends = "yes", "outside a transaction", ", ".join(names)
        rule, ttl = decision.rule, f"{decision.ttl:g}s"
    writes = ", ".join(sorted(f"{d}.{t}" if d else t for d, t in info.writes))
    if info.invalidate_all:
        writes = "every entry (effects unknown)"
    elif info.invalidate_databases or info.kind.value == "ddl":
        writes = "the database's entries: " + ", ".join(sorted({*info.invalidate_databases, state.database or ""}))
    rows: list[tuple[str, str]] = [
        ("cacheable", cacheable),
        ("reason", reason),
        ("kind", info.kind.value),
        ("reads", ", ".join(sorted(f"{d}.{t}" if d else t for d, t in info.reads))),
        ("depends_on", depends),
        ("rule", rule),
        ("ttl", ttl),
        ("invalidates", writes),
    ]
    return [(k.encode(), v.encode()) for k, v in rows]


def _stats(server: FrontEnd) -> Rows:
    rows: list[tuple[str, str | None]] = [("client_connections", str(server.client_count))]
    if server.engine is None:
        rows.append(("cache_enabled", "false"))
    else:
        stats = server.engine.stats()
        rows += [(name, str(getattr(stats, name))) for name in stats.__dataclass_fields__]
        lookups = stats.hits + stats.misses
        rows.append(("hit_ratio", f"{stats.hits / lookups:.4f}" if lookups else None))
    return [(k.encode(), None if v is None else v.encode()) for k, v in rows]


def _caches(server: FrontEnd, limit: int) -> Rows:
    if server.engine is None:
        return []
    now = time.monotonic()
    entries = sorted(server.engine.entries(), key=lambda e: e.hits, reverse=True)[:limit]
    return [
        tuple(v.encode() for v in (
            e.query[:200], ", ".join(sorted({base_table(t[1]) for t in e.tables if t[1] != WHOLE_DATABASE})),
            str(e.hits), str(e.size), f"{now - e.created_at:.1f}", f"{max(0.0, e.expires_at - now):.1f}",
            e.rule or ""))
        for e in entries
    ]  # fmt: skip
