"""Unit tests for cacheproxy.observability.metrics: counters, scrape-time cache stats, bounded labels. No sockets."""

from __future__ import annotations

import math

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

import cacheproxy
from cacheproxy.cache.engine import CacheStats
from cacheproxy.observability.metrics import DURATION_BUCKETS, Metrics

EVERY_METRIC = (
    "cacheproxy_cache_hits_total",
    "cacheproxy_cache_misses_total",
    "cacheproxy_cache_evictions_total",
    "cacheproxy_cache_expirations_total",
    "cacheproxy_cache_invalidations_total",
    "cacheproxy_cache_sets_total",
    "cacheproxy_cache_rejected_total",
    "cacheproxy_cache_entries",
    "cacheproxy_cache_bytes",
    "cacheproxy_cache_max_bytes",
    "cacheproxy_client_connections",
    "cacheproxy_upstream_connections",
    "cacheproxy_client_connections_total",
    "cacheproxy_client_connections_refused_total",
    "cacheproxy_queries_total",
    "cacheproxy_query_duration_seconds_bucket",
    "cacheproxy_query_duration_seconds_sum",
    "cacheproxy_query_duration_seconds_count",
    "cacheproxy_table_hits_total",
    "cacheproxy_table_misses_total",
    "cacheproxy_database_invalidations_total",
    "cacheproxy_catalog_loads_total",
    "cacheproxy_uptime_seconds",
    "cacheproxy_info",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    """Render, parse back with prometheus_client's own parser, and index samples by (name, labels)."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def with_name(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_render_has_every_metric_and_parses() -> None:
    m = Metrics(stats=lambda: CacheStats(hits=1))
    m.client_refused("too_many_clients")
    m.table_hit("public.users")
    names = {name for name, _ in scrape(m)}
    missing = [name for name in EVERY_METRIC if name not in names]
    assert not missing


def test_cache_stats_are_read_at_scrape_time() -> None:
    current = CacheStats(
        hits=10, misses=4, sets=3, evictions=2, expirations=1, invalidations=5, entries=7, bytes=900, max_bytes=4096
    )
    calls = 0

    def source() -> CacheStats:
        nonlocal calls
        calls += 1
        return current

    m = Metrics(stats=source)
    assert calls == 0  # registering must not call the source
    s = scrape(m)
    assert calls == 1
    assert value(s, "cacheproxy_cache_hits_total") == 10
    assert value(s, "cacheproxy_cache_misses_total") == 4
    assert value(s, "cacheproxy_cache_sets_total") == 3
    assert value(s, "cacheproxy_cache_evictions_total") == 2
    assert value(s, "cacheproxy_cache_expirations_total") == 1
    assert value(s, "cacheproxy_cache_invalidations_total") == 5
    assert value(s, "cacheproxy_cache_rejected_total") == 0
    assert value(s, "cacheproxy_cache_entries") == 7
    assert value(s, "cacheproxy_cache_bytes") == 900
    assert value(s, "cacheproxy_cache_max_bytes") == 4096
    # Not accumulated: a second scrape shows the source's current values, not a sum.
    current = CacheStats(hits=11, rejected=2)
    s = scrape(m)
    assert value(s, "cacheproxy_cache_hits_total") == 11
    assert value(s, "cacheproxy_cache_rejected_total") == 2
    assert value(s, "cacheproxy_cache_entries") == 0


def test_no_stats_source_gives_zeros_until_one_is_set() -> None:
    m = Metrics()
    assert value(scrape(m), "cacheproxy_cache_hits_total") == 0
    m.set_stats_source(lambda: CacheStats(hits=3, max_bytes=10))
    s = scrape(m)
    assert value(s, "cacheproxy_cache_hits_total") == 3
    assert value(s, "cacheproxy_cache_max_bytes") == 10


def test_connections() -> None:
    m = Metrics()
    for _ in range(3):
        m.client_opened()
    m.client_closed()
    m.upstream_opened()
    m.upstream_opened()
    m.upstream_closed()
    m.client_refused("too_many_clients")
    m.client_refused("too_many_clients")
    m.client_refused("shutting_down")
    s = scrape(m)
    assert value(s, "cacheproxy_client_connections") == 2
    assert value(s, "cacheproxy_client_connections_total") == 3
    assert value(s, "cacheproxy_upstream_connections") == 1
    assert value(s, "cacheproxy_client_connections_refused_total", reason="too_many_clients") == 2
    assert value(s, "cacheproxy_client_connections_refused_total", reason="shutting_down") == 1


def test_refused_reasons_are_bounded() -> None:
    m = Metrics()
    for i in range(50):
        m.client_refused(f"reason{i}")
    refused = with_name(scrape(m), "cacheproxy_client_connections_refused_total")
    assert len(refused) == 21
    assert refused[frozenset({("reason", "other")})] == 30


def test_queries_and_durations() -> None:
    m = Metrics()
    m.query("read", "hit", 0.00001)
    m.query("read", "hit", 0.00003)
    m.query("read", "miss", 0.2)
    m.query("write", "bypass", 20.0)
    m.query("transaction", "bypass", 0.001)  # analysis.model.Kind.TRANSACTION.value
    m.query("no-such-kind", "bypass", 0.001)
    s = scrape(m)
    assert value(s, "cacheproxy_queries_total", kind="read", outcome="hit") == 2
    assert value(s, "cacheproxy_queries_total", kind="read", outcome="miss") == 1
    assert value(s, "cacheproxy_queries_total", kind="write", outcome="bypass") == 1
    assert value(s, "cacheproxy_queries_total", kind="tx", outcome="bypass") == 1
    assert value(s, "cacheproxy_queries_total", kind="other", outcome="bypass") == 1
    assert value(s, "cacheproxy_queries_total", kind="ddl", outcome="hit") == 0  # pre-bound: every series exists
    assert len(with_name(s, "cacheproxy_queries_total")) == 6 * 3

    bucket = "cacheproxy_query_duration_seconds_bucket"
    assert value(s, bucket, outcome="hit", le="2e-05") == 1
    assert value(s, bucket, outcome="hit", le="5e-05") == 2
    assert value(s, bucket, outcome="hit", le="+Inf") == 2
    assert value(s, bucket, outcome="miss", le="0.1") == 0
    assert value(s, bucket, outcome="miss", le="0.25") == 1
    assert value(s, bucket, outcome="bypass", le="10.0") == 2
    assert value(s, bucket, outcome="bypass", le="+Inf") == 3
    assert value(s, "cacheproxy_query_duration_seconds_count", outcome="bypass") == 3
    assert value(s, "cacheproxy_query_duration_seconds_sum", outcome="hit") == pytest.approx(0.00004)
    assert len(with_name(s, bucket)) == 3 * (len(DURATION_BUCKETS) + 1)


def test_bucket_boundary_is_inclusive() -> None:
    m = Metrics()
    m.query("read", "hit", 0.001)
    assert value(scrape(m), "cacheproxy_query_duration_seconds_bucket", outcome="hit", le="0.001") == 1


def test_unknown_outcome_is_a_bug() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="outcome"):
        m.query("read", "maybe", 0.1)
    assert value(scrape(m), "cacheproxy_queries_total", kind="read", outcome="hit") == 0


def test_table_counters() -> None:
    m = Metrics()
    m.table_hit("public.users")
    m.table_hit("public.users")
    m.table_miss("public.users")
    m.table_miss("public.orders")
    s = scrape(m)
    assert value(s, "cacheproxy_table_hits_total", table="public.users") == 2
    assert value(s, "cacheproxy_table_misses_total", table="public.users") == 1
    assert value(s, "cacheproxy_table_hits_total", table="public.orders") == 0
    assert value(s, "cacheproxy_table_misses_total", table="public.orders") == 1
    assert ("cacheproxy_table_hits_total", frozenset({("table", "_other")})) not in s


def test_table_cardinality_is_bounded() -> None:
    m = Metrics(max_tables=100)
    for i in range(100):
        m.table_hit(f"t{i}")
    m.table_hit("t100")  # the 101st
    m.table_miss("t101")
    m.table_miss("t101")
    m.table_hit("t0")  # an admitted table keeps its own series
    m.table_hit("_other")  # a table really named _other cannot make a duplicate series
    s = scrape(m)
    hits = with_name(s, "cacheproxy_table_hits_total")
    assert len(hits) == 101
    assert hits[frozenset({("table", "_other")})] == 2
    assert hits[frozenset({("table", "t0")})] == 2
    assert value(s, "cacheproxy_table_misses_total", table="_other") == 2
    assert ("cacheproxy_table_hits_total", frozenset({("table", "t100")})) not in s


def test_database_invalidation_reasons_are_mapped() -> None:
    m = Metrics()
    for reason in ("ddl", "ddl", "unknown_effects", "triggers", "function_call", "other", "GRANT", "weird"):
        m.database_invalidated(reason)
    s = scrape(m)
    by_reason = {
        dict(labels)["reason"]: v for labels, v in with_name(s, "cacheproxy_database_invalidations_total").items()
    }
    assert by_reason == {"ddl": 2, "unknown_effects": 1, "triggers": 1, "function_call": 1, "other": 3}


def test_catalog_loads_uptime_and_info() -> None:
    clock = FakeClock(1000.0)
    m = Metrics(clock=clock, version="9.9.9")
    m.catalog_loaded(True)
    m.catalog_loaded(True)
    m.catalog_loaded(False)
    clock.now = 1042.5
    s = scrape(m)
    assert value(s, "cacheproxy_catalog_loads_total", result="ok") == 2
    assert value(s, "cacheproxy_catalog_loads_total", result="error") == 1
    assert value(s, "cacheproxy_uptime_seconds") == 42.5
    assert value(s, "cacheproxy_info", version="9.9.9", hot_path=cacheproxy.MODE.name) == 1


def test_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.client_opened()
    assert value(scrape(a), "cacheproxy_client_connections") == 1
    assert value(scrape(b), "cacheproxy_client_connections") == 0
    assert a.registry is not b.registry


def test_snapshot_is_json() -> None:
    clock = FakeClock(0.0)
    m = Metrics(stats=lambda: CacheStats(hits=3, misses=1, entries=2, max_bytes=100), clock=clock)
    m.client_opened()
    m.upstream_opened()
    m.client_refused("too_many_clients")
    m.query("read", "hit", 0.0001)
    m.database_invalidated("ddl")
    m.catalog_loaded(False)
    clock.now = 5.0
    snap = orjson.loads(orjson.dumps(m.snapshot()))
    assert snap["cache"]["hits"] == 3
    assert snap["cache"]["max_bytes"] == 100
    assert snap["hit_ratio"] == 0.75
    assert snap["uptime_seconds"] == 5.0
    assert snap["connections"] == {
        "clients": 1,
        "clients_total": 1,
        "clients_refused": {"too_many_clients": 1},
        "upstream": 1,
    }
    assert snap["queries"]["read"]["hit"] == 1
    assert snap["queries"]["tx"] == {"hit": 0, "miss": 0, "bypass": 0}
    assert snap["database_invalidations"]["ddl"] == 1
    assert snap["catalog_loads"] == {"ok": 0, "error": 1}


def test_snapshot_without_lookups_has_no_ratio() -> None:
    snap = Metrics().snapshot()
    assert snap["hit_ratio"] is None
    orjson.dumps(snap)


def test_values_are_finite() -> None:
    m = Metrics(stats=lambda: CacheStats(hits=1))
    assert all(math.isfinite(v) for v in scrape(m).values())
