"""What a write invalidates (policy.verdict.write_scope over a hand-built Catalog): no server needed.

Each case is a statement as the analyzer sees it and a catalog shaped like the schema of the matching integration
case in tests/integration/test_invalidation_cases.py.
"""

from __future__ import annotations

import pytest

from cacheproxy.analysis import analyze
from cacheproxy.catalog.model import Catalog, Relation
from cacheproxy.config import Rule
from cacheproxy.policy.rules import RuleSet
from cacheproxy.policy.verdict import WriteScope, judge_read, write_scope

RULES = RuleSet((Rule(tables=("public.audit_log",), strategy="none"),), default_ttl=60.0)


def _catalog() -> Catalog:
    return Catalog.build(
        "app",
        1,
        relations=[
            Relation("public", "items", "r", False),
            Relation("public", "items_view", "v", True),  # a view: its _RETURN rule sets relhasrules
            Relation("public", "items_mv", "m", False),
            # Partitions, two levels: measures -> measures_2024 -> measures_2024_q1; measures_2025.
            Relation("public", "measures", "p", False),
            Relation("public", "measures_2024", "p", False),
            Relation("public", "measures_2024_q1", "r", False),
            Relation("public", "measures_2025", "r", False),
            # Inheritance.
            Relation("public", "cities", "r", False),
            Relation("public", "capitals", "r", False),
            # Foreign keys: orders -> lines (cascade) -> line_notes (cascade); orders -> lines_null (set null).
            Relation("public", "orders", "r", False),
            Relation("public", "lines", "r", False),
            Relation("public", "line_notes", "r", False),
            Relation("public", "lines_null", "r", False),
            # A foreign key to a partition: writes through the parent delete rows of the partition.
            Relation("public", "measure_tags", "r", False),
            # Triggers: audited (trigger writes audit_log); lines_logged is a cascade target with a trigger;
            # events is partitioned, only its partition events_1 has a trigger.
            Relation("public", "audited", "r", True),
            Relation("public", "audit_log", "r", False),
            Relation("public", "customers", "r", False),
            Relation("public", "lines_logged", "r", True),
            Relation("public", "events", "p", False),
            Relation("public", "events_1", "r", True),
            # The same name in two schemas, and quoted names.
            Relation("s1", "t", "r", False),
            Relation("s2", "t", "r", False),
            Relation("public", "Mixed Case", "r", False),
            Relation("public", "mixed case", "r", False),
            Relation("public", "secret", "r", False, row_security=True),
        ],
        inherits=[
            ("measures_2024", "measures"),
            ("measures_2024_q1", "measures_2024"),
            ("measures_2025", "measures"),
            ("capitals", "cities"),
            ("events_1", "events"),
        ],
        cascades=[
            ("orders", "lines"),
            ("lines", "line_notes"),
            ("orders", "lines_null"),
            ("measures_2025", "measure_tags"),
            ("customers", "lines_logged"),
        ],
        functions=[
            ("pg_catalog", "lower", True),
            ("pg_catalog", "now", False),
            ("public", "bump", False),
            ("public", "pure_fn", True),
        ],
    )


CATALOG = _catalog()


def _scope(sql: str, catalog: Catalog | None = CATALOG) -> WriteScope:
    return write_scope(analyze(sql), catalog)


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("UPDATE items SET name = 'x' WHERE id = 1", {"items"}),
        ("INSERT INTO items VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name", {"items"}),
        ("MERGE INTO items i USING orders o ON i.id = o.id WHEN MATCHED THEN DELETE", {"items"}),
        ("COPY items FROM STDIN", {"items"}),
        ("COPY items (id, name) FROM STDIN WITH (FORMAT csv)", {"items"}),
        ("WITH x AS (UPDATE items SET name = 'x' RETURNING id) SELECT id FROM x", {"items"}),
        ("TRUNCATE items", {"items"}),
        # Partitions and inheritance: the whole family, both ways, across levels.
        (
            "INSERT INTO measures_2024_q1 VALUES (1)",
            {"measures", "measures_2024", "measures_2024_q1", "measures_2025", "measure_tags"},
        ),
        ("DELETE FROM capitals", {"cities", "capitals"}),
        ("UPDATE ONLY cities SET name = 'x'", {"cities", "capitals"}),
        # Cascading foreign keys, transitively.
        ("DELETE FROM orders WHERE id = 1", {"orders", "lines", "line_notes", "lines_null"}),
        ("UPDATE lines SET id = 2 WHERE id = 1", {"lines", "line_notes"}),
        ("DELETE FROM line_notes", {"line_notes"}),
        # Schema-qualified and search_path writes both invalidate the name, whatever the schema.
        ("UPDATE s1.t SET v = 1", {"t"}),
        ("UPDATE t SET v = 1", {"t"}),
        # Quoted names are kept exactly; unquoted ones fold to lower case.
        ('UPDATE "Mixed Case" SET v = 1', {"Mixed Case"}),
        ('UPDATE "mixed case" SET v = 1', {"mixed case"}),
        # A table the catalog does not know (created after it was read) is still named.
        ("INSERT INTO brand_new VALUES (1)", {"brand_new"}),
        # An immutable function in a write does not widen it.
        ("UPDATE items SET name = lower(name) WHERE id = pure_fn(1)", {"items"}),
    ],
)
def test_writes_invalidate_their_closure(sql: str, tables: set[str]) -> None:
    scope = _scope(sql)
    assert not scope.everything, scope.why
    assert scope.tables == tables


def test_a_write_through_the_parent_reaches_the_foreign_keys_of_its_partitions() -> None:
    # DELETE FROM measures deletes rows of measures_2025, whose ON DELETE CASCADE foreign key changes measure_tags.
    # The closure once applied cascades of the written names only, not of the family it had just added.
    assert "measure_tags" in _scope("DELETE FROM measures").tables


def test_a_write_to_a_materialized_views_base_table_leaves_the_view_alone() -> None:
    # Only REFRESH changes a materialized view's contents: its entries stay valid after a base table write.
    assert "items_mv" not in _scope("UPDATE items SET name = 'x'").tables
    refresh = _scope("REFRESH MATERIALIZED VIEW items_mv")
    assert refresh.everything and refresh.ddl


@pytest.mark.parametrize(
    ("sql", "code"),
    [
        ("INSERT INTO audited VALUES (1)", "triggers"),
        # The trigger is on a cascade target: a DELETE of customers deletes lines_logged rows, firing it.
        ("DELETE FROM customers WHERE id = 1", "triggers"),
        # The trigger is on a partition only: an INSERT through the parent is routed there and fires it.
        ("INSERT INTO events VALUES (1)", "triggers"),
        ("TRUNCATE orders CASCADE", "unknown_effects"),
        ("DO $$BEGIN UPDATE items SET name = 'x'; END$$", "unknown_effects"),
        ("CALL refresh_all()", "unknown_effects"),
        ("SELECT bump()", "function_call"),
        ("SELECT * FROM bump()", "function_call"),
        ("INSERT INTO items VALUES (bump(), 'x')", "function_call"),
        ("SELECT unknown_fn(1)", "function_call"),
        ("ALTER TABLE items ADD COLUMN extra int", "ddl"),
        ("DROP TABLE items", "ddl"),
        ("CREATE TABLE items (id int)", "ddl"),
        ("GRANT SELECT ON items TO alice", "ddl"),
        ("REVOKE SELECT ON items FROM alice", "ddl"),
        ("ALTER POLICY p ON secret USING (true)", "ddl"),
        ("ALTER TABLE items ENABLE ROW LEVEL SECURITY", "ddl"),
        ("CREATE POLICY p ON items USING (id > 1)", "ddl"),
        ("COMMIT PREPARED 'gid'", "unknown_effects"),
    ],
)
def test_writes_whose_effects_cannot_be_named_invalidate_the_database(sql: str, code: str) -> None:
    scope = _scope(sql)
    assert scope.everything and scope.code == code, scope


def test_ddl_asks_for_a_catalog_reload() -> None:
    assert _scope("ALTER TABLE items ADD COLUMN extra int").ddl
    assert not _scope("UPDATE items SET name = 'x'").ddl


@pytest.mark.parametrize(
    "sql",
    ["SELECT name FROM items", "SELECT lower(name) FROM items WHERE id = pure_fn(2)", "BEGIN", "COMMIT", "ROLLBACK",
     "SET search_path = s1", "SELECT now()"],
)  # fmt: skip
def test_reads_and_control_statements_invalidate_nothing(sql: str) -> None:
    assert _scope(sql).empty


def test_without_a_catalog_a_write_may_reach_anything() -> None:
    # Cascades and triggers are unknown: naming only the written table would leave its cascade targets stale (in a
    # fill that starts once the catalog lands, and in the other proxies, which apply what is published as it is).
    scope = _scope("DELETE FROM orders WHERE id = 1", None)
    assert scope.everything and scope.code == "unknown_effects"
    assert _scope("DO $$BEGIN END$$", None).everything
    assert _scope("SELECT name FROM items", None).empty


@pytest.mark.parametrize(
    ("sql", "depends"),
    [
        ("SELECT * FROM measures", {"measures", "measures_2024", "measures_2024_q1", "measures_2025"}),
        ("SELECT * FROM measures_2024_q1", {"measures", "measures_2024", "measures_2024_q1", "measures_2025"}),
        ("SELECT * FROM items_mv", {"items_mv"}),
        ("SELECT v FROM t", {"t"}),
        ("SELECT v FROM s2.t", {"t"}),
        ('SELECT v FROM "Mixed Case"', {"Mixed Case"}),
    ],
)
def test_reads_depend_on_what_the_writes_name(sql: str, depends: set[str]) -> None:
    verdict = judge_read(analyze(sql), CATALOG, RULES)
    assert verdict.cacheable, verdict.reason
    assert verdict.tables == depends


@pytest.mark.parametrize("sql", ["SELECT * FROM items_view", "SELECT * FROM secret", "SELECT bump()"])
def test_reads_the_cache_cannot_follow_are_not_cached(sql: str) -> None:
    assert not judge_read(analyze(sql), CATALOG, RULES).cacheable


@pytest.mark.parametrize(
    "sql",
    [
        # Every write's closure contains what every read of an affected table depends on: the invariant that the
        # name-based index relies on.
        "INSERT INTO measures_2025 VALUES (1)",
        "DELETE FROM orders",
        "UPDATE capitals SET name = 'x'",
    ],
)
def test_every_affected_read_is_invalidated(sql: str) -> None:
    scope = _scope(sql)
    for name in scope.tables:
        for rel in CATALOG.resolve(None, name):
            if rel.relkind in "rpm" and not rel.row_security:
                verdict = judge_read(analyze(f'SELECT * FROM "{rel.schema}"."{name}"'), CATALOG, RULES)
                assert verdict.tables & scope.tables, name
