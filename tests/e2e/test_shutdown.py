"""Graceful shutdown of the subprocess proxy on SIGTERM, with idle and busy psycopg clients connected."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.e2e.helpers import CliProxy, Target, wait_active
from tests.support.pgcluster import PgCluster

EXIT_GRACE = 3.0  # seconds allowed beyond shutdown.timeout for the process to exit


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
