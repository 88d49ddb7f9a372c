"""Shared data and comparison for the driver tests: one realistic typed table, big values, and row comparison.

Every driver test runs a query through the proxy and the same query on a direct connection, then calls
`assert_same_rows`. Values are compared after `canonical()`, so `Decimal('NaN')` equals itself, `Decimal('1.0')`
differs from `Decimal('1.00')` (the scale is data), and a mismatch is reported by position, not by dumping 5 MB.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

MiB = 1024 * 1024
BIG_SIZE = 5 * MiB

# Random bytes, so that a shifted or dropped chunk cannot go unnoticed (a repeated pattern could hide one).
BIG_BYTES: bytes = random.Random(20240229).randbytes(BIG_SIZE)
# Multi-byte UTF-8 throughout (the pattern is 20 characters, 33 bytes): a little over 5 MiB once encoded, cut so
# that its length is not a multiple of any buffer size.
BIG_TEXT: str = ("héllo wörld ✓ 日本語 🐘 " * (BIG_SIZE // 33 + 1000))[:-7]
ROWS_100K = 100_000

TYPED_COLUMNS = ("id", "i8", "num", "txt", "raw", "ts", "d", "iv", "js", "jb", "arr_int", "arr_txt", "u", "flag")

CREATE_TYPED = """
CREATE TABLE typed (
    id integer PRIMARY KEY,
    i8 bigint,
    num numeric,
    txt text,
    raw bytea,
    ts timestamptz,
    d date,
    iv interval,
    js json,
    jb jsonb,
    arr_int integer[],
    arr_txt text[],
    u uuid,
    flag boolean
)
"""

# Edge rows first (extremes, empty values, a row of NULLs, quoting hazards), then 996 generated rows.
# No 'infinity' timestamps or BC dates: psycopg (and Python's datetime) cannot load them by default.
FILL_TYPED = r"""
INSERT INTO typed VALUES
 (1, 9223372036854775807, 12345678901234567890.123456789, 'héllo wörld — ☃ 日本語 🐘',
  '\x00ff10'::bytea, '2024-02-29 23:59:59.123456+00', '2000-02-29', '1 year 2 mons 3 days 04:05:06.789',
  '{"a": [1, 2.5, "ü"], "b": null}', '{"k": {"nested": true}, "emoji": "🐘"}',
  '{1,NULL,3}', '{"a b","c,d","ü",NULL,""}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true),
 (2, -9223372036854775808, -0.000001, '', '\x'::bytea, '1970-01-01 00:00:00+00', '0001-01-01',
  '-1 days -00:00:01', '[]', '{}', '{}', '{}', '00000000-0000-0000-0000-000000000000', false),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, 0, 0.10, E'line1\nline2\ttab "quoted" \\ backslash '' quote', '\x5c30'::bytea,
  '2262-04-11 23:47:16.854775+00', '9999-12-31', '00:00:00.000001', '"just a string"', '[1, "two", null]',
  '{-2147483648,2147483647}', '{"{braces}","NULL"}', 'ffffffff-ffff-ffff-ffff-ffffffffffff', NULL);
INSERT INTO typed
SELECT g, g::bigint * 1000000007, g / 7.0, 'row ' || g || ' ✓ ü', decode(md5(g::text), 'hex'),
       '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 minute 1.5 seconds', date '2024-01-01' + g,
       g * interval '1 second', json_build_object('g', g, 'name', 'n' || g),
       jsonb_build_object('g', g, 'even', g % 2 = 0),
       ARRAY[g, g + 1, NULL], ARRAY['x' || g, 'ü'], md5(g::text)::uuid, g % 3 = 0
FROM generate_series(5, 1000) AS g;
"""
TYPED_ROW_COUNT = 1000

SELECT_TYPED = "SELECT " + ", ".join(TYPED_COLUMNS) + " FROM typed ORDER BY id"

# One row of literals, no table needed: special numerics, nested arrays, unicode, empty versus NULL.
SELECT_LITERALS = r"""
SELECT 1::int2 AS small, 2147483647::int4 AS int4, (-9223372036854775808)::int8 AS int8,
       'NaN'::numeric AS nan, 1.50::numeric(10, 2) AS scaled, 1e-30::numeric AS tiny, 3.25::float8 AS f8,
       'Infinity'::float8 AS f8_inf, 'ü日本🐘'::text AS uni, ''::text AS empty, NULL::text AS null_text,
       '\xdeadbeef'::bytea AS bytes, '{{1,2},{3,4}}'::int[] AS matrix, ARRAY[]::text[] AS empty_array,
       '{"x": "ü", "y": [true, false, null]}'::jsonb AS jb, 'c0ffee00-0000-4000-8000-000000000000'::uuid AS u,
       '2024-06-30 12:34:56.789+02'::timestamptz AS ts, '12:00:01'::time AS t, '2024-06-30'::date AS d,
       interval '-3 days 04:00' AS iv, true AS yes, NULL::bool AS unknown
"""

# Three columns only: decoding 100k rows in Python costs far more than relaying them.
SELECT_100K = "SELECT g, md5(g::text) AS h, g / 3.0 AS third FROM generate_series(1, 100000) AS g"


def canonical(value: Any) -> Any:
    """A form of `value` that compares by content: Decimal by its text (NaN equals NaN, scale matters), float NaN
    likewise, containers element by element. Other values compare as themselves."""
    if isinstance(value, Decimal):
        return ("Decimal", str(value))
    if isinstance(value, float) and value != value:
        return ("float", "nan")
    if isinstance(value, list | tuple):
        return tuple(canonical(item) for item in value)
    if isinstance(value, dict):
        return {key: canonical(item) for key, item in value.items()}
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    return value


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def assert_same_rows(direct: Iterable[Sequence[Any]], proxied: Iterable[Sequence[Any]], what: str = "rows") -> int:
    """Assert both row sets are equal, row by row and value by value; return the row count.

    The message names the first differing row and column and shows both values, shortened.
    """
    left = [tuple(row) for row in direct]
    right = [tuple(row) for row in proxied]
    assert len(left) == len(right), f"{what}: direct returned {len(left)} rows, proxied {len(right)}"
    for index, (a, b) in enumerate(zip(left, right, strict=True)):
        if canonical(a) == canonical(b):
            continue
        assert len(a) == len(b), f"{what}: row {index} has {len(a)} columns direct, {len(b)} proxied"
        for column, (x, y) in enumerate(zip(a, b, strict=True)):
            assert canonical(x) == canonical(y), (
                f"{what}: row {index} column {column} differs: direct {_short(x)}, proxied {_short(y)}"
            )
    return len(left)


def assert_same_value(direct: Any, proxied: Any, what: str = "value") -> None:
    """One value (possibly megabytes long): equal, or a message saying where they first differ."""
    if canonical(direct) == canonical(proxied):
        return
    if isinstance(direct, str | bytes) and isinstance(proxied, type(direct)):
        pairs = zip(direct, proxied, strict=False)  # lengths may differ: compare the common prefix
        first = next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(direct), len(proxied)))
        raise AssertionError(
            f"{what}: lengths direct {len(direct)} / proxied {len(proxied)}, first difference at index {first}"
        )
    raise AssertionError(f"{what}: direct {_short(direct)}, proxied {_short(proxied)}")
