"""Reading sqlglot ASTs: tables read and written, functions called, CTEs, SELECT INTO and locking clauses.

This is the only module of the project that imports sqlglot (its internals move between releases: `args["with_"]`
was `args["with"]` before v26, builtins keep being mapped to new node classes). Everything sqlglot-specific, including
the names of its node classes, stays here; the rest of the package works on our own tokens and on `Parsed`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp

from cacheproxy.analysis.lexer import fold, truncate_identifier
from cacheproxy.analysis.model import TableRef

_WITH_KEY = "with_" if "with_" in exp.Select.arg_types else "with"

# sqlglot turns many builtins and operators into its own Func subclasses. These are not function calls in
# PostgreSQL (casts, CASE, ARRAY[...], EXISTS, and operators such as ->, ->>, ~).
_NOT_CALLS = frozenset(
    {
        "Cast",
        "TryCast",
        "Array",
        "Exists",
        "Case",
        "If",
        "Struct",
        "Columns",
        "JSONExtract",
        "JSONExtractScalar",
        "JSONBExtract",
        "JSONBExtractScalar",
        "JSONBContains",
        "JSONBContainedBy",
        "JSONBContainsAnyTopKeys",
        "JSONBContainsAllTopKeys",
        "JSONBDeleteAtPath",
        "RegexpLike",
        "RegexpILike",
        "ArrayContains",
        "ArrayContainsAll",
        "ArrayContainedBy",
        "ArrayOverlaps",
        "Collate",
    }
)

# sqlglot class name -> PostgreSQL function name, where they differ or are worth pinning down.
_PG_NAMES = {
    "Rand": "random",
    "Uuid": "gen_random_uuid",
    "CurrentVersion": "version",
    "CurrentSchema": "current_schema",
    "CurrentUser": "current_user",
    "SessionUser": "session_user",
    "CurrentDate": "current_date",
    "CurrentTime": "current_time",
    "Localtime": "localtime",
    "Localtimestamp": "localtimestamp",
    "GenerateSeries": "generate_series",
    "ExplodingGenerateSeries": "generate_series",
    "GroupConcat": "string_agg",
    "TimeToStr": "to_char",
    "TimestampTrunc": "date_trunc",
    "DateTrunc": "date_trunc",
    "ArrayAgg": "array_agg",
    "Unnest": "unnest",
    "Coalesce": "coalesce",
    "Lower": "lower",
    "Upper": "upper",
    "Count": "count",
}
_CALL_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\(")


@dataclass(slots=True)
class Parsed:
    """What one statement's AST says, in our terms."""

    root: str  # "select" | "insert" | "update" | "delete" | "merge" | "command" | "other"
    reads: set[TableRef] = field(default_factory=set)
    writes: set[TableRef] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    cte_names: set[str] = field(default_factory=set)
    data_modifying_cte: bool = False
    into: TableRef | None = None  # SELECT INTO target
    into_temp: bool = False
    locks: bool = False  # FOR UPDATE / SHARE ...
    command: bool = False  # sqlglot fell back to a generic Command somewhere: it did not understand everything
    casts: set[str] = field(default_factory=set)  # target type names of explicit casts (pg_type.typname when known)
    # Values cast to a date/time type that are not constants: the column names cast, "" for any other expression.
    # Text such as 'now' is read when the cast runs (docs 8.5.1.4), so the result moves with the clock.
    time_casts: set[str] = field(default_factory=set)
    attributes: set[str] = field(default_factory=set)  # names after a qualifier (`x.f`, `(x).f`): maybe f(x)


def parse(sql: str, lexical_calls: frozenset[str] = frozenset()) -> Parsed | str:
    """Parse one statement with sqlglot's postgres dialect; an error message (one line) when it cannot.

    `lexical_calls` are the names our lexer saw written before a "(": they name builtins sqlglot renamed.
    """
    try:
        trees = [t for t in sqlglot.parse(sql, read="postgres") if t is not None]
    except Exception as exc:  # ParseError, TokenError, and the occasional ValueError/RecursionError
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return lines[0][:120]
    if len(trees) != 1:
        return "expected exactly one statement"
    try:
        return _read_tree(trees[0], lexical_calls)
    except Exception as exc:  # an AST shape we did not expect must not break the proxy
        return f"unexpected syntax tree ({type(exc).__name__})"


def _read_tree(tree: exp.Expr, lexical_calls: frozenset[str]) -> Parsed:
    out = Parsed(root=_root_kind(tree))
    targets: set[int] = set()
    for node in tree.find_all(exp.Insert, exp.Update, exp.Delete, exp.Merge):
        target = node.this
        if isinstance(target, exp.Schema):
            target = target.this
        if isinstance(target, exp.Table):
            targets.add(id(target))
    for cte in tree.find_all(exp.CTE):
        name = _alias_name(cte)
        if name is not None:
            out.cte_names.add(name)
        body = cte.this
        if isinstance(body, (exp.Insert, exp.Update, exp.Delete, exp.Merge)) or (
            body is not None and body.find(exp.Insert, exp.Update, exp.Delete, exp.Merge) is not None
        ):
            out.data_modifying_cte = True
    for table in tree.find_all(exp.Table):
        _add_table(out, table, targets)
    for func in tree.find_all(exp.Func):
        name = _function_name(func, lexical_calls)
        if name is not None:
            out.functions.add(name)
    out.functions |= _lost_calls(tree, out, lexical_calls)
    _read_casts(tree, out)
    for column in tree.find_all(exp.Column):
        if column.table and isinstance(column.this, exp.Identifier) and (name := _ident(column.this)) is not None:
            out.attributes.add(name)
    for dot in tree.find_all(exp.Dot):
        if isinstance(dot.expression, exp.Identifier) and (name := _ident(dot.expression)) is not None:
            out.attributes.add(name)
    out.locks = tree.find(exp.Lock) is not None
    out.command = isinstance(tree, exp.Command) or tree.find(exp.Command) is not None
    return out


# Words that stand before "(" in a query without calling anything, other than reserved keywords (which the lexical
# scan already drops): INSERT (cols) in MERGE, SET (cols) = ..., ROWS FROM (...), GROUPING SETS / CUBE / ROLLUP,
# TABLESAMPLE method (args) REPEATABLE (seed), the SQL-standard type words written with a modifier
# (`AS character varying(20)`, `interval second(3)`).
SYNTAX_BEFORE_PAREN = frozenset(
    {"insert", "set", "rows", "sets", "cube", "rollup", "repeatable", "system", "bernoulli", "bit", "char",
     "character", "varchar", "varying", "nchar", "national", "numeric", "decimal", "dec", "float", "precision", "time",
     "timestamp", "interval", "zone", "second", "minute", "hour", "day", "month", "year",
     # type/function-name keywords used as syntax: JOIN (subquery), x LIKE (pattern), x IS (...), TABLESAMPLE
     "join", "cross", "inner", "outer", "natural", "full", "is", "isnull", "notnull", "like", "ilike", "similar",
     "tablesample", "first", "next", "xmlattributes"}
)  # fmt: skip


def _lost_calls(tree: exp.Expr, out: Parsed, lexical_calls: frozenset[str]) -> set[str]:
    """Names written as calls that no node reported: sqlglot maps some builtins to operator or construct classes
    (mod() to Mod, div() to IntDiv, convert(), like(), jsonb_contains(), ...) or renames them (strpos() to
    position(), to_hex() to hex()). The name as written is the function PostgreSQL runs; a relation, CTE or alias
    followed by a column list (`INSERT INTO t (a)`, `WITH c (a) AS`, `FROM f() AS x (a)`) is not a call."""
    lost = {name for name in lexical_calls if name not in out.functions and name not in SYNTAX_BEFORE_PAREN}
    if not lost:
        return lost
    names = out.reads | out.writes
    lost -= {name for _, name in names} | {f"{schema}.{name}" for schema, name in names if schema}
    lost -= out.cte_names
    lost -= {n for alias in tree.find_all(exp.TableAlias) if (n := _ident(alias.this)) is not None}
    return lost


_TIME_TYPES = frozenset(
    getattr(exp.DataType.Type, name)
    for name in ("DATE", "DATE32", "TIME", "TIMETZ", "TIMESTAMP", "TIMESTAMPTZ", "TIMESTAMPLTZ", "TIMESTAMPNTZ",
                 "DATETIME", "DATETIME64", "TSRANGE", "TSTZRANGE", "DATERANGE", "TSMULTIRANGE", "TSTZMULTIRANGE",
                 "DATEMULTIRANGE")
    if hasattr(exp.DataType.Type, name)
)  # fmt: skip
# sqlglot's type names -> pg_type.typname, where they differ (a user cast is matched by its target's typname).
_TYPNAMES = {
    "int": "int4", "integer": "int4", "bigint": "int8", "smallint": "int2", "float": "float4", "double": "float8",
    "real": "float4", "boolean": "bool", "char": "bpchar", "decimal": "numeric", "character varying": "varchar",
    "double precision": "float8",
}  # fmt: skip


def _read_casts(tree: exp.Expr, out: Parsed) -> None:
    derived = bool(out.cte_names) or any(
        isinstance(node.parent, (exp.From, exp.Join, exp.Lateral)) for node in tree.find_all(exp.Subquery, exp.Values)
    )
    for cast in tree.find_all(exp.Cast):
        to = cast.to
        if not isinstance(to, exp.DataType):
            continue
        name = _type_name(to)
        if name:
            out.casts.add(name)
        element = to.expressions[0] if to.this == exp.DataType.Type.ARRAY and to.expressions else to
        if isinstance(element, exp.DataType) and element.this in _TIME_TYPES:
            source = _time_source(cast.this)
            if source is not None:
                # A column of a derived table or CTE may be any expression under the name of a table's column.
                out.time_casts.add("" if derived else source)


def _type_name(to: exp.DataType) -> str | None:
    if to.this == exp.DataType.Type.ARRAY and to.expressions and isinstance(to.expressions[0], exp.DataType):
        to = to.expressions[0]
    if to.this == exp.DataType.Type.USERDEFINED:
        kind = to.args.get("kind")
        text = kind if isinstance(kind, str) else to.sql(dialect="postgres")
        last = text.rsplit(".", 1)[-1]
        return last[1:-1].replace('""', '"') if last.startswith('"') else fold(last)
    low = str(to.this.value if isinstance(to.this, exp.DataType.Type) else to.this).lower()
    return _TYPNAMES.get(low, low)


# E'', N'', U&'', B'', X'' strings are their own classes; all are constants (their text is checked by the lexer).
_CONSTANTS = tuple(
    getattr(exp, name)
    for name in ("Literal", "Null", "Placeholder", "Parameter", "Boolean", "ByteString", "HexString", "BitString",
                 "National", "UnicodeString", "RawString")
    if hasattr(exp, name)
)  # fmt: skip


def _time_source(node: exp.Expr | None) -> str | None:
    """What a date/time cast reads: None for a constant or a parameter (both checked for 'now' elsewhere), a column
    name, or "" for an expression computed when the query runs (`('n' || 'ow')::timestamptz`)."""
    while isinstance(node, (exp.Paren, exp.Cast)):
        node = node.this
    if isinstance(node, _CONSTANTS):
        return None
    if isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier):
        return _ident(node.this)
    return ""


def _root_kind(tree: exp.Expr) -> str:
    if isinstance(tree, (exp.Select, exp.SetOperation, exp.Values, exp.Subquery)):
        return "select"
    for cls, name in ((exp.Insert, "insert"), (exp.Update, "update"), (exp.Delete, "delete"), (exp.Merge, "merge")):
        if isinstance(tree, cls):
            return name
    return "command" if isinstance(tree, exp.Command) else "other"


def _ident(node: object) -> str | None:
    """The folded name of an Identifier (quoted ones kept exactly)."""
    if isinstance(node, exp.Identifier):
        text = str(node.this)
        return truncate_identifier(text if node.quoted else fold(text))
    if isinstance(node, str):
        return truncate_identifier(fold(node))
    return None


def _alias_name(cte: exp.CTE) -> str | None:
    alias = cte.args.get("alias")
    return _ident(alias.this) if isinstance(alias, exp.TableAlias) else None


def _add_table(out: Parsed, table: exp.Table, targets: set[int]) -> None:
    name = _ident(table.this)
    if name is None:  # a table function (Func), ROWS FROM (...), or something we do not read as a relation
        return
    parent = table.parent
    if isinstance(parent, exp.Lock):  # FOR UPDATE OF t: t is already in FROM
        return
    ref: TableRef = (_ident(table.args.get("db")), name)
    if isinstance(parent, exp.Into):
        out.into = ref
        out.into_temp = bool(parent.args.get("temporary"))
        out.writes.add(ref)
        return
    if id(table) in targets:
        out.writes.add(ref)
        return
    if ref[0] is None and _is_cte_reference(table, name):
        return
    out.reads.add(ref)


def _cte_names(with_: exp.With, upto: int | None = None) -> set[str]:
    ctes = with_.expressions if upto is None else with_.expressions[:upto]
    return {n for c in ctes if isinstance(c, exp.CTE) and (n := _alias_name(c)) is not None}


def _is_cte_reference(table: exp.Table, name: str) -> bool:
    """Whether an unqualified `name` at `table` resolves to a CTE in scope (PostgreSQL scoping rules).

    The main query of a WITH sees all its CTEs; a CTE body sees the CTEs before it, or all of them (itself included)
    under WITH RECURSIVE. A reference that no CTE in scope captures is a real relation, even if a CTE elsewhere in
    the statement has the same name.
    """
    node: exp.Expr = table
    parent = node.parent
    while parent is not None:
        if isinstance(parent, exp.With):
            index = next((i for i, c in enumerate(parent.expressions) if c is node), len(parent.expressions))
            visible = _cte_names(parent) if parent.args.get("recursive") else _cte_names(parent, index)
            if name in visible:
                return True
            owner = parent.parent  # its body check must be skipped: we came from inside the WITH
            if owner is None:
                return False
            node, parent = owner, owner.parent
            continue
        with_ = parent.args.get(_WITH_KEY)
        if isinstance(with_, exp.With) and with_ is not node and name in _cte_names(with_):
            return True
        node, parent = parent, parent.parent
    return False


def _function_name(func: exp.Func, lexical_calls: frozenset[str]) -> str | None:
    cls_name = type(func).__name__
    if cls_name in _NOT_CALLS:
        return None
    if isinstance(func, exp.Anonymous):
        name = fold(str(func.name))
    elif cls_name == "CurrentTimestamp":
        # now() and CURRENT_TIMESTAMP are the same node; report what was written
        return "now" if "now" in lexical_calls else "current_timestamp"
    else:
        mapped = _PG_NAMES.get(cls_name)
        if mapped is None:
            mapped = _builtin_name(func, lexical_calls)
        if mapped is None:
            return None
        name = mapped
    schema = _qualifier(func)
    return f"{schema}.{name}" if schema else name


def _qualifier(func: exp.Func) -> str | None:
    parent = func.parent
    if isinstance(parent, exp.Dot) and parent.expression is func:
        q = parent.this
        if isinstance(q, exp.Dot):
            q = q.expression
        if isinstance(q, exp.Column):
            q = q.this
        return _ident(q)
    if isinstance(parent, exp.Table) and parent.this is func:
        return _ident(parent.args.get("db"))
    return None


def _builtin_name(func: exp.Func, lexical_calls: frozenset[str]) -> str | None:
    """The PostgreSQL name of a builtin sqlglot mapped to its own class: as written if we saw it, else generated."""
    # AND / OR are Func subclasses whose sql_names() are "AND" / "OR": `a AND (b OR c)` has `and` written before a
    # parenthesis, so the lexical match below would take the connector for a call of and(). Never a call.
    if isinstance(func, exp.Connector):
        return None
    for candidate in func.sql_names():
        low = candidate.lower()
        if low in lexical_calls:
            return low
    # Operators and connectors (AND, =, ||...) are Func subclasses in sqlglot but call nothing.
    if isinstance(func, exp.Binary | exp.Connector):
        return None
    # Rendered per node, never cached per class: the text depends on the node. Only a rendering of the form
    # name(...) names a function; "a AND pg_catalog.f(x)" once named every later AND's function "pg_catalog".
    try:
        m = _CALL_RE.match(func.sql(dialect="postgres"))
    except Exception:
        return None
    return m.group(1).rsplit(".", 1)[-1].lower() if m else None
