"""Faults on the upstream side: down at connect, restarted, killed mid-session, cut mid-result.

The rule for all of them: the affected client gets an ErrorResponse with a proper SQLSTATE, the proxy keeps
running, and no other session notices.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from cacheproxy.protocol.framing import encode
from tests.support.faulty import FaultyLink
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import RawConn, data_rows, error_fields


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
