"""asyncmy (the Cython asyncio driver) through the MySQL front end: every answer compared with the same work sent
directly, caching and invalidation seen through it, and TLS to the proxy."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.mariadb import PASSWORD, USER, MariaDB
from tests.support.proxy import ProxyThread, proxy_config
from tests.support.tls import self_signed

asyncmy = pytest.importorskip("asyncmy")

QUERIES = [
    "SELECT * FROM kinds ORDER BY id",
    "SELECT id, d * 2, CONCAT(s, '!'), b, j FROM kinds WHERE id > 1 ORDER BY id",
    "SELECT COUNT(*), SUM(d), MAX(t), MIN(dt) FROM kinds",
    "SELECT s FROM kinds WHERE s IS NULL",
    "SELECT 1, 'x', NULL, 2.5, CAST('2024-01-02' AS DATE)",
]


@pytest.fixture
def kinds(mariadb: MariaDB, mydb: str) -> None:
    with mariadb.connect(mydb) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE kinds (id INT PRIMARY KEY, d DECIMAL(12,3), s VARCHAR(30), b BLOB, j JSON, "
                    "t TIME(3), dt DATETIME(6), f DOUBLE, big BIGINT UNSIGNED, bits BIT(5))")  # fmt: skip
        cur.execute("INSERT INTO kinds VALUES (1, 1.5, 'été', x'00ff10', '{\"a\": [1, 2]}', '12:34:56.789', "
                    "'2024-02-29 23:59:59.123456', 1e300, 18446744073709551615, b'10101'), "
                    "(2, -0.001, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL), "
                    "(3, 0, '', '', '[]', '-838:59:59', '1970-01-01 00:00:01', -0.0, 0, b'0')")  # fmt: skip


@pytest.fixture
def proxy(mariadb: MariaDB, mydb: str, tmp_path: Path) -> Iterator[tuple[ProxyThread, Path]]:
    cert, key = self_signed(tmp_path, "proxy")
    config = proxy_config(mariadb.url(mydb), tls={"mode": "allow", "cert": str(cert), "key": str(key)})
    with ProxyThread.from_mapping(config) as running:
        yield running, cert


async def _run(port: int, database: str, queries: list[str], **kw: Any) -> list[Any]:
    conn = await asyncmy.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, database=database,
                                 autocommit=True, **kw)  # fmt: skip
    try:
        out = []
        async with conn.cursor() as cur:
            for sql in queries:
                await cur.execute(sql)
                out.append((await cur.fetchall(), [d[:2] for d in cur.description or ()]))
        return out
    finally:
        conn.close()


def test_asyncmy_answers_match_direct_and_repeat_from_the_cache(
    mariadb: MariaDB, mydb: str, kinds: None, proxy: tuple[ProxyThread, Path]
) -> None:
    running, _ = proxy
    direct = asyncio.run(_run(mariadb.port, mydb, QUERIES))
    assert asyncio.run(_run(running.port, mydb, QUERIES)) == direct
    assert asyncio.run(_run(running.port, mydb, QUERIES)) == direct
    assert running.app is not None
    stats = running.app.proxy.engine.stats()  # type: ignore[union-attr]
    assert stats.hits == len(QUERIES) and stats.misses == len(QUERIES)


def test_asyncmy_writes_invalidate_and_transactions(mydb: str, kinds: None, proxy: tuple[ProxyThread, Path]) -> None:
    running, _ = proxy

    async def work() -> list[Any]:
        conn = await asyncmy.connect(host="127.0.0.1", port=running.port, user=USER, password=PASSWORD,
                                     database=mydb, autocommit=True)  # fmt: skip
        seen = []
        try:
            async with conn.cursor() as cur:
                for value in ("a", "b"):
                    await cur.execute("SELECT s FROM kinds WHERE id = 3")
                    seen.append(await cur.fetchone())
                    await cur.execute("UPDATE kinds SET s = %s WHERE id = 3", (value,))
                await conn.begin()
                await cur.execute("UPDATE kinds SET s = 'in tx' WHERE id = 3")
                await cur.execute("SELECT s FROM kinds WHERE id = 3")
                seen.append(await cur.fetchone())
                await conn.rollback()
                await cur.execute("SELECT s FROM kinds WHERE id = 3")
                seen.append(await cur.fetchone())
        finally:
            conn.close()
        return seen

    assert asyncio.run(work()) == [("",), ("a",), ("in tx",), ("b",)]


def test_asyncmy_over_tls_to_the_proxy(mariadb: MariaDB, mydb: str, kinds: None,
                                       proxy: tuple[ProxyThread, Path]) -> None:  # fmt: skip
    _, cert = proxy
    tls = {"mode": "require", "cert": str(cert), "key": str(cert.with_suffix(".key"))}
    with ProxyThread.from_mapping(proxy_config(mariadb.url(mydb), tls=tls)) as running:  # a client in is over TLS
        context = ssl.create_default_context(cafile=str(cert))
        direct = asyncio.run(_run(mariadb.port, mydb, QUERIES[:2]))
        assert asyncio.run(_run(running.port, mydb, QUERIES[:2], ssl=context)) == direct
        with pytest.raises(asyncmy.errors.OperationalError):
            asyncio.run(_run(running.port, mydb, QUERIES[:1]))  # and one without TLS is refused
