"""psycopg 3 (libpq) through the proxy, sync and async: every result is compared with a direct connection.

Both connections log in as the SCRAM user. The `direct` connection is in autocommit mode so that it always reads
what is committed now; the proxied connections say which mode they test.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

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
from tests.support.proxy import ProxyThread, through_both_relays

USER, PASSWORD = PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD

Connect = Callable[..., psycopg.Connection[Any]]


proxy = through_both_relays()  # every test here runs through both relays


def opener(pg: PgCluster, proxy: ProxyThread, dbname: str) -> Iterator[Connect]:
    """Yields `connect(proxied: bool, **kwargs)`, a sync connection to `dbname`; all are closed at teardown."""
    opened: list[psycopg.Connection[Any]] = []

    def open_one(proxied: bool, **kwargs: Any) -> psycopg.Connection[Any]:
        where = {"host": proxy.host, "port": proxy.port} if proxied else {}
        conn = psycopg.connect(pg.dsn(USER, PASSWORD, dbname, **where), **kwargs)
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        conn.close()


@pytest.fixture
def connect(pg: PgCluster, proxy: ProxyThread, dbname: str) -> Iterator[Connect]:
    """Connections to the per-test database."""
    yield from opener(pg, proxy, dbname)


@pytest.fixture(scope="module")
def shared_db(pg: PgCluster) -> Iterator[str]:
    """One database for the tests here that create nothing: CREATE DATABASE alone costs ~0.3 s, more than most of
    them. Tests that create objects use the per-test `dbname`."""
    name = pg.create_database(f"t_psycopg_{uuid.uuid4().hex[:8]}")
    yield name
    if pg.is_running():
        pg.drop_database(name)


@pytest.fixture
def shared_connect(pg: PgCluster, proxy: ProxyThread, shared_db: str) -> Iterator[Connect]:
    """Connections to `shared_db`."""
    yield from opener(pg, proxy, shared_db)


@pytest.fixture
def direct(connect: Connect) -> psycopg.Connection[Any]:
    return connect(False, autocommit=True)


@pytest.fixture
def proxied(connect: Connect) -> psycopg.Connection[Any]:
    return connect(True, autocommit=True)


@pytest.fixture
def typed(proxied: psycopg.Connection[Any]) -> None:
    proxied.execute(CREATE_TYPED)
    proxied.execute(FILL_TYPED)


def rows_and_columns(
    conn: psycopg.Connection[Any], query: str, params: Any = None, *, binary: bool = False
) -> tuple[list[tuple[Any, ...]], list[tuple[str, int]]]:
    with conn.cursor(binary=binary) as cur:
        cur.execute(query, params)
        assert cur.description is not None
        return cur.fetchall(), [(col.name, col.type_code) for col in cur.description]


def raised(conn: psycopg.Connection[Any], query: str, params: Any = None) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as excinfo:
        conn.execute(query, params)
    return excinfo.value


def diag(err: psycopg.Error) -> dict[str, Any]:
    names = ("sqlstate", "severity", "severity_nonlocalized", "message_primary", "message_detail", "message_hint")
    names += ("statement_position", "context", "source_function", "schema_name", "column_name", "datatype_name")
    return {name: getattr(err.diag, name) for name in names}


# -- results: types, text and binary, big and many ---------------------------------------------------------------


def test_typed_results_match_direct(direct: psycopg.Connection[Any], proxied: psycopg.Connection[Any], typed: None):
    for binary in (False, True):
        for query in (SELECT_TYPED, SELECT_LITERALS):
            rows_direct, cols_direct = rows_and_columns(direct, query, binary=binary)
            rows_proxied, cols_proxied = rows_and_columns(proxied, query, binary=binary)
            assert cols_proxied == cols_direct
            assert assert_same_rows(rows_direct, rows_proxied, f"{query[:30]} {binary=}") in (1, TYPED_ROW_COUNT)
        row = rows_and_columns(proxied, "SELECT txt, jb FROM typed WHERE id = 1", binary=binary)[0][0]
        assert row == ("héllo wörld — ☃ 日本語 🐘", {"k": {"nested": True}, "emoji": "🐘"})
    # Binary and text results decode to the same values.
    assert_same_rows(
        rows_and_columns(proxied, SELECT_TYPED)[0], rows_and_columns(proxied, SELECT_TYPED, binary=True)[0]
    )


def test_params_and_empty_results_match_direct(
    direct: psycopg.Connection[Any], proxied: psycopg.Connection[Any], typed: None
):
    query = (
        "SELECT id, txt, raw, ts, u FROM typed WHERE id = %s OR txt = %s OR raw = %s OR ts = %s OR u = %s ORDER BY id"
    )
    params = (2, "row 7 ✓ ü", bytes.fromhex("00ff10"), dt.datetime(2024, 1, 1, 0, 10, 15, tzinfo=dt.UTC), None)
    empty = "SELECT * FROM typed WHERE id = %s"
    for binary in (False, True):
        rows_direct = rows_and_columns(direct, query, params, binary=binary)
        assert [row[0] for row in rows_direct[0]] == [1, 2, 7, 10]
        assert rows_and_columns(proxied, query, params, binary=binary) == rows_direct
        rows_direct = rows_and_columns(direct, empty, (-1,), binary=binary)
        assert rows_direct[0] == [] and len(rows_direct[1]) == 14
        assert rows_and_columns(proxied, empty, (-1,), binary=binary) == rows_direct
    cur = proxied.execute("UPDATE typed SET flag = flag WHERE id < 0")
    assert (cur.rowcount, cur.statusmessage, cur.description) == (0, "UPDATE 0", None)


def test_100k_rows_match_direct(shared_connect: Connect):
    direct, proxied = shared_connect(False), shared_connect(True)
    # Binary here; the named-cursor test below reads the same 100k rows in text format.
    rows_direct, cols_direct = rows_and_columns(direct, SELECT_100K, binary=True)
    rows_proxied, cols_proxied = rows_and_columns(proxied, SELECT_100K, binary=True)
    assert cols_proxied == cols_direct
    assert assert_same_rows(rows_direct, rows_proxied) == ROWS_100K


def test_5mb_values_match_direct(direct: psycopg.Connection[Any], proxied: psycopg.Connection[Any]):
    proxied.execute("CREATE TABLE blobs (id int PRIMARY KEY, t text, b bytea)")
    proxied.execute("INSERT INTO blobs VALUES (%s, %s, %s)", (1, BIG_TEXT, BIG_BYTES))  # text-format params
    proxied.execute("INSERT INTO blobs VALUES (%b, %b, %b)", (2, BIG_TEXT, BIG_BYTES))  # binary-format params
    for binary in (False, True):
        query = "SELECT id, t, b, md5(b) FROM blobs ORDER BY id"
        rows_direct = rows_and_columns(direct, query, binary=binary)[0]
        assert [(row[1], row[2]) for row in rows_direct] == [(BIG_TEXT, BIG_BYTES)] * 2
        assert_same_rows(rows_direct, rows_and_columns(proxied, query, binary=binary)[0], f"binary={binary}")


# -- transactions -------------------------------------------------------------------------------------------------


def test_autocommit_off_rollback_really_rolls_back(connect: Connect, direct: psycopg.Connection[Any]):
    conn = connect(True)  # psycopg's default: autocommit off, every statement opens a transaction
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance numeric)")
    conn.commit()

    def ids(on: psycopg.Connection[Any]) -> list[int]:
        return [row[0] for row in on.execute("SELECT id FROM accounts ORDER BY id")]

    conn.execute("INSERT INTO accounts VALUES (1, 10.5)")
    assert conn.info.transaction_status is TransactionStatus.INTRANS
    assert ids(conn) == [1] and ids(direct) == []
    conn.rollback()
    assert ids(direct) == [] and ids(conn) == []
    conn.execute("INSERT INTO accounts VALUES (2, 20)")
    conn.commit()
    assert ids(direct) == [2]
    with pytest.raises(ZeroDivisionError), conn.transaction():
        conn.execute("INSERT INTO accounts VALUES (3, 30)")
        _ = 1 / 0
    conn.execute("INSERT INTO accounts VALUES (4, 40)")
    err = raised(conn, "INSERT INTO accounts VALUES (4, 40)")
    assert isinstance(err, errors.UniqueViolation)
    assert isinstance(raised(conn, "SELECT 1"), errors.InFailedSqlTransaction)
    conn.rollback()
    assert ids(direct) == ids(conn) == [2]
    assert_same_rows(
        direct.execute("SELECT * FROM accounts ORDER BY id").fetchall(),
        conn.execute("SELECT * FROM accounts ORDER BY id").fetchall(),
    )


def test_autocommit_on_commits_each_statement(proxied: psycopg.Connection[Any], direct: psycopg.Connection[Any]):
    proxied.execute("CREATE TABLE events (id int PRIMARY KEY, at timestamptz DEFAULT now())")
    proxied.execute("INSERT INTO events (id) VALUES (1)")
    assert proxied.info.transaction_status is TransactionStatus.IDLE
    assert direct.execute("SELECT id FROM events").fetchall() == [(1,)]
    with pytest.raises(RuntimeError), proxied.transaction():
        proxied.execute("INSERT INTO events (id) VALUES (2)")
        assert direct.execute("SELECT count(*) FROM events").fetchone() == (1,)
        raise RuntimeError
    with proxied.transaction():
        proxied.execute("INSERT INTO events (id) VALUES (3)")
        with pytest.raises(errors.UniqueViolation), proxied.transaction():  # a savepoint
            proxied.execute("INSERT INTO events (id) VALUES (1)")
    query = "SELECT id, at FROM events ORDER BY id"
    assert [row[0] for row in direct.execute(query)] == [1, 3]
    assert_same_rows(direct.execute(query).fetchall(), proxied.execute(query).fetchall())


# -- pipeline mode -------------------------------------------------------------------------------------------------


def pipelined_workload(conn: psycopg.Connection[Any], table: str) -> list[Any]:
    ident = sql.Identifier(table)
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, name text, score numeric)").format(ident))
    insert = sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(ident)
    select = sql.SQL("SELECT count(*), sum(score), max(name) FROM {} WHERE id <= %s").format(ident)
    cursors = []
    with conn.pipeline():
        for i in range(1, 301):
            conn.execute(insert, (i, f"name {i} ✓", Decimal(i) / 8))
            if i % 50 == 0:
                cursors.append(conn.execute(select, (i,)))
        cursors.append(conn.execute(sql.SQL("SELECT * FROM {} ORDER BY id DESC LIMIT 5").format(ident)))
        with conn.cursor() as cur:
            cur.executemany(insert, [(i, None, None) for i in range(301, 401)])
        cursors.append(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)))
    results = [cur.fetchall() for cur in cursors]
    if not conn.autocommit:
        conn.commit()
    return results


def test_pipeline_results_match_direct(connect: Connect, direct: psycopg.Connection[Any]):
    for autocommit in (True, False):
        tables = f"pipe_direct_{autocommit}", f"pipe_proxied_{autocommit}"
        results_direct = pipelined_workload(connect(False, autocommit=autocommit), tables[0])
        results_proxied = pipelined_workload(connect(True, autocommit=autocommit), tables[1])
        assert results_direct[-1] == [(400,)]
        assert len(results_proxied) == len(results_direct) == 8
        for got_direct, got_proxied in zip(results_direct, results_proxied, strict=True):
            assert_same_rows(got_direct, got_proxied, f"pipelined select, {autocommit=}")
        assert_same_rows(
            direct.execute(f'SELECT * FROM "{tables[0]}" ORDER BY id').fetchall(),
            direct.execute(f'SELECT * FROM "{tables[1]}" ORDER BY id').fetchall(),
            f"final tables, {autocommit=}",
        )


def test_pipeline_with_large_results_both_ways(shared_connect: Connect):
    # 300 statements, each with a 20 kB parameter and a 100 kB result: the client keeps writing while ~30 MB of
    # results come back, so the proxy's backpressure must not stall either direction.
    query = "SELECT %s::int AS i, length(%s::text) AS sent, repeat(chr(65 + %s::int %% 26), 100000) AS payload"
    results = []
    for proxied in (False, True):
        conn = shared_connect(proxied, autocommit=True)
        with conn.pipeline():
            cursors = [conn.execute(query, (i, "ü" * 10_000, i)) for i in range(300)]
        results.append([cur.fetchone() for cur in cursors])
    assert assert_same_rows(results[0], results[1], "pipelined big results") == 300
    assert results[1][27] == (27, 10_000, "B" * 100_000)


def pipeline_with_syntax_error(conn: psycopg.Connection[Any], table: str) -> tuple[dict[str, Any], list[Any]]:
    ident = sql.Identifier(table)
    conn.execute(sql.SQL("CREATE TABLE {} (id int)").format(ident))
    if not conn.autocommit:
        conn.commit()
    with pytest.raises(errors.SyntaxError) as excinfo, conn.pipeline():
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(ident))
        conn.execute("SELECT 1 FROM")
        conn.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(ident))
    if not conn.autocommit:
        conn.rollback()
    # The connection recovers: the next statements run normally, in and out of a pipeline.
    conn.execute(sql.SQL("INSERT INTO {} VALUES (3)").format(ident))
    with conn.pipeline():
        cur = conn.execute(sql.SQL("SELECT array_agg(id ORDER BY id) FROM {}").format(ident))
    if not conn.autocommit:
        conn.commit()
    return diag(excinfo.value), cur.fetchall()


def test_pipeline_syntax_error_then_recovery(connect: Connect):
    for autocommit in (True, False):
        conn_direct, conn_proxied = connect(False, autocommit=autocommit), connect(True, autocommit=autocommit)
        diag_direct, after_direct = pipeline_with_syntax_error(conn_direct, f"err_direct_{autocommit}")
        diag_proxied, after_proxied = pipeline_with_syntax_error(conn_proxied, f"err_proxied_{autocommit}")
        assert diag_proxied == diag_direct
        assert diag_proxied["sqlstate"] == "42601"
        assert after_proxied == after_direct
        # Either way the first INSERT shared the failed batch's transaction and is rolled back with it.
        assert after_proxied == [([3],)]


# -- server-side cursors, COPY, executemany, prepared statements --------------------------------------------------


def fetch_in_chunks(conn: psycopg.Connection[Any], query: str, size: int, binary: bool) -> tuple[Any, ...]:
    with conn.cursor(name="walk ✓", binary=binary, scrollable=True) as cur:
        cur.execute(query)
        rows: list[Any] = []
        sizes: list[int] = []
        while chunk := cur.fetchmany(size):
            rows.extend(chunk)
            sizes.append(len(chunk))
        cur.scroll(10, mode="absolute")
        again = cur.fetchone()
    conn.commit()  # a named cursor lives in a transaction (autocommit is off here)
    return rows, sizes, again


def test_named_cursor_fetchmany_matches_direct(connect: Connect, typed: None):
    conn_direct, conn_proxied = connect(False), connect(True)
    for query, size, binary, count in ((SELECT_100K, 7000, False, ROWS_100K), (SELECT_TYPED, 90, True, 1000)):
        rows_direct, sizes_direct, again_direct = fetch_in_chunks(conn_direct, query, size, binary)
        rows_proxied, sizes_proxied, again_proxied = fetch_in_chunks(conn_proxied, query, size, binary)
        assert sizes_proxied == sizes_direct and len(sizes_proxied) == -(-count // size)
        assert assert_same_rows(rows_direct, rows_proxied) == count
        assert again_proxied == again_direct == rows_direct[10]


def test_copy_from_stdin_write_row(direct: psycopg.Connection[Any], proxied: psycopg.Connection[Any]):
    create = """CREATE TABLE people (id int, name text, photo bytea, score numeric, born date, seen timestamptz,
                                     tags text[], prefs jsonb, key uuid, active bool)"""
    proxied.execute(create)
    rows = [
        (
            i,
            f"pérson {i} 🐘" if i % 10 else None,
            bytes([i % 256, 0, 255]) * (i % 4),
            Decimal(i) / 3 if i % 7 else None,
            dt.date(1950, 1, 1) + dt.timedelta(days=i),
            dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i * 37),
            [f"t{i}", "tab\there", 'quo"te'],
            Jsonb({"i": i, "ü": [1, None]}),
            uuid.UUID(int=i),
            i % 2 == 0,
        )
        for i in range(1, 3001)
    ]
    with proxied.cursor() as cur:
        with cur.copy("COPY people FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        assert cur.rowcount == 3000
    query = "SELECT * FROM people ORDER BY id"
    stored = direct.execute(query).fetchall()
    assert len(stored) == 3000 and stored[9][1] is None and stored[1][7] == {"i": 2, "ü": [1, None]}
    assert_same_rows(stored, proxied.execute(query).fetchall())
    # Raw blocks copied back in, binary format, through the proxy.
    proxied.execute("CREATE TABLE people2 (LIKE people)")
    with direct.cursor().copy("COPY people TO STDOUT (FORMAT BINARY)") as copy_out:
        dump = b"".join(copy_out)
    with proxied.cursor().copy("COPY people2 FROM STDIN (FORMAT BINARY)") as copy_in:
        for start in range(0, len(dump), 8192):
            copy_in.write(dump[start : start + 8192])
    assert_same_rows(stored, direct.execute(query.replace("people", "people2")).fetchall())


def test_copy_to_stdout_matches_direct(direct: psycopg.Connection[Any], proxied: psycopg.Connection[Any], typed: None):
    cases = [(SELECT_TYPED, "TEXT"), (SELECT_TYPED, "CSV"), (SELECT_TYPED, "BINARY"), (SELECT_100K, "TEXT")]
    for query, fmt in cases:
        statement = f"COPY ({query}) TO STDOUT (FORMAT {fmt})"
        with direct.cursor().copy(statement) as copy:
            out_direct = b"".join(copy)
        with proxied.cursor() as cur:
            with cur.copy(statement) as copy:
                out_proxied = b"".join(copy)
            assert cur.rowcount in (TYPED_ROW_COUNT, ROWS_100K)
        assert len(out_direct) > 10_000
        assert_same_value(out_direct, out_proxied, statement[:40])
    # Typed rows straight from COPY.
    with proxied.cursor().copy("COPY (SELECT id, txt, num FROM typed ORDER BY id) TO STDOUT") as copy:
        copy.set_types(["int4", "text", "numeric"])
        rows = list(copy.rows())
    assert_same_rows(direct.execute("SELECT id, txt, num FROM typed ORDER BY id").fetchall(), rows)


def test_executemany_matches_direct(direct: psycopg.Connection[Any], proxied: psycopg.Connection[Any]):
    proxied.execute("CREATE TABLE items (id serial PRIMARY KEY, name text, price numeric(12, 2), at date)")
    rows = [(f"item {i} ✓", Decimal(i) / 4, dt.date(2024, 1, 1) + dt.timedelta(days=i)) for i in range(2000)]
    with proxied.cursor() as cur:
        cur.executemany("INSERT INTO items (name, price, at) VALUES (%s, %s, %s)", rows)
        assert cur.rowcount == 2000
    query = "SELECT id, name, price, at FROM items ORDER BY id"
    stored = direct.execute(query).fetchall()
    assert_same_rows([(i + 1, n, p.quantize(Decimal("0.01")), d) for i, (n, p, d) in enumerate(rows)], stored)
    assert_same_rows(stored, proxied.execute(query).fetchall())


def flushed_then_synced(conn: psycopg.Connection[Any], table: str, scenario: str) -> list[Any]:
    """Writes whose replies the client reads after a Flush, before the Sync that ends the batch: what it got back."""
    conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, name text)")
    if scenario == "executemany_returning":
        # psycopg: Parse, (Bind, Describe, Execute) x n, Flush; reads every result; then Sync, Flush.
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} (name) VALUES (%s) RETURNING id", [("a",), ("b",)], returning=True)
            got = [cur.fetchall()]
            while cur.nextset():
                got.append(cur.fetchall())
        return got
    # A result fetched inside a pipeline block: Flush, read, and the Sync only when the block ends.
    with conn.pipeline():
        cur = conn.execute(f"INSERT INTO {table} (name) VALUES (%s) RETURNING id", ("a",))
        got = cur.fetchall()
    return [got]


@pytest.mark.parametrize("scenario", ["executemany_returning", "pipeline_fetch_then_sync"])
def test_writes_read_after_flush_are_committed_by_the_sync(
    connect: Connect, direct: psycopg.Connection[Any], scenario: str
):
    # Regression: the caching relay once answered the lone Sync itself, leaving the writes in an open transaction.
    outcomes = []
    for proxied in (False, True):
        conn = connect(proxied, autocommit=True)
        table = "flush_proxied" if proxied else "flush_direct"
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        returned = flushed_then_synced(conn, table, scenario)
        # After the ReadyForQuery the client got, the backend must be idle: nothing left open.
        state = direct.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", backend).fetchone()
        conn.close()  # a script that ends here must keep its writes
        stored = direct.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()
        outcomes.append((returned, state, stored))
    direct_outcome, proxied_outcome = outcomes
    inserted = [(i,) for i in range(1, len(direct_outcome[0]) + 1)]
    assert direct_outcome[1:] == (("idle",), inserted)
    assert proxied_outcome == direct_outcome


@pytest.mark.parametrize("threshold", [0, 5], ids=["prepare_at_once", "prepare_after_5"])
def test_prepared_statements_match_direct(connect: Connect, typed: None, threshold: int):
    conn_direct = connect(False, autocommit=True, prepare_threshold=threshold)
    conn_proxied = connect(True, autocommit=True, prepare_threshold=threshold)
    query = "SELECT id, num, jb, arr_txt FROM typed WHERE id BETWEEN %s AND %s + 2 ORDER BY id"
    for binary in (False, True):
        for i in range(1, 11):
            got_direct = conn_direct.cursor(binary=binary).execute(query, (i * 50, i * 50)).fetchall()
            got_proxied = conn_proxied.cursor(binary=binary).execute(query, (i * 50, i * 50)).fetchall()
            assert len(got_direct) == 3
            assert_same_rows(got_direct, got_proxied, f"run {i}")
    # The server really holds a prepared statement for the proxied session.
    held = conn_proxied.execute(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'SELECT id, num, jb, arr_txt FROM typed%%'"
    ).fetchone()
    assert held is not None and held[0] >= 1
    # prepare=True on a single execution, and a prepared statement that fails and then works again.
    assert conn_proxied.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone() == (42,)
    err_direct = raised(conn_direct, "SELECT 10 / %s::int", (0,))
    err_proxied = raised(conn_proxied, "SELECT 10 / %s::int", (0,))
    assert diag(err_proxied) == diag(err_direct) and err_proxied.sqlstate == "22012"
    assert conn_proxied.execute("SELECT 10 / %s::int", (5,), prepare=True).fetchone() == (2,)


def test_errors_and_notices_match_direct(direct: psycopg.Connection[Any], proxied: psycopg.Connection[Any]):
    for query in ("SELECT 1/0", "SELECT * FROM missing", "SELECT 'x'::int", "SELEC 1", "SELECT %s::int / 0"):
        params = (1,) if "%s" in query else None
        err_direct, err_proxied = raised(direct, query, params), raised(proxied, query, params)
        assert type(err_proxied) is type(err_direct)
        assert diag(err_proxied) == diag(err_direct)
        assert str(err_proxied) == str(err_direct)
        assert proxied.execute("SELECT 'still here'").fetchone() == ("still here",)
    notices: dict[str, list[tuple[Any, ...]]] = {"direct": [], "proxied": []}
    for name, conn in (("direct", direct), ("proxied", proxied)):
        conn.add_notice_handler(
            lambda d, name=name: notices[name].append((d.severity, d.sqlstate, d.message_primary, d.message_hint))
        )
        conn.execute("DO $$BEGIN RAISE NOTICE 'ünï %', 42 USING HINT = 'h'; RAISE WARNING 'w'; END$$")
    assert (
        notices["proxied"] == notices["direct"] == [("NOTICE", "00000", "ünï 42", "h"), ("WARNING", "01000", "w", None)]
    )


# -- async ------------------------------------------------------------------------------------------------------


@pytest.fixture
async def aconnect(pg: PgCluster, proxy: ProxyThread, dbname: str) -> AsyncIterator[Callable[..., Any]]:
    opened: list[psycopg.AsyncConnection[Any]] = []

    async def open_one(proxied: bool, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
        where = {"host": proxy.host, "port": proxy.port} if proxied else {}
        conn = await psycopg.AsyncConnection.connect(pg.dsn(USER, PASSWORD, dbname, **where), **kwargs)
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        await conn.close()


async def test_async_results_transactions_and_copy(aconnect: Callable[..., Any]):
    direct: psycopg.AsyncConnection[Any] = await aconnect(False, autocommit=True)
    proxied: psycopg.AsyncConnection[Any] = await aconnect(True)  # autocommit off
    await proxied.execute(CREATE_TYPED)
    await proxied.execute(FILL_TYPED)
    assert await (await direct.execute("SELECT to_regclass('typed')::text")).fetchone() == (None,)
    await proxied.commit()
    for binary in (False, True):
        rows_direct = await (await direct.cursor(binary=binary).execute(SELECT_TYPED)).fetchall()
        rows_proxied = await (await proxied.cursor(binary=binary).execute(SELECT_TYPED)).fetchall()
        assert assert_same_rows(rows_direct, rows_proxied) == TYPED_ROW_COUNT
    await proxied.execute("DELETE FROM typed WHERE id > 10")
    await proxied.rollback()
    assert await (await direct.execute("SELECT count(*) FROM typed")).fetchone() == (TYPED_ROW_COUNT,)
    async with proxied.pipeline():
        cursors = [await proxied.execute("SELECT %s::int * 2, %s::text", (i, f"ü{i}")) for i in range(100)]
    assert [await cur.fetchone() for cur in cursors] == [(i * 2, f"ü{i}") for i in range(100)]
    async with proxied.cursor(name="acur", binary=True) as cur:
        await cur.execute(SELECT_TYPED)
        walked = [row async for row in cur]
    rows_direct = await (await direct.execute(SELECT_TYPED)).fetchall()
    assert assert_same_rows(rows_direct, walked) == TYPED_ROW_COUNT
    async with proxied.cursor().copy("COPY (SELECT * FROM typed ORDER BY id) TO STDOUT (FORMAT CSV)") as copy:
        out_proxied = b"".join([bytes(block) async for block in copy])
    async with direct.cursor().copy("COPY (SELECT * FROM typed ORDER BY id) TO STDOUT (FORMAT CSV)") as copy:
        out_direct = b"".join([bytes(block) async for block in copy])
    assert_same_value(out_direct, out_proxied, "async COPY TO")
    await proxied.commit()


# -- cancel, startup options, session parameters, COPY failure ----------------------------------------------------


def test_cancel_from_another_thread(shared_connect: Connect, pg: PgCluster):
    # libpq 17+ cancels over a new connection that negotiates like the first one (SSLRequest, then CancelRequest).
    conn = shared_connect(True, autocommit=True)
    backend_pid = conn.execute("SELECT pg_backend_pid()").fetchone()
    timer = threading.Timer(0.3, conn.cancel_safe)
    started = time.monotonic()
    timer.start()
    try:
        err = raised(conn, "SELECT pg_sleep(10)")
    finally:
        timer.join()
    assert isinstance(err, errors.QueryCanceled)
    assert err.diag.message_primary == "canceling statement due to user request"
    assert time.monotonic() - started < 3
    assert conn.execute("SELECT pg_backend_pid()").fetchone() == backend_pid
    active = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'"
    assert pg.psql(active).strip() == "0"


def test_startup_options_and_session_parameters_match_direct(shared_connect: Connect):
    options = "-c statement_timeout=150 -c search_path=app,public -c DateStyle=SQL,DMY"
    conns = [
        shared_connect(proxied, autocommit=True, options=options, application_name="drivers-test") for proxied in (0, 1)
    ]
    results = []
    for conn in conns:
        conn.execute("SET TIME ZONE 'Asia/Kolkata'")
        seen = conn.execute(
            "SELECT current_setting('statement_timeout'), current_setting('search_path'), "
            "current_setting('application_name'), now()::date::text = current_date::text, "
            "'2024-06-30 12:34:56+00'::timestamptz::text, to_char(date '2024-06-30', 'DD Mon YYYY')"
        ).fetchone()
        reported = [conn.info.parameter_status(name) for name in ("TimeZone", "DateStyle", "application_name")]
        err = raised(conn, "SELECT pg_sleep(1)")  # statement_timeout from the startup packet applies
        results.append((seen, reported, diag(err)))
    assert results[1] == results[0]
    seen, reported, timeout = results[1]
    assert seen[:3] == ("150ms", "app,public", "drivers-test") and seen[4] == "30/06/2024 18:04:56 IST"
    assert reported == ["Asia/Kolkata", "SQL, DMY", "drivers-test"]
    assert timeout["sqlstate"] == "57014"


def test_protocol_and_ssl_negotiation_match_direct(pg: PgCluster, proxy: ProxyThread, shared_db: str):
    def attempt(proxied: bool, **params: str) -> str:
        host, port = (proxy.host, proxy.port) if proxied else (pg.host, pg.port)
        try:
            with psycopg.connect(pg.dsn(USER, PASSWORD, shared_db, host=host, port=port, **params)) as conn:
                return f"ok: protocol {conn.info.pgconn.protocol_version} {conn.execute('SELECT 1').fetchone()}"
        except psycopg.OperationalError as exc:
            return str(exc).replace(f"port {port}", "port PORT")

    # libpq asks for protocol 3.2; the v15 server answers NegotiateProtocolVersion during authentication.
    cases = [{"max_protocol_version": "latest"}, {"min_protocol_version": "3.2"}, {"sslmode": "require"}]
    for params in cases:
        assert attempt(True, **params) == attempt(False, **params), params
    assert attempt(True, **cases[0]) == "ok: protocol 3 (1,)"


def test_copy_from_stdin_aborted_by_the_client(connect: Connect):
    outcomes = []
    for proxied in (False, True):
        conn = connect(proxied, autocommit=True)
        table = "abort_proxied" if proxied else "abort_direct"
        conn.execute(f"CREATE TABLE {table} (id int)")
        # psycopg answers an exception inside the block with CopyFail, waits for the server's error, then re-raises.
        with (
            pytest.raises(RuntimeError, match="client gave up"),
            conn.cursor().copy(f"COPY {table} FROM STDIN") as copy,
        ):
            for i in range(1000):
                copy.write_row((i,))
            raise RuntimeError("client gave up")
        outcomes.append(
            (conn.info.transaction_status, conn.execute(f"SELECT count(*), 'after' FROM {table}").fetchone())
        )
    assert outcomes[1] == outcomes[0] == (TransactionStatus.IDLE, (0, "after"))


def test_listen_notify(connect: Connect):
    listener = connect(True, autocommit=True)
    listener.execute("LISTEN events")
    notifier = connect(True)
    for i in range(3):
        notifier.execute("SELECT pg_notify('events', %s)", (f"payload {i} ✓",))
    notifier.commit()  # delivered at commit, in order
    got = [(n.channel, n.payload) for n in listener.notifies(timeout=5, stop_after=3)]
    assert got == [("events", f"payload {i} ✓") for i in range(3)]
