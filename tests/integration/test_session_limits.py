"""limits.max_prepared_statements and limits.max_pipeline_bytes: a clear error past the first, a correct (forwarded)
pipeline past the second; in both cases other sessions carry on."""

from __future__ import annotations

from collections.abc import Callable

import psycopg

from cacheproxy.protocol.framing import encode
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import SYNC, RawConn, bind, error_fields, execute, parse, shape


def test_too_many_prepared_statements_end_the_session_with_53400(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = start_proxy(limits={"max_prepared_statements": 3})
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres", dbname)
        conn.send(parse("", "SELECT 'the unnamed statement does not count'") + SYNC)
        assert shape(conn.recv_until()) == ["1", "ZI"]
        for i in range(3):
            conn.send(parse(f"s{i}", f"SELECT {i}") + SYNC)
            assert shape(conn.recv_until()) == ["1", "ZI"]
        conn.send(parse("s3", "SELECT 3") + SYNC)
        reply = conn.recv_until()
        fields = error_fields(reply)
        assert (fields["S"], fields["C"]) == ("FATAL", "53400")
        assert "max_prepared_statements" in fields["M"]
        assert conn.recv_message() is None  # closed
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port)) as other:
        assert other.execute("SELECT 1").fetchone() == (1,)


def test_a_closed_statement_frees_its_place(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = start_proxy(limits={"max_prepared_statements": 2})
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres", dbname)
        for round_ in range(5):
            conn.send(parse("a", "SELECT 1") + parse("b", "SELECT 2") + SYNC)
            assert shape(conn.recv_until()) == ["1", "1", "ZI"], round_
            conn.send(b"".join(_close(name) for name in ("a", "b")) + SYNC)
            assert shape(conn.recv_until()) == ["3", "3", "ZI"]


def _close(name: str) -> bytes:
    return encode(b"C", b"S" + name.encode() + b"\x00")


def test_a_pipeline_over_the_held_bytes_is_forwarded_and_answered_in_order(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = start_proxy(limits={"max_pipeline_bytes": "1KiB"})
    batch = parse("", "SELECT $1::int * 2")
    for i in range(300):  # ~9 KiB of Bind/Execute before the one Sync
        batch += bind(params=(str(i).encode(),)) + execute()
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres", dbname)
        conn.send(batch + SYNC)
        reply = shape(conn.recv_until())
        assert reply[0] == "1" and reply[-1] == "ZI"
        rows = [kind for kind in reply if kind.startswith("D")]
        assert rows == [f"D{i * 2}" for i in range(300)]
        conn.send(parse("", "SELECT 'next'") + bind() + execute() + SYNC)
        assert shape(conn.recv_until()) == ["1", "2", "Dnext", "CSELECT 1", "ZI"]
