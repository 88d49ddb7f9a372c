"""`cacheproxy demo`: a throwaway PostgreSQL, the proxy in front of it (as a real subprocess), and what a cache is for.

An application talks to PostgreSQL through cacheproxy by changing nothing but its URL. The demo runs an expensive
query (an aggregate over a join of a few hundred thousand rows) straight to PostgreSQL and through the proxy, with
the database's CPU during both; then a write through the proxy that invalidates it, and the fresh read after it; a
hot set of point lookups; a table written as often as it is read; and last, the proxy's own advice (its rule
advisor) for this workload.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from cacheproxy.demo.cpu import tree_cpu
from cacheproxy.demo.pgcluster import PgCluster, free_port
from cacheproxy.demo.proxyprocess import start_proxy_process

_DEFAULT_CONFIG = "configs/cacheproxy.yaml"
_PRODUCTS = 2_000
_SALES = 200_000
_RUNS = 10  # runs of the expensive query per target
_HOT = 100  # the point lookups read a hot set of this many products, as a real application's reads tend to
_CHURN = 40  # writes (and as many reads) of the write-heavy table
_EXPENSIVE = (
    "SELECT p.category, count(*) AS sales, sum(s.quantity * p.price) AS revenue "
    "FROM sales s JOIN products p ON p.id = s.product_id GROUP BY p.category ORDER BY p.category"
)
_WRITE = "UPDATE products SET price = price * 2 WHERE category = 'c3'"
_LOOKUP = "SELECT id, name, price FROM products WHERE id = $1"


def run_demo(queries: int = 2000, config: str | None = None) -> int:
    print("cacheproxy demo: starting a throwaway PostgreSQL ...", flush=True)
    cluster = PgCluster.start()
    proxy: subprocess.Popen[bytes] | None = None
    try:
        port, admin_port = free_port(), free_port()
        if config is None and Path(_DEFAULT_CONFIG).is_file():
            config = _DEFAULT_CONFIG
        proxy = _start_proxy(cluster, port, admin_port, config)
        print(f"  postgres   127.0.0.1:{cluster.port} (data in {cluster.base_dir})")
        print(f"  cacheproxy 127.0.0.1:{port}  (DATABASE_URL={cluster.url(port=port)}), rules from {config or '-'}")
        status = asyncio.run(_workload(cluster, port, proxy.pid, queries))
        _report_proxy(admin_port)
        return status
    finally:
        if proxy is not None:
            _stop_proxy(proxy)
        cluster.cleanup()


def _start_proxy(cluster: PgCluster, port: int, admin_port: int, config: str | None) -> subprocess.Popen[bytes]:
    args = ["--admin-listen", f"127.0.0.1:{admin_port}", "--upstream", cluster.url(), "--log-level", "warning"]
    if config:
        args += ["--config", config]
    return start_proxy_process(args, port)


def _stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class _Runs:
    """One target's runs of the expensive query: latencies, rows, CPU seconds of PostgreSQL and of the proxy."""

    seconds: list[float]
    rows: list[asyncpg.Record]
    db_cpu: float | None
    proxy_cpu: float | None
    upstream: int  # runs that reached PostgreSQL (pg_stat_statements)


async def _workload(cluster: PgCluster, port: int, proxy_pid: int, queries: int) -> int:
    direct = await asyncpg.connect(cluster.url())
    via = await asyncpg.connect(cluster.url(port=port))
    try:
        print(f"loading {_SALES:,} sales of {_PRODUCTS:,} products through the proxy ...", flush=True)
        await _load(via, direct)
        print(f"\n1. An expensive query (revenue per category: a join of {_SALES:,} sales with {_PRODUCTS:,} products,"
              " grouped):")  # fmt: skip
        print(f"   {_EXPENSIVE}")
        runs = {"direct": await _expensive(cluster, direct, direct, proxy_pid)}
        runs["through cacheproxy"] = await _expensive(cluster, direct, via, proxy_pid)
        same = _report_expensive(runs)
        fresh = await _write_then_read(direct, via, runs["direct"].rows)
        mismatches = await _lookups(cluster, direct, via, queries)
        await _churn(via)
    finally:
        await direct.close()
        await via.close()
    return 0 if same and fresh and not mismatches else 1


async def _load(via: asyncpg.Connection, direct: asyncpg.Connection) -> None:
    await via.execute(
        "CREATE TABLE products (id int PRIMARY KEY, name text, category text, price numeric(10,2));"
        "CREATE TABLE sales (id int, product_id int, quantity int, sold_at date);"
        "CREATE TABLE events (id serial PRIMARY KEY, kind text, at timestamptz DEFAULT now());"
        f"INSERT INTO products SELECT g, 'product ' || g, 'c' || g % 8, 1 + g % 50 FROM generate_series(1, {_PRODUCTS})"
        " g;"
        f"INSERT INTO sales SELECT g, 1 + g::bigint * 7919 % {_PRODUCTS}, 1 + g % 5, date '2026-01-01' + g % 300 "
        f"FROM generate_series(1, {_SALES}) g"
    )
    # Now rather than when autovacuum would (during a measurement): visibility map, hint bits, statistics.
    await direct.execute("VACUUM ANALYZE products, sales")


async def _expensive(cluster: PgCluster, direct: asyncpg.Connection, conn: asyncpg.Connection, proxy_pid: int) -> _Runs:
    await direct.execute("SELECT pg_stat_statements_reset()")
    db_before, proxy_before = tree_cpu(cluster.pid), tree_cpu(proxy_pid)
    seconds: list[float] = []
    rows: list[asyncpg.Record] = []
    for _ in range(_RUNS):
        started = time.perf_counter()
        rows = await conn.fetch(_EXPENSIVE)
        seconds.append(time.perf_counter() - started)
    db_after, proxy_after = tree_cpu(cluster.pid), tree_cpu(proxy_pid)
    upstream = await direct.fetchval(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query = $1", _EXPENSIVE
    )
    return _Runs(seconds, rows, _minus(db_after, db_before), _minus(proxy_after, proxy_before), int(upstream))


def _report_expensive(runs: dict[str, _Runs]) -> bool:
    print(f"   {'':<20}{'runs':>6}{'first ms':>10}{'median ms':>11}{'reached PostgreSQL':>20}{'PostgreSQL CPU s':>18}"
          f"{'proxy CPU s':>13}")  # fmt: skip
    for name, r in runs.items():
        proxy_cpu = _cpu(r.proxy_cpu) if name != "direct" else "-"
        print(f"   {name:<20}{len(r.seconds):>6}{r.seconds[0] * 1e3:>10.2f}{statistics.median(r.seconds) * 1e3:>11.3f}"
              f"{r.upstream:>20}{_cpu(r.db_cpu):>18}{proxy_cpu:>13}")  # fmt: skip
    direct, cached = runs["direct"], runs["through cacheproxy"]
    speedup = statistics.median(direct.seconds) / statistics.median(cached.seconds)
    same = [tuple(r) for r in direct.rows] == [tuple(r) for r in cached.rows]
    print(f"   through the proxy: {cached.upstream} of {len(cached.seconds)} runs reached PostgreSQL (the first: a "
          f"miss); median {speedup:.0f}x faster than direct")  # fmt: skip
    print(f"   rows identical to direct: {'yes' if same else 'NO'} ({len(cached.rows)} rows)")
    return same


async def _write_then_read(direct: asyncpg.Connection, via: asyncpg.Connection, before: list[asyncpg.Record]) -> bool:
    print("\n2. A write through the proxy invalidates what it changes:")
    print(f"   {_WRITE}")
    await via.execute(_WRITE)
    started = time.perf_counter()
    after = await via.fetch(_EXPENSIVE)
    miss = time.perf_counter() - started
    started = time.perf_counter()
    await via.fetch(_EXPENSIVE)
    hit = time.perf_counter() - started
    truth = await direct.fetch(_EXPENSIVE)
    fresh = [tuple(r) for r in after] == [tuple(r) for r in truth]
    old = next(r["revenue"] for r in before if r["category"] == "c3")
    new = next(r["revenue"] for r in after if r["category"] == "c3")
    print(f"   next read through the proxy: {miss * 1e3:.2f} ms (a miss, run by PostgreSQL): c3 revenue {old} -> "
          f"{new}; fresh (same as direct): {'yes' if fresh else 'NO'}")  # fmt: skip
    print(f"   the read after it: {hit * 1e3:.3f} ms (a hit again)")
    return fresh and old != new


async def _lookups(cluster: PgCluster, direct: asyncpg.Connection, via: asyncpg.Connection, queries: int) -> int:
    keys = [random.randint(1, _HOT) for _ in range(queries)]
    await direct.execute("SELECT pg_stat_statements_reset()")
    statement = await via.prepare(_LOOKUP)
    for key in keys:
        await statement.fetchrow(key)
    upstream = int(await direct.fetchval(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query = $1", _LOOKUP))  # fmt: skip
    mismatches = 0
    for key in keys[:200]:
        if await direct.fetchrow(_LOOKUP, key) != await via.fetchrow(_LOOKUP, key):
            mismatches += 1
    print(f"\n3. Point lookups: {queries} queries over {_HOT} hot products, {upstream} reached PostgreSQL "
          f"(pg_stat_statements): hit rate {1 - upstream / queries:.0%}; answers compared with direct: 200, "
          f"mismatches: {mismatches}")  # fmt: skip
    return mismatches


async def _churn(via: asyncpg.Connection) -> None:
    for i in range(_CHURN):
        await via.execute(f"INSERT INTO events (kind) VALUES ('{'ab'[i % 2]}')")
        await via.fetchval("SELECT count(*) FROM events WHERE kind = 'a'")
    print(f"\n4. A table written as often as it is read: {_CHURN} inserts into events, each followed by a count.")


def _report_proxy(admin_port: int) -> None:
    """What the proxy itself counted and advises, from its admin endpoint (/stats, /advice)."""
    base = f"http://127.0.0.1:{admin_port}"
    try:
        stats = _get_json(base + "/stats")
        advice = _get_json(base + "/advice")
    except (OSError, ValueError) as exc:
        print(f"(could not read the proxy's admin endpoint: {exc})")
        return
    cache = stats.get("cache", {})
    ratio = stats.get("hit_ratio")
    shown = f"{ratio:.1%}" if isinstance(ratio, float) else "n/a"
    print(f"\nthe proxy's own count: {cache.get('hits')} hits, {cache.get('misses')} misses (hit ratio {shown}), "
          f"{cache.get('entries')} entries, {cache.get('bytes')} bytes")  # fmt: skip
    print("\n5. The proxy's advice for this workload (CACHEPROXY SHOW ADVICE, or GET /advice):")
    for s in advice.get("statements", [])[:4]:
        print(f"   {s['would_save_s']:8.3f} s saved  {s['calls']:>5} runs  {s['mean_ms']:8.3f} ms  {s['text'][:70]}")
        print(f"   {'':>15}{s['advice']}")
    for t in advice.get("tables", []):
        print(f"   table {t['table']}: {t['reads']} reads, {t['writes']} writes: {t['advice']}")
    print("   Rules to paste into the configuration (`cacheproxy check-config` accepts them):")
    print("   " + advice.get("rules_yaml", "").rstrip("\n").replace("\n", "\n   "))
    print(f"\nWhile it runs, a proxy shows this at {base}/metrics (Prometheus), {base}/stats, {base}/advice and")
    print(
        f"{base}/readyz, and to admin.users over SQL: CACHEPROXY SHOW STATS | SHOW CACHES | SHOW ADVICE | EXPLAIN <q>"
    )
    print("Before deploying it: `cacheproxy advise --upstream postgres://...` reads the same from pg_stat_statements.")
    print(f"Next: `cacheproxy check-config --config {_DEFAULT_CONFIG}`, the rules in configs/, README.md.")


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        found = json.loads(reply.read())
    if not isinstance(found, dict):
        raise ValueError(f"{url}: not a JSON object")
    return found


def _minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _cpu(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f}"
