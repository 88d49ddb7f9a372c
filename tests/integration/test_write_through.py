"""`strategy: write_through`: after a committed write, the results it made stale are run again (on the writing
session's own connection, once it is idle) and stored fresh, so that the next read, by any session, hits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from tests.support.cachetest import connect_via, new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import SYNC, RawConn, bind, execute, parse, shape


def _create_accounts(pg: PgCluster, dbname: str) -> None:
    pg.psql(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance int);"
        "INSERT INTO accounts SELECT g, 100 FROM generate_series(1, 20) g;"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


def _proxy(start_proxy: Callable[..., ProxyThread], strategy: str, **sections: object) -> ProxyThread:
    return start_proxy(rules=[{"tables": ["accounts"], "ttl": "10m", "strategy": strategy}], **sections)


def _refreshes(proxy: ProxyThread) -> dict[str, int]:
    return proxy.app.metrics.snapshot()["write_through_refreshes"]  # type: ignore[index, return-value]


def _wait_refreshed(proxy: ProxyThread, count: int) -> None:
    deadline = time.monotonic() + 10
    while sum(_refreshes(proxy).values()) < count:
        assert time.monotonic() < deadline, f"refreshes: {_refreshes(proxy)}"
        time.sleep(0.005)


@pytest.mark.parametrize("transaction", [False, True], ids=["autocommit", "transaction"])
def test_the_next_read_after_a_write_hits_fresh_data(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread], transaction: bool
) -> None:
    _create_accounts(pg, dbname)
    proxy = _proxy(start_proxy, "write_through")
    marker = new_marker()
    sql = f"SELECT balance AS {marker} FROM accounts WHERE id = 1"
    with connect_via(pg, dbname, proxy) as writer, connect_via(pg, dbname, proxy) as reader:
        assert reader.execute(sql).fetchone() == (100,)  # a miss: stored
        writer.execute(sql).fetchall()  # a hit: the writer's session has the same role and settings
        if transaction:
            with writer.transaction():
                writer.execute("UPDATE accounts SET balance = 5 WHERE id = 1")
        else:
            writer.execute("UPDATE accounts SET balance = 5 WHERE id = 1")
        _wait_refreshed(proxy, 1)
        assert _refreshes(proxy)["stored"] == 1
        assert reader.execute(sql).fetchone() == (5,)  # a hit, fresh
    assert upstream_calls(pg, marker) == 2  # the first miss and the refresh


def test_lazy_drops_and_the_next_read_misses(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _create_accounts(pg, dbname)
    proxy = _proxy(start_proxy, "lazy")
    marker = new_marker()
    sql = f"SELECT balance AS {marker} FROM accounts WHERE id = 2"
    with connect_via(pg, dbname, proxy) as conn:
        conn.execute(sql).fetchall()
        conn.execute("UPDATE accounts SET balance = 6 WHERE id = 2")
        assert conn.execute(sql).fetchone() == (6,)
    assert upstream_calls(pg, marker) == 2
    assert sum(_refreshes(proxy).values()) == 0


def test_extended_protocol_results_are_refreshed_byte_for_byte(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _create_accounts(pg, dbname)
    proxy = _proxy(start_proxy, "write_through")
    marker = new_marker()
    sql = f"SELECT id, balance AS {marker} FROM accounts WHERE id = $1"

    async def run() -> tuple[list[object], list[object]]:
        via = await asyncpg.connect(pg.url(dbname=dbname, port=proxy.port))
        direct = await asyncpg.connect(pg.url(dbname=dbname))
        try:
            await via.fetchrow(sql, 3)  # binary results, a parameter: the refresh replays the same Bind
            await via.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 3")
            await asyncio.sleep(0)  # (the refresh runs when the writer's session is idle: it is, now)
            got = [await via.fetchrow(sql, 3) for _ in range(3)]
            return got, [await direct.fetchrow(sql, 3)]
        finally:
            await via.close()
            await direct.close()

    got, want = asyncio.run(run())
    assert got == want * 3
    assert _refreshes(proxy)["stored"] == 1
    assert upstream_calls(pg, marker) == 3  # the miss, the refresh, the direct read


def test_a_refresh_that_fails_is_the_proxys_own_business(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _create_accounts(pg, dbname)
    proxy = _proxy(start_proxy, "write_through")
    sql = "SELECT 100 / (balance - 50) AS ratio FROM accounts WHERE id = 4"
    with connect_via(pg, dbname, proxy) as conn:
        assert conn.execute(sql).fetchone() == (2,)
        conn.execute("UPDATE accounts SET balance = 50 WHERE id = 4")  # the refresh divides by zero ...
        _wait_refreshed(proxy, 1)
        assert _refreshes(proxy)["failed"] == 1
        assert conn.execute("SELECT 42").fetchone() == (42,)  # ... and the client never sees that error
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(sql)  # its own read gets the server's answer


def test_refreshes_stay_within_the_concurrency_and_hottest_go_first(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _create_accounts(pg, dbname)
    proxy = _proxy(start_proxy, "write_through", write_through={"concurrency": 2})
    marker = new_marker()  # (pg_stat_statements counts the six statements as one: they differ only in constants)
    with connect_via(pg, dbname, proxy) as conn:
        for key in range(1, 7):
            for _ in range(key):  # key 6 is read 6 times: the hottest
                conn.execute(f"SELECT balance AS {marker} FROM accounts WHERE id = {key}").fetchall()
        conn.execute("UPDATE accounts SET balance = 0")
        _wait_refreshed(proxy, 6)
        assert _refreshes(proxy) == {"stored": 2, "failed": 0, "skipped": 4}
        assert upstream_calls(pg, marker) == 6 + 2
        for key in (6, 5):  # refreshed: hits
            assert conn.execute(f"SELECT balance AS {marker} FROM accounts WHERE id = {key}").fetchone() == (0,)
        assert upstream_calls(pg, marker) == 8
        for key in (1, 2, 3, 4):  # dropped: misses
            assert conn.execute(f"SELECT balance AS {marker} FROM accounts WHERE id = {key}").fetchone() == (0,)
        assert upstream_calls(pg, marker) == 12


# A SET earlier in the same extended batch does not change which entries a write-through refresh fills.
def test_refresh_after_set_in_batch(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    pg.psql(
        "CREATE TABLE acc (id int PRIMARY KEY, b int); INSERT INTO acc VALUES (1, 100);"
        "CREATE SCHEMA other; CREATE TABLE other.acc (id int PRIMARY KEY, b int); INSERT INTO other.acc VALUES (1, -1);"
        "GRANT ALL ON SCHEMA other TO PUBLIC; GRANT ALL ON ALL TABLES IN SCHEMA public, other TO PUBLIC;",
        dbname=dbname,
    )
    proxy = start_proxy(rules=[{"tables": ["acc"], "ttl": "10m", "strategy": "write_through"}])
    m = new_marker()
    sql = f"SELECT b AS {m} FROM acc WHERE id = 1"
    with RawConn(proxy.host, proxy.port) as w, connect_via(pg, dbname, proxy) as reader:
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

        time.sleep(0.5)
        print(proxy.app.metrics.snapshot()["write_through_refreshes"])
        print(shape(w.query("SHOW search_path")))
        r = reader.execute(sql).fetchall()
        print("reader (search_path public):", r)
        assert r == [(200,)]
