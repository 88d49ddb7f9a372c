"""Regressions found by a review of the invalidation work: each test reproduced a wrong answer before its fix
(point reads through set operations, generated keys, U& identifiers, float parameters, isolation as a startup
parameter, a refresh after a SET in the same batch, a write followed by Terminate, a bus message during a snapshot
load, COMMIT AND CHAIN, a catalog poll starved by publishes). What they print is for diagnosis."""

from __future__ import annotations

import struct
from collections.abc import Callable

import psycopg

from cacheproxy.protocol.framing import encode
from tests.integration.test_cache import _marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import SYNC, RawConn, bind, data_rows, describe_portal, execute, parse, query, shape


def _setup(pg: PgCluster, dbname: str, extra: str = "") -> None:
    pg.psql(
        "CREATE TABLE kv (k int PRIMARY KEY, v int);"
        "INSERT INTO kv SELECT g, g * 10 FROM generate_series(1, 5) g;"
        + extra
        + "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


def _conn(pg: PgCluster, dbname: str, proxy: ProxyThread, **kw: object) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True, prepare_threshold=None, **kw)


def test_union_table_point_read(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _setup(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = _marker()
    sql = f"SELECT k, v AS {m} FROM kv WHERE k = 1 AND true UNION ALL TABLE kv"
    with _conn(pg, dbname, proxy) as c:
        print("point:", proxy.app.cache.classify(dbname, sql.encode()).point)
        before = sorted(r for r in c.execute(sql).fetchall())
        c.execute(sql).fetchall()
        print("upstream calls", upstream_calls(pg, m))
        c.execute("UPDATE kv SET v = 999 WHERE k = 2")
        after = sorted(c.execute(sql).fetchall())
        direct = psycopg.connect(pg.dsn(dbname=dbname))
        truth = sorted(direct.execute(sql).fetchall())
        print("before", before, "\nafter", after, "\ntruth", truth)
        assert after == truth


def test_generated_pk(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _setup(
        pg,
        dbname,
        "CREATE TABLE g (x int, id int GENERATED ALWAYS AS (x * 2) STORED PRIMARY KEY, v text);"
        "INSERT INTO g (x, v) VALUES (1, 'a');",
    )
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = _marker()
    with _conn(pg, dbname, proxy) as c:
        assert c.execute(f"SELECT v AS {m} FROM g WHERE id = 10").fetchall() == []
        c.execute("UPDATE g SET x = 5 WHERE id = 2")
        got = c.execute(f"SELECT v AS {m} FROM g WHERE id = 10").fetchall()
        print("got", got)
        assert got == [("a",)]


def test_uescape_set_key(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _setup(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = _marker()
    with _conn(pg, dbname, proxy) as c:
        w = 'UPDATE kv SET U&"\\006B" = 100 WHERE k = 1'
        print("point:", proxy.app.cache.classify(dbname, w.encode()).point)
        assert c.execute(f"SELECT v AS {m} FROM kv WHERE k = 100").fetchall() == []
        c.execute(w)
        got = c.execute(f"SELECT v AS {m} FROM kv WHERE k = 100").fetchall()
        print("got", got)
        assert got == [(10,)]


def _bind_binary(params: list[tuple[int, bytes]]) -> bytes:
    body = b"\x00\x00" + struct.pack("!H", len(params)) + b"".join(struct.pack("!H", f) for f, _ in params)
    body += struct.pack("!H", len(params))
    for _, p in params:
        body += struct.pack("!i", len(p)) + p
    return encode(b"B", body + struct.pack("!H", 0))


def test_float_param_bucket(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _setup(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = _marker()
    sql = f"SELECT $1::float8 AS {m}, v FROM kv WHERE k = $1"
    one = struct.pack("!d", 1.0)
    cycle = parse("", sql) + _bind_binary([(1, one)]) + describe_portal() + execute() + SYNC
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres", dbname)
        conn.send(cycle)
        first = conn.recv_until()
        print(shape(first))
        conn.send(cycle)
        print(shape(conn.recv_until()), upstream_calls(pg, m))
        print([sorted(e.tables) for s in proxy.app.cache.engine._shards for e in s._entries.values()])
        conn.send(query("UPDATE kv SET v = 7 WHERE k = 1"))
        conn.recv_until()
        conn.send(cycle)
        got = conn.recv_until()
        print(shape(got), upstream_calls(pg, m))
        assert data_rows(got)[0][1] != data_rows(first)[0][1]


def test_startup_isolation(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _setup(pg, dbname)
    proxy = start_proxy(
        cache={"default_ttl": "10m"}, rules=[{"tables": ["kv"], "ttl": "10m", "in_transaction": "always"}]
    )
    m = _marker()
    sql = f"SELECT v AS {m} FROM kv WHERE k = 1"
    with RawConn(proxy.host, proxy.port) as rr, _conn(pg, dbname, proxy) as other:
        rr.startup("postgres", dbname, default_transaction_isolation="repeatable read")
        print(shape(rr.query("SHOW transaction_isolation")))
        print(shape(rr.query("BEGIN")))
        print(shape(rr.query("SELECT 1")))  # snapshot taken
        other.execute("UPDATE kv SET v = 11 WHERE k = 1")
        print("in RR tx:", shape(rr.query(sql)))
        print(shape(rr.query("COMMIT")))
        got = shape(rr.query(sql))
        print("after commit:", got, upstream_calls(pg, m))
        assert "D11" in got


def test_refresh_after_set_in_batch(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    pg.psql(
        "CREATE TABLE acc (id int PRIMARY KEY, b int); INSERT INTO acc VALUES (1, 100);"
        "CREATE SCHEMA other; CREATE TABLE other.acc (id int PRIMARY KEY, b int); INSERT INTO other.acc VALUES (1, -1);"
        "GRANT ALL ON SCHEMA other TO PUBLIC; GRANT ALL ON ALL TABLES IN SCHEMA public, other TO PUBLIC;",
        dbname=dbname,
    )
    proxy = start_proxy(rules=[{"tables": ["acc"], "ttl": "10m", "strategy": "write_through"}])
    m = _marker()
    sql = f"SELECT b AS {m} FROM acc WHERE id = 1"
    with RawConn(proxy.host, proxy.port) as w, _conn(pg, dbname, proxy) as reader:
        w.startup("postgres", dbname)
        print(shape(w.query(sql)))  # stored under default search_path (simple query key)
        batch = (
            parse("", "SET search_path TO other")
            + bind()
            + execute()
            + parse("", "UPDATE public.acc SET b = 200 WHERE id = 1")
            + bind()
            + execute()
            + SYNC
        )
        w.send(batch)
        print(shape(w.recv_until()))
        import time

        time.sleep(0.5)
        print(proxy.app.metrics.snapshot()["write_through_refreshes"])
        print(shape(w.query("SHOW search_path")))
        r = reader.execute(sql).fetchall()
        print("reader (search_path public):", r)
        assert r == [(200,)]


def test_write_then_terminate_not_published(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    import time

    _setup(pg, dbname)
    a, b = start_proxy(cache={"default_ttl": "10m"}), start_proxy(cache={"default_ttl": "10m"})
    m = _marker()
    sql = f"SELECT v AS {m} FROM kv WHERE k = 1"
    with _conn(pg, dbname, b) as on_b:
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


def test_float_param_control(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _setup(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = _marker()
    sql = f"SELECT $1::int4 AS {m}, v FROM kv WHERE k = $1"
    cycle = parse("", sql) + _bind_binary([(1, struct.pack("!i", 1))]) + describe_portal() + execute() + SYNC
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres", dbname)
        conn.send(cycle)
        first = conn.recv_until()
        conn.send(cycle)
        conn.recv_until()
        print(
            [sorted(e.tables) for e in proxy.app.cache.engine._shards[0]._entries.values()]
            if hasattr(proxy.app.cache.engine, "_shards")
            else ""
        )
        conn.send(query("UPDATE kv SET v = 7 WHERE k = 1"))
        conn.recv_until()
        conn.send(cycle)
        got = conn.recv_until()
        print(shape(got), upstream_calls(pg, m))
        assert data_rows(got)[0][1] != data_rows(first)[0][1]


def test_snapshot_load_misses_bus_invalidation(pg: PgCluster, dbname: str, tmp_path, start_proxy, monkeypatch) -> None:
    import asyncio

    from cacheproxy.snapshot import store
    from tests.support.proxy import proxy_config

    _setup(pg, dbname, "SELECT pg_stat_force_next_flush();")
    path = tmp_path / "cache.snap"
    m = _marker()
    sql = f"SELECT v AS {m} FROM kv WHERE k = 1"
    cfg = {**proxy_config(pg.url(dbname="postgres"), snapshot={"path": str(path)}, cache={"default_ttl": "120s"})}
    with ProxyThread.from_mapping(cfg) as first, _conn(pg, dbname, first) as c:
        assert c.execute(sql).fetchone() == (10,)
    a = start_proxy(cache={"default_ttl": "10m"})
    original = store._unchanged_tables

    async def patched(header, upstream, followed):
        valid = await original(header, upstream, followed)
        with _conn(pg, dbname, a) as w:  # another sidecar's client commits a write now (after the evidence read)
            w.execute("UPDATE kv SET v = 77 WHERE k = 1")
        await asyncio.sleep(1.0)  # this proxy's bus receives and applies A's NOTIFY meanwhile
        print("valid", valid)
        return valid

    monkeypatch.setattr(store, "_unchanged_tables", patched)
    with ProxyThread.from_mapping(cfg) as second, _conn(pg, dbname, second) as c:
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

    _setup(pg, dbname)
    a, b = start_proxy(cache={"default_ttl": "10m"}), start_proxy(cache={"default_ttl": "10m"})
    m = _marker()
    sql = f"SELECT v AS {m} FROM kv WHERE k = 1"
    with _conn(pg, dbname, b) as on_b, _conn(pg, dbname, a) as on_a:
        assert on_b.execute(sql).fetchone() == (10,)
        on_a.execute("BEGIN")
        on_a.execute("UPDATE kv SET v = 77 WHERE k = 1")
        on_a.execute("COMMIT AND CHAIN")  # committed; a new transaction is open
        time.sleep(2)
        direct = psycopg.connect(pg.dsn(dbname=dbname))
        print("truth", direct.execute(sql).fetchone(), "B:", on_b.execute(sql).fetchone())
        assert on_b.execute(sql).fetchone() == (77,)


def test_float_param_write(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _setup(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = _marker()
    read = f"SELECT v AS {m} FROM kv WHERE k = 1"
    write = (
        parse("", "UPDATE kv SET v = 100 WHERE $1::float8 > 0 AND k = $1")
        + _bind_binary([(1, struct.pack("!d", 1.0))])
        + execute()
        + SYNC
    )
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres", dbname)
        print(shape(conn.query(read)), shape(conn.query(read)))
        conn.send(write)
        print(shape(conn.recv_until()))
        got = shape(conn.query(read))
        print("after write:", got)
        assert "D100" in got


def test_catalog_poll_starved_by_publishes(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    import threading
    import time

    _setup(pg, dbname, "CREATE TABLE w (n int);")
    a = start_proxy(cache={"default_ttl": "10m"})
    m = _marker()
    sql = f"SELECT v AS {m} FROM kv WHERE k = 1"
    stop = threading.Event()

    def writer() -> None:
        with _conn(pg, dbname, a) as c:
            while not stop.is_set():
                c.execute("INSERT INTO w VALUES (1)")
                time.sleep(0.3)

    with _conn(pg, dbname, a) as c:
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
