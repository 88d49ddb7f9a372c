"""The proxy's Prometheus metrics: hot-path counters, and their exposition in the Prometheus text format.

Names follow ElastiCache's vocabulary where it has one: cache hits/misses/evictions, CurrConnections
(`cacheproxy_client_connections`) and NewConnections (`cacheproxy_client_connections_total`).

Why plain ints and one custom collector rather than prometheus_client's Counter/Gauge/Histogram objects: those take
a lock per update, measured at about 1 µs per `inc()` and 2 µs per `observe()`, several times a cache hit's budget
of bookkeeping. The proxy updates its metrics from one event-loop thread, so the counters here are plain ints in
pre-built dicts and lists, and `_Collector.collect()` turns them into metric families at scrape time. prometheus_client
still owns the registry, the families and the text format. A scrape from another thread reads ints under the GIL: it
may see a histogram's `_sum` one observation ahead of its buckets, never a torn value.

The cache engine's counters are not copied here at all: `stats()` is called at scrape time, so they cannot be
double-counted or drift.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

import cacheproxy
from cacheproxy.cache.engine import CacheStats

QUERY_KINDS: Final = ("read", "write", "ddl", "tx", "session", "other")
# analysis.model.Kind spells the transaction kind "transaction": accept it so callers can pass `Kind.value`.
_KIND_ALIASES: Final = {"transaction": "tx"}
QUERY_OUTCOMES: Final = ("hit", "miss", "bypass")
INVALIDATION_REASONS: Final = ("ddl", "unknown_effects", "triggers", "function_call", "other")
BUS_DIRECTIONS: Final = ("published", "received")
REFRESH_RESULTS: Final = ("stored", "failed", "skipped")

# 20 µs (a hit served from memory) .. 10 s (a slow upstream query); roughly 1-2.5-5 per decade.
# Not Final: compiled, a Final tuple is inlined where used, and the generator below then found its static unset.
DURATION_BUCKETS = (
    0.00002,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# The `le` label values, as prometheus_client spells them (its floatToGoString is repr() in this range).
_BUCKET_LABELS: Final = (*(repr(b) for b in DURATION_BUCKETS), "+Inf")

# What generate_latest() writes (prometheus_client >= 0.22 names it CONTENT_TYPE_PLAIN_0_0_4; 0.20 lacks the name).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

OTHER_TABLE: Final = "_other"
# Refusal reasons come from code, not from clients, but are free-form: bound them anyway.
MAX_REFUSED_REASONS: Final = 20

# (metric name, CacheStats field, help) for the counters and gauges read from the stats callback at scrape time.
_CACHE_COUNTERS: Final = (
    ("cacheproxy_cache_hits", "hits", "Cache lookups that found a live entry."),
    ("cacheproxy_cache_misses", "misses", "Cache lookups that found no live entry."),
    ("cacheproxy_cache_evictions", "evictions", "Entries evicted to stay within the byte budget."),
    ("cacheproxy_cache_expirations", "expirations", "Entries removed because their TTL ran out."),
    ("cacheproxy_cache_invalidations", "invalidations", "Entries removed by invalidation."),
    ("cacheproxy_cache_sets", "sets", "Entries stored."),
    ("cacheproxy_cache_rejected", "rejected", "Stores refused: too big, ttl <= 0, or raced an invalidation."),
)
_CACHE_GAUGES: Final = (
    ("cacheproxy_cache_entries", "entries", "Entries in the cache now."),
    ("cacheproxy_cache_bytes", "bytes", "Bytes accounted to the cache's entries now."),
    ("cacheproxy_cache_max_bytes", "max_bytes", "The cache's byte budget."),
)


class _Histogram:
    """Non-cumulative bucket counts (the last one is +Inf) and the sum of observations."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0


class Metrics:
    """Every metric of one proxy, in a private registry. The update methods are cheap and never allocate."""

    def __init__(
        self,
        *,
        stats: Callable[[], CacheStats] | None = None,
        max_tables: int = 100,
        clock: Callable[[], float] = time.monotonic,
        version: str = cacheproxy.__version__,
    ) -> None:
        if max_tables < 0:
            raise ValueError(f"max_tables must be >= 0, got {max_tables}")
        self._stats = stats
        self._max_tables = max_tables
        self._clock = clock
        self._started = clock()
        self._version = version
        self._clients = 0
        self._clients_total = 0
        self._refused: dict[str, int] = {}
        self._upstreams = 0
        # kind -> outcome -> count; aliases map to the same inner dict, so a query() is two lookups and a store.
        canonical = {kind: dict.fromkeys(QUERY_OUTCOMES, 0) for kind in QUERY_KINDS}
        self._queries = canonical
        self._queries_by_kind = dict(canonical)
        for alias, kind in _KIND_ALIASES.items():
            self._queries_by_kind[alias] = canonical[kind]
        self._durations = {outcome: _Histogram() for outcome in QUERY_OUTCOMES}
        self._read_row = canonical["read"]  # for hit(): the hot path's counters, looked up once
        self._hit_buckets = self._durations["hit"].counts
        # table -> [hits, misses]; at most max_tables keys, the rest is counted in _other_table.
        self._tables: dict[str, list[int]] = {}
        self._other_table = [0, 0]
        self._db_invalidations = dict.fromkeys(INVALIDATION_REASONS, 0)
        self._catalog_ok = 0
        self._catalog_error = 0
        # Invalidation across proxies (feeds/bus.py, feeds/replication.py) and write-through refreshes.
        self._bus_messages = dict.fromkeys(BUS_DIRECTIONS, 0)
        self._bus_disconnects = 0
        self._stale_served = 0
        self._blind: set[str] = set()
        self._refreshes = dict.fromkeys(REFRESH_RESULTS, 0)
        self._replication_lag: Callable[[], float] | None = None
        # Snapshots (cacheproxy/snapshot): the last write's duration and size, entry counts, last success.
        self._snapshot_seconds = 0.0
        self._snapshot_bytes = 0
        self._snapshot_written = 0
        self._snapshot_loaded = 0
        self._snapshot_dropped: dict[str, int] = {}
        self._snapshot_failures = 0
        self._snapshot_last_success = 0.0
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def set_stats_source(self, stats: Callable[[], CacheStats]) -> None:
        """Read the cache's counters from `stats` from now on (called at each scrape and snapshot)."""
        self._stats = stats

    # -- connections -------------------------------------------------------------------------------------------

    def client_opened(self) -> None:
        self._clients += 1
        self._clients_total += 1

    def client_closed(self) -> None:
        self._clients -= 1

    def client_refused(self, reason: str) -> None:
        """A client turned away (too many clients, shutting down...). Beyond 20 distinct reasons, "other"."""
        refused = self._refused
        if reason in refused:
            refused[reason] += 1
        elif len(refused) < MAX_REFUSED_REASONS:
            refused[reason] = 1
        else:
            refused["other"] = refused.get("other", 0) + 1

    def upstream_opened(self) -> None:
        self._upstreams += 1

    def upstream_closed(self) -> None:
        self._upstreams -= 1

    # -- queries -----------------------------------------------------------------------------------------------

    def query(self, kind: str, outcome: str, seconds: float) -> None:
        """One request cycle: `kind` in QUERY_KINDS (or "transaction"; anything else counts as "other"), `outcome`
        in QUERY_OUTCOMES (anything else is a bug: ValueError), `seconds` from request to reply."""
        histogram = self._durations.get(outcome)
        if histogram is None:
            raise ValueError(f"unknown query outcome {outcome!r}, expected one of {QUERY_OUTCOMES}")
        row = self._queries_by_kind.get(kind)
        if row is None:
            row = self._queries["other"]
        row[outcome] += 1
        histogram.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        histogram.sum += seconds

    def hit(self) -> None:
        """query("read", "hit", 0.0), for the hot path: a hit is not timed, so it lands in the first bucket."""
        self._read_row["hit"] += 1
        self._hit_buckets[0] += 1

    def table_hit(self, table: str) -> None:
        cell = self._tables.get(table)
        if cell is None:
            cell = self._admit_table(table)
        cell[0] += 1

    def table_miss(self, table: str) -> None:
        cell = self._tables.get(table)
        if cell is None:
            cell = self._admit_table(table)
        cell[1] += 1

    def _admit_table(self, table: str) -> list[int]:
        # Overflowing tables are not remembered (that would be unbounded too): each of their calls comes here.
        if len(self._tables) >= self._max_tables or table == OTHER_TABLE:
            return self._other_table
        cell = self._tables[table] = [0, 0]
        return cell

    # -- invalidation and catalog ------------------------------------------------------------------------------

    def database_invalidated(self, reason: str) -> None:
        """A whole database's entries dropped; `reason` outside INVALIDATION_REASONS counts as "other"."""
        counts = self._db_invalidations
        if reason in counts:
            counts[reason] += 1
        else:
            counts["other"] += 1

    def catalog_loaded(self, ok: bool) -> None:
        if ok:
            self._catalog_ok += 1
        else:
            self._catalog_error += 1

    def bus_message(self, direction: str) -> None:
        """An invalidation published to, or received from, the other proxies (`direction` in BUS_DIRECTIONS)."""
        self._bus_messages[direction] += 1

    def database_blind(self, database: str, blind: bool) -> None:
        """`database` stops (or resumes) being served from the cache because its invalidations may be missed."""
        if blind:
            if database not in self._blind:
                self._bus_disconnects += 1
            self._blind.add(database)
        else:
            self._blind.discard(database)

    def stale_served(self) -> None:
        """A cached result served while the upstream could not be reached (stale-if-error)."""
        self._stale_served += 1

    def refreshed(self, result: str) -> None:
        """A write-through refresh ended (`result` in REFRESH_RESULTS)."""
        self._refreshes[result] += 1

    def set_replication_lag_source(self, lag: Callable[[], float] | None) -> None:
        """Read the replication stream's lag in bytes from `lag` at each scrape (None: replication is off)."""
        self._replication_lag = lag

    # -- snapshots --------------------------------------------------------------------------------------------

    def snapshot_written(self, seconds: float, size: int, entries: int) -> None:
        self._snapshot_seconds = seconds
        self._snapshot_bytes = size
        self._snapshot_written += entries
        self._snapshot_last_success = time.time()

    def snapshot_failed(self) -> None:
        self._snapshot_failures += 1

    def snapshot_loaded(self, entries: int, dropped: dict[str, int]) -> None:
        self._snapshot_loaded += entries
        for reason, count in dropped.items():
            self._snapshot_dropped[reason] = self._snapshot_dropped.get(reason, 0) + count

    # -- reading -----------------------------------------------------------------------------------------------

    def cache_stats(self) -> CacheStats:
        """The cache's stats now, or zeros when no source is set (cache disabled)."""
        return self._stats() if self._stats is not None else CacheStats()

    def uptime(self) -> float:
        return self._clock() - self._started

    def status_counts(self) -> dict[str, object]:
        """For the status page (observability/status.py): per outcome the (count, seconds) of request cycles, per
        table [hits, misses], the replication lag (None when off)."""
        return {
            "durations": {outcome: (sum(h.counts), h.sum) for outcome, h in self._durations.items()},
            "tables": {table: list(cell) for table, cell in self._tables.items()},
            "replication_lag": self._replication_lag() if self._replication_lag is not None else None,
        }

    def render(self) -> tuple[bytes, str]:
        """(body, content type) in the Prometheus text format 0.0.4."""
        return generate_latest(self.registry), CONTENT_TYPE

    def snapshot(self) -> dict[str, object]:
        """A JSON-able summary for /stats."""
        stats = self.cache_stats()
        lookups = stats.hits + stats.misses
        return {
            "version": self._version,
            "uptime_seconds": round(self.uptime(), 3),
            "cache": asdict(stats),
            "hit_ratio": stats.hits / lookups if lookups else None,
            "connections": {
                "clients": self._clients,
                "clients_total": self._clients_total,
                "clients_refused": dict(self._refused),
                "upstream": self._upstreams,
            },
            "queries": {kind: dict(outcomes) for kind, outcomes in self._queries.items()},
            "database_invalidations": dict(self._db_invalidations),
            "catalog_loads": {"ok": self._catalog_ok, "error": self._catalog_error},
            "invalidation_bus": {
                **self._bus_messages,
                "disconnects": self._bus_disconnects,
                "blind_databases": sorted(self._blind),
            },
            "write_through_refreshes": dict(self._refreshes),
        }


class _Collector:
    """Builds every metric family from a `Metrics`' counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield from _cache_families(m.cache_stats())
        yield from self._connection_families()
        yield from self._query_families()
        yield from self._table_families()
        yield _by_label(
            "cacheproxy_database_invalidations", "Whole-database invalidations, by reason.", "reason",
            m._db_invalidations,
        )  # fmt: skip
        yield _by_label(
            "cacheproxy_catalog_loads", "Catalog loads, by result.", "result",
            {"ok": m._catalog_ok, "error": m._catalog_error},
        )  # fmt: skip
        yield from _invalidation_families(m)
        yield from _snapshot_families(m)
        yield GaugeMetricFamily("cacheproxy_uptime_seconds", "Seconds since the proxy started.", value=m.uptime())
        info = GaugeMetricFamily(
            "cacheproxy_info",
            "The proxy's version, and whether its hot path runs compiled (mypyc) or pure Python; always 1.",
            labels=["version", "hot_path"],
        )
        info.add_metric([m._version, cacheproxy.MODE.name], 1)
        yield info

    def _connection_families(self) -> Iterator[Metric]:
        m = self._m
        yield GaugeMetricFamily("cacheproxy_client_connections", "Client connections open now.", value=m._clients)
        yield CounterMetricFamily(
            "cacheproxy_client_connections", "Client connections accepted.", value=m._clients_total
        )
        yield _by_label(
            "cacheproxy_client_connections_refused", "Client connections refused, by reason.", "reason", m._refused
        )
        yield GaugeMetricFamily("cacheproxy_upstream_connections", "Upstream connections open now.", value=m._upstreams)

    def _query_families(self) -> Iterator[Metric]:
        m = self._m
        queries = CounterMetricFamily(
            "cacheproxy_queries", "Request cycles, by statement kind and cache outcome.", labels=["kind", "outcome"]
        )
        for kind, outcomes in m._queries.items():
            for outcome, count in outcomes.items():
                queries.add_metric([kind, outcome], count)
        yield queries
        durations = HistogramMetricFamily(
            "cacheproxy_query_duration_seconds", "Time from request to reply, by cache outcome.", labels=["outcome"]
        )
        for outcome, histogram in m._durations.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for label, count in zip(_BUCKET_LABELS, histogram.counts, strict=True):
                cumulative += count
                buckets.append((label, cumulative))
            durations.add_metric([outcome], buckets, histogram.sum)
        yield durations

    def _table_families(self) -> Iterator[Metric]:
        m = self._m
        hits = CounterMetricFamily("cacheproxy_table_hits", "Cache hits by table.", labels=["table"])
        misses = CounterMetricFamily("cacheproxy_table_misses", "Cache misses by table.", labels=["table"])
        cells: Iterable[tuple[str, list[int]]] = m._tables.items()
        if m._other_table != [0, 0]:
            cells = [*cells, (OTHER_TABLE, m._other_table)]
        for table, (hit_count, miss_count) in cells:
            hits.add_metric([table], hit_count)
            misses.add_metric([table], miss_count)
        yield hits
        yield misses


def _by_label(name: str, doc: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter family with one sample per value of `label`."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


def _cache_families(stats: CacheStats) -> Iterator[Metric]:
    for name, field, doc in _CACHE_COUNTERS:
        yield CounterMetricFamily(name, doc, value=getattr(stats, field))
    for name, field, doc in _CACHE_GAUGES:
        yield GaugeMetricFamily(name, doc, value=getattr(stats, field))


def _invalidation_families(m: Metrics) -> Iterator[Metric]:
    yield _by_label(
        "cacheproxy_invalidation_messages", "Invalidations shared with other proxies, by direction.", "direction",
        m._bus_messages,
    )  # fmt: skip
    yield CounterMetricFamily(
        "cacheproxy_invalidation_disconnects",
        "Times a database's invalidation feed (LISTEN connection or replication stream) was lost.",
        value=m._bus_disconnects,
    )
    yield GaugeMetricFamily(
        "cacheproxy_invalidation_blind_databases",
        "Databases whose cached results are not served now: their invalidation feed is down.",
        value=len(m._blind),
    )
    yield CounterMetricFamily(
        "cacheproxy_stale_served",
        "Cached results served while the upstream could not be reached (stale_if_error).",
        value=m._stale_served,
    )
    yield _by_label("cacheproxy_write_through_refreshes", "Write-through refreshes, by result.", "result", m._refreshes)
    if m._replication_lag is not None:
        yield GaugeMetricFamily(
            "cacheproxy_replication_lag_bytes",
            "WAL bytes between the server's end of WAL and what the proxy has applied.",
            value=m._replication_lag(),
        )


def _snapshot_families(m: Metrics) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "cacheproxy_snapshot_duration_seconds", "Time the last snapshot took to write.", value=m._snapshot_seconds
    )
    yield GaugeMetricFamily("cacheproxy_snapshot_bytes", "Size of the last snapshot file.", value=m._snapshot_bytes)
    yield CounterMetricFamily(
        "cacheproxy_snapshot_entries_written", "Entries written to snapshots.", value=m._snapshot_written
    )
    yield CounterMetricFamily(
        "cacheproxy_snapshot_entries_loaded", "Entries loaded from a snapshot.", value=m._snapshot_loaded
    )
    yield _by_label(
        "cacheproxy_snapshot_entries_dropped", "Snapshot entries not loaded, by reason.", "reason", m._snapshot_dropped
    )
    yield CounterMetricFamily(
        "cacheproxy_snapshot_failures", "Snapshot writes that failed.", value=m._snapshot_failures
    )
    yield GaugeMetricFamily(
        "cacheproxy_snapshot_last_success_timestamp_seconds",
        "Unix time of the last successful snapshot (0: none yet).",
        value=m._snapshot_last_success,
    )
