"""The LISTEN channels of one session, as the statements that set them, to replay on a new upstream. Sans-IO."""

from __future__ import annotations

import re

# A statement naming LISTEN or UNLISTEN anywhere (a word, any case).
_MENTIONS = re.compile(rb"(?i)\b(?:un)?listen\b")
# Statements that are all LISTEN / UNLISTEN (a channel identifier, quoted or not, or UNLISTEN *): safe to run again.
_ONLY = re.compile(rb'(?i)\s*(?:(?:un)?listen\s+(?:"(?:[^"]|"")+"|[\w$]+|\*)\s*(?:;\s*|$))+')


class Listens:
    """LISTEN/UNLISTEN statements a session sent, in order; `unknown` once one came mixed with other statements
    (running it again would run those too)."""

    __slots__ = ("statements", "unknown")

    def __init__(self) -> None:
        self.statements: list[bytes] = []
        self.unknown = False

    def note(self, sql: bytes) -> None:
        """A statement of kind OTHER was sent: keep it if it is LISTEN/UNLISTEN.

        >>> listens = Listens()
        >>> listens.note(b"LISTEN old"); listens.note(b"unlisten *")
        >>> listens.note(b'LISTEN "Jobs"'); listens.note(b"show work_mem")
        >>> listens.statements, listens.unknown
        ([b'unlisten *', b'LISTEN "Jobs"'], False)
        >>> listens.note(b"LISTEN a; SELECT f()"); listens.unknown
        True
        """
        if not _MENTIONS.search(sql):
            return
        if not _ONLY.fullmatch(sql):
            self.unknown = True
            return
        if sql.strip().lower().startswith(b"unlisten *"):
            self.statements.clear()  # nothing before it matters any more
        self.statements.append(sql)
