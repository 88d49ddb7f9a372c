"""A session's string rules: how its SQL bytes decode to text, and whether a backslash escapes inside '...'.

The server reads a query in the client's encoding (client_encoding, converted to the server's before lexing) and,
with standard_conforming_strings off, takes a backslash in an ordinary string literal as an escape (docs 4.1.2.2,
"String Constants with C-Style Escapes"). Both reach the proxy by ParameterStatus. Read as UTF-8 with standard
strings, `SELECT 'a\\'' ; UPDATE t ...` hides the UPDATE inside a string, and so does a Shift-JIS or Big5 character
whose second byte is 0x5C (a backslash) inside an E'' string. A mode names the rules; "" is the common case (UTF-8,
SQL_ASCII or another ASCII-safe encoding read as UTF-8, standard strings), for which nothing changes.

    >>> mode("on", "UTF8"), mode("off", "UTF8"), mode("on", "SJIS"), mode("on", "MULE_INTERNAL")
    ('', 'utf-8|backslash', 'cp932', '?')
    >>> decode(b"SELECT '\\x95\\x5c'", mode("on", "SJIS"))
    "SELECT '表'"
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

# PostgreSQL client encodings (docs 24.3.1, table "Character Sets") -> Python codecs. UTF8 and SQL_ASCII are read
# as UTF-8 (SQL_ASCII is not converted by the server either). An encoding missing here (MULE_INTERNAL, EUC_TW) has
# no Python codec: a non-ASCII statement of such a session is not analyzed (see `decode`).
_CODECS: Final = {
    "utf8": "utf-8", "unicode": "utf-8", "sql_ascii": "utf-8",
    "latin1": "iso8859-1", "latin2": "iso8859-2", "latin3": "iso8859-3", "latin4": "iso8859-4",
    "latin5": "iso8859-9", "latin6": "iso8859-10", "latin7": "iso8859-13", "latin8": "iso8859-14",
    "latin9": "iso8859-15", "latin10": "iso8859-16", "iso_8859_5": "iso8859-5", "iso_8859_6": "iso8859-6",
    "iso_8859_7": "iso8859-7", "iso_8859_8": "iso8859-8", "win866": "cp866", "win874": "cp874",
    "win1250": "cp1250", "win1251": "cp1251", "win1252": "cp1252", "win1253": "cp1253", "win1254": "cp1254",
    "win1255": "cp1255", "win1256": "cp1256", "win1257": "cp1257", "win1258": "cp1258", "koi8r": "koi8_r",
    "koi8u": "koi8_u", "euc_jp": "euc_jp", "euc_kr": "euc_kr", "euc_cn": "gb2312", "euc_jis_2004": "euc_jis_2004",
    # Multibyte encodings whose second bytes include 0x5C: a UTF-8 reading sees a backslash that is not there.
    "sjis": "cp932", "shift_jis_2004": "shift_jis_2004", "big5": "cp950", "gbk": "gbk", "gb18030": "gb18030",
    "uhc": "cp949", "johab": "johab",
}  # fmt: skip
UNKNOWN: Final = "?"  # no codec: the statement's text cannot be known when it is not ASCII


@lru_cache(maxsize=64)
def mode(standard_conforming_strings: str | None, client_encoding: str | None) -> str:
    """The mode of a session from its reported parameters (None: not reported, the defaults)."""
    name = (client_encoding or "UTF8").lower().replace("-", "_")
    codec = _CODECS.get(name, UNKNOWN)
    backslash = (standard_conforming_strings or "on").lower() == "off"
    if codec == "utf-8" and not backslash:
        return ""
    return f"{codec}|backslash" if backslash else codec


def backslash_quotes(mode: str) -> bool:
    """Whether a backslash escapes inside '...' in this mode."""
    return mode.endswith("|backslash")


def decode(sql: bytes, mode: str) -> str | None:
    """The statement text as the server reads it; None when it cannot be known (no codec, non-ASCII bytes)."""
    codec = mode.split("|", 1)[0] or "utf-8"
    if codec == UNKNOWN:
        return sql.decode("ascii") if sql.isascii() else None
    return sql.decode(codec, "replace")
