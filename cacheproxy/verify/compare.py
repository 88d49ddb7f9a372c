"""Comparing a cached result with a fresh one, sans-IO: their DataRows, as a sequence or as a multiset.

Only the rows are compared (their exact bytes: same formats, same session settings, so the same text or binary
values): the RowDescription carries nothing the proxy would serve wrong without DDL, which invalidates anyway, and
the CommandComplete tag follows from the rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from enum import Enum

from cacheproxy.protocol.framing import split_messages

_DATA_ROW = ord("D")


class Verdict(Enum):
    """How a fresh result compares with the cached one."""

    MATCH = "match"
    """The same rows (in the same order when the statement orders them)."""
    MISMATCH = "mismatch"
    """Different rows: the cache served something PostgreSQL would not answer now."""
    REORDERED = "reordered"
    """The same rows in another order, under an ORDER BY: rows that tie on its keys may come in any order."""


def data_rows(messages: Iterable[tuple[int, bytes]]) -> list[bytes]:
    """The bodies of the DataRow messages among `messages` ((type, body) pairs)."""
    return [body for msg_type, body in messages if msg_type == _DATA_ROW]


def cached_rows(value: bytes) -> list[bytes]:
    """The DataRow bodies of a cached result (its wire bytes, RowDescription first)."""
    return data_rows(split_messages(value))


def compare(cached: list[bytes], fresh: list[bytes], *, ordered: bool) -> Verdict:
    """Compare two results' rows: as sequences when `ordered`, else as multisets.

    >>> compare([b"1", b"2"], [b"2", b"1"], ordered=False)
    <Verdict.MATCH: 'match'>
    >>> compare([b"1", b"2"], [b"2", b"1"], ordered=True)
    <Verdict.REORDERED: 'reordered'>
    >>> compare([b"1", b"1"], [b"1", b"2"], ordered=False)
    <Verdict.MISMATCH: 'mismatch'>
    """
    if cached == fresh:
        return Verdict.MATCH
    if len(cached) != len(fresh) or Counter(cached) != Counter(fresh):
        return Verdict.MISMATCH
    return Verdict.REORDERED if ordered else Verdict.MATCH
