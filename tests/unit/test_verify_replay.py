"""Shadow verification's sans-IO parts: the re-run's messages, the reading of its reply, the comparison of results,
the ordering analysis and the rate bound."""

from __future__ import annotations

import pytest

from cacheproxy.analysis.ordering import ordering
from cacheproxy.cache import keys
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import encode, split_messages
from cacheproxy.verify.compare import Verdict, cached_rows, compare
from cacheproxy.verify.replay import SessionState, read_reply, rerun, startup_settings
from cacheproxy.verify.verifier import TokenBucket

STATE = SessionState(
    startup=(("user", "alice"), ("database", "app"), ("TimeZone", "UTC"), ("application_name", "x")),
    reported=(("TimeZone", "Asia/Tokyo"), ("server_version", "15"), ("is_superuser", "off")),
    set_history=(b"SET search_path = other, public",),
)


def _messages(payload: bytes) -> list[tuple[str, bytes]]:
    return [(chr(t), body) for t, body in split_messages(payload)]


def test_a_simple_query_is_rerun_inside_a_rolled_back_read_only_transaction_as_the_keys_user() -> None:
    key = keys.query_key("app", "alice", b"digest", b"SELECT v FROM t")
    plan = rerun(key, STATE, 5000)
    sent = _messages(plan.payload)
    queries = [body[:-1].decode() for t, body in sent if t == "Q"]
    assert queries == [
        "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY",
        'SET ROLE "alice"',
        "SET search_path = other, public",
        "SELECT v FROM t",
        "ROLLBACK",
    ]
    binds = [body for t, body in sent if t == "B"]
    # Startup settings first (neutral ones left out), then the reported ones that change results, then the timeout.
    assert [b"TimeZone" in b and b"UTC" in b for b in binds] == [True, False, False]
    assert b"Asia/Tokyo" in binds[1] and b"statement_timeout" in binds[2] and b"5000" in binds[2]
    assert not any(b"server_version" in b or b"is_superuser" in b or b"application_name" in b for b in binds)
    assert plan.segments == sum(1 for t, _ in sent if t in "QS") == 7
    assert plan.statement == 5  # BEGIN, SET ROLE, startup batch, the SET, reported batch: then the statement


def test_an_execute_is_rerun_with_its_parameter_types_arguments_and_row_limit() -> None:
    arguments = b"\x00\x01\x00\x01\x00\x01\x00\x00\x00\x04\x00\x00\x00\x02\x00\x01\x00\x01"
    key = keys.execute_key("app", "bob", b"d", b"SELECT v FROM t WHERE id = $1", (23,), arguments, 0)
    plan = rerun(key, SessionState((), (), ()), 1000)
    sent = _messages(plan.payload)
    parse, bind, execute = (body for t, body in sent[-6:-2] if t in "PBE")
    assert parse == b"\x00SELECT v FROM t WHERE id = $1\x00\x00\x01\x00\x00\x00\x17"
    assert bind == b"\x00\x00" + arguments
    assert execute == b"\x00\x00\x00\x00\x00"
    assert [t for t, _ in sent[-3:]] == ["E", "S", "Q"]
    assert plan.statement == 3  # BEGIN, SET ROLE, the reported batch (statement_timeout)


def _reply(*segments: list[bytes]) -> bytes:
    return b"".join(b"".join(segment) + m.ready_for_query(b"T") for segment in segments)


def test_the_statements_rows_are_read_from_its_segment_and_errors_before_it_are_reported() -> None:
    key = keys.query_key("app", "alice", b"digest", b"SELECT 1")
    plan = rerun(key, SessionState((), (), ()), 1000)
    ok = [encode(b"C", b"SET\x00")]
    rows = [m.row_description(["x"]), m.data_row(["1"]), m.data_row(["2"]), m.command_complete("SELECT 2")]
    reply = read_reply(_reply(ok, ok, ok, rows, ok), plan)
    assert reply.error is None and [t for t, _ in reply.statement].count(ord("D")) == 2

    failed = [m.error_response("ERROR", "42501", 'permission denied to set role "alice"')]
    reply = read_reply(_reply(ok, failed, failed, failed, ok), plan)
    assert reply.error is not None and "applying the session's settings" in reply.error and "42501" in reply.error


@pytest.mark.parametrize(
    ("cached", "fresh", "ordered", "verdict"),
    [
        (["1", "2"], ["1", "2"], True, Verdict.MATCH),
        (["1", "2"], ["2", "1"], False, Verdict.MATCH),
        (["1", "2"], ["2", "1"], True, Verdict.REORDERED),
        (["1", "2"], ["1"], False, Verdict.MISMATCH),
        (["1", "1"], ["1", "2"], False, Verdict.MISMATCH),
        ([], ["1"], False, Verdict.MISMATCH),
    ],
)
def test_compare(cached: list[str], fresh: list[str], ordered: bool, verdict: Verdict) -> None:
    def rows(values: list[str]) -> list[bytes]:
        return cached_rows(m.row_description(["x"]) + b"".join(m.data_row([v]) for v in values))

    assert compare(rows(cached), rows(fresh), ordered=ordered) is verdict


@pytest.mark.parametrize(
    ("sql", "ordered", "limited"),
    [
        ("SELECT * FROM t", False, False),
        ("SELECT * FROM t ORDER BY a LIMIT 5", True, True),
        ("SELECT * FROM t LIMIT 5", False, True),
        ("SELECT * FROM (SELECT * FROM t ORDER BY a LIMIT 5) s", False, False),
        ("SELECT string_agg(v, ',' ORDER BY v) FROM t", False, False),
        ("WITH c AS (SELECT * FROM t ORDER BY a) SELECT * FROM c", False, False),
        ("SELECT a FROM t UNION ALL SELECT a FROM u ORDER BY 1", True, False),
        ("SELECT 'ORDER BY' AS \"order\" FROM t FETCH FIRST 1 ROW ONLY", False, True),
    ],
)
def test_ordering(sql: str, ordered: bool, limited: bool) -> None:
    assert (ordering(sql).ordered, ordering(sql).limited) == (ordered, limited)


def test_startup_options_are_read_as_libpq_writes_them() -> None:
    assert startup_settings({"options": "-c a=1 -cb=2 --c-d=3 -f s"}) == [("a", "1"), ("b", "2"), ("c_d", "3")]


def test_the_token_bucket_allows_per_second_on_average() -> None:
    bucket = TokenBucket(8.0, now=0.0)
    taken = sum(bucket.take(i / 64) for i in range(5 * 64 + 1))  # 64 attempts a second for 5 seconds (exact floats)
    assert taken == 8 + 5 * 8  # the first second's burst, then 8 a second
