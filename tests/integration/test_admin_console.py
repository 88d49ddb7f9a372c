"""The admin console: CACHEPROXY commands as SQL, for admin.users only, answered as ordinary result sets."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from cacheproxy.config import build_config
from tests.support.cachetest import create_items, new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config


@pytest.fixture
def admin_proxy(pg: PgCluster, tmp_path: Path) -> Iterator[tuple[ProxyThread, Path]]:
    """A proxy whose configuration lives in a file, so that RELOAD can re-read it."""
    path = tmp_path / "cacheproxy.yaml"
    data = proxy_config(pg.url(), admin={"users": ["postgres"]})
    path.write_text(yaml.safe_dump(data))
    running = ProxyThread(build_config(data, source=str(path)), lambda: build_config(yaml.safe_load(path.read_text())))
    running.start()
    yield running, path
    running.stop()


def _rows(conn: psycopg.Connection[Any], sql: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in conn.execute(sql).fetchall()}


def test_non_admins_are_refused(pg: PgCluster, dbname: str, admin_proxy: tuple[ProxyThread, Path]) -> None:
    proxy, _ = admin_proxy
    dsn = pg.dsn(user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD, dbname=dbname, port=proxy.port)
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CACHEPROXY SHOW STATS")
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on


def test_stats_caches_explain_invalidate_flush(
    pg: PgCluster, dbname: str, admin_proxy: tuple[ProxyThread, Path]
) -> None:
    proxy, _ = admin_proxy
    create_items(pg, dbname)
    marker = new_marker()
    read = f"SELECT name AS {marker} FROM items WHERE id = 3"
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
        for _ in range(3):
            conn.execute(read).fetchall()
        stats = _rows(conn, "CACHEPROXY SHOW STATS")
        assert int(stats["hits"]) >= 2 and int(stats["entries"]) >= 1
        caches = conn.execute("cacheproxy show caches 5").fetchall()
        assert any(marker in row[0] and row[1] == "items" and int(row[2]) >= 2 for row in caches)
        explained = _rows(conn, f"CACHEPROXY EXPLAIN {read}")
        assert explained["cacheable"] == "yes" and explained["depends_on"] == "items"
        assert explained["rule"] == "cache.default_ttl"
        volatile = _rows(conn, "CACHEPROXY EXPLAIN SELECT now()")
        assert volatile["cacheable"] == "no" and "now" in volatile["reason"]
        write = _rows(conn, "CACHEPROXY EXPLAIN UPDATE items SET name = 'x'")
        assert write["cacheable"] == "no" and write["invalidates"] == "items"
        rules = conn.execute("CACHEPROXY SHOW RULES").fetchall()
        assert rules[-1][0] == "default"
        assert upstream_calls(pg, marker) == 1
        cur = conn.execute("CACHEPROXY INVALIDATE TABLE public.items")
        assert cur.statusmessage is not None and cur.statusmessage.startswith("INVALIDATE ")
        conn.execute(read).fetchall()
        assert upstream_calls(pg, marker) == 2
        cur = conn.execute("CACHEPROXY FLUSH")
        assert cur.statusmessage is not None and int(cur.statusmessage.split()[1]) >= 1
        conn.execute(read).fetchall()
        assert upstream_calls(pg, marker) == 3
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("CACHEPROXY MAKE COFFEE")


def test_psql_shows_results_as_tables(pg: PgCluster, admin_proxy: tuple[ProxyThread, Path]) -> None:
    proxy, _ = admin_proxy
    result = subprocess.run(
        ["psql", "-X", "-h", proxy.host, "-p", str(proxy.port), "-c", "CACHEPROXY SHOW RULES", "postgres"],
        env=pg.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].split("|")[0].strip() == "rule" and "(1 row)" in result.stdout


def test_reload_good_and_bad(pg: PgCluster, dbname: str, admin_proxy: tuple[ProxyThread, Path]) -> None:
    proxy, path = admin_proxy
    create_items(pg, dbname)
    marker = new_marker()
    read = f"SELECT name AS {marker} FROM items WHERE id = 8"
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
        conn.execute(read).fetchall()
        conn.execute(read).fetchall()
        assert upstream_calls(pg, marker) == 1
        good = yaml.safe_load(path.read_text())
        good["rules"] = [{"tables": ["public.items"], "strategy": "none"}]
        path.write_text(yaml.safe_dump(good))
        cur = conn.execute("CACHEPROXY RELOAD")
        assert cur.statusmessage is not None and "entries dropped: 1" in cur.statusmessage
        conn.execute(read).fetchall()
        conn.execute(read).fetchall()
        assert upstream_calls(pg, marker) == 3  # rule none: every read goes upstream
        bad = {**good, "rules": [{"tables": ["x"], "strategy": "sometimes"}]}
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(psycopg.Error) as info:
            conn.execute("CACHEPROXY RELOAD")
        assert info.value.sqlstate == "F0000" and "strategy" in str(info.value)
        assert conn.execute("CACHEPROXY SHOW RULES").fetchall()[0][3] == "none"  # the old config stays


def test_console_without_the_cache(pg: PgCluster, start_proxy: Callable[..., ProxyThread]) -> None:
    proxy = start_proxy(cache={"enabled": False}, admin={"users": ["postgres"]})
    with psycopg.connect(pg.dsn(port=proxy.port), autocommit=True) as conn:
        stats = _rows(conn, "CACHEPROXY SHOW STATS")
        assert stats["cache_enabled"] == "false"
        assert _rows(conn, "CACHEPROXY EXPLAIN SELECT 1")["cacheable"] == "no"
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("CACHEPROXY FLUSH")


def test_slow_queries_are_logged(
    pg: PgCluster, start_proxy: Callable[..., ProxyThread], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = start_proxy(logging={"slow_query": "100ms"})
    with caplog.at_level("WARNING", logger="cacheproxy"), psycopg.connect(pg.dsn(port=proxy.port)) as conn:
        conn.execute("SELECT pg_sleep(0.3) AS slow_one").fetchall()
        conn.execute("SELECT 1 AS fast_one").fetchall()
    slow = [r.getMessage() for r in caplog.records if "slow query" in r.getMessage()]
    assert len(slow) == 1 and "slow_one" in slow[0]
