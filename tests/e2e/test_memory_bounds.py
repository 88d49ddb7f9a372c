"""The proxy's memory, measured on a proxy subprocess (its RSS from /proc): flat under a sustained run of hostile
client streams, and bounded while a client does not read its large results or its cache hits."""

from __future__ import annotations

import random
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.helpers import CliProxy
from tests.support.cachetest import upstream_calls
from tests.support.hostile import hostile_round
from tests.support.pgcluster import PgCluster
from tests.support.procmem import MIB, rss_bytes
from tests.support.rawpg import RawConn, data_rows, query

# -- memory stays flat under a sustained hostile run, measured on a proxy subprocess ------------------------------

WARM_UP, MEASURED = 4.0, 12.0  # seconds
GROWTH_BOUND = 30 * MIB


def _hostile_for(seconds: float, rng: random.Random, port: int, first_round: int) -> int:
    round_no = first_round
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        hostile_round(rng, port, round_no, read_timeout=0.01)
        round_no += 1
    return round_no


@pytest.mark.timeout(120)
def test_memory_stays_flat_under_hostile_streams(pg: PgCluster, tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "limits": {"max_message_size": "1MiB", "startup_timeout": "2s"},
        "shutdown": {"timeout": "1s"},
    }
    with CliProxy.with_config(tmp_path, pg.url(), **config) as proxy:
        rng = random.Random(8)
        warm_rounds = _hostile_for(WARM_UP, rng, proxy.port, 0)
        before = rss_bytes(proxy.pid)
        rounds = _hostile_for(MEASURED, rng, proxy.port, warm_rounds) - warm_rounds
        with psycopg.connect(pg.dsn(port=proxy.port)) as conn:  # still serving
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        after = rss_bytes(proxy.pid)
        print(
            f"hostile run: {warm_rounds} warm-up + {rounds} measured connections; proxy RSS "
            f"{before / MIB:.1f} MiB -> {after / MIB:.1f} MiB ({(after - before) / MIB:+.1f} MiB)"
        )
        assert rounds > 100  # the run did exercise the proxy
        assert after - before < GROWTH_BOUND
        assert proxy.stop() == 0
    log = proxy.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    unclosed = [sid for sid, entry in proxy.sessions().items() if entry["opened"] and len(entry["closed"]) != 1]
    assert unclosed == []  # every session that logged in was closed once, with a reason


# -- a client that never reads: backpressure, measured on a proxy subprocess ------------------------------------

RSS_BOUND = 150 * MIB
HITS = 400


@pytest.fixture
def proxy_process(pg: PgCluster, tmp_path: Path) -> Iterator[CliProxy]:
    with CliProxy.with_config(tmp_path, pg.url(), shutdown={"timeout": "1s"}) as running:
        yield running


def _rss_samples(pid: int, count: int = 10, every: float = 0.1) -> list[int]:
    samples = []
    for _ in range(count):
        samples.append(rss_bytes(pid))
        time.sleep(every)
    return samples


def _wait_client_write(pg: PgCluster, app_name: str) -> None:
    """Wait until the server itself is blocked sending to the proxy: every buffer on the way is full."""
    sql = f"SELECT wait_event FROM pg_stat_activity WHERE application_name = '{app_name}' AND state = 'active'"
    deadline = time.monotonic() + 20
    while pg.psql(sql).strip() != "ClientWrite":
        assert time.monotonic() < deadline, "the server never blocked on writing to the proxy"
        time.sleep(0.05)


def _gone(pg: PgCluster, app_name: str) -> bool:
    sql = f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app_name}'"
    deadline = time.monotonic() + 10
    while (count := pg.psql(sql).strip()) != "0" and time.monotonic() < deadline:
        time.sleep(0.05)
    return count == "0"


def _reset(conn: RawConn) -> None:
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def test_client_that_never_reads_large_results_keeps_proxy_memory_bounded(
    pg: PgCluster, proxy_process: CliProxy
) -> None:
    big = "SELECT repeat('x', 1000000) FROM generate_series(1, 100)"  # 100 MB per query
    with RawConn(proxy_process.host, proxy_process.port, timeout=30) as warm:  # warm-up: one big result read whole
        warm.startup("postgres")
        assert len(warm.query(big.replace("100)", "10)"))) == 13
    before = rss_bytes(proxy_process.pid)
    app_name = f"noread_{uuid.uuid4().hex[:8]}"
    hog = RawConn(proxy_process.host, proxy_process.port)
    hog.startup("postgres", application_name=app_name)
    hog.send(query(big) * 21)  # 2.1 GB of results asked for, none read
    _wait_client_write(pg, app_name)
    samples = _rss_samples(proxy_process.pid)
    with RawConn(proxy_process.host, proxy_process.port) as other:  # the proxy still serves
        other.startup("postgres")
        assert data_rows(other.query("SELECT 'not stuck'")) == [[b"not stuck"]]
    _reset(hog)
    assert _gone(pg, app_name)
    growth = max(samples) - before
    print(f"proxy RSS before {before / MIB:.1f} MiB, peak while withheld {max(samples) / MIB:.1f} MiB")
    assert growth < RSS_BOUND, f"the proxy grew by {growth / MIB:.0f} MiB while a client did not read"


def test_client_that_never_reads_cache_hits_keeps_proxy_memory_bounded(
    pg: PgCluster, dbname: str, proxy_process: CliProxy
) -> None:
    """Hits are written by the proxy itself, without the server: a pipeline of small queries that each hit a ~900 KB
    entry must not turn into gigabytes queued for a client that does not read."""
    pg.psql(
        "CREATE TABLE blob (v text); INSERT INTO blob SELECT string_agg(md5(g::text), '') FROM "
        "generate_series(1, 28000) g",
        dbname=dbname,
    )  # 896 KB of incompressible text: under max_entry_size
    marker = f"hit_{uuid.uuid4().hex[:8]}"
    hit = f"SELECT v AS {marker} FROM blob"
    with RawConn(proxy_process.host, proxy_process.port) as warm:
        warm.startup("postgres", dbname)
        assert warm.query(hit) == warm.query(hit)  # filled, then a hit
    assert upstream_calls(pg, marker) == 1
    before = rss_bytes(proxy_process.pid)
    hog = RawConn(proxy_process.host, proxy_process.port)
    hog.startup("postgres", dbname)
    hog.send(query(hit) * HITS)  # 360 MB of hits asked for in 8 KB of requests, none read for now
    time.sleep(1.0)
    samples = _rss_samples(proxy_process.pid)
    replies = [hog.recv_until("Z") for _ in range(HITS)]  # now read: every answer arrives, each the cached one
    assert all(reply == replies[0] for reply in replies) and replies[0][-2][1] == b"SELECT 1\x00"
    hog.close()
    assert upstream_calls(pg, marker) == 1  # every one of them was answered by the proxy itself
    with RawConn(proxy_process.host, proxy_process.port) as other:
        other.startup("postgres")
        assert data_rows(other.query("SELECT 'not stuck'")) == [[b"not stuck"]]
    growth = max(samples) - before
    print(f"proxy RSS before {before / MIB:.1f} MiB, peak while withheld {max(samples) / MIB:.1f} MiB")
    assert growth < RSS_BOUND, f"the proxy grew by {growth / MIB:.0f} MiB while a client did not read"
