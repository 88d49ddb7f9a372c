"""Extended-protocol requests the relay must send on, compared with PostgreSQL's own answers over raw connections.

A Close of a portal or statement that may exist upstream (a cursor made by SQL DECLARE, a statement made by SQL
PREPARE, a named portal that outlives a Sync inside a transaction block) reaches the server; and messages a client
sends without a Sync or Flush are forwarded once it has sent all it has, since PostgreSQL runs each as it arrives.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import psycopg
import pytest

from cacheproxy.protocol import frontend as fe
from cacheproxy.protocol.framing import encode
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import Message, RawConn

SYNC = encode(b"S")


def _bind(portal: str = "", statement: str = "", *params: bytes) -> bytes:
    body = portal.encode() + b"\x00" + statement.encode() + b"\x00" + b"\x00\x00" + len(params).to_bytes(2, "big")
    for value in params:
        body += len(value).to_bytes(4, "big") + value
    return encode(b"B", body + b"\x00\x00")


def _execute(portal: str = "", max_rows: int = 0) -> bytes:
    return encode(b"E", portal.encode() + b"\x00" + max_rows.to_bytes(4, "big"))


def _close(kind: bytes, name: str) -> bytes:
    return encode(b"C", kind + name.encode() + b"\x00")


def _setup(pg: PgCluster, dbname: str) -> None:
    pg.psql(
        "CREATE TABLE items (id int PRIMARY KEY, name text);"
        "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20) g;"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


@pytest.fixture
def cached(start_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return start_proxy(cache={"default_ttl": "60s"})


def _both(pg: PgCluster, proxy: ProxyThread, dbname: str, script: Callable[[RawConn], list[list[Message]]]) -> None:
    """Run `script` directly and through the proxy (twice, so that the second run meets a warm cache); every reply
    must be the same bytes."""
    with RawConn(pg.host, pg.port) as conn:
        conn.startup("postgres", dbname)
        want = script(conn)
    for attempt in range(2):
        with RawConn(proxy.host, proxy.port) as conn:
            conn.startup("postgres", dbname)
            assert script(conn) == want, f"run {attempt + 1} through the proxy"


@pytest.mark.parametrize("hold", ["", " WITH HOLD"])
def test_close_of_a_declared_cursor_reaches_the_server(
    pg: PgCluster, dbname: str, cached: ProxyThread, hold: str
) -> None:
    _setup(pg, dbname)

    def script(conn: RawConn) -> list[list[Message]]:
        got = [conn.query("SELECT name FROM items WHERE id = 1")]
        if not hold:
            got.append(conn.query("BEGIN"))
        got.append(conn.query(f"DECLARE c CURSOR{hold} FOR SELECT name FROM items ORDER BY id"))
        conn.send(_close(b"P", "c") + SYNC)  # protocol Close of the SQL cursor
        got.append(conn.recv_until("Z"))
        got.append(conn.query("FETCH 1 FROM c"))  # the cursor is gone: 34000
        got.append(conn.query("ROLLBACK"))
        got.append(conn.query(f"DECLARE c CURSOR{hold} FOR SELECT 1"))  # (in autocommit a plain cursor fails)
        got.append(conn.query("CLOSE ALL"))
        return got

    _both(pg, cached, dbname, script)


def test_close_of_a_statement_prepared_by_sql_reaches_the_server(
    pg: PgCluster, dbname: str, cached: ProxyThread
) -> None:
    _setup(pg, dbname)

    def script(conn: RawConn) -> list[list[Message]]:
        got = [conn.query("SELECT 1; PREPARE s AS SELECT name FROM items WHERE id = 2")]
        conn.send(_close(b"S", "s") + SYNC)
        got.append(conn.recv_until("Z"))
        got.append(conn.query("EXECUTE s"))  # deallocated: 26000
        got.append(conn.query("PREPARE s AS SELECT 2"))  # and the name is free again
        return got

    _both(pg, cached, dbname, script)


def test_a_named_portal_outlives_the_sync_in_a_transaction_block(
    pg: PgCluster, dbname: str, cached: ProxyThread
) -> None:
    _setup(pg, dbname)
    parse = fe.encode_parse("q", "SELECT name FROM items WHERE id <= $1 ORDER BY id", (23,))

    def script(conn: RawConn) -> list[list[Message]]:
        conn.send(parse + SYNC)
        got = [conn.recv_until("Z")]
        conn.send(_bind("p", "q", b"5") + _execute("p", 2) + SYNC)  # outside a block: fills the cache
        got.append(conn.recv_until("Z"))
        got.append(conn.query("BEGIN"))
        conn.send(_bind("p", "q", b"5") + _execute("p", 2) + SYNC)
        got.append(conn.recv_until("Z"))
        conn.send(_execute("p", 2) + SYNC)  # the portal goes on: rows 3 and 4
        got.append(conn.recv_until("Z"))
        conn.send(_close(b"P", "p") + SYNC)
        got.append(conn.recv_until("Z"))
        conn.send(_execute("p", 2) + SYNC)  # closed: 34000
        got.append(conn.recv_until("Z"))
        got.append(conn.query("ROLLBACK"))
        return got

    _both(pg, cached, dbname, script)


def test_messages_without_sync_are_run_as_they_arrive_error(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    """PostgreSQL sends an ErrorResponse at once, Sync or not: a client waiting for it must get it."""
    _setup(pg, dbname)

    def script(conn: RawConn) -> list[list[Message]]:
        conn.send(fe.encode_parse("", "SELECT name FROM items WHERE id = 1 / $1", (23,)) + _bind("", "", b"0"))
        conn.send(_execute())
        got = [conn.recv_until("E")]  # ParseComplete, then the ErrorResponse (here at Bind: 1 / 0 is planned)
        conn.send(SYNC)
        got.append(conn.recv_until("Z"))
        return got

    _both(pg, cached, dbname, script)


def test_messages_without_sync_are_run_as_they_arrive_lock(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    """No reply is sent before a Sync or Flush, but the statement runs: here it takes a lock another session sees."""
    _setup(pg, dbname)
    key = int(uuid.uuid4().int % 1_000_000)

    def lock_held() -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = pg.psql(f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = {key}", dbname)
            if out.strip() == "1":
                return True
            time.sleep(0.05)
        return False

    for host, port in ((pg.host, pg.port), (cached.host, cached.port)):
        with RawConn(host, port) as conn:
            conn.startup("postgres", dbname)
            conn.send(fe.encode_parse("", f"SELECT pg_advisory_lock({key})", ()) + _bind() + _execute())
            assert lock_held(), f"through {port}"
            conn.send(SYNC)
            assert [t for t, _ in conn.recv_until("Z")] == ["1", "2", "D", "C", "Z"]


def test_a_held_batch_of_hits_is_answered_at_its_sync(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    """Reads the cache can answer are still held for their Sync (psycopg's pipeline sends them one by one)."""
    _setup(pg, dbname)
    sql = "SELECT name FROM items WHERE id = %s"
    with (
        psycopg.connect(pg.dsn(dbname=dbname, port=cached.port), autocommit=True) as via,
        psycopg.connect(pg.dsn(dbname=dbname), autocommit=True) as direct,
    ):
        want = [direct.execute(sql, (i,)).fetchall() for i in range(1, 4)]
        assert cached.app is not None and cached.app.cache is not None
        engine = cached.app.cache.engine
        for i in range(1, 4):  # fill (again, if the invalidation feed's start dropped the first fill)
            for _ in range(50):
                hits = engine.stats().hits
                assert via.execute(sql, (i,)).fetchall() == want[i - 1]
                if engine.stats().hits > hits:
                    break
        before = engine.stats()
        with via.pipeline():
            cursors = [via.execute(sql, (i,)) for i in range(1, 4)]
        assert [c.fetchall() for c in cursors] == want
        after = engine.stats()
        assert (after.hits - before.hits, after.misses - before.misses) == (3, 0)


FLUSH = encode(b"H")


@pytest.mark.parametrize(
    "then",
    [
        [_execute() + FLUSH, _execute() + FLUSH, SYNC],  # run, then continued (nothing left)
        [_execute("", 2) + FLUSH, _execute("", 2) + FLUSH, SYNC],  # with a row limit, twice
        [_execute() + FLUSH, encode(b"D", b"P\x00") + FLUSH, SYNC],  # run, then described
        [_close(b"P", "") + FLUSH, _execute() + SYNC],  # closed: nothing to run
        [_execute() + SYNC, _execute() + SYNC],  # the Sync ends the portal
        [encode(b"Q", b"SELECT name FROM items WHERE id = 3\x00")],  # a Query ends it too
    ],
)
def test_a_portal_bound_before_a_flush(pg: PgCluster, dbname: str, cached: ProxyThread, then: list[bytes]) -> None:
    """pg8000's pattern: Parse + Sync, Describe + Sync, Bind + Flush, Execute + Flush, Sync. The Bind answered
    here leaves the portal in the proxy; whatever the client does with it next must find it as PostgreSQL would."""
    _setup(pg, dbname)
    parse = fe.encode_parse("", "SELECT name FROM items WHERE id <= $1 ORDER BY id", (23,))

    def script(conn: RawConn) -> list[list[Message]]:
        got = []
        for _ in range(2):  # the first round fills the cache
            conn.send(parse + SYNC)
            got.append(conn.recv_until("Z"))
            conn.send(encode(b"D", b"S\x00") + SYNC)
            got.append(conn.recv_until("Z"))
            conn.send(_bind("", "", b"3") + FLUSH)
            got.append([conn.recv_message()])  # BindComplete
            conn.send(_execute() + FLUSH)
            got.append(conn.recv_until("C"))
            conn.send(SYNC)
            got.append(conn.recv_until("Z"))
        conn.send(parse + SYNC)
        got.append(conn.recv_until("Z"))
        conn.send(_bind("", "", b"3") + FLUSH)
        got.append([conn.recv_message()])
        for message in then:
            conn.send(message)
            if message.endswith(SYNC) or message[:1] == b"Q":
                got.append(conn.recv_until("Z"))
            else:
                got.append([conn.recv_message()])
                if message[:1] == b"E":
                    while got[-1][-1][0] not in "Cs":
                        got[-1].append(conn.recv_message())  # type: ignore[arg-type]
        return got

    _both(pg, cached, dbname, script)


@pytest.mark.parametrize("types", [b"\x00\x00", b"\x00\x01\x00\x00\x00\x17"], ids=["untyped", "typed"])
@pytest.mark.parametrize("name", ["", "s1"])
def test_describe_of_a_statement_parsed_in_an_earlier_cycle(
    pg: PgCluster, dbname: str, cached: ProxyThread, name: str, types: bytes
) -> None:
    """libpq's PQprepare then PQdescribePrepared: Parse + Sync, then Describe(statement) + Sync, then Bind/Execute."""
    _setup(pg, dbname)
    parse = encode(b"P", name.encode() + b"\x00SELECT name FROM items WHERE id = $1\x00" + types)
    describe = encode(b"D", b"S" + name.encode() + b"\x00")

    def script(conn: RawConn) -> list[list[Message]]:
        got = []
        for _ in range(2):
            conn.send(parse + SYNC)
            got.append(conn.recv_until("Z"))
            conn.send(describe + SYNC)
            got.append(conn.recv_until("Z"))
            conn.send(_bind("", name, b"3") + _execute() + SYNC)
            got.append(conn.recv_until("Z"))
            if name:
                conn.send(_close(b"S", name) + SYNC)
                got.append(conn.recv_until("Z"))
        return got

    _both(pg, cached, dbname, script)
