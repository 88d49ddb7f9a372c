"""Helpers of the cache tests: unique query markers, how often the server itself ran a statement
(pg_stat_statements), the `items` table, psycopg connections through a proxy, and polling with a bound."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import psycopg

from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread

WAIT = 10.0  # seconds: generous bounds for what normally takes milliseconds, on a loaded CI machine


def new_marker() -> str:
    """A unique word to put in a query (as a column alias) so that its upstream executions can be counted."""
    return "m_" + uuid.uuid4().hex[:10]


def upstream_calls(pg: PgCluster, marker: str) -> int:
    """How many times the server itself ran a statement containing `marker` (cache misses and direct runs)."""
    out = pg.psql(f"SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '%{marker}%'")
    return int(out.strip())


def create_items(pg: PgCluster, dbname: str) -> None:
    """The `items` table: 500 rows with a column of most types a driver decodes differently."""
    pg.psql(
        "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[], data bytea, "
        "at timestamptz, doc jsonb, note text);"
        "INSERT INTO items SELECT g, 'item ' || g, g * 1.5, ARRAY['a' || g, NULL], decode(md5(g::text), 'hex'), "
        "'2024-01-01'::timestamptz + g * interval '1 hour', jsonb_build_object('g', g), NULL "
        "FROM generate_series(1, 500) g;"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


def connect_via(pg: PgCluster, dbname: str, proxy: ProxyThread, **kw: object) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit psycopg connection through `proxy`. prepare_threshold=None: psycopg would otherwise switch to
    a named statement after 5 runs, a different cache key."""
    conn: psycopg.Connection[tuple[object, ...]] = psycopg.connect(
        pg.dsn(dbname=dbname, port=proxy.port), autocommit=True, prepare_threshold=None, **kw
    )
    return conn


def wait_until(predicate: Callable[[], bool], what: str) -> float:
    """Poll `predicate` until true; the seconds it took. Fails the test after WAIT."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > WAIT:
            raise AssertionError(f"not within {WAIT}s: {what}")
        time.sleep(0.005)
    return time.monotonic() - started


def eventually(check: Callable[[], bool], seconds: float = 20.0) -> bool:
    """Poll `check` until true (True) or `seconds` pass (False): for state that follows a feed or a timer."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
