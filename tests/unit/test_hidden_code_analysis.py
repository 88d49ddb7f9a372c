"""What the analyzer reports of code a statement runs without naming it as a call, and the verdict on it against a
hand-built catalog (issue 14, items 2 and 3; item 12's neighbours: builtins sqlglot renames or drops)."""

from __future__ import annotations

import pytest

from cacheproxy.analysis import Kind, analyze
from cacheproxy.analysis.lexer import operator_symbols, tokenize
from cacheproxy.catalog.model import Catalog, HiddenCode, Relation
from cacheproxy.policy.rules import RuleSet
from cacheproxy.policy.verdict import judge_read, write_scope

RULES = RuleSet((), default_ttl=60.0)


def _catalog(hidden: HiddenCode | None = None) -> Catalog:
    catalog = Catalog.build(
        "app",
        1,
        relations=[
            Relation("public", "t", "r", False),
            Relation("public", "ev", "r", False),
            Relation("public", "v", "v", True),
            Relation("public", "v_plain", "v", True),
        ],
        inherits=[],
        cascades=[],
        functions=[
            ("pg_catalog", "upper", True),
            ("pg_catalog", "count", True),
            ("pg_catalog", "array_agg", True),
            ("public", "vsum", True),
            ("public", "psum", True),
        ],
    )
    return catalog.with_hidden_code(hidden or HiddenCode())


# -- the analyzer --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "functions"),
    [
        ("SELECT mod(a, 2), div(a, 2) FROM t", {"mod", "div"}),  # sqlglot: Mod / IntDiv operators
        ("SELECT strpos(a, 'x'), to_hex(a), log10(a) FROM t", {"strpos", "position", "to_hex", "hex", "log10", "log"}),
        ("SELECT convert(a, b) FROM t", {"convert"}),
        ("INSERT INTO t (a, b) SELECT x, y FROM u", set()),
        ("WITH c (a) AS (SELECT 1) SELECT * FROM c", set()),
        ("SELECT * FROM t x (a, b) JOIN (SELECT 1) s ON true", set()),
        ("SELECT CAST(a AS character varying(20)), a::numeric(10, 2), a::bit varying(3) FROM t", set()),
        ("SELECT 1 FROM t WHERE a = 1 AND (b = 2 OR c = 3) OR NOT (d IN (1) AND EXISTS (SELECT 1))", set()),
        ("SELECT count(*) FILTER (WHERE a > 0) OVER (PARTITION BY b) FROM t", {"count"}),
    ],
)
def test_functions_are_exactly_the_calls(sql: str, functions: set[str]) -> None:
    assert analyze(sql).functions == functions


def test_operators_every_piece_of_a_run() -> None:
    assert operator_symbols(tokenize("SELECT a ~~~ 1, b->>'k', c::int FROM t WHERE d <= 2")) == {
        "~", "~~", "~~~", "-", ">", "->", ">>", "->>", "<", "=", "<=",
    }  # fmt: skip
    assert "===" in analyze("SELECT 1 FROM t WHERE a OPERATOR(public.===) b").operators


def test_casts_and_attributes() -> None:
    info = analyze('SELECT a::tag, CAST(b AS public."Mood"), c::integer, x.f, (x).g FROM t x')
    assert {"tag", "Mood", "int4"} <= info.casts
    assert {"f", "g"} <= info.attributes


@pytest.mark.parametrize(
    ("sql", "time_casts", "cacheable"),
    [
        ("SELECT ('n' || 'ow')::timestamptz", {""}, False),
        ("SELECT CAST(upper(a) AS date) FROM t", {""}, False),
        ("SELECT a::timestamptz[] FROM t", {"a"}, True),
        ("SELECT t.a::tstzrange FROM t", {"a"}, True),
        ("SELECT s.a::date FROM (SELECT a FROM t) s", {""}, False),  # a derived column may be anything
        ("SELECT $1::timestamptz, '2024-01-01'::date, NULL::time, E'x'::timetz", set(), True),
        ("SELECT a::interval, a::text FROM t", set(), True),  # interval has no 'now'
        ("SELECT 'now'::date", set(), False),  # a literal: the lexer's check
    ],
)
def test_time_casts(sql: str, time_casts: set[str], cacheable: bool) -> None:
    info = analyze(sql)
    assert info.time_casts == time_casts
    assert info.cacheable is cacheable


# An unparseable read (`ORDER BY ... USING <` is beyond sqlglot): every call, operator and name written is checked.
UNPARSED = " ORDER BY 1 USING <"


@pytest.mark.parametrize(
    ("hidden", "sql", "writes"),
    [
        (HiddenCode(), "SELECT bump() FROM t", True),  # a user function: may write
        (HiddenCode(), "SELECT public.bump(a) FROM t", True),
        (HiddenCode(), "SELECT upper(a), count(*) FROM t", False),  # built in
        (HiddenCode(), "WITH RECURSIVE c (n) AS (SELECT 1) SELECT n FROM c", False),  # a CTE's column list
        (HiddenCode(), "WITH c (n) AS NOT MATERIALIZED (SELECT bump()) SELECT n FROM c", True),
        (HiddenCode(writing_views=frozenset({("public", "v")})), "SELECT * FROM v", True),
        (HiddenCode(writing_views=frozenset({("public", "v")})), "SELECT * FROM s.v", True),  # any schema
        (HiddenCode(writing_views=frozenset({("public", "v")})), "SELECT * FROM v_plain", False),
        (HiddenCode(operators={"@@@": True}), "SELECT a @@@ 1 FROM t", True),
        (HiddenCode(row_functions={"f": True}), "SELECT x.f FROM t x", True),
        (HiddenCode(casts={"tag": True}), "SELECT a::tag FROM t", True),
    ],
)
def test_an_unparseable_read_invalidates_when_what_it_names_may_write(
    hidden: HiddenCode, sql: str, writes: bool
) -> None:
    info = analyze(sql + UNPARSED)
    assert info.kind is Kind.READ and not info.cacheable and info.reason is not None
    assert info.reason.startswith("could not parse")
    scope = write_scope(info, _catalog(hidden))
    assert scope.everything is writes
    if writes:
        assert scope.code == "function_call"  # so `invalidation.unknown_writes: ignore` applies


def test_a_drivers_catalog_query_sqlglot_cannot_parse_writes_nothing() -> None:
    """asyncpg's type introspection (run at the first use of a non-builtin type on each connection) must not flush
    the database: it calls only built-in functions."""
    introspection = pytest.importorskip("asyncpg.introspection")
    for sql in (introspection.INTRO_LOOKUP_TYPES, introspection.INTRO_LOOKUP_TYPES_13):
        info = analyze(sql)
        assert info.kind is Kind.READ and not info.cacheable
        assert write_scope(info, _catalog()).empty


# -- the verdict ---------------------------------------------------------------------------------------------------


def test_writing_view_read_invalidates_everything() -> None:
    catalog = _catalog(HiddenCode(writing_views=frozenset({("public", "v")})))
    scope = write_scope(analyze("SELECT * FROM v"), catalog)
    assert scope.everything and scope.code == "function_call"
    assert write_scope(analyze("SELECT * FROM v_plain"), catalog).empty


@pytest.mark.parametrize(
    ("hidden", "sql", "writes"),
    [
        (HiddenCode(operators={"~~~": False}), "SELECT a ~~~ 1 FROM t", False),
        (HiddenCode(operators={"@@@": True}), "SELECT a @@@ 1 FROM t", True),
        (HiddenCode(casts={"int4": False}), "SELECT a::tag::int FROM t", False),
        (HiddenCode(row_functions={"f": True}), "SELECT x.f FROM t x", True),
        (HiddenCode(implicit_casts=False), "SELECT upper(a) FROM t", False),
    ],
)
def test_hidden_code_refuses_and_may_invalidate(hidden: HiddenCode, sql: str, writes: bool) -> None:
    catalog = _catalog(hidden)
    info = analyze(sql)
    assert info.cacheable and judge_read(info, _catalog(), RULES).cacheable  # without the user object: cached
    assert not judge_read(info, catalog, RULES).cacheable
    assert write_scope(info, catalog).everything is writes


def test_aggregate_with_volatile_support_function_is_not_immutable() -> None:
    catalog = _catalog(HiddenCode(aggregates=frozenset({("public", "vsum")})))
    assert not judge_read(analyze("SELECT vsum(a) FROM t"), catalog, RULES).cacheable
    assert not judge_read(analyze("SELECT public.vsum(a) FROM t"), catalog, RULES).cacheable
    assert judge_read(analyze("SELECT psum(a) FROM t"), catalog, RULES).cacheable


def test_time_cast_of_a_column_needs_a_typed_column() -> None:
    columns = {("public", "t"): {"a": False, "b": True}, ("public", "ev"): {"at": True, "a": True}}
    catalog = _catalog(HiddenCode(columns=columns))
    assert not judge_read(analyze("SELECT a::timestamptz FROM t"), catalog, RULES).cacheable  # text column
    assert judge_read(analyze("SELECT b::date FROM t"), catalog, RULES).cacheable  # a timestamptz column
    assert judge_read(analyze("SELECT at::date FROM ev"), catalog, RULES).cacheable
    assert not judge_read(analyze("SELECT zz::date FROM ev"), catalog, RULES).cacheable  # no such column: computed
    # `a` is text in one of the relations read: the cast may read either
    assert not judge_read(analyze("SELECT ev.a::date FROM ev, t"), catalog, RULES).cacheable


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT a @@@ 1 FROM t) TO STDOUT",
        "EXPLAIN ANALYZE SELECT a @@@ 1 FROM t",
        "DECLARE c CURSOR FOR SELECT a @@@ 1 FROM t",
    ],
)
def test_embedded_queries_carry_their_hidden_code(sql: str) -> None:
    """The query inside COPY, EXPLAIN ANALYZE or DECLARE runs the operator: the statement invalidates as it would."""
    catalog = _catalog(HiddenCode(operators={"@@@": True}))
    assert write_scope(analyze(sql), catalog).everything
