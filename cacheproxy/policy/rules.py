"""Rules from the configuration: per table (the first rule whose pattern matches a table decides for it) and per
statement (a rule naming the statement's fingerprint id or pg_stat_statements queryid).

A query over several tables takes the shortest TTL among them, the strictest `in_transaction`, the shortest
`stale_if_error` (none if any table has none), and `strategy: none` on any of them wins. A statement rule wins over
all of that: its strategy, its TTL and `stale_if_error` (or, when it sets none, the tables'), and the stricter of its
`in_transaction` and the tables'.
Patterns follow SQL identifier rules: unquoted parts fold to lower case, "quoted" parts are exact; `*` and `?`
are globs; a pattern without a schema matches the table name in every schema.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cacheproxy.advice.statements import statement_id
from cacheproxy.config import Rule


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a result over some tables may be cached, for how long, and which rule said so."""

    cacheable: bool
    ttl: float
    strategy: str
    rule: str  # "rules[2] (public.*)" or "cache.default_ttl"
    reason: str | None = None
    in_transaction: str = "until_write"  # the strictest of the tables' rules
    stale_if_error: float = 0.0  # the shortest of the tables' windows (0: no stale serving)


@dataclass(frozen=True, slots=True)
class _Pattern:
    schema: re.Pattern[str] | None
    name: re.Pattern[str]


_STRICTNESS = {"never": 0, "until_write": 1, "always": 2}
_PART = re.compile(r'"((?:[^"]|"")*)"|([^".]+)')


def parse_pattern(text: str) -> tuple[str | None, str]:
    """'public.*' -> ('public', '*'); 'Orders' -> (None, 'orders'); '"My"."T"' -> ('My', 'T')."""
    parts: list[str] = []
    pos = 0
    while pos < len(text):
        match = _PART.match(text, pos)
        if not match:
            raise ValueError(f"bad table pattern {text!r}")
        parts.append(match.group(1).replace('""', '"') if match.group(1) is not None else match.group(2).lower())
        pos = match.end()
        if pos < len(text):
            if text[pos] != ".":
                raise ValueError(f"bad table pattern {text!r}")
            pos += 1
    if len(parts) == 1:
        return None, parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ValueError(f"bad table pattern {text!r}: use name or schema.name")


def _compile(text: str) -> _Pattern:
    schema, name = parse_pattern(text)
    return _Pattern(
        re.compile(fnmatch.translate(schema)) if schema is not None else None, re.compile(fnmatch.translate(name))
    )


class RuleSet:
    """The configured rules, compiled; `decide` gives the verdict for a set of (schema, table) names."""

    def __init__(self, rules: tuple[Rule, ...], default_ttl: float) -> None:
        self.rules = rules
        self.default_ttl = default_ttl
        self._compiled = [[_compile(t) for t in rule.tables] for rule in rules]
        # Statement id / queryid -> the first rule naming it.
        self._statements: dict[str, int] = {}
        self._queryids: dict[int, int] = {}
        for index, rule in enumerate(rules):
            for text in rule.fingerprints:
                self._statements.setdefault(statement_id(text), index)
            for queryid in rule.queryids:
                self._queryids.setdefault(queryid, index)
        self.queryids = frozenset(self._queryids)  # what the catalog loader looks up in pg_stat_statements

    def statement_rule(self, statement: str | None, queryid: int | None = None) -> tuple[int, Rule, str] | None:
        """The rule naming this statement (by fingerprint id first, then queryid): (index, rule, how it is named)."""
        index = self._statements.get(statement) if statement is not None else None
        if index is not None:
            return index, self.rules[index], f"fingerprint {statement}"
        index = self._queryids.get(queryid) if queryid is not None else None
        if index is not None:
            return index, self.rules[index], f"queryid {queryid}"
        return None

    def match(self, schema: str, name: str) -> tuple[int, Rule] | None:
        """The first rule (index, rule) with a pattern matching the table, or None."""
        for index, patterns in enumerate(self._compiled):
            for pattern in patterns:
                if pattern.name.match(name) and (pattern.schema is None or pattern.schema.match(schema)):
                    return index, self.rules[index]
        return None

    def decide(
        self, tables: Iterable[tuple[str, str]], statement: str | None = None, queryid: int | None = None
    ) -> Decision:
        """The decision for a result over `tables`; `statement` (its fingerprint id) and `queryid` (its
        pg_stat_statements id, when the catalog knows it) pick a statement rule, which wins."""
        by_tables = self._decide_tables(tables)
        if not self._statements and not self._queryids:
            return by_tables
        found = self.statement_rule(statement, queryid)
        if found is None:
            return by_tables
        index, rule, named = found
        label = f"rules[{index}] ({named})"
        if rule.strategy == "none":
            return Decision(False, 0.0, "none", label, f"rule says strategy none for statement {statement}")
        ttl = rule.ttl if rule.ttl is not None else (by_tables.ttl if by_tables.cacheable else self.default_ttl)
        in_transaction = rule.in_transaction
        if by_tables.cacheable and _STRICTNESS[by_tables.in_transaction] < _STRICTNESS[in_transaction]:
            in_transaction = by_tables.in_transaction
        stale = rule.stale_if_error if rule.stale_if_error is not None else by_tables.stale_if_error
        return Decision(True, ttl, rule.strategy, label, in_transaction=in_transaction, stale_if_error=stale)

    def _decide_tables(self, tables: Iterable[tuple[str, str]]) -> Decision:
        ttl, source, strategy = self.default_ttl, "cache.default_ttl", "lazy"
        in_transaction = "always"
        stale: float | None = None
        first = True
        for schema, name in sorted(tables):
            found = self.match(schema, name)
            table_ttl, label, table_in_transaction = self.default_ttl, "cache.default_ttl", "until_write"
            table_stale = 0.0
            if found is not None:
                index, rule = found
                label = f"rules[{index}] ({', '.join(rule.tables)})"
                if rule.strategy == "none":
                    return Decision(False, 0.0, "none", label, f"rule says strategy none for {schema}.{name}")
                if rule.ttl is not None:
                    table_ttl = rule.ttl
                if rule.strategy == "write_through":
                    strategy = "write_through"
                table_in_transaction = rule.in_transaction
                table_stale = rule.stale_if_error or 0.0
            stale = table_stale if stale is None else min(stale, table_stale)
            if _STRICTNESS[table_in_transaction] < _STRICTNESS[in_transaction]:
                in_transaction = table_in_transaction
            if first or table_ttl < ttl:
                ttl, source, first = table_ttl, label, False
        return Decision(True, ttl, strategy, source, in_transaction=in_transaction, stale_if_error=stale or 0.0)
