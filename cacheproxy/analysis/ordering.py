"""Whether a read's rows come in a defined order, or as a set: how shadow verification compares two results of it.

Lexical, on the statement's own tokens (no sqlglot): an ORDER BY, LIMIT, OFFSET or FETCH at parenthesis depth 0
applies to the statement's result; inside parentheses one applies to a subquery, a window (OVER (ORDER BY ...)) or
an aggregate (string_agg(x ORDER BY y)) and orders nothing the client sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from cacheproxy.analysis.lexer import OP, is_word, tokenize


@dataclass(frozen=True, slots=True)
class Ordering:
    """`ordered`: a top-level ORDER BY (rows compare as a sequence, else as a multiset). `limited`: a top-level
    LIMIT, OFFSET or FETCH (without a total order, which rows come back is up to the plan)."""

    ordered: bool
    limited: bool


def ordering(sql: str) -> Ordering:
    """How the result of the one statement `sql` is ordered and cut.

    >>> ordering("SELECT * FROM t ORDER BY a")
    Ordering(ordered=True, limited=False)
    >>> ordering("SELECT a, row_number() OVER (ORDER BY b) FROM (SELECT * FROM t ORDER BY c LIMIT 3) s")
    Ordering(ordered=False, limited=False)
    >>> ordering("select 'order by' from t offset 2")
    Ordering(ordered=False, limited=True)
    """
    depth = 0
    ordered = limited = False
    tokens = tokenize(sql)
    for index, token in enumerate(tokens):
        if token.kind == OP:
            if token.text == "(":
                depth += 1
            elif token.text == ")":
                depth = max(0, depth - 1)
            continue
        if depth:
            continue
        if is_word(token, "order") and index + 1 < len(tokens) and is_word(tokens[index + 1], "by"):
            ordered = True
        elif is_word(token, "limit", "offset", "fetch"):
            limited = True
    return Ordering(ordered, limited)
