"""Shadow verification (cacheproxy/verify) against a real PostgreSQL: a planted stale entry is caught and bypassed,
the session's role and settings are reproduced (no false mismatch), a write through the proxy racing a check is not
counted, and the checks stay within verify.per_second.

A stale entry is planted the way a missed invalidation would leave one: the invalidation bus is off, and a write
goes straight to the database, so nothing tells the proxy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg

from cacheproxy.verify.verifier import Verifier
from tests.support.cachetest import connect_via, new_marker, upstream_calls, wait_until
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread


def _start(start_proxy: Callable[..., ProxyThread], **verify: Any) -> tuple[ProxyThread, Verifier]:
    settings = {"sample": 1.0, "per_second": 1000, "on_mismatch": "bypass", "settle": "0.2s", **verify}
    proxy = start_proxy(invalidation={"bus": False, "idle_release": None}, verify=settings)
    assert proxy.app is not None and proxy.app.cache is not None
    return proxy, proxy.app.cache.verifier


def _table(pg: PgCluster, dbname: str) -> None:
    pg.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text, at timestamptz);"
        "INSERT INTO t VALUES (1, 'one', '2024-05-01 12:00+00'), (2, 'two', '2024-05-02 12:00+00');"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
        dbname=dbname,
    )


def _checked(verifier: Verifier) -> int:
    return sum(verifier.checks.values())


def test_a_planted_stale_entry_is_caught_and_bypassed(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _table(pg, dbname)
    proxy, verifier = _start(start_proxy)
    marker = new_marker()
    sql = f"SELECT v AS {marker} FROM t WHERE id = 1"
    with connect_via(pg, dbname, proxy) as conn:
        assert conn.execute(sql).fetchall() == [("one",)]  # a miss: stored
        assert conn.execute(sql).fetchall() == [("one",)]  # a hit: checked, and right
        wait_until(lambda: verifier.checks["match"] >= 1, "the first hit's check")
        assert upstream_calls(pg, marker) == 1 + 1  # the miss, and the verifier's re-run

        pg.psql("UPDATE t SET v = 'uno' WHERE id = 1", dbname=dbname)  # unseen by the proxy: the entry is stale
        assert conn.execute(sql).fetchall() == [("one",)]  # served stale, sampled
        wait_until(lambda: verifier.checks["mismatch"] == 1, "the stale hit's check")
        assert verifier.mismatches == {"t": 1}

        # Bypassed: the next reads go upstream and are right, and are not served from the cache again.
        calls = upstream_calls(pg, marker)
        assert conn.execute(sql).fetchall() == [("uno",)]
        assert conn.execute(sql).fetchall() == [("uno",)]
        assert upstream_calls(pg, marker) == calls + 2
        assert proxy.app is not None and proxy.app.cache is not None
        verdict = proxy.app.cache.classify(dbname, sql.encode()).verdict
        assert not verdict.cacheable and "shadow verification" in str(verdict.reason)
    body = _metrics(proxy)
    assert 'cacheproxy_verify_mismatches_total{table="t"} 1.0' in body
    assert 'cacheproxy_verify_checks_total{outcome="mismatch"} 1.0' in body

    # A reload ends the bypass.
    assert proxy.app is not None and proxy.app.cache is not None
    proxy.app.cache.apply_config(proxy.config)
    assert not proxy.app.cache.bypassed


def test_extended_protocol_hits_are_rerun_with_their_arguments(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _table(pg, dbname)
    proxy, verifier = _start(start_proxy, on_mismatch="log")
    marker = new_marker()
    sql = f"SELECT v AS {marker}, at FROM t WHERE id = %s"
    with connect_via(pg, dbname, proxy) as conn:
        for binary in (False, True, False, True):
            assert conn.execute(sql, (2,), binary=binary).fetchone() == ("two", _at(conn, 2))
        wait_until(lambda: verifier.checks["match"] >= 2, "the extended hits' checks")
        assert verifier.checks["mismatch"] == 0 and verifier.checks["error"] == 0, verifier.checks
        pg.psql("UPDATE t SET v = 'dos' WHERE id = 2", dbname=dbname)
        assert conn.execute(sql, (2,), binary=True).fetchone() == ("two", _at(conn, 2))  # stale, served
        wait_until(lambda: verifier.checks["mismatch"] == 1, "the stale extended hit's check")
        # on_mismatch: log only: still served from the cache.
        assert conn.execute(sql, (2,), binary=True).fetchone() == ("two", _at(conn, 2))


def _at(conn: psycopg.Connection[Any], id_: int) -> object:
    row = conn.execute("SELECT at FROM t WHERE id = %s /* direct */", (id_,)).fetchone()
    assert row is not None
    return row[0]


def test_the_sessions_role_and_settings_are_reproduced(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    """Results that depend on startup options, TimeZone, DateStyle, search_path and the role compare equal: no false
    mismatch."""
    _table(pg, dbname)
    pg.psql(
        "CREATE SCHEMA other; CREATE TABLE other.t (id int PRIMARY KEY, v text, at timestamptz, f float8);"
        "INSERT INTO other.t VALUES (1, 'other one', '2024-05-01 12:00+00', 0.1::float8 + 0.2::float8);"
        "GRANT USAGE ON SCHEMA other TO PUBLIC; GRANT SELECT ON other.t TO PUBLIC;",
        dbname=dbname,
    )
    proxy, verifier = _start(start_proxy)
    dsn = pg.dsn(dbname=dbname, port=proxy.port, user=PgCluster.SCRAM_USER, password=PgCluster.SCRAM_PASSWORD)
    options = "-c DateStyle=SQL,DMY -c extra_float_digits=0"
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None, options=options) as conn:
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        conn.execute("SET search_path = other, public")
        sql = f"SELECT v AS {new_marker()}, at::text, f::text FROM t WHERE id = 1"
        first = conn.execute(sql).fetchall()
        # extra_float_digits (set only at startup, never reported) rounds the float's text.
        assert first == [("other one", "01/05/2024 21:00:00 JST", "0.3")]
        for _ in range(3):
            assert conn.execute(sql).fetchall() == first
        wait_until(lambda: _checked(verifier) >= 3, "the checks")
    assert verifier.checks["match"] == 3, verifier.checks
    assert not verifier.mismatches


def test_a_write_through_the_proxy_racing_a_check_is_not_a_mismatch(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _table(pg, dbname)
    proxy, verifier = _start(start_proxy, settle="5s")
    sql = f"SELECT v AS {new_marker()} FROM t WHERE id = 1"
    with connect_via(pg, dbname, proxy) as conn, connect_via(pg, dbname, proxy) as writer:
        conn.execute(sql)
        # The database changes first (the write has committed there) and the proxy learns it only afterwards, during
        # the check: what a write through another proxy, or through this one, looks like to a check in flight.
        pg.psql("UPDATE t SET v = 'uno' WHERE id = 1", dbname=dbname)
        assert conn.execute(sql).fetchall() == [("one",)]
        wait_until(lambda: verifier.settling == 1, "the check to find a difference")
        writer.execute("UPDATE t SET v = 'eins' WHERE id = 1")  # acknowledged: invalidates t
        wait_until(lambda: verifier.settling == 0, "the check to end")
        assert verifier.checks["raced"] == 1 and verifier.checks["mismatch"] == 0, verifier.checks
        assert conn.execute(sql).fetchall() == [("eins",)]

        # Many writes through the proxy interleaved with hits: never a mismatch.
        for n in range(30):
            writer.execute("UPDATE t SET v = %s WHERE id = 1", (f"v{n}",))
            for _ in range(3):
                assert conn.execute(sql).fetchall() == [(f"v{n}",)]
        wait_until(verifier.idle, "the checks")
    assert verifier.checks["mismatch"] == 0 and not verifier.mismatches, verifier.checks
    assert verifier.checks["match"] >= 1


def test_checks_stay_within_per_second(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _table(pg, dbname)
    proxy, verifier = _start(start_proxy, per_second=2)
    sql = f"SELECT v AS {new_marker()} FROM t WHERE id = 2"
    with connect_via(pg, dbname, proxy) as conn:
        conn.execute(sql)
        started = time.monotonic()
        for _ in range(60):
            conn.execute(sql)
        elapsed = time.monotonic() - started
        wait_until(verifier.idle, "the checks")
    accepted = _checked(verifier)
    assert verifier.dropped["rate"] == 60 - accepted
    # A bucket of 2 checks, refilled at 2 a second: that many at most, however fast the hits came.
    assert 1 <= accepted <= 2 + 2 * elapsed, (accepted, elapsed)


def test_off_by_default(pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]) -> None:
    _table(pg, dbname)
    proxy = start_proxy()
    assert proxy.app is not None and proxy.app.cache is not None
    verifier = proxy.app.cache.verifier
    sql = f"SELECT v AS {new_marker()} FROM t WHERE id = 2"
    with connect_via(pg, dbname, proxy) as conn:
        for _ in range(3):
            conn.execute(sql, binary=True)
            conn.execute(sql)
    assert verifier.rate == 0.0 and _checked(verifier) == 0 and not any(verifier.dropped.values())


def _metrics(proxy: ProxyThread) -> str:
    assert proxy.app is not None
    body, _ = proxy.app.metrics.render()
    return body.decode()
