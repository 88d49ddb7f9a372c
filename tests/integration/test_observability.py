"""The operator's view: /metrics moves with hits, misses, evictions and invalidations; /readyz follows the upstream;
/stats is JSON; the connection gauges follow the sessions."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from cacheproxy.demo.pgcluster import PgCluster
from tests.support.cachetest import create_items
from tests.support.proxy import ProxyThread


def _scrape(proxy: ProxyThread) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert proxy.app is not None and proxy.app.admin is not None
    body = urllib.request.urlopen(f"http://127.0.0.1:{proxy.app.admin.port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_the_traffic(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    create_items(pg, dbname)
    # Small shards: 8 entries of ~2 KiB overflow 16 KiB and must evict.
    proxy = start_proxy(admin={"listen": "127.0.0.1:0"}, cache={"max_memory": "16KiB", "shards": 1,
                                                                "max_entry_size": "8KiB"})  # fmt: skip
    before = _scrape(proxy)
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
        during = _scrape(proxy)
        assert _value(during, "cacheproxy_client_connections") == 1
        assert _value(during, "cacheproxy_upstream_connections") == 1
        for _ in range(3):
            conn.execute("SELECT name FROM items WHERE id = 1").fetchall()
        for i in range(2, 40):
            conn.execute(f"SELECT name, repeat('x', 1500) FROM items WHERE id = {i}").fetchall()
        conn.execute("UPDATE items SET name = 'changed' WHERE id = 1")
        conn.execute("CREATE INDEX ON items (name)")  # DDL: the whole database
    after = _scrape(proxy)
    delta = {name: _value(after, name) - _value(before, name) for name in (
        "cacheproxy_cache_hits_total", "cacheproxy_cache_misses_total", "cacheproxy_cache_evictions_total",
        "cacheproxy_cache_invalidations_total", "cacheproxy_client_connections_total")}  # fmt: skip
    assert delta["cacheproxy_cache_hits_total"] == 2
    assert delta["cacheproxy_cache_misses_total"] >= 39
    assert delta["cacheproxy_cache_evictions_total"] >= 1
    assert delta["cacheproxy_cache_invalidations_total"] >= 1
    assert delta["cacheproxy_client_connections_total"] == 1
    assert _value(after, "cacheproxy_client_connections") == 0
    assert _value(after, "cacheproxy_queries_total", kind="read", outcome="hit") == 2
    assert _value(after, "cacheproxy_queries_total", kind="write", outcome="bypass") == 1
    assert _value(after, "cacheproxy_queries_total", kind="ddl", outcome="bypass") == 1
    assert _value(after, "cacheproxy_table_hits_total", table="items") == 2
    assert _value(after, "cacheproxy_database_invalidations_total", reason="ddl") == 1
    assert _value(after, "cacheproxy_cache_bytes") <= _value(after, "cacheproxy_cache_max_bytes") == 16 * 1024


def test_health_ready_and_stats(pg: PgCluster, start_proxy: Callable[..., ProxyThread]) -> None:
    proxy = start_proxy(admin={"listen": "127.0.0.1:0"})
    assert proxy.app is not None and proxy.app.admin is not None
    base = f"http://127.0.0.1:{proxy.app.admin.port}"
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
    stats = json.loads(urllib.request.urlopen(base + "/stats", timeout=5).read())
    assert stats["cache"]["max_bytes"] == 256 * 1024 * 1024
    assert stats["connections"]["clients"] == 0
    assert stats["upstream"].endswith(f"127.0.0.1:{pg.port}/postgres")


def test_readyz_fails_when_the_upstream_is_down(pg: PgCluster, start_proxy: Callable[..., ProxyThread]) -> None:
    proxy = start_proxy(upstream=pg.url(port=1), admin={"listen": "127.0.0.1:0"})
    assert proxy.app is not None and proxy.app.admin is not None
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{proxy.app.admin.port}/readyz", timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 503
        assert b"could not connect" in exc.read()
    else:
        raise AssertionError("/readyz answered 200 with the upstream down")
