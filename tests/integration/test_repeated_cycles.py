"""Request cycles repeated byte for byte (what drivers and pgbench send for every execution): answered from the cache
exactly as the first time, and not once something that decides the answer has changed in between (the statement
behind a name, a setting, a temporary table, a transaction that wrote)."""

from __future__ import annotations

from collections.abc import Callable

from cacheproxy.protocol.framing import encode
from tests.support.cachetest import new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import SYNC, RawConn, bind, describe_portal, execute, parse, query, shape


def _close(name: str) -> bytes:
    return encode(b"C", b"S" + name.encode() + b"\x00")


def _create_t_in_two_schemas(pg: PgCluster, dbname: str) -> None:
    pg.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one'), (2, 'two');"
        "CREATE SCHEMA other; CREATE TABLE other.t (id int PRIMARY KEY, v text); INSERT INTO other.t VALUES (1, 'x');"
        "GRANT ALL ON SCHEMA other TO PUBLIC; GRANT ALL ON ALL TABLES IN SCHEMA public, other TO PUBLIC;",
        dbname=dbname,
    )


def test_repeated_cycles_are_answered_exactly_as_before(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _create_t_in_two_schemas(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    marker = new_marker()
    simple = query(f"SELECT v AS {marker} FROM t WHERE id = 1")
    # (another shape than `simple`: pg_stat_statements counts statements that differ only in constants as one)
    extended = parse("", f"SELECT v, id AS {marker}x FROM t WHERE id = $1") + bind(params=(b"2",))
    extended += describe_portal() + execute() + SYNC
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres", dbname)
        first_simple = shape(conn.query(f"SELECT v AS {marker} FROM t WHERE id = 1"))
        conn.send(extended)
        first_extended = shape(conn.recv_until())
        for _ in range(5):  # the second of each is a slow-path hit, the rest take the fast path
            conn.send(simple)
            assert shape(conn.recv_until()) == first_simple
            conn.send(extended)
            assert shape(conn.recv_until()) == first_extended
    assert first_simple == ["T", "Done", "CSELECT 1", "ZI"]
    assert first_extended == ["1", "2", "T", "Dtwo,2", "CSELECT 1", "ZI"]
    assert upstream_calls(pg, marker + "x") == 1  # the extended query, once
    assert upstream_calls(pg, marker) == 2  # (a substring match: both queries), once each


def test_a_statement_prepared_again_under_the_same_name_is_not_answered_for_the_old_one(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _create_t_in_two_schemas(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    run = bind(statement="s") + describe_portal() + execute() + SYNC  # the same bytes for both statements
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres", dbname)
        conn.send(parse("s", "SELECT v FROM t WHERE id = 1") + SYNC)
        conn.recv_until()
        for _ in range(3):
            conn.send(run)
            assert "Done" in shape(conn.recv_until())
        conn.send(_close("s") + parse("s", "SELECT v FROM t WHERE id = 2") + SYNC)
        assert shape(conn.recv_until()) == ["3", "1", "ZI"]
        conn.send(run)
        assert "Dtwo" in shape(conn.recv_until())


def test_a_setting_changed_between_identical_queries_is_honoured(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _create_t_in_two_schemas(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres", dbname)
        for _ in range(3):
            assert "Done" in shape(conn.query("SELECT v FROM t WHERE id = 1"))
        conn.query("SET search_path = other")
        assert "Dx" in shape(conn.query("SELECT v FROM t WHERE id = 1"))
        conn.query("CREATE TEMP TABLE t (id int, v text); INSERT INTO t VALUES (1, 'temp')")
        assert "Dtemp" in shape(conn.query("SELECT v FROM t WHERE id = 1"))  # pg_temp comes first


def test_inside_a_transaction_block_the_slow_path_decides(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    _create_t_in_two_schemas(pg, dbname)
    proxy = start_proxy(cache={"default_ttl": "10m"})
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres", dbname)
        for _ in range(3):
            conn.query("SELECT v FROM t WHERE id = 1")
        conn.query("BEGIN")
        conn.query("UPDATE t SET v = 'uno' WHERE id = 1")
        assert shape(conn.query("SELECT v FROM t WHERE id = 1"))[1:] == ["Duno", "CSELECT 1", "ZT"]
        conn.query("ROLLBACK")
        assert shape(conn.query("SELECT v FROM t WHERE id = 1"))[1:] == ["Done", "CSELECT 1", "ZI"]
