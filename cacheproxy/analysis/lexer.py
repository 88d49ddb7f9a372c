"""A small PostgreSQL lexer (no sqlglot): tokens, statement splitting, identifier folding, literal values.

It follows the lexical rules of PostgreSQL's documentation, section 4.1 "Lexical Structure", closely enough to find
literals, comments, quoted identifiers and statement boundaries. It never raises: an unterminated quote, dollar
quote or comment swallows the rest of the input, as the server would report an error there anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from cacheproxy.analysis.model import UNKNOWN_TABLE, TableRef

# Token kinds
WORD = "word"  # keyword or unquoted identifier
QIDENT = "qident"  # "quoted identifier" or U&"..."
STRING = "string"  # any string literal: '', E'', N'', U&'', B''/X'', $$...$$, $tag$...$tag$
NUMBER = "number"
PARAM = "param"  # $1
OP = "op"  # one character of punctuation or operator
SPACE = "space"  # whitespace or a comment (only yielded by scan(); tokenize() drops them)

_IDENT_START = r"A-Za-z_\x80-\U0010ffff"
_IDENT_CONT = r"A-Za-z0-9_$\x80-\U0010ffff"

# One alternation, tried in order at each position. Possessive quantifiers keep it linear on hostile input.
_TOKEN_RE = re.compile(
    r"""
    (?P<space>[ \t\n\r\f\v]++|--[^\n\r]*+)
  | (?P<bcomment>/\*)
  | (?<![A-Za-z0-9_$\x80-\U0010ffff])(?P<estring>[eE]'(?:[^'\\]|\\[\s\S]|'')*+\\?(?:'|\Z))
  | (?<![A-Za-z0-9_$\x80-\U0010ffff])(?P<ustring>[uU]&'(?:[^']|'')*+(?:'|\Z))
  | (?<![A-Za-z0-9_$\x80-\U0010ffff])(?P<bstring>[bBxX]'[^']*+(?:'|\Z))
  | (?<![A-Za-z0-9_$\x80-\U0010ffff])(?P<nstring>[nN]'(?:[^']|'')*+(?:'|\Z))
  | (?P<string>'(?:[^']|'')*+(?:'|\Z))
  | (?<![A-Za-z0-9_$\x80-\U0010ffff])(?P<dollar>\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*+)?\$)
  | (?P<param>\$[0-9]++)
  | (?P<qident>(?:[uU]&)?"(?:[^"]|"")*+(?:"|\Z))
  | (?P<word>[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*+)
  | (?P<number>0[xX][0-9A-Fa-f_]++|0[oO][0-7_]++|0[bB][01_]++
        |(?:[0-9][0-9_]*+(?:\.[0-9_]*+)?|\.[0-9][0-9_]*+)(?:[eE][+-]?[0-9]++)?)
  | (?P<op>[\s\S])
    """,
    re.VERBOSE,
)

_STRING_GROUPS = frozenset({"estring", "ustring", "bstring", "nstring", "string"})
# With standard_conforming_strings off, a backslash escapes in ordinary (and N'') literals too, as in E'' ones.
_PLAIN_STRING = r"""(?P<string>'(?:[^']|'')*+(?:'|\Z))"""
_NATIONAL_STRING = r"""(?P<nstring>[nN]'(?:[^']|'')*+(?:'|\Z))"""
assert _PLAIN_STRING in _TOKEN_RE.pattern and _NATIONAL_STRING in _TOKEN_RE.pattern
_TOKEN_RE_BACKSLASH = re.compile(
    _TOKEN_RE.pattern.replace(_PLAIN_STRING, r"""(?P<string>'(?:[^'\\]|\\[\s\S]|'')*+\\?(?:'|\Z))""").replace(
        _NATIONAL_STRING, r"""(?P<nstring>[nN]'(?:[^'\\]|\\[\s\S]|'')*+\\?(?:'|\Z))"""
    ),
    re.VERBOSE,
)


class Token(NamedTuple):
    """One lexical token: its kind, its exact text, and its span in the source string."""

    kind: str
    text: str
    start: int
    end: int
    sub: str = ""  # for STRING: "e", "u", "b", "n", "", "dollar"; for WORD: the word folded to lower case


def _block_comment_end(sql: str, start: int) -> int:
    """End of the (nested, per PostgreSQL) block comment starting at `start`; len(sql) when unterminated."""
    depth = 0
    i = start
    n = len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
            continue
        k = sql.find("/*", i)
        j = sql.find("*/", i)
        if j < 0:
            return n
        if 0 <= k < j:
            depth += 1
            i = k + 2
            continue
        depth -= 1
        i = j + 2
        if depth == 0:
            return i
    return n


def scan(sql: str, backslash_quotes: bool = False) -> Iterator[Token]:
    """Yield every token of `sql`, whitespace and comments included (as SPACE). Never raises.

    `backslash_quotes`: standard_conforming_strings is off, a backslash escapes in '...' (the token is then an
    "e" string: its value is decoded as E'...' is).
    """
    pos = 0
    n = len(sql)
    match = _TOKEN_RE_BACKSLASH.match if backslash_quotes else _TOKEN_RE.match
    plain = "e" if backslash_quotes else ""
    while pos < n:
        m = match(sql, pos)
        if m is None:  # pragma: no cover - the last alternative matches any character
            yield Token(OP, sql[pos], pos, pos + 1)
            pos += 1
            continue
        group = m.lastgroup or "op"
        end = m.end()
        if group == "bcomment":
            end = _block_comment_end(sql, pos)
            yield Token(SPACE, sql[pos:end], pos, end)
        elif group == "dollar":
            tag = m.group()
            close = sql.find(tag, end)
            end = n if close < 0 else close + len(tag)
            yield Token(STRING, sql[pos:end], pos, end, "dollar")
        elif group in _STRING_GROUPS:
            yield Token(STRING, m.group(), pos, end, group[0] if group != "string" else plain)
        elif group == "space":
            yield Token(SPACE, m.group(), pos, end)
        elif group == "word":
            text = m.group()
            yield Token(WORD, text, pos, end, text.lower() if text.isascii() else fold(text))
        else:
            yield Token(group, m.group(), pos, end)
        pos = end


def tokenize(sql: str, backslash_quotes: bool = False) -> list[Token]:
    """The tokens of `sql` without whitespace and comments."""
    return [t for t in scan(sql, backslash_quotes) if t.kind != SPACE]


# --- identifiers -----------------------------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


# NAMEDATALEN - 1: PostgreSQL truncates a longer identifier (quoted or not) to this many bytes, at a character
# boundary, with a NOTICE (scansup.c, truncate_identifier). A write naming a table by its long name must invalidate
# the name a read of the same table resolves to.
NAME_MAX_BYTES = 63


def truncate_identifier(name: str) -> str:
    """The identifier as PostgreSQL stores it."""
    if len(name) <= NAME_MAX_BYTES // 4:  # at most 4 bytes a character in UTF-8: short names need no encoding
        return name
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) <= NAME_MAX_BYTES:
        return name
    return raw[:NAME_MAX_BYTES].decode("utf-8", "ignore")  # drops a character cut in two


def fold(word: str) -> str:
    """Fold an unquoted identifier as PostgreSQL does for a UTF-8 database: ASCII letters only."""
    return word.translate(_ASCII_LOWER)


def is_unicode_ident(name: str) -> bool:
    """A U&"..." identifier, kept as written by `ident_value` (its escapes are not decoded)."""
    return name[:3] in ('U&"', 'u&"')


def ident_value(tok: Token) -> str:
    """The identifier a WORD or QIDENT token names (folded, or unquoted with "" undoubled), truncated as stored."""
    if tok.kind == QIDENT:
        text = tok.text
        if text[:1] in "uU":  # U&"..." with escapes: keep it as written, it is rare and never folded
            return text
        body = text[1:-1] if len(text) >= 2 and text.endswith('"') else text[1:]
        return truncate_identifier(body.replace('""', '"'))
    return truncate_identifier(tok.sub if tok.kind == WORD else fold(tok.text))


def is_word(tok: Token | None, *words: str) -> bool:
    """Whether `tok` is an unquoted word equal (case-insensitively) to one of `words`."""
    return tok is not None and tok.kind == WORD and tok.sub in words


def read_name(tokens: Sequence[Token], i: int) -> tuple[list[str], int]:
    """Read a dotted name `a.b.c` at index i; returns its parts (empty if none) and the index after it."""
    parts: list[str] = []
    n = len(tokens)
    while i < n and tokens[i].kind in (WORD, QIDENT):
        parts.append(ident_value(tokens[i]))
        if i + 1 < n and tokens[i + 1].kind == OP and tokens[i + 1].text == ".":
            i += 2
            continue
        i += 1
        break
    return parts, i


def table_ref(parts: Sequence[str]) -> TableRef:
    """A TableRef from name parts: db.schema.t -> (schema, t); UNKNOWN_TABLE for a U&"..." name, whose decoded
    value (escapes, UESCAPE) we do not compute: a write to it must not invalidate only the name as written."""
    if any(is_unicode_ident(part) for part in parts[-2:]):
        return UNKNOWN_TABLE
    if len(parts) >= 2:
        return (parts[-2], parts[-1])
    return (None, parts[-1])


# --- operators -------------------------------------------------------------------------------------------------

_OPERATOR_CHARS = frozenset("+-*/<>=~!@#%^&|`?")
_MAX_OPERATOR_RUN = 8  # longer runs are split into every piece up to this length (the server's lexer splits them)


def operator_symbols(tokens: Sequence[Token]) -> set[str]:
    """Every operator a statement may use: each run of adjacent operator characters and all its pieces (the server
    splits `a*-b` into `*` and `-`, section 4.1.3), plus the operator named by OPERATOR(schema.op)."""
    found: set[str] = set()
    run = ""
    end = -1
    for tok in tokens:
        if tok.kind == OP and tok.text in _OPERATOR_CHARS:
            run = run + tok.text if tok.start == end else tok.text
            end = tok.end
            tail = run[-_MAX_OPERATOR_RUN:]
            found.update(tail[i:] for i in range(len(tail)))  # every piece ending here
        else:
            end = -1
    return found


# --- statements ------------------------------------------------------------------------------------------------


def split_statements(tokens: Sequence[Token]) -> list[list[Token]]:
    """Split tokens at top-level semicolons, dropping empty statements.

    Like psql, a semicolon inside parentheses does not end a statement, nor one inside a SQL-standard function
    body (`CREATE FUNCTION ... BEGIN ATOMIC ...; ... END`), where BEGIN/CASE ... END nest.
    """
    statements: list[list[Token]] = []
    current: list[Token] = []
    depth = 0
    atomic = 0  # BEGIN/CASE nesting inside BEGIN ATOMIC
    for tok in tokens:
        if tok.kind == OP:
            if tok.text == "(":
                depth += 1
            elif tok.text == ")":
                depth = max(0, depth - 1)
            elif tok.text == ";" and depth == 0 and atomic == 0:
                if current:
                    statements.append(current)
                current = []
                continue
        elif tok.kind == WORD and (atomic or _may_open_atomic(current)):
            low = fold(tok.text)
            if (low == "atomic" and current and is_word(current[-1], "begin")) or (atomic and low in ("begin", "case")):
                atomic += 1
            elif atomic and low == "end":
                atomic -= 1
        current.append(tok)
    if current:
        statements.append(current)
    return statements


def _may_open_atomic(current: Sequence[Token]) -> bool:
    return bool(current) and is_word(current[0], "create")


# --- string literals -------------------------------------------------------------------------------------------

_E_ESCAPE_RE = re.compile(r"\\(?:x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|[\s\S])")
_E_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_U_ESCAPE_RE = re.compile(r"\\(?:\\|\+[0-9A-Fa-f]{6}|[0-9A-Fa-f]{4})")


def _e_escape(m: re.Match[str]) -> str:
    s = m.group()[1:]
    try:
        if s[0] == "x" and len(s) > 1:
            return chr(int(s[1:], 16))
        if s[0] in "01234567":
            return chr(int(s, 8) & 0xFF)
        if s[0] in "uU" and len(s) > 1:
            return chr(int(s[1:], 16))
    except (ValueError, OverflowError):
        return ""
    return _E_SIMPLE.get(s, s)


def _u_escape(m: re.Match[str]) -> str:
    s = m.group()[1:]
    if s == "\\":
        return "\\"
    try:
        return chr(int(s.lstrip("+"), 16))
    except (ValueError, OverflowError):
        return ""


def string_value(tok: Token) -> str:
    """The value of a STRING token, escapes decoded (best effort; never raises)."""
    text = tok.text
    sub = tok.sub
    if sub == "dollar":
        tag_end = text.find("$", 1) + 1
        tag = text[:tag_end]
        body = text[tag_end:]
        return body[: -len(tag)] if body.endswith(tag) and len(text) >= 2 * len(tag) else body
    start = 2 if sub in ("b", "n") or (sub == "e" and text[:1] in "eE") else 3 if sub == "u" else 1
    body = text[start:]
    if body.endswith("'") and len(text) > start:
        body = body[:-1]
    if sub == "e":
        return _E_ESCAPE_RE.sub(_e_escape, body.replace("''", "'"))
    body = body.replace("''", "'")
    if sub == "u":
        return _U_ESCAPE_RE.sub(_u_escape, body)
    return body


# Special date/time input strings (PostgreSQL docs 8.5.1.4, "Special Values"). 'now', 'today', 'tomorrow' and
# 'yesterday' are evaluated when the literal is parsed, so the same text means a different value each time;
# 'current' is an obsolete synonym that old servers accepted. They may be combined with a time ('tomorrow 10:00'),
# so a literal is special when any of its words is one of them. 'epoch', 'infinity', '-infinity' and 'allballs'
# are constants: they are kept verbatim by the fingerprint (as the spec asks) but do not prevent caching.
_SPECIAL_WORD_RE = re.compile(
    r"(?<![a-z])(now|today|tomorrow|yesterday|current|epoch|infinity|allballs)(?![a-z])", re.IGNORECASE
)
TIME_DEPENDENT_WORDS = frozenset({"now", "today", "tomorrow", "yesterday", "current"})
_TIME_WORD_BYTES = re.compile(
    rb"(?i)(?<![a-z])(" + b"|".join(sorted(w.encode() for w in TIME_DEPENDENT_WORDS)) + rb")(?![a-z])"
)

_TIME_WORD_HINT = re.compile(rb"[tToO]")


def names_time_word(data: bytes) -> bool:
    """Whether raw bytes (a Bind's parameter values) contain a time-dependent word: a parameter such as 'now' is
    evaluated when the statement runs, so its result is never the same twice.

    >>> names_time_word(b"\\x00\\x00\\x00\\x03now"), names_time_word(b"snow")
    (True, False)
    """
    # Every such word has a "t" or an "o": most parameters (numbers, ids) have neither, and a scan for those four
    # bytes costs a fraction of the words' scan, with its look-behind at every position.
    return _TIME_WORD_HINT.search(data) is not None and _TIME_WORD_BYTES.search(data) is not None


def special_words(tok: Token) -> frozenset[str]:
    """The special date/time words in a STRING token (empty for most literals). Bit strings never have any."""
    if tok.sub == "b":
        return frozenset()
    value = string_value(tok)
    found = _SPECIAL_WORD_RE.findall(value)
    return frozenset(w.lower() for w in found)


def has_uescape(tokens: Sequence[Token], i: int) -> bool:
    """Whether the U&'' string at tokens[i] is followed by UESCAPE (a custom escape we do not decode)."""
    return i + 1 < len(tokens) and is_word(tokens[i + 1], "uescape")
