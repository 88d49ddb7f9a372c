"""The private Postgres fixture itself: auth methods per role, server settings, restart."""

from __future__ import annotations

import asyncpg
import pg8000.native
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.support.pgcluster import PgCluster


async def test_superuser_trust_over_tcp_with_asyncpg(pg: PgCluster) -> None:
    conn = await asyncpg.connect(pg.url())
    try:
        assert await conn.fetchval("SELECT current_user") == PgCluster.SUPERUSER
        assert await conn.fetchval("SELECT inet_server_port()") == pg.port
    finally:
        await conn.close()


def test_scram_user_with_psycopg(pg: PgCluster) -> None:
    dsn = pg.dsn(PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (PgCluster.SCRAM_USER,)
    # libpq reports a failed connection without a SQLSTATE (psycopg's .sqlstate is None), so match
    # the server's FATAL text here; the asyncpg test below checks the 28P01 code itself.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(PgCluster.SCRAM_USER, "wrong-password"))


async def test_wrong_scram_password_is_28P01(pg: PgCluster) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as excinfo:
        await asyncpg.connect(pg.url(PgCluster.SCRAM_USER, "wrong-password"))
    assert excinfo.value.sqlstate == "28P01"


def test_md5_user_with_pg8000(pg: PgCluster) -> None:
    conn = pg8000.native.Connection(
        PgCluster.MD5_USER, host=pg.host, port=pg.port, database="postgres", password=PgCluster.MD5_PASSWORD
    )
    try:
        assert conn.run("SELECT current_user") == [[PgCluster.MD5_USER]]
    finally:
        conn.close()


async def test_cleartext_password_user_with_asyncpg(pg: PgCluster) -> None:
    conn = await asyncpg.connect(pg.url(PgCluster.PW_USER, PgCluster.PW_PASSWORD))
    try:
        assert await conn.fetchval("SELECT current_user") == PgCluster.PW_USER
    finally:
        await conn.close()


def test_hba_and_stored_passwords_match_the_intended_auth_methods(pg: PgCluster) -> None:
    rules = pg.psql("SELECT type, database[1], user_name[1], auth_method FROM pg_hba_file_rules ORDER BY line_number")
    assert rules.split() == [
        "local|all|all|trust",
        "host|all|postgres|trust",
        "host|all|bob_md5|md5",
        "host|all|carol_pw|password",
        "host|all|all|scram-sha-256",
        "host|replication|all|trust",
    ]
    stored = pg.psql("SELECT rolname || '|' || substring(rolpassword from '^(md5|SCRAM-SHA-256)') FROM pg_authid")
    assert {"alice|SCRAM-SHA-256", "bob_md5|md5", "carol_pw|SCRAM-SHA-256"} <= set(stored.split())


def test_server_settings(pg: PgCluster) -> None:
    assert pg.psql("SHOW wal_level").strip() == "logical"
    assert pg.psql("SHOW listen_addresses").strip() == "127.0.0.1"
    assert pg.psql("SHOW max_connections").strip() == "300"
    assert pg.port != 5432


async def test_pg_stat_statements_in_fresh_database(pg: PgCluster, dbname: str) -> None:
    conn = await asyncpg.connect(pg.url(PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD, dbname))
    try:
        assert await conn.fetchval("SELECT current_database()") == dbname
        assert await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'")
        await conn.execute("CREATE TABLE t (id int)")  # PUBLIC may create in the public schema
        assert await conn.fetchval("SELECT count(*) >= 0 FROM pg_stat_statements")
    finally:
        await conn.close()


def test_restart_keeps_port_and_data(pg: PgCluster, dbname: str) -> None:
    port = pg.port
    pg.psql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before restart')", dbname=dbname)
    pg.restart()
    assert pg.port == port
    assert pg.is_running()
    assert pg.psql("SELECT v FROM kept", dbname=dbname).strip() == "before restart"
    with psycopg.connect(pg.dsn(dbname=dbname)) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (port,)


def test_stop_then_start_server(pg: PgCluster) -> None:
    pg.stop()
    assert not pg.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg.dsn(), connect_timeout=2)
    pg.start_server()
    assert pg.psql("SELECT 1").strip() == "1"


def test_connection_strings_escape_special_characters(pg: PgCluster) -> None:
    password = "p@ss w:rd/'\\%"
    for conninfo in (
        pg.url("alice", password, "db name", application_name="x y"),
        pg.dsn("alice", password, "db name", application_name="x y"),
    ):
        parsed = conninfo_to_dict(conninfo)
        assert parsed["password"] == password
        assert parsed["dbname"] == "db name"
        assert parsed["application_name"] == "x y"
        assert (parsed["host"], int(str(parsed["port"]))) == ("127.0.0.1", pg.port)
    assert pg.env(dbname="d")["PGPORT"] == str(pg.port)
