"""pg8000 (pure Python, extended protocol with unnamed statements) through the proxy, for every password method.

SCRAM (alice), md5 (bob_md5) and cleartext `password` (carol_pw) each log in through the proxy, which relays the
exchange; results and the server's own authentication errors are compared with direct connections.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pg8000.dbapi
import pg8000.native
import pytest

from tests.support.compare import (
    BIG_BYTES,
    BIG_TEXT,
    CREATE_TYPED,
    FILL_TYPED,
    ROWS_100K,
    SELECT_100K,
    SELECT_LITERALS,
    SELECT_TYPED,
    TYPED_ROW_COUNT,
    assert_same_rows,
    assert_same_value,
)
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread

Connect = Callable[..., pg8000.native.Connection]

USERS = {
    "scram": (PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD),
    "md5": (PgCluster.MD5_USER, PgCluster.MD5_PASSWORD),
    "password": (PgCluster.PW_USER, PgCluster.PW_PASSWORD),
}


@pytest.fixture
def connect(pg: PgCluster, proxy: ProxyThread, dbname: str) -> Iterator[Connect]:
    """`connect(proxied, user=..., password=...)`: a native connection to the test database, closed at teardown."""
    opened: list[pg8000.native.Connection] = []

    def open_one(
        proxied: bool, user: str = PgCluster.SCRAM_USER, password: str = PgCluster.SCRAM_PASSWORD
    ) -> pg8000.native.Connection:
        host, port = (proxy.host, proxy.port) if proxied else (pg.host, pg.port)
        conn = pg8000.native.Connection(user, host=host, port=port, database=dbname, password=password, timeout=30)
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        conn.close()


def run_both(direct: pg8000.native.Connection, proxied: pg8000.native.Connection, query: str, **params: Any) -> list:
    rows_direct = direct.run(query, **params)
    cols_direct = [(col["name"], col["type_oid"]) for col in direct.columns or []]
    rows_proxied = proxied.run(query, **params)
    assert [(col["name"], col["type_oid"]) for col in proxied.columns or []] == cols_direct
    assert_same_rows(rows_direct, rows_proxied, query[:40])
    return rows_direct


def server_error(call: Callable[[], Any]) -> dict[str, str]:
    """The ErrorResponse fields pg8000 raises with (severity, code, message, file, line, routine...)."""
    with pytest.raises(pg8000.exceptions.DatabaseError) as excinfo:
        call()
    fields = excinfo.value.args[0]
    assert isinstance(fields, dict)
    return fields


def test_scram_native_queries_match_direct(connect: Connect):
    direct, proxied = connect(False), connect(True)
    proxied.run(CREATE_TYPED)
    proxied.run(FILL_TYPED)
    assert len(run_both(direct, proxied, SELECT_TYPED)) == TYPED_ROW_COUNT
    run_both(direct, proxied, SELECT_LITERALS)
    assert len(run_both(direct, proxied, SELECT_100K)) == ROWS_100K
    assert run_both(direct, proxied, "SELECT * FROM typed WHERE id < :n", n=0) == []
    rows = run_both(
        direct,
        proxied,
        "SELECT id, txt, num, jb FROM typed WHERE txt LIKE :pattern AND num > :low AND d < :day ORDER BY id",
        pattern="row 1_ ✓%",
        low=Decimal("1.5"),
        day=dt.date(2024, 1, 16),
    )
    assert [row[0] for row in rows] == [11, 12, 13, 14]
    assert proxied.run("SELECT current_user, :t::text || '✓'", t="ü") == [["alice", "ü✓"]]


def test_prepared_statements_and_big_values(connect: Connect):
    direct, proxied = connect(False), connect(True)
    proxied.run(CREATE_TYPED)
    proxied.run(FILL_TYPED)
    query = "SELECT id, i8, raw, arr_txt, iv FROM typed WHERE id BETWEEN :low AND :low + 4 ORDER BY id"
    stmt_direct, stmt_proxied = direct.prepare(query), proxied.prepare(query)
    for low in range(1, 1000, 37):
        rows_direct = stmt_direct.run(low=low)
        assert len(rows_direct) == 5
        assert_same_rows(rows_direct, stmt_proxied.run(low=low), f"low={low}")
    stmt_proxied.close()
    stmt_direct.close()
    proxied.run("CREATE TABLE blobs (id int, t text, b bytea)")
    proxied.run("INSERT INTO blobs VALUES (1, :t, :b)", t=BIG_TEXT, b=BIG_BYTES)
    rows_direct = direct.run("SELECT t, b FROM blobs")
    assert_same_value(BIG_TEXT, rows_direct[0][0], "text stored")
    assert_same_value(BIG_BYTES, rows_direct[0][1], "bytea stored")
    assert_same_rows(rows_direct, proxied.run("SELECT t, b FROM blobs"), "5 MB row")


def test_errors_and_transactions_match_direct(connect: Connect):
    direct, proxied = connect(False), connect(True)
    for query, params in [("SELECT 1/0", {}), ("SELECT 1/:z", {"z": 0}), ("SELECT * FROM nowhere", {}), ("SELEC", {})]:
        fields_direct = server_error(lambda q=query, p=params: direct.run(q, **p))
        fields_proxied = server_error(lambda q=query, p=params: proxied.run(q, **p))
        assert fields_proxied == fields_direct
        assert proxied.run("SELECT 1") == [[1]]
    assert server_error(lambda: proxied.run("SELECT 1/0"))["C"] == "22012"
    proxied.run("CREATE TABLE t (id int PRIMARY KEY)")
    proxied.run("START TRANSACTION")
    proxied.run("INSERT INTO t VALUES (1)")
    assert direct.run("SELECT count(*) FROM t") == [[0]]
    assert server_error(lambda: proxied.run("INSERT INTO t VALUES (1)"))["C"] == "23505"
    assert server_error(lambda: proxied.run("SELECT 1"))["C"] == "25P02"
    proxied.run("ROLLBACK")
    proxied.run("START TRANSACTION")
    proxied.run("INSERT INTO t VALUES (2)")
    proxied.run("COMMIT")
    assert direct.run("SELECT id FROM t") == proxied.run("SELECT id FROM t") == [[2]]


def test_each_password_method_logs_in_and_queries(connect: Connect):
    for user, password in USERS.values():
        direct, proxied = connect(False, user, password), connect(True, user, password)
        query = "SELECT current_user, session_user, :v::numeric * 2, :s::text"
        rows = run_both(direct, proxied, query, v=Decimal("1.25"), s="ünï ✓")
        assert rows == [[user, user, Decimal("2.50"), "ünï ✓"]]
        table = f"owned_by_{user}"
        proxied.run(f"CREATE TABLE {table} (id int, who text DEFAULT current_user)")
        proxied.run(f"INSERT INTO {table} (id) SELECT generate_series(1, 500)")
        assert len(run_both(direct, proxied, f"SELECT * FROM {table} ORDER BY id")) == 500
        assert direct.run("SELECT tableowner FROM pg_tables WHERE tablename = :t", t=table) == [[user]]


def test_wrong_password_gives_the_servers_error(connect: Connect, pg: PgCluster, proxy: ProxyThread):
    for user, password in USERS.values():
        fields_direct = server_error(lambda user=user: connect(False, user, "wrong-password"))
        fields_proxied = server_error(lambda user=user: connect(True, user, "wrong-password"))
        assert fields_proxied == fields_direct
        assert fields_proxied["C"] == "28P01"
        assert fields_proxied["M"] == f'password authentication failed for user "{user}"'
        # The proxy is still fine afterwards.
        assert connect(True, user, password).run("SELECT 1") == [[1]]
    # A database that does not exist: the server's FATAL 3D000, relayed as is.
    user, password = USERS["scram"]
    missing = [
        server_error(
            lambda h=host, p=port: pg8000.native.Connection(user, password=password, host=h, port=p, database="nodb")
        )
        for host, port in ((pg.host, pg.port), (proxy.host, proxy.port))
    ]
    assert missing[1] == missing[0]
    assert missing[1]["C"] == "3D000" and missing[1]["M"] == 'database "nodb" does not exist'


def test_dbapi_cursor_executemany_and_rollback(pg: PgCluster, proxy: ProxyThread, dbname: str):
    kwargs = {"user": PgCluster.SCRAM_USER, "password": PgCluster.SCRAM_PASSWORD, "database": dbname}
    direct = pg8000.dbapi.connect(host=pg.host, port=pg.port, **kwargs)
    proxied = pg8000.dbapi.connect(host=proxy.host, port=proxy.port, **kwargs)
    try:
        cur = proxied.cursor()
        cur.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(8, 2))")
        rows = [(i, f"item {i} ✓", Decimal(i) / 4) for i in range(1, 301)]
        cur.executemany("INSERT INTO items VALUES (%s, %s, %s)", rows)
        proxied.commit()
        cur.execute("DELETE FROM items WHERE id > %s", (10,))
        assert cur.rowcount == 290
        proxied.rollback()
        query = "SELECT id, name, price FROM items ORDER BY id"
        direct_cur = direct.cursor()
        direct_cur.execute(query)
        stored = direct_cur.fetchall()
        cur.execute(query)
        assert_same_rows(stored, cur.fetchall())
        assert_same_rows([(i, n, p.quantize(Decimal("0.01"))) for i, n, p in rows], stored)
        direct.rollback()
    finally:
        proxied.close()
        direct.close()
