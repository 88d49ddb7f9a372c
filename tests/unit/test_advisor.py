"""The rule advisor's pure parts: statement ids, the workload recorder, the ranking and its rules, statement rules in
the RuleSet and the configuration, and the advice built from pg_stat_statements rows."""

from __future__ import annotations

import pytest
import yaml

from cacheproxy.advice.advisor import HOT_READS, REUSE_MIN, advise
from cacheproxy.advice.statements import loose, statement_id
from cacheproxy.advice.upstream import not_installed, not_preloaded, observed_from
from cacheproxy.advice.workload import MAX_STATEMENTS, OVERFLOW, Observed, StatementSample, Workload
from cacheproxy.analysis.fingerprint import fingerprint
from cacheproxy.config import ConfigError, Rule, build_config
from cacheproxy.policy.rules import RuleSet

_URL = "postgres://u@127.0.0.1/db"


def _read(
    text: str,
    tables: tuple[str, ...],
    *,
    hits: int,
    misses: int,
    mean: float,
    bypasses: int = 0,
    cacheable: bool = True,
    reason: str | None = None,
    rule: str = "cache.default_ttl",
) -> StatementSample:
    runs = misses + bypasses
    return StatementSample("db", statement_id(text), loose(fingerprint(text)), "read", tables, cacheable, reason, rule,
                           60.0, "lazy", hits, misses, bypasses, runs * mean, runs)  # fmt: skip


def _observed(*statements: StatementSample, writes: dict[str, int] | None = None) -> Observed:
    table_writes = {("db", table): count for table, count in (writes or {}).items()}
    return Observed(60.0, statements, table_writes, {})


# --- statement ids --------------------------------------------------------------------------------------------------


def test_statement_ids_ignore_literals_parameters_spacing_and_semicolons() -> None:
    a = statement_id("SELECT a FROM t WHERE id = 5 AND k = 'x'")
    assert a == statement_id("SELECT a  FROM t\n WHERE id = $1 AND k = $2;")
    assert a == statement_id("SELECT a FROM t WHERE id = 6 AND k = 'y' -- a comment")
    assert a != statement_id("SELECT b FROM t WHERE id = 5 AND k = 'x'")
    assert len(a) == 16 and statement_id(a.upper()) == a  # an id stands for itself
    # pg_stat_statements shows constants as $n: the same id as the text the application sent.
    assert statement_id("SELECT name FROM lookup WHERE id = $1") == statement_id("SELECT name FROM lookup WHERE id = 1")
    # Case and spacing around operators are kept, as pg_stat_statements keeps the text it first saw.
    assert (
        statement_id("select 1")
        != statement_id("SELECT 1")
        != statement_id("SELECT 1+1")
        != statement_id("SELECT 1 + 1")
    )


# --- the recorder -----------------------------------------------------------------------------------------------------


def test_workload_counts_and_bounds() -> None:
    workload = Workload(now=100.0)
    stats = workload.statement("db", "a" * 16, "SELECT ?", "read")
    assert workload.statement("db", "a" * 16, "SELECT ?", "read") is stats
    stats.hits += 3
    stats.completed("miss", 0.5)
    stats.completed("bypass", 0.25)
    workload.written("db", {"t", "u"})
    workload.written("db", {"t"})
    workload.database_written("db")
    observed = workload.observed(now=130.0)
    assert observed.seconds == 30.0
    (sample,) = observed.statements
    assert (sample.hits, sample.misses, sample.bypasses, sample.calls) == (3, 1, 1, 5)
    assert sample.mean_seconds == 0.375
    assert observed.table_writes == {("db", "t"): 2, ("db", "u"): 1} and observed.database_writes == {"db": 1}
    for i in range(MAX_STATEMENTS + 5):
        workload.statement("db", f"{i:016x}", "SELECT ?", "read")
    overflow = workload.statement("db", "f" * 16, "SELECT ?", "read")
    assert overflow.id == OVERFLOW
    overflow.hits += 1
    assert workload.observed(now=131.0).overflow
    workload.reset(now=200.0)
    assert workload.observed(now=201.0).statements == ()


# --- the ranking ------------------------------------------------------------------------------------------------------


def test_ranking_flags_and_rules_for_a_synthetic_workload() -> None:
    slow = _read("SELECT region, sum(x) FROM sales GROUP BY region", ("sales",), hits=9, misses=1, mean=0.050)
    lookup = _read("SELECT name FROM lookup WHERE id = 1", ("lookup",), hits=190, misses=10, mean=0.0003)
    heavy = _read("SELECT count(*) FROM events", ("events",), hits=0, misses=30, mean=0.001)
    advice = advise(_observed(slow, lookup, heavy, writes={"events": 30, "lookup": 1}))
    assert [s.id for s in advice.statements] == [slow.id, lookup.id, heavy.id]
    assert advice.statements[0].saved_s == pytest.approx(9 * 0.050)
    tables = {t.table: t for t in advice.tables}
    assert [t.table for t in advice.tables] == ["sales", "lookup", "events"]
    assert tables["events"].write_heavy and tables["events"].strategy == "none"
    assert tables["lookup"].strategy == "write_through" and tables["lookup"].ttl == "10m"
    assert tables["sales"].strategy is None  # few reads: the default
    rules = yaml.safe_load(advice.yaml())["rules"]
    assert rules == [
        {"fingerprints": [slow.id], "ttl": "5m", "strategy": "lazy"},
        {"tables": ["events"], "strategy": "none"},
        {"tables": ["lookup"], "ttl": "10m", "strategy": "write_through"},
    ]
    config = build_config({"upstream": _URL, "rules": rules})
    ruleset = RuleSet(config.rules, 60.0)
    assert not ruleset.decide([("public", "events")]).cacheable
    assert ruleset.decide([("public", "sales")], slow.id).ttl == 300.0
    assert advice.as_dict()["rules_yaml"] == advice.yaml()


def test_never_reused_results_get_a_statement_rule_none() -> None:
    unique = _read("SELECT * FROM orders WHERE id = 1", ("orders",), hits=1, misses=REUSE_MIN, mean=0.0005)
    (rule,) = advise(_observed(unique)).rules
    assert rule.fingerprints == (unique.id,) and rule.strategy == "none"


def test_a_hot_never_written_table_gets_a_long_ttl_and_quoted_names() -> None:
    hot = _read('SELECT * FROM "Countries"', ("Countries",), hits=HOT_READS, misses=1, mean=0.0002)
    (rule,) = advise(_observed(hot)).rules
    assert rule.tables == ('"Countries"',) and rule.ttl == "10m" and rule.strategy == "lazy"
    assert RuleSet(build_config({"upstream": _URL, "rules": [rule.as_dict()]}).rules, 60).match("public", "Countries")


def test_what_a_rule_keeps_out_and_what_cannot_be_cached() -> None:
    why = "rule says strategy none for public.prices"
    kept_out = _read("SELECT * FROM prices", ("prices",), hits=0, misses=0, bypasses=100, mean=0.01,
                     cacheable=False, reason=why, rule="rules[0] (prices)")  # fmt: skip
    volatile = _read("SELECT random() FROM t", ("t",), hits=0, misses=0, bypasses=100, mean=0.02, cacheable=False,
                     reason="calls random(), which is not immutable")  # fmt: skip
    advice = advise(_observed(kept_out, volatile, writes={"prices": 10}))
    first, second = advice.statements
    assert first.id == kept_out.id and first.would_save_s == pytest.approx(100 * 0.01 * 0.9)
    assert first.advice == "not cached by rules[0] (prices)"
    assert second.would_save_s == 0 and "random()" in second.advice
    assert advise(_observed()).yaml().startswith("rules: []")


# --- statement rules ------------------------------------------------------------------------------------------------


def test_statement_rules_win_over_table_rules() -> None:
    sql = "SELECT * FROM t WHERE id = 1"
    rules = (
        Rule(("t",), 30.0, "none"),
        Rule(fingerprints=(sql,), ttl=600.0, in_transaction="always"),
        Rule(queryids=(42,), strategy="none"),
        Rule(("u",), 10.0, in_transaction="never"),
    )
    ruleset = RuleSet(rules, 60.0)
    assert not ruleset.decide([("public", "t")]).cacheable
    decision = ruleset.decide([("public", "t")], statement_id(sql))
    assert decision.cacheable and decision.ttl == 600.0
    assert decision.rule == f"rules[1] (fingerprint {statement_id(sql)})"
    over_u = ruleset.decide([("public", "u")], statement_id(sql))
    assert over_u.ttl == 600.0 and over_u.in_transaction == "never"  # the stricter of the two
    by_queryid = ruleset.decide([("public", "u")], "0" * 16, 42)
    assert not by_queryid.cacheable and by_queryid.rule == "rules[2] (queryid 42)"
    assert ruleset.decide([("public", "u")], "0" * 16, 43).ttl == 10.0
    assert ruleset.queryids == frozenset({42})


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"ttl": "1m"}, "non-empty list of table names"),
        ({"tables": ["t"], "fingerprints": ["SELECT 1"]}, "not both"),
        ({"fingerprints": [""]}, "fingerprint"),
        ({"queryids": ["x"]}, "integer"),
    ],
)
def test_bad_statement_rules_are_refused(rule: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"upstream": _URL, "rules": [rule]})


# --- before deployment ----------------------------------------------------------------------------------------------


def test_advice_from_pg_stat_statements_rows() -> None:
    statements = [
        ("SELECT name FROM items WHERE id = $1", 500, 0.5),
        ("SELECT name  FROM items\n WHERE id = $1", 100, 0.1),  # other spacing: the same statement id
        ("SELECT count(*) FROM hits WHERE id = $1", 40, 0.04),
        ("UPDATE hits SET n = n + $1 WHERE id = $2", 40, 0.08),
        ("SELECT now()", 10, 0.001),
        ("<insufficient privilege>", 5, 1.0),
    ]
    observed = observed_from("db", statements, [("hits", 0), ("audit", 500)], 120.0)
    by_text = {s.text: s for s in observed.statements}
    assert by_text["SELECT name FROM items WHERE id = ?"].calls == 600
    assert observed.table_writes == {("db", "hits"): 40, ("db", "audit"): 500}
    assert not by_text["SELECT now()"].cacheable
    advice = advise(observed)
    rules = yaml.safe_load(advice.yaml())["rules"]
    assert {"tables": ["hits"], "strategy": "none"} in rules
    assert {"tables": ["items"], "ttl": "10m", "strategy": "lazy"} in rules
    assert advice.statements[0].text == "SELECT name FROM items WHERE id = ?"
    assert advice.statements[0].would_save_s == pytest.approx(0.6)


def test_missing_extension_messages_say_what_to_do() -> None:
    assert "CREATE EXTENSION pg_stat_statements" in not_installed("app")
    assert "shared_preload_libraries" in not_installed("app")
    assert "restart" in not_preloaded("app", "pg_stat_statements must be loaded via shared_preload_libraries")
