"""TLS towards the upstream: the sslmode of the upstream URL, honoured as libpq does, with SCRAM relayed over it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from cacheproxy.protocol import messages as m
from cacheproxy.protocol.startup import encode_startup
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import RawConn, error_fields
from tests.support.tls import self_signed


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("certs")
    cert, key = self_signed(directory, "server")
    other, _ = self_signed(directory, "other")
    return {"cert": cert, "key": key, "other": other}


@pytest.fixture(scope="module")
def tls_pg(certs: dict[str, Path]) -> Iterator[PgCluster]:
    cluster = PgCluster.start()
    try:
        cluster.enable_ssl(certs["cert"], certs["key"])
        yield cluster
    finally:
        cluster.cleanup()


def _backend_uses_ssl(conn: psycopg.Connection[tuple[object, ...]]) -> object:
    row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    return row[0] if row else None


@pytest.mark.parametrize("sslmode", ["require", "prefer", "verify-ca", "verify-full"])
def test_tls_upstream_with_scram(
    tls_pg: PgCluster, certs: dict[str, Path], start_proxy: Callable[..., ProxyThread], sslmode: str
) -> None:
    proxy = start_proxy(upstream=tls_pg.url(sslmode=sslmode, sslrootcert=str(certs["cert"])))
    dsn = tls_pg.dsn(user=tls_pg.SCRAM_USER, password=tls_pg.SCRAM_PASSWORD, port=proxy.port, sslmode="disable")
    with psycopg.connect(dsn) as conn:
        assert _backend_uses_ssl(conn) is True
        assert conn.execute("SELECT current_user").fetchone() == (tls_pg.SCRAM_USER,)


def test_disable_means_plaintext(tls_pg: PgCluster, start_proxy: Callable[..., ProxyThread]) -> None:
    proxy = start_proxy(upstream=tls_pg.url(sslmode="disable"))
    with psycopg.connect(tls_pg.dsn(port=proxy.port, sslmode="disable")) as conn:
        assert _backend_uses_ssl(conn) is False


def test_wrong_root_certificate_is_refused(
    tls_pg: PgCluster, certs: dict[str, Path], start_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = start_proxy(upstream=tls_pg.url(sslmode="verify-full", sslrootcert=str(certs["other"])))
    with RawConn(proxy.host, proxy.port) as conn:
        fields = error_fields(conn.startup("postgres"))
    assert (fields["V"], fields["C"]) == ("FATAL", "08001")
    assert "SSL connection to upstream server" in fields["M"]


def test_require_against_a_server_without_tls_is_refused(
    pg: PgCluster, start_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = start_proxy(upstream=pg.url(sslmode="require"))
    with RawConn(proxy.host, proxy.port) as conn:
        fields = error_fields(conn.startup("postgres"))
    assert fields["C"] == "08001"
    assert "does not support SSL, but SSL was required" in fields["M"]


def test_channel_binding_mechanism_is_not_offered(tls_pg: PgCluster, start_proxy: Callable[..., ProxyThread]) -> None:
    """Over TLS the server offers SCRAM-SHA-256-PLUS; the client's channel ends at the proxy, so it must not see it."""
    proxy = start_proxy(upstream=tls_pg.url(sslmode="require"))
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(encode_startup({"user": tls_pg.SCRAM_USER, "database": "postgres"}))
        msg = conn.recv_message()
    assert msg is not None and msg[0] == "R"
    assert m.auth_code(msg[1]) == m.AUTH_SASL
    assert m.sasl_mechanisms(msg[1]) == ["SCRAM-SHA-256"]
