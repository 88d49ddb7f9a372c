"""The shared tier (cache.shared: Redis / Valkey) with a real redis-server and two or three sidecars (ProxyThreads)
in front of one PostgreSQL: one upstream query per read across sidecars, a fresh sidecar's first reads hit, no
stale read under `strict` (with the invalidation bus off, so that only the shared generations can prevent one),
faults (the tier killed and restarted, a generation key deleted by hand), ACL auth, TLS, and the admin commands."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cacheproxy.cache.generations import Namespace
from tests.support.cachetest import connect_via, create_items, new_marker, upstream_calls, wait_until
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.redisserver import RedisCluster, RedisServer
from tests.support.tls import self_signed

Sidecars = Callable[..., list[ProxyThread]]


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def sidecars(start_proxy: Callable[..., ProxyThread], tier: RedisServer) -> Sidecars:
    """`sidecars(n, consistency=..., bus=..., url=..., **shared)`: n proxies sharing `tier`."""

    def start(count: int, *, consistency: str = "bounded", bus: bool = True, url: str | None = None,
              **shared: Any) -> list[ProxyThread]:  # fmt: skip
        # (a generous call timeout: these proxies share the test's process and its GIL, and on a loaded machine a
        # Redis reply can take longer than 200 ms; a timed-out call opens the breaker and makes a read miss)
        config = {"url": url or tier.url, "consistency": consistency, "timeout": "2s", "cooldown": "200ms"}
        config.update(shared)
        return [
            start_proxy(cache={"shared": config}, invalidation={"bus": bus}, admin={"users": ["postgres"]})
            for _ in range(count)
        ]

    return start


def _shared(proxy: ProxyThread) -> dict[str, object]:
    assert proxy.app is not None and proxy.app.cache is not None and proxy.app.cache.shared is not None
    return proxy.app.cache.shared.stats()


def _stored(proxy: ProxyThread) -> None:
    """Wait until `proxy`'s shared fills are answered. A fill is stored after the client has its reply: another
    sidecar's read sent at once can come first, and miss (or wait for the fill lock, which expires after lock_wait:
    on a loaded machine the fill can take longer than that)."""
    wait_until(lambda: _shared(proxy)["fills_in_flight"] == 0, "the shared fills stored")


@pytest.mark.parametrize("count", [2, 3])
def test_the_same_read_through_each_sidecar_reaches_postgres_once(
    pg: PgCluster, dbname: str, sidecars: Sidecars, count: int
) -> None:
    create_items(pg, dbname)
    proxies = sidecars(count)
    simple, extended = new_marker(), new_marker()
    for proxy in proxies:
        with connect_via(pg, dbname, proxy) as conn:
            assert conn.execute(f"SELECT name AS {simple} FROM items WHERE id = 5").fetchall() == [("item 5",)]
            row = conn.execute(f"SELECT name AS {extended}, price FROM items WHERE id = %s", (9,)).fetchall()
            assert row == [("item 9", 13.5)] or str(row[0][1]) == "13.50"
        _stored(proxy)
    assert upstream_calls(pg, simple) == 1
    assert upstream_calls(pg, extended) == 1
    assert sum(int(str(_shared(proxy)["hits"])) for proxy in proxies) == 2 * (count - 1)


def test_a_fresh_sidecars_first_reads_hit(pg: PgCluster, dbname: str, sidecars: Sidecars) -> None:
    create_items(pg, dbname)
    (warm,) = sidecars(1)
    marker = new_marker()
    reads = [f"SELECT name AS {marker}, {i} FROM items WHERE id = {i}" for i in range(1, 21)]
    with connect_via(pg, dbname, warm) as conn:
        for sql in reads:
            conn.execute(sql).fetchall()
    assert upstream_calls(pg, marker) == 20
    _stored(warm)
    (fresh,) = sidecars(1)
    with connect_via(pg, dbname, fresh) as conn:
        for i, sql in enumerate(reads, 1):
            assert conn.execute(sql).fetchall() == [(f"item {i}", i)]
    assert upstream_calls(pg, marker) == 20  # every first read of the fresh sidecar hit the shared tier
    assert _shared(fresh)["hits"] == 20


@pytest.mark.parametrize("consistency", ["strict", "bounded"])
def test_a_write_through_one_sidecar_is_never_read_stale_through_another(
    pg: PgCluster, dbname: str, sidecars: Sidecars, consistency: str
) -> None:
    """Writers and readers spread over three sidecars, the invalidation bus off: under strict, every read returns
    the last value acknowledged before it was sent (zero stale reads); under bounded, with no bus to carry the
    invalidations, in-process hits do go stale (which shows this test can see a stale read)."""
    pg.psql("CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); INSERT INTO kv VALUES (1, 0), (2, 0), (3, 0)",
            dbname=dbname)  # fmt: skip
    proxies = sidecars(3, consistency=consistency, bus=False)
    conns = [connect_via(pg, dbname, proxy) for proxy in proxies]
    acked = {1: 0, 2: 0, 3: 0}
    stale = 0
    rng = random.Random(15)
    try:
        for step in range(150):
            key = rng.choice((1, 2, 3))
            if step % 4 == 0:
                writer = rng.choice(conns)
                (value,) = writer.execute("UPDATE kv SET v = v + 1 WHERE k = %s RETURNING v", (key,)).fetchone() or (0,)
                acked[key] = value
                continue
            reader = rng.choice(conns)
            if step % 2:
                row = reader.execute(f"SELECT v FROM kv WHERE k = {key}").fetchone()
            else:
                row = reader.execute("SELECT v FROM kv WHERE k = %s", (key,)).fetchone()
            assert row is not None
            if row[0] != acked[key]:
                assert row[0] < acked[key], "a value never written"
                stale += 1
    finally:
        for conn in conns:
            conn.close()
    if consistency == "strict":
        assert stale == 0
        assert sum(int(str(_shared(proxy)["validated"])) + int(str(_shared(proxy)["hits"])) for proxy in proxies) > 0
    else:
        assert stale > 0


def test_concurrent_writers_and_readers_strict(pg: PgCluster, dbname: str, sidecars: Sidecars) -> None:
    """Threads writing and reading through three sidecars at once (bus off): a read never returns a value older
    than one whose write was acknowledged before the read was sent."""
    pg.psql("CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); INSERT INTO kv VALUES (1, 0), (2, 0)", dbname=dbname)
    proxies = sidecars(3, consistency="strict", bus=False)
    lock = threading.Lock()
    acked = {1: 0, 2: 0}
    stale: list[str] = []
    errors: list[BaseException] = []
    stop = time.monotonic() + 4.0

    def writer(index: int) -> None:
        with connect_via(pg, dbname, proxies[index % 3]) as conn:
            while time.monotonic() < stop:
                key = 1 + index % 2
                row = conn.execute("UPDATE kv SET v = v + 1 WHERE k = %s RETURNING v", (key,)).fetchone()
                assert row is not None
                with lock:
                    acked[key] = max(acked[key], row[0])
                time.sleep(0.005)

    def reader(index: int) -> None:
        with connect_via(pg, dbname, proxies[index % 3]) as conn:
            while time.monotonic() < stop:
                key = 1 + index % 2
                with lock:
                    floor = acked[key]
                row = conn.execute(f"SELECT v FROM kv WHERE k = {key}").fetchone()
                assert row is not None
                if row[0] < floor:
                    stale.append(f"key {key}: read {row[0]} after {floor} was acknowledged")

    def run(fn: Callable[[int], None], index: int) -> None:
        try:
            fn(index)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(writer, i)) for i in range(2)]
    threads += [threading.Thread(target=run, args=(reader, i)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert stale == []


def test_the_tier_killed_mid_run_and_restarted(
    pg: PgCluster, dbname: str, sidecars: Sidecars, tier: RedisServer
) -> None:
    pg.psql("CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); INSERT INTO kv VALUES (1, 0)", dbname=dbname)
    a, b = sidecars(2, consistency="strict", bus=False)
    marker = new_marker()
    read = f"SELECT v AS {marker} FROM kv WHERE k = 1"
    with connect_via(pg, dbname, a) as ca, connect_via(pg, dbname, b) as cb:
        assert ca.execute(read).fetchone() == (0,)
        assert cb.execute(read).fetchone() == (0,)
        tier.kill()
        for value in range(1, 4):  # no client error, and correct answers, with the tier gone
            ca.execute("UPDATE kv SET v = %s WHERE k = 1", (value,))
            assert ca.execute(read).fetchone() == (value,)
        assert int(str(_shared(a)["errors"])) > 0 and _shared(a)["available"] is False
        tier.start()  # empty: every generation key is gone, which reads as "everything changed"
        time.sleep(0.3)  # the cooldown (200 ms): the next call probes
        for conn in (ca, cb, ca, cb):
            conn.execute(read).fetchone()
        wait_until(lambda: _shared(a)["available"] is True and _shared(b)["available"] is True, "the tier back")
        ca.execute("UPDATE kv SET v = 10 WHERE k = 1")
        assert cb.execute(read).fetchone() == (10,)
        assert ca.execute(read).fetchone() == (10,)


def test_a_generation_key_deleted_by_hand_reads_as_changed(
    pg: PgCluster, dbname: str, sidecars: Sidecars, tier: RedisServer
) -> None:
    create_items(pg, dbname)
    (a,) = sidecars(1)
    marker = new_marker()
    read = f"SELECT name AS {marker} FROM items WHERE id = 11"
    with connect_via(pg, dbname, a) as conn:
        conn.execute(read).fetchall()
    system_id = str(_shared(a)["namespace"])
    generation = Namespace(system_id, dbname).generation_key("items")
    with tier.client() as client:
        assert client.exists(generation) == 1
        client.delete(generation)
    (b,) = sidecars(1)
    with connect_via(pg, dbname, b) as conn:
        assert conn.execute(read).fetchall() == [("item 11",)]
    assert upstream_calls(pg, marker) == 2  # the entry is there, but its generation is not: a miss
    assert _shared(b)["misses"] == 1 and _shared(b)["hits"] == 0
    (c,) = sidecars(1)
    with connect_via(pg, dbname, c) as conn:  # b filled it again, under a fresh generation
        conn.execute(read).fetchall()
    assert upstream_calls(pg, marker) == 2


def test_acl_user_and_password(pg: PgCluster, dbname: str, sidecars: Sidecars, tmp_path: Path) -> None:
    create_items(pg, dbname)
    server = RedisServer(tmp_path / "acl", ("user default off", "user cp on >s3cret ~* &* +@all")).start()
    try:
        good = f"redis://cp:s3cret@127.0.0.1:{server.port}/0"
        bad = f"redis://cp:wrong@127.0.0.1:{server.port}/0"
        a, b = sidecars(2, url=good)
        (refused,) = sidecars(1, url=bad)
        marker = new_marker()
        for proxy in (a, b, refused):
            with connect_via(pg, dbname, proxy) as conn:
                assert conn.execute(f"SELECT name AS {marker} FROM items WHERE id = 2").fetchall() == [("item 2",)]
        assert upstream_calls(pg, marker) == 2  # a, then the refused one; b hit
        assert _shared(b)["hits"] == 1
        assert "uthentication" in str(_shared(refused)["last_error"]) or "WRONGPASS" in str(
            _shared(refused)["last_error"]
        )
    finally:
        server.stop()


def test_tls_with_verification(pg: PgCluster, dbname: str, sidecars: Sidecars, tmp_path: Path) -> None:
    create_items(pg, dbname)
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = self_signed(certs, "redis")
    other, _ = self_signed(certs, "other")
    server = RedisServer(
        tmp_path / "tls",
        (f"tls-cert-file {cert}", f"tls-key-file {key}", f"tls-ca-cert-file {cert}", "tls-auth-clients no"),
        tls=True,
    ).start()
    try:
        verified = f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
        untrusted = f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={other}"
        # (a TLS handshake on a loaded 2-core CI machine can take longer than the other tests' 200 ms)
        a, b = sidecars(2, url=verified, timeout="2s")
        (wrong_ca,) = sidecars(1, url=untrusted, timeout="2s")
        marker = new_marker()
        for proxy in (a, b, wrong_ca):
            with connect_via(pg, dbname, proxy) as conn:
                assert conn.execute(f"SELECT name AS {marker} FROM items WHERE id = 4").fetchall() == [("item 4",)]
        assert upstream_calls(pg, marker) == 2  # b hit over TLS; the sidecar that cannot verify the tier went alone
        assert _shared(b)["hits"] == 1
        assert _shared(wrong_ca)["hits"] == 0 and int(str(_shared(wrong_ca)["errors"])) > 0
    finally:
        server.stop()


def test_admin_commands_metrics_and_stats(pg: PgCluster, dbname: str, sidecars: Sidecars) -> None:
    create_items(pg, dbname)
    a, b = sidecars(2)
    marker = new_marker()
    read = f"SELECT name AS {marker} FROM items WHERE id = 6"
    with connect_via(pg, dbname, a) as ca, connect_via(pg, dbname, b) as cb:
        ca.execute(read).fetchall()
        _stored(a)
        cb.execute(read).fetchall()
        assert upstream_calls(pg, marker) == 1, (_shared(a), _shared(b))
        stats = {str(k): v for k, v in cb.execute("CACHEPROXY SHOW STATS").fetchall()}
        assert stats["shared_hits"] == "1" and stats["shared_consistency"] == "bounded"
        # INVALIDATE TABLE (through a) makes the shared entry stale: a reads it again, and fills it again
        ca.execute("CACHEPROXY INVALIDATE TABLE items")
        ca.execute(read).fetchall()
        assert upstream_calls(pg, marker) == 2
        _stored(a)
    (c,) = sidecars(1)
    with connect_via(pg, dbname, c) as cc:  # a fresh sidecar finds a's new fill
        cc.execute(read).fetchall()
        assert upstream_calls(pg, marker) == 2
        cc.execute("CACHEPROXY FLUSH")  # every entry of the database stale in the shared tier
    (d,) = sidecars(1)
    with connect_via(pg, dbname, d) as cd:
        cd.execute(read).fetchall()
    assert upstream_calls(pg, marker) == 3
    assert b.app is not None
    body, _ = b.app.metrics.render()
    text = body.decode()
    for name in ("cacheproxy_shared_hits_total", "cacheproxy_shared_misses_total", "cacheproxy_shared_errors_total",
                 "cacheproxy_shared_call_seconds_bucket"):  # fmt: skip
        assert name in text
    assert "shared_tier" in b.app.stats()


def test_the_tier_never_configured_answers_as_before(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    create_items(pg, dbname)
    proxy = start_proxy()
    assert proxy.app is not None and proxy.app.cache is not None and proxy.app.cache.shared is None
    marker = new_marker()
    with connect_via(pg, dbname, proxy) as conn:
        for _ in range(2):
            conn.execute(f"SELECT name AS {marker} FROM items WHERE id = 1").fetchall()
    assert upstream_calls(pg, marker) == 1


def test_an_unreachable_tier_costs_no_client_error(pg: PgCluster, dbname: str, sidecars: Sidecars) -> None:
    create_items(pg, dbname)
    (proxy,) = sidecars(1, url="redis://127.0.0.1:1/0", consistency="strict")
    marker = new_marker()
    with connect_via(pg, dbname, proxy) as conn:
        for _ in range(3):
            assert conn.execute(f"SELECT name AS {marker} FROM items WHERE id = 1").fetchall() == [("item 1",)]
        conn.execute("UPDATE items SET note = 'x' WHERE id = 1")
        assert conn.execute(f"SELECT note AS {marker} FROM items WHERE id = 1").fetchall() == [("x",)]
    assert upstream_calls(pg, marker) <= 3  # the in-process tier alone still hit
    assert int(str(_shared(proxy)["errors"])) > 0


def test_a_redis_cluster_of_three_masters(pg: PgCluster, dbname: str, sidecars: Sidecars, tmp_path: Path) -> None:
    """cache.shared.cluster: an entry and its generation keys share a slot (one hash tag per database), so the
    lookup's MGET and the bump's MSET are single-slot commands, whichever master owns the slot."""
    pg.psql("CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); INSERT INTO kv VALUES (1, 0)", dbname=dbname)
    cluster = RedisCluster(tmp_path / "cluster").start()
    try:
        a, b = sidecars(2, url=cluster.url, cluster=True, consistency="strict", bus=False)
        marker = new_marker()
        read = f"SELECT v AS {marker} FROM kv WHERE k = 1"
        with connect_via(pg, dbname, a) as ca, connect_via(pg, dbname, b) as cb:
            assert ca.execute(read).fetchone() == (0,)
            _stored(a)
            assert cb.execute(read).fetchone() == (0,)
            assert upstream_calls(pg, marker) == 1, (_shared(a), _shared(b))
            for value in range(1, 4):
                (ca if value % 2 else cb).execute("UPDATE kv SET v = %s WHERE k = 1", (value,))
                assert ca.execute(read).fetchone() == (value,)
                assert cb.execute(read).fetchone() == (value,)
        assert _shared(b)["errors"] == 0 and int(str(_shared(b)["hits"])) >= 1
    finally:
        cluster.stop()


def test_write_through_refreshes_fill_the_shared_tier(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread], tier: RedisServer
) -> None:
    """A committed write through one sidecar refreshes a `write_through` result and stores it in the shared tier
    too, stamped with the generations read right after its bump: another sidecar's next read hits it."""
    pg.psql("CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); INSERT INTO kv VALUES (1, 0)", dbname=dbname)
    rules = [{"tables": ["kv"], "strategy": "write_through"}]
    shared = {"shared": {"url": tier.url, "timeout": "1s"}}
    a = start_proxy(cache=shared, rules=rules)
    marker = new_marker()
    read = f"SELECT v AS {marker} FROM kv WHERE k = 1"
    with connect_via(pg, dbname, a) as conn:
        assert conn.execute(read).fetchone() == (0,)
        conn.execute("UPDATE kv SET v = 7 WHERE k = 1")
        wait_until(lambda: upstream_calls(pg, marker) == 2, "the write-through refresh")
        assert conn.execute(read).fetchone() == (7,)
    wait_until(lambda: int(str(_shared(a)["fills"])) == 2, "the refresh's shared fill")
    _stored(a)
    b = start_proxy(cache=shared, rules=rules)
    with connect_via(pg, dbname, b) as conn:
        assert conn.execute(read).fetchone() == (7,)
    assert upstream_calls(pg, marker) == 2
    assert _shared(b)["hits"] == 1
