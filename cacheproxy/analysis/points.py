"""Point statements: reads and writes that touch one row of one table, named by an equality on a column.

`SELECT ... FROM t WHERE id = 5` depends on the row of `t` whose primary key is 5 and on nothing else of `t`;
`UPDATE t SET ... WHERE id = 5` changes only that row. When the catalog confirms that `id` is the single-column
integer primary key of every table named `t` (no triggers, partitions, inheritance or cascading foreign keys: see
catalog.model.Catalog.point_column), a write invalidates only the entries of that row, plus the entries of `t` that
are not point reads, instead of every entry of `t` (policy and cache keys: cacheproxy.cache.keys.row_id).

This module only recognises the shapes, from tokens, deliberately narrowly: one statement, one table, no subquery,
no CTE, and an equality that is a top-level conjunct of WHERE (no OR, CASE or BETWEEN at the top level, which would
make splitting on AND unsound). Anything else is not a point statement, and is handled per table as before; a wrong
"no" costs hit rate, a wrong "yes" would serve stale rows, so every doubt is a "no".

    >>> key = lambda schema, table: "id"
    >>> read_point("SELECT v FROM t WHERE id = $1", key)
    Point(schema=None, table='t', column='id', values=(Operand(literal=None, param=1),))
    >>> write_point("UPDATE t SET v = v + 1 WHERE id = 7 AND v > 0 RETURNING v", key).values
    (Operand(literal=7, param=None),)
    >>> write_point("UPDATE t SET v = 1 WHERE id = 7 OR id = 8", key) is None
    True
    >>> write_point("INSERT INTO t (id, v) VALUES (1, 'a'), ($1, $2) ON CONFLICT (id) DO UPDATE SET v = 'b'", key)
    Point(schema=None, table='t', column='id', values=(Operand(literal=1, param=None), Operand(literal=None, param=1)))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

from cacheproxy.analysis.lexer import (
    NUMBER,
    OP,
    PARAM,
    QIDENT,
    WORD,
    Token,
    ident_value,
    is_unicode_ident,
    is_word,
    tokenize,
)

_INT_TYPES: Final = frozenset({"int", "int2", "int4", "int8", "integer", "bigint", "smallint"})
# Words that end a WHERE clause at the top level.
_WHERE_END: Final = frozenset({"order", "group", "having", "limit", "offset", "window", "fetch", "for", "returning"})
# Words that bring other rows in (set operations, `TABLE t` subqueries): a statement with any of them is not a point.
_OTHER_ROWS: Final = frozenset({"union", "intersect", "except", "table"})
# Words that make splitting a WHERE clause on AND unsound, or add rows: a point equality must be a true conjunct.
_WHERE_REJECT: Final = frozenset({"or", "case", "between"})


class Operand(NamedTuple):
    """The value compared with the key column: an integer literal, or a parameter ($n, 1-based)."""

    literal: int | None
    param: int | None


# (schema as written or None, table) -> the table's point key column, or None when it has none.
KeyOf = Callable[[str | None, str], str | None]


class Point(NamedTuple):
    """A statement's table (schema as written, or None), its key column, and the key values it names."""

    schema: str | None
    table: str
    column: str
    values: tuple[Operand, ...]


def read_point(sql: str, key_of: KeyOf) -> Point | None:
    """`SELECT <list> FROM <table> [[AS] alias] WHERE ... <key> = <value> ... [ORDER BY / LIMIT ...]`."""
    tokens = _statement(sql)
    if tokens is None or not is_word(tokens[0], "select") or _count_words(tokens, "select", "from") != (1, 1):
        return None
    start = _find_word(tokens, "from", 0)
    if start is None:
        return None
    table, alias, i = _table_and_alias(tokens, start + 1)
    if table is None or i >= len(tokens) or not is_word(tokens[i], "where"):
        return None
    key = key_of(*table)
    operand = _where_equality(tokens, i + 1, table[1], alias, key) if key is not None else None
    return Point(table[0], table[1], key, (operand,)) if key is not None and operand is not None else None


def write_point(sql: str, key_of: KeyOf) -> Point | None:
    """An UPDATE or DELETE of one row by an equality on the key (an UPDATE must not assign the key), or an INSERT of
    rows whose keys are literals or parameters (ON CONFLICT: DO NOTHING, or DO UPDATE on the key alone)."""
    tokens = _statement(sql)
    if tokens is None or _count_words(tokens, "select")[0] != 0:
        return None
    if is_word(tokens[0], "update"):
        return _update(tokens, key_of)
    if is_word(tokens[0], "delete"):
        return _delete(tokens, key_of)
    if is_word(tokens[0], "insert"):
        return _insert(tokens, key_of)
    return None


# -- statements ---------------------------------------------------------------------------------------------------


def _statement(sql: str) -> list[Token] | None:
    tokens = tokenize(sql)
    while tokens and tokens[-1].kind == OP and tokens[-1].text == ";":
        tokens.pop()
    if not tokens or any(t.kind == OP and t.text == ";" for t in tokens):
        return None  # empty, or several statements
    if any(t.kind == WORD and t.sub in _OTHER_ROWS for t in tokens):
        return None
    if any(t.kind == QIDENT and is_unicode_ident(t.text) for t in tokens):
        return None  # U&"..." names are kept as written, so they could name the key unseen
    return tokens


def _update(tokens: list[Token], key_of: KeyOf) -> Point | None:
    table, alias, i = _table_and_alias(tokens, 1)
    if table is None or i >= len(tokens) or not is_word(tokens[i], "set") or (key := key_of(*table)) is None:
        return None
    where = _find_word(tokens, "where", i)
    if where is None or _find_word(tokens[:where], "from", i) is not None:
        return None  # no WHERE, or UPDATE ... FROM (rows chosen by a join)
    targets = _set_targets(tokens, i + 1)
    if targets is None or key in targets:
        return None  # a row moved to another key
    operand = _where_equality(tokens, where + 1, table[1], alias, key)
    return Point(table[0], table[1], key, (operand,)) if operand is not None else None


def _delete(tokens: list[Token], key_of: KeyOf) -> Point | None:
    if len(tokens) < 2 or not is_word(tokens[1], "from"):
        return None
    table, alias, i = _table_and_alias(tokens, 2)
    if table is None or i >= len(tokens) or not is_word(tokens[i], "where") or (key := key_of(*table)) is None:
        return None  # no WHERE, or DELETE ... USING
    operand = _where_equality(tokens, i + 1, table[1], alias, key)
    return Point(table[0], table[1], key, (operand,)) if operand is not None else None


def _insert(tokens: list[Token], key_of: KeyOf) -> Point | None:
    if len(tokens) < 3 or not is_word(tokens[1], "into"):
        return None
    table, _alias, i = _table_and_alias(tokens, 2)
    if table is None or i >= len(tokens) or tokens[i].text != "(" or (key := key_of(*table)) is None:
        return None  # no column list: the key's position would come from the catalog
    columns, i = _paren_items(tokens, i)
    names = [_single_identifier(item) for item in columns or []]
    if columns is None or key not in names or len(set(names)) != len(names):
        return None
    if i >= len(tokens) or not is_word(tokens[i], "values"):
        return None
    position = names.index(key)
    operands: list[Operand] = []
    i += 1
    while i < len(tokens) and tokens[i].text == "(":
        items, i = _paren_items(tokens, i)
        operand = _operand(items[position]) if items is not None and len(items) == len(names) else None
        if operand is None:
            return None  # DEFAULT or an expression: the new row's key is unknown
        operands.append(operand)
        if i < len(tokens) and tokens[i].text == ",":
            i += 1
    if not operands:
        return None
    if i < len(tokens) and not (is_word(tokens[i], "returning") or _conflict_ok(tokens, i, key)):
        return None
    return Point(table[0], table[1], key, tuple(operands))


def _conflict_ok(tokens: list[Token], i: int, key: str) -> bool:
    """ON CONFLICT [(cols)] DO NOTHING (nothing else changes), or ON CONFLICT (key) DO UPDATE SET ... that does not
    assign the key (it changes the row of that key). ON CONSTRAINT, other targets and WHERE are refused."""
    if not (is_word(tokens[i], "on") and i + 1 < len(tokens) and is_word(tokens[i + 1], "conflict")):
        return False
    j = i + 2
    target: list[list[Token]] | None = []
    if j < len(tokens) and tokens[j].text == "(":
        target, j = _paren_items(tokens, j)
    if target is None or j + 1 >= len(tokens) or not is_word(tokens[j], "do"):
        return False
    rest = tokens[j + 2 :]
    if is_word(tokens[j + 1], "nothing"):
        return not rest or is_word(rest[0], "returning")
    if not is_word(tokens[j + 1], "update") or [_single_identifier(item) for item in target] != [key]:
        return False
    if not rest or not is_word(rest[0], "set") or _find_word(rest, "where", 0) is not None:
        return False
    targets = _set_targets(rest, 1)
    return targets is not None and key not in targets


# -- pieces -------------------------------------------------------------------------------------------------------


def _count_words(tokens: Sequence[Token], *words: str) -> tuple[int, ...]:
    return tuple(sum(1 for t in tokens if t.kind == WORD and t.sub == word) for word in words)


def _find_word(tokens: Sequence[Token], word: str, start: int) -> int | None:
    """Index of `word` at parenthesis depth 0 from `start`."""
    depth = 0
    for i in range(start, len(tokens)):
        tok = tokens[i]
        if tok.kind == OP:
            depth += tok.text == "("
            depth -= tok.text == ")"
        elif depth == 0 and tok.kind == WORD and tok.sub == word:
            return i
    return None


def _table_and_alias(tokens: Sequence[Token], i: int) -> tuple[tuple[str | None, str] | None, str | None, int]:
    """`name` or `schema.name`, then an optional `[AS] alias`; (None, ...) for anything else (ONLY, a function...)."""
    if i >= len(tokens) or tokens[i].kind not in (WORD, QIDENT) or is_word(tokens[i], "only", "lateral"):
        return None, None, i
    parts = [ident_value(tokens[i])]
    i += 1
    if i + 1 < len(tokens) and tokens[i].text == "." and tokens[i + 1].kind in (WORD, QIDENT):
        parts.append(ident_value(tokens[i + 1]))
        i += 2
    if len(parts) == 2 and i < len(tokens) and tokens[i].text == ".":
        return None, None, i  # db.schema.table: rare, left alone
    alias = None
    if i < len(tokens) and is_word(tokens[i], "as"):
        i += 1
    if i < len(tokens) and tokens[i].kind in (WORD, QIDENT) and not _is_clause_word(tokens[i]):
        alias = ident_value(tokens[i])
        i += 1
    table = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
    return table, alias, i


def _is_clause_word(tok: Token) -> bool:
    return tok.kind == WORD and tok.sub in ("where", "set", "using", "returning", "values", "on", "default")


def _where_equality(tokens: Sequence[Token], i: int, table: str, alias: str | None, key: str) -> Operand | None:
    """The value of the first top-level conjunct `[qualifier.]key = value` (or `value = key`) of the WHERE clause
    at i."""
    end = i
    depth = 0
    while end < len(tokens):
        tok = tokens[end]
        if tok.kind == OP:
            depth += tok.text == "("
            depth -= tok.text == ")"
        elif depth == 0 and tok.kind == WORD:
            if tok.sub in _WHERE_END:
                break
            if tok.sub in _WHERE_REJECT:
                return None
        end += 1
    conjuncts: list[list[Token]] = [[]]
    depth = 0
    for tok in tokens[i:end]:
        if tok.kind == OP:
            depth += tok.text == "("
            depth -= tok.text == ")"
        if depth == 0 and is_word(tok, "and"):
            conjuncts.append([])
        else:
            conjuncts[-1].append(tok)
    for conjunct in conjuncts:
        found = _equality(conjunct, table, alias)
        if found is not None and found[0] == key:
            return found[1]
    return None


def _equality(tokens: list[Token], table: str, alias: str | None) -> tuple[str, Operand] | None:
    for at in range(1, len(tokens) - 1):
        if tokens[at].kind == OP and tokens[at].text == "=":
            left, right = tokens[:at], tokens[at + 1 :]
            column = _column(left, table, alias)
            operand = _operand(right)
            if column is None or operand is None:
                column, operand = _column(right, table, alias), _operand(left)
            if column is not None and operand is not None:
                return column, operand
            return None
    return None


def _column(tokens: list[Token], table: str, alias: str | None) -> str | None:
    if len(tokens) == 1 and tokens[0].kind in (WORD, QIDENT):
        return ident_value(tokens[0])
    if len(tokens) == 3 and tokens[1].text == "." and all(t.kind in (WORD, QIDENT) for t in (tokens[0], tokens[2])):
        qualifier = ident_value(tokens[0])
        if qualifier == (alias if alias is not None else table):
            return ident_value(tokens[2])
    return None


def _operand(tokens: list[Token]) -> Operand | None:
    """An integer literal (optionally negative) or a parameter, optionally cast to an integer type."""
    if len(tokens) >= 3 and tokens[-3].text == ":" and tokens[-2].text == ":" and tokens[-1].kind == WORD:
        if tokens[-1].sub not in _INT_TYPES:
            return None
        tokens = tokens[:-3]
    sign = 1
    if len(tokens) == 2 and tokens[0].kind == OP and tokens[0].text == "-":
        sign, tokens = -1, tokens[1:]
    if len(tokens) != 1:
        return None
    tok = tokens[0]
    if tok.kind == NUMBER and tok.text.isdigit():
        return Operand(sign * int(tok.text), None)
    if tok.kind == PARAM and sign == 1 and tok.text[1:].isdigit():
        return Operand(None, int(tok.text[1:]))
    return None


def _single_identifier(tokens: list[Token]) -> str | None:
    return ident_value(tokens[0]) if len(tokens) == 1 and tokens[0].kind in (WORD, QIDENT) else None


def _paren_items(tokens: Sequence[Token], i: int) -> tuple[list[list[Token]] | None, int]:
    """The comma-separated items of the parenthesised list at i, and the index after its ')'."""
    items: list[list[Token]] = [[]]
    depth = 0
    for j in range(i, len(tokens)):
        tok = tokens[j]
        if tok.kind == OP and tok.text == "(":
            depth += 1
            if depth == 1:
                continue
        elif tok.kind == OP and tok.text == ")":
            depth -= 1
            if depth == 0:
                return (items if all(items) else None), j + 1
        elif depth == 1 and tok.kind == OP and tok.text == ",":
            items.append([])
            continue
        items[-1].append(tok)
    return None, len(tokens)


def _set_targets(tokens: Sequence[Token], i: int) -> set[str] | None:
    """The columns assigned by the SET list starting at i; None when one cannot be read."""
    targets: set[str] = set()
    depth = 0
    expect_target = True
    j = i
    while j < len(tokens):
        tok = tokens[j]
        if depth == 0 and tok.kind == WORD and tok.sub in ("where", "from", "returning"):
            break
        if expect_target:
            if tok.kind in (WORD, QIDENT):
                targets.add(ident_value(tok))
            elif tok.text == "(":
                items, j = _paren_items(tokens, j)
                names = [_single_identifier(item) for item in items or [[]]]
                if items is None or any(n is None for n in names):
                    return None
                targets.update(n for n in names if n is not None)
                expect_target = False
                continue
            else:
                return None
            expect_target = False
        elif tok.kind == OP and tok.text in "()":
            depth += tok.text == "("
            depth -= tok.text == ")"
        elif depth == 0 and tok.kind == OP and tok.text == ",":
            expect_target = True
        j += 1
    return targets


# -- by fingerprint -------------------------------------------------------------------------------------------------

# Literal values standing for the literals of a fingerprint in its probe text: _MARK + the literal's position.
_MARK: Final = 1_000_000_000
_ASCII_DIGITS: Final = re.compile(r"[0-9]+")


class PointTemplates:
    """`read_point` / `write_point` of statements that differ only in their literals, found once per fingerprint.

    Lexing each new text again is most of the cost of a simple query whose text is new (a miss or a write with a
    new key). Texts of one fingerprint (analysis/fingerprint.py) have the same tokens but for their literals, each
    of which is one token the fingerprint replaced by "?". So the point is found once in a probe text, the
    fingerprint with each "?" replaced by a distinct integer literal (_MARK + its position); an operand it names is
    then, in any text of that fingerprint, the literal at that position, taken when that literal is a plain integer
    (ASCII digits, as `_operand` requires of a NUMBER token) and otherwise not a point (None: the safe answer, even
    where the lexer might have found the key in a later conjunct). A fingerprint whose "?" are not all replaced
    literals (an operator "?"), or whose literals were not collected, is not templated: the caller lexes the text.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        # (fingerprint, write) -> (the owner of key_of it was found with, the probe's point or None)
        self._memo: dict[tuple[str, bool], tuple[object, Point | None]] = {}

    def find(
        self, text: str, fingerprinted: str, literals: list[str] | None, write: bool, key_of: KeyOf, owner: object
    ) -> Point | None:
        """The point of `text`, whose fingerprint is `fingerprinted` and replaced literals `literals` (as
        fingerprint.fingerprint_literals gives them), with `key_of` (whose answers depend only on `owner`, a
        catalog): by its fingerprint's template, or, when it has none, lexed."""
        if literals is None or fingerprinted.count("?") != len(literals):
            return write_point(text, key_of) if write else read_point(text, key_of)
        memo_key = (fingerprinted, write)
        known = self._memo.get(memo_key)
        if known is not None and known[0] is owner:
            template = known[1]
        else:
            parts = fingerprinted.split("?")
            probe = "".join(f"{part} {_MARK + i} " for i, part in enumerate(parts[:-1])) + parts[-1]
            template = write_point(probe, key_of) if write else read_point(probe, key_of)
            if template is not None and any(
                op.literal is not None and not 0 <= abs(op.literal) - _MARK < len(literals) for op in template.values
            ):
                template = None  # (every literal of the probe is a mark: cannot happen)
            if len(self._memo) >= self._size:
                self._memo.clear()
            self._memo[memo_key] = (owner, template)
        if template is None:
            return None
        values: list[Operand] = []
        for operand in template.values:
            if operand.literal is None:
                values.append(operand)
                continue
            text = literals[abs(operand.literal) - _MARK]
            if not _ASCII_DIGITS.fullmatch(text):
                return None
            values.append(Operand(-int(text) if operand.literal < 0 else int(text), None))
        return Point(template.schema, template.table, template.column, tuple(values))
