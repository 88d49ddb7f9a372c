"""The MySQL/MariaDB front end: the listener, its sessions, and the cache decisions and invalidations they share.

It plugs the same parts as the PostgreSQL front end together (cache engine, rules, metrics); what differs is the
wire protocol (cacheproxy.mysql.codec), the analysis (cacheproxy.analysis.mysql) and the catalog
(cacheproxy.mysql.catalog, read from information_schema).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import OrderedDict
from collections.abc import Hashable, Iterable

from cacheproxy.analysis.mysql import MyInfo, analyze_mysql
from cacheproxy.cache.engine import CacheEngine
from cacheproxy.cache.entry import database_id
from cacheproxy.cache.keys import execute_key, query_key
from cacheproxy.config import Config
from cacheproxy.mysql import codec
from cacheproxy.mysql.binlog import BinlogFeed, Invalidation
from cacheproxy.mysql.bus import Message, RedisBus
from cacheproxy.mysql.catalog import Catalog, TableId, load_catalog
from cacheproxy.mysql.evidence import MySQLEvidence, server_identity
from cacheproxy.mysql.interfaces import PLAN_PENDING, Plan
from cacheproxy.mysql.session import MySQLSession, table_ids
from cacheproxy.mysql.state import SessionState
from cacheproxy.observability.metrics import Metrics
from cacheproxy.policy.rules import Decision, RuleSet
from cacheproxy.proxy.server import server_tls_context  # (the same tls.* settings as the PostgreSQL front end)

log = logging.getLogger("cacheproxy.mysql.server")

# A statement's dependencies in one database: (names read, tables it depends on, rule) or why it is not cacheable.
_Memo = tuple[frozenset[str], frozenset[TableId], Decision] | str
_ANALYSIS_CACHE = 10000


class MySQLServer:
    """Accepts MySQL clients; one `MySQLSession` each. Owns the catalogs and the shutdown order."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._config = config
        self.metrics = metrics
        cache = config.cache
        self.engine = (
            CacheEngine(max_memory=cache.max_memory, max_entry_size=cache.max_entry_size, shards=cache.shards)
            if cache.enabled
            else None
        )
        if self.engine is not None:
            metrics.set_stats_source(self.engine.stats)
        self.rules = RuleSet(config.rules, cache.default_ttl)
        self.max_packet = config.limits.max_message_size
        self.tls_context = server_tls_context(config)  # tls.mode, tls.cert, tls.key
        self._analyses: OrderedDict[bytes, MyInfo] = OrderedDict()
        self._catalogs: dict[str, Catalog] = {}
        # (statement, current database) -> its dependencies; cleared whenever a catalog or the rules change.
        self._plans: dict[tuple[bytes, str], _Memo] = {}
        self._plans_generation = 0  # bumped with each clear: a memo computed across a clear is not kept
        self._loading: dict[str, asyncio.Future[Catalog | None]] = {}
        self._server: asyncio.Server | None = None
        self._live: dict[MySQLSession, asyncio.Task[None]] = {}
        self.accepting = False
        self._feed: BinlogFeed | None = None
        self._resume_at: str | None = None  # where the binlog feed starts, after a snapshot load
        # With invalidation.binlog on, why the feed is not following the binlog (None: it is); nothing is served
        # from the cache meanwhile.
        self.feed_down: str | None = None
        # Why nothing is served from the cache, by source ("binlog", "bus"); `feed_down` is the first of them.
        self._down: dict[str, str] = {}
        if config.invalidation.binlog:
            self._set_down("binlog", "the binlog feed is starting")
        self._bus: RedisBus | None = None

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A reload (App.reload swaps the whole config): new rules apply to new entries."""
        self._config = config
        self.tls_context = server_tls_context(config)
        self.rules = RuleSet(config.rules, config.cache.default_ttl)
        self._forget_plans()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def client_count(self) -> int:
        return len(self._live)

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if self._server else []

    async def start(self) -> None:
        listen = self.config.listen
        self._server = await asyncio.start_server(self._accept, listen.host, listen.port, limit=256 * 1024)
        self.accepting = True
        log.info("MySQL front end listening on %s", listen)
        if self._config.invalidation.binlog and self.engine is not None:
            self._feed = BinlogFeed(self._config.upstream, self._on_feed_invalidation, self._on_feed_state)
            self._feed.start_at = self._resume_at
            self._feed.start()
        shared = self._config.cache.shared
        if shared.url and self.engine is not None:
            self._set_down("bus", "the invalidation bus is starting")
            self._bus = RedisBus(shared.url, self._bus_scope, self._on_bus_message, self._on_bus_state, shared.timeout)
            await self._bus.start()

    def _set_down(self, source: str, why: str | None) -> None:
        """Record why `source` cannot vouch for the cache (None: it can again); while any cannot, nothing is
        served from the cache nor stored in it (cache_plan reads `feed_down`)."""
        if why is None:
            self._down.pop(source, None)
        else:
            self._down[source] = why
        self.feed_down = next(iter(self._down.values()), None)

    # -- the invalidation bus across sidecars (cacheproxy/mysql/bus.py) ----------------------------------------

    async def _bus_scope(self) -> str:
        """The bus channel's scope: cache.shared.namespace, else the server's identity (the same for every
        sidecar of one server, whatever host name their URLs use)."""
        namespace = self._config.cache.shared.namespace
        if namespace:
            return namespace
        identity: str = await asyncio.to_thread(server_identity, self._config.upstream)
        return identity

    def _on_bus_state(self, ok: bool, why: str) -> None:
        if ok:
            self._set_down("bus", None)
            return
        self._set_down("bus", why)
        self._invalidate_all_here("invalidation bus lost")  # messages were missed: nothing cached can be trusted

    def _on_bus_message(self, message: Message) -> None:
        self.metrics.bus_message("received")
        if message.everything:
            self._invalidate_all_here("bus: another sidecar's write with unknown effects")
            return
        self._invalidate_here(message.tables, message.databases)
        self._invalidate_databases_here(message.ddl, "ddl")

    def _publish(self, message: Message) -> None:
        if self._bus is not None:
            self._bus.publish(message)
            self.metrics.bus_message("published")

    # -- snapshots (cacheproxy/snapshot with cacheproxy/mysql/evidence.py) -------------------------------------

    def snapshot_evidence(self) -> MySQLEvidence:
        """What proves this cache's snapshot valid: the binlog, read from the feed's applied position when
        invalidation.binlog is on, else the server's binlog position unchanged."""
        binlog = self._config.invalidation.binlog
        return MySQLEvidence(self._config.upstream, self._applied_position if binlog else None, self.expand_written)

    def _applied_position(self) -> str | None:
        return self._feed.applied if self._feed is not None and "binlog" not in self._down else None

    def loaded_snapshot(self, evidence: MySQLEvidence) -> None:
        """A snapshot was loaded (before `start`): the binlog feed continues where the load's reading stopped."""
        self._resume_at = evidence.resume_at

    async def expand_written(self, ids: Iterable[TableId]) -> tuple[set[TableId], set[str]]:
        """Written tables -> what their writes reach (as `_expand`), the catalogs read first."""
        ids = list(ids)
        for database in sorted({db for db, _ in ids}):
            await self.catalog(database)
        return self._expand(ids)

    def _on_feed_state(self, ok: bool, why: str) -> None:
        if ok:
            self._set_down("binlog", None)
            return
        self._set_down("binlog", f"the binlog feed is down: {why}")
        self._invalidate_all_here("binlog feed lost")  # writes were missed: nothing cached can be trusted

    def _on_feed_invalidation(self, effects: Invalidation) -> None:
        tables, databases, everything = effects
        self.metrics.bus_message("received")
        if everything:
            self._invalidate_all_here("binlog: effects unknown")
            return
        expanded, more = self._expand(tables)
        self._invalidate_here(expanded, databases | more)  # every sidecar with the feed sees the binlog itself
        for database in databases:
            self._catalogs.pop(database, None)
            self._forget_plans()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting or len(self._live) >= self._config.limits.max_client_connections:
            # MySQL's own answer to one connection too many: ERR 1040 in place of the greeting.
            why = "too many clients" if self.accepting else "shutting down"
            self.metrics.client_refused(why)
            with contextlib.suppress(OSError):
                writer.write(codec.encode_packet(0, codec.err_payload(1040, "08004", f"cacheproxy: {why}")))
            writer.close()
            return
        with contextlib.suppress(OSError):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = MySQLSession(self, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._live[session] = task
        self.metrics.client_opened()
        try:
            await session.run()
        except Exception:  # a bug in one session must not take the listener down
            log.exception("MySQL session failed")
            session.close()
        finally:
            self._live.pop(session, None)
            self.metrics.client_closed()

    async def shutdown(self, timeout: float, reason: str = "the proxy is shutting down") -> None:
        """Stop accepting, close idle sessions, give busy ones `timeout`, then close the rest."""
        self.accepting = False
        if self._feed is not None:
            self._feed.stop()
        if self._bus is not None:
            await self._bus.stop()
        if self._server is not None:
            self._server.close()
        for session in list(self._live):
            if not session.busy:
                session.close()
        if self._live:
            _, pending = await asyncio.wait(list(self._live.values()), timeout=timeout)
            for session in list(self._live):
                session.close()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()
        log.info("MySQL front end stopped: %s", reason)

    # -- analysis and cache decisions ------------------------------------------------------------------------

    def analyze(self, sql: bytes) -> MyInfo:
        info = self._analyses.get(sql)
        if info is None:
            info = analyze_mysql(sql.decode("utf-8", errors="replace"))
            self._analyses[sql] = info
            if len(self._analyses) > _ANALYSIS_CACHE:
                self._analyses.popitem(last=False)
        return info

    def plan(self, state: SessionState, info: MyInfo, *, execute: bytes | None = None,
             sql: bytes = b"") -> Plan | str | None:  # fmt: skip
        """`cache_plan` without an await, for the hot path: PLAN_PENDING when the statement's dependencies are not
        memoized yet in this database (then `await cache_plan(...)`, which reads the catalogs it needs)."""
        if self.engine is None:
            return None
        if not info.cacheable:
            return info.reason or "not cacheable"
        if state.lost is not None:
            return state.lost
        if not state.reads_cache:
            return state.why_not_in_transaction()
        if self.feed_down is not None:
            return self.feed_down
        memo = self._plans.get((sql, state.database or ""))
        if memo is None:
            return PLAN_PENDING
        return self._plan_of(memo, state, execute, sql)

    async def cache_plan(self, state: SessionState, info: MyInfo, *, execute: bytes | None = None,
                         sql: bytes = b"") -> Plan | str | None:  # fmt: skip
        """The key, dependencies and rule of a cacheable read, or why it is not cacheable (None: cache off)."""
        plan = self.plan(state, info, execute=execute, sql=sql)
        if plan is not PLAN_PENDING:
            return plan
        memo_key = (sql, state.database or "")
        generation = self._plans_generation
        memo = await self._dependencies(state, info)
        if memo is None:
            return "the catalog of a database it reads could not be read"
        if len(self._plans) >= _ANALYSIS_CACHE:
            self._forget_plans()
        if generation == self._plans_generation:
            self._plans[memo_key] = memo
        return self._plan_of(memo, state, execute, sql)

    def _plan_of(self, memo: _Memo, state: SessionState, execute: bytes | None, sql: bytes) -> Plan | str:
        if isinstance(memo, str):
            return memo
        names, depends, decision = memo
        if state.temp_tables and not names.isdisjoint(state.temp_tables):
            return f"reads {sorted(names & state.temp_tables)[0]}, which may be a temporary table"
        if decision.in_transaction == "never" and state.in_transaction:
            return f"inside a transaction ({decision.rule} says in_transaction: never)"
        database = state.database or ""
        if execute is None:
            key: Hashable = query_key(database, state.user, state.digest(), sql)
        else:
            key = execute_key(database, state.user, state.digest(), sql, (), execute, 0)
        return key, depends, decision

    def _forget_plans(self) -> None:
        self._plans.clear()
        self._plans_generation += 1

    async def _dependencies(self, state: SessionState, info: MyInfo) -> _Memo | None:
        """What a read depends on in the current database (memoized per statement and database until a catalog
        changes): the names it reads, its dependencies, its rule; a reason string; None when a catalog is not
        readable (not memoized: tried again next time)."""
        ids = table_ids(state, info.reads)
        if ids is None:
            return "no database selected"
        deps: set[TableId] = set()
        for db, name in sorted(ids):
            catalog = await self.catalog(db)
            if catalog is None:
                return None
            tables = catalog.relation(name)
            if tables is None:
                return f"{db}.{name} is not a known table or view"
            deps |= tables
        decision = self.rules.decide(deps)
        if not decision.cacheable:
            return decision.reason or "a rule says not to cache"
        database = (state.database or "").lower()
        depends = frozenset(deps | {database_id(db) for db, _ in deps} | {database_id(database)})
        return frozenset(name for _, name in ids), depends, decision

    async def catalog(self, database: str) -> Catalog | None:
        """The database's catalog, read once (concurrent callers wait for the same read); None if unreadable."""
        found = self._catalogs.get(database)
        if found is not None:
            return found
        loading = self._loading.get(database)
        if loading is None:
            loading = asyncio.get_running_loop().create_future()
            self._loading[database] = loading
            try:
                catalog: Catalog | None = await load_catalog(self.config.upstream, database)
                self.metrics.catalog_loaded(True)
            except Exception as exc:
                log.warning("catalog of database %s not readable, its reads are not cached: %s", database, exc)
                self.metrics.catalog_loaded(False)
                catalog = None
            finally:
                self._loading.pop(database, None)
            if catalog is not None:
                self._catalogs[database] = catalog
                self._forget_plans()
            loading.set_result(catalog)
            return catalog
        return await asyncio.shield(loading)

    # -- invalidation ----------------------------------------------------------------------------------------

    def note_writes(self, state: SessionState, writes: frozenset[tuple[str | None, str]]) -> None:
        """Record a statement's writes in its session; they are invalidated when no transaction is open."""
        ids = table_ids(state, writes)
        if ids is None:
            return  # an unqualified name with no database selected: the server refused the statement
        tables, databases = self._expand(ids)
        state.pending |= tables
        state.pending_databases |= databases
        if databases:  # a trigger may have run (or a catalog is not read yet): triggers can SET the isolation level
            state.on_isolation("unknown")

    def _expand(self, ids: Iterable[TableId]) -> tuple[set[TableId], set[str]]:
        """Written tables -> the tables and databases to invalidate: FK cascades (InnoDB does not log cascaded
        changes in the binlog either), views written through, and triggers (their whole database)."""
        databases: set[str] = set()
        todo = list(ids)
        seen: set[TableId] = set()
        while todo:
            table = todo.pop()
            if table in seen:
                continue
            seen.add(table)
            catalog = self._catalogs.get(table[0])
            if catalog is None:
                # Not read yet: nothing of this database was cached through a known catalog... but a concurrent
                # read may be loading it. Drop the database: safe and rare.
                databases.add(table[0])
                continue
            if table[1] in catalog.triggers:
                databases.add(table[0])  # a trigger may write any table of its database
            todo.extend(catalog.cascades.get(table[1], ()))
            todo.extend(catalog.views.get(table[1], ()))  # a write through an updatable view
        return seen, databases

    def invalidate(self, tables: Iterable[TableId], databases: Iterable[str]) -> None:
        """A write through this sidecar: invalidate here, and tell the other sidecars."""
        tables, databases = frozenset(tables), frozenset(databases)
        self._invalidate_here(tables, databases)
        self._publish(Message(tables, databases))

    def _invalidate_here(self, tables: Iterable[TableId], databases: Iterable[str]) -> None:
        if self.engine is None:
            return
        self.engine.invalidate_tables(tables)
        for database in databases:
            self.engine.invalidate_database(database)

    def invalidate_databases(self, databases: Iterable[str], reason: str) -> None:
        """DDL through this sidecar: the databases' entries and catalogs go, here and on the other sidecars."""
        databases = frozenset(databases)
        self._invalidate_databases_here(databases, reason)
        self._publish(Message(ddl=databases))

    def _invalidate_databases_here(self, databases: Iterable[str], reason: str) -> None:
        self._forget_plans()
        for database in databases:
            self._catalogs.pop(database, None)
            self._forget_plans()
            if self.engine is not None:
                self.engine.invalidate_database(database)
            self.metrics.database_invalidated(reason)

    def invalidate_all(self, reason: str) -> None:
        """A statement through this sidecar whose effects are unknown: everything goes, everywhere."""
        self._invalidate_all_here(reason)
        self._publish(Message(everything=True))

    def _invalidate_all_here(self, reason: str) -> None:
        log.debug("every entry dropped: %s", reason)
        self._catalogs.clear()
        self._forget_plans()
        if self.engine is not None:
            self.engine.flush()
        self.metrics.database_invalidated("unknown_effects")
