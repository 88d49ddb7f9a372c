"""Role isolation through the cache: one role never receives rows cached for another, and a role that loses a
privilege stops getting the rows it may no longer read.

Two login roles with passwords (alice: SCRAM, bob_md5: md5), a table with row-level security (a policy on
current_user) and a table with column privileges. Each check runs over the simple protocol (psycopg without
parameters sends a Query) and the extended one (asyncpg: Parse/Bind/Execute), with the same SQL text for both roles.
Whether a read was answered from the cache is told by pg_stat_statements (how often the server ran the text).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.support.cachetest import eventually, new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread

ALICE = (PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD)
BOB = (PgCluster.MD5_USER, PgCluster.MD5_PASSWORD)
Rows = list[tuple[Any, ...]]
PROTOCOLS = ["simple", "extended"]

_SETUP = f"""
CREATE TABLE docs (id int PRIMARY KEY, owner name NOT NULL, body text);
INSERT INTO docs VALUES (1, '{ALICE[0]}', 'alice-1'), (2, '{ALICE[0]}', 'alice-2'), (3, '{BOB[0]}', 'bob-1');
CREATE POLICY own_rows ON docs USING (owner = current_user);
GRANT SELECT ON docs TO {ALICE[0]}, {BOB[0]};
CREATE TABLE pay (id int PRIMARY KEY, name text, salary int);
INSERT INTO pay VALUES (1, 'ann', 100), (2, 'ben', 200);
GRANT SELECT ON pay TO {ALICE[0]};
GRANT SELECT (id, name) ON pay TO {BOB[0]};
"""
ALICE_DOCS = [(1, "alice-1"), (2, "alice-2")]
BOB_DOCS = [(3, "bob-1")]
PAY = [(1, "ann", 100), (2, "ben", 200)]


def read(pg: PgCluster, port: int, dbname: str, role: tuple[str, str], sql: str, protocol: str) -> Rows | str:
    """`sql` run once as `role` on a new connection: its rows, or the SQLSTATE of the error it got."""
    if protocol == "simple":
        try:
            with psycopg.connect(pg.dsn(role[0], role[1], dbname, port=port), autocommit=True) as conn:
                return conn.execute(sql).fetchall()  # no parameters: psycopg sends a simple Query
        except psycopg.Error as exc:
            assert exc.sqlstate is not None, repr(exc)
            return exc.sqlstate

    async def extended() -> Rows | str:
        conn = await asyncpg.connect(pg.url(role[0], role[1], dbname, port=port))
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        except asyncpg.PostgresError as exc:
            return str(exc.sqlstate)
        finally:
            await conn.close()

    return asyncio.run(extended())


@pytest.fixture
def cached(start_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return start_proxy(cache={"default_ttl": "60s"})


@pytest.fixture
def tables(pg: PgCluster, dbname: str) -> str:
    pg.psql(_SETUP, dbname=dbname)
    return dbname


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_row_level_security_rows_stay_with_their_role(
    pg: PgCluster, tables: str, cached: ProxyThread, protocol: str
) -> None:
    pg.psql("ALTER TABLE docs ENABLE ROW LEVEL SECURITY", dbname=tables)
    sql = f"SELECT id, body AS {new_marker()} FROM docs ORDER BY id"
    for _ in range(2):
        assert read(pg, cached.port, tables, ALICE, sql, protocol) == ALICE_DOCS
        assert read(pg, cached.port, tables, BOB, sql, protocol) == BOB_DOCS


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_row_level_security_enabled_behind_the_proxys_back(
    pg: PgCluster, tables: str, start_proxy: Callable[..., ProxyThread], protocol: str
) -> None:
    """The proxy read the catalog while `docs` had no RLS and does not look again (catalog_poll off), so it caches
    `docs` reads: per role, so still isolated."""
    cached = start_proxy(cache={"default_ttl": "60s"}, invalidation={"catalog_poll": None})
    assert read(pg, cached.port, tables, ALICE, "SELECT count(*) FROM docs", protocol) == [(3,)]  # catalog loaded
    pg.psql("ALTER TABLE docs ENABLE ROW LEVEL SECURITY", dbname=tables)  # directly: the proxy does not see it
    marker = new_marker()
    sql = f"SELECT id, body AS {marker} FROM docs ORDER BY id"
    for _ in range(3):
        assert read(pg, cached.port, tables, ALICE, sql, protocol) == ALICE_DOCS
        assert read(pg, cached.port, tables, BOB, sql, protocol) == BOB_DOCS
    assert upstream_calls(pg, marker) == 2  # cached: one miss per role, and never one role's entry for the other


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_column_privileges_are_not_bypassed_by_a_cached_result(
    pg: PgCluster, tables: str, cached: ProxyThread, protocol: str
) -> None:
    marker = new_marker()
    sql = f"SELECT id, name, salary AS {marker} FROM pay ORDER BY id"
    for _ in range(2):
        assert read(pg, cached.port, tables, ALICE, sql, protocol) == PAY
    assert upstream_calls(pg, marker) == 1  # alice's second read was a hit: there is an entry to leak
    for _ in range(2):
        assert read(pg, cached.port, tables, BOB, sql, protocol) == "42501"  # permission denied for table pay
    assert read(pg, cached.port, tables, BOB, "SELECT id, name FROM pay ORDER BY id", protocol) == [
        (1, "ann"),
        (2, "ben"),
    ]


def test_set_role_does_not_reuse_the_login_roles_entry(pg: PgCluster, tables: str, cached: ProxyThread) -> None:
    sql = f"SELECT id, name, salary AS {new_marker()} FROM pay ORDER BY id"
    with psycopg.connect(pg.dsn(dbname=tables, port=cached.port), autocommit=True) as su:
        assert su.execute(sql).fetchall() == PAY
        assert su.execute(sql).fetchall() == PAY
        su.execute(f"SET ROLE {BOB[0]}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            su.execute(sql)
        su.execute("RESET ROLE")
        assert su.execute(sql).fetchall() == PAY


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_revoke_through_the_proxy_stops_cached_reads(
    pg: PgCluster, tables: str, cached: ProxyThread, protocol: str
) -> None:
    marker = new_marker()
    sql = f"SELECT id, name, salary AS {marker} FROM pay ORDER BY id"
    for _ in range(2):
        assert read(pg, cached.port, tables, ALICE, sql, protocol) == PAY
    assert upstream_calls(pg, marker) == 1
    with psycopg.connect(pg.dsn(dbname=tables, port=cached.port), autocommit=True) as su:
        su.execute(f"REVOKE SELECT ON pay FROM {ALICE[0]}")
    assert read(pg, cached.port, tables, ALICE, sql, protocol) == "42501"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_revoke_directly_on_postgres_stops_cached_reads(
    pg: PgCluster, tables: str, cached: ProxyThread, protocol: str
) -> None:
    marker = new_marker()
    sql = f"SELECT id, name, salary AS {marker} FROM pay ORDER BY id"
    for _ in range(2):
        assert read(pg, cached.port, tables, ALICE, sql, protocol) == PAY
    assert upstream_calls(pg, marker) == 1
    pg.psql(f"REVOKE SELECT ON pay FROM {ALICE[0]}", dbname=tables)  # bypassing the proxy
    # Seen by the catalog poll (invalidation.catalog_poll, 1 s): until then the change is not visible to the proxy.
    assert eventually(lambda: read(pg, cached.port, tables, ALICE, sql, protocol) == "42501")


def test_row_level_security_enabled_directly_hides_rows_cached_before(
    pg: PgCluster, tables: str, cached: ProxyThread
) -> None:
    sql = f"SELECT id, body AS {new_marker()} FROM docs ORDER BY id"
    everything = [(1, "alice-1"), (2, "alice-2"), (3, "bob-1")]
    for _ in range(2):
        assert read(pg, cached.port, tables, ALICE, sql, "simple") == everything  # no RLS yet: all rows, cached
    pg.psql("ALTER TABLE docs ENABLE ROW LEVEL SECURITY", dbname=tables)  # bypassing the proxy
    assert eventually(lambda: read(pg, cached.port, tables, ALICE, sql, "simple") == ALICE_DOCS)
