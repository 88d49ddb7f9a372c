"""Statements read from our own tokens: transaction control, session state, DDL targets, and the utility commands.

sqlglot parses most of these into a generic Command, or worse into something plausible but wrong (`SAVEPOINT s` is
a column with an alias, `DISCARD ALL` too), so the analyzer dispatches on the leading keywords and only hands the
query parts to sqlglot. Grammar references are the PostgreSQL "SQL Commands" reference pages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cacheproxy.analysis.lexer import OP, WORD, Token, is_word, read_name, table_ref
from cacheproxy.analysis.model import UNKNOWN_TABLE, Kind, SessionChange, TableRef, TxInfo, TxOp


@dataclass(slots=True)
class Draft:
    """The analysis of one statement, while it is being built."""

    kind: Kind
    label: str  # what the statement is, for reasons: "UPDATE", "CREATE TABLE", "BEGIN", ...
    reads: set[TableRef] = field(default_factory=set)
    writes: set[TableRef] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    cacheable: bool = False
    reason: str | None = None
    tx: TxInfo | None = None
    session: SessionChange | None = None
    temp_tables: set[TableRef] = field(default_factory=set)
    data_modifying_cte: bool = False
    prepares: str | None = None
    deallocates: str | None = None
    deallocates_all: bool = False
    executes: str | None = None
    copy_from_stdin: bool = False
    alters_role_settings: bool = False
    drops_database: str | None = None
    operators: set[str] = field(default_factory=set)
    casts: set[str] = field(default_factory=set)
    time_casts: set[str] = field(default_factory=set)
    attributes: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)

    def take_code(self, inner: Draft) -> None:
        """What an embedded query runs (COPY (query) TO, EXPLAIN ANALYZE, DECLARE, PREPARE, CREATE ... AS) runs here."""
        self.functions |= inner.functions
        self.operators |= inner.operators
        self.casts |= inner.casts
        self.time_casts |= inner.time_casts
        self.attributes |= inner.attributes


# Analyzes an embedded statement (the query of CREATE VIEW ... AS, COPY (...) TO, EXPLAIN, DECLARE, PREPARE).
SubAnalyze = Callable[[Sequence[Token]], Draft]


class Cursor:
    """Walks a statement's tokens by keyword."""

    def __init__(self, tokens: Sequence[Token], sql: str) -> None:
        self.tokens = tokens
        self.sql = sql
        self.i = 0

    def word(self, k: int = 0) -> str | None:
        j = self.i + k
        if j < len(self.tokens) and self.tokens[j].kind == WORD:
            return self.tokens[j].sub
        return None

    def accept(self, *words: str) -> bool:
        """Consume the next tokens if they are exactly `words`."""
        for k, w in enumerate(words):
            if self.word(k) != w:
                return False
        self.i += len(words)
        return True

    def skip_any(self, *words: str) -> None:
        while self.word() in words:
            self.i += 1

    def at_op(self, text: str) -> bool:
        return self.i < len(self.tokens) and self.tokens[self.i].kind == OP and self.tokens[self.i].text == text

    def name(self) -> list[str]:
        parts, self.i = read_name(self.tokens, self.i)
        return parts

    def table(self) -> TableRef | None:
        parts = self.name()
        return table_ref(parts) if parts else None

    def rest(self) -> str | None:
        """The source text from the current token to the end of the statement, or None."""
        if self.i >= len(self.tokens):
            return None
        return self.sql[self.tokens[self.i].start : self.tokens[-1].end]

    def skip_parens(self) -> None:
        """Skip a parenthesised group at the cursor, if any."""
        if not self.at_op("("):
            return
        depth = 0
        while self.i < len(self.tokens):
            tok = self.tokens[self.i]
            self.i += 1
            if tok.kind == OP and tok.text == "(":
                depth += 1
            elif tok.kind == OP and tok.text == ")":
                depth -= 1
                if depth == 0:
                    return

    def find_top_word(self, *words: str) -> int:
        """Index (from the cursor) of the first of `words` outside parentheses, or -1."""
        depth = 0
        for j in range(self.i, len(self.tokens)):
            tok = self.tokens[j]
            if tok.kind == OP and tok.text in "()":
                depth += 1 if tok.text == "(" else -1
            elif depth == 0 and tok.kind == WORD and tok.sub in words:
                return j
        return -1

    def tables_list(self, stop: tuple[str, ...] = ()) -> list[TableRef]:
        """Read `[ONLY] name [*] [, ...]`, stopping at a word in `stop` or anything unexpected."""
        refs: list[TableRef] = []
        while True:
            self.accept("only")
            if self.word() in stop:
                break
            ref = self.table()
            if ref is None:
                break
            refs.append(ref)
            if self.at_op("*"):
                self.i += 1
            self.skip_parens()  # VACUUM/ANALYZE column lists
            if not self.at_op(","):
                break
            self.i += 1
        return refs


# --- transaction control -------------------------------------------------------------------------------------

_ISOLATION = {
    ("read", "committed"): "read committed",
    ("read", "uncommitted"): "read uncommitted",
    ("repeatable", "read"): "repeatable read",
    ("serializable", None): "serializable",
}


def transaction(c: Cursor) -> Draft:
    """BEGIN, START TRANSACTION, COMMIT, END, ROLLBACK, ABORT, SAVEPOINT, RELEASE, ROLLBACK TO, *PREPARED."""
    first = c.word() or ""
    c.i += 1
    if first in ("begin", "start"):
        c.skip_any("work", "transaction")
        return _tx(first.upper() if first == "begin" else "START TRANSACTION", _begin_modes(c))
    if first in ("commit", "end", "rollback", "abort"):
        is_commit = first in ("commit", "end")
        if c.accept("prepared"):
            op = TxOp.COMMIT_PREPARED if is_commit else TxOp.ROLLBACK_PREPARED
            return _tx(f"{first.upper()} PREPARED", TxInfo(op))
        c.skip_any("work", "transaction")
        if not is_commit and c.accept("to"):
            return _tx("ROLLBACK TO", TxInfo(TxOp.ROLLBACK_TO))
        chain = c.accept("and", "chain")
        return _tx(first.upper(), TxInfo(TxOp.COMMIT if is_commit else TxOp.ROLLBACK, chain=chain))
    if first == "savepoint":
        return _tx("SAVEPOINT", TxInfo(TxOp.SAVEPOINT))
    if first == "release":
        return _tx("RELEASE", TxInfo(TxOp.RELEASE))
    return _tx("PREPARE TRANSACTION", TxInfo(TxOp.PREPARE_TRANSACTION))


def _tx(label: str, info: TxInfo) -> Draft:
    return Draft(Kind.TRANSACTION, label, tx=info)


def _begin_modes(c: Cursor) -> TxInfo:
    isolation: str | None = None
    read_only: bool | None = None
    deferrable: bool | None = None
    while c.i < len(c.tokens):
        if c.at_op(","):
            c.i += 1
        elif c.accept("isolation", "level"):
            key = (c.word() or "", c.word(1))
            level = _ISOLATION.get(key) or _ISOLATION.get((key[0], None))
            if level is None:
                break
            c.i += 1 if level == "serializable" else 2
            isolation = level
        elif c.accept("read", "only"):
            read_only = True
        elif c.accept("read", "write"):
            read_only = False
        elif c.accept("not", "deferrable"):
            deferrable = False
        elif c.accept("deferrable"):
            deferrable = True
        else:
            break
    return TxInfo(TxOp.BEGIN, isolation, read_only, deferrable)


# --- session state -------------------------------------------------------------------------------------------


def session(c: Cursor) -> Draft:
    """SET, RESET, DISCARD and their ROLE / SESSION AUTHORIZATION / TRANSACTION forms."""
    first = c.word() or ""
    c.i += 1
    if first == "reset":
        return Draft(Kind.SESSION, "RESET", session=_reset(c))
    if first == "discard":
        what = c.word()
        if what == "all":
            return Draft(Kind.SESSION, "DISCARD", session=SessionChange("discard_all"))
        return Draft(
            Kind.SESSION, "DISCARD", session=SessionChange("discard_other", "temp" if what == "temporary" else what)
        )
    return Draft(Kind.SESSION, "SET", session=_set(c))


def _reset(c: Cursor) -> SessionChange:
    if c.accept("all"):
        return SessionChange("reset_all")
    if c.accept("role"):
        return SessionChange("reset_role", "role")
    if c.accept("session", "authorization"):
        return SessionChange("set_session_authorization", "session_authorization", None)
    if c.accept("time", "zone"):
        return SessionChange("reset", "timezone")
    parts = c.name()
    return SessionChange("reset", ".".join(parts) if parts else None)


def _set(c: Cursor) -> SessionChange:
    local = False
    if c.word() == "local":
        local = True
        c.i += 1
    elif c.word() == "session" and c.word(1) not in ("authorization", "characteristics"):
        c.i += 1
    if c.accept("transaction"):
        return SessionChange("set_transaction", "transaction", c.rest())
    if c.accept("session", "characteristics", "as", "transaction"):
        return SessionChange("set", "session_characteristics", c.rest())
    if c.accept("role"):
        value = c.rest()
        if local:
            return SessionChange("set_local", "role", value)
        if value is not None and value.lower() == "none":
            return SessionChange("reset_role", "role", None)
        return SessionChange("set_role", "role", value)
    if c.accept("session", "authorization"):
        value = c.rest()
        if local:
            return SessionChange("set_local", "session_authorization", value)
        return SessionChange(
            "set_session_authorization",
            "session_authorization",
            None if value and value.lower() == "default" else value,
        )
    if c.accept("time", "zone"):
        name: str | None = "timezone"
    elif c.accept("schema"):
        name = "search_path"
    elif c.accept("names"):
        name = "client_encoding"
    else:
        parts = c.name()
        name = ".".join(parts) if parts else None
        if c.word() == "to" or c.at_op("="):
            c.i += 1
    return SessionChange("set_local" if local else "set", name, c.rest())


# --- DDL -------------------------------------------------------------------------------------------------------

# CREATE [OR REPLACE] [modifiers] <object>: modifiers that may come before the object word.
_CREATE_MODIFIERS = (
    "global",
    "local",
    "temp",
    "temporary",
    "unlogged",
    "recursive",
    "unique",
    "constraint",
    "trusted",
    "procedural",
    "default",
    "or",
    "replace",
)
_TABLE_LIKE = ("table", "view")


def ddl(c: Cursor, sub: SubAnalyze) -> Draft:
    """CREATE / ALTER / DROP / COMMENT / GRANT / REVOKE / REFRESH / REINDEX / CLUSTER / SECURITY LABEL / others."""
    first = c.word() or ""
    c.i += 1
    handler = _DDL_HANDLERS.get(first)
    draft = Draft(Kind.DDL, first.upper()) if handler is None else handler(c, sub)
    if draft.kind == Kind.DDL and not draft.writes:
        draft.writes.add(UNKNOWN_TABLE)
    return draft


def _create(c: Cursor, sub: SubAnalyze) -> Draft:
    modifiers: list[str] = []
    while (w := c.word()) in _CREATE_MODIFIERS:
        modifiers.append(w or "")
        c.i += 1
    obj = c.word() or ""
    if obj == "materialized" and c.word(1) == "view":
        c.i += 1
        obj = "materialized view"
    elif obj == "foreign" and c.word(1) == "table":
        c.i += 1
        obj = "foreign table"
    elif obj == "event" and c.word(1) == "trigger":
        obj = "event trigger"
    c.i += 1
    draft = Draft(Kind.DDL, f"CREATE {obj.upper()}")
    if obj in ("table", "view", "materialized view", "foreign table"):
        c.accept("if", "not", "exists")
        ref = c.table()
        if ref is not None:
            draft.writes.add(ref)
            # A temporary view shadows a table of the same name for this session, just as a temporary table does.
            if obj in ("table", "view") and (("temp" in modifiers or "temporary" in modifiers) or ref[0] == "pg_temp"):
                draft.temp_tables.add(ref)
        j = c.find_top_word("partition")
        if j >= 0 and is_word(c.tokens[j + 1] if j + 1 < len(c.tokens) else None, "of"):
            parent, _ = read_name(c.tokens, j + 2)
            if parent:
                draft.writes.add(table_ref(parent))
        _embedded_query(c, draft, sub)
    elif obj == "index" or obj in ("trigger", "policy"):
        _on_table(c, draft)
    elif obj == "rule":
        j = c.find_top_word("to")
        if j >= 0:
            rule_table, _ = read_name(c.tokens, j + 1)
            if rule_table:
                draft.writes.add(table_ref(rule_table))
    return draft


def _on_table(c: Cursor, draft: Draft) -> None:
    """`... ON [ONLY] table` (CREATE INDEX / TRIGGER / POLICY, DROP/ALTER POLICY / TRIGGER / RULE)."""
    j = c.find_top_word("on")
    if j < 0:
        return
    c.i = j + 1
    c.accept("only")
    ref = c.table()
    if ref is not None:
        draft.writes.add(ref)


def _embedded_query(c: Cursor, draft: Draft, sub: SubAnalyze) -> None:
    """CREATE TABLE/VIEW ... AS query: analyze the query for what it reads."""
    j = c.find_top_word("as")
    while j >= 0 and j + 1 < len(c.tokens):
        nxt = c.tokens[j + 1]
        if is_word(nxt, "select", "with", "values", "table") or (nxt.kind == OP and nxt.text == "("):
            end = len(c.tokens)
            if end - j > 3 and is_word(c.tokens[end - 1], "data") and is_word(c.tokens[end - 3], "with"):
                end -= 3  # WITH NO DATA
            elif end - j > 2 and is_word(c.tokens[end - 1], "data") and is_word(c.tokens[end - 2], "with"):
                end -= 2  # WITH DATA
            inner = sub(c.tokens[j + 1 : end])
            draft.reads |= inner.reads
            draft.take_code(inner)
            return
        c.i = j + 1
        j = c.find_top_word("as")


def _alter(c: Cursor, sub: SubAnalyze) -> Draft:
    obj = c.word() or ""
    if obj in ("materialized", "foreign") and c.word(1) in ("view", "table"):
        obj = f"{obj} {c.word(1)}"
        c.i += 1
    c.i += 1
    draft = Draft(Kind.DDL, f"ALTER {obj.upper()}")
    if obj in ("role", "user", "database"):
        draft.alters_role_settings = any(is_word(tok, "set", "reset") for tok in c.tokens[c.i :])
    if obj in ("table", "view", "materialized view", "foreign table"):
        if c.word() == "all":
            return draft
        c.accept("if", "exists")
        c.accept("only")
        ref = c.table()
        if ref is not None:
            draft.writes.add(ref)
            j = c.find_top_word("rename")
            if j >= 0 and is_word(c.tokens[j + 1] if j + 1 < len(c.tokens) else None, "to"):
                new, _ = read_name(c.tokens, j + 2)
                if new:
                    draft.writes.add((ref[0], new[-1]))
            j = c.find_top_word("partition")
            if j >= 0 and j > 0 and is_word(c.tokens[j - 1], "attach", "detach"):
                part, _ = read_name(c.tokens, j + 1)
                if part:
                    draft.writes.add(table_ref(part))
    elif obj in ("policy", "trigger", "rule"):
        _on_table(c, draft)
    return draft


def _drop(c: Cursor, sub: SubAnalyze) -> Draft:
    obj = c.word() or ""
    if obj in ("materialized", "foreign") and c.word(1) in ("view", "table"):
        obj = f"{obj} {c.word(1)}"
        c.i += 1
    c.i += 1
    draft = Draft(Kind.DDL, f"DROP {obj.upper()}")
    if obj in ("table", "view", "materialized view", "foreign table"):
        c.accept("if", "exists")
        draft.writes.update(c.tables_list())
    elif obj in ("policy", "trigger", "rule"):
        _on_table(c, draft)
    elif obj == "database":
        c.accept("if", "exists")
        name, _ = read_name(c.tokens, c.i)
        draft.drops_database = name[0] if len(name) == 1 else None
    if c.find_top_word("cascade") >= 0:  # dependent objects (views, ...) go too: we cannot name them
        draft.writes.add(UNKNOWN_TABLE)
    return draft


def _comment(c: Cursor, sub: SubAnalyze) -> Draft:
    draft = Draft(Kind.DDL, "COMMENT")
    c.accept("on")
    obj = c.word() or ""
    if obj in ("materialized", "foreign") and c.word(1) in ("view", "table"):
        c.i += 1
        obj = "table"
    c.i += 1
    parts = c.name()
    if obj in _TABLE_LIKE and parts:
        draft.writes.add(table_ref(parts))
    elif obj == "column" and len(parts) >= 2:
        draft.writes.add(table_ref(parts[:-1]))
    return draft


def _grant(c: Cursor, sub: SubAnalyze) -> Draft:
    first = c.tokens[0].sub.upper()
    draft = Draft(Kind.DDL, first)
    j = c.find_top_word("on")
    if j < 0:  # GRANT role TO user: changes what the user may read
        return draft
    c.i = j + 1
    c.accept("table")
    if c.word() in (
        "all",
        "sequence",
        "function",
        "procedure",
        "routine",
        "schema",
        "database",
        "language",
        "large",
        "tablespace",
        "type",
        "domain",
        "foreign",
        "parameter",
    ):
        return draft
    draft.writes.update(c.tables_list(stop=("to", "from")))
    return draft


def _refresh(c: Cursor, sub: SubAnalyze) -> Draft:
    draft = Draft(Kind.DDL, "REFRESH MATERIALIZED VIEW")
    if c.accept("materialized", "view"):
        c.accept("concurrently")
        ref = c.table()
        if ref is not None:
            draft.writes.add(ref)
    return draft


def _reindex(c: Cursor, sub: SubAnalyze) -> Draft:
    draft = Draft(Kind.DDL, "REINDEX")
    c.skip_parens()
    if c.accept("table"):
        c.accept("concurrently")
        ref = c.table()
        if ref is not None:
            draft.writes.add(ref)
    return draft


def _cluster(c: Cursor, sub: SubAnalyze) -> Draft:
    draft = Draft(Kind.DDL, "CLUSTER")
    c.skip_parens()
    c.accept("verbose")
    ref = c.table()
    if ref is not None:
        draft.writes.add(ref)
    return draft


def _security(c: Cursor, sub: SubAnalyze) -> Draft:
    draft = Draft(Kind.DDL, "SECURITY LABEL")
    j = c.find_top_word("on")
    if j >= 0:
        c.i = j + 1
        obj = c.word()
        if obj in ("table", "column"):
            c.i += 1
            parts = c.name()
            if parts:
                draft.writes.add(table_ref(parts if obj == "table" else parts[:-1] or parts))
    return draft


_DDL_HANDLERS: dict[str, Callable[[Cursor, SubAnalyze], Draft]] = {
    "create": _create,
    "alter": _alter,
    "drop": _drop,
    "comment": _comment,
    "grant": _grant,
    "revoke": _grant,
    "refresh": _refresh,
    "reindex": _reindex,
    "cluster": _cluster,
    "security": _security,
}


# --- utility commands ----------------------------------------------------------------------------------------


def truncate(c: Cursor) -> Draft:
    """TRUNCATE [TABLE] [ONLY] name [*] [, ...] [RESTART|CONTINUE IDENTITY] [CASCADE|RESTRICT]."""
    c.i += 1
    c.accept("table")
    draft = Draft(Kind.WRITE, "TRUNCATE")
    draft.writes.update(c.tables_list())
    if not draft.writes or c.find_top_word("cascade") >= 0:  # CASCADE truncates referencing tables too
        draft.writes.add(UNKNOWN_TABLE)
    return draft


def copy(c: Cursor, sub: SubAnalyze) -> Draft:
    """COPY table [(cols)] FROM ... (a write) or COPY {table | (query)} TO ... (a read that is streamed)."""
    c.i += 1
    if c.at_op("("):
        start = c.i + 1
        c.skip_parens()
        inner = sub(c.tokens[start : c.i - 1])
        draft = Draft(Kind.READ, "COPY TO", reads=set(inner.reads))
        draft.take_code(inner)
        draft.reason = "COPY is streamed, not cached"
        if inner.kind is Kind.WRITE or inner.writes:
            # COPY (INSERT/UPDATE/DELETE ... RETURNING, or a data-modifying WITH) TO: the statement runs, and writes.
            draft.kind, draft.label = Kind.WRITE, "COPY (...) TO"
            draft.writes = set(inner.writes) or {UNKNOWN_TABLE}
            draft.data_modifying_cte = inner.data_modifying_cte
        return draft
    c.accept("binary")
    ref = c.table()
    c.skip_parens()
    if c.word() == "from":
        draft = Draft(Kind.WRITE, "COPY FROM")
        draft.writes.add(ref if ref is not None else UNKNOWN_TABLE)
        draft.copy_from_stdin = c.word(1) == "stdin"
        return draft
    draft = Draft(Kind.READ, "COPY TO", reason="COPY is streamed, not cached")
    if ref is not None:
        draft.reads.add(ref)
    return draft


def lock(c: Cursor) -> Draft:
    """LOCK [TABLE] [ONLY] name [*] [, ...] [IN mode MODE] [NOWAIT]: the locked tables are reported as reads."""
    c.i += 1
    c.accept("table")
    return Draft(Kind.OTHER, "LOCK", reads=set(c.tables_list(stop=("in", "nowait"))))


def vacuum(c: Cursor) -> Draft:
    """VACUUM [(options)] [FULL] [FREEZE] [VERBOSE] [ANALYZE] [table [(cols)] [, ...]]; FULL rewrites the tables."""
    first = (c.word() or "").upper()
    c.i += 1
    full = False
    if c.at_op("("):
        start = c.i
        c.skip_parens()
        full = any(is_word(t, "full") for t in c.tokens[start : c.i])
    while c.word() in ("full", "freeze", "verbose", "analyze", "analyse"):
        full = full or c.word() == "full"
        c.i += 1
    tables = c.tables_list()
    draft = Draft(Kind.OTHER, first)
    if full and first == "VACUUM":
        draft.writes.update(tables)
    return draft


def explain_target(c: Cursor) -> tuple[bool, int]:
    """Parse EXPLAIN's options: (whether ANALYZE is on, index of the explained statement).

    Any ANALYZE option counts as on, whatever its value: the value is a literal, which the fingerprint hides.
    """
    c.i += 1
    analyze = False
    if c.at_op("("):
        start = c.i
        c.skip_parens()
        analyze = any(is_word(t, "analyze", "analyse") for t in c.tokens[start : c.i])
    while c.word() in ("analyze", "analyse", "verbose"):
        analyze = analyze or c.word() != "verbose"
        c.i += 1
    return analyze, c.i
