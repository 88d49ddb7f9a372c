"""The proxy's own connections to a database (the invalidation bus's LISTEN connection, the replication stream) must
not keep it from being dropped (issue 14, item 11): they close once the database has no client sessions, and at once
when a client drops it through the proxy. What the proxy itself leaves open on the server (issue 14, "also seen"):
no backend idle in a transaction after a catalog load."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.support.cachetest import eventually, new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread

FEEDS = {
    "bus": {"idle_release": "1s"},
    "bus and replication": {"replication": True, "slot_prefix": "cp_life", "idle_release": "1s"},
}


def _use(pg: PgCluster, proxy: ProxyThread, name: str) -> None:
    """A session of `name` through the proxy that reads (the database is then watched), then disconnects."""
    pg.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", dbname=name)
    with psycopg.connect(pg.dsn(dbname=name, port=proxy.port), autocommit=True) as conn:
        for _ in range(3):
            assert conn.execute("SELECT id FROM t").fetchall() == [(1,)]
    service: Any = proxy.app.cache if proxy.app is not None else None
    assert service is not None and service.bus.watching(name), "the database was never watched: proves nothing"


def _backends(pg: PgCluster, name: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'").strip())


def _drop(dsn: str, name: str) -> str | None:
    """DROP DATABASE `name` over `dsn`: None, or the SQLSTATE it failed with."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(f'DROP DATABASE "{name}"')
        except psycopg.Error as exc:
            return exc.sqlstate or "?"
    return None


def _used_database(pg: PgCluster, start_proxy: Callable[..., ProxyThread], feeds: str) -> tuple[ProxyThread, str]:
    """A proxy with `feeds`, and a new database used through it by a session that has ended."""
    proxy = start_proxy(cache={"default_ttl": "60s"}, invalidation=FEEDS[feeds])
    name = f"life_{uuid.uuid4().hex[:8]}"
    pg.create_database(name)
    _use(pg, proxy, name)
    return proxy, name


@pytest.mark.parametrize("feeds", list(FEEDS))
def test_drop_database_through_the_proxy_right_after_use(
    pg: PgCluster, start_proxy: Callable[..., ProxyThread], feeds: str
) -> None:
    proxy, name = _used_database(pg, start_proxy, feeds)
    assert _drop(pg.dsn(dbname="postgres", port=proxy.port), name) is None
    assert pg.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'").strip() == "0"


@pytest.mark.parametrize("feeds", list(FEEDS))
def test_drop_database_directly_once_its_sessions_are_gone(
    pg: PgCluster, start_proxy: Callable[..., ProxyThread], feeds: str
) -> None:
    proxy, name = _used_database(pg, start_proxy, feeds)
    service: Any = proxy.app.cache if proxy.app is not None else None
    assert eventually(lambda: not service.bus.watching(name) and name not in service._replication)
    # Nothing of the proxy's stays connected (a catalog load still running under load finishes first): the
    # backends' count is what a DROP DATABASE made elsewhere meets.
    assert eventually(lambda: _backends(pg, name) == 0), "the proxy still holds a connection to the database"
    assert _drop(pg.dsn(dbname="postgres"), name) is None
    # The database is served again (a new one of that name) once a session comes back.
    pg.create_database(name)
    _use(pg, proxy, name)
    direct = psycopg.connect(pg.dsn(dbname=name), autocommit=True)
    with direct, psycopg.connect(pg.dsn(dbname=name, port=proxy.port), autocommit=True) as conn:
        assert conn.execute("SELECT id FROM t").fetchall() == direct.execute("SELECT id FROM t").fetchall()
    pg.drop_database(name)


def test_no_proxy_backend_is_idle_in_transaction_after_a_catalog_load(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = start_proxy(cache={"default_ttl": "60s"})
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
        conn.execute("SELECT 1")
        conn.execute("CREATE TABLE t (id int)")  # DDL: the catalog is read again
        conn.execute("SELECT count(*) FROM t")
        service: Any = proxy.app.cache if proxy.app is not None else None
        assert eventually(lambda: service.catalogs.get(dbname) is not None)
        rows = pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'cacheproxy%' "
            f"AND datname = '{dbname}' AND state LIKE 'idle in transaction%'"
        )
        assert rows.strip() == "0"


def test_entries_outlive_a_gap_between_sessions_shorter_than_idle_release(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    """Applications whose connections come and go (no pool, jobs, a benchmark's runs) keep a warm cache: the
    proxy's own connections, and so the entries, stay for `invalidation.idle_release` after the last session."""
    proxy = start_proxy(cache={"default_ttl": "60s"}, invalidation={"idle_release": "30s"})
    pg.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", dbname=dbname)
    marker = new_marker()
    sql = f"SELECT id AS {marker} FROM t"
    for _ in range(2):
        with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
            assert conn.execute(sql).fetchall() == [(1,)]
        time.sleep(2.5)  # longer than the release delay used to be
    assert upstream_calls(pg, marker) == 1
