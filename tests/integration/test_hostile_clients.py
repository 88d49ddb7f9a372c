"""Random and mutated client byte streams against a running proxy: no crash, no leaked session, others unaffected."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from struct import pack

import psycopg
import pytest

from cacheproxy.protocol.framing import encode
from tests.support.hostile import hostile_round
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import (
    SYNC,
    RawConn,
    bind,
    data_rows,
    error_fields,
    execute,
    parse,
    shape,
)


@pytest.mark.timeout(180)
def test_mutated_streams_leave_the_proxy_serving(
    pg: PgCluster, start_proxy: Callable[..., ProxyThread], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = start_proxy(limits={"max_message_size": "1MiB", "startup_timeout": "2s"})
    rng = random.Random(20261126)
    with caplog.at_level(logging.ERROR, logger="cacheproxy"):
        for round_no in range(150):
            hostile_round(rng, proxy.port, round_no)
    internal = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert internal == []
    with psycopg.connect(pg.dsn(port=proxy.port)) as conn:  # the proxy still serves
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    assert proxy.app is not None
    deadline = time.monotonic() + 10
    while proxy.app.proxy.client_count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.app.proxy.client_count == 0  # every hostile session ended


# -- malformed and abusive extended-protocol messages, case by case ----------------------------------------------


def _bind_raw(after_names: bytes) -> bytes:
    """A Bind whose body after the (empty) portal and statement names is exactly `after_names`."""
    return encode(b"B", b"\x00\x00" + after_names)


_INT1 = parse("", "SELECT $1::int", (23,))

# Well-framed messages the server itself must judge: the proxy relays them and the client gets what PostgreSQL
# says (the server's ErrorResponse and SQLSTATE, and the session goes on), byte for byte as without the proxy.
RELAYED = {
    "bind with too few parameters": parse("", "SELECT $1::int + $2::int", (23, 23)) + bind(params=(b"1",)) + execute(),
    "bind with too many parameters": _INT1 + bind(params=(b"1", b"2", b"3")) + execute(),
    "65535 parameters declared, 1 sent": parse("", "SELECT $1::int", (23,) * 65535) + bind(params=(b"1",)) + execute(),
    "65535 parameters declared and sent": (
        parse("", "SELECT $1::int", (23,) * 65535) + bind(params=(b"7",) * 65535) + execute()
    ),
    "bind to an unknown statement": bind(statement="no_such_statement") + execute(),
    "parse of invalid SQL": parse("", "SELEC 1") + bind() + execute(),
    "negative row limit": parse("", "SELECT 1") + bind() + execute(max_rows=-1),
}

# Messages whose own fields contradict their length: the proxy refuses them itself (it must decode Binds to key the
# cache), with a FATAL ErrorResponse carrying a SQLSTATE, and closes that connection. PostgreSQL answers some of
# these with an ERROR and goes on; closing is the stricter choice, and it touches no other session.
MALFORMED = {
    "bind parameter count 65535, 2 present": _bind_raw(pack("!HH", 0, 65535) + pack("!i", 1) + b"1" + pack("!H", 0)),
    "bind parameter length negative": _INT1 + _bind_raw(pack("!HHi", 0, 1, -5) + pack("!H", 0)),
    "bind parameter length past the end": _INT1 + _bind_raw(pack("!HHi", 0, 1, 1000) + b"12" + pack("!H", 0)),
    "bind format count past the end": _INT1 + _bind_raw(pack("!H", 300) + pack("!HH", 0, 1)),
    "parse type count past the end": encode(b"P", b"\x00SELECT $1\x00" + pack("!HI", 65535, 23)),
    "parse without terminators": encode(b"P", b"SELECT 1"),
}

# Framing errors: the length word itself is impossible. The proxy cannot find the next message, so it says why
# (FATAL, with a SQLSTATE) and closes.
FRAMING = {
    "negative message length": b"Q\xff\xff\xff\xf0SELECT 1\x00",
    "length under 4": b"Q\x00\x00\x00\x02",
    "huge message length": b"P\x7f\xff\xff\xffxx",
}


def _exchange(port: int, data: bytes) -> tuple[list[str], list[str] | None]:
    """Send `data` + Sync on a fresh session; the reply's shape, and that of a SELECT 1 after (None: closed)."""
    with RawConn("127.0.0.1", port, timeout=10) as conn:
        conn.startup("postgres")
        conn.send(data + SYNC)
        reply = shape(conn.recv_until("Z"))
        try:
            after = conn.query("SELECT 1")
        except OSError:
            return reply, None
        return reply, shape(after) if after else None


@pytest.fixture
def bystander(proxy: ProxyThread) -> Iterator[RawConn]:
    """A session that stays open through every hostile case and must keep working."""
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres")
        yield conn
        assert data_rows(conn.query("SELECT 'unaffected'")) == [[b"unaffected"]]


@pytest.mark.parametrize("case", list(RELAYED))
def test_server_judged_messages_get_the_servers_answer(
    pg: PgCluster, proxy: ProxyThread, bystander: RawConn, case: str
) -> None:
    via = _exchange(proxy.port, RELAYED[case])
    direct = _exchange(pg.port, RELAYED[case])
    assert via == direct
    assert via[1] == ["T", "D1", "CSELECT 1", "ZI"]  # the session goes on


@pytest.mark.parametrize("case", [*MALFORMED, *FRAMING])
def test_malformed_messages_get_a_fatal_error_and_a_clean_close(
    proxy: ProxyThread, bystander: RawConn, case: str
) -> None:
    data = MALFORMED.get(case) or FRAMING[case]
    with RawConn(proxy.host, proxy.port, timeout=10) as conn:
        conn.startup("postgres")
        conn.send(data + SYNC)
        reply = conn.recv_until("never")  # everything up to the close
    errors = [error_fields([msg]) for msg in reply if msg[0] == "E"]
    assert [(e["V"], e["C"]) for e in errors] in ([("FATAL", "08P01")], [("FATAL", "54000")]), shape(reply)
    assert reply[-1][0] == "E"  # and nothing after it: the connection closed
    _wait_sessions(proxy, 1)  # only the bystander is left


@pytest.mark.parametrize("cut", ["mid-header", "mid-body", "mid-bind"])
def test_truncated_message_then_close_ends_the_session(proxy: ProxyThread, bystander: RawConn, cut: str) -> None:
    message = _INT1 + bind(params=(b"41",)) + execute() + SYNC
    at = {"mid-header": 2, "mid-body": 9, "mid-bind": len(_INT1) + 7}[cut]
    with RawConn(proxy.host, proxy.port) as conn:
        conn.startup("postgres")
        conn.send(message[:at])
    _wait_sessions(proxy, 1)


def _wait_sessions(proxy: ProxyThread, count: int) -> None:
    assert proxy.app is not None
    deadline = time.monotonic() + 10
    while proxy.app.proxy.client_count > count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.app.proxy.client_count == count
