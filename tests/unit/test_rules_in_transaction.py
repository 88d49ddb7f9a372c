"""RuleSet.decide: the strictest `in_transaction` of a query's tables wins; tables without a rule count as
until_write; `strategy: write_through` on any table makes the result write-through."""

from __future__ import annotations

import pytest

from cacheproxy.config import Rule
from cacheproxy.policy.rules import RuleSet

_RULES = RuleSet(
    (
        Rule(("prices",), in_transaction="always", strategy="write_through"),
        Rule(("ledger",), in_transaction="never"),
        Rule(("stock",), in_transaction="always"),
    ),
    default_ttl=60.0,
)


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        ([("public", "prices")], "always"),
        ([("public", "prices"), ("public", "stock")], "always"),
        ([("public", "prices"), ("public", "orders")], "until_write"),  # no rule: the default
        ([("public", "prices"), ("public", "ledger")], "never"),
        ([], "always"),  # no table at all: nothing a transaction could change
    ],
)
def test_strictest_in_transaction_wins(tables: list[tuple[str, str]], expected: str) -> None:
    assert _RULES.decide(tables).in_transaction == expected


def test_write_through_on_any_table() -> None:
    assert _RULES.decide([("public", "prices"), ("public", "stock")]).strategy == "write_through"
    assert _RULES.decide([("public", "stock")]).strategy == "lazy"
