"""The raw-protocol control client against the private Postgres: every login method, exact reply bytes, faults."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from cacheproxy.config import UpstreamConfig
from cacheproxy.demo.pgcluster import free_port
from cacheproxy.errors import UpstreamError
from cacheproxy.feeds.raw_client import RawConnection, connect_raw
from cacheproxy.protocol.framing import split_messages
from tests.support.pgcluster import PgCluster
from tests.support.rawpg import SYNC, RawConn, bind, data_rows, describe_portal, execute, parse, query
from tests.support.tls import self_signed

LOGINS = {
    "trust": (PgCluster.SUPERUSER, None),
    "scram-sha-256": (PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD),
    "md5": (PgCluster.MD5_USER, PgCluster.MD5_PASSWORD),
    "password": (PgCluster.PW_USER, PgCluster.PW_PASSWORD),
}


def upstream(pg: PgCluster, user: str = PgCluster.SUPERUSER, password: str | None = None) -> UpstreamConfig:
    return UpstreamConfig.from_url(pg.url(user, password, sslmode="disable"))


def types(reply: bytes) -> str:
    return "".join(chr(t) for t, _ in split_messages(reply))


def rows(reply: bytes) -> list[list[bytes | None]]:
    return data_rows([(chr(t), body) for t, body in split_messages(reply)])


async def scalar(conn: RawConnection, sql: str) -> str:
    value = rows(await conn.request(query(sql)))[0][0]
    assert value is not None
    return value.decode()


@pytest.mark.parametrize("method", list(LOGINS))
async def test_each_login_method_with_the_url_credentials(pg: PgCluster, method: str) -> None:
    user, password = LOGINS[method]
    async with await connect_raw(upstream(pg, user, password), "postgres", purpose="test") as conn:
        assert await scalar(conn, "SELECT current_user") == user
        assert await scalar(conn, "SELECT pg_backend_pid()") == str(conn.backend_pid)
        assert await scalar(conn, "SELECT current_setting('application_name')") == "cacheproxy-test"
        assert conn.parameters["application_name"] == "cacheproxy-test"
        assert conn.parameters["server_version"].startswith("15")
        assert len(conn.secret_key) == 4


async def test_explicit_user_and_password_override_the_url(pg: PgCluster, dbname: str) -> None:
    cfg = upstream(pg)  # the URL's user is the trust superuser, without a password
    conn = await connect_raw(
        cfg, dbname, purpose="x", user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD, settings={"TimeZone": "Asia/Tokyo"}
    )
    async with conn:
        assert await scalar(conn, "SELECT current_user || ' ' || current_database()") == f"{pg.SCRAM_USER} {dbname}"
        assert conn.parameters["TimeZone"] == "Asia/Tokyo"


@pytest.mark.parametrize("method", ["scram-sha-256", "md5", "password"])
async def test_wrong_password_is_28P01_and_never_echoed(pg: PgCluster, method: str) -> None:
    user, _ = LOGINS[method]
    with pytest.raises(UpstreamError) as excinfo:
        await connect_raw(upstream(pg, user, "Wrong-Pa55word"), "postgres", purpose="test")
    assert excinfo.value.sqlstate == "28P01"
    assert "password authentication failed" in excinfo.value.message
    assert "Wrong-Pa55word" not in str(excinfo.value)


async def test_missing_password_is_28000(pg: PgCluster) -> None:
    with pytest.raises(UpstreamError) as excinfo:
        await connect_raw(upstream(pg), "postgres", purpose="test", user=pg.SCRAM_USER)
    assert excinfo.value.sqlstate == "28000"
    assert "no password" in excinfo.value.message


async def test_unknown_database_is_3D000(pg: PgCluster) -> None:
    with pytest.raises(UpstreamError) as excinfo:
        await connect_raw(upstream(pg), "no_such_db", purpose="test")
    assert excinfo.value.sqlstate == "3D000"


async def test_nothing_listening_is_08001(pg: PgCluster) -> None:
    cfg = UpstreamConfig.from_url(f"postgres://postgres@127.0.0.1:{free_port()}/postgres?sslmode=disable")
    with pytest.raises(UpstreamError) as excinfo:
        await connect_raw(cfg, "postgres", purpose="test")
    assert excinfo.value.sqlstate == "08001"


def direct_reply(pg: PgCluster, dbname: str, payload: bytes) -> bytes:
    """The same request sent by the tests' own blocking client: the bytes PostgreSQL sends for it."""
    with RawConn(pg.host, pg.port) as raw:
        raw.startup(pg.SUPERUSER, dbname, application_name="cacheproxy-test")
        raw.send(payload)
        return b"".join(
            msg_type.encode() + (len(body) + 4).to_bytes(4, "big") + body for msg_type, body in raw.recv_until("Z")
        )


async def test_simple_query_reply_is_the_servers_exact_bytes(pg: PgCluster, dbname: str) -> None:
    sql = "SELECT 1 AS one, 'x'::text AS t, NULL::int AS n"
    async with await connect_raw(upstream(pg), dbname, purpose="test") as conn:
        reply = await conn.request(query(sql))
    assert types(reply) == "TDCZ"
    assert rows(reply) == [[b"1", b"x", None]]
    assert reply == direct_reply(pg, dbname, query(sql))


async def test_extended_batch_reply(pg: PgCluster, dbname: str) -> None:
    payload = parse("", "SELECT $1::int + 1 AS n") + bind(params=(b"41",)) + describe_portal() + execute() + SYNC
    async with await connect_raw(upstream(pg), dbname, purpose="test") as conn:
        reply = await conn.request(payload)
        assert conn.transaction_status == b"I"
    assert types(reply) == "12TDCZ"
    assert rows(reply) == [[b"42"]]
    assert reply == direct_reply(pg, dbname, payload)


async def test_pipelined_syncs_and_queries_wait_for_every_ready_for_query(pg: PgCluster, dbname: str) -> None:
    first = parse("", "SELECT 1") + bind() + execute() + SYNC
    second = parse("", "SELECT 2") + bind() + execute() + SYNC
    async with await connect_raw(upstream(pg), dbname, purpose="test") as conn:
        reply = await conn.request(first + second + query("SELECT 3"))
        assert types(reply) == "12DCZ" + "12DCZ" + "TDCZ"
        assert rows(reply) == [[b"1"], [b"2"], [b"3"]]
        # Nothing of that reply is left over to pollute the next one.
        assert types(await conn.request(query("SELECT 4"))) == "TDCZ"


async def test_errors_and_transaction_status_are_relayed(pg: PgCluster, dbname: str) -> None:
    async with await connect_raw(upstream(pg), dbname, purpose="test") as conn:
        assert types(await conn.request(query("BEGIN"))) == "CZ"
        assert conn.transaction_status == b"T"
        reply = await conn.request(query("SELECT 1/0"))
        assert types(reply) == "EZ"
        assert b"22012" in reply
        assert conn.transaction_status == b"E"
        await conn.request(query("ROLLBACK"))
        assert conn.transaction_status == b"I"
        assert await scalar(conn, "SELECT 'still usable'") == "still usable"


async def test_large_result_spanning_many_reads(pg: PgCluster, dbname: str) -> None:
    sql = "SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g"
    async with await connect_raw(upstream(pg), dbname, purpose="test") as conn:
        reply = await conn.request(query(sql))
        assert len(reply) > 2_000_000
        got = rows(reply)
        assert len(got) == 20000
        assert got[-1][0] == b"20000"
        assert types(reply).endswith("CZ")
        assert await scalar(conn, "SELECT 5") == "5"


async def test_copy_from_stdin_is_failed_and_the_connection_stays_usable(pg: PgCluster, dbname: str) -> None:
    pg.psql("CREATE TABLE c (a int)", dbname=dbname)
    async with await connect_raw(upstream(pg), dbname, purpose="test") as conn:
        reply = await conn.request(query("COPY c FROM STDIN"))
        assert types(reply) == "GEZ"
        assert await scalar(conn, "SELECT count(*) FROM c") == "0"


async def test_copy_to_stdout_is_returned_whole(pg: PgCluster, dbname: str) -> None:
    async with await connect_raw(upstream(pg), dbname, purpose="test") as conn:
        reply = await conn.request(query("COPY (SELECT generate_series(1, 3)) TO STDOUT"))
    assert types(reply) == "HdddcCZ"


async def test_terminated_backend_gives_the_servers_fatal(pg: PgCluster, dbname: str) -> None:
    conn = await connect_raw(upstream(pg), dbname, purpose="victim")
    killer = await asyncpg.connect(pg.url(dbname=dbname))
    try:
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", conn.backend_pid)
        with pytest.raises(UpstreamError) as excinfo:
            await conn.request(query("SELECT 1"))
        assert excinfo.value.sqlstate == "57P01"
        assert conn.closed
        with pytest.raises(UpstreamError, match="closed"):
            await conn.request(query("SELECT 1"))
    finally:
        await killer.close()
        await conn.wait_closed()


async def test_a_cancelled_request_closes_the_connection(pg: PgCluster, dbname: str) -> None:
    conn = await connect_raw(upstream(pg), dbname, purpose="test")
    task = asyncio.ensure_future(conn.request(query("SELECT pg_sleep(30)")))
    # Wait until the server runs the statement, then cancel the waiter: the reply position is lost.
    probe = await asyncpg.connect(pg.url(dbname=dbname))
    try:
        while not await probe.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", conn.backend_pid
        ):
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert conn.closed
    finally:
        await probe.close()
        await conn.wait_closed()


async def test_concurrent_requests_are_serialized(pg: PgCluster, dbname: str) -> None:
    async with await connect_raw(upstream(pg), dbname, purpose="test") as conn:
        replies = await asyncio.gather(*(conn.request(query(f"SELECT {i}")) for i in range(20)))
    assert [rows(r) for r in replies] == [[[str(i).encode()]] for i in range(20)]


async def test_replication_connection_accepts_replication_commands(pg: PgCluster, dbname: str) -> None:
    async with await connect_raw(upstream(pg), dbname, purpose="repl", replication=True) as conn:
        reply = await conn.request(query("IDENTIFY_SYSTEM"))
    assert types(reply) == "TDCZ"
    systemid, timeline, xlogpos, db = rows(reply)[0]
    assert db == dbname.encode()
    assert systemid and timeline and xlogpos


async def test_request_needs_a_sync_or_query(pg: PgCluster) -> None:
    async with await connect_raw(upstream(pg), "postgres", purpose="test") as conn:
        with pytest.raises(ValueError, match="Sync or a Query"):
            await conn.request(parse("", "SELECT 1"))
        assert await scalar(conn, "SELECT 1") == "1"


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PgCluster, Path]]:
    """A second cluster serving TLS with a self-signed certificate (and the certificate, as root of trust)."""
    cert, key = self_signed(tmp_path_factory.mktemp("raw-certs"), "server")
    cluster = PgCluster.start()
    try:
        cluster.enable_ssl(cert, key)
        yield cluster, cert
    finally:
        cluster.cleanup()


@pytest.mark.parametrize("sslmode", ["prefer", "verify-full"])
async def test_scram_over_tls(tls_pg: tuple[PgCluster, Path], sslmode: str) -> None:
    # Over TLS the server also offers SCRAM-SHA-256-PLUS; the client picks plain SCRAM-SHA-256 (no channel binding).
    cluster, cert = tls_pg
    url = cluster.url(cluster.SCRAM_USER, cluster.SCRAM_PASSWORD, sslmode=sslmode, sslrootcert=str(cert))
    async with await connect_raw(UpstreamConfig.from_url(url), "postgres", purpose="tls") as conn:
        assert await scalar(conn, "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == "true"
        assert await scalar(conn, "SELECT current_user") == cluster.SCRAM_USER
