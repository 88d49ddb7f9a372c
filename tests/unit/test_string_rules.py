"""Session string rules (analysis/strings.py) and the lexer under them (issue 14, item 7): no sockets."""

from __future__ import annotations

import pytest

from cacheproxy.analysis import Analyzer, analyze
from cacheproxy.analysis.lexer import split_statements, string_value, tokenize
from cacheproxy.analysis.strings import backslash_quotes, decode, mode


def test_modes() -> None:
    assert mode(None, None) == mode("on", "UTF8") == mode("on", "SQL_ASCII") == ""
    assert mode("off", "UTF8") == "utf-8|backslash" and backslash_quotes(mode("off", "UTF8"))
    assert mode("on", "SJIS") == "cp932" and not backslash_quotes("cp932")
    assert mode("on", "LATIN1") == "iso8859-1"
    assert mode("on", "EUC_TW") == "?"


@pytest.mark.parametrize(
    ("encoding", "char"), [("SJIS", "表"), ("BIG5", "功"), ("GBK", "乗"), ("GB18030", "乗"), ("JOHAB", "가")]
)
def test_trail_byte_0x5c_is_not_a_backslash(encoding: str, char: str) -> None:
    m = mode("on", encoding)
    raw = f"SELECT E'{char}' ; UPDATE t SET a = 1".encode(m)
    assert b"\\" in raw or encoding == "JOHAB"  # the character's second byte is 0x5C (for these picks)
    text = decode(raw, m)
    assert text is not None
    info = analyze(text)
    assert info.statement_count == 2 and (None, "t") in info.writes


def test_undecodable_is_none_unless_ascii() -> None:
    assert decode(b"SELECT 1", "?") == "SELECT 1"
    assert decode(b"SELECT '\xe9'", "?") is None


def test_backslash_quotes_lexing() -> None:
    sql = "SELECT 'a\\'' ; UPDATE t SET x = 1; SELECT 'b'"
    assert len(split_statements(tokenize(sql))) == 1  # standard strings: one string hides the UPDATE
    assert len(split_statements(tokenize(sql, backslash_quotes=True))) == 3
    (tok,) = [t for t in tokenize("SELECT 'no\\x77'", backslash_quotes=True) if t.kind == "string"]
    assert string_value(tok) == "now"  # decoded as E'' is: a time-dependent literal


def test_analysis_under_backslash_quotes() -> None:
    info = Analyzer().analyze("SELECT 'a\\'' ; UPDATE t SET x = 1; SELECT 'b'", backslash_quotes=True)
    assert info.statement_count == 3 and (None, "t") in info.writes
    # A backslash escape inside one statement: sqlglot would read it the standard way, so it is not parsed.
    read = analyze("SELECT 'x\\' FROM secret', a FROM t", backslash_quotes=True)
    assert not read.cacheable and read.reason is not None and read.reason.startswith("could not parse")
    assert "secret" not in read.names and {"a", "t"} <= read.names  # what it may run is read off the right tokens
    assert not analyze("SELECT 'no\\x77'::timestamptz", backslash_quotes=True).cacheable
    assert analyze("SELECT a FROM t WHERE b = 'plain'", backslash_quotes=True).cacheable
