"""The admin console: `CACHEPROXY ...` commands sent as SQL on any proxied connection, answered by the proxy.

Answers are ordinary result sets (RowDescription, DataRows, CommandComplete), so psql shows them as tables. Only the
roles in `admin.users` may run them (others get SQLSTATE 42501); every command is logged with role and client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence

import cacheproxy
from cacheproxy.advice.advisor import advise
from cacheproxy.advice.report import CONSOLE_COLUMNS, console_rows
from cacheproxy.cache.entry import WHOLE_DATABASE, Entry, base_table
from cacheproxy.config import Rule
from cacheproxy.errors import FEATURE_NOT_SUPPORTED, INSUFFICIENT_PRIVILEGE, SYNTAX_ERROR, ProxyError
from cacheproxy.policy.rules import parse_pattern
from cacheproxy.protocol import messages as m
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.interfaces import ConsoleServer, ConsoleSession

log = logging.getLogger("cacheproxy.admin")

_PREFIX = re.compile(rb"^\s*cacheproxy\b", re.IGNORECASE)
USAGE = (
    "CACHEPROXY SHOW STATS | SHOW CACHES [n] | SHOW RULES | EXPLAIN <query> | INVALIDATE TABLE <name> | FLUSH | RELOAD"
    " | SNAPSHOT | SHOW ADVICE | RESET ADVICE"
)


def is_admin_command(sql: bytes) -> bool:
    return _PREFIX.match(sql) is not None


class AdminConsole:
    """Runs one CACHEPROXY command for a session; returns its reply messages (without ReadyForQuery)."""

    def __init__(self, server: ConsoleServer) -> None:
        self._server = server
        self._snapshots: set[asyncio.Future[str]] = set()  # running CACHEPROXY SNAPSHOT tasks (kept referenced)

    def execute(self, session: ConsoleSession, sql: str) -> bytes:
        words = sql.strip().rstrip(";").split()
        command = " ".join(w.upper() for w in words[1:3])
        log.info("admin command from %s (user %s): %s", session.peer, session.user, " ".join(words[:3]))
        try:
            if session.user not in self._server.config.admin.users:
                raise ProxyError(
                    INSUFFICIENT_PRIVILEGE,
                    "permission denied: CACHEPROXY commands are for admin.users",
                    severity="ERROR",
                )
            return self._dispatch(session, sql, words, command)
        except ProxyError as exc:
            return m.error_response(exc.severity, exc.sqlstate, exc.message, detail=exc.detail)

    def _dispatch(self, session: ConsoleSession, sql: str, words: list[str], command: str) -> bytes:
        if command == "SHOW STATS":
            return _table(["stat", "value"], self._stats(), "SHOW")
        if command == "SHOW RULES":
            return _table(["rule", "tables", "ttl", "strategy", "in_transaction"], self._rules(), "SHOW")
        if command == "SHOW CACHES":
            limit = int(words[3]) if len(words) > 3 and words[3].isdigit() else 20
            columns = ["query", "tables", "hits", "bytes", "age_s", "ttl_left_s", "rule"]
            return _table(columns, self._caches(limit), "SHOW")
        if words[1:2] and words[1].upper() == "EXPLAIN" and len(words) > 2:
            query = sql.strip().rstrip(";").split(None, 2)[2]
            return _table(["property", "value"], session.explain(query.encode()), "EXPLAIN")
        if command == "INVALIDATE TABLE" and len(words) == 4:
            service = self._cache()
            try:
                _, name = parse_pattern(words[3])
            except ValueError as exc:
                raise ProxyError(SYNTAX_ERROR, str(exc), severity="ERROR") from exc
            removed = service.engine.invalidate_tables([(session.database, name)])
            if service.shared is not None:
                # Answered only once the bump is made: a read the client sends next, through any sidecar, must not
                # find the old entry (nor be filled under the old generation).
                bump = service.shared.bump(session.database, (name,))
                if bump is not None:
                    session.acknowledge_after(bump)
            return m.command_complete(f"INVALIDATE {removed}")
        if command == "FLUSH":
            service = self._cache()
            for bump in service.flush_shared():
                session.acknowledge_after(bump)
            return m.command_complete(f"FLUSH {service.engine.flush()}")
        if command == "RELOAD":
            return m.command_complete(f"RELOAD {self._server.reload()}")
        if command == "SNAPSHOT":
            return self._snapshot()
        if command == "SHOW ADVICE":  # the rule advisor (cacheproxy/advice)
            service = self._cache()
            rows = console_rows(advise(service.workload.observed(service.clock())))
            return _table(CONSOLE_COLUMNS, rows, "SHOW")
        if command == "RESET ADVICE":  # start observing afresh
            service = self._cache()
            service.workload.reset(service.clock())
            return m.command_complete("RESET ADVICE")
        raise ProxyError(SYNTAX_ERROR, f"unknown CACHEPROXY command; use {USAGE}", severity="ERROR")

    def _snapshot(self) -> bytes:
        """Start a snapshot and answer at once: commands run inside a transport callback and cannot wait for it.
        Its outcome is logged (and counted in the snapshot metrics)."""
        snapshot = self._server.snapshot
        if snapshot is None or self._server.config.snapshot.path is None:
            raise ProxyError(FEATURE_NOT_SUPPORTED, "snapshots are off (snapshot.path is not set)", severity="ERROR")
        task = asyncio.ensure_future(snapshot())
        self._snapshots.add(task)
        task.add_done_callback(self._snapshot_done)
        return m.command_complete("SNAPSHOT started")

    def _snapshot_done(self, task: asyncio.Future[str]) -> None:
        self._snapshots.discard(task)
        with contextlib.suppress(asyncio.CancelledError, Exception):  # the snapshot logs its own failure
            task.result()

    def _cache(self) -> CacheService:
        if self._server.cache is None:
            raise ProxyError(FEATURE_NOT_SUPPORTED, "the cache is disabled (cache.enabled: false)", severity="ERROR")
        return self._server.cache

    def _stats(self) -> list[list[str | None]]:
        rows: list[list[str | None]] = [
            ["client_connections", str(self._server.client_count)],
            ["hot_path", cacheproxy.MODE.name],  # compiled (mypyc) or pure (cacheproxy/mode.py)
        ]
        service = self._server.cache
        if service is None:
            return [*rows, ["cache_enabled", "false"]]
        stats = service.engine.stats()
        lookups = stats.hits + stats.misses
        rows += [[name, str(getattr(stats, name))] for name in stats.__dataclass_fields__]
        rows.append(["hit_ratio", f"{stats.hits / lookups:.4f}" if lookups else None])
        rows.append(["database_invalidations", str(service.database_flushes)])
        rows.append(["analysis_memo_hits", str(service.analyzer.memo_hits)])
        rows.append(["analysis_memo_misses", str(service.analyzer.memo_misses)])
        if service.shared is not None:
            rows += [[f"shared_{name}", None if value is None else str(value)]
                     for name, value in service.shared.stats().items()]  # fmt: skip
        return rows

    def _rules(self) -> list[list[str | None]]:
        config = self._server.config
        rows: list[list[str | None]] = [
            [str(i), _named(r), f"{r.ttl if r.ttl is not None else config.cache.default_ttl:g}s", r.strategy,
             r.in_transaction]
            for i, r in enumerate(config.rules)
        ]  # fmt: skip
        rows.append(["default", "(any other table)", f"{config.cache.default_ttl:g}s", "lazy", "until_write"])
        return rows

    def _caches(self, limit: int) -> list[list[str | None]]:
        service = self._cache()
        now = service.clock()
        entries = sorted(service.engine.entries(), key=lambda e: e.hits, reverse=True)[:limit]
        return [
            [e.query[:200], ", ".join(sorted(_tables(e))), str(e.hits), str(e.size),
             f"{now - e.created_at:.1f}", f"{max(0.0, e.expires_at - now):.1f}", e.rule]
            for e in entries
        ]  # fmt: skip


def _named(rule: Rule) -> str:
    """What a rule names: its tables, or its statements (a statement rule)."""
    if rule.tables:
        return ", ".join(rule.tables)
    return ", ".join([f"fingerprint {text}" for text in rule.fingerprints] + [f"queryid {q}" for q in rule.queryids])


def _tables(entry: Entry) -> set[str]:
    """The tables an entry depends on (not its database's own dependency, which every entry has)."""
    return {base_table(t[1]) for t in entry.tables if t[1] != WHOLE_DATABASE}


def _table(columns: list[str], rows: Sequence[Sequence[str | None]], tag: str) -> bytes:
    return (
        m.row_description(columns)
        + b"".join(m.data_row(list(row)) for row in rows)
        + m.command_complete(f"{tag} {len(rows)}" if tag == "SHOW" else tag)
    )
