"""Two sidecars in front of one database: each one's committed writes reach the other's cache through LISTEN/NOTIFY,
and a proxy whose LISTEN connection is down serves nothing of that database from its cache."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from tests.support.cachetest import connect_via, new_marker, upstream_calls, wait_until
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread


def _create_kv(pg: PgCluster, dbname: str) -> None:
    pg.psql(
        "CREATE TABLE kv (k int PRIMARY KEY, v int); INSERT INTO kv SELECT g, 0 FROM generate_series(1, 5) g;"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


@pytest.fixture
def pair(start_proxy: Callable[..., ProxyThread]) -> tuple[ProxyThread, ProxyThread]:
    return start_proxy(cache={"default_ttl": "10m"}), start_proxy(cache={"default_ttl": "10m"})


def test_a_write_through_one_proxy_invalidates_the_other(
    pg: PgCluster, dbname: str, pair: tuple[ProxyThread, ProxyThread]
) -> None:
    _create_kv(pg, dbname)
    a, b = pair
    marker = new_marker()
    sql = f"SELECT v AS {marker} FROM kv WHERE k = 1"
    with connect_via(pg, dbname, a) as on_a, connect_via(pg, dbname, b) as on_b:
        assert on_b.execute(sql).fetchone() == (0,)
        assert on_b.execute(sql).fetchone() == (0,)
        assert upstream_calls(pg, marker) == 1  # B serves it from its cache
        on_a.execute("UPDATE kv SET v = 1 WHERE k = 1")  # autocommit, through A
        wait_until(lambda: on_b.execute(sql).fetchone() == (1,), "B serves the value A's write committed")
        with on_a.transaction():  # an explicit transaction: published at its COMMIT
            on_a.execute("UPDATE kv SET v = 2 WHERE k = 1")
        wait_until(lambda: on_b.execute(sql).fetchone() == (2,), "B serves the value A's transaction committed")
    assert b.app.metrics.snapshot()["invalidation_bus"]["received"] >= 2  # type: ignore[index]
    assert a.app.metrics.snapshot()["invalidation_bus"]["published"] >= 2  # type: ignore[index]


def test_a_rolled_back_write_is_harmless_and_ddl_reloads_the_other_catalog(
    pg: PgCluster, dbname: str, pair: tuple[ProxyThread, ProxyThread]
) -> None:
    _create_kv(pg, dbname)
    a, b = pair
    with connect_via(pg, dbname, a) as on_a, connect_via(pg, dbname, b) as on_b:
        assert on_b.execute("SELECT * FROM kv WHERE k = 2").fetchone() == (2, 0)
        with pytest.raises(psycopg.errors.DivisionByZero), on_a.transaction():
            on_a.execute("UPDATE kv SET v = 9 WHERE k = 2")
            on_a.execute("SELECT 1 / 0")
        assert on_b.execute("SELECT * FROM kv WHERE k = 2").fetchone() == (2, 0)
        on_a.execute("ALTER TABLE kv ADD COLUMN extra int DEFAULT 7")
        wait_until(
            lambda: on_b.execute("SELECT * FROM kv WHERE k = 2").fetchone() == (2, 0, 7),
            "B's cached row description follows DDL done through A",
        )


def test_while_the_bus_is_down_nothing_is_served_from_the_cache(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    """The proxy's control user cannot log in for a while: its LISTEN connection is lost and cannot come back."""
    _create_kv(pg, dbname)
    proxy = start_proxy(
        upstream=pg.url(pg.SCRAM_USER, pg.SCRAM_PASSWORD, dbname="postgres"), cache={"default_ttl": "10m"}
    )
    marker = new_marker()
    sql = f"SELECT v AS {marker} FROM kv WHERE k = 3"
    with connect_via(pg, dbname, proxy) as conn:  # the client logs in as postgres: only the proxy's own user is locked
        conn.execute(sql).fetchall()
        conn.execute(sql).fetchall()
        assert upstream_calls(pg, marker) == 1
        pg.psql(f"ALTER ROLE {pg.SCRAM_USER} NOLOGIN")
        try:
            pg.psql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE application_name = 'cacheproxy-bus' AND usename = '{pg.SCRAM_USER}' AND datname = '{dbname}'"
            )
            wait_until(lambda: bool(proxy.app.metrics.snapshot()["invalidation_bus"]["blind_databases"]),  # type: ignore[index]
                   "the proxy notices its bus is down")  # fmt: skip
            pg.psql("UPDATE kv SET v = 33 WHERE k = 3", dbname=dbname)  # a write it cannot hear about
            assert conn.execute(sql).fetchone() == (33,)
            assert conn.execute(sql).fetchone() == (33,)
            assert upstream_calls(pg, marker) == 3  # both answered by the server
        finally:
            pg.psql(f"ALTER ROLE {pg.SCRAM_USER} LOGIN")
        wait_until(lambda: not proxy.app.metrics.snapshot()["invalidation_bus"]["blind_databases"],  # type: ignore[index]
               "the bus comes back")  # fmt: skip
        conn.execute(sql).fetchall()
        conn.execute(sql).fetchall()
        assert upstream_calls(pg, marker) == 4  # cached again once the bus listens


def test_bus_off_keeps_a_single_proxy_working(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _create_kv(pg, dbname)
    proxy = start_proxy(invalidation={"bus": False})
    marker = new_marker()
    sql = f"SELECT v AS {marker} FROM kv WHERE k = 4"
    with connect_via(pg, dbname, proxy) as conn:
        for _ in range(3):
            conn.execute(sql).fetchall()
        conn.execute("UPDATE kv SET v = 4 WHERE k = 4")
        assert conn.execute(sql).fetchone() == (4,)
    assert upstream_calls(pg, marker) == 2
    count = pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cacheproxy-bus' "
                    f"AND datname = '{dbname}'")  # fmt: skip
    assert int(count) == 0


def test_a_point_write_through_one_proxy_drops_only_that_row_on_the_other(
    pg: PgCluster, dbname: str, pair: tuple[ProxyThread, ProxyThread]
) -> None:
    _create_kv(pg, dbname)  # kv has an integer primary key: row-level invalidation
    a, b = pair
    marker = new_marker()
    with connect_via(pg, dbname, a) as on_a, connect_via(pg, dbname, b) as on_b:
        for k in (1, 2):
            on_b.execute(f"SELECT v AS {marker} FROM kv WHERE k = {k}").fetchall()
        assert upstream_calls(pg, marker) == 2
        on_a.execute("UPDATE kv SET v = 5 WHERE k = 1")
        wait_until(lambda: on_b.execute(f"SELECT v AS {marker} FROM kv WHERE k = 1").fetchone() == (5,), "B sees k = 1")
        assert on_b.execute(f"SELECT v AS {marker} FROM kv WHERE k = 2").fetchone() == (0,)
    assert upstream_calls(pg, marker) == 3  # k = 2 stayed cached on B
