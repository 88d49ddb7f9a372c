"""The cache's hit and miss counters say what reached the server: a hit is a read answered here, a miss one the
server ran (counted by the server itself, with pg_stat_statements and a marker in the statement's text).

pg8000 sends Parse + Sync, Describe + Sync, then Bind, Execute and Sync (each with a Flush): the lookups made on the
way (is this statement known? is its result cached?) are not hits unless the result is served from the cache.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pg8000.native
import psycopg

from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread


def upstream_calls(pg: PgCluster, marker: str) -> int:
    out = pg.psql(f"SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '%{marker}%'")
    return int(out.strip())


def test_counters_match_the_servers_executions(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    pg.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one');"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )
    proxy = start_proxy(cache={"default_ttl": "60s"})
    assert proxy.app is not None and proxy.app.cache is not None
    engine = proxy.app.cache.engine
    for client in ("pg8000", "psycopg"):
        marker = "m_" + uuid.uuid4().hex[:10]
        sql = f"SELECT v AS {marker} FROM t WHERE id = "
        before, reads_before = engine.stats(), _reads(proxy)
        if client == "pg8000":
            conn = pg8000.native.Connection(
                PgCluster.SCRAM_USER, host=proxy.host, port=proxy.port, database=dbname,
                password=PgCluster.SCRAM_PASSWORD,
            )  # fmt: skip
            try:
                rows = [conn.run(sql + ":x", x=1) for _ in range(6)]
            finally:
                conn.close()
        else:
            with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as via:
                rows = [via.execute(sql + "%s", (1,), prepare=False).fetchall() for _ in range(6)]
        after, reads = engine.stats(), _reads(proxy)
        assert [list(map(list, r)) for r in rows] == [[["one"]]] * 6
        ran = upstream_calls(pg, marker)
        served = {outcome: reads.get(outcome, 0) - reads_before.get(outcome, 0) for outcome in reads}
        # Every read was either served here (a hit) or ran on the server: a miss (looked up, not found) or a bypass
        # (not looked up: pg8000's portal is bound upstream before its Execute).
        assert after.hits - before.hits == served.get("hit", 0) == 6 - ran, client
        assert after.misses - before.misses == served.get("miss", 0), client
        assert served.get("miss", 0) + served.get("bypass", 0) == ran, client
        assert ran == 1, client  # the first read fills; the pattern is then served from the cache


def _reads(proxy: ProxyThread) -> dict[str, int]:
    assert proxy.app is not None
    queries = proxy.app.metrics.snapshot()["queries"]
    assert isinstance(queries, dict)
    return dict(queries.get("read", {}))
