"""Point statements (analysis/points.py): the shapes recognised as touching one row by its key, and every near miss
that must not be (a wrong "yes" would let a write leave stale rows in the cache)."""

from __future__ import annotations

import pytest

from cacheproxy.analysis.points import Operand, Point, read_point, write_point


def key_of(schema: str | None, table: str) -> str | None:
    return {"accounts": "aid", "Mixed": "Id"}.get(table)


@pytest.mark.parametrize(
    ("sql", "operand"),
    [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = $1", None),
        ("SELECT abalance FROM accounts WHERE aid = $1", Operand(None, 1)),
        ("select * from accounts where aid = 42;", Operand(42, None)),
        ("SELECT * FROM public.accounts a WHERE a.aid = -7 AND a.abalance > 0 ORDER BY 1 LIMIT 1", Operand(-7, None)),
        ("SELECT * FROM accounts AS x WHERE 5 = x.aid", Operand(5, None)),
        ("SELECT count(*) FROM accounts WHERE bid = 1 AND aid = $2::int8", Operand(None, 2)),
        ('SELECT "Id" FROM "Mixed" WHERE "Id" = 3', Operand(3, None)),
    ],
)
def test_point_reads(sql: str, operand: Operand | None) -> None:
    point = read_point(sql, key_of)
    assert (point.values[0] if point is not None else None) == operand


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM accounts WHERE aid = 1 OR aid = 2",
        "SELECT * FROM accounts WHERE aid BETWEEN 1 AND 2",
        "SELECT * FROM accounts WHERE CASE WHEN bid = 1 AND aid = 2 THEN true END",
        "SELECT * FROM accounts WHERE (aid = 1)",  # parenthesised: not split, not a point (merely conservative)
        "SELECT * FROM accounts WHERE aid <= 5",
        "SELECT * FROM accounts WHERE aid >= 5",
        "SELECT * FROM accounts WHERE aid != 5",
        "SELECT * FROM accounts WHERE aid = 5.0",
        "SELECT * FROM accounts WHERE aid = '5'",
        "SELECT * FROM accounts WHERE aid = $1::text",
        "SELECT * FROM accounts WHERE aid = bid",
        "SELECT * FROM accounts WHERE other.aid = 5",
        "SELECT * FROM accounts a JOIN branches b ON a.bid = b.bid WHERE aid = 1",
        "SELECT * FROM accounts, branches WHERE aid = 1",
        "SELECT * FROM ONLY accounts WHERE aid = 1",
        "SELECT (SELECT max(aid) FROM accounts) FROM accounts WHERE aid = 1",
        "SELECT * FROM accounts WHERE aid = 1 UNION SELECT * FROM accounts WHERE aid = 2",
        "SELECT * FROM accounts WHERE aid IN (SELECT 1)",
        "WITH x AS (SELECT 1) SELECT * FROM accounts WHERE aid = 1",
        "SELECT * FROM accounts WHERE aid = 1; SELECT 1",
        "SELECT * FROM accounts",
        "SELECT * FROM branches WHERE bid = 1",  # no point key
        "SELECT extract(year FROM now()) FROM accounts WHERE aid = 1",  # a second FROM: refused, conservatively
    ],
)
def test_not_point_reads(sql: str) -> None:
    assert read_point(sql, key_of) is None


@pytest.mark.parametrize(
    ("sql", "values"),
    [
        ("UPDATE accounts SET abalance = abalance + $1 WHERE aid = $2", (Operand(None, 2),)),
        ("UPDATE accounts a SET abalance = 0 WHERE a.aid = 3 AND abalance > 0 RETURNING *", (Operand(3, None),)),
        ("UPDATE accounts SET (abalance, filler) = (1, 'x') WHERE aid = 9", (Operand(9, None),)),
        ("DELETE FROM accounts WHERE aid = 4", (Operand(4, None),)),
        ("DELETE FROM accounts AS a WHERE a.aid = $1 RETURNING abalance", (Operand(None, 1),)),
        ("INSERT INTO accounts (aid, abalance) VALUES (1, 0), ($1, $2)", (Operand(1, None), Operand(None, 1))),
        ("INSERT INTO accounts (abalance, aid) VALUES (0, 8) ON CONFLICT DO NOTHING", (Operand(8, None),)),
        ("INSERT INTO accounts (aid, abalance) VALUES (8, 1) ON CONFLICT (aid) DO UPDATE SET abalance = 2",
         (Operand(8, None),)),
        ("INSERT INTO accounts (aid) VALUES (8) ON CONFLICT (bid) DO NOTHING RETURNING aid", (Operand(8, None),)),
    ],
)  # fmt: skip
def test_point_writes(sql: str, values: tuple[Operand, ...]) -> None:
    assert write_point(sql, key_of) == Point(None, "accounts", "aid", values)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE accounts SET aid = 5 WHERE aid = 4",  # moves a row to another key
        "UPDATE accounts SET (abalance, aid) = (1, 2) WHERE aid = 4",
        "UPDATE accounts SET abalance = 1 WHERE aid = 4 OR aid = 5",
        "UPDATE accounts SET abalance = 1",
        "UPDATE accounts SET abalance = 1 FROM branches WHERE accounts.aid = 1",
        "UPDATE accounts SET abalance = (SELECT 1) WHERE aid = 1",
        "UPDATE ONLY accounts SET abalance = 1 WHERE aid = 1",
        "DELETE FROM accounts",
        "DELETE FROM accounts USING branches WHERE aid = 1",
        "DELETE FROM accounts WHERE aid > 1",
        "INSERT INTO accounts VALUES (1, 0)",  # no column list
        "INSERT INTO accounts (abalance) VALUES (1)",  # the key from a default
        "INSERT INTO accounts (aid, abalance) VALUES (DEFAULT, 1)",
        "INSERT INTO accounts (aid, abalance) VALUES (1 + 1, 1)",
        "INSERT INTO accounts (aid, abalance) SELECT 1, 1",
        "INSERT INTO accounts (aid, abalance) VALUES (1, 1) ON CONFLICT (bid) DO UPDATE SET abalance = 2",
        "INSERT INTO accounts (aid, abalance) VALUES (1, 1) ON CONFLICT ON CONSTRAINT c DO NOTHING",
        "INSERT INTO accounts (aid, abalance) VALUES (1, 1) ON CONFLICT (aid) DO UPDATE SET aid = 3",
        "INSERT INTO accounts (aid, abalance) VALUES (1, 1) ON CONFLICT (aid) DO UPDATE SET abalance = 2 WHERE true",
        "INSERT INTO accounts (aid, aid) VALUES (1, 2)",
        "MERGE INTO accounts a USING branches b ON a.aid = b.bid WHEN MATCHED THEN DELETE",
        "TRUNCATE accounts",
        "UPDATE branches SET bbalance = 1 WHERE bid = 1",  # no point key
    ],
)
def test_not_point_writes(sql: str) -> None:
    assert write_point(sql, key_of) is None
