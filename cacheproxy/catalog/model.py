"""Catalog: a frozen picture of one database's relations and functions, as read from pg_catalog (sans-IO).

The cache needs it to answer three questions safely: what a name in a query refers to (and whether it is a plain
table whose changes the proxy can see), which other tables a write may change (inheritance, cascading foreign keys,
triggers and rules), and whether every function a query calls is immutable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

# pg_class.relkind values whose reads the cache can follow: ordinary and partitioned tables (a write names them),
# and materialized views (only REFRESH, which names them, changes their contents).
CACHEABLE_RELKINDS = frozenset("rpm")
RELKIND_NAMES = {
    "r": "table",
    "p": "partitioned table",
    "m": "materialized view",
    "v": "view",
    "f": "foreign table",
    "S": "sequence",
    "i": "index",
    "c": "composite type",
    "t": "TOAST table",
    "I": "partitioned index",
}

# Expressions that sqlglot reports as calls but that are SQL constructs, not pg_proc functions; all immutable
# given their arguments, or dependent only on session state that the cache key includes.
SQL_CONSTRUCTS = frozenset(
    {
        "coalesce",
        "nullif",
        "greatest",
        "least",
        "cast",
        "try_cast",
        "array",
        "row",
        "exists",
        "any",
        "all",
        "some",
        "case",
        "if",
        "current_user",
        "session_user",
        "current_role",
        "user",
        "current_schema",
        "current_catalog",
        "current_database",
    }
)
# SQL's niladic datetime keywords (CURRENT_TIMESTAMP, ...): the analyzer reports them as calls (a result that reads
# them changes with time), but they are no pg_proc function and run no code: they write nothing, set nothing.
SQL_VALUE_FUNCTIONS = frozenset({"current_date", "current_time", "current_timestamp", "localtime", "localtimestamp"})


@dataclass(frozen=True, slots=True)
class Relation:
    schema: str
    name: str
    relkind: str
    # User triggers or rewrite rules, or defaults/checks calling a user function that may write: a write may
    # change other tables we cannot name.
    has_triggers: bool
    row_security: bool = False  # RLS enabled: its policies may read other tables and settings the cache cannot see


@dataclass(frozen=True)
class Catalog:
    """One database's schema as the proxy sees it. Build with `Catalog.build`; never mutated."""

    database: str
    version: int  # bumps on every reload, so that memoized decisions can tell they are stale
    relations: dict[tuple[str, str], Relation]
    by_name: dict[str, tuple[Relation, ...]]  # unqualified name -> every relation of that name (any schema)
    family: dict[str, frozenset[str]]  # table name -> names of its inheritance/partition ancestors and descendants
    cascades: dict[str, frozenset[str]]  # parent table name -> child tables changed by ON DELETE/UPDATE actions
    immutable: frozenset[str]  # function names (and "schema.name") whose every overload is immutable
    system_functions: frozenset[str] = field(default_factory=frozenset)  # defined in pg_catalog
    # Table name -> its point key: the column of a single-column integer primary key shared by every table of that
    # name, none of which has triggers, rules, row security, partitions, inheritance or cascading foreign keys. A
    # write naming one key value then changes that row alone (analysis/points.py).
    point_columns: dict[str, str] = field(default_factory=dict)
    # Code a statement may run without naming it as a call (issue 14, item 2), from `with_hidden_code`. For each: the
    # name it is written by, and whether it may write (a function outside pg_catalog that is not immutable).
    hidden: HiddenCode = field(default_factory=lambda: HiddenCode())
    # Statement fingerprint id -> pg_stat_statements queryid, for the queryids the rules name (read with the catalog:
    # feeds/catalog_loader.py), so that those rules apply to the statements they name.
    queryids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        database: str,
        version: int,
        relations: Iterable[Relation],
        inherits: Iterable[tuple[str, str]],
        cascades: Iterable[tuple[str, str]],
        functions: Iterable[tuple[str, str, bool]],
    ) -> Catalog:
        functions = list(functions)
        """From catalog rows: relations, (child, parent) inheritance pairs, (parent, child) cascading foreign keys,
        and (schema, function name, immutable) per function overload."""
        rels = {(r.schema, r.name): r for r in relations}
        by_name: dict[str, list[Relation]] = {}
        for rel in rels.values():
            by_name.setdefault(rel.name, []).append(rel)
        return cls(
            database=database,
            version=version,
            relations=rels,
            by_name={name: tuple(group) for name, group in by_name.items()},
            family=_families(inherits),
            cascades=_closure(cascades),
            immutable=_immutable(functions),
            system_functions=frozenset(
                name for schema, fn, _ in functions if schema == "pg_catalog" for name in (fn, f"pg_catalog.{fn}")
            ),
        )

    def resolve(self, schema: str | None, name: str) -> tuple[Relation, ...]:
        """Every relation a reference may mean: the exact one when qualified, every schema's when not.

        Taking every schema's relation of that name, rather than guessing the session's search_path, can only make
        the cache more conservative: dependencies and rules are taken over all of them.
        """
        if schema is not None:
            rel = self.relations.get((schema, name))
            return (rel,) if rel else ()
        return self.by_name.get(name, ())

    def function_is_immutable(self, name: str) -> bool:
        return name in self.immutable or name in SQL_CONSTRUCTS

    def may_write(self, function: str) -> bool:
        """A call whose side effects the proxy cannot see: any function not built in (nor immutable)."""
        return not (
            function in self.system_functions or function in SQL_VALUE_FUNCTIONS or self.function_is_immutable(function)
        )

    def write_closure(self, names: Iterable[str]) -> set[str]:
        """Tables whose contents a write to `names` may change: themselves, their inheritance family, cascades.

        Followed to a fixed point: a write through a parent lands in a partition, whose own cascading foreign keys
        change their referencing tables, which may be partitioned in turn.
        """
        out: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in out:
                continue
            out.add(name)
            todo.extend(self.family.get(name, frozenset()))
            todo.extend(self.cascades.get(name, frozenset()))
        return out

    def has_triggers(self, name: str) -> bool:
        return any(rel.has_triggers for rel in self.by_name.get(name, ()))

    def point_key(self, _schema: str | None, name: str) -> str | None:
        """The point key of the tables named `name` (by name, as invalidation is), or None."""
        return self.point_columns.get(name)

    def with_hidden_code(self, hidden: HiddenCode) -> Catalog:
        """This catalog with `hidden`; aggregates whose support functions are not immutable stop being immutable
        (pg_proc marks every aggregate immutable: its transition and final functions decide)."""
        aggregates = {key for schema, name in hidden.aggregates for key in (name, f"{schema}.{name}")}
        return replace(self, hidden=hidden, immutable=self.immutable - aggregates)

    def with_primary_keys(self, keys: Iterable[tuple[str, str, str]]) -> Catalog:
        """This catalog with `point_columns` from (schema, table, column) single-column integer primary keys."""
        by_relation = {(schema, name): column for schema, name, column in keys}
        columns: dict[str, str] = {}
        for name, rels in self.by_name.items():
            found = {by_relation.get((rel.schema, rel.name)) for rel in rels}
            if len(found) != 1 or None in found or self.family.get(name) or self.cascades.get(name):
                continue
            if all(rel.relkind == "r" and not rel.has_triggers and not rel.row_security for rel in rels):
                columns[name] = found.pop()  # type: ignore[assignment]
        return replace(self, point_columns=columns)


@dataclass(frozen=True, slots=True)
class HiddenCode:
    """User objects that run a function where a statement names none, keyed as the analyzer reports them.

    Only objects backed by a function that is not immutable are listed; the bool says it may write (outside
    pg_catalog: the same test as `Catalog.may_write` for a call).
    """

    operators: dict[str, bool] = field(default_factory=dict)  # operator symbol -> may write (any overload)
    casts: dict[str, bool] = field(default_factory=dict)  # explicit cast target pg_type.typname -> may write
    # A cast applied implicitly or in assignment: no SQL text shows it. None, or whether one of them may write.
    implicit_casts: bool | None = None
    row_functions: dict[str, bool] = field(default_factory=dict)  # one-argument functions of a row: `x.f` calls f(x)
    aggregates: frozenset[tuple[str, str]] = frozenset()  # (schema, name) with a non-immutable support function
    writing_views: frozenset[tuple[str, str]] = frozenset()  # views whose query calls a function that may write
    # (schema, relation) -> column -> True when its type cannot hold text ('now' cast to a date/time type)
    columns: dict[tuple[str, str], dict[str, bool]] = field(default_factory=dict)


def _families(inherits: Iterable[tuple[str, str]]) -> dict[str, frozenset[str]]:
    # Connected components of the inheritance graph: a write to a partition changes what its parent returns, and
    # a write through the parent lands in partitions.
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for child, par in inherits:
        parent[find(child)] = find(par)
    groups: dict[str, set[str]] = {}
    for name in list(parent):
        groups.setdefault(find(name), set()).add(name)
    return {name: frozenset(group - {name}) for group in groups.values() for name in group}


def _closure(edges: Iterable[tuple[str, str]]) -> dict[str, frozenset[str]]:
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)
    result: dict[str, frozenset[str]] = {}
    for start in graph:
        seen: set[str] = set()
        stack = list(graph[start])
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(graph.get(node, ()))
        result[start] = frozenset(seen - {start})
    return result


def _immutable(functions: Iterable[tuple[str, str, bool]]) -> frozenset[str]:
    verdict: dict[str, bool] = {}
    for schema, name, immutable in functions:
        for key in (name, f"{schema}.{name}"):
            verdict[key] = verdict.get(key, True) and immutable
    return frozenset(key for key, ok in verdict.items() if ok)
