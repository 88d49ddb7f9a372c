"""Graceful shutdown of the subprocess proxy on SIGTERM, with idle and busy psycopg clients connected."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.e2e.helpers import CliProxy, Target, wait_active
from tests.support.pgcluster import PgCluster

EXIT_GRACE = 3.0  # seconds allowed beyond shutdown.timeout for the process to exit
_CANCEL_GRACE = 2.0  # after the timeout the proxy cancels busy queries and gives them this long (server.py)


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def connect(target: Target, dbname: str) -> psycopg.Connection:
    return psycopg.connect(target.url(dbname=dbname), autocommit=True, connect_timeout=5)


Rows = list[tuple[Any, ...]]


def run_query(target: Target, dbname: str, query: str) -> tuple[psycopg.Connection, Callable[[], Rows]]:
    conn = connect(target, dbname)
    return conn, lambda: conn.execute(query).fetchall()


def closed_sessions(proxy: CliProxy) -> dict[int, list[str]]:
    """Closed-line reasons per session that was opened (logged in) by a client; probe connections are skipped."""
    return {sid: entry["closed"] for sid, entry in proxy.sessions().items() if entry["opened"]}


def test_sigterm_lets_busy_query_finish(
    pg: PgCluster,
    dbname: str,
    start_cli_proxy: Callable[..., CliProxy],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    proxy = start_cli_proxy(shutdown={"timeout": "5s"})
    target = Target.through(pg, proxy)
    idle = [connect(target, dbname) for _ in range(3)]
    for conn in idle:
        assert conn.execute("select 1").fetchone() == (1,)
    sleep_sql = "select pg_sleep(2), 'slept' as outcome"
    busy, query = run_query(target, dbname, sleep_sql)
    with connect(Target("direct", pg, pg.host, pg.port), dbname) as plain:
        direct_row = plain.execute(sleep_sql.replace("pg_sleep(2)", "pg_sleep(0)")).fetchall()
    try:
        future = pool.submit(query)
        wait_active(pg, dbname, sleep_sql)

        signalled = time.monotonic()
        proxy.terminate()
        proxy.wait_for_log("shutdown:")

        # New connections are refused (the listener is closed, or the session is rejected with 57P03).
        with pytest.raises(psycopg.OperationalError):
            connect(target, dbname).close()
        # The idle connections were closed at once: their next query fails.
        for conn in idle:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("select 1")
        # The busy one finishes and gets its row, the same as straight from Postgres.
        assert future.result(timeout=10) == direct_row
        exit_code = proxy.wait(timeout=5 + EXIT_GRACE)
        elapsed = time.monotonic() - signalled
    finally:
        for conn in [*idle, busy]:
            conn.close()
    assert exit_code == 0, proxy.log()
    assert elapsed < 5 + EXIT_GRACE
    # It did not simply wait out the whole timeout: it exited once the query was done.
    assert elapsed < 4.5, f"exit took {elapsed:.1f}s after SIGTERM for a 2 s query"

    closed = closed_sessions(proxy)
    assert len(closed) == 4, proxy.log()
    for sid, reasons in closed.items():
        assert len(reasons) == 1, f"session {sid}: {reasons}"
        assert "shutting down" in reasons[0], f"session {sid}: {reasons}"
    assert "Traceback" not in proxy.log()


def test_sigterm_cuts_query_longer_than_timeout(
    pg: PgCluster,
    dbname: str,
    start_cli_proxy: Callable[..., CliProxy],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    proxy = start_cli_proxy(shutdown={"timeout": "1s"})
    target = Target.through(pg, proxy)
    sleep_sql = "select pg_sleep(30)"
    conn, query = run_query(target, dbname, sleep_sql)
    try:
        future = pool.submit(query)
        wait_active(pg, dbname, sleep_sql)
        signalled = time.monotonic()
        proxy.terminate()
        exit_code = proxy.wait(timeout=1 + EXIT_GRACE)
        elapsed = time.monotonic() - signalled
        with pytest.raises(psycopg.Error) as caught:
            future.result(timeout=5)
    finally:
        conn.close()
    assert exit_code == 0, proxy.log()
    assert elapsed < 1 + EXIT_GRACE
    error = caught.value
    # Cancelled at the timeout (57014), then disconnected (57P01): the client sees one or the other first.
    assert isinstance(error, psycopg.OperationalError) or error.sqlstate in ("57P01", "57014"), repr(error)
    if error.sqlstate is not None:
        assert error.sqlstate in ("57P01", "57014"), repr(error)
    closed = closed_sessions(proxy)
    assert [len(reasons) for reasons in closed.values()] == [1], proxy.log()


def test_sigterm_cancels_query_upstream(
    pg: PgCluster,
    dbname: str,
    start_cli_proxy: Callable[..., CliProxy],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    """After shutdown.timeout the in-flight query is cancelled, not left running on the server.

    `shutdown.timeout` is documented as "how long to wait for in-flight queries before cancelling them".
    """
    proxy = start_cli_proxy(shutdown={"timeout": "1s"})
    sleep_sql = "select pg_sleep(30) as long_sleep"
    conn, query = run_query(Target.through(pg, proxy), dbname, sleep_sql)
    try:
        future = pool.submit(query)
        wait_active(pg, dbname, sleep_sql)
        proxy.terminate()
        proxy.wait(timeout=1 + EXIT_GRACE)
        with pytest.raises(psycopg.Error):
            future.result(timeout=5)
    finally:
        conn.close()
    sql = "select count(*) from pg_stat_activity where datname = %s and query = %s and state = 'active'"
    deadline = time.monotonic() + 2
    with psycopg.connect(pg.url(), autocommit=True) as admin:
        while True:
            row = admin.execute(sql, (dbname, sleep_sql)).fetchone()
            still = row[0] if row else 0
            if not still or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert still == 0, "the upstream backend is still running the query after the proxy exited"


# -- SIGTERM with 200 open sessions ------------------------------------------------------------------------------

SESSIONS = 200
IN_TRANSACTION, SHORT, LONG = 30, 30, 10  # the rest (130) are idle
SHORT_SQL = "select pg_sleep(1.5), 'short' as outcome"
LONG_SQL = "select pg_sleep(30) as long_one"
# What a session cut by the shutdown may get instead of its result: the proxy's FATAL (57P01), the cancellation at
# the timeout (57014), or the connection's end (08006, which asyncpg reports as a closed connection).
CUT_SQLSTATES = {"57P01", "57014", "08006"}


def _cut_properly(outcome: object) -> bool:
    if isinstance(outcome, asyncpg.PostgresError):
        return outcome.sqlstate in CUT_SQLSTATES
    if isinstance(outcome, asyncpg.InterfaceError):  # asyncpg read the FATAL or the close: "connection is closed"
        return "closed" in str(outcome)
    return isinstance(outcome, ConnectionError)


async def _wait_active(pg: PgCluster, dbname: str, expected: int) -> None:
    admin = await asyncpg.connect(pg.url())
    try:
        sql = (
            "select count(*) from pg_stat_activity"
            " where datname = $1 and state = 'active' and query like 'select pg_sleep%'"
        )
        deadline = time.monotonic() + 10
        while await admin.fetchval(sql, dbname) < expected:
            assert time.monotonic() < deadline, "the busy queries never all became active"
            await asyncio.sleep(0.02)
    finally:
        await admin.close()


def test_sigterm_with_200_sessions(pg: PgCluster, dbname: str, start_cli_proxy: Callable[..., CliProxy]) -> None:
    timeout = 3.0
    proxy = start_cli_proxy(shutdown={"timeout": f"{timeout:g}s"})
    url = Target.through(pg, proxy).url(dbname=dbname)

    async def scenario() -> tuple[int, float, list[object], list[object], list[object]]:
        gate = asyncio.Semaphore(20)

        async def connect() -> asyncpg.Connection:
            async with gate:
                return await asyncpg.connect(url, timeout=30, statement_cache_size=0)

        conns = await asyncio.gather(*(connect() for _ in range(SESSIONS)))
        tx, short, long = conns[:IN_TRANSACTION], conns[IN_TRANSACTION : IN_TRANSACTION + SHORT], conns[-LONG:]
        idle = conns[IN_TRANSACTION + SHORT : -LONG]
        try:
            assert await asyncio.gather(*(c.fetchval("select 1") for c in idle)) == [1] * len(idle)
            for conn in tx:
                await conn.execute("begin; select 1")
            busy = [asyncio.create_task(c.fetchrow(SHORT_SQL)) for c in short]
            busy += [asyncio.create_task(c.fetchrow(LONG_SQL)) for c in long]
            await _wait_active(pg, dbname, SHORT + LONG)
            signalled = time.monotonic()
            proxy.terminate()
            exit_code = await asyncio.to_thread(proxy.wait, timeout + _CANCEL_GRACE + EXIT_GRACE)
            elapsed = time.monotonic() - signalled
            outcomes = await asyncio.gather(*busy, return_exceptions=True)
            after = [await _next_query(c) for c in idle + tx]
            return exit_code, elapsed, outcomes[:SHORT], outcomes[SHORT:], after
        finally:
            for conn in conns:
                conn.terminate()

    exit_code, elapsed, short_outcomes, long_outcomes, after = asyncio.run(scenario())
    log = proxy.log()
    print(f"200 sessions: exit {exit_code} after {elapsed:.1f}s (shutdown.timeout {timeout:g}s)")
    print("  long queries got:", Counter(_outcome_name(o) for o in long_outcomes))
    print("  idle and in-transaction sessions then got:", Counter(_outcome_name(o) for o in after))
    assert exit_code == 0, log[-5000:]
    assert elapsed < timeout + _CANCEL_GRACE + EXIT_GRACE
    # The short queries finished within the timeout and got their rows.
    assert all(isinstance(o, asyncpg.Record) and o["outcome"] == "short" for o in short_outcomes), short_outcomes
    # The long ones were cut with a proper error, not left hanging and not an odd one.
    assert all(_cut_properly(o) for o in long_outcomes), long_outcomes
    # Idle sessions and those left in a transaction were closed: their next query fails cleanly.
    assert all(_cut_properly(o) for o in after), [o for o in after if not _cut_properly(o)][:5]
    closed = closed_sessions(proxy)
    assert len(closed) == SESSIONS, log[-5000:]
    assert all(len(reasons) == 1 for reasons in closed.values())
    assert "Traceback" not in log
    assert "internal error" not in log


def _outcome_name(outcome: object) -> str:
    sqlstate = getattr(outcome, "sqlstate", None)
    return type(outcome).__name__ + (f" {sqlstate}" if sqlstate else "")


async def _next_query(conn: asyncpg.Connection) -> object:
    try:
        return await conn.fetchval("select 1", timeout=5)
    except Exception as exc:  # the outcome is what is checked
        return exc
