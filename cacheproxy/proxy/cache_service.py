"""CacheService: the cache state every session shares: the tier, the classification memo, the feeds, fills in flight.

Sessions ask it what a statement is (`classify`: analysis, then the pure judgement of policy/classify.py, memoized
per exact text), and to invalidate after writes; they look up and store through `tier` (cache/tier.py: the
in-process engine today). It owns the single-flight table (one upstream query per
missing key at a time), the background sweeper that expires entries actively, and the link to the other proxies
(the invalidation bus): what this proxy's sessions commit is published there, what others publish is applied here,
and a database whose feed is down is "blind": nothing of it is served or stored until the feed is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import replace
from typing import Any, Final

from cacheproxy.advice.statements import id_of, loose
from cacheproxy.advice.workload import StatementStats, Workload
from cacheproxy.analysis.analyzer import Analyzer, analyze_head
from cacheproxy.analysis.fingerprint import fingerprint, fingerprint_literals
from cacheproxy.analysis.model import QueryInfo
from cacheproxy.analysis.points import KeyOf, Point, PointTemplates
from cacheproxy.analysis.strings import backslash_quotes
from cacheproxy.analysis.strings import decode as decode_sql
from cacheproxy.cache.engine import CacheEngine
from cacheproxy.cache.entry import WHOLE_DATABASE, Entry, TableId, base_table
from cacheproxy.cache.shared_tier import SharedTier
from cacheproxy.catalog.model import Catalog
from cacheproxy.config import Config
from cacheproxy.feeds.bus import Invalidation, InvalidationBus
from cacheproxy.feeds.catalog_loader import CatalogLoader
from cacheproxy.feeds.replication import ReplicationListener
from cacheproxy.observability.metrics import Metrics
from cacheproxy.observability.shared_metrics import SharedCollector
from cacheproxy.policy.classify import MAX_ANALYZED_BYTES, Classified, classify, lex_point
from cacheproxy.policy.rules import RuleSet
from cacheproxy.policy.verdict import ReadVerdict, WriteScope, judge_read, write_scope
from cacheproxy.verify.verifier import Verifier, bypass_reason

log: Final = logging.getLogger("cacheproxy.cache")

_SWEEP_INTERVAL: Final = 1.0
_SWEEP_CHECKS: Final = 2048
_CLASSIFY_MEMO: Final = 50_000
_MEMO_MAX_STATEMENT: Final = 4096  # bytes: bounds the memo to ~200 MiB of statement text at worst


class CacheService:
    """The shared cache state of one proxy process (see the module docstring)."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        cache = config.cache
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.engine = CacheEngine(max_memory=cache.max_memory, max_entry_size=cache.max_entry_size, shards=cache.shards)
        # The request path goes through the tier interface only (the engine's other operations, for the admin console
        # and snapshots, stay specific to the in-process tier).
        # The tier the relays look up and store through (cache/tier.py's CacheTier): typed as the engine, whose
        # methods compiled code then calls natively (through the Protocol each call goes through Python's API).
        self.tier: CacheEngine = self.engine
        self.analyzer = Analyzer(cache.analysis_cache_size)
        self.rules = RuleSet(config.rules, cache.default_ttl)
        self.catalogs = CatalogLoader(config.upstream, self.metrics.catalog_loaded)
        self.catalogs.queryids = self.rules.queryids
        # The shared tier behind this one (Redis / Valkey), when configured: see shared_tier.py.
        self.shared = SharedTier(cache.shared, self.tier, time.monotonic) if cache.shared.url else None
        if self.shared is not None:
            self.metrics.registry.register(SharedCollector(self.shared))
        self.metrics.set_stats_source(self.engine.stats)
        self.max_entry_size = cache.max_entry_size
        self.clock = time.monotonic
        self.workload = Workload(self.clock())  # per statement and table, for the advisor (cacheproxy/advice)
        # Exact statement text -> classification, per database: the hot path's one dict lookup.
        self._memo: OrderedDict[tuple[str, bytes, str], Classified] = OrderedDict()
        # id(analysis) -> (the analysis, catalog version, its verdict): the analysis is kept so that its id is not
        # reused by another while the entry lives.
        self._verdicts: dict[int, tuple[QueryInfo, int, ReadVerdict]] = {}
        # id(analysis) -> (the analysis, the catalog, what a write of it invalidates): write_scope is pure in both
        # (a Catalog is never changed: a reload makes a new one).
        self._scopes: dict[int, tuple[QueryInfo, Catalog | None, WriteScope]] = {}
        self._points = PointTemplates(_CLASSIFY_MEMO)  # row-level points by fingerprint (no lexing per new text)
        self._ids: dict[str, tuple[str, str]] = {}  # fingerprint -> its statement id and loose text (advice)
        self._fills: dict[Hashable, asyncio.Future[None] | None] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.database_flushes = 0
        self._noted: set[tuple[str, str | None]] = set()  # (database, why) already logged
        # Bumped by ALTER ROLE/USER/DATABASE ... SET/RESET: sessions opened before and after it start with
        # different settings (search_path...), so they must not share entries.
        self.settings_epoch = 0
        self.write_through = any(rule.strategy == "write_through" for rule in config.rules)
        self._refresh_tokens = config.write_through.per_second
        self._refresh_stamp = self.clock()
        # database -> why its invalidations may be missed now: its entries are neither served nor stored. A
        # database has one or two feeds ("bus", "replication"); it is blind while any of them is not up.
        self.blind: dict[str, str] = {}
        self._down: dict[str, dict[str, str]] = {}  # database -> feed -> why it is not up
        self._fed: set[tuple[str, str]] = set()  # (database, feed) that has been up once: a loss drops its entries
        invalidation = config.invalidation
        self.bus = (
            InvalidationBus(
                config.upstream,
                invalidation.channel,
                on_message=self.apply_remote,
                on_state=lambda database, up, why: self._feed_state("bus", database, up, why),
                on_published=lambda: self.metrics.bus_message("published"),
                catalog_poll=invalidation.catalog_poll,
            )
            if invalidation.bus
            else None
        )
        self._replication: dict[str, ReplicationListener] = {}
        self._loading: list[tuple[str, Invalidation]] | None = None  # see follow() and loaded()
        self._replication_tasks: set[asyncio.Task[None]] = set()
        self._instance = secrets.token_hex(4)  # names this process's replication slots
        self._sessions: dict[str, int] = {}  # database -> client sessions using the cache now
        self._idle_timers: dict[str, asyncio.TimerHandle] = {}
        self._releasing: dict[str, asyncio.Task[None]] = {}
        # Shadow verification (cacheproxy/verify): statements it found served wrong, (database, fingerprint) -> why.
        self.bypassed: dict[tuple[str, str], str] = {}
        self.verifier = Verifier(config.verify, config.upstream, self.tier, bypass=self.bypass, clock=self.clock)
        self.metrics.registry.register(self.verifier)
        if invalidation.replication:
            self.metrics.set_replication_lag_source(
                lambda: float(sum(listener.lag_bytes for listener in self._replication.values()))
            )

    def use_engine(self, engine: CacheEngine) -> None:
        """Serve from `engine` instead (before the service starts): a worker's, whose generations are shared with
        the other workers of the host (cacheproxy/workers)."""
        self.engine = engine
        self.tier = engine
        self.metrics.set_stats_source(engine.stats)
        self.verifier.use_tier(engine)
        if self.shared is not None:
            self.shared.use_tier(engine)

    # -- classification --------------------------------------------------------------------------------------

    def classify(self, database: str, sql: bytes, strings: str = "") -> Classified:
        """`strings`: the session's string rules (analysis.strings.mode), "" for UTF-8 and standard strings."""
        catalog = self.catalogs.fresh.get(database)  # (`get`, read directly: every query)
        version = catalog.version if catalog is not None else -1
        memo_key = (database, sql, strings)
        found = self._memo.get(memo_key)
        if found is not None and found.catalog_version == version:
            self._memo.move_to_end(memo_key)
            return found
        fingerprinted: str | None = None
        literals: list[str] | None = None
        if len(sql) > MAX_ANALYZED_BYTES:
            head = sql[:1024].decode("utf-8", "replace")
            info = analyze_head(head, f"statement longer than {MAX_ANALYZED_BYTES} bytes is not analyzed")
            fingerprinted = fingerprint(head)
        else:
            text = sql.decode("utf-8", "replace") if not strings else decode_sql(sql, strings)
            if text is None:
                info = analyze_head("", "statement in a client encoding the proxy cannot decode", unknown=True)
            else:
                fingerprinted, literals = fingerprint_literals(text)
                info = self.analyzer.analyze(text, backslash_quotes(strings), key=fingerprinted)
        statement: str | None = None
        stats: StatementStats | None = None
        if fingerprinted is not None:
            named = self._ids.get(fingerprinted)
            if named is None:
                named = (id_of(fingerprinted), loose(fingerprinted))
                if len(self._ids) >= _CLASSIFY_MEMO:
                    self._ids.clear()
                self._ids[fingerprinted] = named
            statement = named[0]
            stats = self.workload.statement(database, statement, named[1], _KINDS.get(info.kind.value, "other"))
        # Statements that differ only in their literals share one analysis (the analyzer's memo, by fingerprint),
        # and so one verdict under a catalog version: judged once, not once per text.
        verdict: ReadVerdict | None = None
        if catalog is not None:
            judged = self._verdicts.get(id(info))
            if judged is not None and judged[0] is info and judged[1] == version:
                verdict = judged[2]
            else:
                verdict = judge_read(info, catalog, self.rules, statement)
                if len(self._verdicts) >= _CLASSIFY_MEMO:
                    self._verdicts.clear()
                self._verdicts[id(info)] = (info, version, verdict)
        # Row-level points are read with the standard lexer from UTF-8: other sessions invalidate whole tables.
        find_point = lex_point
        if fingerprinted is not None and literals is not None:
            points, shape = self._points, fingerprinted

            def find_point(text: str, write: bool, key_of: KeyOf) -> Point | None:
                return points.find(text, shape, literals, write, key_of, catalog)

        found = classify(sql, info, catalog, self.rules, points=not strings, statement=statement, stats=stats,
                         verdict=verdict, find_point=find_point)  # fmt: skip
        if self.bypassed and found.verdict.cacheable and fingerprinted is not None:
            found = self._unless_bypassed(database, fingerprinted, found)
        if stats is not None:
            _describe(stats, found)
        if len(sql) <= _MEMO_MAX_STATEMENT:  # long statements are rare repeats, and would pin their text here
            self._memo[memo_key] = found
            if len(self._memo) > _CLASSIFY_MEMO:
                self._memo.popitem(last=False)
        return found

    def write_scope(self, info: QueryInfo, catalog: Catalog | None) -> WriteScope:
        """policy.verdict.write_scope, memoized per analysis (statements that differ only in literals share one)
        and catalog."""
        judged = self._scopes.get(id(info))
        if judged is not None and judged[0] is info and judged[1] is catalog:
            return judged[2]
        scope = write_scope(info, catalog)
        if len(self._scopes) >= _CLASSIFY_MEMO:
            self._scopes.clear()
        self._scopes[id(info)] = (info, catalog, scope)
        return scope

    def _unless_bypassed(self, database: str, fingerprinted: str, found: Classified) -> Classified:
        why = self.bypassed.get((database, fingerprinted))
        return found if why is None else replace(found, verdict=ReadVerdict(False, why))

    def bypass(self, database: str, statement: str, entry: Entry) -> None:
        """Shadow verification found `entry` wrong (`verify.on_mismatch: bypass`): its statement (by fingerprint) is
        not served from the cache until a reload, and what depends on its tables is dropped (their invalidations
        were evidently missed)."""
        self.bypassed[(database, statement)] = bypass_reason(statement)
        self._memo.clear()  # verdicts memoized before now would still serve it
        tables = [table for table in entry.tables if table[1] != WHOLE_DATABASE]
        if tables:
            self.engine.invalidate_tables(tables)

    def apply_config(self, config: Config) -> int:
        """Swap in reloaded rules and limits; drop the entries of tables whose rule is now `none`."""
        self.config = config
        self.rules = RuleSet(config.rules, config.cache.default_ttl)
        self.write_through = any(rule.strategy == "write_through" for rule in config.rules)
        self.max_entry_size = config.cache.max_entry_size
        self._memo.clear()  # verdicts were judged under the old rules
        if self.catalogs.queryids != self.rules.queryids:
            # Rules naming other queryids: look them up again (statements are judged by the current catalog
            # meanwhile).
            self.catalogs.queryids = self.rules.queryids
            for database in self.catalogs.loaded():
                self.catalogs.reload(database)
        self.bypassed.clear()
        self.verifier.apply_config(config.verify)
        self._verdicts.clear()
        doomed: set[TableId] = set()
        for entry in self.engine.entries():
            for table in entry.tables:
                catalog = self.catalogs.last_known(table[0])
                relations = catalog.resolve(None, table[1]) if catalog is not None else ()
                if any(not self.rules.decide([(r.schema, r.name)]).cacheable for r in relations):
                    doomed.add(table)
        return self.engine.invalidate_tables(doomed) if doomed else 0

    # -- observation -----------------------------------------------------------------------------------------

    def observe_hit(self, tables: Iterable[str], stats: StatementStats | None = None) -> None:
        """A read answered from the cache (its time is not measured: it is the cost of one write); `stats`: its
        statement's advisor counters."""
        self.metrics.hit()
        if stats is not None:
            stats.hits += 1
        for table in tables:
            self.metrics.table_hit(table)

    def observe_miss(self, tables: Iterable[str]) -> None:
        for table in tables:
            self.metrics.table_miss(table)

    def observe(
        self, kind: str, outcome: str, seconds: float, sql: bytes = b"", stats: StatementStats | None = None
    ) -> None:
        """One query done: counted by kind and outcome (and, with `stats`, for its statement's advice); logged when
        slower than `logging.slow_query`."""
        self.metrics.query(kind, outcome, seconds)
        if stats is not None:
            stats.completed(outcome, seconds)
        slow = self.config.logging.slow_query
        if slow is not None and seconds >= slow:
            text = sql[:500].decode("utf-8", "replace")
            log.warning("slow query (%.3fs, %s %s): %s", seconds, kind, outcome, text)

    # -- invalidation ----------------------------------------------------------------------------------------

    def invalidate(
        self, database: str, scope: WriteScope, *, counted: bool = True, removed: list[Entry] | None = None
    ) -> None:
        """Apply `scope`. A write is invalidated several times (before it is sent, after, at commit): only the one
        after it completes is `counted` in the whole-database metric. With write-through rules, the entries removed
        are appended to `removed` (the writing session refreshes them once the write commits)."""
        if self.ignores(scope):
            return
        dropped = removed if self.write_through else None
        if counted and scope.code == "triggers" and (database, scope.why) not in self._noted:
            # Conservative, and costly for the hit rate: say so once per database and table.
            self._noted.add((database, scope.why))
            log.info("database %r: %s, whose effects the proxy cannot know: its writes invalidate the whole database",
                     database, scope.why)  # fmt: skip
        if scope.everything:
            removed_count = self.engine.invalidate_database(database, dropped)
            if counted:
                self.database_flushes += 1
                self.metrics.database_invalidated(scope.code)
                self.workload.database_written(database)
            log.debug("database %r invalidated (%s): %d entries", database, scope.why, removed_count)
        elif scope.tables:
            self.engine.invalidate_tables([(database, name) for name in scope.tables], dropped)
            if counted:
                self.workload.written(database, {base_table(name) for name in scope.tables})

    def ignores(self, scope: WriteScope) -> bool:
        """`invalidation.unknown_writes: ignore`: statements whose writes cannot be known invalidate nothing."""
        return (
            scope.everything
            and not scope.ddl
            and scope.code in ("unknown_effects", "function_call")
            and self.config.invalidation.unknown_writes == "ignore"
        )

    def take_refresh(self) -> bool:
        """One write-through refresh from the budget (`write_through.per_second`, a token bucket of one second)."""
        rate = self.config.write_through.per_second
        now = self.clock()
        self._refresh_tokens = min(rate, self._refresh_tokens + (now - self._refresh_stamp) * rate)
        self._refresh_stamp = now
        if self._refresh_tokens < 1:
            return False
        self._refresh_tokens -= 1
        return True

    def publish(self, database: str, scopes: Iterable[WriteScope], *, settings: bool = False) -> None:
        """Tell the other proxies what committed writes invalidated (called at commit, once per transaction)."""
        if self.bus is None:
            return
        merged = Invalidation(settings=settings)
        for scope in scopes:
            if not self.ignores(scope):
                # Row ids go as they are: the receiver maps them to its own entries' dependencies (apply_remote).
                ddl = scope.ddl or scope.code == "unknown_effects"  # see after_write
                merged = merged.merge(Invalidation(scope.tables, scope.everything, ddl))
        if merged.tables or merged.everything or merged.settings:
            self.bus.publish(database, merged)

    def bump_shared(
        self, database: str, scopes: Iterable[WriteScope], read: Iterable[str] = ()
    ) -> asyncio.Task[Any] | None:
        """Committed writes of this proxy's session are about to be acknowledged: bump their generations in the
        shared tier (the task to wait for first; None when there is nothing to wait for). `read`: see
        SharedTier.bump."""
        if self.shared is None:
            return None
        names: set[str] = set()
        everything = False
        for scope in scopes:
            if not self.ignores(scope):
                everything = everything or scope.everything
                names.update(scope.tables)
        if not names and not everything:
            return None
        return self.shared.bump(database, names, everything=everything, read=read)

    def flush_shared(self, database: str | None = None) -> list[asyncio.Task[Any]]:
        """CACHEPROXY FLUSH (every database this proxy has served) or a database's invalidation, in the shared tier:
        bumping a database's own generation makes every entry of it stale (no KEYS, no FLUSHALL). The bumps made."""
        if self.shared is None:
            return []
        bumps = []
        for name in [database] if database is not None else sorted(set(self._sessions) | set(self._down)):
            bump = self.shared.bump(name, (WHOLE_DATABASE,))
            if bump is not None:
                bumps.append(bump)
        return bumps

    def apply_remote(self, database: str, invalidation: Invalidation) -> None:
        """Another proxy's clients (or, with replication on, anyone) committed a write."""
        self.metrics.bus_message("received")
        if self._loading is not None:  # a snapshot is being loaded: apply it again once its entries are in
            self._loading.append((database, invalidation))
        if invalidation.everything:
            self.engine.invalidate_database(database)
            self.workload.database_written(database)
        elif invalidation.tables:
            self.workload.written(database, {base_table(name) for name in invalidation.tables})
            self._drop_names(database, invalidation.tables)
        if invalidation.ddl:
            self.after_ddl(database)
        if invalidation.settings:
            self.settings_epoch += 1

    def _drop_names(self, database: str, names: Iterable[str]) -> None:
        """A row id ("t\x00<bucket>") is applied as such only where this proxy's entries of `t` carry row ids too:
        its current catalog gives `t` a point key (a change of that needs DDL, which drops everything). Otherwise,
        or without a catalog, the whole table."""
        catalog = self.catalogs.get(database)
        points = catalog.point_columns if catalog is not None else {}
        found = {name if base_table(name) in points else base_table(name) for name in names}
        self.engine.invalidate_tables([(database, name) for name in found])

    def settle(self, database: str, scopes: Iterable[WriteScope]) -> None:
        """A commit's shared bump is made (or gave up): invalidate in process again, and only now tell the other
        proxies. A lookup that read the generations before the bump landed may have put a shared entry older than
        the write into an in-process tier after the first invalidation (its guard was taken after it); this one
        removes it, here and, by the bus, at every other proxy."""
        scopes = list(scopes)
        for scope in scopes:
            self.invalidate(database, scope, counted=False)
        self.publish(database, scopes)

    def watch(self, database: str) -> asyncio.Future[Any] | None:
        """A session of `database` starts: load its catalog and listen to its invalidations, if not yet. Returns
        what to wait for before the session's first cacheable query, or None when nothing is pending."""
        catalog = self.catalogs.ensure(database)
        feed = self.bus.watch(database) if self.bus is not None else None
        if feed is not None:
            if (database, "bus") in self._fed:
                feed = None  # lost after it was up: no waiting, the database is just not served until it is back
            else:
                self._set_down(database, "bus", "connecting")
        if self.config.invalidation.replication and database not in self._replication:
            self._start_replication(database)
        if catalog is None:
            return feed
        if feed is None:
            return catalog
        return asyncio.gather(catalog, feed, return_exceptions=True)

    def feed_health(self) -> dict[str, dict[str, str]]:
        """Per database followed now, each invalidation feed's state: "up", or why not (for the status page)."""
        feeds = ["bus"] if self.bus is not None else []
        if self.config.invalidation.replication:
            feeds.append("replication")
        databases = set(self._sessions) | set(self._down) | {database for database, _ in self._fed}
        return {
            database: {feed: self._down.get(database, {}).get(feed, "up") for feed in feeds}
            for database in sorted(databases)
        }

    def stalls(self) -> dict[str, str]:
        """Databases whose replication slot creation is taking long, and why (for /readyz)."""
        return {db: listener.stalled for db, listener in self._replication.items() if listener.stalled is not None}

    def attach(self, database: str) -> None:
        """A client session of `database` starts (`detach` when it ends)."""
        self._sessions[database] = self._sessions.get(database, 0) + 1
        timer = self._idle_timers.pop(database, None)
        if timer is not None:
            timer.cancel()

    def detach(self, database: str) -> None:
        """A client session of `database` ended: the last one arms the release of its own connections."""
        left = self._sessions.get(database, 0) - 1
        if left > 0:
            self._sessions[database] = left
            return
        self._sessions.pop(database, None)
        # Not at once: releasing drops the database's entries, and applications whose connections come and go
        # (no pool, a job, a benchmark's runs) would start cold each time.
        delay = self.config.invalidation.idle_release
        if delay is not None and database not in self._idle_timers:
            loop = asyncio.get_running_loop()
            self._idle_timers[database] = loop.call_later(delay, self._release_idle, database)

    def _release_idle(self, database: str) -> None:
        self._idle_timers.pop(database, None)
        if not self._sessions.get(database):
            self.release(database, "it has no client sessions")

    def release(self, database: str, why: str) -> asyncio.Task[None] | None:
        """Close this proxy's own connections to `database` (the bus's, the replication stream's, the catalog's): it
        has no client sessions, or a client is dropping it. Its entries are dropped: nothing tells what changes while
        nothing listens (a session that comes later waits for the feeds as the first one did). The task to wait on,
        or None when nothing of the database is open."""
        running = self._releasing.get(database)
        if running is not None:
            return running
        watched = (
            (self.bus is not None and self.bus.watching(database))
            or database in self._replication
            or self.verifier.connected(database)
            or self.catalogs.connected(database)
        )
        if not watched:
            return None
        task = asyncio.get_running_loop().create_task(self._release(database, why), name=f"release-{database}")
        self._releasing[database] = task
        task.add_done_callback(lambda _: self._releasing.pop(database, None))
        return task

    async def _release(self, database: str, why: str) -> None:
        log.info("database %r: %s: closing the proxy's own connections to it; its cached results are dropped",
                 database, why)  # fmt: skip
        self._fed.discard((database, "bus"))
        self._fed.discard((database, "replication"))
        listener = self._replication.pop(database, None)
        # Blind from now on: a session still attached (a DROP DATABASE that will fail) watches it again.
        if self.bus is not None and self.bus.watching(database):
            self._set_down(database, "bus", "closed")
        if listener is not None:
            self._set_down(database, "replication", "closed")
        if self.bus is not None:
            await self.bus.unwatch(database)
        await self.verifier.release(database)
        await self.catalogs.release(database)
        if listener is not None:
            await listener.stop()
        self.engine.invalidate_database(database)
        if not self._sessions.get(database):  # else a session came meanwhile: its watch() set the feeds' state
            self._down.pop(database, None)
            self.blind.pop(database, None)
            self.metrics.database_blind(database, False)

    async def failed_over(self, why: str) -> None:
        """The upstream failed over (cacheproxy/upstream_hosts.py). Everything cached is dropped: an asynchronous
        standby may have lost the old primary's last commits, so nothing filled before can be trusted. The feeds are
        restarted (one may still reach the old server, when a standby was promoted while it runs): they reattach to
        the chosen host, and a feed coming back reads its gap as "everything changed" (see `_feed_state`)."""
        removed = self.engine.flush()
        if self._loading is not None:  # a snapshot is being loaded: what it puts from now on is dropped too
            self._loading.append(("", Invalidation(everything=True)))
        log.warning("the upstream failed over (%s): %d cached results dropped", why, removed)
        databases = set(self._sessions) | set(self._replication) | set(self._down)
        releases = [task for task in (self.release(db, "the upstream failed over") for db in databases) if task]
        if releases:
            await asyncio.gather(*releases, return_exceptions=True)
        for database in databases:
            if self._sessions.get(database):
                self.watch(database)

    async def follow(self, databases: list[str], timeout: float = 5.0) -> set[str]:
        """Start the feeds of `databases` and wait (up to `timeout`) until they are up; the databases that are
        followed then (a restored snapshot keeps only their entries: see snapshot.store.load_snapshot)."""
        self._loading = []  # from now on, what the feeds say is also kept for `loaded`
        waits = [w for w in (self.watch(database) for database in databases) if w is not None]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while any(database in self.blind for database in databases):
                        await asyncio.sleep(0.01)
        return {database for database in databases if database not in self.blind}

    def loaded(self) -> None:
        """The snapshot's entries are in: apply again what the feeds said while they were being put (a put does not
        check generations, and the evidence was read before those writes)."""
        replay, self._loading = self._loading or [], None
        for database, invalidation in replay:
            if not database:  # the upstream failed over meanwhile (see failed_over)
                self.engine.flush()
            elif invalidation.everything:
                self.engine.invalidate_database(database)
            else:
                self.engine.invalidate_tables([(database, base_table(name)) for name in invalidation.tables])

    def _start_replication(self, database: str) -> None:
        invalidation = self.config.invalidation
        listener = ReplicationListener(
            self.config.upstream,
            database,
            publication=invalidation.publication,
            slot_prefix=invalidation.slot_prefix,
            on_commit=self._replicated,
            on_state=lambda db, up, why: self._feed_state("replication", db, up, why),
            instance_id=self._instance,
        )
        self._replication[database] = listener
        self._set_down(database, "replication", "connecting")
        self._replication_tasks.add(asyncio.get_running_loop().create_task(listener.start()))

    def _replicated(self, database: str, tables: frozenset[tuple[str, str]], _lsn: int) -> None:
        """A transaction committed anywhere (this proxy's own included: invalidating twice is merely safe)."""
        names = frozenset(name for _, name in tables)
        self.apply_remote(database, Invalidation(names))
        if self.shared is not None:  # writes that bypass every sidecar: nobody else bumps them
            bump = self.shared.bump(database, names)
            if bump is not None:  # (again once it is made: see settle)
                bump.add_done_callback(lambda _: self._drop_names(database, names))

    def _set_down(self, database: str, feed: str, reason: str | None) -> None:
        """Record why `feed` of `database` is not up (None: it is up); `blind` is derived here, and only here."""
        down = self._down.setdefault(database, {})
        if reason is None:
            down.pop(feed, None)
        else:
            down[feed] = reason
        if down:
            self.blind[database] = "; ".join(f"{name}: {why}" for name, why in down.items())
        else:
            self.blind.pop(database, None)
        self.metrics.database_blind(database, bool(down))

    def _feed_state(self, feed: str, database: str, up: bool, reason: str) -> None:
        """An invalidation feed of `database` (the bus, or the replication stream) went up or down."""
        if up:
            if (database, feed) in self._fed:
                # Back after a loss: whatever was committed meanwhile is unknown.
                self.engine.invalidate_database(database)
                if feed == "replication" and self.shared is not None:  # (writes no sidecar bumped may be among it)
                    self.shared.bump(database, (), everything=True)
            self._fed.add((database, feed))
            self._set_down(database, feed, None)
        else:
            if self._loading is not None:
                self._loading.append((database, Invalidation(everything=True)))
            self._set_down(database, feed, f"down ({reason})")
            # Drop what is cached and refuse fills in flight (their generations change); entries of rules with
            # stale_if_error expire instead, kept for their window (served only while the upstream is unreachable).
            self.engine.expire_database(database, self.clock())

    def role_settings_changed(self, database: str) -> None:
        """ALTER ROLE/USER/DATABASE ... SET/RESET: sessions opened from now on start with other settings
        (search_path...), so they must not share entries with older ones; the other proxies are told too."""
        self.settings_epoch += 1
        self.publish(database, (), settings=True)

    def schema_changing(self, database: str) -> None:
        """DDL was sent: decide nothing with the old catalog from now on (it is read again once the DDL completed)."""
        self.catalogs.mark_stale(database)

    def catalog_ready(self, database: str) -> bool:
        """The database's current catalog is loaded."""
        return self.catalogs.get(database) is not None

    def last_catalog(self, database: str) -> Catalog | None:
        """The database's last loaded catalog, even if a reload is due (for write scopes: a table's dependents)."""
        return self.catalogs.last_known(database)

    @property
    def refresh_concurrency(self) -> int:
        """write_through.concurrency: refreshes one commit may send at once."""
        return self.config.write_through.concurrency

    def observe_refresh(self, outcome: str) -> None:
        """A write-through refresh: "stored", "failed" or "skipped" (over budget)."""
        self.metrics.refreshed(outcome)

    def after_ddl(self, database: str) -> None:
        """DDL changes names, kinds and volatility: decide nothing more for this database until a reload."""
        self.catalogs.mark_stale(database)
        self.catalogs.ensure(database)

    def after_write(self, database: str, scope: WriteScope) -> None:
        """A write completed, or its transaction committed. DDL, and statements whose effects are unknown (DO, CALL,
        COMMIT PREPARED: a trigger created in a DO block), may have changed the catalog: decide nothing more until it
        is read again. A call of a function that may write may have too (rarely, and such calls can be frequent):
        read the catalog again in the background, deciding with the current one meanwhile (the catalog poll is the
        backstop for whatever lands between)."""
        if scope.ddl or scope.code == "unknown_effects":
            self.after_ddl(database)
        elif scope.code == "function_call":
            self.catalogs.reload(database)

    # -- single flight ---------------------------------------------------------------------------------------

    def fill_in_flight(self, key: Hashable) -> asyncio.Future[None] | None:
        """The future to wait on for `key`'s fill in flight, or None when there is none."""
        if key not in self._fills:
            return None
        future = self._fills[key]
        if future is None:  # the first session to ask: made now, not for every fill (most have no waiter)
            future = self._fills[key] = asyncio.get_running_loop().create_future()
        return future

    def begin_fill(self, key: Hashable) -> None:
        self._fills[key] = None

    def end_fill(self, key: Hashable) -> None:
        future = self._fills.pop(key, None)
        if future is not None and not future.done():
            future.set_result(None)

    # -- background ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="cache-sweeper")
        self.verifier.start()

    async def start_shared(self) -> None:
        """Connect the shared tier, if any, and learn its namespace (the upstream cluster's system identifier)."""
        if self.shared is None:
            return
        upstream = self.config.upstream

        async def system_id() -> str:
            from cacheproxy.snapshot.evidence import read_cluster  # (asyncpg control connection, as snapshots do)

            async with asyncio.timeout(10.0):
                return (await read_cluster(upstream, upstream.database or "postgres")).system_identifier

        await self.shared.start(system_id)

    async def stop(self) -> None:
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        if self._releasing:  # closing connections of idle databases: let them finish, not be destroyed mid-way
            await asyncio.gather(*self._releasing.values(), return_exceptions=True)
        if self.bus is not None:
            await self.bus.stop()
        await asyncio.gather(*(listener.stop() for listener in self._replication.values()), return_exceptions=True)
        await self.verifier.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.catalogs.close()
        if self.shared is not None:
            await self.shared.close()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            try:
                self.engine.sweep(self.clock(), _SWEEP_CHECKS)
            except Exception:  # a sweeper bug must not stop expiry forever, nor the proxy
                log.exception("cache sweep failed")


_KINDS: Final = {"transaction": "tx"}  # analysis.model.Kind values -> the metrics' kind labels (the rest are the same)


def _describe(stats: StatementStats, classified: Classified) -> None:
    """What the advisor shows of a statement, from its latest classification (rules and catalog may change)."""
    info, verdict = classified.info, classified.verdict
    stats.kind = _KINDS.get(info.kind.value, info.kind.value)
    if verdict.cacheable:
        stats.tables = tuple(sorted(verdict.tables))
    else:
        stats.tables = tuple(sorted({name for _, name in (info.reads | info.writes) if name}))
    stats.cacheable = verdict.cacheable and info.statement_count == 1
    stats.reason = verdict.reason if not verdict.cacheable else None
    stats.rule = verdict.rule
    stats.ttl = verdict.ttl
    stats.strategy = verdict.strategy if verdict.cacheable else "none"
