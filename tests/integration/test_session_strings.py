"""A multi-statement Query read under the session's own string rules (issue 14, item 7), compared with PostgreSQL.

With standard_conforming_strings off, or a client encoding whose characters may end in the byte 0x5C (a backslash
when read as ASCII: Shift-JIS, Big5, GBK, GB18030), the statement splitter used to find one harmless string where
the server runs an UPDATE: nothing was invalidated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config

SETUP = "CREATE TABLE counter (n int); INSERT INTO counter VALUES (0);"
READ = "SELECT n FROM counter"


@pytest.fixture(scope="module")
def cached(pg: PgCluster) -> Iterator[ProxyThread]:
    with ProxyThread.from_mapping(proxy_config(pg.url(dbname="postgres"), cache={"default_ttl": "60s"})) as running:
        yield running


def _connect(pg: PgCluster, dbname: str, port: int | None, extra: str = "") -> psycopg.Connection[tuple[Any, ...]]:
    dsn = pg.dsn(user=pg.SUPERUSER, dbname=dbname, **({"port": port} if port else {}))
    return psycopg.connect(dsn + extra, autocommit=True)


def _warm(proxy: ProxyThread, conn: psycopg.Connection[tuple[Any, ...]], read: str = READ) -> list[tuple[Any, ...]]:
    assert proxy.app is not None and proxy.app.cache is not None
    engine = proxy.app.cache.engine
    first = conn.execute(read).fetchall()
    for _ in range(40):
        before = engine.stats().hits
        assert conn.execute(read).fetchall() == first
        if engine.stats().hits > before:
            return first
        time.sleep(0.05)
    pytest.fail("the read was never answered from the cache")


@pytest.mark.parametrize(
    ("extra", "setting", "query"),
    [
        # 'a\'' is one string: the UPDATE is the second of three statements.
        ("", "SET standard_conforming_strings = off", "SELECT 'a\\'' ; UPDATE counter SET n = n + 1; SELECT 'b'"),
        ("", "SET standard_conforming_strings = off", "SELECT N'a\\'' ; UPDATE counter SET n = n + 1; SELECT 'b'"),
        # 表 is 0x95 0x5C in Shift-JIS, 功 is 0xA5 0x5C in Big5, 乗 is 0x81 0x5C in GBK: the string ends after it.
        (" client_encoding=SJIS", None, "SELECT E'表' ; UPDATE counter SET n = n + 1; SELECT E'x'"),
        (" client_encoding=BIG5", None, "SELECT E'功' ; UPDATE counter SET n = n + 1; SELECT E'x'"),
        (" client_encoding=GBK", None, "SELECT E'乗' ; UPDATE counter SET n = n + 1; SELECT E'x'"),
    ],
    ids=["scs-off", "scs-off-national", "sjis", "big5", "gbk"],
)
def test_update_hidden_by_string_rules_invalidates(
    pg: PgCluster, dbname: str, cached: ProxyThread, extra: str, setting: str | None, query: str
) -> None:
    pg.psql(SETUP, dbname=dbname)
    reader = _connect(pg, dbname, cached.port)
    writer = _connect(pg, dbname, cached.port, extra)
    direct = _connect(pg, dbname, None)
    try:
        if setting is not None:
            writer.execute(setting)
        before = _warm(cached, reader)
        writer.execute(query)  # no parameters: one simple Query with three statements
        want = direct.execute(READ).fetchall()
        assert want != before, "the UPDATE did not run: this case would prove nothing"
        assert reader.execute(READ).fetchall() == want
        assert writer.execute(READ).fetchall() == want
    finally:
        for conn in (reader, writer, direct):
            conn.close()


def test_single_byte_client_encoding_names_the_table_written(pg: PgCluster, dbname: str, cached: ProxyThread) -> None:
    """A LATIN1 session's `café` is the bytes 63 61 66 E9: read as UTF-8, the write named another table."""
    pg.psql('CREATE TABLE "café" (n int); INSERT INTO "café" VALUES (0);', dbname=dbname)
    reader = _connect(pg, dbname, cached.port)
    writer = _connect(pg, dbname, cached.port, " client_encoding=LATIN1")
    direct = _connect(pg, dbname, None)
    read = 'SELECT n FROM "café"'
    try:
        first = _warm(cached, reader, read)
        writer.execute('UPDATE "café" SET n = n + 1')
        want = direct.execute(read).fetchall()
        assert want != first
        assert reader.execute(read).fetchall() == want
    finally:
        for conn in (reader, writer, direct):
            conn.close()
