"""The catalog loader's kept connection (feeds/catalog_loader.py): one per database, reused by every reload after
DDL, replaced when the server ends it, closed when the database is released (so DROP DATABASE is not blocked)."""

from __future__ import annotations

import time

import psycopg

from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config


def _catalog_backends(pg: PgCluster, dbname: str) -> list[int]:
    rows = pg.psql(
        "SELECT pid FROM pg_stat_activity "
        f"WHERE application_name = 'cacheproxy-catalog' AND datname = '{dbname}' ORDER BY pid"
    )
    return [int(line) for line in rows.split()]


def _hits(proxy: ProxyThread) -> int:
    assert proxy.app is not None and proxy.app.cache is not None
    return int(proxy.app.cache.engine.stats().hits)


def _cached_twice(conn: psycopg.Connection[tuple[object, ...]], proxy: ProxyThread, sql: str) -> bool:
    """`sql` read until it is a hit (the catalog is loaded and the result stored); False if it never is."""
    for _ in range(50):
        before = _hits(proxy)
        conn.execute(sql).fetchall()
        if _hits(proxy) > before:
            return True
        time.sleep(0.05)
    return False


def test_reloads_reuse_one_connection_and_replace_a_lost_one(pg: PgCluster, dbname: str) -> None:
    config = proxy_config(pg.url(dbname="postgres"), cache={"default_ttl": "120s"})
    with (
        ProxyThread.from_mapping(config) as proxy,
        psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn,
    ):
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO kept VALUES (1, 'one')")
        assert _cached_twice(conn, proxy, "SELECT v FROM kept WHERE id = 1")
        first = _catalog_backends(pg, dbname)
        assert len(first) == 1
        for n in range(3):  # DDL: each makes the catalog reload, on the same connection
            conn.execute(f"CREATE TABLE more_{n} (id int)")
            assert _cached_twice(conn, proxy, f"SELECT count(*) FROM more_{n}")
        assert _catalog_backends(pg, dbname) == first
        # The server ends the kept connection between two loads: the next reload opens another and caching goes on.
        pg.psql(f"SELECT pg_terminate_backend({first[0]})")
        conn.execute("CREATE TABLE after_loss (id int)")
        conn.execute("INSERT INTO after_loss VALUES (7)")
        assert _cached_twice(conn, proxy, "SELECT id FROM after_loss")
        assert conn.execute("SELECT id FROM after_loss").fetchall() == [(7,)]
        replaced = _catalog_backends(pg, dbname)
        assert len(replaced) == 1 and replaced != first
    # The database can be dropped through a proxy that has read its catalog (the drop releases the connection).
    with ProxyThread.from_mapping(config) as proxy:
        with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
            assert _cached_twice(conn, proxy, "SELECT v FROM kept WHERE id = 1")
        assert len(_catalog_backends(pg, dbname)) == 1
        with psycopg.connect(pg.dsn(dbname="postgres", port=proxy.port), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{dbname}"')
        pg.create_database(dbname)  # (for the fixture's own drop)
