"""The verdict on one statement: may its result be cached (and under which rule), and what does it invalidate.

Static analysis (cacheproxy.analysis) says what a statement is; the catalog says what its names are; the rules say
what the operator wants. All three must agree before a result is stored: when unsure, the answer is no.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cacheproxy.analysis.model import UNKNOWN_TABLE, Kind, QueryInfo, TxOp
from cacheproxy.catalog.model import CACHEABLE_RELKINDS, RELKIND_NAMES, Catalog
from cacheproxy.policy.rules import RuleSet

UNKNOWN_TARGET: Final = UNKNOWN_TABLE[1]


@dataclass(slots=True, unsafe_hash=True)
class ReadVerdict:
    """For a read: cacheable or why not; the table names its result depends on; the TTL and rule."""

    cacheable: bool
    reason: str | None
    tables: frozenset[str] = frozenset()
    ttl: float = 0.0
    rule: str = ""
    strategy: str = "lazy"
    in_transaction: str = "until_write"  # may it be served inside a transaction block (see config.Rule)
    stale_if_error: float = 0.0  # served this long past expiry while the upstream cannot be reached (0: never)

    def __init__(
        self,
        cacheable: bool,
        reason: str | None,
        tables: frozenset[str] = frozenset(),
        ttl: float = 0.0,
        rule: str = "",
        strategy: str = "lazy",
        in_transaction: str = "until_write",
        stale_if_error: float = 0.0,
    ) -> None:
        self.cacheable = cacheable
        self.reason = reason
        self.tables = tables
        self.ttl = ttl
        self.rule = rule
        self.strategy = strategy
        self.in_transaction = in_transaction
        self.stale_if_error = stale_if_error


@dataclass(slots=True, unsafe_hash=True)
class WriteScope:
    """What a statement may have changed: named tables, or everything in the database (`everything`)."""

    tables: frozenset[str]
    everything: bool
    why: str | None = None
    ddl: bool = False  # the schema may have changed: the catalog must be read again once it is committed
    code: str = "other"  # for metrics, when `everything`: ddl | unknown_effects | triggers | function_call | other

    def __init__(
        self, tables: frozenset[str], everything: bool, why: str | None = None, ddl: bool = False, code: str = "other"
    ) -> None:
        self.tables = tables
        self.everything = everything
        self.why = why
        self.ddl = ddl
        self.code = code

    @property
    def empty(self) -> bool:
        return not self.tables and not self.everything


NOTHING: Final = WriteScope(frozenset(), False)


def judge_read(info: QueryInfo, catalog: Catalog, rules: RuleSet, statement: str | None = None) -> ReadVerdict:
    """`statement`: the statement's fingerprint id (advice/statements.py), for the rules that name statements."""
    if info.kind is not Kind.READ:
        return ReadVerdict(False, info.reason or f"not a read ({info.kind.name.lower()})")
    if not info.cacheable:
        return ReadVerdict(False, info.reason)
    for function in sorted(info.functions):
        if not catalog.function_is_immutable(function):
            return ReadVerdict(False, f"calls {function}(), which is not immutable")
    hidden = hidden_code(info, catalog)
    if hidden is not None:
        return ReadVerdict(False, hidden[0])
    qualified: set[tuple[str, str]] = set()
    depends: set[str] = set()
    for schema, name in info.reads:
        relations = catalog.resolve(schema, name)
        shown = f"{schema}.{name}" if schema else name
        if not relations:
            return ReadVerdict(False, f"relation {shown} is not in the catalog")
        for rel in relations:
            if rel.row_security:
                return ReadVerdict(False, f"{rel.schema}.{rel.name} has row-level security, whose policies may read "
                                   "other tables and settings")  # fmt: skip
            if rel.relkind not in CACHEABLE_RELKINDS:
                kind = RELKIND_NAMES.get(rel.relkind, rel.relkind)
                return ReadVerdict(False, f"reads {kind} {rel.schema}.{rel.name}, whose changes the cache cannot see")
            qualified.add((rel.schema, rel.name))
            depends.add(rel.name)
            depends |= catalog.family.get(rel.name, frozenset())
    for column in sorted(info.time_casts):
        if not _time_safe(column, qualified, catalog):
            return ReadVerdict(False, f"casts {column} to a date/time type, and it may hold text such as 'now'")
    queryid = catalog.queryids.get(statement) if statement is not None and catalog.queryids else None
    decision = rules.decide(qualified, statement, queryid)
    if not decision.cacheable:
        return ReadVerdict(False, decision.reason, rule=decision.rule)
    return ReadVerdict(
        True,
        None,
        frozenset(depends),
        decision.ttl,
        decision.rule,
        decision.strategy,
        decision.in_transaction,
        decision.stale_if_error,
    )


def write_scope(info: QueryInfo, catalog: Catalog | None) -> WriteScope:
    """What to invalidate after `info` runs. DDL, DO, CALL and calls to functions with unknown effects: everything."""
    if info.tx is not None and info.tx.op in (TxOp.COMMIT_PREPARED, TxOp.ROLLBACK_PREPARED):
        # The prepared transaction's writes were seen in another session, maybe another process: name them all.
        return WriteScope(frozenset(), True, "COMMIT PREPARED", code="unknown_effects")
    if info.kind is Kind.DDL or any(s.kind is Kind.DDL for s in info.statements):
        return WriteScope(frozenset(), True, "DDL", ddl=True, code="ddl")
    if catalog is not None:
        for function in sorted(info.functions):
            if catalog.may_write(function):
                return WriteScope(frozenset(), True, f"calls {function}(), which may write", code="function_call")
        hidden = hidden_code(info, catalog)
        if hidden is not None and hidden[1]:
            return WriteScope(frozenset(), True, f"{hidden[0]}, which may write", code="function_call")
    names = {name for _, name in info.writes}
    if not names:
        return NOTHING
    if UNKNOWN_TARGET in names:
        return WriteScope(frozenset(), True, "write to a table the analyzer could not name", code="unknown_effects")
    if catalog is None:
        # Not loaded yet (or unreadable): the tables a cascade or a trigger reaches are unknown. Nothing of this
        # database is cached here then, but a fill may start as soon as the catalog lands while this write is in
        # flight, and other proxies apply what is published as it is.
        why = "the catalog is not loaded: what the write reaches is unknown"
        return WriteScope(frozenset(), True, why, code="unknown_effects")
    closure = catalog.write_closure(names)
    # Every table the write may reach, not only those it names: a cascade target's or a partition's trigger fires too.
    for name in sorted(closure):
        if catalog.has_triggers(name):
            return WriteScope(frozenset(), True, f"{name} has triggers or rules", code="triggers")
    return WriteScope(frozenset(closure), False)


def hidden_code(info: QueryInfo, catalog: Catalog) -> tuple[str, bool] | None:
    """Code `info` may run without naming it as a call, found in the catalog: (what, whether it may write), the
    writing kind first; None when there is none. Views that may write, user operators and casts backed by functions
    that are not immutable, functions called in attribute notation (`x.f` is f(x) when x has no column f), and user
    casts applied implicitly (no SQL text shows them: every statement of the database is taken to run them)."""
    code = catalog.hidden
    found: list[tuple[str, bool]] = []
    for schema, name in sorted(info.reads, key=lambda r: (r[0] or "", r[1])):
        for rel in catalog.resolve(schema, name):
            if (rel.schema, rel.name) in code.writing_views:
                found.append((f"reads view {rel.schema}.{rel.name}, whose query calls a function", True))
    if info.names:  # a read the analyzer could not parse: any name in it may be a view
        for schema, name in sorted(code.writing_views):
            if name in info.names:
                found.append((f"may read view {schema}.{name}, whose query calls a function", True))
    # dict keys first: `frozenset & keys` returns a set (keys' __rand__), not the frozenset typeshed declares, and
    # compiled code checks the declared type.
    for symbol in sorted(code.operators.keys() & info.operators):
        found.append((f"uses operator {symbol}, whose function is not immutable", code.operators[symbol]))
    for target in sorted(code.casts.keys() & info.casts):
        found.append((f"casts to {target} by a function that is not immutable", code.casts[target]))
    for name in sorted(code.row_functions.keys() & info.attributes):
        found.append((f"may call {name}() in attribute notation (x.{name}), which is not immutable",
                      code.row_functions[name]))  # fmt: skip
    if code.implicit_casts is not None:
        found.append(("the database has an implicit or assignment cast whose function is not immutable",
                      code.implicit_casts))  # fmt: skip
    if not found:
        return None
    return max(found, key=lambda item: item[1])  # one that may write, if any


def _time_safe(column: str, relations: set[tuple[str, str]], catalog: Catalog) -> bool:
    """Whether `column`, cast to a date/time type, is a column of a relation read whose type cannot hold text (in
    every relation read that has a column of that name). A name no relation has is a computed value: unsafe."""
    kinds = [cols[column] for rel in relations if (cols := catalog.hidden.columns.get(rel)) and column in cols]
    return bool(kinds) and all(kinds)
