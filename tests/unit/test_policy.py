"""Rules (first match, shortest TTL, `none` wins) and the catalog's picture of names, families and functions."""

from __future__ import annotations

import pytest

from cacheproxy.catalog.model import Catalog, Relation
from cacheproxy.config import Rule
from cacheproxy.policy.rules import RuleSet, parse_pattern


@pytest.mark.parametrize(
    ("pattern", "parsed"),
    [
        ("public.*", ("public", "*")),
        ("Orders", (None, "orders")),
        ('"My Schema"."T"', ("My Schema", "T")),
        ('app."Mixed"', ("app", "Mixed")),
        ("audit_*", (None, "audit_*")),
    ],
)
def test_parse_pattern(pattern: str, parsed: tuple[str | None, str]) -> None:
    assert parse_pattern(pattern) == parsed


@pytest.mark.parametrize("bad", ["a.b.c", "a..b", '"unterminated', ""])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(ValueError):
        RuleSet((Rule(tables=(bad,)),), 60.0) if bad else parse_pattern(".")


RULES = RuleSet(
    (
        Rule(tables=("public.audit_log",), strategy="none"),
        Rule(tables=("public.prices",), ttl=5.0),
        Rule(tables=("public.*",), ttl=30.0),
        Rule(tables=("reports.*",), ttl=600.0, strategy="write_through"),
    ),
    default_ttl=60.0,
)


def test_first_match_wins() -> None:
    assert RULES.match("public", "prices") == (1, RULES.rules[1])
    assert RULES.match("public", "users") == (2, RULES.rules[2])
    assert RULES.match("other", "users") is None


def test_shortest_ttl_across_tables() -> None:
    decision = RULES.decide([("public", "users"), ("public", "prices")])
    assert (decision.cacheable, decision.ttl, decision.rule) == (True, 5.0, "rules[1] (public.prices)")


def test_none_wins_over_everything() -> None:
    decision = RULES.decide([("public", "users"), ("public", "audit_log")])
    assert not decision.cacheable
    assert "audit_log" in (decision.reason or "")


def test_unmatched_tables_take_the_default() -> None:
    assert RULES.decide([("other", "t")]).ttl == 60.0
    assert RULES.decide([]).ttl == 60.0  # SELECT 1: no table at all
    assert RULES.decide([("other", "t"), ("reports", "daily")]).ttl == 60.0
    assert RULES.decide([("reports", "daily")]).strategy == "write_through"


def _catalog() -> Catalog:
    return Catalog.build(
        "app",
        1,
        relations=[
            Relation("public", "users", "r", False),
            Relation("public", "orders", "p", False),
            Relation("public", "orders_2024", "r", False),
            Relation("public", "order_lines", "r", False),
            Relation("public", "audited", "r", True),
            Relation("public", "v_users", "v", False),
            Relation("archive", "users", "r", False),
        ],
        inherits=[("orders_2024", "orders")],
        cascades=[("orders", "order_lines")],
        functions=[
            ("pg_catalog", "lower", True),
            ("pg_catalog", "now", False),
            ("pg_catalog", "length", True),
            ("pg_catalog", "length", False),  # one volatile overload taints the name
            ("public", "my_fn", False),
            ("public", "pure_fn", True),
        ],
    )


def test_catalog_resolution_takes_every_schema_when_unqualified() -> None:
    catalog = _catalog()
    assert {r.schema for r in catalog.resolve(None, "users")} == {"public", "archive"}
    assert [r.schema for r in catalog.resolve("archive", "users")] == ["archive"]
    assert catalog.resolve(None, "missing") == ()


def test_catalog_write_closure_follows_partitions_and_cascades() -> None:
    catalog = _catalog()
    # A foreign key to a partitioned table covers its partitions: deleting from orders_2024 cascades to order_lines.
    assert catalog.write_closure(["orders_2024"]) == {"orders_2024", "orders", "order_lines"}
    assert catalog.write_closure(["orders"]) == {"orders", "orders_2024", "order_lines"}
    assert catalog.family["orders"] == {"orders_2024"}
    assert catalog.has_triggers("audited") and not catalog.has_triggers("users")


def test_catalog_function_volatility() -> None:
    catalog = _catalog()
    assert catalog.function_is_immutable("lower")
    assert catalog.function_is_immutable("pg_catalog.lower")
    assert catalog.function_is_immutable("coalesce")  # an SQL construct, not a pg_proc function
    assert not catalog.function_is_immutable("now")
    assert not catalog.function_is_immutable("length")
    assert not catalog.function_is_immutable("unknown_fn")
    assert catalog.may_write("my_fn") and catalog.may_write("unknown_fn")
    assert not catalog.may_write("now") and not catalog.may_write("pure_fn")
