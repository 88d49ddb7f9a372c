"""Reads inside transaction blocks (rule option `in_transaction`), and results read there stored only at commit.

Upstream executions are counted with pg_stat_statements (a marker in each statement's text), so "served from the
cache" is checked by the server's own count, not by the proxy's word.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from tests.support.cachetest import connect_via, new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import RawConn, shape


def _tables(pg: PgCluster, dbname: str) -> None:
    pg.psql(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance int);"
        "INSERT INTO accounts SELECT g, 100 FROM generate_series(1, 10) g;"
        "CREATE TABLE audit (id serial PRIMARY KEY, note text);"
        "CREATE TABLE prices (id int PRIMARY KEY, price int); INSERT INTO prices VALUES (1, 5);"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


def _proxy(start_proxy: Callable[..., ProxyThread], mode: str | None = None) -> ProxyThread:
    rules = [{"tables": ["accounts", "prices"], "in_transaction": mode}] if mode else []
    return start_proxy(cache={"default_ttl": "60s"}, rules=rules)


def _connect(pg: PgCluster, dbname: str, proxy: ProxyThread) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True)


def _warm(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> None:
    conn.execute(sql).fetchall()  # the miss that fills (outside any transaction block)


def test_until_write_serves_until_the_transaction_writes(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _tables(pg, dbname)
    proxy = _proxy(start_proxy)  # the default: until_write
    marker = new_marker()
    sql = f"SELECT balance AS {marker} FROM accounts WHERE id = 1"
    with _connect(pg, dbname, proxy) as conn:
        _warm(conn, sql)
        with conn.transaction():
            assert conn.execute(sql).fetchone() == (100,)  # a hit inside the block
            assert conn.execute(sql).fetchone() == (100,)
            assert upstream_calls(pg, marker) == 1
            conn.execute("INSERT INTO audit (note) VALUES ('x')")  # any write: the rest of the block bypasses
            conn.execute(f"UPDATE accounts SET balance = 50 WHERE id = 1 /* {marker}w */")
            assert conn.execute(sql).fetchone() == (50,)  # its own uncommitted write, from the server
        assert upstream_calls(pg, marker) >= 2
        assert conn.execute(sql).fetchone() == (50,)  # committed: fresh outside too


def test_never_bypasses_inside_a_block(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _tables(pg, dbname)
    proxy = _proxy(start_proxy, "never")
    marker = new_marker()
    sql = f"SELECT balance AS {marker} FROM accounts WHERE id = 2"
    with _connect(pg, dbname, proxy) as conn:
        _warm(conn, sql)
        _warm(conn, sql)  # a hit outside
        assert upstream_calls(pg, marker) == 1
        with conn.transaction():
            conn.execute(sql).fetchall()
            conn.execute(sql).fetchall()
        assert upstream_calls(pg, marker) == 3


def test_always_serves_tables_the_transaction_did_not_write(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _tables(pg, dbname)
    proxy = _proxy(start_proxy, "always")
    marker = new_marker()
    prices = f"SELECT price AS {marker}p FROM prices WHERE id = 1"
    accounts = f"SELECT balance AS {marker}a FROM accounts WHERE id = 3"
    with _connect(pg, dbname, proxy) as conn:
        _warm(conn, prices)
        _warm(conn, accounts)
        with conn.transaction():
            conn.execute("UPDATE accounts SET balance = 7 WHERE id = 3")
            assert conn.execute(prices).fetchone() == (5,)  # not written by this transaction: served
            assert conn.execute(accounts).fetchone() == (7,)  # written by it: from the server
        assert upstream_calls(pg, f"{marker}p") == 1
        assert upstream_calls(pg, f"{marker}a") == 2
        assert conn.execute(accounts).fetchone() == (7,)


@pytest.mark.parametrize(
    "begin",
    [
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
        "BEGIN; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    ],
)
def test_snapshot_isolation_bypasses(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread], begin: str
) -> None:
    _tables(pg, dbname)
    proxy = _proxy(start_proxy, "always")
    marker = new_marker()
    sql = f"SELECT balance AS {marker} FROM accounts WHERE id = 4"
    with _connect(pg, dbname, proxy) as conn:
        _warm(conn, sql)
        for statement in begin.split("; "):
            conn.execute(statement)
        conn.execute(sql).fetchall()
        conn.execute("COMMIT")
    assert upstream_calls(pg, marker) == 2


def test_a_session_default_isolation_bypasses(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _tables(pg, dbname)
    proxy = _proxy(start_proxy)
    marker = new_marker()
    sql = f"SELECT balance AS {marker} FROM accounts WHERE id = 5"
    with _connect(pg, dbname, proxy) as conn:
        conn.execute("SET default_transaction_isolation = 'serializable'")
        _warm(conn, sql)
        with conn.transaction():  # a plain BEGIN, but serializable
            conn.execute(sql).fetchall()
    assert upstream_calls(pg, marker) == 2


def test_a_database_default_isolation_bypasses(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _tables(pg, dbname)
    pg.psql(f"ALTER DATABASE {dbname} SET default_transaction_isolation = 'repeatable read'")
    try:
        proxy = _proxy(start_proxy)
        marker = new_marker()
        sql = f"SELECT balance AS {marker} FROM accounts WHERE id = 6"
        with _connect(pg, dbname, proxy) as conn:
            _warm(conn, sql)
            with conn.transaction():
                conn.execute(sql).fetchall()
        assert upstream_calls(pg, marker) == 2
    finally:
        pg.psql(f"ALTER DATABASE {dbname} RESET default_transaction_isolation")


def test_a_read_inside_a_block_is_stored_when_it_ends(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _tables(pg, dbname)
    proxy = _proxy(start_proxy)
    marker = new_marker()
    sql = f"SELECT balance AS {marker} FROM accounts WHERE id = 7"
    with _connect(pg, dbname, proxy) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
            conn.execute(sql).fetchall()  # a miss inside the block ...
            conn.execute("SELECT 1 / 0")  # ... which then rolls back, having written nothing: stored all the same
        conn.execute(sql).fetchall()
        assert upstream_calls(pg, marker) == 1
        conn.execute("BEGIN")
        conn.execute(sql).fetchall()  # a hit now
        conn.execute("COMMIT")
        assert upstream_calls(pg, marker) == 1
        other = f"SELECT price AS {marker}x FROM prices WHERE id = 1"
        with conn.transaction():
            conn.execute(other).fetchall()  # a miss inside a block that commits: stored at COMMIT
        conn.execute(other).fetchall()
        assert upstream_calls(pg, f"{marker}x") == 1


def test_a_read_before_the_transaction_writes_its_table_is_not_stored(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _tables(pg, dbname)
    proxy = _proxy(start_proxy, "always")
    marker = new_marker()
    sql = f"SELECT balance AS {marker} FROM accounts WHERE id = 8"
    with _connect(pg, dbname, proxy) as conn:
        with conn.transaction():
            assert conn.execute(sql).fetchone() == (100,)  # read (a miss), then the same transaction writes it
            conn.execute("UPDATE accounts SET balance = 1 WHERE id = 8")
        assert conn.execute(sql).fetchone() == (1,)
        assert upstream_calls(pg, marker) == 2


def test_set_local_bypasses_the_rest_of_the_block(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _tables(pg, dbname)
    pg.psql("CREATE SCHEMA other; CREATE TABLE other.accounts (id int, balance int);"
            "INSERT INTO other.accounts VALUES (9, -1); GRANT ALL ON SCHEMA other TO PUBLIC;"
            "GRANT ALL ON ALL TABLES IN SCHEMA other TO PUBLIC", dbname=dbname)  # fmt: skip
    proxy = _proxy(start_proxy)
    sql = "SELECT balance FROM accounts WHERE id = 9"
    with _connect(pg, dbname, proxy) as conn:
        _warm(conn, sql)
        with conn.transaction():
            conn.execute("SET LOCAL search_path = other")
            assert conn.execute(sql).fetchone() == (-1,)
        assert conn.execute(sql).fetchone() == (100,)


# Isolation given as a startup parameter: the transaction's snapshot is honoured, then the commit's value served.
def test_startup_isolation(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    pg.psql(
        "CREATE TABLE kv (k int PRIMARY KEY, v int); INSERT INTO kv SELECT g, g * 10 FROM generate_series(1, 5) g;"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )
    proxy = start_proxy(
        cache={"default_ttl": "10m"}, rules=[{"tables": ["kv"], "ttl": "10m", "in_transaction": "always"}]
    )
    m = new_marker()
    sql = f"SELECT v AS {m} FROM kv WHERE k = 1"
    with RawConn(proxy.host, proxy.port) as rr, connect_via(pg, dbname, proxy) as other:
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
