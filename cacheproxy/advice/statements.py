"""Statement ids: the short fingerprint by which advice, statement rules and EXPLAIN name a statement.

The analyzer's fingerprint (analysis/fingerprint.py) replaces literals by "?" and keeps `$n` parameters. For naming
a statement the `$n` become "?" too, and a trailing semicolon goes: the same query sent with literals (simple
protocol) or with parameters (extended), and the text pg_stat_statements shows for it (constants as `$n`), all get
one id, so that a rule written from either applies to both.
"""

from __future__ import annotations

import hashlib
import re

from cacheproxy.analysis.fingerprint import fingerprint

_PARAM = re.compile(r"\$[0-9]+")
_ID = re.compile(r"[0-9a-f]{16}")


def loose(fingerprinted: str) -> str:
    """`fingerprint()`'s text with `$n` parameters as "?" and no trailing semicolons.

    >>> loose("SELECT * FROM t WHERE a = $1 AND b = ? ;")
    'SELECT * FROM t WHERE a = ? AND b = ?'
    """
    return _PARAM.sub("?", fingerprinted).rstrip("; ")


def id_of(fingerprinted: str) -> str:
    """The 16-hex-digit id of a statement, from its `fingerprint()`."""
    return hashlib.blake2b(loose(fingerprinted).encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def statement_id(sql: str) -> str:
    """The id of a statement's SQL text, or the id itself when `sql` is already one (16 hex digits, any case).

    >>> statement_id("SELECT 1") == statement_id("select 1") or "case matters"
    'case matters'
    >>> statement_id("SELECT a FROM t WHERE id = 5") == statement_id("SELECT a FROM t WHERE id = $1")
    True
    """
    text = sql.strip()
    if _ID.fullmatch(text.lower()):
        return text.lower()
    return id_of(fingerprint(text))
