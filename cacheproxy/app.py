"""The application: builds the parts from one Config, starts them, and owns the one shutdown order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import fields, replace
from typing import TYPE_CHECKING

import cacheproxy
from cacheproxy.advice.report import current_advice
from cacheproxy.config import Config, ConfigError, UpstreamConfig
from cacheproxy.errors import CONFIG_FILE_ERROR, ProxyError, UpstreamError
from cacheproxy.observability import logs
from cacheproxy.observability.admin_http import AdminServer
from cacheproxy.observability.metrics import Metrics
from cacheproxy.observability.status import StatusPage
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.server import ProxyServer
from cacheproxy.snapshot import SnapshotFailed, load_snapshot, rules_fingerprint, write_snapshot
from cacheproxy.snapshot.store import Evidence
from cacheproxy.upstream import open_upstream
from cacheproxy.upstream_hosts import FailoverCollector, HostState, UpstreamHosts

if TYPE_CHECKING:
    from cacheproxy.cache.engine import CacheEngine
    from cacheproxy.mysql.server import MySQLServer

log = logging.getLogger("cacheproxy.app")


_READY_TTL = 1.0
# With snapshot.interval unset (or removed by a reload), how often the periodic task looks at the setting again.
_SNAPSHOT_RECHECK = 5.0
# Settings that only a restart can change: a reload keeps their old values and says so.
_GC_THRESHOLD = 50_000
_RESTART_ONLY = (
    "listen",
    "upstream",
    "admin.listen",
    "tls",
    "cache.enabled",
    "cache.max_memory",
    "cache.shards",
    "failover.reattach_concurrency",
    "server.workers",
    "cache.shared",
)


class App:
    """cacheproxy as a whole: the proxy listener, the cache service and its snapshots, and the admin HTTP server.

    `load_config`, when given, rebuilds the configuration from its sources (file, environment, flags) for a reload.
    """

    def __init__(self, config: Config, load_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._load_config = load_config
        self.metrics = Metrics()
        mysql = config.upstream.is_mysql  # the upstream URL chooses the front end (cacheproxy/mysql)
        if mysql:  # imported only for it: a PostgreSQL proxy does not load the MySQL front end
            from cacheproxy.mysql.server import MySQLServer
        self.cache = CacheService(config, self.metrics) if config.cache.enabled and not mysql else None
        self.proxy: ProxyServer | MySQLServer = (
            MySQLServer(config, self.metrics)
            if mysql
            else ProxyServer(
                config,
                self.cache,
                self.reload if load_config is not None else None,
                self.metrics,
                snapshot=self.snapshot_now if self.cache is not None else None,
            )
        )
        # Which upstream host connections go to, and failovers (upstream_hosts.py); sessions re-attach through it.
        # PostgreSQL only: the MySQL front end has one upstream host and no failover handling.
        self.hosts: UpstreamHosts | None = None
        if isinstance(self.proxy, ProxyServer):
            self.hosts = UpstreamHosts(config.upstream, config.failover)
            self.hosts.on_failover(self._failed_over)
            self.proxy.failover = self.hosts
            self.metrics.registry.register(FailoverCollector(self.hosts))
        self._failover_tasks: set[asyncio.Task[None]] = set()
        self._snapshot_lock = asyncio.Lock()
        self._snapshotter: asyncio.Task[None] | None = None
        admin = config.admin.listen
        self.admin = (
            AdminServer(
                admin.host, admin.port, metrics=self.metrics, ready=self.ready, stats=self.stats, advice=self.advice
            )
            if admin is not None
            else None
        )
        self._ready_cache: tuple[float, tuple[bool, str]] | None = None
        self.status = StatusPage(self.metrics, self.cache)
        if self.admin is not None:
            self.admin.add_routes(self.status.routes())

    @property
    def port(self) -> int:
        return self.proxy.port

    async def start(self) -> None:
        log.info("upstream %s", self.config.upstream.masked_url())
        # Which code runs the request loop (cacheproxy/mode.py): the mypyc build or the .py files, and why.
        log.log(
            logging.WARNING if "changed" in cacheproxy.MODE.reason else logging.INFO, "%s", cacheproxy.MODE.describe()
        )
        if self.hosts is not None:
            await self.hosts.start()
        if self.cache is not None:
            self.cache.start()
            await self.cache.start_shared()
            await self._load_snapshot()
        elif self._snapshot_parts() is not None:
            await self._load_mysql_snapshot()
        await self.proxy.start()
        if self._snapshot_parts() is not None and self.config.snapshot.path is not None:
            self._snapshotter = asyncio.get_running_loop().create_task(self._snapshot_forever(), name="snapshots")
        if self.admin is not None:
            self.status.start()
            await self.admin.start()

    async def ready(self) -> tuple[bool, str]:
        """/readyz: listening, not shutting down, and the upstream accepts a connection (checked at most once a
        second, so that a probe storm cannot become a connection storm on the database)."""
        now = time.monotonic()
        if self._ready_cache is not None and now - self._ready_cache[0] < _READY_TTL:
            return self._ready_cache[1]
        if not self.proxy.accepting:
            answer = (False, "not accepting connections")
        else:
            try:
                _, writer = await (
                    _open_mysql(self.config.upstream)
                    if self.config.upstream.is_mysql
                    else open_upstream(self.config.upstream)
                )
                writer.close()
                answer = (True, "ok")
            except UpstreamError as exc:
                answer = (False, exc.message)
        stalls = self.cache.stalls() if self.cache is not None else {}
        if stalls:  # still ready (other databases are served), but say which databases are not, and why
            answer = (
                answer[0],
                answer[1] + "".join(f"; database {db!r} not served: {why}" for db, why in stalls.items()),
            )
        self._ready_cache = (now, answer)
        return answer

    def stats(self) -> dict[str, object]:
        """/stats: the metrics summary, and what this process is configured with (no secrets)."""
        summary = self.metrics.snapshot()
        summary["upstream"] = self.config.upstream.masked_url()
        summary["rules"] = len(self.config.rules)
        if self.cache is not None and self.cache.shared is not None:
            summary["shared_tier"] = self.cache.shared.stats()
        return summary

    def advice(self) -> dict[str, object]:
        """/advice: the rule advisor's ranking and suggested rules for what this proxy has seen (cacheproxy/advice)."""
        if self.cache is None:
            return {"error": "the cache is disabled (cache.enabled: false)"}
        return current_advice(self.cache.workload, self.cache.clock())

    async def stop(self, reason: str = "the proxy is shutting down") -> None:
        """Stop accepting, let in-flight work finish up to `shutdown.timeout`, then close everything."""
        await self.proxy.shutdown(self.config.shutdown.timeout, reason)
        if self._snapshotter is not None:
            self._snapshotter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._snapshotter
        if self._snapshot_parts() is not None and self.config.snapshot.path is not None:
            with contextlib.suppress(SnapshotFailed):  # logged; the previous snapshot stays
                await self.snapshot_now()
        if self.hosts is not None:
            await self.hosts.stop()
        if self.cache is not None:
            await self.cache.stop()
        if self.admin is not None:
            await self.admin.stop()
        await self.status.stop()

    def _failed_over(self, before: HostState | None, after: HostState, why: str) -> None:
        """upstream_hosts.py saw another server: the cache drops what it holds and its feeds reattach."""
        if self.cache is None:
            return
        task = asyncio.get_running_loop().create_task(self.cache.failed_over(why), name="failed-over")
        self._failover_tasks.add(task)
        task.add_done_callback(self._failover_tasks.discard)

    # -- snapshots (cacheproxy/snapshot) ------------------------------------------------------------------------

    async def _load_snapshot(self) -> None:
        """Load the snapshot, if any, BEFORE the listener accepts clients: loading while serving could resurrect an
        entry after a write through the proxy invalidated its table (the invalidation runs, then the snapshot's
        older entry is put back), and would serve entries before their tables' change evidence was checked."""
        path = self.config.snapshot.path
        if path is None or self.cache is None:
            return
        cache = self.cache
        try:
            result = await load_snapshot(
                path, cache.engine, self.config.upstream, rules_fingerprint(self.config), cache.clock, cache.follow
            )
        except Exception:  # a bug must not stop the proxy from starting: start cold instead
            log.exception("snapshot: loading %s failed; cold start", path)
            cache.engine.flush()
            return
        finally:
            cache.loaded()
        self.metrics.snapshot_loaded(result.loaded, dict(result.dropped))

    def _snapshot_parts(self) -> tuple[CacheEngine, Callable[[], float], Evidence | None] | None:
        """The cache a snapshot holds, its clock and its evidence (None: PostgreSQL's); None: no cache."""
        if self.cache is not None:
            return self.cache.engine, self.cache.clock, None
        engine = getattr(self.proxy, "engine", None)
        if not isinstance(self.proxy, ProxyServer) and engine is not None:
            return engine, time.monotonic, self.proxy.snapshot_evidence()
        return None

    async def _load_mysql_snapshot(self) -> None:
        """The MySQL front end's load, before its listener and binlog feed start (see _load_snapshot)."""
        path = self.config.snapshot.path
        proxy = self.proxy
        if path is None or isinstance(proxy, ProxyServer) or proxy.engine is None:
            return
        source = proxy.snapshot_evidence()
        try:
            result = await load_snapshot(path, proxy.engine, self.config.upstream, rules_fingerprint(self.config),
                                         time.monotonic, source=source)  # fmt: skip
        except Exception:  # a bug must not stop the proxy from starting: start cold instead
            log.exception("snapshot: loading %s failed; cold start", path)
            proxy.engine.flush()
            return
        proxy.loaded_snapshot(source)
        self.metrics.snapshot_loaded(result.loaded, dict(result.dropped))

    async def snapshot_now(self) -> str:
        """Write a snapshot now (periodic, at shutdown, CACHEPROXY SNAPSHOT); a one-line summary, or SnapshotFailed
        (logged) with the previous file left whole. One snapshot at a time: a second caller waits for the first."""
        path = self.config.snapshot.path
        parts = self._snapshot_parts()
        if path is None or parts is None:
            raise SnapshotFailed("snapshots are off: snapshot.path is not set, or the cache is disabled")
        engine, clock, source = parts
        async with self._snapshot_lock:
            try:
                result = await write_snapshot(
                    path, engine, self.config.upstream, rules_fingerprint(self.config), clock, source
                )
            except (SnapshotFailed, OSError) as exc:
                self.metrics.snapshot_failed()
                log.error("snapshot to %s failed, the previous one stays: %s", path, exc)
                raise SnapshotFailed(str(exc)) from exc
            except Exception as exc:  # a bug must not end the periodic task nor the shutdown
                self.metrics.snapshot_failed()
                log.exception("snapshot to %s failed, the previous one stays", path)
                raise SnapshotFailed(f"internal error: {exc!r}") from exc
        self.metrics.snapshot_written(result.seconds, result.size, result.entries)
        summary = f"{result.entries} entries, {result.size} bytes, {result.seconds:.2f}s"
        log.info("snapshot written to %s: %s (%d skipped)", path, summary, result.skipped)
        return summary

    async def _snapshot_forever(self) -> None:
        while True:
            interval = self.config.snapshot.interval
            await asyncio.sleep(interval if interval is not None else _SNAPSHOT_RECHECK)
            if interval is not None and self.config.snapshot.interval is not None:
                with contextlib.suppress(SnapshotFailed):  # logged; try again next time
                    await self.snapshot_now()

    def reload(self) -> str:
        """Build and validate a new configuration, then swap it in whole; on any error keep the old one.

        Changed rules apply to new entries; entries of tables whose rule became `none` are dropped at once.
        Returns a one-line summary; raises ProxyError (SQLSTATE F0000, config_file_error) with the reason.
        """
        assert self._load_config is not None
        try:
            new = self._load_config()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            raise ProxyError(CONFIG_FILE_ERROR, f"reload refused: {exc}", severity="ERROR") from exc
        old = self.config
        kept = [name for name in _RESTART_ONLY if _get(old, name) != _get(new, name)]
        new = replace(new, listen=old.listen, upstream=old.upstream, tls=old.tls,
                      admin=replace(new.admin, listen=old.admin.listen),
                      cache=replace(new.cache, enabled=old.cache.enabled, max_memory=old.cache.max_memory,
                                    shards=old.cache.shards, shared=old.cache.shared))  # fmt: skip
        changed = [
            f.name for f in fields(Config) if getattr(old, f.name) != getattr(new, f.name) and f.name != "source"
        ]
        self.config = new
        self.proxy.config = new
        if self.hosts is not None:
            self.hosts.settings = new.failover
        dropped = self.cache.apply_config(new) if self.cache is not None else 0
        if (new.logging.level, new.logging.format) != (old.logging.level, old.logging.format):
            logs.configure(new.logging.level, new.logging.format)
        summary = f"changed: {', '.join(changed) or 'nothing'}; entries dropped: {dropped}"
        if kept:
            summary += f"; restart needed for: {', '.join(kept)}"
        log.info("configuration reloaded from %s: %s", new.source or "the environment", summary)
        return summary

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop gracefully (the CLI's `run`)."""
        await self.start()
        # The process is mostly long-lived objects (modules, the cache's entries): exempt what start-up made from
        # the cyclic collector, and let young generations grow before a pass; the relay makes few cycles.
        gc.freeze()
        gc.set_threshold(_GC_THRESHOLD, 20, 20)
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, sig, stop_requested)
        if self._load_config is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            await stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
        await self.stop()

    def _on_sighup(self) -> None:
        log.info("received SIGHUP: reloading the configuration")
        with contextlib.suppress(ProxyError):  # already logged; the running configuration stays
            self.reload()


async def _open_mysql(upstream: UpstreamConfig) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(asyncio.open_connection(upstream.host, upstream.port), upstream.connect_timeout)
    except (OSError, TimeoutError) as exc:
        raise UpstreamError(f"cannot reach the MySQL server: {exc}") from exc


def _get(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _on_signal(sig: signal.Signals, stop_requested: asyncio.Event) -> None:
    log.info("received %s: shutting down", sig.name)
    stop_requested.set()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (it is a dependency on Linux), else the standard loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
