"""`invalidation.replication: on`: writes that bypass every proxy (straight to PostgreSQL) invalidate the cache, from
the logical replication stream; the proxy leaves no slot behind."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import psycopg

from tests.support.cachetest import new_marker, upstream_calls, wait_until
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread


def test_direct_writes_are_invalidated_by_the_replication_stream(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    pg.psql(
        "CREATE TABLE kv (k int PRIMARY KEY, v int); INSERT INTO kv SELECT g, 0 FROM generate_series(1, 3) g;"
        "CREATE TABLE other (k int PRIMARY KEY); GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )
    proxy = start_proxy(cache={"default_ttl": "10m"}, invalidation={"replication": True, "slot_prefix": "cp_test"})
    marker = new_marker()
    sql = f"SELECT v AS {marker} FROM kv WHERE k = 1"
    delays: list[float] = []
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SELECT 1").fetchall()  # the first session of the database starts its feeds
        wait_until(lambda: not proxy.app.metrics.snapshot()["invalidation_bus"]["blind_databases"],  # type: ignore[index]
               "the replication stream and the bus are up")  # fmt: skip
        conn.execute(sql).fetchall()
        conn.execute(sql).fetchall()
        assert upstream_calls(pg, marker) == 1
        pg.psql("INSERT INTO other VALUES (1)", dbname=dbname)  # another table: the entry stays
        time.sleep(0.2)
        conn.execute(sql).fetchall()
        assert upstream_calls(pg, marker) == 1
        with psycopg.connect(pg.dsn(dbname=dbname), autocommit=True) as direct:
            # The test cluster runs with synchronous_commit off (WAL flushed every 200 ms), and the stream carries
            # only flushed WAL: these writes flush at commit, as on a production server.
            direct.execute("SET synchronous_commit = on")
            for value in range(1, 11):
                direct.execute("UPDATE kv SET v = %s WHERE k = 1", (value,))
                delays.append(wait_until(lambda v=value: conn.execute(sql).fetchone() == (v,), "the direct write"))
            with direct.transaction():  # rolled back: changes nothing, and is not streamed
                direct.execute("UPDATE kv SET v = -1 WHERE k = 1")
                direct.execute("ROLLBACK")
    print(f"replication invalidation delay: median {statistics.median(delays) * 1000:.1f} ms, "
          f"max {max(delays) * 1000:.1f} ms")  # fmt: skip
    metrics = proxy.app.metrics.render()[0].decode()
    assert "cacheproxy_replication_lag_bytes" in metrics
    proxy.stop()
    slots = pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cp\\_test%'")
    assert int(slots) == 0
