"""The MySQL front end inside transactions, against a real MariaDB: which reads may use the cache, and which not.

Reads use the cache inside a transaction only at READ COMMITTED as the session itself set it, and only before the
transaction's first write. Each test would see a wrong answer (its own write missed, a snapshot broken, a value only
a rolled-back or REPEATABLE READ transaction could see left in the cache) if the proxy cached one read too many.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from tests.integration.test_mysql_prepared_admin import execute, names, prepare
from tests.support.mariadb import PASSWORD, USER, MariaDB
from tests.support.proxy import ProxyThread, proxy_config

READ = "SELECT name FROM items WHERE id = 1"


@pytest.fixture
def txproxy(mariadb: MariaDB, mydb: str) -> Iterator[ProxyThread]:
    with ProxyThread.from_mapping(proxy_config(mariadb.url(mydb))) as running:
        yield running


@pytest.fixture
def items(mariadb: MariaDB, mydb: str) -> None:
    with mariadb.connect(mydb) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(40)) ENGINE=InnoDB")
        cur.execute("INSERT INTO items VALUES (1, 'apple'), (2, 'pear')")


def via(proxy: ProxyThread, database: str) -> Any:
    return pymysql.connect(host=proxy.host, port=proxy.port, user=USER, password=PASSWORD, database=database,
                           autocommit=True)  # fmt: skip


def q(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def hits(proxy: ProxyThread) -> int:
    assert proxy.app is not None
    return int(proxy.app.proxy.engine.stats().hits)  # type: ignore[union-attr]


def commit_elsewhere(mariadb: MariaDB, database: str, name: str) -> None:
    """Another client's committed write, straight to the server: the proxy does not see it and invalidates nothing
    (a read after it through the proxy uses a text of its own, which no stale entry can answer)."""
    with mariadb.connect(database) as conn, conn.cursor() as cur:
        cur.execute("UPDATE items SET name = %s WHERE id = 1", (name,))


def test_read_committed_reads_hit_until_the_first_write(txproxy: ProxyThread, mydb: str, items: None) -> None:
    conn = via(txproxy, mydb)
    q(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    assert q(conn, READ) == (("apple",),)  # stored
    q(conn, "BEGIN")
    before = hits(txproxy)
    assert q(conn, READ) == (("apple",),)
    assert hits(txproxy) == before + 1  # served from the cache inside the transaction
    q(conn, "UPDATE items SET name = 'quince' WHERE id = 1")
    assert q(conn, READ) == (("quince",),)  # its own write: not the cached value
    assert q(conn, "SELECT name FROM items WHERE id = 2") == (("pear",),)  # after a write: not cached either
    q(conn, "ROLLBACK")
    other = via(txproxy, mydb)
    assert q(other, READ) == (("apple",),)  # nothing the rolled-back transaction read was stored
    q(conn, "BEGIN")
    before = hits(txproxy)
    assert q(conn, "SELECT name FROM items WHERE id = 2") == (("pear",),)
    assert q(conn, "SELECT name FROM items WHERE id = 2") == (("pear",),)
    assert hits(txproxy) == before + 1  # a new transaction reads the cache again (and fills it)
    q(conn, "COMMIT")


def test_another_transactions_uncommitted_write_is_never_cached(txproxy: ProxyThread, mydb: str,
                                                                 items: None) -> None:  # fmt: skip
    writer, reader = via(txproxy, mydb), via(txproxy, mydb)
    for conn in (writer, reader):
        q(conn, "SET SESSION tx_isolation = 'READ-COMMITTED'")
    q(writer, "BEGIN")
    q(writer, "UPDATE items SET name = 'dirty' WHERE id = 1")
    assert q(writer, READ) == (("dirty",),)  # read after its write: must not be stored
    q(reader, "BEGIN")
    assert q(reader, READ) == (("apple",),)  # READ COMMITTED: not the uncommitted value (stored: it is committed)
    q(writer, "ROLLBACK")
    assert q(reader, READ) == (("apple",),)
    q(reader, "COMMIT")
    assert q(via(txproxy, mydb), READ) == (("apple",),)
    q(writer, "BEGIN")
    q(writer, "UPDATE items SET name = 'plum' WHERE id = 1")
    q(writer, "COMMIT")  # invalidates at commit
    q(reader, "BEGIN")
    assert q(reader, READ) == (("plum",),)
    q(reader, "COMMIT")


def test_repeatable_read_and_unknown_levels_never_read_or_fill_the_cache(txproxy: ProxyThread, mariadb: MariaDB,
                                                                          mydb: str, items: None) -> None:  # fmt: skip
    conn = via(txproxy, mydb)
    assert q(conn, READ) == (("apple",),)
    for setup in ("", "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ"):
        if setup:
            q(conn, setup)
        q(conn, "BEGIN")
        before = hits(txproxy)
        assert q(conn, READ) == (("apple",),)  # takes the snapshot: from the server, not the cache
        assert hits(txproxy) == before
        commit_elsewhere(mariadb, mydb, "kiwi")
        assert q(conn, READ) == (("apple",),)  # the snapshot's value, which must not be stored...
        q(conn, "COMMIT")
        assert q(conn, "SELECT name FROM items WHERE id = 1 AND 1 = 1") == (("kiwi",),)
        commit_elsewhere(mariadb, mydb, "apple")
    # ...and after a write through the proxy (which invalidates), nothing read in the snapshot may come back:
    q(conn, "BEGIN")
    assert q(conn, READ) == (("apple",),)
    q(via(txproxy, mydb), "UPDATE items SET name = 'lime' WHERE id = 1")
    assert q(conn, READ) == (("apple",),)
    q(conn, "COMMIT")
    assert q(conn, READ) == (("lime",),)  # (the session's own key: its SETs are in it)


def test_a_level_for_the_next_transaction_or_set_inside_one(txproxy: ProxyThread, mydb: str, items: None) -> None:
    conn, writer = via(txproxy, mydb), via(txproxy, mydb)
    q(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    q(conn, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # the next transaction only
    q(conn, "BEGIN")
    assert q(conn, READ) == (("apple",),)  # REPEATABLE READ snapshot
    q(writer, "UPDATE items SET name = 'fig' WHERE id = 1")  # through the proxy: invalidates
    assert q(conn, READ) == (("apple",),)  # the snapshot's value: a miss, and not stored
    q(conn, "COMMIT")
    assert q(conn, READ) == (("fig",),)
    # A level set inside a transaction applies from the next one: this one stays REPEATABLE READ.
    q(conn, "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    q(conn, "BEGIN")
    assert q(conn, READ) == (("fig",),)
    q(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    q(writer, "UPDATE items SET name = 'date' WHERE id = 1")
    assert q(conn, READ) == (("fig",),)
    q(conn, "COMMIT")
    assert q(conn, READ) == (("date",),)
    q(conn, "BEGIN")  # now READ COMMITTED
    before = hits(txproxy)
    assert q(conn, READ) == (("date",),)
    assert hits(txproxy) == before + 1
    q(conn, "COMMIT")


def test_a_trigger_that_changes_the_level_stops_the_cache(txproxy: ProxyThread, mariadb: MariaDB, mydb: str,
                                                          items: None) -> None:  # fmt: skip
    with mariadb.connect(mydb) as direct, direct.cursor() as cur:
        cur.execute("CREATE TABLE log (a INT)")
        cur.execute("CREATE TRIGGER log_rr BEFORE INSERT ON log FOR EACH ROW "
                    "SET SESSION tx_isolation = 'REPEATABLE-READ'")  # fmt: skip
    conn, writer = via(txproxy, mydb), via(txproxy, mydb)
    q(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    q(conn, "INSERT INTO log VALUES (1)")  # the session is REPEATABLE READ from here on
    assert q(conn, "SELECT @@tx_isolation") == (("REPEATABLE-READ",),)
    q(conn, "BEGIN")
    assert q(conn, READ) == (("apple",),)
    q(writer, "UPDATE items SET name = 'lemon' WHERE id = 1")
    assert q(conn, READ) == (("apple",),)  # its snapshot: not stored
    q(conn, "COMMIT")
    assert q(conn, READ) == (("lemon",),)


def test_prepared_reads_in_a_read_committed_transaction(txproxy: ProxyThread, mydb: str, items: None) -> None:
    conn = via(txproxy, mydb)
    q(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    statement = prepare(conn, "SELECT name, id FROM items WHERE id = ?")
    assert names(execute(conn, statement, 1)) == [b"apple"]
    q(conn, "BEGIN")
    before = hits(txproxy)
    assert names(execute(conn, statement, 1)) == [b"apple"]
    assert hits(txproxy) == before + 1
    q(conn, "UPDATE items SET name = 'mango' WHERE id = 1")
    assert names(execute(conn, statement, 1)) == [b"mango"]  # its own write
    q(conn, "ROLLBACK")
    assert names(execute(conn, statement, 1)) == [b"apple"]


def test_set_statement_for_a_write_invalidates(txproxy: ProxyThread, mydb: str, items: None) -> None:
    conn = via(txproxy, mydb)
    assert q(conn, READ) == (("apple",),)
    q(conn, "SET STATEMENT max_statement_time = 10 FOR UPDATE items SET name = 'melon' WHERE id = 1")
    assert q(conn, READ) == (("melon",),)
