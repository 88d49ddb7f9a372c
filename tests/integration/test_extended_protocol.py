"""Extended-protocol message sequences through the caching relay (portals, Flush, Close, COPY, errors before a Sync,
SET and writes inside a batch): each compared with PostgreSQL itself or checked for a stale read. Every one of them
once gave a wrong answer or hung."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import (
    FLUSH,
    SYNC,
    RawConn,
    bind,
    describe_portal,
    execute,
    parse,
    query,
    shape,
)


@pytest.fixture
def env(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> Iterator[tuple[PgCluster, str, ProxyThread]]:
    pg.psql(
        "CREATE TABLE items (id int PRIMARY KEY, name text);"
        "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;"
        "CREATE SCHEMA s2; CREATE TABLE s2.items (id int, name text); INSERT INTO s2.items VALUES (1, 's2 row');"
        "CREATE TABLE copytab (v int);",
        dbname=dbname,
    )
    yield pg, dbname, start_proxy(cache={"default_ttl": "60s"})


def _conn(host: str, port: int, dbname: str) -> RawConn:
    conn = RawConn(host, port, timeout=5)
    conn.startup("postgres", dbname)
    return conn


def _both(env: tuple[PgCluster, str, ProxyThread]) -> tuple[RawConn, RawConn]:
    pg, dbname, proxy = env
    return _conn(proxy.host, proxy.port, dbname), _conn(pg.host, pg.port, dbname)


def _replies(conn: RawConn, data: bytes, count: int = 1, last: str = "Z") -> list[str]:
    conn.send(data)
    out: list[str] = []
    for _ in range(count):
        out += shape(conn.recv_until(last))
    return out


def test_a_second_execute_of_a_portal_is_not_stored_as_the_first(env: tuple[PgCluster, str, ProxyThread]) -> None:
    via, direct = _both(env)
    sql = "SELECT id FROM items WHERE id <= 9 ORDER BY id"
    batches = [
        parse("", sql) + bind() + execute(max_rows=2) + execute(max_rows=2) + SYNC,
        parse("", sql) + bind() + execute(max_rows=2) + SYNC,
        parse("", sql) + bind() + execute() + execute() + SYNC,
        parse("", sql) + bind() + execute() + SYNC,
    ]
    for batch in batches:
        assert _replies(via, batch) == _replies(direct, batch)


def test_requests_after_an_error_and_a_flush_do_not_hang_the_session(env: tuple[PgCluster, str, ProxyThread]) -> None:
    via, direct = _both(env)
    for conn in (via, direct):
        conn.send(parse("", "SELECT 1/0") + bind() + execute() + FLUSH)
        assert shape(conn.recv_until("E")) == ["1", "E22012"]
        assert _replies(conn, bind() + execute() + SYNC) == ["ZI"]  # discarded by the server up to the Sync
        assert _replies(conn, query("SELECT 42")) == ["T", "D42", "CSELECT 1", "ZI"]


def test_extended_copy_from_stdin_keeps_the_replies_in_step(env: tuple[PgCluster, str, ProxyThread]) -> None:
    via, direct = _both(env)
    for conn in (via, direct):
        conn.send(parse("", "COPY copytab FROM STDIN") + bind() + execute() + SYNC)
        assert shape(conn.recv_until("G")) == ["1", "2", "G"]
        conn.send(b"d\x00\x00\x00\x067\n" + b"c\x00\x00\x00\x04" + SYNC)
        assert shape(conn.recv_until("Z")) == ["CCOPY 1", "ZI"]
        assert _replies(conn, query("SELECT count(*) FROM copytab"))[1] in ("D1", "D2")


def test_a_write_held_by_flush_is_invalidated_again_at_its_sync(env: tuple[PgCluster, str, ProxyThread]) -> None:
    _pg, dbname, proxy = env
    writer, reader = _conn(proxy.host, proxy.port, dbname), _conn(proxy.host, proxy.port, dbname)
    read = query("SELECT name FROM items WHERE id = 8")
    writer.send(parse("", "UPDATE items SET name = 'w8' WHERE id = 8") + bind() + execute() + FLUSH)
    assert shape(writer.recv_until("C")) == ["1", "2", "CUPDATE 1"]
    assert "Ditem 8" in _replies(reader, read)  # filled while the write is uncommitted
    assert _replies(writer, SYNC) == ["ZI"]  # commits
    assert "Dw8" in _replies(reader, read)


def test_a_commit_pipelined_with_a_slow_query_invalidates_at_once(env: tuple[PgCluster, str, ProxyThread]) -> None:
    _pg, dbname, proxy = env
    writer, reader = _conn(proxy.host, proxy.port, dbname), _conn(proxy.host, proxy.port, dbname)
    read = query("SELECT name FROM items WHERE id = 12")
    _replies(writer, query("BEGIN") + query("UPDATE items SET name = 'w12' WHERE id = 12"), count=2)
    assert "Ditem 12" in _replies(reader, read)
    writer.send(query("COMMIT") + query("SELECT pg_sleep(1)"))
    assert shape(writer.recv_until("Z")) == ["CCOMMIT", "ZI"]
    assert "Dw12" in _replies(reader, read)  # while the writer's second query still runs
    writer.recv_until("Z")


def test_settings_changed_out_of_sight_are_not_shared(env: tuple[PgCluster, str, ProxyThread]) -> None:
    _pg, dbname, proxy = env
    changer, other = _conn(proxy.host, proxy.port, dbname), _conn(proxy.host, proxy.port, dbname)
    read = query("SELECT name FROM items WHERE id = 1")
    _replies(changer, query("SELECT set_config('search_path', 's2', false)"))
    assert "Ds2 row" in _replies(changer, read)
    assert "Ditem 1" in _replies(other, read)
    _replies(changer, query("BEGIN") + query("DISCARD ALL") + query("ROLLBACK"), count=3)
    assert "Ds2 row" in _replies(changer, read)  # the failed DISCARD changed nothing


def test_sql_prepared_statement_executed_over_the_protocol_invalidates(env: tuple[PgCluster, str, ProxyThread]) -> None:
    _pg, dbname, proxy = env
    writer, reader = _conn(proxy.host, proxy.port, dbname), _conn(proxy.host, proxy.port, dbname)
    read = query("SELECT name FROM items WHERE id = 16")
    _replies(writer, query("PREPARE upd AS UPDATE items SET name = 'w16' WHERE id = 16"))
    assert "Ditem 16" in _replies(reader, read)
    assert _replies(writer, bind(statement="upd") + execute() + SYNC) == ["2", "CUPDATE 1", "ZI"]
    assert "Dw16" in _replies(reader, read)


def test_temporary_views_shadow_tables_for_their_session_only(env: tuple[PgCluster, str, ProxyThread]) -> None:
    _pg, dbname, proxy = env
    owner, other = _conn(proxy.host, proxy.port, dbname), _conn(proxy.host, proxy.port, dbname)
    read = query("SELECT name FROM items WHERE id = 1")
    _replies(owner, query("CREATE TEMP VIEW items AS SELECT 1 AS id, 'temp view'::text AS name"))
    assert "Dtemp view" in _replies(owner, read)
    assert "Ditem 1" in _replies(other, read)


def test_a_portal_kept_by_flush_exists_upstream(env: tuple[PgCluster, str, ProxyThread]) -> None:
    via, direct = _both(env)
    sql = "SELECT id FROM items WHERE id <= 3 ORDER BY id"
    for conn in (via, direct):  # warm the cache, then hold the portal open with a Flush
        _replies(conn, parse("", sql) + bind() + execute(max_rows=1) + SYNC)
    for conn in (via, direct):
        conn.send(parse("", sql) + bind() + describe_portal() + execute(max_rows=1) + FLUSH)
        assert shape(conn.recv_until("s")) == ["1", "2", "T", "D1", "s"]
        assert _replies(conn, execute(max_rows=1) + SYNC) == ["D2", "s", "ZI"]


def test_a_query_drops_the_unnamed_statement(env: tuple[PgCluster, str, ProxyThread]) -> None:
    via, direct = _both(env)
    sql = "SELECT name FROM items WHERE id = 25"
    for conn in (via, direct):
        _replies(conn, parse("", sql) + bind() + execute() + SYNC)
        _replies(conn, parse("", sql) + bind() + execute() + SYNC)
    assert _replies(via, query("SELECT 1") + bind() + execute() + SYNC, count=2) == _replies(
        direct, query("SELECT 1") + bind() + execute() + SYNC, count=2
    )


def _copy_data(row: bytes) -> bytes:
    return b"d" + (len(row) + 4).to_bytes(4, "big") + row


COPY_DONE = b"c\x00\x00\x00\x04"


def test_a_bad_row_in_extended_copy_keeps_the_session_in_step(env: tuple[PgCluster, str, ProxyThread]) -> None:
    via, direct = _both(env)
    for conn in (via, direct):
        conn.send(parse("", "COPY copytab FROM STDIN") + bind() + execute() + SYNC)
        assert shape(conn.recv_until("G")) == ["1", "2", "G"]
        conn.send(_copy_data(b"not a number\n"))
        assert shape(conn.recv_until("E")) == ["E22P02"]
        conn.send(COPY_DONE + SYNC)
        assert shape(conn.recv_until("Z")) == ["ZI"]
        assert _replies(conn, query("SELECT 7")) == ["T", "D7", "CSELECT 1", "ZI"]


def test_extended_copy_sent_in_one_write_keeps_the_session_in_step(env: tuple[PgCluster, str, ProxyThread]) -> None:
    via, direct = _both(env)
    for conn in (via, direct):
        conn.send(
            parse("", "COPY copytab FROM STDIN") + bind() + execute() + SYNC + _copy_data(b"5\n") + COPY_DONE + SYNC
        )
        assert shape(conn.recv_until("Z")) == ["1", "2", "G", "CCOPY 1", "ZI"]
        assert _replies(conn, query("SELECT 8")) == ["T", "D8", "CSELECT 1", "ZI"]


def test_a_set_in_a_batch_that_opens_a_transaction_is_not_lost(env: tuple[PgCluster, str, ProxyThread]) -> None:
    _pg, dbname, proxy = env
    conn = _conn(proxy.host, proxy.port, dbname)
    read = query("SELECT name FROM items ORDER BY id LIMIT 1")
    assert "Ditem 1" in _replies(conn, read)
    batch = parse("", "SET search_path = s2, public") + bind() + execute()
    batch += parse("", "BEGIN") + bind() + execute() + SYNC
    assert _replies(conn, batch)[-1] == "ZT"
    assert _replies(conn, query("COMMIT"))[-1] == "ZI"
    assert "Ds2 row" in _replies(conn, read)


def test_no_local_answer_while_the_server_skips_to_a_sync(env: tuple[PgCluster, str, ProxyThread]) -> None:
    via, direct = _both(env)
    sql = "SELECT name FROM items WHERE id = $1"
    for conn in (via, direct):  # warm the cache with id 35
        _replies(conn, parse("", sql) + bind(params=(b"35",)) + execute() + SYNC)
    for conn in (via, direct):
        conn.send(parse("", "SELECT 1/0") + bind() + execute() + FLUSH)
        conn.recv_until("E")
        conn.send(query("SELECT 1"))  # discarded by the server: it waits for a Sync
    batches = parse("", sql) + bind(params=(b"35",)) + execute() + SYNC + parse("", sql) + bind(params=(b"36",))
    batches += execute() + SYNC
    assert _replies(via, batches, count=2) == _replies(direct, batches, count=2)


def test_close_inside_a_batch_is_honoured(env: tuple[PgCluster, str, ProxyThread]) -> None:
    via, direct = _both(env)
    sql = "SELECT name FROM items WHERE id = 37"
    close_portal = b"C" + (4 + 3).to_bytes(4, "big") + b"Pp\x00"
    for conn in (via, direct):  # warm
        _replies(conn, parse("", sql) + bind("p") + execute("p") + SYNC)
    batch = parse("", sql) + bind("p") + close_portal + execute("p") + SYNC
    assert _replies(via, batch) == _replies(direct, batch)
