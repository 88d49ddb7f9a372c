"""Protocol-level behaviour of the relay, seen on the wire: startup, keys and cancel, limits, bad input.

Each case that has an answer from Postgres is compared with the same bytes sent straight to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from cacheproxy.protocol.framing import encode
from cacheproxy.protocol.startup import encode_ssl_request, encode_startup
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, through_both_relays
from tests.support.rawpg import (
    RawConn,
    backend_key,
    data_rows,
    error_fields,
    function_call,
    send_cancel,
)

INT4PL_OID = 177  # pg_proc: int4pl(int4, int4)


proxy = through_both_relays()  # every test here runs through both relays


def test_startup_relays_parameters_and_issues_its_own_secret(pg: PgCluster, proxy: ProxyThread) -> None:
    with RawConn(proxy.host, proxy.port) as via, RawConn(pg.host, pg.port) as direct:
        params = {"application_name": "raw-test", "options": "-c search_path=pg_catalog"}
        got, want = via.startup("postgres", **params), direct.startup("postgres", **params)
        # Same sequence of message types (R, S..., K, Z) and the same ParameterStatus values.
        assert [t for t, _ in got] == [t for t, _ in want]
        assert sorted(b for t, b in got if t == "S") == sorted(b for t, b in want if t == "S")
        proxy_pid, proxy_secret = backend_key(got)
        [[real_pid]] = data_rows(via.query("SELECT pg_backend_pid()"))
        # The pid is the backend's own (what pg_backend_pid() and notifications say); the secret is the proxy's.
        assert real_pid is not None and int(real_pid) == proxy_pid
        assert proxy.app is not None
        [session] = [s for s in proxy.app.proxy._live if s.process_id == proxy_pid]
        assert session.upstream_key is not None
        assert session.upstream_key[1] != proxy_secret.to_bytes(4, "big")
        [[search_path]] = data_rows(via.query("SHOW search_path"))
        assert search_path == b"pg_catalog"


def test_ssl_request_is_declined_then_startup_proceeds(proxy: ProxyThread) -> None:
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(encode_ssl_request())
        assert conn.sock.recv(1) == b"N"
        assert conn.startup("postgres")[-1] == ("Z", b"I")


def test_cancel_request_is_mapped_to_the_upstream_backend(proxy: ProxyThread) -> None:
    with RawConn(proxy.host, proxy.port) as conn:
        pid, secret = backend_key(conn.startup("postgres"))
        conn.send(encode(b"Q", b"SELECT pg_sleep(20)\x00"))
        time.sleep(0.3)
        send_cancel(proxy.host, proxy.port, pid, secret ^ 1)  # wrong secret: ignored
        time.sleep(0.5)
        started = time.monotonic()
        send_cancel(proxy.host, proxy.port, pid, secret)
        reply = conn.recv_until("Z")
        assert time.monotonic() - started < 5
        assert error_fields(reply)["C"] == "57014"  # query_canceled, from the server itself
        assert reply[-1] == ("Z", b"I")
        assert data_rows(conn.query("SELECT 41 + 1")) == [[b"42"]]


def test_function_call_is_relayed(pg: PgCluster, proxy: ProxyThread) -> None:
    results = []
    for host, port in ((proxy.host, proxy.port), (pg.host, pg.port)):
        with RawConn(host, port) as conn:
            conn.startup("postgres")
            conn.send(function_call(INT4PL_OID, 40, 2))
            results.append(conn.recv_until("Z"))
    assert results[0] == results[1]
    assert results[0][0] == ("V", b"\x00\x00\x00\x04\x00\x00\x00\x2a")


def test_pipelined_simple_queries_in_one_write(pg: PgCluster, proxy: ProxyThread) -> None:
    batch = b"".join(encode(b"Q", f"SELECT {i}, repeat('x', {i * 100})\x00".encode()) for i in range(50))
    answers = []
    for host, port in ((proxy.host, proxy.port), (pg.host, pg.port)):
        with RawConn(host, port) as conn:
            conn.startup("postgres")
            conn.send(batch)
            answers.append([conn.recv_until("Z") for _ in range(50)])
    assert answers[0] == answers[1]


def test_endless_encryption_requests_are_refused(proxy: ProxyThread) -> None:
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(encode_ssl_request() * 3)
        assert conn.sock.recv(2) == b"NN"
        fields = error_fields(conn.recv_until("never"))
    assert (fields["V"], fields["C"]) == ("FATAL", "08P01")


def test_unknown_message_type_is_a_protocol_violation(proxy: ProxyThread) -> None:
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres")
        conn.send(encode(b"@", b"junk"))
        reply = conn.recv_until("never")
    fields = error_fields(reply)
    assert (fields["V"], fields["C"]) == ("FATAL", "08P01")
    assert "message type" in fields["M"]


def test_oversized_message_is_refused_without_reading_it(start_proxy: Callable[..., ProxyThread]) -> None:
    proxy = start_proxy(limits={"max_message_size": "64KiB"})
    with RawConn(proxy.host, proxy.port) as conn, RawConn(proxy.host, proxy.port) as other:
        conn.startup("postgres")
        other.startup("postgres")
        # Announce 100 MiB but send only the header: the proxy must answer without waiting for the body.
        conn.send(b"Q" + (100 << 20).to_bytes(4, "big"))
        fields = error_fields(conn.recv_until("never"))
        assert fields["C"] == "54000"
        assert "over the limit" in fields["M"]
        assert data_rows(other.query("SELECT 1")) == [[b"1"]]  # the other session is unaffected
        assert data_rows(other.query("SELECT repeat('y', 60000)"))[0][0] == b"y" * 60000


@pytest.mark.parametrize(
    "packet",
    [
        b"\x00\x00\x00\x08\x00\x02\x00\x00",  # protocol 2.0
        b"\x00\x00\x27\x11",  # startup packet longer than PostgreSQL allows
        encode_startup({"database": "postgres"}),  # no user
    ],
)
def test_bad_startup_packets_get_an_error_and_the_proxy_lives_on(packet: bytes, proxy: ProxyThread) -> None:
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(packet)
        fields = error_fields(conn.recv_until("never"))
    assert fields["V"] == "FATAL"
    assert fields["C"] in ("08P01", "0A000", "28000")
    with RawConn(proxy.host, proxy.port) as conn:
        assert conn.startup("postgres")[-1] == ("Z", b"I")


def test_connection_limit_gives_53300(start_proxy: Callable[..., ProxyThread]) -> None:
    proxy = start_proxy(limits={"max_client_connections": 2})
    with RawConn(proxy.host, proxy.port) as a, RawConn(proxy.host, proxy.port) as b:
        a.startup("postgres")
        b.startup("postgres")
        with RawConn(proxy.host, proxy.port) as c:
            fields = error_fields(c.startup("postgres"))
        assert (fields["V"], fields["C"], fields["M"]) == ("FATAL", "53300", "sorry, too many clients already")
    # Once one leaves, a new client gets in.
    deadline = time.monotonic() + 5
    while proxy.app is not None and proxy.app.proxy.client_count and time.monotonic() < deadline:
        time.sleep(0.05)
    with RawConn(proxy.host, proxy.port) as d:
        assert d.startup("postgres")[-1] == ("Z", b"I")


def test_wrong_password_gets_the_servers_error(pg: PgCluster, proxy: ProxyThread) -> None:
    errors = []
    for port in (proxy.port, pg.port):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(pg.dsn(user=pg.SCRAM_USER, password="wrong", port=port), connect_timeout=5)
        errors.append(str(info.value).split(":", 2)[-1].strip())
    assert errors[0] == errors[1]
    assert 'password authentication failed for user "alice"' in errors[0]


@pytest.mark.parametrize(
    ("user", "password"),
    [
        (PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD),
        (PgCluster.MD5_USER, PgCluster.MD5_PASSWORD),
        (PgCluster.PW_USER, PgCluster.PW_PASSWORD),
        (PgCluster.SUPERUSER, None),
    ],
)
def test_every_auth_method_is_relayed(pg: PgCluster, proxy: ProxyThread, user: str, password: str | None) -> None:
    with psycopg.connect(pg.dsn(user=user, password=password, port=proxy.port)) as conn:
        row = conn.execute("SELECT current_user, inet_server_port()").fetchone()
    assert row == (user, pg.port)


def test_notices_and_notifications_are_relayed(pg: PgCluster, proxy: ProxyThread) -> None:
    with psycopg.connect(pg.dsn(port=proxy.port), autocommit=True) as listener:
        notices: list[str] = []
        listener.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        listener.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
        listener.execute("LISTEN cacheproxy_test")
        with psycopg.connect(pg.dsn(port=proxy.port), autocommit=True) as sender:
            sender.execute("SELECT pg_notify('cacheproxy_test', 'payload-1')")
        got = next(listener.notifies(timeout=5, stop_after=1))
    assert notices == ["hello 42"]
    assert (got.channel, got.payload) == ("cacheproxy_test", "payload-1")


def test_parameter_status_after_set_is_relayed(pg: PgCluster, proxy: ProxyThread) -> None:
    with psycopg.connect(pg.dsn(port=proxy.port), autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        conn.execute("SET application_name = 'renamed'")
        assert conn.info.parameter_status("application_name") == "renamed"


def test_many_concurrent_sessions_each_see_their_own_results(proxy: ProxyThread, pg: PgCluster) -> None:
    failures: list[str] = []

    def worker(n: int) -> None:
        try:
            with psycopg.connect(pg.dsn(port=proxy.port)) as conn:
                for i in range(20):
                    row = conn.execute("SELECT %s::int * 1000 + %s::int", (n, i)).fetchone()
                    if row != (n * 1000 + i,):
                        failures.append(f"{n}/{i}: {row}")
        except Exception as exc:
            failures.append(f"{n}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
