"""TLS on the MySQL front end: the proxy terminates the client's TLS (tls.*) and opens its own upstream (sslmode).

Real clients (PyMySQL, aiomysql, mysqlclient, the mariadb command line) against private MariaDB servers, one plain
(the session's) and one with TLS (started here with certificates made here).
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.support.mariadb import PASSWORD, USER, MariaDB
from tests.support.proxy import ProxyThread, proxy_config
from tests.support.tls import self_signed


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("mysql-certs")
    proxy_cert, proxy_key = self_signed(directory, "proxy")
    server_cert, server_key = self_signed(directory, "server")
    other, _ = self_signed(directory, "other")
    return {"proxy_cert": proxy_cert, "proxy_key": proxy_key, "server_cert": server_cert, "server_key": server_key,
            "other": other}  # fmt: skip


@pytest.fixture(scope="module")
def tls_mariadb(certs: dict[str, Path]) -> Iterator[MariaDB]:
    """A MariaDB with TLS (its certificate is its own CA), a user that must use TLS, and an ed25519 user."""
    server = MariaDB.start((f"--ssl-cert={certs['server_cert']}", f"--ssl-key={certs['server_key']}",
                            f"--ssl-ca={certs['server_cert']}"))  # fmt: skip
    try:
        with server.root_connect() as conn, conn.cursor() as cur:
            cur.execute("CREATE USER 'tlsonly'@'%' IDENTIFIED BY 'secret' REQUIRE SSL")
            cur.execute("GRANT ALL ON *.* TO 'tlsonly'@'%'")
            cur.execute("INSTALL SONAME 'auth_ed25519'")
            cur.execute("CREATE USER 'ed'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('edsecret')")
            cur.execute("GRANT ALL ON *.* TO 'ed'@'%'")
        yield server
    finally:
        server.stop()


@pytest.fixture
def start(certs: dict[str, Path]) -> Iterator[Callable[..., ProxyThread]]:
    started: list[ProxyThread] = []

    def run(upstream: str, mode: str = "allow", **sections: Any) -> ProxyThread:
        tls = {"mode": mode, "cert": str(certs["proxy_cert"]), "key": str(certs["proxy_key"])}
        proxy = ProxyThread.from_mapping(proxy_config(upstream, tls=tls, **sections)).start()
        started.append(proxy)
        return proxy

    yield run
    for proxy in started:
        proxy.stop()


def _connect(proxy: ProxyThread, ca: Path | None, **kw: Any) -> Any:
    args: dict[str, Any] = {"host": proxy.host, "port": proxy.port, "user": USER, "password": PASSWORD,
                            "autocommit": True}  # fmt: skip
    if ca is not None:
        args["ssl"] = {"ca": str(ca), "check_hostname": True}
    else:
        args["ssl_disabled"] = True  # PyMySQL would otherwise use TLS whenever it is offered
    args.update(kw)
    return pymysql.connect(**args)


def _one(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


def _server_cipher(conn: Any) -> str:
    """What the server says of the connection the proxy opened for this session: its TLS cipher, or ''."""
    row = _one(conn, "SHOW SESSION STATUS LIKE 'Ssl_cipher'")
    return str(row[1])


def test_pymysql_over_tls_to_the_proxy_caches_and_matches_direct(
    mariadb: MariaDB, mydb: str, certs: dict[str, Path], start: Callable[..., ProxyThread]
) -> None:
    with mariadb.connect(mydb) as direct, direct.cursor() as cur:
        cur.execute("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(10))")
        cur.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    proxy = start(mariadb.url(mydb))
    with _connect(proxy, certs["proxy_cert"], database=mydb) as conn:
        assert isinstance(conn._sock, ssl.SSLSocket) and conn._sock.version() in ("TLSv1.2", "TLSv1.3")
        assert _server_cipher(conn) == ""  # the upstream connection is plaintext: that server has no TLS
        for _ in range(3):
            with conn.cursor() as cur:
                cur.execute("SELECT id, v FROM t ORDER BY id")
                assert cur.fetchall() == ((1, "a"), (2, "b"))
        with conn.cursor() as cur:
            cur.execute("UPDATE t SET v = 'z' WHERE id = 1")
            cur.execute("SELECT id, v FROM t ORDER BY id")
            assert cur.fetchall() == ((1, "z"), (2, "b"))
    assert proxy.app is not None
    stats = proxy.app.proxy.engine.stats()  # type: ignore[union-attr]
    assert stats.hits == 2 and stats.misses == 2
    # A client that does not ask for TLS still gets in under tls.mode allow.
    with _connect(proxy, None, database=mydb) as conn:
        assert not isinstance(conn._sock, ssl.SSLSocket)
        assert _one(conn, "SELECT v FROM t WHERE id = 2") == ("b",)


def test_aiomysql_and_mysqlclient_over_tls(mariadb: MariaDB, certs: dict[str, Path],
                                           start: Callable[..., ProxyThread]) -> None:  # fmt: skip
    import aiomysql
    import MySQLdb

    proxy = start(mariadb.url(), mode="require")  # a client in is a client over TLS

    async def with_aiomysql() -> Any:
        context = ssl.create_default_context(cafile=str(certs["proxy_cert"]))
        conn = await aiomysql.connect(host=proxy.host, port=proxy.port, user=USER, password=PASSWORD, ssl=context)
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT 40 + 2")
                return await cur.fetchone()
        finally:
            conn.close()

    assert asyncio.run(with_aiomysql()) == (42,)
    conn = MySQLdb.connect(host=proxy.host, port=proxy.port, user=USER, password=PASSWORD,
                           ssl={"ca": str(certs["proxy_cert"])})  # fmt: skip
    try:
        cur = conn.cursor()
        cur.execute("SELECT 'via mysqlclient'")
        assert cur.fetchone() == ("via mysqlclient",)
    finally:
        conn.close()


def test_tls_required_refuses_a_plaintext_client(mariadb: MariaDB, certs: dict[str, Path],
                                                 start: Callable[..., ProxyThread]) -> None:  # fmt: skip
    proxy = start(mariadb.url(), mode="require")
    with pytest.raises(pymysql.err.OperationalError) as refused:
        _connect(proxy, None)
    assert refused.value.args[0] == 3159 and "TLS is required" in refused.value.args[1]
    with _connect(proxy, certs["proxy_cert"]) as conn:  # the proxy survives and takes a TLS client
        assert _one(conn, "SELECT 1") == (1,)


def test_tls_disabled_refuses_a_client_that_insists(mariadb: MariaDB, certs: dict[str, Path]) -> None:
    with ProxyThread.from_mapping(proxy_config(mariadb.url())) as proxy:
        with pytest.raises(pymysql.err.OperationalError):  # PyMySQL sees no CLIENT_SSL and will not go plaintext
            _connect(proxy, certs["proxy_cert"], ssl_verify_cert=True)
        with _connect(proxy, None) as conn:
            assert _one(conn, "SELECT 2") == (2,)


@pytest.mark.skipif(shutil.which("mariadb") is None, reason="the mariadb command line client is not installed")
def test_mariadb_cli_with_ssl(mariadb: MariaDB, certs: dict[str, Path], start: Callable[..., ProxyThread]) -> None:
    proxy = start(mariadb.url(), mode="require")
    base = ["mariadb", "--no-defaults", "-h", proxy.host, "-P", str(proxy.port), "-u", USER, f"-p{PASSWORD}"]
    done = subprocess.run([*base, "--ssl", f"--ssl-ca={certs['proxy_cert']}", "--ssl-verify-server-cert",
                           "-e", "SELECT 'over tls'; \\s"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "over tls" in done.stdout
    assert "Cipher in use is" in done.stdout
    refused = subprocess.run([*base, "--skip-ssl", "-e", "SELECT 1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "TLS is required" in refused.stderr


@pytest.mark.parametrize("sslmode", ["require", "prefer", "verify-ca", "verify-full"])
def test_upstream_tls_verified(tls_mariadb: MariaDB, certs: dict[str, Path], start: Callable[..., ProxyThread],
                               sslmode: str) -> None:  # fmt: skip
    url = f"{tls_mariadb.url()}?sslmode={sslmode}&sslrootcert={certs['server_cert']}"
    proxy = start(url)
    for ca in (None, certs["proxy_cert"]):  # a plaintext client and a TLS client: the sequence ids line up both ways
        with _connect(proxy, ca) as conn:
            assert _server_cipher(conn) != ""
            assert _one(conn, "SELECT CURRENT_USER()") == (f"{USER}@%",)
        # A user the server lets in only over TLS gets in: the server sees the proxy's TLS.
        with _connect(proxy, ca, user="tlsonly", password="secret") as conn:
            assert _one(conn, "SELECT CURRENT_USER()") == ("tlsonly@%",)


def test_upstream_disable_is_plaintext_and_a_tls_only_user_is_refused_by_the_server(
    tls_mariadb: MariaDB, certs: dict[str, Path], start: Callable[..., ProxyThread]
) -> None:
    proxy = start(f"{tls_mariadb.url()}?sslmode=disable")
    with _connect(proxy, certs["proxy_cert"]) as conn:
        assert _server_cipher(conn) == ""
    with pytest.raises(pymysql.err.OperationalError) as refused:
        _connect(proxy, certs["proxy_cert"], user="tlsonly", password="secret")
    assert refused.value.args[0] == 1045  # the server's own answer, relayed


def test_upstream_with_a_wrong_ca_is_refused(tls_mariadb: MariaDB, certs: dict[str, Path],
                                             start: Callable[..., ProxyThread]) -> None:  # fmt: skip
    proxy = start(f"{tls_mariadb.url()}?sslmode=verify-full&sslrootcert={certs['other']}")
    with pytest.raises(pymysql.err.OperationalError) as refused:
        _connect(proxy, certs["proxy_cert"])
    assert refused.value.args[0] == 2026 and "TLS to the upstream server failed" in refused.value.args[1]
    with pytest.raises(pymysql.err.OperationalError) as refused:
        _connect(proxy, None)  # a plaintext client gets the same clear error
    assert refused.value.args[0] == 2026


def test_upstream_tls_required_but_not_offered_is_refused(mariadb: MariaDB, start: Callable[..., ProxyThread]) -> None:
    proxy = start(f"{mariadb.url()}?sslmode=require")
    with pytest.raises(pymysql.err.OperationalError) as refused:
        _connect(proxy, None)
    assert refused.value.args[0] == 2026 and "does not offer TLS" in refused.value.args[1]


def test_catalog_reads_use_upstream_tls(tls_mariadb: MariaDB, certs: dict[str, Path],
                                        start: Callable[..., ProxyThread]) -> None:  # fmt: skip
    """Reads are cached only once the catalog is read: over verify-full TLS, as the sessions are."""
    tls_mariadb.create_database("tlscat")
    try:
        with tls_mariadb.connect("tlscat") as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id INT PRIMARY KEY)")
            cur.execute("INSERT INTO t VALUES (7)")
        proxy = start(f"{tls_mariadb.url('tlscat')}?sslmode=verify-full&sslrootcert={certs['server_cert']}")
        with _connect(proxy, certs["proxy_cert"], database="tlscat") as conn:
            for _ in range(2):
                assert _one(conn, "SELECT id FROM t") == (7,)
        assert proxy.app is not None
        assert proxy.app.proxy.engine.stats().hits == 1  # type: ignore[union-attr]
    finally:
        tls_mariadb.drop_database("tlscat")


@pytest.mark.skipif(shutil.which("mariadb") is None, reason="the mariadb command line client is not installed")
@pytest.mark.parametrize("upstream_mode", ["verify-full", "disable"])
def test_ed25519_through_tls(tls_mariadb: MariaDB, certs: dict[str, Path], start: Callable[..., ProxyThread],
                             upstream_mode: str) -> None:  # fmt: skip
    """MariaDB's ed25519 (signature over the server's scramble) relayed with TLS on both sides, or on one only."""
    proxy = start(f"{tls_mariadb.url()}?sslmode={upstream_mode}&sslrootcert={certs['server_cert']}", mode="require")
    done = subprocess.run(
        ["mariadb", "--no-defaults", "-h", proxy.host, "-P", str(proxy.port), "-u", "ed", "-pedsecret", "--ssl",
         f"--ssl-ca={certs['proxy_cert']}", "-N", "-e", "SELECT CURRENT_USER()"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ed@%"
    wrong = subprocess.run(
        ["mariadb", "--no-defaults", "-h", proxy.host, "-P", str(proxy.port), "-u", "ed", "-pwrong", "--ssl",
         f"--ssl-ca={certs['proxy_cert']}", "-e", "SELECT 1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert wrong.returncode != 0 and "Access denied" in wrong.stderr


def test_binlog_feed_over_upstream_tls(tls_mariadb: MariaDB, certs: dict[str, Path],
                                      start: Callable[..., ProxyThread]) -> None:  # fmt: skip
    """invalidation.binlog's replica connection honours sslmode too: it follows the binlog of a TLS server."""
    from tests.support.cachetest import eventually

    tls_mariadb.create_database("tlsbin")
    try:
        with tls_mariadb.connect("tlsbin") as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id INT PRIMARY KEY)")
        url = f"{tls_mariadb.url('tlsbin')}?sslmode=verify-full&sslrootcert={certs['server_cert']}"
        proxy = start(url, invalidation={"binlog": True})
        assert proxy.app is not None
        server = proxy.app.proxy
        assert eventually(lambda: server.feed_down is None, 30)  # type: ignore[union-attr]
        with _connect(proxy, certs["proxy_cert"], database="tlsbin") as conn:
            assert _one(conn, "SELECT COUNT(*) FROM t") == (0,)
            assert _one(conn, "SELECT COUNT(*) FROM t") == (0,)
            with tls_mariadb.connect("tlsbin") as direct, direct.cursor() as cur:
                cur.execute("INSERT INTO t VALUES (1)")  # straight on the server: only the binlog tells the proxy
            assert eventually(lambda: _one(conn, "SELECT COUNT(*) FROM t") == (1,), 30)
    finally:
        tls_mariadb.drop_database("tlsbin")
