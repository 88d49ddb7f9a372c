"""Failover with real servers: a primary and a streaming replica (pg_basebackup) started by each test, the primary
stopped (fast, immediate) and the replica promoted, clients (psycopg, asyncpg, raw) through one proxy whose upstream
URL names both hosts with target_session_attrs=read-write.

What is checked: sessions outside a transaction block go on (their SETs and prepared statements replayed), a session
inside one gets 40001 once and goes on, a write in flight gets 08006 "outcome unknown" and is not run again, no read
through the proxy returns what the new primary does not hold (the replica is cut off before the last commits, as an
asynchronous standby can be), a snapshot written before the failover is refused after it, and hundreds of sessions
re-attach with bounded concurrency. The recovery time (stop -> first successful write) is printed, never asserted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.support.cachetest import eventually
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import RawConn, data_rows


@pytest.fixture
def pair() -> Iterator[tuple[PgCluster, PgCluster]]:
    """A primary with `items` (ids 1..10) and a streaming replica that has caught up."""
    primary = PgCluster.start()
    replica: PgCluster | None = None
    try:
        primary.psql("CREATE TABLE items (id int PRIMARY KEY, note text);"
                     "INSERT INTO items SELECT g, 'before' FROM generate_series(1, 10) g")  # fmt: skip
        replica = primary.start_replica()
        assert eventually(lambda: _count(replica) == 10, 30)  # type: ignore[arg-type]
        yield primary, replica
    finally:
        if replica is not None:
            replica.cleanup()
        primary.cleanup()


def _count(cluster: PgCluster) -> int:
    try:
        return int(cluster.psql("SELECT count(*) FROM items").strip() or 0)
    except Exception:
        return -1


def _ids(cluster: PgCluster) -> list[int]:
    return [int(line) for line in cluster.psql("SELECT id FROM items ORDER BY id").split()]


def _both(primary: PgCluster, replica: PgCluster) -> str:
    return (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{replica.port}/postgres"
        "?target_session_attrs=read-write"
    )


def _cut_off(replica: PgCluster) -> None:
    """The replica stops receiving WAL: what commits on the primary from now on is lost at the failover."""
    replica.psql("ALTER SYSTEM SET primary_conninfo = ''")
    replica.psql("SELECT pg_reload_conf()")
    assert eventually(lambda: replica.psql("SELECT count(*) FROM pg_stat_wal_receiver").strip() == "0", 30)


def _psycopg(proxy: ProxyThread, *, autocommit: bool = True) -> psycopg.Connection[tuple[object, ...]]:
    conn: psycopg.Connection[tuple[object, ...]] = psycopg.connect(
        f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres",
        autocommit=autocommit,
        prepare_threshold=None,
    )
    return conn


class _InFlight(threading.Thread):
    """Runs one statement through its own connection; keeps the error it ended with."""

    def __init__(self, proxy: ProxyThread, sql: str) -> None:
        super().__init__(daemon=True)
        self.conn = _psycopg(proxy)
        self.sql = sql
        self.error: psycopg.Error | None = None
        self.started = threading.Event()

    def run(self) -> None:
        self.started.set()
        try:
            self.conn.execute(self.sql)
        except psycopg.Error as exc:
            self.error = exc


def _running(primary: PgCluster, marker: str) -> bool:
    sql = f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    return primary.psql(sql).strip() == "1"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_sessions_survive_a_failover(
    pair: tuple[PgCluster, PgCluster], start_proxy: Callable[..., ProxyThread], mode: str
) -> None:
    primary, replica = pair
    proxy = start_proxy(upstream=_both(primary, replica), cache={"default_ttl": "60s"}, failover={"wait": "60s"})
    assert proxy.app is not None
    hosts = proxy.app.hosts
    assert hosts.address == ("127.0.0.1", primary.port)
    _cut_off(replica)

    # Sessions outside a transaction block: settings, a prepared statement (asyncpg), plain idle ones.
    survivor = _psycopg(proxy)
    survivor.execute("SET statement_timeout = '123s'")
    idle = [_psycopg(proxy) for _ in range(10)]
    loop = asyncio.new_event_loop()
    apg: asyncpg.Connection = loop.run_until_complete(
        asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database="postgres")
    )
    loop.run_until_complete(apg.execute("SET application_name = 'survivor'"))
    count_stmt = loop.run_until_complete(apg.prepare("SELECT count(*) AS n FROM items"))
    # A commit the replica never sees, read (and cached) through the proxy.
    survivor.execute("INSERT INTO items VALUES (11, 'lost')")
    for _ in range(2):
        assert survivor.execute("SELECT count(*) FROM items").fetchone() == (11,)
        assert loop.run_until_complete(count_stmt.fetchval()) == 11
    # A session inside a transaction block.
    in_tx = _psycopg(proxy, autocommit=False)
    in_tx.execute("INSERT INTO items VALUES (12, 'in a transaction')")
    # A write and a read in flight.
    write = _InFlight(proxy, "INSERT INTO items SELECT 13, 'slow write' FROM pg_sleep(60) AS write_marker")
    read = _InFlight(proxy, "SELECT 1 AS read_marker FROM pg_sleep(60)")
    write.start(), read.start()
    assert eventually(lambda: _running(primary, "write_marker") and _running(primary, "read_marker"), 20)

    stopped = time.monotonic()
    primary.stop(mode)
    replica.promote()
    promoted = time.monotonic()

    # The first write through the proxy after the stop (retried while the proxy tells of a connection failure).
    first_write = None
    while first_write is None and time.monotonic() - stopped < 60:
        try:
            survivor.execute("INSERT INTO items VALUES (100, 'after')")
            first_write = time.monotonic() - stopped
        except psycopg.OperationalError:
            time.sleep(0.05)
    assert first_write is not None
    print(f"\nfailover ({mode}): promote took {promoted - stopped:.2f}s; first write {first_write:.2f}s after the stop")

    write.join(30), read.join(30)
    assert write.error is not None and write.error.sqlstate == "08006", write.error
    assert "outcome is unknown" in str(write.error)
    assert read.error is not None and read.error.sqlstate == "08006", read.error

    # Outside a transaction: the same sessions go on, their state replayed; nothing the new primary lacks is read.
    truth = _ids(replica)
    assert 11 not in truth and 12 not in truth and 13 not in truth and 100 in truth
    assert survivor.execute("SHOW statement_timeout").fetchone() == ("123s",)
    assert survivor.execute("SELECT count(*) FROM items").fetchone() == (len(truth),)
    assert loop.run_until_complete(count_stmt.fetchval()) == len(truth)
    assert loop.run_until_complete(apg.fetchval("SHOW application_name")) == "survivor"
    kept = sum(conn.execute("SELECT count(*) FROM items").fetchone() == (len(truth),) for conn in idle)
    assert kept == len(idle)
    print(f"sessions kept: {kept + 2} of {len(idle) + 2} outside transactions")
    # Inside a transaction: one error, then the session goes on.
    with pytest.raises(psycopg.errors.SerializationFailure, match="failed over"):
        in_tx.execute("SELECT 1")
    assert in_tx.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert in_tx.execute("SELECT count(*) FROM items").fetchone() == (len(truth),)
    in_tx.commit()
    # The in-flight write's connection goes on too.
    assert write.conn.execute("SELECT 1").fetchone() == (1,)

    assert hosts.failovers == 1 and hosts.address == ("127.0.0.1", replica.port)
    body = proxy.app.metrics.render()[0].decode()
    assert "cacheproxy_upstream_failovers_total 1.0" in body
    loop.run_until_complete(apg.close())
    loop.close()
    for conn in [survivor, in_tx, write.conn, read.conn, *idle]:
        conn.close()


def test_a_transaction_lost_in_a_failover_is_told_once_and_rollback_is_answered(
    pair: tuple[PgCluster, PgCluster], start_proxy: Callable[..., ProxyThread]
) -> None:
    primary, replica = pair
    proxy = start_proxy(upstream=_both(primary, replica))
    with (
        RawConn(proxy.host, proxy.port) as told,
        RawConn(proxy.host, proxy.port) as rolling_back,
        RawConn(proxy.host, proxy.port) as listener,
    ):
        for row, conn in enumerate((told, rolling_back), 50):
            conn.startup("postgres")
            conn.query("BEGIN")
            conn.query(f"INSERT INTO items VALUES ({row}, 'lost with its transaction')")
        listener.startup("postgres")
        listener.query('LISTEN "Jobs"')
        primary.stop("fast")
        replica.promote()
        # The listener's channel was listened to again on the new primary.
        assert eventually(lambda: data_rows(listener.query("SELECT 1")) == [[b"1"]], 30)
        replica.psql("NOTIFY \"Jobs\", 'after the failover'")
        assert any(msg[0] == "A" and b"after the failover" in msg[1] for msg in listener.query("SELECT 2"))
        reply = told.query("COMMIT")
        errors = [msg for msg in reply if msg[0] == "E"]
        assert len(errors) == 1 and b"40001" in errors[0][1] and b"failed over" in errors[0][1]
        assert reply[-1] == ("Z", b"I")
        assert data_rows(told.query("SELECT count(*) FROM items")) == [[b"10"]]
        reply = rolling_back.query("ROLLBACK")
        assert [msg[0] for msg in reply] == ["C", "Z"] and reply[-1] == ("Z", b"I")
        assert data_rows(rolling_back.query("SELECT 1")) == [[b"1"]]


def test_a_snapshot_written_before_a_failover_is_refused_after_it(
    pair: tuple[PgCluster, PgCluster], start_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    primary, replica = pair
    path = tmp_path / "cache.snapshot"
    url = _both(primary, replica)
    before = start_proxy(upstream=url, snapshot={"path": str(path)}, cache={"default_ttl": "1h"})
    with _psycopg(before) as conn:
        for _ in range(2):
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (10,)
    assert before.app is not None
    before.call(before.app.snapshot_now())
    before.stop()
    assert path.exists()
    primary.stop("immediate")
    replica.promote()
    after = start_proxy(upstream=url, snapshot={"path": str(path)}, cache={"default_ttl": "1h"})
    assert after.app is not None and after.app.cache is not None
    assert list(tmp_path.glob("cache.snapshot.bad-*")), "the snapshot was not refused"
    assert len(after.app.cache.engine) == 0


@pytest.mark.timeout(240)
def test_hundreds_of_sessions_reattach_with_bounded_concurrency(start_proxy: Callable[..., ProxyThread]) -> None:
    cluster = PgCluster.start()
    try:
        limit = 4
        proxy = start_proxy(upstream=cluster.url(), failover={"reattach_concurrency": limit, "wait": "60s"})
        assert proxy.app is not None
        sessions = [RawConn(proxy.host, proxy.port) for _ in range(200)]
        try:
            for conn in sessions:
                conn.startup("postgres")
                conn.query("SET work_mem = '5MB'")
            started = time.monotonic()
            cluster.stop("fast")
            time.sleep(0.5)  # down for a while: the sessions wait for it
            cluster.start_server()
            kept = 0
            for conn in sessions:
                if data_rows(conn.query("SHOW work_mem")) == [[b"5MB"]]:
                    kept += 1
            print(f"\n{kept} of {len(sessions)} sessions re-attached within {time.monotonic() - started:.2f}s")
            assert kept == len(sessions)
            hosts = proxy.app.hosts
            assert 1 <= hosts.logins_max_seen <= limit
            assert hosts.failovers == 0  # the same server came back: not a failover
        finally:
            for conn in sessions:
                conn.close()
    finally:
        cluster.cleanup()


def test_a_failover_during_a_snapshot_load_keeps_nothing_the_load_put(
    pg: PgCluster, start_proxy: Callable[..., ProxyThread]
) -> None:
    """The snapshot's entries are put while its load runs; a failover then must drop them, including the ones put
    after it (a put does not check generations): CacheService.loaded() flushes again."""
    proxy = start_proxy(cache={"default_ttl": "1h"})
    assert proxy.app is not None and proxy.app.cache is not None
    cache = proxy.app.cache

    def fill() -> int:
        with _psycopg(proxy) as conn:
            for _ in range(2):
                conn.execute("SELECT 'from the snapshot' AS failover_load")
        return len(cache.engine)

    proxy.call(cache.follow([]))  # the load begins (what the feeds say is kept for loaded())
    assert fill() >= 1
    proxy.call(cache.failed_over("a test failover"))
    assert len(cache.engine) == 0
    assert fill() >= 1  # put after the failover by the load still running

    async def loaded() -> None:
        cache.loaded()

    proxy.call(loaded())
    assert len(cache.engine) == 0


def test_reattach_needs_a_password_the_proxy_does_not_hold_unless_auth_terminates(
    start_proxy: Callable[..., ProxyThread],
) -> None:
    """auth.mode relay holds no credential: a SCRAM user's session cannot log in again after the server restarts.
    auth.mode terminate logs in again with the SCRAM keys of the client's own exchange (proxy/upstream_login.py)."""
    cluster = PgCluster.start()
    try:
        relay = start_proxy(upstream=cluster.url())
        terminate = start_proxy(upstream=cluster.url(), auth={"mode": "terminate"})
        relayed = psycopg.connect(cluster.dsn(PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD, port=relay.port),
                                  autocommit=True)  # fmt: skip
        terminated = psycopg.connect(cluster.dsn(PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD, port=terminate.port),
                                     autocommit=True)  # fmt: skip
        terminated.execute("SET application_name = 'survivor'")
        cluster.stop("fast")
        cluster.start_server()
        with pytest.raises(psycopg.OperationalError, match="asks for a password"):
            relayed.execute("SELECT 1")
        row = terminated.execute("SELECT current_user, current_setting('application_name')").fetchone()
        assert row == (PgCluster.SCRAM_USER, "survivor")
        relayed.close()
        terminated.close()
    finally:
        cluster.cleanup()
