"""The MySQL front end's prepared statements (COM_STMT_*: binary protocol, cached executes) and CACHEPROXY commands.

PyMySQL has no server-side prepared statements: these tests send COM_STMT_PREPARE / EXECUTE / CLOSE through its
connection's own packet layer and read the replies with the proxy's codec, and compare every reply's bytes with the
same exchange sent straight to MariaDB.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from cacheproxy.mysql import codec
from cacheproxy.mysql.codec import Capability, Command, Reply, ResponseTracker
from tests.support.mariadb import PASSWORD, USER, MariaDB
from tests.support.proxy import ProxyThread, proxy_config


@pytest.fixture
def adminproxy(mariadb: MariaDB, mydb: str) -> Iterator[ProxyThread]:
    with ProxyThread.from_mapping(proxy_config(mariadb.url(mydb), admin={"users": [USER]})) as running:
        yield running


@pytest.fixture
def items(mariadb: MariaDB, mydb: str) -> None:
    with mariadb.connect(mydb) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(40), price DECIMAL(10,2))")
        cur.execute("INSERT INTO items VALUES (1, 'apple', 1.50), (2, 'pear', 2.25), (3, 'fig', 3)")


def connect(port: int, database: str, host: str = "127.0.0.1") -> Any:
    return pymysql.connect(host=host, port=port, user=USER, password=PASSWORD, database=database, autocommit=True)


def exchange(conn: Any, command: int, body: bytes, reply: int) -> tuple[list[bytes], ResponseTracker]:
    """Send one command packet and read its whole reply (payloads, and the tracker that followed it)."""
    conn._execute_command(command, body)
    deprecate = bool(conn.server_capabilities & conn.client_flag & Capability.DEPRECATE_EOF)
    tracker = ResponseTracker(reply, deprecate_eof=deprecate)
    payloads: list[bytes] = []
    while True:
        packet = conn._read_packet(packet_type=_Raw)
        payloads.append(packet.data)
        if tracker.feed(packet.data) == "done":
            return payloads, tracker


class _Raw:
    """A PyMySQL packet type that keeps ERR packets as data instead of raising."""

    def __init__(self, data: bytes, encoding: str) -> None:
        self.data = data

    def raise_for_error(self) -> None:
        return None

    def is_error_packet(self) -> bool:
        return False


def prepare(conn: Any, sql: str) -> int:
    _, tracker = exchange(conn, Command.STMT_PREPARE, sql.encode(), Reply.PREPARE)
    assert tracker.prepared is not None, tracker.error
    return tracker.prepared.statement_id


def execute(conn: Any, statement: int, value: int, *, bind_types: bool = True) -> list[bytes]:
    body = struct.pack("<IBI", statement, 0, 1) + b"\x00"  # id, no cursor, one iteration, NULL bitmap of 1 param
    body += b"\x01" + b"\x08\x00" if bind_types else b"\x00"  # new-params-bound, LONGLONG
    body += struct.pack("<q", value)
    payloads, _ = exchange(conn, Command.STMT_EXECUTE, body, Reply.GENERIC)
    return payloads


def names(payloads: list[bytes]) -> list[bytes | None]:
    """The first column of each binary row (VARCHAR)."""
    rows = [p for p in payloads[1:] if p[:1] == b"\x00" and len(p) > 1]
    return [codec.parse_binary_row(p, (0xFD, 0xF6))[0] for p in rows]


def test_prepared_executes_are_cached_and_byte_identical(adminproxy: ProxyThread, mariadb: MariaDB, mydb: str,
                                                         items: None) -> None:  # fmt: skip
    sql = "SELECT name, price FROM items WHERE id = ?"
    direct = connect(mariadb.port, mydb)
    proxied = connect(adminproxy.port, mydb)
    d_stmt, p_stmt = prepare(direct, sql), prepare(proxied, sql)
    engine = adminproxy.app.proxy.engine  # type: ignore[union-attr]
    for value in (2, 2, 2, 1):
        expected = execute(direct, d_stmt, value)
        assert execute(proxied, p_stmt, value) == expected
    assert names(expected) == [b"apple"]
    assert engine.stats().hits == 2
    # A second connection whose first execute is a hit: the server never saw its parameter types, so the next
    # execute that does not re-send them must get them from the proxy (else: error 1210).
    other = connect(adminproxy.port, mydb)
    o_stmt = prepare(other, sql)
    assert names(execute(other, o_stmt, 2)) == [b"pear"]
    assert engine.stats().hits == 3
    assert names(execute(other, o_stmt, 3, bind_types=False)) == [b"fig"]
    # A write through the proxy invalidates cached executes too.
    with proxied.cursor() as cur:
        cur.execute("UPDATE items SET name = 'pearl' WHERE id = 2")
    assert names(execute(other, o_stmt, 2, bind_types=False)) == [b"pearl"]
    other._execute_command(Command.STMT_CLOSE, struct.pack("<I", o_stmt))  # no reply
    with other.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchall() == ((1,),)


def test_cacheproxy_explain_and_stats(adminproxy: ProxyThread, mariadb: MariaDB, mydb: str, items: None) -> None:
    conn = connect(adminproxy.port, mydb)
    with conn.cursor() as cur:
        cur.execute("CACHEPROXY EXPLAIN SELECT name FROM items WHERE id = 1")
        explained = dict(cur.fetchall())
        assert explained["cacheable"] == "yes" and f"{mydb}.items" in explained["depends_on"]
        cur.execute("CACHEPROXY EXPLAIN SELECT NOW(), name FROM items")
        explained = dict(cur.fetchall())
        assert explained["cacheable"] == "no" and explained["reason"] == "non-deterministic function now()"
        cur.execute("CACHEPROXY EXPLAIN UPDATE items SET name = 'x'")
        assert dict(cur.fetchall())["invalidates"] == "items"
        cur.execute("SELECT name FROM items WHERE id = 1")
        cur.execute("SELECT name FROM items WHERE id = 1")
        cur.execute("CACHEPROXY SHOW STATS")
        stats = dict(cur.fetchall())
        assert stats["hits"] == "1" and stats["entries"] == "1"
        cur.execute("CACHEPROXY SHOW CACHES")
        assert cur.fetchall()[0][:3] == ("SELECT name FROM items WHERE id = 1", "items", "1")
        cur.execute("CACHEPROXY INVALIDATE TABLE items")
        assert cur.rowcount == 1
    with mariadb.root_connect() as root, root.cursor() as cur:
        cur.execute("CREATE USER IF NOT EXISTS 'plain'@'%' IDENTIFIED BY 'p'")
    plain = pymysql.connect(host="127.0.0.1", port=adminproxy.port, user="plain", password="p", autocommit=True)
    with pytest.raises(pymysql.err.OperationalError) as denied, plain.cursor() as cur:
        cur.execute("CACHEPROXY SHOW STATS")
    assert denied.value.args[0] == 1227
