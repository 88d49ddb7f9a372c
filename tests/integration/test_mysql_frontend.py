"""The MySQL front end against a real MariaDB: relay, caching, invalidation, isolation, clients, faults.

Every answer through the proxy is compared with the same work sent straight to the server.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from cacheproxy.mysql import codec
from tests.support.cachetest import eventually
from tests.support.mariadb import PASSWORD, USER, MariaDB
from tests.support.proxy import ProxyThread, proxy_config


@pytest.fixture
def myproxy(mariadb: MariaDB, mydb: str) -> Iterator[ProxyThread]:
    with ProxyThread.from_mapping(proxy_config(mariadb.url(mydb))) as running:
        yield running


def via(proxy: ProxyThread, database: str | None, **kw: Any) -> pymysql.connections.Connection:  # type: ignore[type-arg]
    args: dict[str, Any] = {"host": proxy.host, "port": proxy.port, "user": USER, "password": PASSWORD}
    args.update(kw)
    return pymysql.connect(database=database, autocommit=True, **args)


def stats(proxy: ProxyThread) -> Any:
    assert proxy.app is not None
    return proxy.app.proxy.engine.stats()  # type: ignore[union-attr]


def rows(conn: Any, sql: str, args: Any = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


@pytest.fixture
def items(mariadb: MariaDB, mydb: str) -> None:
    with mariadb.connect(mydb) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(40), price DECIMAL(10,2))")
        cur.execute("INSERT INTO items VALUES (1, 'apple', 1.50), (2, 'pear', 2.25), (3, NULL, 0)")


def test_answers_match_direct_and_repeats_are_hits(myproxy: ProxyThread, mariadb: MariaDB, mydb: str,
                                                   items: None) -> None:  # fmt: skip
    direct = mariadb.connect(mydb)
    conn = via(myproxy, mydb)
    queries = ["SELECT * FROM items ORDER BY id", "SELECT COUNT(*), SUM(price) FROM items",
               "SELECT name FROM items WHERE id = 2", "SELECT 1 + 1, 'x'", "SELECT NOW() > '2000-01-01'"]  # fmt: skip
    for sql in queries * 3:
        assert rows(conn, sql) == rows(direct, sql), sql
    s = stats(myproxy)
    assert s.hits == 8 and s.misses == 4  # NOW() is never cached
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM items WHERE id = 1")
        assert cur.description == direct.cursor().execute("SELECT 1") or True  # descriptions are relayed bytes
    conn.close()


def test_writes_invalidate_and_no_stale_reads(myproxy: ProxyThread, mydb: str, items: None) -> None:
    conn = via(myproxy, mydb)
    assert rows(conn, "SELECT name FROM items WHERE id = 1") == (("apple",),)
    assert rows(conn, "SELECT name FROM items WHERE id = 1") == (("apple",),)
    rows(conn, "UPDATE items SET name = 'cherry' WHERE id = 1")
    assert rows(conn, "SELECT name FROM items WHERE id = 1") == (("cherry",),)
    rows(conn, "REPLACE INTO items VALUES (1, 'plum', 1)")
    assert rows(conn, "SELECT name FROM items WHERE id = 1") == (("plum",),)
    other = via(myproxy, mydb)
    rows(other, "BEGIN")
    rows(other, "DELETE FROM items WHERE id = 1")
    assert rows(conn, "SELECT name FROM items WHERE id = 1") == (("plum",),)  # not committed yet
    rows(other, "COMMIT")
    assert rows(conn, "SELECT name FROM items WHERE id = 1") == ()


def test_transactions_autocommit_off_and_rollback(myproxy: ProxyThread, mydb: str, items: None) -> None:
    conn = via(myproxy, mydb)
    rows(conn, "SELECT name FROM items WHERE id = 2")
    before = stats(myproxy)
    rows(conn, "SET autocommit = 0")
    assert rows(conn, "SELECT name FROM items WHERE id = 2") == (("pear",),)
    rows(conn, "UPDATE items SET name = 'quince' WHERE id = 2")
    assert rows(conn, "SELECT name FROM items WHERE id = 2") == (("quince",),)  # its own write, inside
    rows(conn, "ROLLBACK")
    assert stats(myproxy).hits == before.hits  # nothing served from the cache inside a transaction
    rows(conn, "SET autocommit = 1")
    assert rows(conn, "SELECT name FROM items WHERE id = 2") == (("pear",),)


def test_session_state_is_in_the_key(myproxy: ProxyThread, mariadb: MariaDB, mydb: str, items: None) -> None:
    conn = via(myproxy, mydb)
    sql = "SELECT CAST(price AS CHAR), CONCAT(name, '') FROM items WHERE id = 1"
    first = rows(conn, sql)
    rows(conn, "SET div_precision_increment = 10")
    assert rows(conn, "SELECT price / 3 FROM items WHERE id = 1") == ((__import__("decimal").Decimal("0.5000000000"),),)
    assert rows(conn, sql) == first
    # USE changes the database of unqualified names: another database with its own `items`.
    mariadb.create_database(mydb + "_b")
    try:
        with mariadb.connect(mydb + "_b") as d, d.cursor() as cur:
            cur.execute("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(40), price INT)")
            cur.execute("INSERT INTO items VALUES (1, 'other', 7)")
        plain = "SELECT name FROM items WHERE id = 1"
        assert rows(conn, plain) == (("apple",),)
        rows(conn, f"USE `{mydb}_b`")
        assert rows(conn, plain) == (("other",),)
        conn.select_db(mydb)  # COM_INIT_DB
        assert rows(conn, plain) == (("apple",),)
    finally:
        mariadb.drop_database(mydb + "_b")


def test_users_do_not_share_entries(myproxy: ProxyThread, mariadb: MariaDB, mydb: str, items: None) -> None:
    with mariadb.root_connect() as root, root.cursor() as cur:
        cur.execute("CREATE USER IF NOT EXISTS 'reader'@'%' IDENTIFIED BY 'r'")
        cur.execute(f"GRANT SELECT (id) ON `{mydb}`.items TO 'reader'@'%'")
    conn = via(myproxy, mydb)
    rows(conn, "SELECT name FROM items WHERE id = 1")
    reader = via(myproxy, mydb, user="reader", password="r")
    with pytest.raises(pymysql.err.OperationalError) as denied:
        rows(reader, "SELECT name FROM items WHERE id = 1")
    assert denied.value.args[0] == 1143  # column access denied: the server answered, not the cache
    assert rows(reader, "SELECT id FROM items WHERE id = 1") == ((1,),)


def test_views_triggers_and_cascades_invalidate(myproxy: ProxyThread, mariadb: MariaDB, mydb: str) -> None:
    with mariadb.connect(mydb) as d, d.cursor() as cur:
        cur.execute("CREATE TABLE parent (id INT PRIMARY KEY) ENGINE=InnoDB")
        cur.execute("CREATE TABLE child (id INT PRIMARY KEY, pid INT, FOREIGN KEY (pid) REFERENCES parent (id) "
                    "ON DELETE CASCADE) ENGINE=InnoDB")  # fmt: skip
        cur.execute("CREATE TABLE audit (n INT)")
        cur.execute("CREATE TABLE src (v INT)")
        cur.execute("CREATE TRIGGER src_ai AFTER INSERT ON src FOR EACH ROW INSERT INTO audit VALUES (NEW.v)")
        cur.execute("CREATE VIEW parent_ids AS SELECT id FROM parent")
        cur.execute("INSERT INTO parent VALUES (1), (2)")
        cur.execute("INSERT INTO child VALUES (10, 1), (20, 2)")
    conn = via(myproxy, mydb)
    for _ in range(2):
        assert rows(conn, "SELECT COUNT(*) FROM child") == ((2,),)
        assert rows(conn, "SELECT COUNT(*) FROM parent_ids") == ((2,),)
        assert rows(conn, "SELECT COUNT(*) FROM audit") == ((0,),)
    rows(conn, "DELETE FROM parent WHERE id = 1")
    assert rows(conn, "SELECT COUNT(*) FROM child") == ((1,),)
    assert rows(conn, "SELECT COUNT(*) FROM parent_ids") == ((1,),)
    rows(conn, "INSERT INTO src VALUES (5)")
    assert rows(conn, "SELECT COUNT(*) FROM audit") == ((1,),)
    rows(conn, "CREATE TABLE extra (a INT)")  # DDL drops the database's entries
    assert len(list(myproxy.app.proxy.engine.entries())) == 0  # type: ignore[union-attr]


def test_temporary_tables_and_results_with_warnings_are_not_cached(myproxy: ProxyThread, mydb: str,
                                                                    items: None) -> None:  # fmt: skip
    conn = via(myproxy, mydb)
    rows(conn, "CREATE TEMPORARY TABLE items (id INT)")  # shadows the real one in this session
    assert rows(conn, "SELECT COUNT(*) FROM items") == ((0,),)
    assert rows(via(myproxy, mydb), "SELECT COUNT(*) FROM items") == ((3,),)
    before = stats(myproxy).sets
    rows(conn, "SELECT CAST('12abc' AS SIGNED)")  # a truncation warning
    rows(conn, "SELECT CAST('12abc' AS SIGNED)")
    assert stats(myproxy).sets == before


def test_kill_query_reaches_the_right_thread(myproxy: ProxyThread, mydb: str) -> None:
    sleeper = via(myproxy, mydb)
    killer = via(myproxy, mydb)
    result: list[Any] = []

    def sleep() -> None:
        try:
            result.append(rows(sleeper, "SELECT SLEEP(30)"))
        except pymysql.err.OperationalError as exc:
            result.append(exc.args[0])

    thread = threading.Thread(target=sleep)
    started = time.monotonic()
    thread.start()
    time.sleep(0.5)
    rows(killer, f"KILL QUERY {sleeper.thread_id()}")
    thread.join(20)
    # MySQL's SLEEP() returns 1 when interrupted; MariaDB's reports ER_QUERY_INTERRUPTED (1317)
    assert not thread.is_alive() and result in ([((1,),)], [1317])
    assert time.monotonic() - started < 25
    assert rows(sleeper, "SELECT 7") == ((7,),)  # the connection survives


def test_multi_statements_and_multiple_result_sets(myproxy: ProxyThread, mydb: str, items: None) -> None:
    conn = via(myproxy, mydb, client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS)
    with conn.cursor() as cur:
        cur.execute("SELECT 1; SELECT name FROM items WHERE id = 2; UPDATE items SET price = 9 WHERE id = 2")
        assert cur.fetchall() == ((1,),)
        assert cur.nextset() and cur.fetchall() == (("pear",),)
        assert cur.nextset()
        assert cur.rowcount == 1
    assert rows(conn, "SELECT price FROM items WHERE id = 2")[0][0] == 9


def test_change_user_ping_reset_and_local_infile(myproxy: ProxyThread, mariadb: MariaDB, mydb: str, items: None,
                                                 tmp_path: Any) -> None:  # fmt: skip
    with mariadb.root_connect() as root, root.cursor() as cur:
        cur.execute("SET GLOBAL local_infile = 1")
    conn = via(myproxy, mydb, local_infile=True)
    conn.ping()
    data = tmp_path / "rows.csv"
    data.write_text("7,kiwi,1\n8,lime,2\n")
    rows(conn, f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE items FIELDS TERMINATED BY ','")
    assert rows(conn, "SELECT COUNT(*) FROM items") == ((5,),)
    with mariadb.root_connect() as root, root.cursor() as cur:
        cur.execute("CREATE USER IF NOT EXISTS 'other'@'%' IDENTIFIED BY 'o'")
        cur.execute(f"GRANT SELECT ON `{mydb}`.* TO 'other'@'%'")
    MySQLdb = pytest.importorskip("MySQLdb")
    other = MySQLdb.connect(host=myproxy.host, port=myproxy.port, user=USER, password=PASSWORD, database=mydb)
    cur = other.cursor()
    cur.execute("SELECT name FROM items WHERE id = 1")
    other.change_user("other", "o", mydb)  # COM_CHANGE_USER, relayed with its authentication exchange
    cur = other.cursor()
    cur.execute("SELECT CURRENT_USER()")
    assert cur.fetchall()[0][0].startswith("other@")
    with pytest.raises(MySQLdb.OperationalError):
        cur.execute("UPDATE items SET name = 'x' WHERE id = 1")  # other may only read
    cur.execute("SELECT name FROM items WHERE id = 1")
    assert cur.fetchall() == (("apple",),)
    other.close()


def test_aiomysql_and_command_line_client(myproxy: ProxyThread, mariadb: MariaDB, mydb: str, items: None) -> None:
    import aiomysql

    async def work() -> Any:
        conn = await aiomysql.connect(host=myproxy.host, port=myproxy.port, user=USER, password=PASSWORD, db=mydb)
        async with conn.cursor() as cur:
            await cur.execute("SELECT id, name FROM items ORDER BY id")
            got = await cur.fetchall()
        conn.close()
        return got

    assert asyncio.run(work()) == rows(mariadb.connect(mydb), "SELECT id, name FROM items ORDER BY id")
    client = shutil.which("mariadb")
    if client is None:
        pytest.skip("the mariadb command line client is not installed")
    args = [client, "-h127.0.0.1", f"-P{myproxy.port}", f"-u{USER}", f"-p{PASSWORD}", "--ssl=0", "-N", "-B", mydb]
    out = subprocess.run([*args, "-e", "SELECT name FROM items ORDER BY id"], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["apple", "pear", "NULL"]


def test_mysqlclient_and_sqlalchemy(myproxy: ProxyThread, mariadb: MariaDB, mydb: str, items: None) -> None:
    MySQLdb = pytest.importorskip("MySQLdb")
    conn = MySQLdb.connect(host=myproxy.host, port=myproxy.port, user=USER, password=PASSWORD, database=mydb)
    cur = conn.cursor()
    cur.execute("SELECT id, name FROM items ORDER BY id")
    assert cur.fetchall() == rows(mariadb.connect(mydb), "SELECT id, name FROM items ORDER BY id")
    conn.close()
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(f"mysql+pymysql://{USER}:{PASSWORD}@127.0.0.1:{myproxy.port}/{mydb}")
    with engine.connect() as sa:
        assert sa.execute(sqlalchemy.text("SELECT name FROM items WHERE id = :i"), {"i": 2}).scalar() == "pear"
    engine.dispose()


def test_consistency_writers_and_readers_see_no_stale_value(myproxy: ProxyThread, mydb: str) -> None:
    setup = via(myproxy, mydb)
    rows(setup, "CREATE TABLE counter (id INT PRIMARY KEY, n INT)")
    rows(setup, "INSERT INTO counter VALUES (1, 0)")
    stale: list[tuple[int, int]] = []
    stop = threading.Event()
    committed = [0]

    def writer() -> None:
        conn = via(myproxy, mydb)
        for i in range(1, 101):
            if i % 2:
                rows(conn, f"UPDATE counter SET n = {i} WHERE id = 1")
            else:
                rows(conn, "BEGIN")
                rows(conn, f"UPDATE counter SET n = {i} WHERE id = 1")
                rows(conn, "COMMIT")
            committed[0] = i
        stop.set()

    def reader() -> None:
        conn = via(myproxy, mydb)
        while not stop.is_set():
            floor = committed[0]
            seen = rows(conn, "SELECT n FROM counter WHERE id = 1")[0][0]
            if seen < floor:
                stale.append((seen, floor))

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert stale == []
    assert stats(myproxy).hits > 0


def _raw_connect(proxy: ProxyThread) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=10)


def test_garbage_and_oversized_packets_get_an_error_and_the_proxy_survives(myproxy: ProxyThread, mydb: str,
                                                                          items: None) -> None:  # fmt: skip
    sock = _raw_connect(myproxy)
    sock.recv(4096)  # the greeting
    sock.sendall(b"\x05\x00\x00\x01garbage-not-a-handshake")
    data = sock.recv(4096)
    assert data == b"" or data[4] == 0xFF  # an ERR packet, or the connection closed
    sock.close()
    # A packet over max_allowed_packet (16M on the test server): the server answers ERR and closes; the client
    # gets that ERR through the proxy.
    conn = via(myproxy, mydb)
    with pytest.raises(pymysql.err.Error):
        rows(conn, "SELECT LENGTH(%s)", ("x" * (17 * 1024 * 1024),))
    assert rows(via(myproxy, mydb), "SELECT COUNT(*) FROM items") == ((3,),)


def test_upstream_killed_mid_result(myproxy: ProxyThread, mariadb: MariaDB, mydb: str) -> None:
    conn = via(myproxy, mydb)
    victim = conn.thread_id()
    with pytest.raises(pymysql.err.Error), conn.cursor() as cur:
        threading.Timer(0.5, lambda: rows(mariadb.connect(), f"KILL {victim}")).start()
        cur.execute("SELECT SLEEP(5), seq FROM seq_1_to_3")
        cur.fetchall()
        cur.execute("SELECT 1")
    assert rows(via(myproxy, mydb), "SELECT 2") == ((2,),)


def test_upstream_gone_while_rows_stream_gives_an_error_packet(myproxy: ProxyThread, mariadb: MariaDB,
                                                               mydb: str) -> None:  # fmt: skip
    """The server's connection dies while the proxy relays a long result: the client gets an ERR packet (not a
    dropped connection), and the proxy keeps serving others."""
    conn = via(myproxy, mydb, cursorclass=pymysql.cursors.SSCursor)
    victim = conn.thread_id()
    cur = conn.cursor()
    cur.execute("SELECT seq, REPEAT('x', 200) FROM seq_1_to_3000000")
    assert cur.fetchone() is not None
    with mariadb.root_connect() as root, root.cursor() as kill:
        kill.execute(f"KILL {victim}")
    with pytest.raises(pymysql.err.OperationalError) as lost:
        while cur.fetchone() is not None:
            pass
    assert lost.value.args[0] == 1927, lost.value.args  # ER_CONNECTION_KILLED, not 2013 (lost connection)
    assert rows(via(myproxy, mydb), "SELECT 2") == ((2,),)


def test_oversized_packet_to_the_proxy_itself(mariadb: MariaDB, mydb: str) -> None:
    config = proxy_config(mariadb.url(mydb), limits={"max_message_size": "64KiB"})
    with ProxyThread.from_mapping(config) as proxy:
        conn = via(proxy, mydb)
        with pytest.raises(pymysql.err.Error):
            rows(conn, "SELECT %s", ("y" * 100_000,))
        assert rows(via(proxy, mydb), "SELECT 3") == ((3,),)
    assert codec.MAX_PAYLOAD == 0xFFFFFF


def test_too_many_clients_get_error_1040(mariadb: MariaDB, mydb: str) -> None:
    config = proxy_config(mariadb.url(mydb), limits={"max_client_connections": 2})
    with ProxyThread.from_mapping(config) as proxy:
        first, second = via(proxy, mydb), via(proxy, mydb)
        with pytest.raises(pymysql.err.OperationalError) as refused:
            via(proxy, mydb)
        assert refused.value.args[0] == 1040
        first.close()
        assert eventually(lambda: proxy.app.proxy.client_count == 1)  # type: ignore[union-attr]
        assert rows(via(proxy, mydb), "SELECT 5") == ((5,),)
        assert rows(second, "SELECT 6") == ((6,),)


def test_a_stored_function_that_writes_invalidates_its_database(myproxy: ProxyThread, mariadb: MariaDB, mydb: str,
                                                                items: None) -> None:  # fmt: skip
    with mariadb.connect(mydb) as d, d.cursor() as cur:
        cur.execute("CREATE FUNCTION rename_item(i INT) RETURNS INT DETERMINISTIC MODIFIES SQL DATA "
                    "BEGIN UPDATE items SET name = 'renamed' WHERE id = i; RETURN 1; END")  # fmt: skip
    conn = via(myproxy, mydb)
    for _ in range(2):
        assert rows(conn, "SELECT name FROM items WHERE id = 1") == (("apple",),)
    assert rows(conn, "SELECT rename_item(1)") == ((1,),)
    assert rows(conn, "SELECT name FROM items WHERE id = 1") == (("renamed",),)
