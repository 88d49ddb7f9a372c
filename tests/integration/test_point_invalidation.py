"""Row-level (point) invalidation: a write drops only the entries of the rows it touches, and each of these once
dropped too little (point reads through set operations, generated keys, U& identifiers, float parameters in binary).
Each compares with what PostgreSQL answers; what they print is for diagnosis."""

from __future__ import annotations

import struct
from collections.abc import Callable

import psycopg

from cacheproxy.protocol.framing import encode
from tests.support.cachetest import connect_via, new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import SYNC, RawConn, data_rows, describe_portal, execute, parse, query, shape


def _create_kv(pg: PgCluster, dbname: str, extra: str = "") -> None:
    pg.psql(
        "CREATE TABLE kv (k int PRIMARY KEY, v int);"
        "INSERT INTO kv SELECT g, g * 10 FROM generate_series(1, 5) g;"
        + extra
        + "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


def test_union_table_point_read(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _create_kv(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = new_marker()
    sql = f"SELECT k, v AS {m} FROM kv WHERE k = 1 AND true UNION ALL TABLE kv"
    with connect_via(pg, dbname, proxy) as c:
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
    _create_kv(
        pg,
        dbname,
        "CREATE TABLE g (x int, id int GENERATED ALWAYS AS (x * 2) STORED PRIMARY KEY, v text);"
        "INSERT INTO g (x, v) VALUES (1, 'a');",
    )
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = new_marker()
    with connect_via(pg, dbname, proxy) as c:
        assert c.execute(f"SELECT v AS {m} FROM g WHERE id = 10").fetchall() == []
        c.execute("UPDATE g SET x = 5 WHERE id = 2")
        got = c.execute(f"SELECT v AS {m} FROM g WHERE id = 10").fetchall()
        print("got", got)
        assert got == [("a",)]


def test_uescape_set_key(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _create_kv(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = new_marker()
    with connect_via(pg, dbname, proxy) as c:
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
    _create_kv(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = new_marker()
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


def test_float_param_control(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _create_kv(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = new_marker()
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


def test_float_param_write(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _create_kv(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    m = new_marker()
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
