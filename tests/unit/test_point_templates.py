"""Points by fingerprint (analysis/points.PointTemplates): the row a simple statement reads or writes, found once
per fingerprint instead of lexing each new text, must be the one lexing finds (or None, the safe answer): never
another row, which would leave a stale entry after a write."""

from __future__ import annotations

import itertools

import pytest

from cacheproxy.analysis.fingerprint import fingerprint, fingerprint_literals
from cacheproxy.analysis.points import Point, PointTemplates, read_point, write_point


def key_of(schema: str | None, table: str) -> str | None:
    return {"accounts": "aid", "Mixed": "Id"}.get(table)


READS = [
    "SELECT abalance FROM accounts WHERE aid = 42",
    "select * from accounts where aid = 42;",
    "SELECT * FROM public.accounts a WHERE a.aid = -7 AND a.abalance > 0 ORDER BY 1 LIMIT 1",
    "SELECT * FROM accounts AS x WHERE 5 = x.aid",
    "SELECT count(*) FROM accounts WHERE bid = 1 AND aid = 2::int8",
    "SELECT * FROM accounts WHERE bid = 'x' AND aid = 3",
    "SELECT * FROM accounts WHERE aid = 3 AND bid = 4",
    "SELECT * FROM accounts WHERE abalance = 1 AND aid = 3 LIMIT 10 OFFSET 20",
    'SELECT "Id" FROM "Mixed" WHERE "Id" = 3',
    "SELECT * FROM accounts /* c */ WHERE  aid =\n 9 -- tail",
    "SELECT * FROM accounts WHERE aid = 1 OR aid = 2",
    "SELECT * FROM accounts WHERE aid = 5.0",
    "SELECT * FROM accounts WHERE aid = '5'",
    "SELECT * FROM accounts WHERE aid = 1 UNION SELECT * FROM accounts WHERE aid = 2",
    "SELECT * FROM accounts WHERE aid = 1; SELECT 1",
    "SELECT * FROM accounts WHERE filler ? 'k' AND aid = 5",  # a "?" operator: lexed, not templated
    "SELECT * FROM accounts WHERE filler = 'now' AND aid = 5",  # a special word kept in the fingerprint
    "SELECT * FROM accounts WHERE filler = E'a\\'b' AND aid = 6",
    "SELECT * FROM accounts WHERE filler = $$x$$ AND aid = 6",
    "SELECT * FROM accounts WHERE aid = 0x1F",
    "SELECT * FROM accounts WHERE aid = 1_000",
    "SELECT * FROM accounts WHERE aid = 1e3",
    "SELECT * FROM accounts WHERE aid = 12abc",
    "SELECT * FROM accounts WHERE aid = -/**/-4",
    "SELECT * FROM accounts WHERE aid = 4 /* nested /* comment */ */",
]
WRITES = [
    "UPDATE accounts SET abalance = abalance + 5 WHERE aid = 7",
    "UPDATE accounts SET abalance = abalance + -5 WHERE aid = -7",
    "UPDATE accounts a SET abalance = 0 WHERE a.aid = 3 AND abalance > 0 RETURNING *",
    "UPDATE accounts SET (abalance, filler) = (1, 'x') WHERE aid = 9",
    "UPDATE accounts SET aid = 5 WHERE aid = 4",
    "UPDATE accounts SET abalance = 1 WHERE aid = 4 OR aid = 5",
    "UPDATE accounts SET filler = 'a' WHERE filler = 'b' AND aid = 11",
    "DELETE FROM accounts WHERE aid = 4",
    "DELETE FROM accounts WHERE aid > 1",
    "INSERT INTO accounts (aid, abalance) VALUES (1, 0), (2, 3)",
    "INSERT INTO accounts (abalance, aid) VALUES (0, 8) ON CONFLICT DO NOTHING",
    "INSERT INTO accounts (aid, abalance) VALUES (8, 1) ON CONFLICT (aid) DO UPDATE SET abalance = 2",
    "INSERT INTO accounts (aid, abalance) VALUES (1 + 1, 1)",
    "INSERT INTO accounts (aid, filler) VALUES (-3, 'x'), (4, 'y')",
]
# What a literal may be replaced by in a text of the same fingerprint.
OTHER_LITERALS = ["17", "007", "-17", "'17'", "17.5", "1e3", "0x1F", "1_000", "E'x'", "$$y$$", "B'101'", "99999999999"]


def variants(sql: str) -> list[str]:
    """`sql`, and texts with one or two of its literals replaced by each of OTHER_LITERALS."""
    _, literals = fingerprint_literals(sql)
    if not literals:
        return [sql]
    out = [sql]
    for positions in [(i,) for i in range(len(literals))] + list(itertools.combinations(range(len(literals)), 2)):
        for other in OTHER_LITERALS:
            out.append(_replace_literals(sql, literals, {p: other for p in positions}))
    return out


def _replace_literals(sql: str, literals: list[str], by: dict[int, str]) -> str:
    """`sql` with its n-th literal (as fingerprint_literals lists them) replaced, found left to right."""
    out, at = [], 0
    for index, literal in enumerate(literals):
        found = sql.index(literal, at)
        out.append(sql[at:found])
        out.append(by.get(index, literal))
        at = found + len(literal)
    out.append(sql[at:])
    return "".join(out)


def _templated(templates: PointTemplates, sql: str, write: bool, owner: object) -> Point | None:
    fingerprinted, literals = fingerprint_literals(sql)
    return templates.find(sql, fingerprinted, literals, write, key_of, owner)


@pytest.mark.parametrize(("sql", "write"), [(sql, False) for sql in READS] + [(sql, True) for sql in WRITES])
def test_template_finds_the_lexed_point_or_none(sql: str, write: bool) -> None:
    lex = write_point if write else read_point
    templates = PointTemplates(100)
    owner = object()
    texts = variants(sql)
    # Each text first and last: the template is made from the first text of its fingerprint seen.
    for text in [*texts, *reversed(texts)]:
        lexed = lex(text, key_of)
        templated = _templated(templates, text, write, owner)
        assert templated is None or templated == lexed, text


@pytest.mark.parametrize(
    ("sql", "write"),
    [
        ("SELECT abalance FROM accounts WHERE aid = 42", False),
        ("SELECT * FROM public.accounts a WHERE a.aid = -7 AND a.abalance > 0 ORDER BY 1 LIMIT 1", False),
        ("SELECT * FROM accounts WHERE bid = 'x' AND aid = 3", False),
        ("SELECT * FROM accounts /* c */ WHERE  aid =\n 9 -- tail", False),
        ('SELECT "Id" FROM "Mixed" WHERE "Id" = 3', False),
        ("UPDATE accounts SET abalance = abalance + -5 WHERE aid = -7", True),
        ("UPDATE accounts SET filler = 'a' WHERE filler = 'b' AND aid = 11", True),
        ("DELETE FROM accounts WHERE aid = 4", True),
        ("INSERT INTO accounts (aid, filler) VALUES (-3, 'x'), (4, 'y')", True),
        ("INSERT INTO accounts (aid, abalance) VALUES (8, 1) ON CONFLICT (aid) DO UPDATE SET abalance = 2", True),
    ],
)
def test_integer_literals_are_found(sql: str, write: bool) -> None:
    """Texts of one fingerprint whose key literals are integers: each gets its own row from the template."""
    lex = write_point if write else read_point
    templates = PointTemplates(100)
    owner = object()
    _, literals = fingerprint_literals(sql)
    assert literals
    for shift in range(3):
        text = _replace_literals(sql, literals, {i: str(int(lit) + 100 * shift) for i, lit in enumerate(literals)
                                                 if lit.isdigit()})  # fmt: skip
        lexed = lex(text, key_of)
        assert lexed is not None
        assert _templated(templates, text, write, owner) == lexed, text


def test_another_catalog_makes_another_template() -> None:
    """A template holds for the catalog (point keys) it was made with only."""
    templates = PointTemplates(100)
    sql = "SELECT * FROM accounts WHERE bid = 1"
    assert templates.find(sql, *fingerprint_literals(sql), False, key_of, "catalog 1") is None
    point = templates.find(sql, *fingerprint_literals(sql), False, lambda schema, table: "bid", "catalog 2")
    assert point == read_point(sql, lambda schema, table: "bid")
    assert point is not None


@pytest.mark.parametrize("sql", READS + WRITES)
def test_fingerprint_literals_is_the_fingerprint(sql: str) -> None:
    for text in variants(sql):
        assert fingerprint_literals(text)[0] == fingerprint(text)
