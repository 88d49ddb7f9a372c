"""invalidation.binlog: writes made straight on MariaDB (bypassing the proxy) invalidate through the binlog feed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.cachetest import eventually
from tests.support.mariadb import MariaDB
from tests.support.proxy import ProxyThread, proxy_config


@pytest.fixture
def binlogproxy(mariadb: MariaDB, mydb: str) -> Iterator[ProxyThread]:
    config = proxy_config(mariadb.url(mydb), invalidation={"binlog": True})
    with ProxyThread.from_mapping(config) as running:
        yield running


def rows(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def test_writes_that_bypass_the_proxy_invalidate(binlogproxy: ProxyThread, mariadb: MariaDB, mydb: str) -> None:
    import pymysql

    direct = mariadb.connect(mydb)
    rows(direct, "CREATE TABLE parent (id INT PRIMARY KEY) ENGINE=InnoDB")
    rows(direct, "CREATE TABLE child (id INT PRIMARY KEY, pid INT, "
                 "FOREIGN KEY (pid) REFERENCES parent (id) ON DELETE CASCADE) ENGINE=InnoDB")  # fmt: skip
    rows(direct, "INSERT INTO parent VALUES (1), (2)")
    rows(direct, "INSERT INTO child VALUES (10, 1), (20, 2)")
    server = binlogproxy.app.proxy  # type: ignore[union-attr]
    assert eventually(lambda: server.feed_down is None, 30)
    conn = pymysql.connect(host="127.0.0.1", port=binlogproxy.port, user="app", password="app", database=mydb,
                           autocommit=True)  # fmt: skip
    for _ in range(2):
        assert rows(conn, "SELECT COUNT(*) FROM parent") == ((2,),)
        assert rows(conn, "SELECT COUNT(*) FROM child") == ((2,),)
    assert server.engine.stats().hits == 2
    rows(direct, "INSERT INTO parent VALUES (3)")  # straight on the server: only the binlog tells the proxy
    assert eventually(lambda: rows(conn, "SELECT COUNT(*) FROM parent") == ((3,),), 30)
    rows(direct, "DELETE FROM parent WHERE id = 1")  # the cascade to child is not in the binlog: the catalog's FKs
    assert eventually(lambda: rows(conn, "SELECT COUNT(*) FROM child") == ((1,),), 30)
    rows(direct, "ALTER TABLE parent ADD COLUMN note VARCHAR(10)")
    assert eventually(lambda: len(list(server.engine.entries())) == 0, 30)


def test_feed_down_means_nothing_served(mariadb: MariaDB, mydb: str) -> None:
    """A user without REPLICATION privileges: the feed cannot start, so the proxy relays but does not cache."""
    import pymysql

    with mariadb.root_connect() as root, root.cursor() as cur:
        cur.execute("CREATE USER IF NOT EXISTS 'norepl'@'%' IDENTIFIED BY 'n'")
        cur.execute(f"GRANT ALL ON `{mydb}`.* TO 'norepl'@'%'")
    url = f"mariadb://norepl:n@127.0.0.1:{mariadb.port}/{mydb}"
    with ProxyThread.from_mapping(proxy_config(url, invalidation={"binlog": True})) as proxy:
        conn = pymysql.connect(host="127.0.0.1", port=proxy.port, user="norepl", password="n", database=mydb,
                               autocommit=True)  # fmt: skip
        for _ in range(3):
            assert rows(conn, "SELECT 1 + 1") == ((2,),)
        server = proxy.app.proxy  # type: ignore[union-attr]
        assert server.feed_down is not None and server.engine.stats().hits == 0
