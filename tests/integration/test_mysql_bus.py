"""The invalidation bus across MySQL sidecars (Redis pub/sub, cacheproxy/mysql/bus.py): two proxies in front of one
private MariaDB and one private redis-server; a write through one is not served stale by the other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.support.cachetest import eventually
from tests.support.mariadb import PASSWORD, USER, MariaDB
from tests.support.proxy import ProxyThread, proxy_config
from tests.support.redisserver import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def _proxy(mariadb: MariaDB, database: str, redis_url: str | None) -> ProxyThread:
    shared = {"url": redis_url} if redis_url else {}
    config = proxy_config(mariadb.url(database), cache={"default_ttl": "300s", "shared": shared})
    return ProxyThread.from_mapping(config).start()


def _server(proxy: ProxyThread) -> Any:
    assert proxy.app is not None
    return proxy.app.proxy


def _bus_up(proxy: ProxyThread) -> bool:
    return _server(proxy).feed_down is None


def _conn(proxy: ProxyThread, database: str) -> Any:
    return pymysql.connect(host=proxy.host, port=proxy.port, user=USER, password=PASSWORD, database=database,
                           autocommit=True)  # fmt: skip


def _one(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


@pytest.fixture
def pair(mariadb: MariaDB, mydb: str, redis_server: RedisServer) -> Iterator[tuple[ProxyThread, ProxyThread]]:
    with mariadb.connect(mydb) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE parent (id INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB")
        cur.execute("CREATE TABLE child (id INT PRIMARY KEY, pid INT, "
                    "FOREIGN KEY (pid) REFERENCES parent (id) ON DELETE CASCADE) ENGINE=InnoDB")  # fmt: skip
        cur.execute("INSERT INTO parent VALUES (1, 'one'), (2, 'two')")
        cur.execute("INSERT INTO child VALUES (10, 1), (20, 2)")
    first, second = _proxy(mariadb, mydb, redis_server.url), _proxy(mariadb, mydb, redis_server.url)
    try:
        assert eventually(lambda: _bus_up(first) and _bus_up(second), 30)
        yield first, second
    finally:
        first.stop()
        second.stop()


def test_a_write_through_one_sidecar_reaches_the_other(pair: tuple[ProxyThread, ProxyThread], mydb: str) -> None:
    first, second = pair
    a, b = _conn(first, mydb), _conn(second, mydb)
    for _ in range(2):
        assert _one(b, "SELECT v FROM parent WHERE id = 1") == ("one",)
        assert _one(b, "SELECT COUNT(*) FROM child") == (2,)
    assert _server(second).engine.stats().hits == 2
    _one(a, "UPDATE parent SET v = 'uno' WHERE id = 1")
    assert eventually(lambda: _one(b, "SELECT v FROM parent WHERE id = 1") == ("uno",), 10)
    # An FK cascade: the publisher expands it (the child's rows go with the parent's), the receiver applies it.
    assert _one(b, "SELECT COUNT(*) FROM child") == (2,)
    _one(a, "DELETE FROM parent WHERE id = 2")
    assert eventually(lambda: _one(b, "SELECT COUNT(*) FROM child") == (1,), 10)
    # DDL: the other sidecar drops the database's entries and reads its catalog again.
    for _ in range(2):
        assert _one(b, "SELECT * FROM parent WHERE id = 1") == (1, "uno")
    _one(a, "ALTER TABLE parent ADD COLUMN w INT DEFAULT 7")
    assert eventually(lambda: _one(b, "SELECT * FROM parent WHERE id = 1") == (1, "uno", 7), 10)
    assert _server(second).metrics.snapshot()["invalidation_bus"]["received"] == 3


def test_while_redis_is_down_nothing_is_served_from_the_cache(pair: tuple[ProxyThread, ProxyThread], mydb: str,
                                                              redis_server: RedisServer) -> None:  # fmt: skip
    first, second = pair
    a, b = _conn(first, mydb), _conn(second, mydb)
    assert _one(b, "SELECT v FROM parent WHERE id = 1") == ("one",)
    redis_server.kill()
    assert eventually(lambda: not _bus_up(second), 30)
    assert _server(second).engine.stats().entries == 0  # dropped: messages may be missed from now on
    _one(a, "UPDATE parent SET v = 'while down' WHERE id = 1")  # its message cannot be delivered
    assert _one(b, "SELECT v FROM parent WHERE id = 1") == ("while down",)
    assert _server(second).engine.stats().entries == 0  # nor stored
    redis_server.start()
    assert eventually(lambda: _bus_up(first) and _bus_up(second), 30)
    for _ in range(2):
        assert _one(b, "SELECT v FROM parent WHERE id = 1") == ("while down",)
    _one(a, "UPDATE parent SET v = 'after' WHERE id = 1")
    assert eventually(lambda: _one(b, "SELECT v FROM parent WHERE id = 1") == ("after",), 10)
