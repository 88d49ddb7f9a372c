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
from pathlib import Path

import asyncpg
import psycopg
import pytest

from cacheproxy.protocol.framing import encode
from tests.e2e.helpers import CliProxy
from tests.support.faulty import FaultyLink
from tests.support.pgcluster import PgCluster
from tests.support.procmem import MIB, rss_bytes
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
    query,
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
    proxy = start_proxy()
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
    proxy = start_proxy(upstream=pg.url(port=faulty.port))
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


# -- a client that never reads: backpressure, measured on a proxy subprocess ------------------------------------

RSS_BOUND = 150 * MIB
HITS = 400


@pytest.fixture
def proxy_process(pg: PgCluster, tmp_path: Path) -> Iterator[CliProxy]:
    with CliProxy.with_config(tmp_path, pg.url(), shutdown={"timeout": "1s"}) as running:
        yield running


def _rss_samples(pid: int, count: int = 10, every: float = 0.1) -> list[int]:
    samples = []
    for _ in range(count):
        samples.append(rss_bytes(pid))
        time.sleep(every)
    return samples


def _wait_client_write(pg: PgCluster, app_name: str) -> None:
    """Wait until the server itself is blocked sending to the proxy: every buffer on the way is full."""
    sql = f"SELECT wait_event FROM pg_stat_activity WHERE application_name = '{app_name}' AND state = 'active'"
    deadline = time.monotonic() + 20
    while pg.psql(sql).strip() != "ClientWrite":
        assert time.monotonic() < deadline, "the server never blocked on writing to the proxy"
        time.sleep(0.05)


def _gone(pg: PgCluster, app_name: str) -> bool:
    sql = f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app_name}'"
    deadline = time.monotonic() + 10
    while (count := pg.psql(sql).strip()) != "0" and time.monotonic() < deadline:
        time.sleep(0.05)
    return count == "0"


def _upstream_calls(pg: PgCluster, marker: str) -> int:
    out = pg.psql(f"SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '%{marker}%'")
    return int(out.strip())


def _reset(conn: RawConn) -> None:
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def test_client_that_never_reads_large_results_keeps_proxy_memory_bounded(
    pg: PgCluster, proxy_process: CliProxy
) -> None:
    big = "SELECT repeat('x', 1000000) FROM generate_series(1, 100)"  # 100 MB per query
    with RawConn(proxy_process.host, proxy_process.port, timeout=30) as warm:  # warm-up: one big result read whole
        warm.startup("postgres")
        assert len(warm.query(big.replace("100)", "10)"))) == 13
    before = rss_bytes(proxy_process.pid)
    app_name = f"noread_{uuid.uuid4().hex[:8]}"
    hog = RawConn(proxy_process.host, proxy_process.port)
    hog.startup("postgres", application_name=app_name)
    hog.send(query(big) * 21)  # 2.1 GB of results asked for, none read
    _wait_client_write(pg, app_name)
    samples = _rss_samples(proxy_process.pid)
    with RawConn(proxy_process.host, proxy_process.port) as other:  # the proxy still serves
        other.startup("postgres")
        assert data_rows(other.query("SELECT 'not stuck'")) == [[b"not stuck"]]
    _reset(hog)
    assert _gone(pg, app_name)
    growth = max(samples) - before
    print(f"proxy RSS before {before / MIB:.1f} MiB, peak while withheld {max(samples) / MIB:.1f} MiB")
    assert growth < RSS_BOUND, f"the proxy grew by {growth / MIB:.0f} MiB while a client did not read"


def test_client_that_never_reads_cache_hits_keeps_proxy_memory_bounded(
    pg: PgCluster, dbname: str, proxy_process: CliProxy
) -> None:
    """Hits are written by the proxy itself, without the server: a pipeline of small queries that each hit a ~900 KB
    entry must not turn into gigabytes queued for a client that does not read."""
    pg.psql(
        "CREATE TABLE blob (v text); INSERT INTO blob SELECT string_agg(md5(g::text), '') FROM "
        "generate_series(1, 28000) g",
        dbname=dbname,
    )  # 896 KB of incompressible text: under max_entry_size
    marker = f"hit_{uuid.uuid4().hex[:8]}"
    hit = f"SELECT v AS {marker} FROM blob"
    with RawConn(proxy_process.host, proxy_process.port) as warm:
        warm.startup("postgres", dbname)
        assert warm.query(hit) == warm.query(hit)  # filled, then a hit
    assert _upstream_calls(pg, marker) == 1
    before = rss_bytes(proxy_process.pid)
    hog = RawConn(proxy_process.host, proxy_process.port)
    hog.startup("postgres", dbname)
    hog.send(query(hit) * HITS)  # 360 MB of hits asked for in 8 KB of requests, none read for now
    time.sleep(1.0)
    samples = _rss_samples(proxy_process.pid)
    replies = [hog.recv_until("Z") for _ in range(HITS)]  # now read: every answer arrives, each the cached one
    assert all(reply == replies[0] for reply in replies) and replies[0][-2][1] == b"SELECT 1\x00"
    hog.close()
    assert _upstream_calls(pg, marker) == 1  # every one of them was answered by the proxy itself
    with RawConn(proxy_process.host, proxy_process.port) as other:
        other.startup("postgres")
        assert data_rows(other.query("SELECT 'not stuck'")) == [[b"not stuck"]]
    growth = max(samples) - before
    print(f"proxy RSS before {before / MIB:.1f} MiB, peak while withheld {max(samples) / MIB:.1f} MiB")
    assert growth < RSS_BOUND, f"the proxy grew by {growth / MIB:.0f} MiB while a client did not read"
