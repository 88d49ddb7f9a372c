"""Row-level invalidation: a write that names one row by the table's integer primary key drops the cached point reads
of that row and the table's other reads, and leaves the point reads of other rows in place. Every shape it does
not recognise (or a table with triggers, no such key...) still drops the whole table."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from tests.support.cachetest import new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread

Conn = psycopg.Connection[tuple[object, ...]]


def _create_tables(pg: PgCluster, dbname: str) -> None:
    pg.psql(
        "CREATE TABLE kv (k int PRIMARY KEY, v int, u int UNIQUE);"
        "INSERT INTO kv SELECT g, g * 10, g FROM generate_series(1, 5) g;"
        "CREATE TABLE nokey (k int, v int); INSERT INTO nokey SELECT g, g FROM generate_series(1, 3) g;"
        "CREATE TABLE audited (k int PRIMARY KEY, v int); INSERT INTO audited VALUES (1, 1), (2, 2);"
        "CREATE TABLE log (n int);"
        "CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO log VALUES (1); "
        "RETURN NEW; END $$;"
        "CREATE TRIGGER t AFTER UPDATE ON audited FOR EACH ROW EXECUTE FUNCTION note();"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


@pytest.fixture
def conn(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> Conn:
    _create_tables(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    return psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True, prepare_threshold=None)


def _reads(conn: Conn, marker: str, table: str = "kv", keys: range = range(1, 6)) -> list[object]:
    return [conn.execute(f"SELECT v AS {marker} FROM {table} WHERE k = {k}").fetchone() for k in keys]


def test_a_point_write_keeps_the_other_rows_cached(pg: PgCluster, conn: Conn) -> None:
    marker, total = new_marker(), new_marker()
    with conn:
        _reads(conn, marker)
        conn.execute(f"SELECT sum(v) AS {total} FROM kv").fetchall()  # not a point read: any write to kv drops it
        assert upstream_calls(pg, marker) == 5
        conn.execute("UPDATE kv SET v = 33 WHERE k = 3")
        assert _reads(conn, marker) == [(10,), (20,), (33,), (40,), (50,)]
        assert upstream_calls(pg, marker) == 6  # only k = 3 was read again
        assert conn.execute(f"SELECT sum(v) AS {total} FROM kv").fetchone() == (153,)
        assert upstream_calls(pg, total) == 2
        conn.execute("DELETE FROM kv WHERE k = 4")
        assert _reads(conn, marker) == [(10,), (20,), (33,), None, (50,)]
        assert upstream_calls(pg, marker) == 7
        assert conn.execute(f"SELECT v AS {marker} FROM kv WHERE k = 9").fetchone() is None  # cached: no such row
        conn.execute("INSERT INTO kv (k, v, u) VALUES (9, 90, 9)")
        assert conn.execute(f"SELECT v AS {marker} FROM kv WHERE k = 9").fetchone() == (90,)


@pytest.mark.parametrize(
    "write",
    [
        "UPDATE kv SET k = 6 WHERE k = 5",  # moves a row to another key
        "UPDATE kv SET v = v + 1 WHERE k > 0",  # not by the key
        "INSERT INTO kv (k, v, u) VALUES (7, 7, 1) ON CONFLICT (u) DO UPDATE SET v = 77",  # another unique column
        "UPDATE kv SET v = 0 WHERE k = 1 OR k = 2",
    ],
)
def test_other_writes_drop_the_whole_table(pg: PgCluster, dbname: str, conn: Conn, write: str) -> None:
    marker = new_marker()
    with conn:
        before = _reads(conn, marker, keys=range(1, 8))
        conn.execute(write)
        after = _reads(conn, marker, keys=range(1, 8))
    direct = psycopg.connect(pg.dsn(dbname=dbname), autocommit=True)
    with direct:
        # (a different statement shape: pg_stat_statements would count the same shape as the proxied reads)
        want = [direct.execute(f"SELECT v, 0 FROM kv WHERE k = {k}").fetchone() for k in range(1, 8)]
    assert after == [row[:1] if row is not None else None for row in want]
    assert after != before
    assert upstream_calls(pg, marker) == 14  # every read went upstream again


def test_tables_without_a_key_or_with_triggers_are_invalidated_whole(pg: PgCluster, conn: Conn) -> None:
    marker = new_marker()
    with conn:
        _reads(conn, marker, "nokey", range(1, 4))
        conn.execute("UPDATE nokey SET v = 0 WHERE k = 1")
        assert _reads(conn, marker, "nokey", range(1, 4)) == [(0,), (2,), (3,)]
        assert upstream_calls(pg, marker) == 6
        other = new_marker()
        _reads(conn, other, "audited", range(1, 3))
        conn.execute("UPDATE audited SET v = 9 WHERE k = 1")  # its trigger may write anything: all is dropped
        assert _reads(conn, other, "audited", range(1, 3)) == [(9,), (2,)]
        assert upstream_calls(pg, other) == 4


def test_parameters_name_the_row_in_both_protocol_formats(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    """asyncpg binds integers in binary, psycopg in text: both must name the same row."""
    _create_tables(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    marker = new_marker()
    read = f"SELECT v AS {marker} FROM kv WHERE k = $1"

    async def run() -> list[object]:
        conn = await asyncpg.connect(pg.url(dbname=dbname, port=proxy.port))
        try:
            for k in range(1, 6):
                await conn.fetchval(read, k)
            await conn.execute("UPDATE kv SET v = $1 WHERE k = $2", -2, 2)  # binary parameters
            return [await conn.fetchval(read, k) for k in range(1, 6)]
        finally:
            await conn.close()

    assert asyncio.run(run()) == [10, -2, 30, 40, 50]
    assert upstream_calls(pg, marker) == 6
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
        conn.execute("UPDATE kv SET v = %s WHERE k = %s", (-3, 3))  # text parameters
    assert asyncio.run(run()) == [10, -2, -3, 40, 50]
    # k = 3 (written by psycopg) and k = 2 (written again); asyncpg's prepare is answered from the cache (a row write
    # leaves the statement's description), so its first execution can hit too.
    assert upstream_calls(pg, marker) == 8


def test_write_through_refreshes_only_the_row_written(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _create_tables(pg, dbname)
    proxy = start_proxy(rules=[{"tables": ["kv"], "ttl": "10m", "strategy": "write_through"}])
    marker = new_marker()
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True, prepare_threshold=None) as conn:
        _reads(conn, marker)
        conn.execute("UPDATE kv SET v = 11 WHERE k = 1")
        assert _reads(conn, marker) == [(11,), (20,), (30,), (40,), (50,)]
    assert upstream_calls(pg, marker) == 6  # five misses, one refresh: every read after the write hit
    assert proxy.app.metrics.snapshot()["write_through_refreshes"]["stored"] == 1  # type: ignore[index]
