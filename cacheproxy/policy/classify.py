"""Classification, pure: a statement's analysis judged under a catalog and the rules (Classified), the rows a point
read or write names, what a result depends on, and the rows a write invalidates. No I/O, no wire protocol: a
parameter's bytes are read through the `ParameterReader` the caller's protocol gives."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cacheproxy.advice.workload import StatementStats
from cacheproxy.analysis.model import Kind, QueryInfo
from cacheproxy.analysis.points import KeyOf, Operand, Point, read_point, write_point
from cacheproxy.cache.entry import TableId, any_row, database_id, row_id
from cacheproxy.catalog.model import Catalog
from cacheproxy.policy.rules import RuleSet
from cacheproxy.policy.verdict import ReadVerdict, WriteScope, judge_read

# Statements longer than this are not analyzed: the analyzer is pure Python (a few µs per byte) and runs on the event
# loop, so a multi-megabyte bulk INSERT would stall every session. Such statements are never cached, and count as
# writing anything: the whole database is invalidated after them.
MAX_ANALYZED_BYTES: Final = 16 * 1024
NO_CATALOG: Final = ReadVerdict(False, "the catalog of this database is not loaded (yet)")

# (arguments of a bound statement, parameter number from 1) -> (format, value or None for NULL), or None when there
# is no such parameter. For PostgreSQL: protocol.frontend.bind_parameter over a Bind's arguments.
ParameterReader = Callable[[bytes, int], tuple[int, bytes | None] | None]
# (a statement's text, whether it writes, the catalog's point keys) -> its point, as analysis.points.read_point or
# write_point would find it (the caller may know it without lexing the text: analysis.points.PointTemplates).
PointFinder = Callable[[str, bool, KeyOf], Point | None]


def lex_point(text: str, write: bool, key_of: KeyOf) -> Point | None:
    """The default PointFinder: the text lexed."""
    return write_point(text, key_of) if write else read_point(text, key_of)


@dataclass(slots=True, unsafe_hash=True)
class Classified:
    """A statement's analysis and, for reads, the verdict under the catalog version it was judged with.

    `point`: a cacheable read, or a write, of one row by its key (analysis/points.py); `point_tables`: the tables
    the verdict depends on that have a point key (their entries carry row-level dependencies: `dependencies`)."""

    info: QueryInfo
    verdict: ReadVerdict
    catalog_version: int
    point: Point | None = None
    point_tables: frozenset[str] = frozenset()
    statement: str | None = None  # its fingerprint id (advice/statements.py), as rules and advice name it
    # Its counters for the advisor (advice/workload.py), shared by every text of its fingerprint: a hit adds one.
    stats: StatementStats | None = None

    def __init__(
        self,
        info: QueryInfo,
        verdict: ReadVerdict,
        catalog_version: int,
        point: Point | None = None,
        point_tables: frozenset[str] = frozenset(),
        statement: str | None = None,
        stats: StatementStats | None = None,
    ) -> None:
        self.info = info
        self.verdict = verdict
        self.catalog_version = catalog_version
        self.point = point
        self.point_tables = point_tables
        self.statement = statement
        self.stats = stats


def classify(
    sql: bytes,
    info: QueryInfo,
    catalog: Catalog | None,
    rules: RuleSet,
    *,
    points: bool = True,
    statement: str | None = None,
    stats: StatementStats | None = None,
    verdict: ReadVerdict | None = None,
    find_point: PointFinder = lex_point,
) -> Classified:
    """Judge `info` (the analysis of `sql`) under `catalog` (None: not loaded, nothing is cacheable) and `rules`.
    `points`: look for row-level points (read from `sql` as UTF-8 with standard strings); `statement`: its
    fingerprint id, for statement rules; `stats`: its advisor counters, carried along. `verdict`: judge_read's
    verdict for this very `info`, catalog, rules and statement, already known (it depends on nothing else).
    `find_point`: how its row-level point is read from its text."""
    if verdict is None:
        verdict = judge_read(info, catalog, rules, statement) if catalog is not None else NO_CATALOG
    version = catalog.version if catalog is not None else -1
    if not points:
        return Classified(info, verdict, version, statement=statement, stats=stats)
    point, point_tables = _points(sql, info, verdict, catalog, find_point)
    return Classified(info, verdict, version, point, point_tables, statement, stats)


def _points(
    sql: bytes, info: QueryInfo, verdict: ReadVerdict, catalog: Catalog | None, find_point: PointFinder
) -> tuple[Point | None, frozenset[str]]:
    """What `classify` records for row-level invalidation (see Classified)."""
    if catalog is None or not catalog.point_columns or info.statement_count != 1 or len(sql) > MAX_ANALYZED_BYTES:
        return None, frozenset()
    if verdict.cacheable:
        point_tables = frozenset(name for name in verdict.tables if name in catalog.point_columns)
        if not point_tables or len(info.reads) != 1:
            return None, point_tables
        point = find_point(sql.decode("utf-8", "replace"), False, catalog.point_key)
        return (point if point is not None and (point.schema, point.table) in info.reads else None), point_tables
    if info.kind is Kind.WRITE and len(info.writes) == 1:
        point = find_point(sql.decode("utf-8", "replace"), True, catalog.point_key)
        return (point if point is not None and (point.schema, point.table) in info.writes else None), frozenset()
    return None, frozenset()


def dependencies(
    database: str,
    classified: Classified,
    arguments: bytes | None = None,
    param_types: tuple[int, ...] = (),
    read: ParameterReader | None = None,
) -> frozenset[TableId]:
    """What a result of `classified` (bound with `arguments`, read by `read`) depends on: each table, and for
    tables with a point key, the row it reads (a point read whose key is known) or "any row"; and always the
    database itself (`database_id`: its catalog), so that invalidating the database drops it."""
    tables = classified.verdict.tables
    if not classified.point_tables:
        return frozenset((database_id(database), *((database, name) for name in tables)))
    point = classified.point
    key = point_value(point.values[0], arguments, param_types, read) if point is not None else None
    out = {database_id(database), *((database, name) for name in tables)}
    for name in classified.point_tables:
        row = row_id(name, key) if key is not None and point is not None and name == point.table else any_row(name)
        out.add((database, row))
    return frozenset(out)


def shape_dependencies(database: str, classified: Classified) -> frozenset[TableId]:
    """What a statement's Describe (its RowDescription and parameter type OIDs) depends on: the tables' shape, not
    their rows (a write to one row leaves it), and the database's catalog (types may be dropped and made again with
    other OIDs: DROP/CREATE EXTENSION)."""
    return frozenset((database_id(database), *((database, name) for name in classified.verdict.tables)))


def row_scope(
    classified: Classified,
    scope: WriteScope,
    arguments: bytes | None,
    param_types: tuple[int, ...],
    read: ParameterReader | None = None,
) -> WriteScope:
    """Narrow a write's scope to the rows it names, when it is a point write (one table, keys known)."""
    point = classified.point
    if point is None or scope.everything or scope.tables != {point.table}:
        return scope
    keys = [point_value(operand, arguments, param_types, read) for operand in point.values]
    if any(key is None for key in keys):
        return scope
    rows = {row_id(point.table, key) for key in keys if key is not None}
    return WriteScope(frozenset({*rows, any_row(point.table)}), False, scope.why, code=scope.code)


# Declared parameter types a point key may be given as: unspecified (the server infers the key's type), int2/4/8.
_INT_PARAM_TYPES: Final = frozenset({0, 20, 21, 23})
_INT_SIZES: Final = {21: 2, 23: 4, 20: 8}  # int2, int4, int8
_TEXT_INT: Final = re.compile(rb"\s*[+-]?[0-9]+\s*")


def point_value(
    operand: Operand, arguments: bytes | None, param_types: tuple[int, ...], read: ParameterReader | None = None
) -> int | None:
    """The integer a point statement's key operand stands for: its literal, or its bound parameter read as the
    server reads an integer (text: optional spaces and sign, ASCII digits; binary: 2, 4 or 8 bytes); None when it
    cannot be known (no parameters, NULL, another type): the caller then assumes any row."""
    if operand.literal is not None:
        return operand.literal
    if operand.param is None or arguments is None or read is None:
        return None
    declared = param_types[operand.param - 1] if operand.param <= len(param_types) else 0
    found = read(arguments, operand.param)
    if declared not in _INT_PARAM_TYPES or found is None:
        return None
    fmt, raw = found
    if raw is None:
        return None
    if fmt == 0 and _TEXT_INT.fullmatch(raw):
        return int(raw)
    if fmt == 1 and _INT_SIZES.get(declared) == len(raw):
        # Only a declared integer type: with none, the server may have inferred float8 or numeric from another use
        # of the parameter, whose binary form is not an integer's.
        return int.from_bytes(raw, "big", signed=True)
    return None
