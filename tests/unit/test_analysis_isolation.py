"""Analyses do not leak into each other: what one statement was never changes what another one is."""

from __future__ import annotations

from cacheproxy.analysis import analyze


def test_a_qualified_call_inside_and_does_not_name_functions_of_later_queries() -> None:
    # Run in a fresh process by pytest's import order this is the first AND the analyzer sees; sqlglot renders an
    # And node starting with its left operand, which once got cached as the "function name" of every AND.
    for other in (
        "SELECT t.oid FROM pg_type t WHERE pg_catalog.pg_type_is_visible(t.oid) AND t.typname = 'hstore'",
        "select pg_catalog.version()",
        "SELECT 1 FROM hot WHERE upper(v) = 'X' AND id > 2",
    ):
        analyze(other)
    after = analyze("SELECT id AS m_1, v FROM hot WHERE $1 = 1 AND id <= 3 ORDER BY id")
    assert after.functions == frozenset() and after.cacheable
    assert analyze("SELECT v FROM hot WHERE id <= 3 AND v = 'x'").functions == frozenset()
