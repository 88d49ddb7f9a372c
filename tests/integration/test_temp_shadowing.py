"""Temporary relations the proxy must not share (issue 14, item 4): a session whose private objects shadow a shared
name, in ways the proxy cannot track by a plain CREATE TEMP TABLE, must not fill entries that another session with
the same role and settings is then served (nor be served theirs)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config

Rows = list[tuple[Any, ...]]


@pytest.fixture(scope="module")
def cached(pg: PgCluster) -> Iterator[ProxyThread]:
    with ProxyThread.from_mapping(proxy_config(pg.url(dbname="postgres"), cache={"default_ttl": "120s"})) as running:
        yield running


def _connect(pg: PgCluster, dbname: str, port: int | None, options: str) -> psycopg.Connection[tuple[Any, ...]]:
    dsn = pg.dsn(dbname=dbname, port=port)
    return psycopg.connect(dsn + (f" options='{options}'" if options else ""), autocommit=True)


CASES = {
    "temp table renamed": ("", ["CREATE TEMP TABLE x (v text)", "INSERT INTO x VALUES ('private')",
                                "ALTER TABLE x RENAME TO t"], "SELECT v FROM t"),
    "CREATE TABLE with pg_temp first": ("-csearch_path=pg_temp,public",
                                        ["CREATE TABLE t (v text)", "INSERT INTO t VALUES ('private')"],
                                        "SELECT v FROM t"),
}  # fmt: skip
# What names the backend's own temporary schema: compared with the same session's uncacheable form of it (a volatile
# call in the statement), since every backend has its own pg_temp_N.
SCHEMA_CASES = {
    "current_schema() with pg_temp first": ("-csearch_path=pg_temp,public", "CREATE TABLE t2 (v text)",
                                            "SELECT current_schema()"),
    "current_schemas(true) after a temp table": ("", "CREATE TEMP TABLE t2 (v text)", "SELECT current_schemas(true)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_private_objects_are_not_shared(pg: PgCluster, dbname: str, cached: ProxyThread, case: str) -> None:
    options, private, read = CASES[case]
    pg.psql("CREATE TABLE t (v text); INSERT INTO t VALUES ('shared')", dbname=dbname)
    with _connect(pg, dbname, cached.port, options) as first:
        for sql in private:
            first.execute(sql)
        mine: Rows = []
        for _ in range(3):  # fills (and then reads) what it sees
            mine = first.execute(read).fetchall()
        with _connect(pg, dbname, cached.port, options) as second, _connect(pg, dbname, None, options) as direct:
            want = direct.execute(read).fetchall()
            assert want != mine, "the private object does not shadow anything: this case would prove nothing"
            assert second.execute(read).fetchall() == want
            assert second.execute(read).fetchall() == want


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_temporary_schema_names_are_not_shared(pg: PgCluster, dbname: str, cached: ProxyThread, case: str) -> None:
    options, private, read = SCHEMA_CASES[case]
    with _connect(pg, dbname, cached.port, options) as first, _connect(pg, dbname, cached.port, options) as second:
        for conn in (first, second):
            conn.execute(private)
        mine: Rows = []
        for _ in range(3):
            mine = first.execute(read).fetchall()
        want = second.execute(f"{read} WHERE random() >= 0").fetchall()  # volatile: never from the cache
        assert want != mine, "both sessions name the same schema: this case would prove nothing"
        assert second.execute(read).fetchall() == want
        assert second.execute(read).fetchall() == want
