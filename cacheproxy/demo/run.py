"""`cacheproxy demo`: a throwaway PostgreSQL, the proxy in front of it (as a real subprocess), a short workload.

It shows an application talking to PostgreSQL through cacheproxy by changing nothing but its URL, and compares the
answers and the latency with the same queries sent straight to PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg

from cacheproxy.demo.pgcluster import PgCluster, free_port
from cacheproxy.demo.proxyprocess import start_proxy_process

_DEFAULT_CONFIG = "configs/cacheproxy.yaml"
_ROWS = 10_000
_HOT = 500  # the workload reads a hot set of this many rows, as a real application's reads tend to
_QUERY = "SELECT id, name, price, tags FROM items WHERE id = $1"


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
        status = asyncio.run(_workload(cluster, port, queries))
        _report_proxy_stats(admin_port)
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


async def _workload(cluster: PgCluster, port: int, queries: int) -> int:
    direct = await asyncpg.connect(cluster.url())
    via = await asyncpg.connect(cluster.url(port=port))
    try:
        print(f"loading {_ROWS} sample rows through the proxy ...", flush=True)
        await via.execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[]);"
            f"INSERT INTO items SELECT g, 'item ' || g, g * 1.25, ARRAY['t' || g % 7, 'x'] "
            f"FROM generate_series(1, {_ROWS}) g"
        )
        keys = [random.randint(1, _HOT) for _ in range(queries)]
        results: dict[str, list[float]] = {"direct": await _timed("direct", direct, keys)}
        await direct.execute("SELECT pg_stat_statements_reset()")
        results["cacheproxy"] = await _timed("cacheproxy", via, keys)
        upstream = await direct.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query = $1", _QUERY
        )
        mismatches = 0
        for key in keys[:200]:
            if await direct.fetchrow(_QUERY, key) != await via.fetchrow(_QUERY, key):
                mismatches += 1
    finally:
        await direct.close()
        await via.close()
    _report(results, mismatches, int(upstream))
    return 1 if mismatches else 0


async def _timed(name: str, conn: asyncpg.Connection, keys: list[int]) -> list[float]:
    statement = await conn.prepare(_QUERY)
    latencies = []
    step = max(1, len(keys) // 40)
    interactive = sys.stdout.isatty()
    for i, key in enumerate(keys, 1):
        started = time.perf_counter()
        await statement.fetchrow(key)
        latencies.append(time.perf_counter() - started)
        if interactive and (i % step == 0 or i == len(keys)):
            done = i * 40 // len(keys)
            print(f"\r  {name:<11}[{'#' * done}{'.' * (40 - done)}] {i}/{len(keys)}", end="", flush=True)
    print(f"\r  {name:<11}[{'#' * 40}] {len(keys)}/{len(keys)}")
    return latencies


def _report_proxy_stats(admin_port: int) -> None:
    """What the proxy itself counted, from its admin endpoint (/stats), and where to look next."""
    base = f"http://127.0.0.1:{admin_port}"
    try:
        with urllib.request.urlopen(base + "/stats", timeout=5) as reply:
            stats = json.loads(reply.read())
    except (OSError, ValueError) as exc:
        print(f"(could not read the proxy's /stats: {exc})")
        return
    cache = stats.get("cache", {})
    ratio = stats.get("hit_ratio")
    shown = f"{ratio:.1%}" if isinstance(ratio, float) else "n/a"
    print(f"the proxy's own count: {cache.get('hits')} hits, {cache.get('misses')} misses (hit ratio {shown}), "
          f"{cache.get('entries')} entries, {cache.get('bytes')} bytes")  # fmt: skip
    print(f"While it runs, a proxy shows this at {base}/metrics (Prometheus), {base}/stats and {base}/readyz,")
    print("and to admin.users over SQL: CACHEPROXY SHOW STATS | SHOW CACHES | EXPLAIN <query>.")
    print(f"Next: `cacheproxy check-config --config {_DEFAULT_CONFIG}`, the rules in configs/, README.md.")


def _report(results: dict[str, list[float]], mismatches: int, upstream: int) -> None:
    print()
    print(f"{'target':<12}{'queries':>9}{'p50 ms':>10}{'p99 ms':>10}{'total s':>10}")
    for name, lat in results.items():
        p99 = statistics.quantiles(lat, n=100)[98]
        print(f"{name:<12}{len(lat):>9}{statistics.median(lat) * 1e3:>10.3f}{p99 * 1e3:>10.3f}{sum(lat):>10.2f}")
    ratio = statistics.median(results["cacheproxy"]) / statistics.median(results["direct"])
    sent = len(results["cacheproxy"])
    print(f"\nthrough the proxy: {sent} queries over {_HOT} hot rows, {upstream} reached PostgreSQL")
    print(f"(pg_stat_statements): hit rate {1 - upstream / sent:.0%}")
    print(
        f"median latency through the proxy: {ratio:.2f}x direct; "
        f"answers compared with direct: 200, mismatches: {mismatches}"
    )
