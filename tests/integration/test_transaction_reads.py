"""Reads inside transaction blocks, compared with PostgreSQL: the isolation level a plain BEGIN opens is the
server's (asked, not assumed), and a READ COMMITTED transaction that wrote nothing stores its reads even when it ends
in ROLLBACK (as ORMs and pools end them), but never what it read after a write of its own.

Upstream executions are counted with pg_stat_statements (a marker in the statement's text).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import RawConn, data_rows


def _marker() -> str:
    return "m_" + uuid.uuid4().hex[:10]


def upstream_calls(pg: PgCluster, marker: str) -> int:
    out = pg.psql(f"SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '%{marker}%'")
    return int(out.strip())


def _setup(pg: PgCluster, dbname: str) -> None:
    pg.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'old'), (2, 'two');"
        "CREATE TABLE u (id int PRIMARY KEY, v text); INSERT INTO u VALUES (1, 'u');"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


@pytest.fixture
def cached(start_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return start_proxy(cache={"default_ttl": "60s"})


def _default_isolation(pg: PgCluster, dbname: str, level: str) -> None:
    """ALTER SYSTEM the default and reload; wait until a new session starts with it."""
    pg.psql(f"ALTER SYSTEM SET default_transaction_isolation = '{level}'; SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while pg.psql("SHOW default_transaction_isolation", dbname).strip() != level:
        assert time.monotonic() < deadline, "the server did not reload its configuration"
        time.sleep(0.05)


@pytest.fixture
def repeatable_read_default(pg: PgCluster, dbname: str) -> Iterator[None]:
    """The cluster is shared by the whole test session: the default is reset however the test ends."""
    try:
        yield
    finally:
        pg.psql("ALTER SYSTEM RESET default_transaction_isolation; SELECT pg_reload_conf()")
        _default_isolation(pg, dbname, "read committed")


def test_a_default_isolation_changed_at_run_time_is_the_servers(
    pg: PgCluster, dbname: str, cached: ProxyThread, repeatable_read_default: None
) -> None:
    _setup(pg, dbname)
    sql = "SELECT v FROM t WHERE id = 1"
    proxied = pg.dsn(dbname=dbname, port=cached.port)
    with psycopg.connect(proxied, autocommit=True) as writer:
        writer.execute(sql).fetchall()  # the proxy has read the catalog (and the default) before the change
        _default_isolation(pg, dbname, "repeatable read")

        def psycopg_block(dsn: str) -> list[object]:
            """psycopg opens the block with BEGIN in extended protocol."""
            writer.execute("UPDATE t SET v = 'old' WHERE id = 1")
            writer.execute(sql).fetchall()  # cached (outside any block) as 'old'
            with psycopg.connect(dsn) as conn:
                first = conn.execute(sql).fetchall()
                writer.execute("UPDATE t SET v = 'new' WHERE id = 1")  # committed after the block's snapshot
                second = conn.execute(sql).fetchall()
                level = conn.execute("SHOW transaction_isolation").fetchall()
                conn.rollback()
            return [first, second, level]

        def simple_block(host: str, port: int) -> list[object]:
            """A plain BEGIN in a simple Query."""
            writer.execute("UPDATE t SET v = 'old' WHERE id = 1")
            writer.execute(sql).fetchall()
            with RawConn(host, port) as conn:
                conn.startup("postgres", dbname)
                conn.query("BEGIN")
                first = data_rows(conn.query(sql))
                writer.execute("UPDATE t SET v = 'new' WHERE id = 1")
                second = data_rows(conn.query(sql))
                conn.query("ROLLBACK")
            return [first, second]

        direct = pg.dsn(dbname=dbname)
        assert psycopg_block(proxied) == psycopg_block(direct) == [[("old",)], [("old",)], [("repeatable read",)]]
        assert simple_block(cached.host, cached.port) == simple_block(pg.host, pg.port) == [[[b"old"]]] * 2


def test_set_transaction_after_a_plain_begin_still_works(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    """The proxy's question about the level takes no snapshot: SET TRANSACTION may still follow the BEGIN."""
    _setup(pg, dbname)
    script = ["BEGIN", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SHOW transaction_isolation", "COMMIT"]
    with RawConn(pg.host, pg.port) as conn:
        conn.startup("postgres", dbname)
        want = [conn.query(q) for q in script]
    with RawConn(cached.host, cached.port) as conn:
        conn.startup("postgres", dbname)
        assert [conn.query(q) for q in script] == want


def test_reads_of_a_transaction_that_rolls_back_are_stored(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    _setup(pg, dbname)
    marker = _marker()
    sql = f"SELECT v AS {marker} FROM t WHERE id = 2"
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port)) as conn:  # (not autocommit: BEGIN ... ROLLBACK)
        assert conn.execute(sql).fetchall() == [("two",)]
        conn.rollback()
        for _ in range(3):
            assert conn.execute(sql).fetchall() == [("two",)]
            conn.rollback()
    assert upstream_calls(pg, marker) == 1


def test_reads_after_a_write_are_not_stored_at_rollback(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    """`in_transaction: always` reads tables the transaction did not write; what it read after its first write is
    still not stored when it rolls back (its effects are not known to the proxy in full: triggers, functions)."""
    _setup(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "60s"}, rules=[{"tables": ["t", "u"], "in_transaction": "always"}])
    marker = _marker()
    # (pg_stat_statements keys statements by structure, not by column alias: the two differ in their select lists)
    before, after = f"SELECT v AS {marker}b FROM u WHERE id = 1", f"SELECT v AS {marker}a, id FROM u WHERE id = 1"
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port)) as conn:
        conn.execute(before).fetchall()
        conn.execute("UPDATE t SET v = 'changed' WHERE id = 1")
        conn.execute(after).fetchall()
        assert conn.execute("SELECT v FROM t WHERE id = 1").fetchall() == [("changed",)]  # its own write
        conn.rollback()
        for query in (before, after, before, after):
            conn.execute(query).fetchall()
            conn.rollback()
        with psycopg.connect(pg.dsn(dbname=dbname)) as direct:
            want = direct.execute("SELECT v FROM t WHERE id = 1").fetchall()
        assert conn.execute("SELECT v FROM t WHERE id = 1").fetchall() == want == [("old",)]
    assert upstream_calls(pg, f"{marker}b") == 1  # read before the write: stored at ROLLBACK
    assert upstream_calls(pg, f"{marker}a") == 2  # read after it: not stored then (stored by the next block)
