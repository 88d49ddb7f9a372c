"""Stale-if-error against a real PostgreSQL that the test stops (its own private cluster, not the session's):
with auth.mode terminate, a client that connects while the upstream is down is answered from the cache alone.
Reads cached under a rule with stale_if_error are served (with a WARNING 01000 notice) up to that long past expiry;
writes, misses and results of rules without it fail at once with 08006; nothing stale is served once the window
has passed or the upstream is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from tests.support.cachetest import eventually
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config

DB = "stale"
STALE_QUERY = "SELECT id, name FROM items WHERE id = 1"
PLAIN_QUERY = "SELECT id, name FROM plain WHERE id = 1"


@pytest.fixture
def own_pg() -> Iterator[PgCluster]:
    """A cluster this test may stop; tables `items` (stale_if_error) and `plain` (no rule)."""
    cluster = PgCluster.start()
    try:
        cluster.create_database(DB)
        cluster.psql(
            "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'one'), (2, 'two');"
            "CREATE TABLE plain (id int PRIMARY KEY, name text); INSERT INTO plain VALUES (1, 'uno');"
            f"GRANT ALL ON items, plain TO {cluster.SCRAM_USER};",
            dbname=DB,
        )
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def stale_proxy(own_pg: PgCluster) -> Iterator[ProxyThread]:
    config = proxy_config(
        own_pg.url(dbname="postgres", connect_timeout=2),
        auth={"mode": "terminate"},
        rules=[{"tables": ["items"], "ttl": "1s", "stale_if_error": "60s"}],
        invalidation={"idle_release": None},
    )
    with ProxyThread.from_mapping(config) as proxy:
        yield proxy


def _dsn(pg: PgCluster, proxy: ProxyThread) -> str:
    return pg.dsn(user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD, dbname=DB, port=proxy.port, connect_timeout=10)


def _stale_served(proxy: ProxyThread) -> int:
    assert proxy.app is not None
    return int(proxy.app.proxy.metrics._stale_served)


def _notice(diagnostic: psycopg.errors.Diagnostic) -> tuple[str | None, str | None, str]:
    # (a Diagnostic is valid only inside the handler: copy what is checked)
    return diagnostic.severity_nonlocalized, diagnostic.sqlstate, diagnostic.message_primary or ""


def _read(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> list[tuple[object, ...]]:
    return conn.execute(sql).fetchall()


async def _asyncpg_read(pg: PgCluster, proxy: ProxyThread, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD,
                                 database=DB)  # fmt: skip
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


def test_stale_reads_while_the_upstream_is_down(own_pg: PgCluster, stale_proxy: ProxyThread) -> None:
    dsn = _dsn(own_pg, stale_proxy)
    # Online: fill the cache (both tables), with psycopg and asyncpg.
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        for sql in (STALE_QUERY, PLAIN_QUERY):
            assert _read(conn, sql) == _read(conn, sql)
    assert asyncio.run(_asyncpg_read(own_pg, stale_proxy, STALE_QUERY)) == [(1, "one")]
    assert asyncio.run(_asyncpg_read(own_pg, stale_proxy, STALE_QUERY)) == [(1, "one")]
    assert _stale_served(stale_proxy) == 0  # nothing stale while the upstream answers

    own_pg.stop("immediate")
    time.sleep(1.2)  # past the 1s TTL: what is served now is stale
    notices: list[tuple[str | None, str | None, str]] = []
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        conn.add_notice_handler(lambda n: notices.append(_notice(n)))
        assert _read(conn, STALE_QUERY) == [(1, "one")]
        stale = [n for n in notices if "served from cacheproxy's cache" in n[2]]
        assert stale and stale[0][:2] == ("WARNING", "01000")
        assert "expired" in stale[0][2]
        # A result cached under a rule without stale_if_error is not served: off by default.
        with pytest.raises(psycopg.errors.ConnectionFailure) as plain:
            conn.execute(PLAIN_QUERY)
        assert plain.value.sqlstate == "08006"
        # A miss and a write fail at once, and the session goes on.
        with pytest.raises(psycopg.errors.ConnectionFailure):
            conn.execute("SELECT id FROM items WHERE id = 2")
        with pytest.raises(psycopg.errors.ConnectionFailure, match="cannot be reached"):
            conn.execute("UPDATE items SET name = 'x' WHERE id = 1")
        assert _read(conn, STALE_QUERY) == [(1, "one")]
    assert time.monotonic() - started < 10  # no request waited for a connect timeout per query (2s each)
    # asyncpg's named statements (Parse, Describe, then Bind/Execute) are answered from the cache too.
    assert asyncio.run(_asyncpg_read(own_pg, stale_proxy, STALE_QUERY)) == [(1, "one")]
    served = _stale_served(stale_proxy)
    assert served >= 3

    # Past the window (the proxy's clock moved 120s on): nothing stale any more.
    assert stale_proxy.app is not None and stale_proxy.app.cache is not None
    service = stale_proxy.app.cache
    real_clock = service.clock
    service.clock = lambda: real_clock() + 120
    try:
        with (
            psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn,
            pytest.raises(psycopg.errors.ConnectionFailure),
        ):
            conn.execute(STALE_QUERY)
    finally:
        service.clock = real_clock
    assert _stale_served(stale_proxy) == served


def test_nothing_stale_once_the_upstream_is_back(own_pg: PgCluster, stale_proxy: ProxyThread) -> None:
    dsn = _dsn(own_pg, stale_proxy)
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        assert _read(conn, STALE_QUERY) == [(1, "one")]
    own_pg.stop("fast")
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        assert _read(conn, STALE_QUERY) == [(1, "one")]
    served = _stale_served(stale_proxy)
    assert served == 1
    own_pg.start_server()
    # Changed behind the proxy's back while it could not listen.
    own_pg.psql("UPDATE items SET name = 'changed' WHERE id = 1", dbname=DB)

    def fresh() -> bool:
        notices: list[tuple[str | None, str | None, str]] = []
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            conn.add_notice_handler(lambda n: notices.append(_notice(n)))
            rows = _read(conn, STALE_QUERY)
        return rows == [(1, "changed")] and not notices

    assert eventually(fresh)
    assert _stale_served(stale_proxy) == served


def test_relay_mode_cannot_serve_without_the_upstream(own_pg: PgCluster) -> None:
    """In relay mode the client authenticates with the database: while it is down, the login fails (08006 class
    error from the proxy), whatever stale_if_error says."""
    config = proxy_config(
        own_pg.url(dbname="postgres", connect_timeout=2),
        rules=[{"tables": ["items"], "ttl": "1s", "stale_if_error": "60s"}],
    )
    with ProxyThread.from_mapping(config) as proxy:
        dsn = _dsn(own_pg, proxy)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert _read(conn, STALE_QUERY) == [(1, "one")]
        own_pg.stop("fast")
        with pytest.raises(psycopg.OperationalError, match="could not connect to upstream"):
            psycopg.connect(dsn)
        assert _stale_served(proxy) == 0


def test_terminate_mode_without_stale_rules_refuses_as_before(own_pg: PgCluster) -> None:
    """No rule has stale_if_error: a client connecting while the upstream is down is refused at once, as in relay
    mode (no session that could only fail every query)."""
    config = proxy_config(own_pg.url(dbname="postgres", connect_timeout=2), auth={"mode": "terminate"})
    with ProxyThread.from_mapping(config) as proxy:
        dsn = _dsn(own_pg, proxy)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert _read(conn, STALE_QUERY) == [(1, "one")]
        own_pg.stop("fast")
        with pytest.raises(psycopg.OperationalError, match="could not connect to upstream"):
            psycopg.connect(dsn)
