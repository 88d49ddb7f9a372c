"""Invalidations published on the bus by one proxy's sessions and received by another: each of these once left the
other proxy serving a stale value (a write followed by Terminate, COMMIT AND CHAIN, a bus message arriving during a
snapshot load, a catalog poll starved by a stream of publishes). What they print is for diagnosis."""

from __future__ import annotations

from collections.abc import Callable

import psycopg

from cacheproxy.protocol.framing import encode
from tests.support.cachetest import connect_via, new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import RawConn, query


def _create_kv(pg: PgCluster, dbname: str, extra: str = "") -> None:
    pg.psql(
        "CREATE TABLE kv (k int PRIMARY KEY, v int);"
        "INSERT INTO kv SELECT g, g * 10 FROM generate_series(1, 5) g;"
        + extra
        + "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


def test_write_then_terminate_not_published(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    import time

    _create_kv(pg, dbname)
    a, b = start_proxy(cache={"default_ttl": "10m"}), start_proxy(cache={"default_ttl": "10m"})
    m = new_marker()
    sql = f"SELECT v AS {m} FROM kv WHERE k = 1"
    with connect_via(pg, dbname, b) as on_b:
        assert on_b.execute(sql).fetchone() == (10,)
        assert on_b.execute(sql).fetchone() == (10,)
        with RawConn(a.host, a.port) as w:
            w.startup("postgres", dbname)
            w.send(query("UPDATE kv SET v = 77 WHERE k = 1") + encode(b"X"))
            time.sleep(0.2)
        time.sleep(3)
        direct = psycopg.connect(pg.dsn(dbname=dbname))
        print("truth", direct.execute(sql).fetchone(), "B:", on_b.execute(sql).fetchone())
        assert on_b.execute(sql).fetchone() == (77,)


def test_snapshot_load_misses_bus_invalidation(pg: PgCluster, dbname: str, tmp_path, start_proxy, monkeypatch) -> None:
    import asyncio

    from cacheproxy.snapshot import store
    from tests.support.proxy import proxy_config

    _create_kv(pg, dbname, "SELECT pg_stat_force_next_flush();")
    path = tmp_path / "cache.snap"
    m = new_marker()
    sql = f"SELECT v AS {m} FROM kv WHERE k = 1"
    cfg = {**proxy_config(pg.url(dbname="postgres"), snapshot={"path": str(path)}, cache={"default_ttl": "120s"})}
    with ProxyThread.from_mapping(cfg) as first, connect_via(pg, dbname, first) as c:
        assert c.execute(sql).fetchone() == (10,)
    a = start_proxy(cache={"default_ttl": "10m"})
    original = store._unchanged_tables

    async def patched(header, upstream, followed):
        valid = await original(header, upstream, followed)
        with connect_via(pg, dbname, a) as w:  # another sidecar's client commits a write now (after the evidence read)
            w.execute("UPDATE kv SET v = 77 WHERE k = 1")
        await asyncio.sleep(1.0)  # this proxy's bus receives and applies A's NOTIFY meanwhile
        print("valid", valid)
        return valid

    monkeypatch.setattr(store, "_unchanged_tables", patched)
    with ProxyThread.from_mapping(cfg) as second, connect_via(pg, dbname, second) as c:
        got = c.execute(sql).fetchone()
        print(
            "B serves",
            got,
            "upstream calls",
            upstream_calls(pg, m),
            {k: v for k, v in second.app.metrics.snapshot().items() if "bus" in k},
        )
        assert got == (77,)


def test_commit_and_chain_not_published(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    import time

    _create_kv(pg, dbname)
    a, b = start_proxy(cache={"default_ttl": "10m"}), start_proxy(cache={"default_ttl": "10m"})
    m = new_marker()
    sql = f"SELECT v AS {m} FROM kv WHERE k = 1"
    with connect_via(pg, dbname, b) as on_b, connect_via(pg, dbname, a) as on_a:
        assert on_b.execute(sql).fetchone() == (10,)
        on_a.execute("BEGIN")
        on_a.execute("UPDATE kv SET v = 77 WHERE k = 1")
        on_a.execute("COMMIT AND CHAIN")  # committed; a new transaction is open
        time.sleep(2)
        direct = psycopg.connect(pg.dsn(dbname=dbname))
        print("truth", direct.execute(sql).fetchone(), "B:", on_b.execute(sql).fetchone())
        assert on_b.execute(sql).fetchone() == (77,)


def test_catalog_poll_starved_by_publishes(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    import threading
    import time

    _create_kv(pg, dbname, "CREATE TABLE w (n int);")
    a = start_proxy(cache={"default_ttl": "10m"})
    m = new_marker()
    sql = f"SELECT v AS {m} FROM kv WHERE k = 1"
    stop = threading.Event()

    def writer() -> None:
        with connect_via(pg, dbname, a) as c:
            while not stop.is_set():
                c.execute("INSERT INTO w VALUES (1)")
                time.sleep(0.3)

    with connect_via(pg, dbname, a) as c:
        assert c.execute(sql).fetchone() == (10,)
        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.5)
        pg.psql("TRUNCATE kv", dbname=dbname)
        time.sleep(4)
        got = c.execute(sql).fetchone()
        stop.set()
        t.join()
        time.sleep(2.5)
        later = c.execute(sql).fetchone()
        print("while writes flow:", got, " after writes stop:", later)
        assert got is None
