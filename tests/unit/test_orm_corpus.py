"""The analyzer on real ORM-generated SQL (tests/unit/data/orm_corpus.yaml): SQLAlchemy, Django and Rails output.

Issue 14, item 12: sqlglot node kinds were taken for function calls (`a AND (b OR c)` "called and()"), so ORM
reads with a parenthesised condition were never cached and ORM writes invalidated the whole database. Every case
states exactly which functions are called; a read the ORMs emit is statically cacheable unless it really is not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cacheproxy.analysis import UNKNOWN_TABLE, Kind, analyze

CORPUS: list[dict[str, Any]] = yaml.safe_load((Path(__file__).parent / "data" / "orm_corpus.yaml").read_text("utf-8"))


def _ref(ref: tuple[str | None, str]) -> str:
    return f"{ref[0]}.{ref[1]}" if ref[0] else ref[1]


def _id(case: dict[str, Any]) -> str:
    return case["source"] + ":" + re.sub(r"\W+", "_", case["sql"])[:70]


def test_corpus_is_large_and_unique() -> None:
    assert len(CORPUS) >= 150
    assert len({c["sql"] for c in CORPUS}) == len(CORPUS)
    assert {c["source"] for c in CORPUS} == {"sqlalchemy", "django", "rails"}


@pytest.mark.parametrize("case", CORPUS, ids=[_id(c) for c in CORPUS])
def test_orm_statement(case: dict[str, Any]) -> None:
    info = analyze(case["sql"])
    assert info.kind is Kind[case["kind"]]
    assert sorted(map(_ref, info.reads)) == case["reads"]
    assert sorted(map(_ref, info.writes)) == case["writes"]
    assert sorted(info.functions) == case["functions"]
    assert info.cacheable is case["cacheable"], info.reason
    assert UNKNOWN_TABLE not in info.writes  # every ORM write names its table
    # No SQL keyword or operator is ever reported as a call.
    assert not info.functions & {"and", "or", "not", "in", "any", "all", "exists", "case", "cast", "between", "over"}


def test_most_orm_reads_are_cacheable() -> None:
    reads = [c for c in CORPUS if c["kind"] == "READ"]
    refused = [c["sql"] for c in reads if not c["cacheable"]]
    # FOR UPDATE, now(), a pg_catalog read and a ::regconfig cast: the only reads that must not be cached.
    assert len(refused) == 4, refused
