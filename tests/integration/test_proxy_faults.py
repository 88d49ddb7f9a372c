"""Faults on the upstream side: down at connect, restarted, killed mid-session, cut mid-result.

The rule for all of them: the affected client gets an ErrorResponse with a proper SQLSTATE, the proxy keeps
running, and no other session notices.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import asyncpg
import psycopg
import pytest

from cacheproxy.protocol.framing import encode
from tests.support.faulty import FaultyLink
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import (
    SYNC,
    RawConn,
    backend_key,
    bind,
    data_rows,
    describe_portal,
    error_fields,
    execute,
    parse,
    send_cancel,
)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_upstream_down_at_connect_gives_08001(pg: PgCluster, start_proxy: Callable[..., ProxyThread]) -> None:
    port = _closed_port()
    proxy = start_proxy(upstream=pg.url(port=port))
    for _ in range(2):  # and the proxy is still there for the next client
        with RawConn(proxy.host, proxy.port) as conn:
            fields = error_fields(conn.startup("postgres"))
        assert (fields["V"], fields["C"]) == ("FATAL", "08001")
        assert f"could not connect to upstream server 127.0.0.1:{port}" in fields["M"]


def test_upstream_restart(pg: PgCluster, start_proxy: Callable[..., ProxyThread]) -> None:
    # failover.wait 0: the session does not wait for a server to come back (tests/integration/test_failover.py).
    proxy = start_proxy(failover={"wait": 0})
    with psycopg.connect(pg.dsn(port=proxy.port), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pg.stop()
        try:
            # The open session loses its server: an error, not a hang.
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
            with RawConn(proxy.host, proxy.port) as raw:
                assert error_fields(raw.startup("postgres"))["C"] == "08001"
        finally:
            pg.start_server()
    with psycopg.connect(pg.dsn(port=proxy.port)) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_backend_terminated_relays_the_servers_fatal_and_spares_others(proxy: ProxyThread) -> None:
    with RawConn(proxy.host, proxy.port) as victim, RawConn(proxy.host, proxy.port) as bystander:
        victim.startup("postgres")
        bystander.startup("postgres")
        [[pid]] = data_rows(victim.query("SELECT pg_backend_pid()"))
        assert pid is not None
        bystander.query(f"SELECT pg_terminate_backend({int(pid)})")
        reply = victim.recv_until("never")
        errors = [error_fields([msg]) for msg in reply if msg[0] == "E"]
        # Exactly the server's own FATAL, not a second one from the proxy.
        assert [(e["V"], e["C"]) for e in errors] == [("FATAL", "57P01")]
        assert data_rows(bystander.query("SELECT 7")) == [[b"7"]]


@pytest.fixture
def faulty(pg: PgCluster) -> Iterator[FaultyLink]:
    link = FaultyLink(pg.host, pg.port).start()
    yield link
    link.stop()


def test_upstream_cut_mid_result_gives_08006(
    pg: PgCluster, faulty: FaultyLink, start_proxy: Callable[..., ProxyThread]
) -> None:
    # failover.wait 0: the session ends (with it, an ERROR and a re-attach: tests/integration/test_failover.py).
    proxy = start_proxy(upstream=pg.url(port=faulty.port), failover={"wait": 0})
    direct_proxy = start_proxy()
    with RawConn(proxy.host, proxy.port) as victim, RawConn(direct_proxy.host, direct_proxy.port) as other:
        victim.startup("postgres")
        other.startup("postgres")
        victim.send(encode(b"Q", b"SELECT g, pg_sleep(0.001) FROM generate_series(1, 100000) g\x00"))
        first = victim.recv_message()
        assert first is not None and first[0] == "T"
        faulty.cut_all()
        reply = victim.recv_until("never")
        fields = error_fields(reply)
        assert (fields["V"], fields["C"]) == ("FATAL", "08006")
        assert "lost connection to the upstream server" in fields["M"]
        assert data_rows(other.query("SELECT 'still here'")) == [[b"still here"]]
    # The proxy that lost its upstream still serves new sessions once the path works again.
    with RawConn(proxy.host, proxy.port) as again:
        again.startup("postgres")
        assert data_rows(again.query("SELECT 1")) == [[b"1"]]


def test_client_gone_mid_result_ends_the_upstream_backend(pg: PgCluster, proxy: ProxyThread) -> None:
    conn = RawConn(proxy.host, proxy.port)
    conn.startup("postgres", application_name="leaver")
    conn.send(encode(b"Q", b"SELECT repeat('z', 1000) FROM generate_series(1, 200000)\x00"))
    assert conn.recv_message() is not None
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()  # RST: gone without a Terminate
    deadline = time.monotonic() + 10
    count = "1"
    while time.monotonic() < deadline:
        count = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'leaver'").strip()
        if count == "0":
            break
        time.sleep(0.1)
    assert count == "0"


# -- an upstream that stalls: statement timeout, cancel, a hung route ---------------------------------------------


def test_upstream_that_accepts_but_never_answers_times_out_the_startup(
    start_proxy: Callable[..., ProxyThread],
) -> None:
    """A server whose listen backlog accepts the TCP connection but which never reads or answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # never accept()ed: the kernel completes the handshake, nobody ever answers
        port = int(silent.getsockname()[1])
        proxy = start_proxy(upstream=f"postgres://postgres@127.0.0.1:{port}/postgres", limits={"startup_timeout": "1s"})
        with RawConn(proxy.host, proxy.port) as conn:
            fields = error_fields(conn.startup("postgres"))
        assert (fields["V"], fields["C"]) == ("FATAL", "57014")
        assert "authentication due to timeout" in fields["M"]


def test_statement_timeout_set_by_the_client_gives_57014(pg: PgCluster, proxy: ProxyThread) -> None:
    with psycopg.connect(pg.dsn(port=proxy.port), autocommit=True) as conn:
        conn.execute("SET statement_timeout = '200ms'")
        with pytest.raises(psycopg.errors.QueryCanceled) as caught:
            conn.execute("SELECT pg_sleep(30)")
        assert caught.value.sqlstate == "57014"
        assert "statement timeout" in str(caught.value)
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)  # the session goes on


def test_driver_timeout_cancels_the_query_through_the_proxy(pg: PgCluster, proxy: ProxyThread) -> None:
    """asyncpg's `timeout=` sends a CancelRequest (to the proxy, with the proxy's key) and the backend stops."""
    marker = f"sleep_{uuid.uuid4().hex[:8]}"
    sql = f"SELECT pg_sleep(30) AS {marker}"

    async def run() -> None:
        conn = await asyncpg.connect(pg.url(port=proxy.port))
        try:
            with pytest.raises(TimeoutError):
                await conn.fetch(sql, timeout=0.5)
            assert await conn.fetchval("SELECT 41 + 1") == 42
        finally:
            await conn.close()

    asyncio.run(run())
    assert _active(pg, marker) == 0


def _active(pg: PgCluster, marker: str) -> int:
    """Backends still running a statement with `marker` (waits up to 5 s for the count to reach 0)."""
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        f"AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + 5
    while (count := int(pg.psql(sql).strip())) and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


@pytest.mark.parametrize("client_action", ["cancel then give up", "give up"])
def test_upstream_stalled_mid_result_while_the_client_gives_up(
    pg: PgCluster,
    faulty: FaultyLink,
    start_proxy: Callable[..., ProxyThread],
    client_action: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The route to the server hangs mid-result (no bytes, no close). The client cancels (the cancel goes out on a new
    connection, which flows) and/or times out and closes: the proxy ends that session and keeps serving others."""
    caplog.set_level(logging.DEBUG, logger="cacheproxy")
    proxy = start_proxy(upstream=pg.url(port=faulty.port))
    assert proxy.app is not None
    with RawConn(proxy.host, proxy.port) as bystander:
        bystander.startup("postgres")
        victim = RawConn(proxy.host, proxy.port, timeout=1.0)
        key = backend_key(victim.startup("postgres"))
        victim.send(encode(b"Q", b"SELECT g, repeat('s', 200) FROM generate_series(1, 2000000) g\x00"))
        first = victim.recv_message()
        assert first is not None and first[0] == "T"
        faulty.stall_all()  # the bystander's connection stalls too: it gets a fresh one below
        if client_action.startswith("cancel"):
            send_cancel(proxy.host, proxy.port, *key)
        with pytest.raises(TimeoutError):  # the client's own read timeout: nothing more arrives
            while victim.recv_message() is not None:
                pass
        victim.close()
        deadline = time.monotonic() + 10
        while proxy.app.proxy.client_count > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The victim's session ended; the stalled bystander is still open.
        assert proxy.app.proxy.client_count == 1, caplog.text
    with RawConn(proxy.host, proxy.port) as other:  # a new session through the same proxy and link
        other.startup("postgres")
        assert data_rows(other.query("SELECT 'still serving'")) == [[b"still serving"]]


# -- a client that disconnects mid-batch -------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["mid-result", "before Sync", "unread pipeline"])
def test_client_gone_mid_batch(pg: PgCluster, proxy: ProxyThread, when: str) -> None:
    """Pipelined extended-protocol messages, then the client vanishes (RST): the backend is ended, the proxy lives."""
    app_name = f"batch_{uuid.uuid4().hex[:8]}"
    conn = RawConn(proxy.host, proxy.port)
    conn.startup("postgres", application_name=app_name)
    big = "SELECT g, repeat('b', 1000) FROM generate_series(1, 100000) g"
    cycle = parse("", big) + bind() + describe_portal() + execute()
    if when == "mid-result":
        conn.send((cycle + SYNC) * 3)
        assert conn.recv_message() == ("1", b"")  # ParseComplete: the batch is running
    elif when == "before Sync":
        conn.send(parse("s", "SELECT $1::int", (23,)) + bind("p", "s", (b"1",)) + execute("p") + cycle)
    else:
        conn.send((cycle + SYNC) * 20)  # and never read any of it
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()
    sql = f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app_name}'"
    deadline = time.monotonic() + 10
    while (count := pg.psql(sql).strip()) != "0" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count == "0"
    with RawConn(proxy.host, proxy.port) as other:
        other.startup("postgres")
        assert data_rows(other.query("SELECT 1")) == [[b"1"]]
