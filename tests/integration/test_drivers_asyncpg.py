"""asyncpg through the proxy: every result is compared with the same query on a direct connection.

Both connections log in as the SCRAM user, so the proxy relays a SCRAM exchange for every proxied connection.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from decimal import Decimal
from typing import Any

import asyncpg
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
    TYPED_COLUMNS,
    TYPED_ROW_COUNT,
    assert_same_rows,
    assert_same_value,
)
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread

USER, PASSWORD = PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD


async def connect_direct(pg: PgCluster, dbname: str) -> asyncpg.Connection:
    return await asyncpg.connect(pg.url(USER, PASSWORD, dbname))


async def connect_proxied(pg: PgCluster, proxy: ProxyThread, dbname: str) -> asyncpg.Connection:
    return await asyncpg.connect(pg.url(USER, PASSWORD, dbname, host=proxy.host, port=proxy.port))


@pytest.fixture
async def direct(pg: PgCluster, dbname: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_direct(pg, dbname)
    yield conn
    await conn.close()


@pytest.fixture
async def proxied(pg: PgCluster, proxy: ProxyThread, dbname: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_proxied(pg, proxy, dbname)
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
def shared_db(pg: PgCluster) -> Iterator[str]:
    """One database for the tests here that create nothing: CREATE DATABASE alone costs ~0.3 s, more than most of
    them. Tests that create objects use the per-test `dbname`."""
    name = pg.create_database(f"t_asyncpg_{uuid.uuid4().hex[:8]}")
    yield name
    if pg.is_running():
        pg.drop_database(name)


Pair = tuple[asyncpg.Connection, asyncpg.Connection]


@pytest.fixture
async def pair(pg: PgCluster, proxy: ProxyThread, shared_db: str) -> AsyncIterator[Pair]:
    """(direct, proxied) connections to `shared_db`."""
    direct = await connect_direct(pg, shared_db)
    proxied = await connect_proxied(pg, proxy, shared_db)
    yield direct, proxied
    await proxied.close()
    await direct.close()


@pytest.fixture
async def typed(proxied: asyncpg.Connection) -> None:
    """The shared typed table, created and filled through the proxy (simple protocol, two statements)."""
    await proxied.execute(CREATE_TYPED + ";" + FILL_TYPED)


async def error_of(call: Awaitable[Any]) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as excinfo:
        await call
    return excinfo.value


async def outcome(call: Awaitable[Any]) -> tuple[str, str]:
    """What a call gave, result or exception, as comparable text (some driver paths raise on odd replies)."""
    try:
        return "result", repr(await call)
    except Exception as exc:
        return type(exc).__name__, str(exc)


# -- fetch, fetchrow, fetchval ---------------------------------------------------------------------------------


async def test_fetch_typed_table_matches_direct(direct: asyncpg.Connection, proxied: asyncpg.Connection, typed: None):
    rows_direct = await direct.fetch(SELECT_TYPED)
    rows_proxied = await proxied.fetch(SELECT_TYPED)
    assert assert_same_rows(rows_direct, rows_proxied, "typed") == TYPED_ROW_COUNT
    assert list(rows_proxied[0].keys()) == list(TYPED_COLUMNS)
    assert rows_proxied[2]["txt"] is None and rows_proxied[0]["txt"] == "héllo wörld — ☃ 日本語 🐘"


async def test_fetchrow_and_fetchval_match_direct(pair: Pair):
    direct, proxied = pair
    row_direct = await direct.fetchrow(SELECT_LITERALS)
    row_proxied = await proxied.fetchrow(SELECT_LITERALS)
    assert row_direct is not None and row_proxied is not None
    assert_same_rows([row_direct], [row_proxied], "literals")
    assert list(row_proxied.keys()) == list(row_direct.keys())
    for sql, args in [
        ("SELECT $1::text || ' ✓'", ("ünï",)),
        ("SELECT $1::numeric * 2", (Decimal("1.005"),)),
        ("SELECT $1::bytea", (b"\x00\x01\xff",)),
        ("SELECT $1::int[]", ([1, None, 3],)),
        ("SELECT $1::uuid", (uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),)),
        ("SELECT NULL::int", ()),
    ]:
        assert_same_value(await direct.fetchval(sql, *args), await proxied.fetchval(sql, *args), sql)
    assert await proxied.fetchval("SELECT $1::text || ' ✓'", "ünï") == "ünï ✓"


async def test_empty_results_match_direct(direct: asyncpg.Connection, proxied: asyncpg.Connection, typed: None):
    sql = SELECT_TYPED.replace("ORDER BY", "WHERE id < 0 ORDER BY")
    assert await direct.fetch(sql) == [] and await proxied.fetch(sql) == []
    assert await proxied.fetchrow(sql) is None
    assert await proxied.fetchval("SELECT id FROM typed WHERE false") is None
    # The column description still arrives with zero rows.
    attrs_direct = [(a.name, a.type.name) for a in (await direct.prepare(sql)).get_attributes()]
    attrs_proxied = [(a.name, a.type.name) for a in (await proxied.prepare(sql)).get_attributes()]
    assert attrs_proxied == attrs_direct and len(attrs_proxied) == len(TYPED_COLUMNS)
    # A statement with no result set at all, and empty queries (EmptyQueryResponse).
    assert await proxied.execute("DELETE FROM typed WHERE id < 0") == "DELETE 0"
    for sql in ("", ";", "-- only a comment"):
        assert await outcome(proxied.execute(sql)) == await outcome(direct.execute(sql))
        assert await outcome(proxied.fetch(sql)) == await outcome(direct.fetch(sql))


async def test_100k_rows_match_direct(pair: Pair):
    direct, proxied = pair
    rows_direct = await direct.fetch(SELECT_100K)
    rows_proxied = await proxied.fetch(SELECT_100K)
    assert assert_same_rows(rows_direct, rows_proxied, "100k") == ROWS_100K


async def test_5mb_values_both_directions(direct: asyncpg.Connection, proxied: asyncpg.Connection):
    await proxied.execute("CREATE TABLE blobs (id int PRIMARY KEY, t text, b bytea)")
    # Client -> proxy -> server: one Bind message over 10 MB.
    await proxied.execute("INSERT INTO blobs VALUES ($1, $2, $3)", 1, BIG_TEXT, BIG_BYTES)
    row_direct = await direct.fetchrow("SELECT t, b, length(b) AS n, md5(b) AS h FROM blobs WHERE id = 1")
    row_proxied = await proxied.fetchrow("SELECT t, b, length(b) AS n, md5(b) AS h FROM blobs WHERE id = 1")
    assert row_direct is not None and row_proxied is not None
    assert_same_value(BIG_TEXT, row_direct["t"], "text stored")
    assert_same_value(BIG_BYTES, row_direct["b"], "bytea stored")
    for column in ("t", "b", "n", "h"):
        assert_same_value(row_direct[column], row_proxied[column], column)
    # A 5 MB query text (simple Query).
    await proxied.execute(f"INSERT INTO blobs VALUES (2, $big${BIG_TEXT}$big$, NULL)")
    assert_same_value(BIG_TEXT, await direct.fetchval("SELECT t FROM blobs WHERE id = 2"), "5 MB query text")
    # Server-generated: a 6 MB value in a simple-protocol result.
    sql = "SELECT repeat('ab✓', 2 * 1024 * 1024) AS big, 1 AS after"
    assert_same_rows(await direct.fetch(sql), await proxied.fetch(sql), "repeat")


# -- prepared statements and executemany ------------------------------------------------------------------------


async def test_prepared_statement_reused_with_params(
    direct: asyncpg.Connection, proxied: asyncpg.Connection, typed: None
):
    sql = (
        "SELECT id, txt, num, jb, arr_int FROM typed WHERE id >= $1 AND flag IS NOT DISTINCT FROM $2 "
        "ORDER BY id LIMIT 3"
    )
    stmt_direct = await direct.prepare(sql)
    stmt_proxied = await proxied.prepare(sql)
    assert [t.name for t in stmt_proxied.get_parameters()] == [t.name for t in stmt_direct.get_parameters()]
    assert [t.name for t in stmt_proxied.get_parameters()] == ["int4", "bool"]
    total = 0
    for i in range(1, 301):
        flag = (None, True, False)[i % 3]
        total += assert_same_rows(await stmt_direct.fetch(i, flag), await stmt_proxied.fetch(i, flag), f"i={i}")
    assert total > 600
    assert_same_rows([await stmt_direct.fetchrow(5, True)], [await stmt_proxied.fetchrow(5, True)])
    assert await stmt_proxied.fetchval(1, None) == 3
    # asyncpg prepares a named statement; the server holds it for the proxied session.
    names = await proxied.fetch("SELECT name, statement FROM pg_prepared_statements WHERE statement = $1", sql)
    assert len(names) == 1


async def test_executemany_inserts_every_row(direct: asyncpg.Connection, proxied: asyncpg.Connection):
    await proxied.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(12, 2), tags text[])")
    rows = [(i, f"item {i} ü", Decimal(i) / 4, [f"t{i % 5}", "✓"]) for i in range(1, 2001)]
    await proxied.executemany("INSERT INTO items VALUES ($1, $2, $3, $4)", rows)
    stored = await direct.fetch("SELECT id, name, price, tags FROM items ORDER BY id")
    assert_same_rows([(i, n, p.quantize(Decimal("0.01")), t) for i, n, p, t in rows], stored)
    assert_same_rows(stored, await proxied.fetch("SELECT id, name, price, tags FROM items ORDER BY id"))
    # A failing row in the middle: the whole executemany is one transaction, nothing of it stays.
    bad = [(3001, "ok", 1, []), (1, "duplicate", 1, []), (3002, "never", 1, [])]
    with pytest.raises(asyncpg.UniqueViolationError):
        await proxied.executemany("INSERT INTO items VALUES ($1, $2, $3, $4)", bad)
    assert await direct.fetchval("SELECT count(*) FROM items") == 2000
    assert await proxied.fetchval("SELECT count(*) FROM items") == 2000


# -- COPY -------------------------------------------------------------------------------------------------------


async def test_copy_records_to_table(direct: asyncpg.Connection, proxied: asyncpg.Connection, typed: None):
    records = await direct.fetch(SELECT_TYPED)
    await proxied.execute("CREATE TABLE typed_copy (LIKE typed INCLUDING ALL)")
    status = await proxied.copy_records_to_table(
        "typed_copy", records=[tuple(r) for r in records], columns=list(TYPED_COLUMNS)
    )
    assert status == f"COPY {TYPED_ROW_COUNT}"
    copied = SELECT_TYPED.replace("FROM typed", "FROM typed_copy")
    assert_same_rows(records, await direct.fetch(copied), "copied, read direct")
    assert_same_rows(records, await proxied.fetch(copied), "copied, read proxied")


async def test_copy_from_query_bytes_match_direct(direct: asyncpg.Connection, proxied: asyncpg.Connection, typed: None):
    cases = [(SELECT_TYPED, "csv"), (SELECT_TYPED, "text"), (SELECT_TYPED, "binary"), (SELECT_100K, "binary")]
    for sql, fmt in cases:
        out_direct, out_proxied = io.BytesIO(), io.BytesIO()
        status_direct = await direct.copy_from_query(sql, output=out_direct, format=fmt)
        status_proxied = await proxied.copy_from_query(sql, output=out_proxied, format=fmt)
        assert status_proxied == status_direct
        assert status_direct in (f"COPY {TYPED_ROW_COUNT}", f"COPY {ROWS_100K}")
        assert len(out_direct.getvalue()) > 10_000
        assert_same_value(out_direct.getvalue(), out_proxied.getvalue(), f"COPY ({fmt})")


async def test_copy_to_table_and_back(direct: asyncpg.Connection, proxied: asyncpg.Connection, typed: None):
    dump = io.BytesIO()
    await direct.copy_from_table("typed", output=dump, format="csv", header=True)
    await proxied.execute("CREATE TABLE typed_load (LIKE typed INCLUDING ALL)")
    dump.seek(0)
    status = await proxied.copy_to_table("typed_load", source=dump, format="csv", header=True)
    assert status == f"COPY {TYPED_ROW_COUNT}"
    loaded = SELECT_TYPED.replace("FROM typed", "FROM typed_load")
    assert_same_rows(await direct.fetch(SELECT_TYPED), await direct.fetch(loaded), "loaded")
    # And a COPY FROM with a 5 MB field, streamed in many CopyData messages.
    await proxied.execute("CREATE TABLE big_load (t text)")
    await proxied.copy_to_table("big_load", source=io.BytesIO(BIG_TEXT.encode() + b"\n"), format="text")
    assert_same_value(BIG_TEXT, await direct.fetchval("SELECT t FROM big_load"), "COPY FROM 5 MB")
    # A bad row: the server's error comes back and the connection goes on.
    err = await error_of(proxied.copy_to_table("big_load", source=io.BytesIO(b"a\tb\n"), format="text"))
    assert err.sqlstate == "22P04"
    assert await proxied.fetchval("SELECT count(*) FROM big_load") == 1


# -- transactions -----------------------------------------------------------------------------------------------


async def test_transactions_commit_and_rollback_seen_from_other_connections(
    pg: PgCluster, proxy: ProxyThread, dbname: str, direct: asyncpg.Connection, proxied: asyncpg.Connection
):
    other = await connect_proxied(pg, proxy, dbname)
    try:
        await proxied.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")

        async def seen() -> tuple[list[int], list[int]]:
            sql = "SELECT id FROM ledger ORDER BY id"
            return [r["id"] for r in await direct.fetch(sql)], [r["id"] for r in await other.fetch(sql)]

        async with proxied.transaction():
            await proxied.execute("INSERT INTO ledger VALUES (1, 'committed')")
            assert await seen() == ([], [])  # not yet committed
            assert proxied.is_in_transaction()
        assert await seen() == ([1], [1])

        with pytest.raises(RuntimeError, match="abort"):
            async with proxied.transaction():
                await proxied.execute("INSERT INTO ledger VALUES (2, 'rolled back')")
                assert await proxied.fetchval("SELECT count(*) FROM ledger") == 2
                raise RuntimeError("abort")
        assert await seen() == ([1], [1])
        assert not proxied.is_in_transaction()

        # A savepoint rolled back inside a committed transaction.
        async with proxied.transaction():
            await proxied.execute("INSERT INTO ledger VALUES (3, 'outer')")
            with pytest.raises(asyncpg.UniqueViolationError):
                async with proxied.transaction():
                    await proxied.execute("INSERT INTO ledger VALUES (4, 'inner')")
                    await proxied.execute("INSERT INTO ledger VALUES (1, 'duplicate')")
        assert await seen() == ([1, 3], [1, 3])

        # Repeatable read keeps its snapshot while another proxied connection commits. (All writes in this file go
        # through the proxy: a cache in front of Postgres cannot know of writes that bypass it.)
        async with proxied.transaction(isolation="repeatable_read"):
            before = await proxied.fetchval("SELECT count(*) FROM ledger")
            await other.execute("INSERT INTO ledger VALUES (5, 'concurrent')")
            assert await proxied.fetchval("SELECT count(*) FROM ledger") == before == 2
        assert await proxied.fetchval("SELECT count(*) FROM ledger") == 3
        assert await seen() == ([1, 3, 5], [1, 3, 5])
    finally:
        await other.close()


# -- cancel, notifications, notices, errors ---------------------------------------------------------------------


async def test_timeout_cancels_the_query_and_the_connection_goes_on(pg: PgCluster, pair: Pair):
    _, proxied = pair
    marker = f"cancel_{uuid.uuid4().hex[:8]}"
    backend_pid = await proxied.fetchval("SELECT pg_backend_pid()")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await proxied.fetch(f"SELECT pg_sleep(10) AS {marker}", timeout=0.5)
    assert time.monotonic() - started < 3
    # Usable at once: had the cancel not reached the backend, this would wait for the 10 s sleep to end.
    assert await proxied.fetchval("SELECT 41 + 1") == 42
    assert time.monotonic() - started < 3
    leftover = pg.psql(
        f"SELECT pid, state FROM pg_stat_activity WHERE query LIKE '%pg_sleep(10) AS {marker}%' "
        "AND pid <> pg_backend_pid() AND state = 'active'"
    )
    assert leftover.strip() == ""
    assert await proxied.fetchval("SELECT pg_backend_pid()") == backend_pid  # same session, not a reconnect


async def test_listen_notify_between_proxied_connections(pg: PgCluster, proxy: ProxyThread, shared_db: str, pair: Pair):
    direct, proxied = pair
    notifier = await connect_proxied(pg, proxy, shared_db)
    try:
        got_proxied: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        got_direct: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        await proxied.add_listener("jobs ✓", lambda _c, pid, ch, payload: got_proxied.put_nowait((pid, ch, payload)))
        await direct.add_listener("jobs ✓", lambda _c, pid, ch, payload: got_direct.put_nowait((pid, ch, payload)))
        payloads = ["plain", "ünïcødé 🐘", "", "x" * 7000]
        for payload in payloads:
            await notifier.execute("SELECT pg_notify('jobs ✓', $1)", payload)
        async with notifier.transaction():
            await notifier.execute("""NOTIFY "jobs ✓", 'inside a committed transaction'""")
        with pytest.raises(RuntimeError):
            async with notifier.transaction():
                await notifier.execute("""NOTIFY "jobs ✓", 'rolled back: never delivered'""")
                raise RuntimeError
        await notifier.execute("""NOTIFY "jobs ✓", 'last'""")
        expected = [*payloads, "inside a committed transaction", "last"]

        async def drain(queue: asyncio.Queue[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
            return [await asyncio.wait_for(queue.get(), timeout=5) for _ in expected]

        received_proxied, received_direct = await drain(got_proxied), await drain(got_direct)
        assert received_proxied == received_direct
        notifier_backend = await notifier.fetchval("SELECT pg_backend_pid()")
        assert received_proxied == [(notifier_backend, "jobs ✓", payload) for payload in expected]
        assert got_proxied.empty()
    finally:
        await notifier.close()


async def test_server_pid_matches_backend_and_notification_pid(pair: Pair):
    direct, proxied = pair
    # Direct: the pid from BackendKeyData is the backend's pid.
    assert direct.get_server_pid() == await direct.fetchval("SELECT pg_backend_pid()")
    assert proxied.get_server_pid() == await proxied.fetchval("SELECT pg_backend_pid()")
    # The usual "ignore my own notifications" check (pid == conn.get_server_pid()) relies on it.
    got: asyncio.Queue[int] = asyncio.Queue()
    await proxied.add_listener("self", lambda _c, pid, _ch, _payload: got.put_nowait(pid))
    await proxied.execute("NOTIFY self")
    assert await asyncio.wait_for(got.get(), timeout=5) == proxied.get_server_pid()


async def test_notices_reach_the_log_listener(pair: Pair):
    direct, proxied = pair
    sql = """DO $$BEGIN
        RAISE NOTICE 'hello %', 'wörld ✓' USING DETAIL = 'some detail', HINT = 'a hint';
        RAISE WARNING 'careful' USING ERRCODE = '01000';
    END$$"""

    async def notices(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        seen: list[asyncpg.PostgresLogMessage] = []
        conn.add_log_listener(lambda _c, message: seen.append(message))
        await conn.execute(sql)
        for _ in range(50):  # listeners are called soon after the message, not before execute() returns
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.01)
        return [message.as_dict() for message in seen]

    from_direct, from_proxied = await notices(direct), await notices(proxied)
    assert from_proxied == from_direct
    assert [(n["severity"], n["sqlstate"], n["message"]) for n in from_proxied] == [
        ("NOTICE", "00000", "hello wörld ✓"),
        ("WARNING", "01000", "careful"),
    ]
    assert from_proxied[0]["detail"] == "some detail" and from_proxied[0]["hint"] == "a hint"


async def test_server_errors_match_direct_and_the_connection_goes_on(
    direct: asyncpg.Connection, proxied: asyncpg.Connection
):
    setup = "CREATE TABLE uniq (id int PRIMARY KEY, v text NOT NULL); INSERT INTO uniq VALUES (1, 'one')"
    await proxied.execute(setup.replace("uniq", "uniq_p"))
    await direct.execute(setup.replace("uniq", "uniq_d"))
    cases: list[tuple[str, tuple[Any, ...], str]] = [
        ("SELECT 1/0", (), "22012"),
        ("SELECT 1/$1::int", (0,), "22012"),  # extended protocol: Parse/Bind/Execute
        ("SELECT * FROM no_such_table", (), "42P01"),
        ("SELECT 'abc'::int", (), "22P02"),
        ("SELEC 1", (), "42601"),
        ("INSERT INTO uniq VALUES (1, 'dup')", (), "23505"),
        ("INSERT INTO uniq VALUES ($1, $2)", (2, None), "23502"),
    ]
    for sql, args, sqlstate in cases:
        err_direct = await error_of(direct.execute(sql.replace("uniq", "uniq_d"), *args))
        err_proxied = await error_of(proxied.execute(sql.replace("uniq", "uniq_p"), *args))
        assert type(err_proxied) is type(err_direct)
        assert err_proxied.sqlstate == err_direct.sqlstate == sqlstate
        fields_direct = {k: v for k, v in err_direct.as_dict().items() if k not in ("table_name", "constraint_name")}
        fields_proxied = {k: v for k, v in err_proxied.as_dict().items() if k not in ("table_name", "constraint_name")}
        assert str(err_proxied).replace("uniq_p", "uniq") == str(err_direct).replace("uniq_d", "uniq")
        assert {k: str(v).replace("uniq_p", "uniq") for k, v in fields_proxied.items()} == {
            k: str(v).replace("uniq_d", "uniq") for k, v in fields_direct.items()
        }
        assert await proxied.fetchval("SELECT 1") == 1
    assert (await error_of(proxied.execute("SELECT 1/0"))).args[0] == "division by zero"
    # Inside a transaction: the error aborts it, the next statement is refused (25P02), rollback recovers.
    tx = proxied.transaction()
    await tx.start()
    await error_of(proxied.execute("SELECT 1/0"))
    assert (await error_of(proxied.execute("SELECT 1"))).sqlstate == "25P02"
    await tx.rollback()
    assert await proxied.fetchval("SELECT count(*) FROM uniq_p") == 1


async def test_error_in_the_middle_of_a_result_stream(pair: Pair):
    direct, proxied = pair
    # The server has sent tens of thousands of DataRows when the error comes.
    sql = "SELECT g, repeat('ü', 50) FROM generate_series(1, 100000) AS g WHERE 1 / (g - 60000) IS NOT NULL"
    err_direct, err_proxied = await error_of(direct.fetch(sql)), await error_of(proxied.fetch(sql))
    assert err_proxied.as_dict() == err_direct.as_dict()
    assert err_proxied.sqlstate == "22012"
    assert_same_rows(await direct.fetch("SELECT 1, 'ok'"), await proxied.fetch("SELECT 1, 'ok'"))


async def test_concurrent_sessions_do_not_mix(pg: PgCluster, proxy: ProxyThread, shared_db: str, pair: Pair):
    direct, _ = pair
    conns = await asyncio.gather(*(connect_proxied(pg, proxy, shared_db) for _ in range(12)))
    try:

        async def work(conn: asyncpg.Connection, n: int) -> list[Any]:
            results = []
            for round_ in range(5):
                sql = (
                    "SELECT $1::int AS n, $2::int AS round, md5($1::text || $2::text), g FROM generate_series(1, $1) g"
                )
                results.append([tuple(r) for r in await conn.fetch(sql, n * 100, round_)])
            return results

        got = await asyncio.gather(*(work(conn, n) for n, conn in enumerate(conns, start=1)))
        for n, results in enumerate(got, start=1):
            for round_, rows in enumerate(results):
                sql = (
                    "SELECT $1::int AS n, $2::int AS round, md5($1::text || $2::text), g FROM generate_series(1, $1) g"
                )
                assert_same_rows(await direct.fetch(sql, n * 100, round_), rows, f"session {n} round {round_}")
        pids = {await conn.fetchval("SELECT pg_backend_pid()") for conn in conns}
        assert len(pids) == 12  # one upstream backend per client
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))


async def test_closed_connections_leave_no_backend(pg: PgCluster, proxy: ProxyThread, shared_db: str):
    conns = [await connect_proxied(pg, proxy, shared_db) for _ in range(5)]
    pids = [await conn.fetchval("SELECT pg_backend_pid()") for conn in conns]
    for conn in conns:
        await conn.close()
    listed = ",".join(map(str, pids))
    deadline = time.monotonic() + 5
    query = f"SELECT pid FROM pg_stat_activity WHERE pid IN ({listed})"
    while (left := pg.psql(query).strip()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert left == ""


async def test_backend_terminated_by_the_server_reports_its_fatal_error(pair: Pair):
    direct, proxied = pair
    # asyncpg turns the FATAL 57P01 and the close that follows into ConnectionDoesNotExistError, with the server's
    # message appended: the proxy must relay the FATAL before closing for the text to match.
    errors = []
    for conn in (direct, proxied):
        with pytest.raises(asyncpg.ConnectionDoesNotExistError) as excinfo:
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        errors.append(str(excinfo.value))
        assert conn.is_closed()
    assert errors[1] == errors[0]
    assert errors[0].endswith("terminating connection due to administrator command")


async def test_cursors_portal_suspended_match_direct(pair: Pair):
    direct, proxied = pair
    # Execute with a row limit: the server answers PortalSuspended, and asyncpg asks for the next batch.
    sql = SELECT_100K.replace("100000", "$1::int")
    results = []
    for conn in (direct, proxied):
        async with conn.transaction():
            iterated = [tuple(r) async for r in conn.cursor(sql, 30000, prefetch=777)]
            cur = await conn.cursor(sql, 5000)
            first = await cur.fetch(1234)
            skipped = await cur.forward(1000)
            rest = await cur.fetch(10_000)
            row = await cur.fetchrow()
        results.append((iterated, first, skipped, rest, row))
    (it_d, first_d, skip_d, rest_d, row_d), (it_p, first_p, skip_p, rest_p, row_p) = results
    assert assert_same_rows(it_d, it_p, "iterated") == 30000
    assert_same_rows(first_d, first_p, "first")
    assert skip_p == skip_d == 1000
    assert assert_same_rows(rest_d, rest_p, "rest") == 5000 - 2234
    assert row_p is None and row_d is None


async def test_a_bulk_insert_does_not_stall_other_sessions(pg: PgCluster, proxy: ProxyThread, dbname: str):
    # pg_dump --inserts, ORMs' bulk inserts with inlined values and ETL scripts send statements like this one.
    worst: dict[str, float] = {}
    for where, (host, port) in {"direct": (pg.host, pg.port), "proxied": (proxy.host, proxy.port)}.items():
        url = pg.url(USER, PASSWORD, dbname, host=host, port=port)
        bulk, other = await asyncpg.connect(url), await asyncpg.connect(url)
        try:
            await bulk.execute(f"CREATE TABLE bulk_{where} (id int, name text)")
            values = ",".join(f"({i}, 'name {i} ✓')" for i in range(20_000))
            insert = asyncio.create_task(bulk.execute(f"INSERT INTO bulk_{where} VALUES {values}"))
            worst[where] = 0.0
            while not insert.done():  # the other session's round trips while the INSERT is on its way
                started = time.monotonic()
                assert await other.fetchval("SELECT 1") == 1
                worst[where] = max(worst[where], time.monotonic() - started)
            assert await insert == "INSERT 0 20000"
        finally:
            await bulk.close()
            await other.close()
    assert worst["direct"] < 0.5
    assert worst["proxied"] < 0.5, worst
