"""Query cancellation through the subprocess proxy: the client's CancelRequest reaches the right backend."""

from __future__ import annotations

import concurrent.futures
import time

import psycopg
import pytest
from psycopg import errors

from tests.e2e.helpers import CliProxy, Target, wait_active
from tests.support.pgcluster import PgCluster


def _cancel_during_sleep(target: Target, dbname: str) -> psycopg.Error:
    with (
        psycopg.connect(target.url(dbname=dbname), autocommit=True) as conn,
        psycopg.connect(target.url(dbname=dbname), autocommit=True) as bystander,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        future = pool.submit(lambda: conn.execute("select pg_sleep(10)"))
        wait_active(target.pg, dbname, "select pg_sleep(10)")
        started = time.monotonic()
        conn.cancel_safe(timeout=5)
        with pytest.raises(psycopg.Error) as caught:
            future.result(timeout=5)
        assert time.monotonic() - started < 3
        # The cancel hit only that backend, and the cancelled connection is still usable.
        assert bystander.execute("select 1").fetchone() == (1,)
        assert conn.execute("select 2").fetchone() == (2,)
    return caught.value


def test_cancel_request(pg: PgCluster, dbname: str, cli_proxy: CliProxy) -> None:
    direct = _cancel_during_sleep(Target("direct", pg, pg.host, pg.port), dbname)
    proxied = _cancel_during_sleep(Target.through(pg, cli_proxy), dbname)
    assert isinstance(proxied, errors.QueryCanceled)
    assert (type(proxied), proxied.sqlstate, str(proxied)) == (type(direct), direct.sqlstate, str(direct))
    assert "forwarding cancel request" in cli_proxy.log()
