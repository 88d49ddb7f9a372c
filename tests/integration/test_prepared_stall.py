"""A prepared transaction left in the cluster blocks the creation of the replication slot (a logical slot waits for
every running transaction, prepared ones included): the database is not served, and the proxy says why, in the log
and in /readyz (issue 14, "also seen")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.support.cachetest import eventually
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread


def test_a_prepared_transaction_blocking_the_slot_is_reported(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread], caplog: pytest.LogCaptureFixture
) -> None:
    pg.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)", dbname=dbname)
    pg.psql("BEGIN; INSERT INTO t VALUES (2); PREPARE TRANSACTION 'left_behind'", dbname=dbname)
    try:
        proxy = start_proxy(cache={"default_ttl": "60s"}, invalidation={"replication": True, "slot_prefix": "cp_stall"})
        app: Any = proxy.app
        with (
            caplog.at_level(logging.WARNING, logger="cacheproxy.replication"),
            psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn,
        ):
            assert conn.execute("SELECT id FROM t").fetchall() == [(1,)]  # answered upstream, not served
            assert eventually(lambda: "prepared transaction" in proxy.call(app.ready())[1])
            ok, text = proxy.call(app.ready())
            assert ok and dbname in text and "pg_prepared_xacts" in text
            assert dbname in app.cache.blind
            assert any("prepared transaction" in r.getMessage() for r in caplog.records)
    finally:
        pg.psql("ROLLBACK PREPARED 'left_behind'", dbname=dbname)
    assert eventually(lambda: dbname not in app.cache.blind)
    assert "prepared" not in proxy.call(app.ready())[1] or eventually(
        lambda: "prepared" not in proxy.call(app.ready())[1]
    )
