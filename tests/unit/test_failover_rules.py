"""Failover's sans-IO parts: multi-host URLs, libpq's host choice, failover detection, and what a session that lost
its upstream tells its client (cacheproxy/upstream_hosts.py, cacheproxy/proxy/reattach.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from cacheproxy.catalog.model import Catalog
from cacheproxy.config import ConfigError, FailoverConfig, UpstreamConfig, build_config
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import encode, split_messages
from cacheproxy.protocol.replies import Op, Pending
from cacheproxy.proxy.reattach import LostTransaction, in_flight, shutdown_fatal, trailing_shutdown_fatal
from cacheproxy.proxy.requests import Request
from cacheproxy.upstream_hosts import HostState, UpstreamHosts, choose, failover_reason, passes, try_order

# -- the URL --------------------------------------------------------------------------------------------------------


def test_multi_host_url_keeps_every_host_in_order() -> None:
    cfg = UpstreamConfig.from_url(
        "postgres://app:pw@db1:5433,db2,[::1]:6000/shop?target_session_attrs=read-write&load_balance_hosts=random"
    )
    assert cfg.hosts == (("db1", 5433), ("db2", 5432), ("::1", 6000))
    assert (cfg.host, cfg.port) == ("db1", 5433)
    assert cfg.target_session_attrs == "read-write" and cfg.load_balance_hosts == "random"
    assert cfg.database == "shop" and cfg.password == "pw"


def test_single_host_url_defaults() -> None:
    cfg = UpstreamConfig.from_url("postgres://db/app")
    assert cfg.hosts == (("db", 5432),)
    assert cfg.target_session_attrs == "any" and cfg.load_balance_hosts == "disable"


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("postgres://a,b/x?target_session_attrs=writable", "unknown target_session_attrs"),
        ("postgres://a,b/x?load_balance_hosts=roundrobin", "unknown load_balance_hosts"),
        ("postgres://a:1,a:1/x", "given twice"),
        ("postgres://a:1,b:x/x", "bad port"),
    ],
)
def test_bad_multi_host_urls_are_refused(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        UpstreamConfig.from_url(url)


def test_failover_section_defaults_and_validation() -> None:
    config = build_config({"upstream": "postgres://a,b/x"})
    assert config.failover == FailoverConfig(wait=30.0, reattach_concurrency=16, check_interval=2.0)
    config = build_config({"upstream": "postgres://a/x", "failover": {"wait": "0", "reattach_concurrency": 4}})
    assert config.failover.wait == 0 and config.failover.reattach_concurrency == 4
    with pytest.raises(ConfigError, match="reattach_concurrency"):
        build_config({"upstream": "postgres://a/x", "failover": {"reattach_concurrency": 0}})


# -- choosing a host (libpq's target_session_attrs) -----------------------------------------------------------------


def _state(port: int, *, standby: bool = False, read_only: bool | None = None, timeline: int = 1) -> HostState:
    return HostState("h", port, standby, standby if read_only is None else read_only, "7000", timeline)


PRIMARY, STANDBY, READ_ONLY_PRIMARY = _state(1), _state(2, standby=True), _state(3, read_only=True)


@pytest.mark.parametrize(
    ("target", "accepted"),
    [
        ("any", {1, 2, 3}),
        ("read-write", {1}),
        ("read-only", {2, 3}),
        ("primary", {1, 3}),
        ("standby", {2}),
        ("prefer-standby", {1, 2, 3}),
    ],
)
def test_passes_follows_libpq(target: str, accepted: set[int]) -> None:
    assert {s.port for s in (PRIMARY, STANDBY, READ_ONLY_PRIMARY) if passes(s, target)} == accepted


def test_choose_takes_the_first_that_passes_and_prefer_standby_falls_back() -> None:
    assert choose([STANDBY, PRIMARY], "read-write") == PRIMARY
    assert choose([STANDBY, PRIMARY], "any") == STANDBY
    assert choose([PRIMARY, STANDBY], "prefer-standby") == STANDBY
    assert choose([PRIMARY, READ_ONLY_PRIMARY], "prefer-standby") == PRIMARY
    assert choose([STANDBY], "primary") is None
    assert choose([], "any") is None


def test_try_order_keeps_the_order_unless_load_balancing() -> None:
    hosts = [("a", 1), ("b", 2), ("c", 3), ("d", 4)]
    assert try_order(hosts, "disable", random.Random(1)) == hosts
    orders = {tuple(try_order(hosts, "random", random.Random(seed))) for seed in range(20)}
    assert len(orders) > 1 and all(sorted(order) == hosts for order in orders)


def test_failover_is_another_host_system_or_timeline() -> None:
    assert failover_reason(None, PRIMARY) is None
    assert failover_reason(PRIMARY, PRIMARY) is None
    assert "moved from h:1" in (failover_reason(PRIMARY, _state(2)) or "")
    assert "new timeline" in (failover_reason(PRIMARY, _state(1, timeline=2)) or "")
    other = HostState("h", 1, False, False, "8000", 1)
    assert "another cluster" in (failover_reason(PRIMARY, other) or "")
    unknown = HostState("h", 1, False, False, None, None)  # a role without pg_monitor: identity unknown
    assert failover_reason(PRIMARY, unknown) is None


# -- what the client is told --------------------------------------------------------------------------------------

SHUTDOWN = m.error_response("FATAL", "57P01", "terminating connection due to administrator command")


def test_a_shutdown_fatal_is_found_alone_or_after_buffered_output() -> None:
    assert shutdown_fatal(SHUTDOWN)
    assert not shutdown_fatal(m.error_response("ERROR", "57P01", "x"))
    assert not shutdown_fatal(m.error_response("FATAL", "28P01", "password authentication failed"))
    row_description = encode(b"T", b"\x00\x00")
    assert trailing_shutdown_fatal(SHUTDOWN) == 0
    assert trailing_shutdown_fatal(row_description + SHUTDOWN) == len(row_description)
    assert trailing_shutdown_fatal(row_description + m.ready_for_query(b"I")) is None
    assert trailing_shutdown_fatal(encode(b"D", b"\x00\x01\x00\x00\x00\x05C57P0")) is None


def _request(kind: str, sql: bytes = b"") -> Request:
    return Request(None, kind, "bypass", 0.0, sql)


def _query(kind: str, sql: bytes = b"") -> list[Pending]:
    return [Pending(Op.QUERY, on_done=_request(kind, sql))]


@pytest.mark.parametrize(
    ("pending", "in_block", "told"),
    [
        (_query("read"), False, (1, "08006", "run it again")),
        (_query("write"), False, (1, "08006", "outcome is unknown")),
        (_query("write"), True, (1, "40001", "transaction in progress was lost")),
        (_query("tx", b"BEGIN"), False, (1, "40001", "transaction in progress was lost")),
        (_query("tx", b"commit"), True, (1, "08006", "outcome is unknown")),
        (_query("tx", b" END;"), True, (1, "08006", "outcome is unknown")),
        (_query("tx", b"ROLLBACK"), True, (1, "40001", "transaction in progress was lost")),
        # the extended protocol: one cycle per Sync; the proxy's own quiet requests are not the client's
        (
            [Pending(Op.PARSE), Pending(Op.BIND), Pending(Op.EXECUTE, on_done=_request("read")), Pending(Op.SYNC)],
            False,
            (1, "08006", "run it again"),
        ),
        ([Pending(Op.QUERY, quiet=True)], False, (0, "08006", "run it again")),
        ([Pending(Op.FUNCTION_CALL)], False, (1, "08006", "outcome is unknown")),
        (_query("read") + _query("write"), False, (2, "08006", "outcome is unknown")),
    ],
)
def test_in_flight_says_what_was_lost(pending: list[Pending], in_block: bool, told: tuple[int, str, str]) -> None:
    cycles, code, message = in_flight(pending, in_block)
    assert (cycles, code) == told[:2] and told[2] in message


def test_lost_transaction_answers_the_next_cycle_with_40001_then_passes_the_rest() -> None:
    lost = LostTransaction()
    query = encode(b"Q", b"INSERT INTO t VALUES (1)\x00")
    reply, rest, done = lost.feed(query[:7])
    assert (reply, rest, done) == (b"", b"", False)
    reply, rest, done = lost.feed(query[7:] + encode(b"Q", b"SELECT 1\x00"))
    messages = split_messages(reply)
    assert [t for t, _ in messages] == [m.ERROR_RESPONSE, m.READY_FOR_QUERY]
    fields = m.decode_error_fields(messages[0][1])
    assert fields["C"] == "40001" and "failed over" in fields["M"]
    assert messages[1][1] == b"I"
    assert done and rest == encode(b"Q", b"SELECT 1\x00")


def test_lost_transaction_answers_an_extended_batch_once_and_a_rollback_as_such() -> None:
    lost = LostTransaction()
    batch = encode(b"P", b"\x00COMMIT\x00\x00\x00") + encode(b"B", b"\x00\x00" + b"\x00" * 6) + encode(b"S")
    reply, rest, done = lost.feed(batch)
    assert [t for t, _ in split_messages(reply)] == [m.ERROR_RESPONSE, m.READY_FOR_QUERY] and done and rest == b""
    reply, rest, done = LostTransaction().feed(encode(b"Q", b"ROLLBACK;\x00"))
    assert [t for t, _ in split_messages(reply)] == [m.COMMAND_COMPLETE, m.READY_FOR_QUERY] and done


# -- UpstreamHosts' choices, with probes answered from a table (no sockets) ----------------------------------------


class _Probed(UpstreamHosts):
    def __init__(self, url: str, answers: dict[int, HostState | None], seed: int = 0) -> None:
        super().__init__(UpstreamConfig.from_url(url), FailoverConfig(), rng=random.Random(seed))
        self.answers = answers
        self.probed: list[int] = []
        self.seen: list[str] = []
        self.on_failover(lambda before, after, why: self.seen.append(why))

    async def _probe(self, address: tuple[str, int]) -> HostState | None:
        self.probed.append(address[1])
        return self.answers[address[1]]


def test_resolve_takes_the_first_host_that_passes_and_notices_a_promotion() -> None:
    answers: dict[int, HostState | None] = {1: _state(1), 2: _state(2, standby=True)}
    hosts = _Probed("postgres://h:1,h:2/db?target_session_attrs=read-write", answers)

    async def scenario() -> None:
        assert await hosts.resolve() == answers[1]
        assert hosts.probed == [1] and hosts.failovers == 0  # libpq stops at the first that passes
        answers[1] = None  # the primary is gone; the standby is not promoted yet
        assert await hosts.resolve() is None
        assert hosts.current == _state(1) and hosts.address == ("h", 1)
        answers[2] = _state(2, timeline=2)  # promoted
        assert await hosts.resolve() == answers[2]
        assert hosts.failovers == 1 and hosts.address == ("h", 2) and "moved from h:1" in hosts.seen[0]
        assert await hosts.resolve() == answers[2] and hosts.failovers == 1  # noticed once

    asyncio.run(scenario())


def test_a_balanced_choice_stays_while_it_passes() -> None:
    answers: dict[int, HostState | None] = {port: _state(port, standby=True) for port in (1, 2, 3, 4)}
    hosts = _Probed("postgres://h:1,h:2,h:3,h:4/db?target_session_attrs=standby&load_balance_hosts=random", answers)

    async def scenario() -> None:
        first = await hosts.resolve()
        assert first is not None
        for _ in range(10):
            assert await hosts.resolve() == first
        assert hosts.failovers == 0
        answers[first.port] = None
        second = await hosts.resolve()
        assert second is not None and second.port != first.port and hosts.failovers == 1

    asyncio.run(scenario())


def test_sql_datetime_keywords_write_nothing() -> None:
    """pgbench's INSERT ... CURRENT_TIMESTAMP must not make its session's settings unknown (it could then not
    re-attach after a failover), nor invalidate the whole database."""
    catalog = Catalog("db", 1, {}, {}, {}, {}, frozenset(), frozenset({"now"}))
    assert not catalog.may_write("current_timestamp") and not catalog.may_write("localtime")
    assert not catalog.may_write("now") and catalog.may_write("my_function")
