"""TLS towards clients: SSLRequest answered 'S' and the handshake done; `require` refuses plaintext; SCRAM works over
TLS without channel binding (the client's channel ends at the proxy)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.tls import self_signed


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("client-tls"), "proxy")


def _dsn(pg: PgCluster, proxy: ProxyThread, **params: str) -> str:
    return pg.dsn(user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD, port=proxy.port, **params)


@pytest.mark.parametrize("mode", ["allow", "require"])
def test_scram_over_tls(
    pg: PgCluster, cert_pair: tuple[Path, Path], start_proxy: Callable[..., ProxyThread], mode: str
) -> None:
    cert, key = cert_pair
    proxy = start_proxy(tls={"mode": mode, "cert": str(cert), "key": str(key)})
    for binding in ("disable", "prefer"):
        with psycopg.connect(_dsn(pg, proxy, sslmode="require", channel_binding=binding)) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT current_user").fetchone() == (pg.SCRAM_USER,)
    dsn = _dsn(pg, proxy, sslmode="verify-full", sslrootcert=str(cert), host="localhost")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert proxy.app is not None and proxy.app.cache is not None
        hits = proxy.app.cache.engine.stats().hits
        for _ in range(3):  # the cache answers over TLS too
            assert conn.execute("SELECT 40 + 2 AS answer").fetchone() == (42,)
        assert proxy.app.cache.engine.stats().hits == hits + 2


def test_channel_binding_required_fails_clearly(
    pg: PgCluster, cert_pair: tuple[Path, Path], start_proxy: Callable[..., ProxyThread]
) -> None:
    cert, key = cert_pair
    proxy = start_proxy(tls={"mode": "require", "cert": str(cert), "key": str(key)})
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(_dsn(pg, proxy, sslmode="require", channel_binding="require"))
    assert "channel binding" in str(info.value)


def test_require_refuses_plaintext(
    pg: PgCluster, cert_pair: tuple[Path, Path], start_proxy: Callable[..., ProxyThread]
) -> None:
    cert, key = cert_pair
    proxy = start_proxy(tls={"mode": "require", "cert": str(cert), "key": str(key)})
    result = subprocess.run(
        ["psql", "-X", "-c", "SELECT 1", _dsn(pg, proxy, sslmode="disable")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "requires TLS" in result.stderr


def test_allow_keeps_plaintext_clients(
    pg: PgCluster, cert_pair: tuple[Path, Path], start_proxy: Callable[..., ProxyThread]
) -> None:
    cert, key = cert_pair
    proxy = start_proxy(tls={"mode": "allow", "cert": str(cert), "key": str(key)})
    with psycopg.connect(_dsn(pg, proxy, sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_disabled_tls_declines(pg: PgCluster, proxy: ProxyThread) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(_dsn(pg, proxy, sslmode="require"))
    assert "SSL" in str(info.value) or "ssl" in str(info.value)
