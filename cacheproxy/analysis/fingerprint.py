"""The memo key of the analyzer: SQL text with literals replaced by "?", comments dropped and whitespace collapsed.

No sqlglot here: this runs for every statement, hit or miss. Two strings with the same fingerprint must get the same
analysis, so a literal whose value can change the analysis is kept verbatim:
- strings containing one of the special date/time words now/today/tomorrow/yesterday/current/epoch/infinity/allballs
  (PostgreSQL evaluates 'now'::timestamp when it parses it: it must not share an analysis with a constant date);
- U&'' strings, which could hide such a word behind escapes with a custom UESCAPE (rare enough to keep them all).
`$1` parameters, keywords and quoted identifiers are kept as written (case too).

The fast path is one `re.sub` whose pattern leaves plain text (keywords, identifiers, operators, single spaces)
alone; block comments that nest or do not end take the slower token-by-token path of `lexer.scan`.
"""

from __future__ import annotations

import re
from typing import Final

from cacheproxy.analysis.lexer import NUMBER, SPACE, STRING, Token, scan, special_words

_NOT_AFTER_IDENT: Final = r"(?<![A-Za-z0-9_$\x80-\U0010ffff])"
_WORD: Final = r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*+"
_WS: Final = r"[ \t\n\r\f\v]"  # PostgreSQL's whitespace is ASCII only: other spaces are identifier characters
_COMMENT: Final = r"(?:--[^\n\r]*+|/\*[^*]*+\*++(?:[^/*][^*]*+\*++)*+/)"

# `plain` swallows, in one match, everything that is kept as is: words not followed by a quote (E'', U&'' prefixes),
# operators, punctuation, $n parameters and single spaces. Only literals, comments and odd whitespace cost a call.
_FP_RE: Final = re.compile(
    rf"""
    (?P<plain>(?:{_WORD}(?!['&])|\$[0-9]++|[^ \t\n\r\f\v'"$0-9.A-Za-z_\x80-\U0010ffff/-]++|/(?!\*)|-(?!-)
        |\.(?![0-9])|[ ](?!{_WS}|--|/\*))++)
  | (?P<comment>(?:{_WS}*+{_COMMENT})++{_WS}*+)
  | (?P<opencomment>/\*)
  | (?P<space>{_WS}++)
  | {_NOT_AFTER_IDENT}(?P<estring>[eE]'(?:[^'\\]|\\[\s\S]|'')*+\\?(?:'|\Z))
  | {_NOT_AFTER_IDENT}(?P<ustring>[uU]&'(?:[^']|'')*+(?:'|\Z))
  | {_NOT_AFTER_IDENT}(?P<bstring>[bBxX]'[^']*+(?:'|\Z))
  | {_NOT_AFTER_IDENT}(?P<nstring>[nN]'(?:[^']|'')*+(?:'|\Z))
  | (?P<string>'(?:[^']|'')*+(?:'|\Z))
  | {_NOT_AFTER_IDENT}(?P<dollar>\$(?P<tag>(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*+)?)\$
        (?:[\s\S]*?\$(?P=tag)\$|[\s\S]*+))
  | (?P<qident>"(?:[^"]|"")*+(?:"|\Z))
  | (?P<number>{_NOT_AFTER_IDENT}(?:0[xX][0-9A-Fa-f_]++|0[oO][0-7_]++|0[bB][01_]++|[0-9][0-9_]*+(?:\.[0-9_]*+)?)
        (?:[eE][+-]?[0-9]++)?|\.[0-9][0-9_]*+(?:[eE][+-]?[0-9]++)?)
    """,
    re.VERBOSE,
)
_SUB: Final = {"estring": "e", "ustring": "u", "bstring": "b", "nstring": "n", "string": "", "dollar": "dollar"}


class _NeedsSlowPath(Exception):
    """A nested or unterminated block comment: the regex cannot follow it."""


def _replace(m: re.Match[str]) -> str:
    group = m.lastgroup
    text = m.group()
    if group == "plain" or group == "qident":
        return text
    if group == "space":
        return " "
    if group == "number":
        return "?"
    if group == "comment":
        if "/*" in text[text.find("/*") + 2 :]:  # a nested comment: the simple pattern ended it too early
            raise _NeedsSlowPath
        return " "
    if group == "opencomment":
        raise _NeedsSlowPath
    sub = _SUB.get(group or "", "")
    if sub == "u":
        return text
    return text if special_words(Token(STRING, text, 0, len(text), sub)) else "?"


def fingerprint(sql: str) -> str:
    """Normalise `sql` into its literal-free fingerprint. Never raises.

    >>> fingerprint("SELECT * FROM t WHERE a = 'x' AND b > 42  -- note")
    'SELECT * FROM t WHERE a = ? AND b > ?'
    >>> fingerprint("select 'now'::timestamptz, $1")
    "select 'now'::timestamptz, $1"
    """
    try:
        return _FP_RE.sub(_replace, sql).strip(" ")
    except _NeedsSlowPath:
        return fingerprint_slow(sql)
    except Exception:  # pragma: no cover - belt and braces: the fingerprint must never raise
        return fingerprint_slow(sql)


_LITERAL_GROUPS: Final = frozenset(("number", *_SUB))


def fingerprint_literals(sql: str) -> tuple[str, list[str] | None]:
    """`fingerprint(sql)`, and the text of each literal it replaced by "?", in order (None when the slow path ran:
    not collected). For analysis.points.PointTemplates.

    >>> fingerprint_literals("UPDATE t SET v = 'a' WHERE id = 42 AND w < 'now'")
    ("UPDATE t SET v = ? WHERE id = ? AND w < 'now'", ["'a'", '42'])
    """
    literals: list[str] = []

    def replace(m: re.Match[str]) -> str:
        text = _replace(m)
        if text == "?" and m.lastgroup in _LITERAL_GROUPS:
            literals.append(m.group())
        return text

    try:
        return _FP_RE.sub(replace, sql).strip(" "), literals
    except Exception:  # (_NeedsSlowPath, or anything: the fingerprint must never raise)
        return fingerprint_slow(sql), None


def fingerprint_slow(sql: str) -> str:
    """The same normalisation, token by token (handles nested and unterminated block comments)."""
    out: list[str] = []
    pending_space = False
    for tok in scan(sql):
        kind = tok.kind
        if kind == SPACE:
            pending_space = True
            continue
        if pending_space and out:
            out.append(" ")
        pending_space = False
        if kind == NUMBER or (kind == STRING and tok.sub != "u" and not special_words(tok)):
            out.append("?")
        else:
            out.append(tok.text)
    return "".join(out).strip(" ")  # as the fast path: an unterminated token at the end loses trailing spaces
