"""Snapshots of the MySQL cache against real MariaDB servers: a restart comes back warm, and never serves what
changed while the proxy was down (the binlog is the evidence: cacheproxy/mysql/evidence.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.support.cachetest import eventually
from tests.support.mariadb import PASSWORD, USER, MariaDB
from tests.support.proxy import ProxyThread, proxy_config

QUERIES = ["SELECT id, v FROM hot ORDER BY id", "SELECT COUNT(*) FROM hot", "SELECT id, v FROM cold ORDER BY id",
           "SELECT v FROM cold WHERE id = 2"]  # fmt: skip


def _proxy(server: MariaDB, database: str, path: Path, binlog: bool) -> ProxyThread:
    """A proxy (in `with`: stopping it writes the snapshot) with snapshots at `path`."""
    config = proxy_config(server.url(database), snapshot={"path": str(path)}, cache={"default_ttl": "120s"},
                          invalidation={"binlog": binlog})  # fmt: skip
    return ProxyThread.from_mapping(config)


def _engine(proxy: ProxyThread) -> Any:
    assert proxy.app is not None
    return proxy.app.proxy.engine  # type: ignore[union-attr]


def _ready(proxy: ProxyThread, binlog: bool) -> None:
    if binlog:
        assert proxy.app is not None
        server = proxy.app.proxy
        assert eventually(lambda: server.feed_down is None, 30)  # type: ignore[union-attr]


def _read(proxy: ProxyThread, database: str) -> list[Any]:
    with pymysql.connect(host=proxy.host, port=proxy.port, user=USER, password=PASSWORD, database=database,
                         autocommit=True) as conn, conn.cursor() as cur:  # fmt: skip
        out = []
        for sql in QUERIES:
            cur.execute(sql)
            out.append(cur.fetchall())
        return out


def _direct(server: MariaDB, database: str, sql: str) -> None:
    with server.connect(database) as conn, conn.cursor() as cur:
        cur.execute(sql)


@pytest.fixture
def tables(mariadb: MariaDB, mydb: str) -> None:
    _direct(mariadb, mydb, "CREATE TABLE hot (id INT PRIMARY KEY, v VARCHAR(20))")
    _direct(mariadb, mydb, "CREATE TABLE cold (id INT PRIMARY KEY, v VARCHAR(20))")
    _direct(mariadb, mydb, "INSERT INTO hot VALUES (1, 'h1'), (2, 'h2')")
    _direct(mariadb, mydb, "INSERT INTO cold VALUES (1, 'c1'), (2, 'c2')")


@pytest.mark.parametrize("binlog", [True, False])
def test_restart_comes_back_warm(mariadb: MariaDB, mydb: str, tables: None, tmp_path: Path, binlog: bool) -> None:
    path = tmp_path / "my.snap"
    with _proxy(mariadb, mydb, path, binlog) as first:
        _ready(first, binlog)
        expected = _read(first, mydb)
        assert _engine(first).stats().entries == len(QUERIES)
    assert path.exists()
    with _proxy(mariadb, mydb, path, binlog) as second:
        assert _engine(second).stats().entries == len(QUERIES)  # loaded before the listener opened
        _ready(second, binlog)
        assert _read(second, mydb) == expected
        assert _engine(second).stats().hits == len(QUERIES) and _engine(second).stats().misses == 0


def test_binlog_mode_drops_only_what_changed_while_down(mariadb: MariaDB, mydb: str, tables: None,
                                                        tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "my.snap"
    with _proxy(mariadb, mydb, path, True) as first:
        _ready(first, True)
        _read(first, mydb)
    _direct(mariadb, mydb, "UPDATE hot SET v = 'changed' WHERE id = 1")  # while no proxy runs
    with _proxy(mariadb, mydb, path, True) as second:
        assert _engine(second).stats().entries == 2  # the two reads of `cold`
        _ready(second, True)
        answers = _read(second, mydb)
        assert answers[0] == ((1, "changed"), (2, "h2"))
        assert _engine(second).stats().hits == 2 and _engine(second).stats().misses == 2
        # The feed continues from where the load's reading stopped: a write now is seen.
        _direct(mariadb, mydb, "UPDATE cold SET v = 'later' WHERE id = 2")
        assert eventually(lambda: _read(second, mydb)[3] == (("later",),), 30)


def test_without_binlog_mode_any_logged_write_drops_everything(mariadb: MariaDB, mydb: str, tables: None,
                                                               tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "my.snap"
    with _proxy(mariadb, mydb, path, False) as first:
        _read(first, mydb)
    _direct(mariadb, mydb, "UPDATE hot SET v = 'changed' WHERE id = 1")
    with _proxy(mariadb, mydb, path, False) as second:
        assert _engine(second).stats().entries == 0
        assert _read(second, mydb)[0] == ((1, "changed"), (2, "h2"))


def test_a_write_through_the_proxy_is_not_undone_by_the_snapshot(mariadb: MariaDB, mydb: str, tables: None,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "my.snap"
    with _proxy(mariadb, mydb, path, False) as first:
        _read(first, mydb)
        with pymysql.connect(host=first.host, port=first.port, user=USER, password=PASSWORD, database=mydb,
                             autocommit=True) as conn, conn.cursor() as cur:  # fmt: skip
            cur.execute("UPDATE cold SET v = 'via proxy' WHERE id = 2")
    with _proxy(mariadb, mydb, path, False) as second:
        assert _read(second, mydb)[3] == (("via proxy",),)


@pytest.fixture(scope="module")
def no_binlog() -> Iterator[MariaDB]:
    server = MariaDB.start(binlog=False)
    try:
        yield server
    finally:
        server.stop()


def test_without_a_binlog_no_snapshot_is_taken(no_binlog: MariaDB, tmp_path: Path) -> None:
    no_binlog.create_database("nobin")
    try:
        _direct(no_binlog, "nobin", "CREATE TABLE hot (id INT PRIMARY KEY, v VARCHAR(20))")
        _direct(no_binlog, "nobin", "CREATE TABLE cold (id INT PRIMARY KEY, v VARCHAR(20))")
        path = tmp_path / "my.snap"
        with _proxy(no_binlog, "nobin", path, False) as first:
            _read(first, "nobin")
            assert _engine(first).stats().entries == len(QUERIES)
            from cacheproxy.snapshot import SnapshotFailed

            assert first.app is not None
            with pytest.raises(SnapshotFailed, match="no binlog"):
                first.call(first.app.snapshot_now())
        assert not path.exists()
    finally:
        no_binlog.drop_database("nobin")


def test_a_snapshot_of_another_server_is_refused(mariadb: MariaDB, mydb: str, tables: None, tmp_path: Path) -> None:
    path = tmp_path / "my.snap"
    with _proxy(mariadb, mydb, path, False) as first:
        _read(first, mydb)
    other = MariaDB.start(("--server-id=2",))  # same database name, same tables, another server
    try:
        other.create_database(mydb)
        _direct(other, mydb, "CREATE TABLE hot (id INT PRIMARY KEY, v VARCHAR(20))")
        _direct(other, mydb, "CREATE TABLE cold (id INT PRIMARY KEY, v VARCHAR(20))")
        with _proxy(other, mydb, path, False) as second:
            assert _engine(second).stats().entries == 0
            assert _read(second, mydb)[0] == ()
        assert list(tmp_path.glob("my.snap.bad-*"))  # set aside as foreign (then the new proxy wrote its own)
    finally:
        other.stop()
