"""The cache, end to end: hits answered without the upstream, misses filled, writes invalidating, and every
result equal to what PostgreSQL itself returns. Upstream executions are counted with pg_stat_statements."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from cacheproxy.protocol.framing import encode
from tests.support.cachetest import create_items, new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import RawConn


@pytest.fixture
def cached(start_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return start_proxy(cache={"default_ttl": "60s"})


def _raw_exchange(
    host: str, port: int, dbname: str, queries: list[str], user: str = "postgres"
) -> list[list[tuple[str, bytes]]]:
    with RawConn(host, port) as conn:
        conn.startup(user, dbname)
        return [conn.query(q) for q in queries]


def test_second_simple_read_is_a_hit_byte_for_byte(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    marker = new_marker()
    sql = f"SELECT id AS {marker}, name, price, tags, data, at, doc, note FROM items WHERE id <= 300 ORDER BY id"
    via = _raw_exchange(cached.host, cached.port, dbname, [sql, sql, sql])
    [direct] = _raw_exchange(pg.host, pg.port, dbname, [sql])
    assert via[0] == direct and via[1] == direct and via[2] == direct  # RowDescription, DataRows, tag, 'Z'
    assert upstream_calls(pg, marker) == 2  # one through the proxy (the miss), one direct


def test_hits_for_every_driver_protocol(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    marker = new_marker()
    sql = f"SELECT id AS {marker}, name, price FROM items WHERE id = $1"

    async def run() -> tuple[list[object], list[object]]:
        via = await asyncpg.connect(pg.url(dbname=dbname, port=cached.port))
        direct = await asyncpg.connect(pg.url(dbname=dbname))
        try:
            got = [await via.fetchrow(sql, 7) for _ in range(5)]
            statement = await via.prepare(sql)
            got += [await statement.fetchrow(7) for _ in range(5)]
            want = [await direct.fetchrow(sql, 7)]
            return got, want
        finally:
            await via.close()
            await direct.close()

    got, want = asyncio.run(run())
    assert got == want * 10
    assert upstream_calls(pg, marker) == 2  # once through the proxy, once direct


def test_psycopg_binary_and_pipeline_hits(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    marker = new_marker()
    sql = f"SELECT id AS {marker}, name, price, data, at FROM items WHERE id = %s"
    with (
        psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as via,
        psycopg.connect(pg.dsn(dbname=dbname), autocommit=True) as direct,
    ):
        for binary in (False, True):
            want = direct.cursor(binary=binary).execute(sql, (3,)).fetchall()
            for _ in range(4):
                assert via.cursor(binary=binary).execute(sql, (3,)).fetchall() == want
        want = direct.execute(sql, (5,)).fetchall()
        assert via.execute(sql, (5,)).fetchall() == want  # the miss that fills the entry
        with via.pipeline():
            cursors = [via.execute(sql, (5,)) for _ in range(6)]
        assert [c.fetchall() for c in cursors] == [want] * 6
    # Through the proxy: one miss each for text, binary and id 5 (the pipelined batch is all hits); direct: 3.
    assert upstream_calls(pg, marker) == 3 + 3


def test_writes_invalidate(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as conn:
        read = "SELECT name FROM items WHERE id = 1"
        assert conn.execute(read).fetchone() == ("item 1",)
        assert conn.execute(read).fetchone() == ("item 1",)
        conn.execute("UPDATE items SET name = 'renamed' WHERE id = 1")
        assert conn.execute(read).fetchone() == ("renamed",)
        with conn.transaction():
            conn.execute("UPDATE items SET name = 'in tx' WHERE id = 1")
        assert conn.execute(read).fetchone() == ("in tx",)
        conn.execute("DELETE FROM items WHERE id = 1")
        assert conn.execute(read).fetchone() is None
        conn.execute("INSERT INTO items (id, name) VALUES (1, 'back')")
        assert conn.execute(read).fetchone() == ("back",)
        conn.execute("TRUNCATE items")
        assert conn.execute(read).fetchone() is None


def test_another_sessions_write_invalidates(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    read = "SELECT price FROM items WHERE id = 2"
    with (
        psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as reader,
        psycopg.connect(pg.dsn(dbname=dbname, port=cached.port)) as writer,
    ):
        before = reader.execute(read).fetchone()
        assert reader.execute(read).fetchone() == before
        writer.execute("UPDATE items SET price = price + 1 WHERE id = 2")
        assert reader.execute(read).fetchone() == before  # not committed yet
        writer.commit()
        after = reader.execute(read).fetchone()
        assert after is not None and before is not None and after[0] == before[0] + 1


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT now() AS {m}",
        "SELECT random() AS {m}",
        "SELECT id AS {m} FROM items WHERE id = 1 FOR UPDATE",
        "SELECT 'now'::timestamptz AS {m}",
        "SELECT count(*) AS {m} FROM pg_class",
        "SELECT nextval('items_seq') AS {m}",
    ],
)
def test_never_cached(pg: PgCluster, dbname: str, cached: ProxyThread, sql: str) -> None:
    create_items(pg, dbname)
    pg.psql("CREATE SEQUENCE items_seq", dbname=dbname)
    marker = new_marker()
    sql = sql.format(m=marker)
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as conn:
        for _ in range(3):
            conn.execute(sql).fetchall()
    assert upstream_calls(pg, marker) == 3


def test_views_are_not_cached_but_answer_correctly(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    pg.psql("CREATE VIEW cheap AS SELECT id, name FROM items WHERE price < 10", dbname=dbname)
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as conn:
        count = conn.execute("SELECT count(*) FROM cheap").fetchone()
        conn.execute("DELETE FROM items WHERE id = 1")
        assert conn.execute("SELECT count(*) FROM cheap").fetchone() == (count[0] - 1,)  # type: ignore[index]


def test_session_state_partitions_the_cache(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    pg.psql("CREATE SCHEMA other; CREATE TABLE other.items AS SELECT 1 AS id, 'other' AS name;", dbname=dbname)
    pg.psql("GRANT USAGE ON SCHEMA other TO PUBLIC; GRANT SELECT ON other.items TO PUBLIC", dbname=dbname)
    read = "SELECT name FROM items WHERE id = 1"
    zone = "SELECT at FROM items WHERE id = 1"
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as a:
        assert a.execute(read).fetchone() == ("item 1",)
        utc = a.execute(zone).fetchone()
        a.execute("SET search_path = other, public")
        assert a.execute(read).fetchone() == ("other",)
        a.execute("RESET search_path")
        assert a.execute(read).fetchone() == ("item 1",)
        a.execute("SET TIME ZONE 'Asia/Tokyo'")
        tokyo = a.execute(zone).fetchone()
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as b:
        assert b.execute(read).fetchone() == ("item 1",)
        assert b.execute(zone).fetchone() == utc
    assert utc is not None and tokyo is not None and utc[0] == tokyo[0]  # same instant, other rendering
    with RawConn(cached.host, cached.port) as raw, RawConn(pg.host, pg.port) as direct:
        raw.startup("postgres", dbname)
        direct.startup("postgres", dbname)
        for conn in (raw, direct):
            conn.query("SET TIME ZONE 'Asia/Tokyo'")
        text = "SELECT at::text FROM items WHERE id = 1"
        assert raw.query(text) == direct.query(text)


def test_roles_get_their_own_entries(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    pg.psql(
        "ALTER TABLE items ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY only_cheap ON items FOR SELECT TO alice USING (price < 5);",
        dbname=dbname,
    )
    read = "SELECT count(*) FROM items"
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port)) as owner:
        assert owner.execute(read).fetchone() == (500,)
        assert owner.execute(read).fetchone() == (500,)
    alice = pg.dsn(user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD, dbname=dbname, port=cached.port)
    with psycopg.connect(alice) as conn:
        assert conn.execute(read).fetchone() == (3,)
        assert conn.execute(read).fetchone() == (3,)


def test_expired_entries_are_fetched_again(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    create_items(pg, dbname)
    proxy = start_proxy(rules=[{"tables": ["public.items"], "ttl": "300ms"}])
    marker = new_marker()
    sql = f"SELECT name AS {marker} FROM items WHERE id = 4"
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
        conn.execute(sql).fetchall()
        conn.execute(sql).fetchall()
        assert upstream_calls(pg, marker) == 1
        time.sleep(0.5)
        conn.execute(sql).fetchall()
        assert upstream_calls(pg, marker) == 2


def test_rule_none_is_never_cached(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    create_items(pg, dbname)
    proxy = start_proxy(rules=[{"tables": ["items"], "strategy": "none"}])
    marker = new_marker()
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
        for _ in range(3):
            conn.execute(f"SELECT name AS {marker} FROM items WHERE id = 4").fetchall()
    assert upstream_calls(pg, marker) == 3


def test_temp_table_shadowing_is_not_cached(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    read = "SELECT name FROM items WHERE id = 1"
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as conn:
        assert conn.execute(read).fetchone() == ("item 1",)
        conn.execute("CREATE TEMP TABLE items AS SELECT 1 AS id, 'temp' AS name")
        assert conn.execute(read).fetchone() == ("temp",)
        assert conn.execute(read).fetchone() == ("temp",)


def test_ddl_changes_the_row_description(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    read = "SELECT * FROM items WHERE id = 1"
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as conn:
        cur = conn.execute(read)
        cur.fetchall()
        before = [d.name for d in cur.description or []]
        conn.execute("ALTER TABLE items ADD COLUMN extra int DEFAULT 7")
        cur = conn.execute(read)
        assert cur.fetchone()[-1] == 7  # type: ignore[index]
        assert [d.name for d in cur.description or []] == [*before, "extra"]


def test_pipelined_reads_and_writes_keep_their_order(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    read = "SELECT name FROM items WHERE id = 9\x00"
    with RawConn(cached.host, cached.port) as conn:
        conn.startup("postgres", dbname)
        conn.query(read[:-1])  # warm the cache
        batch = encode(b"Q", read.encode()) + encode(b"Q", b"UPDATE items SET name = 'nine' WHERE id = 9\x00")
        batch += encode(b"Q", read.encode())
        conn.send(batch)
        replies = [conn.recv_until("Z") for _ in range(3)]
    names = [[body for t, body in reply if t == "D"] for reply in replies]
    assert names[0] == [b"\x00\x01\x00\x00\x00\x06item 9"]
    assert names[2] == [b"\x00\x01\x00\x00\x00\x04nine"]


def test_cache_counts_hits_and_misses(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    create_items(pg, dbname)
    assert cached.app is not None and cached.app.cache is not None
    engine = cached.app.cache.engine
    before = engine.stats()
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as conn:
        for _ in range(5):
            conn.execute("SELECT name FROM items WHERE id = 11", prepare=False).fetchall()
    after = engine.stats()
    assert after.hits - before.hits == 4
    assert after.sets - before.sets >= 1


def test_a_table_created_through_the_proxy_is_cached_once_committed(
    pg: PgCluster, dbname: str, cached: ProxyThread
) -> None:
    marker = new_marker()
    with psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as conn:
        with conn.transaction():
            conn.execute("CREATE TABLE fresh (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO fresh VALUES (1, 'one')")
        for _ in range(4):
            assert conn.execute(f"SELECT v AS {marker} FROM fresh WHERE id = 1").fetchone() == ("one",)
    assert upstream_calls(pg, marker) == 1
