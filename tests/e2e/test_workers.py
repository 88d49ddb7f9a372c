"""server.workers: 2 — the proxy as a supervisor and two worker processes on one port, started as `cacheproxy run`.

Sessions land on both workers; a write acknowledged through one worker is never followed by a stale hit on the
other (the invalidation bus is off here, so the shared generations alone must do it); cancels reach the worker
that owns the session; a killed worker is restarted; SIGTERM stops all gracefully; /metrics sums the workers.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

import cacheproxy
from tests.e2e.helpers import REPO_ROOT, CliProxy, Target, free_port, proxy_env, wait_active
from tests.integration.test_consistency import _check, _create_kv_and_sequence, _run
from tests.support.pgcluster import PgCluster

WORKERS = {"workers": 2}
ADMIN = {"users": [PgCluster.SUPERUSER]}
# The bus is off: across workers only the shared generations keep the cache exact (what these tests check).
NO_BUS = {"bus": False}

Conn = psycopg.Connection[tuple[object, ...]]
Spread = Callable[[CliProxy, int], dict[int, list[Conn]]]


def _start(start_cli_proxy: Callable[..., CliProxy], **sections: object) -> CliProxy:
    proxy = start_cli_proxy(server=WORKERS, **{"admin": ADMIN, "invalidation": NO_BUS, **sections})
    for index in range(2):
        proxy.wait_for_log(f"worker {index} of 2 ready", timeout=40)
    return proxy


def _connect(proxy: CliProxy, pg: PgCluster, dbname: str, **kwargs: object) -> Conn:
    return psycopg.connect(Target.through(pg, proxy).url(dbname=dbname), autocommit=True, **kwargs)  # type: ignore[arg-type]


def _worker(conn: Conn) -> int:
    rows = dict(conn.execute("CACHEPROXY SHOW STATS").fetchall())
    return int(str(rows["worker"]))


def _stat(conn: Conn, name: str) -> int:
    """A counter of CACHEPROXY SHOW STATS: the answering worker's own."""
    return int(str(dict(conn.execute("CACHEPROXY SHOW STATS").fetchall())[name]))


def _workers(conn: Conn) -> list[tuple[object, ...]]:
    return conn.execute("CACHEPROXY SHOW WORKERS").fetchall()


@pytest.fixture
def spread(pg: PgCluster, dbname: str) -> Iterator[Spread]:
    """Open connections until each worker has at least `per_worker` of them (the kernel spreads them by hash)."""
    stack = ExitStack()

    def open_spread(proxy: CliProxy, per_worker: int) -> dict[int, list[Conn]]:
        by_worker: dict[int, list[Conn]] = {0: [], 1: []}
        for _ in range(200):
            if all(len(conns) >= per_worker for conns in by_worker.values()):
                return by_worker
            conn = stack.enter_context(_connect(proxy, pg, dbname))
            by_worker[_worker(conn)].append(conn)
        pytest.fail(f"200 connections did not reach both workers: { ({k: len(v) for k, v in by_worker.items()}) }")

    with stack:
        yield open_spread


def test_sessions_land_on_both_workers(
    start_cli_proxy: Callable[..., CliProxy],
    spread: Spread,
) -> None:
    proxy = _start(start_cli_proxy)
    by_worker = spread(proxy, 2)
    rows = _workers(by_worker[0][0])
    pids = {int(str(row[1])) for row in rows}
    assert len(pids) == 2 and proxy.pid not in pids
    # Each worker's own client count, exact: SHOW WORKERS reads the shared table the workers write at admit/forget.
    assert sorted(int(str(row[3])) for row in rows) == sorted(len(conns) for conns in by_worker.values())
    # The upstream backend pids the clients see are distinct: each session is its own upstream connection.
    backends = {conn.execute("select pg_backend_pid()").fetchone() for conns in by_worker.values() for conn in conns}
    assert len(backends) == sum(len(conns) for conns in by_worker.values())


def test_read_your_writes_across_workers(
    pg: PgCluster,
    dbname: str,
    start_cli_proxy: Callable[..., CliProxy],
    spread: Spread,
) -> None:
    """A writer on one worker, readers on both (simple and prepared), 300 rounds: every read after the write's
    acknowledgement sees it, although each reader's previous read of the same key was a hit."""
    pg.psql(
        "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); INSERT INTO kv SELECT g, 0 FROM generate_series(1, 4) g;"
        "CREATE TABLE other (id int PRIMARY KEY, v int); INSERT INTO other VALUES (1, 0);",
        dbname=dbname,
    )
    proxy = _start(start_cli_proxy)
    by_worker = spread(proxy, 3)
    writer = by_worker[0][0]
    readers = by_worker[0][1:] + by_worker[1]
    worker_of = [0] * (len(by_worker[0]) - 1) + [1] * len(by_worker[1])
    stale: list[tuple[int, int, int, object]] = []
    values = dict.fromkeys(range(1, 5), 0)
    for value in range(1, 301):
        key = value % 4 + 1
        for conn in readers:  # warm: each worker caches the key's current row (the second read is a hit)
            for _ in range(2):
                conn.execute("SELECT v FROM kv WHERE k = %s", (key,), prepare=value % 2 == 0).fetchone()
                conn.execute("SELECT sum(v) FROM kv").fetchone()
        if value % 3 == 0:
            with writer.transaction():
                writer.execute("UPDATE kv SET v = %s WHERE k = %s", (value, key))
                writer.execute("UPDATE other SET v = %s", (value,))
        else:
            writer.execute("UPDATE kv SET v = %s WHERE k = %s", (value, key))
        values[key] = value
        for index, conn in enumerate(readers):
            got = conn.execute("SELECT v FROM kv WHERE k = %s", (key,), prepare=value % 2 == 0).fetchone()
            if got != (value,):
                stale.append((value, index, worker_of[index], got))
            total = conn.execute("SELECT sum(v) FROM kv").fetchone()
            if total != (sum(values.values()),):
                stale.append((value, index, worker_of[index], total))
    assert stale == []
    # The cache was in use on both workers (else the test proves nothing).
    time.sleep(1.2)  # the hit counters in SHOW WORKERS are copied once a second
    rows = _workers(writer)
    assert all(int(str(row[5])) > 500 for row in rows), rows


def test_cancel_reaches_the_owning_worker(pg: PgCluster, dbname: str, start_cli_proxy: Callable[..., CliProxy]) -> None:
    """The CancelRequest's connection lands on either worker; repeat until one crossed, every cancel must work."""
    proxy = _start(start_cli_proxy)
    target = Target.through(pg, proxy)
    for _attempt in range(40):
        with (
            psycopg.connect(target.url(dbname=dbname), autocommit=True) as conn,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            future = pool.submit(lambda: conn.execute("select pg_sleep(10)"))
            wait_active(pg, dbname, "select pg_sleep(10)")
            started = time.monotonic()
            conn.cancel_safe(timeout=5)
            with pytest.raises(errors.QueryCanceled):
                future.result(timeout=5)
            assert time.monotonic() - started < 3
            assert conn.execute("select 2").fetchone() == (2,)
        if "cancel request for a session of another worker" in proxy.log():
            break
    else:
        pytest.fail("no cancel request landed on the other worker in 40 attempts")
    assert "forwarding cancel request" in proxy.log()


def test_killed_worker_is_restarted(
    pg: PgCluster,
    dbname: str,
    start_cli_proxy: Callable[..., CliProxy],
    spread: Spread,
) -> None:
    pg.psql("CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); INSERT INTO kv VALUES (1, 0);", dbname=dbname)
    proxy = _start(start_cli_proxy)
    by_worker = spread(proxy, 1)
    survivor = by_worker[0][0]
    for _ in range(2):  # cached on the survivor
        survivor.execute("SELECT v FROM kv WHERE k = 1").fetchone()
    victim = int(str(_workers(survivor)[1][1]))
    os.kill(victim, signal.SIGKILL)
    proxy.wait_for_log(f"worker 1 (pid {victim}) was killed by SIGKILL", timeout=10)
    proxy.wait_for_log("worker 1 of 2 ready", timeout=20)  # the first start's line came before the kill...
    deadline = time.monotonic() + 20
    while True:
        rows = _workers(survivor)
        if int(str(rows[1][1])) != victim and int(str(rows[1][2])) == 1 and rows[1][7] is not None:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    assert survivor.execute("select 1").fetchone() == (1,)
    # The dead worker may have died between a COMMIT and its invalidation: the supervisor invalidated everything.
    misses = _stat(survivor, "misses")
    survivor.execute("SELECT v FROM kv WHERE k = 1").fetchone()
    assert _stat(survivor, "misses") == misses + 1
    # The restarted worker serves, and read-your-writes holds across the restart.
    # (connections opened until each worker has several: the kernel's hash may put a dozen on one worker)
    fresh = [conn for conns in spread(proxy, 6).values() for conn in conns]
    for value in range(1, 30):
        for conn in fresh:
            conn.execute("SELECT v FROM kv WHERE k = 1").fetchone()
        survivor.execute("UPDATE kv SET v = %s WHERE k = 1", (value,))
        assert {conn.execute("SELECT v FROM kv WHERE k = 1").fetchone() for conn in fresh} == {(value,)}


def test_graceful_shutdown_stops_every_worker(
    pg: PgCluster, dbname: str, start_cli_proxy: Callable[..., CliProxy]
) -> None:
    proxy = _start(start_cli_proxy, shutdown={"timeout": "10s"})
    with _connect(proxy, pg, dbname) as conn:
        pids = [int(str(row[1])) for row in _workers(conn)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(lambda: conn.execute("select pg_sleep(1), 42").fetchone())
            wait_active(pg, dbname, "select pg_sleep(1), 42")
            proxy.terminate()
            assert future.result(timeout=10) == ("", 42)  # the query in flight finishes
    assert proxy.wait(20) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    log = proxy.log()
    assert "supervisor: all workers stopped" in log
    assert "worker 0 stopped" in log and "worker 1 stopped" in log
    assert "restarting" not in log


def test_reload_reaches_every_worker(start_cli_proxy: Callable[..., CliProxy], pg: PgCluster, dbname: str) -> None:
    proxy = _start(start_cli_proxy)
    with _connect(proxy, pg, dbname) as conn:
        here = _worker(conn)
        conn.execute("CACHEPROXY RELOAD")
    proxy.wait_for_log(f"worker {1 - here}: reloading the configuration (asked by worker {here})")
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_log("supervisor: received SIGHUP")
    deadline = time.monotonic() + 10
    while proxy.log().count("configuration reloaded") < 4:  # RELOAD: 2 workers; SIGHUP: 2 workers
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_metrics_sum_the_workers(
    pg: PgCluster,
    dbname: str,
    start_cli_proxy: Callable[..., CliProxy],
    spread: Spread,
) -> None:
    admin_port = free_port()
    proxy = _start(start_cli_proxy, admin={**ADMIN, "listen": f"127.0.0.1:{admin_port}"})
    pg.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);", dbname=dbname)
    by_worker = spread(proxy, 2)
    conns = [conn for group in by_worker.values() for conn in group]
    for conn in conns:
        for _ in range(5):
            assert conn.execute("SELECT id FROM t").fetchone() == (1,)
    samples = _scrape(admin_port)
    # Each worker has its own entries: its first read of the query missed, every other read hit.
    assert samples["cacheproxy_cache_misses_total"] == 2
    assert samples["cacheproxy_cache_hits_total"] == 5 * len(conns) - 2
    assert samples["cacheproxy_client_connections"] == len(conns)
    assert samples["cacheproxy_client_connections_total"] == len(conns)
    assert samples["cacheproxy_workers"] == 2 and samples["cacheproxy_workers_reporting"] == 2
    per_worker = [samples[f'cacheproxy_worker_client_connections{{worker="{i}"}}'] for i in range(2)]
    assert per_worker == [len(by_worker[0]), len(by_worker[1])]
    [info] = [name for name in samples if name.startswith("cacheproxy_info{")]
    assert f'version="{cacheproxy.__version__}"' in info and f'hot_path="{cacheproxy.MODE.name}"' in info
    assert samples[info] == 1


def test_no_stale_reads_under_concurrent_writes_across_workers(
    pg: PgCluster, dbname: str, start_cli_proxy: Callable[..., CliProxy]
) -> None:
    """tests/integration/test_consistency.py's run (3 writers, 4 readers, simple / extended / in-transaction reads,
    commits and rollbacks, for 6 s) through the two workers of one proxy: zero tolerance for a read older than a
    write acknowledged before the read was sent, whichever worker each connection landed on."""
    _create_kv_and_sequence(pg, dbname)
    admin_port = free_port()
    proxy = _start(start_cli_proxy, admin={**ADMIN, "listen": f"127.0.0.1:{admin_port}"}, cache={"default_ttl": "10m"})
    summary = _check(_run(pg, dbname, [proxy], seed=7))  # type: ignore[list-item]
    samples = _scrape(admin_port)
    print(f"consistency across 2 workers: {summary}, hits {samples['cacheproxy_cache_hits_total']}")
    assert summary["reads"] > 100 and summary["commits"] > 20 and summary["rollbacks"] > 0  # type: ignore[operator]
    assert summary["cross_proxy_lagging_reads"] == 0
    assert samples["cacheproxy_cache_hits_total"] > 0


def test_snapshot_written_by_worker_0_warms_every_worker(
    pg: PgCluster, dbname: str, start_cli_proxy: Callable[..., CliProxy], spread: Spread, tmp_path: Path
) -> None:
    pg.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 20);", dbname=dbname)
    snapshot = {"path": str(tmp_path / "cache.snap")}
    proxy = _start(start_cli_proxy, snapshot=snapshot)
    by_worker = spread(proxy, 1)
    for conns in by_worker.values():
        for key in range(1, 21):
            assert conns[0].execute("SELECT id FROM t WHERE id = %s", (key,)).fetchone() == (key,)
    by_worker[1][0].execute("CACHEPROXY SNAPSHOT")  # on worker 1: worker 0 writes it
    proxy.wait_for_log("worker 1: asked worker 0 to write a snapshot")
    proxy.wait_for_log("snapshot written to")
    for conns in by_worker.values():
        conns[0].close()
    assert proxy.stop() == 0
    admin_port = free_port()
    again = _start(start_cli_proxy, snapshot=snapshot, admin={**ADMIN, "listen": f"127.0.0.1:{admin_port}"})
    assert _scrape(admin_port)["cacheproxy_snapshot_entries_loaded_total"] >= 2 * 20  # every worker loaded it
    # (connections opened until each worker has several: the kernel's hash may put all of a few on one worker)
    conns = [conn for on_worker in spread(again, 4).values() for conn in on_worker]
    for conn in conns:
        for key in range(1, 21):
            assert conn.execute("SELECT id FROM t WHERE id = %s", (key,)).fetchone() == (key,)
    samples = _scrape(admin_port)
    assert samples["cacheproxy_cache_misses_total"] == 0
    assert samples["cacheproxy_cache_hits_total"] == len(conns) * 20


def test_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "workers.yaml"
        config.write_text(f"listen: 127.0.0.1:{port}\nupstream: postgres://u@127.0.0.1:1/d\nserver:\n  workers: 2\n")
        result = subprocess.run(
            [sys.executable, "-m", "cacheproxy", "run", "--config", str(config), "--admin-listen", "off"],
            capture_output=True, text=True, timeout=60, env=proxy_env(), cwd=REPO_ROOT,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot start" in result.stderr and "address already in use" in result.stderr.lower()


def test_a_second_proxy_with_workers_cannot_share_the_port(
    start_cli_proxy: Callable[..., CliProxy], tmp_path: Path
) -> None:
    proxy = _start(start_cli_proxy)
    config = tmp_path / "second.yaml"
    config.write_text(f"listen: 127.0.0.1:{proxy.port}\nupstream: postgres://u@127.0.0.1:1/d\nserver:\n  workers: 2\n")
    result = subprocess.run(
        [sys.executable, "-m", "cacheproxy", "run", "--config", str(config), "--admin-listen", "off"],
        capture_output=True, text=True, timeout=60, env=proxy_env(), cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "address already in use" in result.stderr.lower()
