"""Unit tests for cacheproxy.analysis: the YAML case table, TxInfo/SessionChange details, fingerprint, memo."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheproxy.analysis import (
    UNKNOWN_TABLE,
    Analyzer,
    Kind,
    QueryInfo,
    SessionChange,
    TableRef,
    TxInfo,
    TxOp,
    analyze,
    fingerprint,
)
from cacheproxy.analysis.fingerprint import fingerprint_slow

CASES: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).parent / "data" / "analyzer_cases.yaml").read_text(encoding="utf-8")
)


def _slug(sql: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", sql).strip("_")[:50] or "empty"


def _refs(names: list[str]) -> frozenset[TableRef]:
    out: set[TableRef] = set()
    for name in names:
        if name == "<unknown>":
            out.add(UNKNOWN_TABLE)
            continue
        schema, dot, table = name.partition(".")
        out.add((schema, table) if dot else (None, name))
    return frozenset(out)


def test_case_table_is_big_enough() -> None:
    assert len(CASES) >= 170
    assert len({c["sql"] for c in CASES}) == len(CASES), "duplicate sql in analyzer_cases.yaml"


@pytest.mark.parametrize("case", CASES, ids=[_slug(c["sql"]) for c in CASES])
def test_case(case: dict[str, Any]) -> None:
    info = analyze(case["sql"])
    assert info.kind == Kind[case["kind"]]
    assert info.reads == _refs(case["reads"])
    assert info.writes == _refs(case["writes"])
    assert info.cacheable is case["cacheable"]
    if info.cacheable:
        assert info.reason is None
    else:
        assert info.reason
        assert case.get("reason", "") in info.reason


# --- details ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "tx"),
    [
        ("BEGIN", TxInfo(TxOp.BEGIN)),
        (
            "begin isolation level serializable, read only, deferrable",
            TxInfo(TxOp.BEGIN, "serializable", True, True),
        ),
        ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ READ WRITE", TxInfo(TxOp.BEGIN, "repeatable read", False)),
        (
            "begin transaction isolation level read committed not deferrable",
            TxInfo(TxOp.BEGIN, "read committed", None, False),
        ),
        ("begin isolation level read uncommitted", TxInfo(TxOp.BEGIN, "read uncommitted")),
        ("commit", TxInfo(TxOp.COMMIT)),
        ("END TRANSACTION", TxInfo(TxOp.COMMIT)),
        ("commit work and chain", TxInfo(TxOp.COMMIT, chain=True)),
        ("commit and no chain", TxInfo(TxOp.COMMIT)),
        ("rollback and chain", TxInfo(TxOp.ROLLBACK, chain=True)),
        ("ABORT", TxInfo(TxOp.ROLLBACK)),
        ("savepoint a", TxInfo(TxOp.SAVEPOINT)),
        ("release a", TxInfo(TxOp.RELEASE)),
        ("rollback work to savepoint a", TxInfo(TxOp.ROLLBACK_TO)),
        ("prepare transaction 'g'", TxInfo(TxOp.PREPARE_TRANSACTION)),
        ("commit prepared 'g'", TxInfo(TxOp.COMMIT_PREPARED)),
        ("rollback prepared 'g'", TxInfo(TxOp.ROLLBACK_PREPARED)),
    ],
)
def test_tx_info(sql: str, tx: TxInfo) -> None:
    info = analyze(sql)
    assert info.kind == Kind.TRANSACTION
    assert info.tx == tx
    assert info.session is None


@pytest.mark.parametrize(
    ("sql", "change"),
    [
        ("SET TimeZone = 'UTC'", SessionChange("set", "timezone", "'UTC'")),
        ("set time zone local", SessionChange("set", "timezone", "local")),
        ("set search_path to app, public", SessionChange("set", "search_path", "app, public")),
        ("set schema 'app'", SessionChange("set", "search_path", "'app'")),
        ("set names 'UTF8'", SessionChange("set", "client_encoding", "'UTF8'")),
        ("set session statement_timeout = 0", SessionChange("set", "statement_timeout", "0")),
        ("set local lock_timeout to '1s'", SessionChange("set_local", "lock_timeout", "'1s'")),
        ("set app.tenant = '42'", SessionChange("set", "app.tenant", "'42'")),
        ("set datestyle to default", SessionChange("set", "datestyle", "default")),
        ("reset search_path", SessionChange("reset", "search_path")),
        ("reset time zone", SessionChange("reset", "timezone")),
        ("RESET ALL", SessionChange("reset_all")),
        ("discard all", SessionChange("discard_all")),
        ("discard plans", SessionChange("discard_other", "plans")),
        ("discard temporary", SessionChange("discard_other", "temp")),
        ("discard sequences", SessionChange("discard_other", "sequences")),
        ("set role admin", SessionChange("set_role", "role", "admin")),
        ("set session role 'admin'", SessionChange("set_role", "role", "'admin'")),
        ("set role none", SessionChange("reset_role", "role")),
        ("reset role", SessionChange("reset_role", "role")),
        ("set local role admin", SessionChange("set_local", "role", "admin")),
        ("set session authorization bob", SessionChange("set_session_authorization", "session_authorization", "bob")),
        ("set session authorization default", SessionChange("set_session_authorization", "session_authorization")),
        ("reset session authorization", SessionChange("set_session_authorization", "session_authorization")),
        (
            "set transaction isolation level serializable",
            SessionChange("set_transaction", "transaction", "isolation level serializable"),
        ),
        (
            "set session characteristics as transaction read only",
            SessionChange("set", "session_characteristics", "read only"),
        ),
    ],
)
def test_session_change(sql: str, change: SessionChange) -> None:
    info = analyze(sql)
    assert info.kind == Kind.SESSION
    assert info.session == change
    assert info.tx is None


def test_functions_are_reported_under_postgres_names() -> None:
    info = analyze(
        "select now(), current_timestamp, random(), nextval('s'), gen_random_uuid(), lower(a), coalesce(a, b),"
        " string_agg(a, ','), to_char(d, 'YYYY'), pg_catalog.version(), app.f(1), clock_timestamp(), set_config('a',"
        " 'b', false), txid_current(), pg_sleep(0) from t"
    )
    for name in (
        "now",
        "current_timestamp",
        "random",
        "nextval",
        "gen_random_uuid",
        "lower",
        "coalesce",
        "string_agg",
        "to_char",
        "pg_catalog.version",
        "app.f",
        "clock_timestamp",
        "set_config",
        "txid_current",
        "pg_sleep",
    ):
        assert name in info.functions, name
    assert "cast" not in info.functions
    assert analyze("select * from generate_series(1, 3)").functions == {"generate_series"}


def test_temp_tables_and_cte_flags() -> None:
    assert analyze("create temporary table x (a int)").temp_tables_created == {(None, "x")}
    assert analyze("create global temp table x (a int)").temp_tables_created == {(None, "x")}
    assert analyze("create table pg_temp.x (a int)").temp_tables_created == {("pg_temp", "x")}
    assert analyze("create table x (a int)").temp_tables_created == frozenset()
    assert analyze("select * into temp y from t").temp_tables_created == {(None, "y")}
    assert analyze("with d as (delete from t returning *) select * from d").data_modifying_cte
    assert not analyze("with d as (select 1) select * from d").data_modifying_cte


def test_multiple_statements_keep_per_statement_details() -> None:
    info = analyze("set search_path = app; begin; select * from t")
    assert info.statement_count == 3
    assert info.session is None and info.tx is None
    assert [s.kind for s in info.statements] == [Kind.SESSION, Kind.TRANSACTION, Kind.READ]
    assert info.statements[0].session == SessionChange("set", "search_path", "app")
    assert info.statements[1].tx == TxInfo(TxOp.BEGIN)
    assert info.statements[2].cacheable
    assert analyze("select 1").statements == ()


def test_semicolons_inside_literals_and_atomic_bodies_do_not_split() -> None:
    assert analyze("select ';' from t").statement_count == 1
    assert analyze('select $x$;$x$, "a;b" from t -- ;').statement_count == 1
    assert analyze("create function f() returns int begin atomic select 1; end; select 1").statement_count == 2


def test_unparseable_reason_is_one_short_line() -> None:
    info = analyze("select * from t where (((")
    assert info.reason is not None and info.reason.startswith("could not parse: ")
    assert "\n" not in info.reason
    assert len(info.reason) <= len("could not parse: ") + 120


# --- fingerprint -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM t WHERE a = 42", "SELECT * FROM t WHERE a = ?"),
        ("select 'abc', 'it''s', 1.5e3, .5, 0x1F, 1_000", "select ?, ?, ?, ?, ?, ?"),
        ("select E'a\\'b', B'0101', X'1F', N'x', $$dollar ' $$, $tag$ a $ b $tag$", "select ?, ?, ?, ?, ?, ?"),
        ("select  a ,\n\tb   from t", "select a , b from t"),
        ("select 1 -- comment\nfrom t", "select ? from t"),
        ("select /* a /* nested */ b */ 1 from t", "select ? from t"),
        ("select a/**/from t", "select a from t"),
        ('select "Col 1", "x""y" from "T" where "a" = 1', 'select "Col 1", "x""y" from "T" where "a" = ?'),
        ("select t1.c2, a$1 from t1 where x = $1 and y = $12", "select t1.c2, a$1 from t1 where x = $1 and y = $12"),
        ("SELECT Foo FROM Bar", "SELECT Foo FROM Bar"),
        ("select %(id)s, %s", "select %(id)s, %s"),
        ("select 'now'::timestamptz", "select 'now'::timestamptz"),
        ("select ' Today ', 'TOMORROW', 'yesterday', 'epoch', 'infinity', '-infinity', 'allballs', 'current'", None),
        ("select 'tomorrow 10:00'::timestamp, '2024-01-01'::date", "select 'tomorrow 10:00'::timestamp, ?::date"),
        ("select $$now$$::date, E'no\\x77'::date", "select $$now$$::date, E'no\\x77'::date"),
        ("select 'nowhere', 'knowledge'", "select ?, ?"),
        ("select 'unterminated", "select ?"),
        ("select /* unterminated", "select"),
        ('select "unterminated', 'select "unterminated'),
        ("select $a$ unterminated", "select ?"),
        ("  select 1  ", "select ?"),
        ("", ""),
    ],
)
def test_fingerprint(sql: str, expected: str | None) -> None:
    assert fingerprint(sql) == (sql if expected is None else expected)
    assert fingerprint_slow(sql) == fingerprint(sql)


def test_fingerprint_equal_for_different_literals() -> None:
    a = fingerprint("SELECT * FROM users WHERE id = 1 AND name = 'bob'")
    b = fingerprint("SELECT  *  FROM users WHERE id = 2 AND name = 'alice' -- x")
    assert a == b
    assert fingerprint("select 'now'::date") != fingerprint("select '2024-01-01'::date")


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_fingerprint_never_raises(sql: str) -> None:
    assert isinstance(fingerprint(sql), str)


_SQLISH = st.text(alphabet=st.sampled_from(list("selctfromwhinsupda();'\"$1-/*eExX&uU .:,=\n\t0\xa0")), max_size=80)


@settings(max_examples=500, deadline=None)
@given(_SQLISH)
def test_fingerprint_fast_path_matches_token_path(sql: str) -> None:
    if "/*" not in sql:  # nested/unterminated block comments always take the token path
        assert fingerprint(sql) == fingerprint_slow(sql)


# --- never raises ----------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _SQLISH))
def test_analyze_never_raises(sql: str) -> None:
    info = analyze(sql)
    assert isinstance(info, QueryInfo)
    if info.cacheable:
        assert info.kind == Kind.READ and info.statement_count == 1


def test_analyze_survives_deep_nesting() -> None:
    assert analyze("select " + "(" * 5000 + "1" + ")" * 5000).cacheable is not None
    assert analyze("explain " * 3000 + "select 1").cacheable is False


# --- memo ------------------------------------------------------------------------------------------------------


def test_memo_hits_on_same_fingerprint_and_returns_same_object() -> None:
    analyzer = Analyzer()
    first = analyzer.analyze("select * from t where id = 1")
    second = analyzer.analyze("select * from t  where id = 2 -- other")
    assert second is first
    assert (analyzer.memo_hits, analyzer.memo_misses) == (1, 1)
    assert analyzer.analyze("select * from u") is not first
    assert analyzer.memo_misses == 2


def test_memo_is_a_bounded_lru() -> None:
    analyzer = Analyzer(max_entries=2)
    a = analyzer.analyze("select * from a")
    analyzer.analyze("select * from b")
    assert analyzer.analyze("select * from a") is a  # a becomes most recent
    analyzer.analyze("select * from c")  # evicts b
    assert len(analyzer) == 2
    hits = analyzer.memo_hits
    assert analyzer.analyze("select * from a") is a
    assert analyzer.memo_hits == hits + 1
    analyzer.analyze("select * from b")
    assert analyzer.memo_hits == hits + 1  # b was evicted: a miss


def test_memo_can_be_disabled() -> None:
    analyzer = Analyzer(max_entries=0)
    analyzer.analyze("select 1")
    analyzer.analyze("select 2")
    assert (analyzer.memo_hits, analyzer.memo_misses, len(analyzer)) == (0, 2, 0)


def test_memo_keeps_special_literals_apart() -> None:
    analyzer = Analyzer()
    assert analyzer.analyze("select * from t where d > '2024-01-01'::date").cacheable
    assert not analyzer.analyze("select * from t where d > 'today'::date").cacheable


def test_memo_does_not_store_session_values() -> None:
    analyzer = Analyzer()
    first = analyzer.analyze("set timezone = 'UTC'")
    second = analyzer.analyze("set timezone = 'Europe/Paris'")
    assert first.session is not None and first.session.value == "'UTC'"
    assert second.session is not None and second.session.value == "'Europe/Paris'"
    assert len(analyzer) == 0


def test_relation_cross_check_catches_a_dropped_table() -> None:
    # The lexer-side safety net behind rule 1: a FROM/JOIN relation missing from sqlglot's tree blocks caching.
    from cacheproxy.analysis.analyzer import _unaccounted_relation
    from cacheproxy.analysis.lexer import tokenize

    tokens = tokenize("select * from t join s.u on true where extract(day from d) = 1 and a is distinct from b")
    assert _unaccounted_relation(tokens, {(None, "t"), ("s", "u")}, set()) is None
    assert _unaccounted_relation(tokens, {(None, "t")}, set()) == "s.u"
    assert _unaccounted_relation(tokenize("select * from x"), set(), {"x"}) is None


# Identifiers as PostgreSQL stores them: a write must name the table a read of the same relation names, or the cache
# (indexed by table name) keeps the read's stale entry.


def test_identifiers_are_truncated_to_namedatalen() -> None:
    long_name = "a" * 70
    stored = "a" * 63  # NAMEDATALEN - 1 bytes: PostgreSQL truncates longer identifiers (with a NOTICE)
    assert analyze(f"UPDATE {long_name} SET v = 1").writes == {(None, stored)}
    assert analyze(f'DELETE FROM "{long_name}"').writes == {(None, stored)}
    assert analyze(f"TRUNCATE {long_name}").writes == {(None, stored)}
    assert analyze(f"COPY s.{long_name} FROM STDIN").writes == {("s", stored)}
    assert analyze(f"SELECT v FROM {long_name}.{long_name}").reads == {(stored, stored)}
    # Truncated at a character boundary: 31 two-byte characters fit in 63 bytes, the 32nd does not.
    assert analyze(f'UPDATE "{"é" * 40}" SET v = 1').writes == {(None, "é" * 31)}


@pytest.mark.parametrize(
    "sql",
    [
        'UPDATE U&"d\\0061ta" SET v = 1',
        "UPDATE U&\"d!0061ta\" UESCAPE '!' SET v = 1",
        'TRUNCATE U&"d\\0061ta"',
        'COPY U&"d\\0061ta" FROM STDIN',
        'INSERT INTO public.U&"d\\0061ta" VALUES (1)',
    ],
)
def test_a_write_to_a_unicode_escaped_name_is_a_write_to_an_unknown_table(sql: str) -> None:
    # U&"d\0061ta" is the table "data": kept as written, it would invalidate a name no read depends on.
    assert UNKNOWN_TABLE in analyze(sql).writes


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("COPY (DELETE FROM items WHERE id = 1 RETURNING *) TO STDOUT", {(None, "items")}),
        ("COPY (UPDATE s.items SET name = 'x' RETURNING id) TO STDOUT WITH (FORMAT csv)", {("s", "items")}),
        ("COPY (INSERT INTO items VALUES (1) RETURNING id) TO STDOUT", {(None, "items")}),
        ("COPY (WITH d AS (DELETE FROM items RETURNING *) SELECT * FROM d) TO STDOUT", {(None, "items")}),
    ],
)
def test_copy_of_a_query_that_writes_is_a_write(sql: str, writes: set[TableRef]) -> None:
    # COPY (INSERT/UPDATE/DELETE ... RETURNING) TO copies what the statement returns: it runs, and writes.
    info = analyze(sql)
    assert info.kind is Kind.WRITE and info.writes == writes and not info.cacheable


def test_copy_of_a_read_stays_a_read() -> None:
    info = analyze("COPY (SELECT * FROM items) TO STDOUT")
    assert info.kind is Kind.READ and info.reads == {(None, "items")} and not info.writes


@settings(max_examples=300)
@given(st.binary(max_size=40) | st.sampled_from([b"NOW", b"\x00\x00\x00\x05Today", b"snow", b"curRent", b"1234"]))
def test_names_time_word_prefilter_agrees_with_the_regex(data: bytes) -> None:
    """names_time_word skips its regex when no "t"/"o" is there: every time-dependent word must have one."""
    from cacheproxy.analysis.lexer import _TIME_WORD_BYTES, TIME_DEPENDENT_WORDS, names_time_word

    assert all("t" in word or "o" in word for word in TIME_DEPENDENT_WORDS)
    assert names_time_word(data) == (_TIME_WORD_BYTES.search(data) is not None)
