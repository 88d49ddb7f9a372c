"""SQL string -> QueryInfo: statement splitting, dispatch by leading keyword, the read rules, and the memo.

Rules, in the order they are applied to a read (the first that matches is the reason):
1. sqlglot must parse the statement fully (no generic Command fallback) and every relation named after FROM/JOIN
   in the text must appear in what we extracted: when sqlglot and our lexer disagree, we do not cache.
2. No locking clause (FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE); SELECT INTO is a write.
3. No denied function (rules.function_denied), no time-dependent literal ('now', 'today', ...), no cast to a reg*
   type, no TABLESAMPLE without REPEATABLE.
4. No system catalog, information_schema or temporary-schema relation (rules.relation_reason).
Everything that is not a read is not cacheable ("not a read (UPDATE)"); COPY ... TO is a read but is streamed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from cacheproxy.analysis import commands, syntax
from cacheproxy.analysis.commands import Cursor, Draft
from cacheproxy.analysis.fingerprint import fingerprint
from cacheproxy.analysis.lexer import (
    OP,
    QIDENT,
    STRING,
    TIME_DEPENDENT_WORDS,
    WORD,
    Token,
    has_uescape,
    ident_value,
    is_word,
    operator_symbols,
    read_name,
    special_words,
    split_statements,
    table_ref,
    tokenize,
)
from cacheproxy.analysis.model import KIND_STRENGTH, UNKNOWN_TABLE, Kind, QueryInfo, TableRef
from cacheproxy.analysis.rules import REG_TYPES, function_denied, relation_reason

_QUERY_WORDS = frozenset({"select", "with", "values", "table"})
_DML_WORDS = frozenset({"insert", "update", "delete", "merge"})
_DDL_WORDS = frozenset(
    {"create", "alter", "drop", "comment", "grant", "revoke", "refresh", "reindex", "cluster", "security", "reassign",
     "import"}
)  # fmt: skip
_TX_WORDS = frozenset({"begin", "commit", "end", "rollback", "abort", "savepoint", "release"})
_SESSION_WORDS = frozenset({"set", "reset", "discard"})
# Utility statements that are neither reads nor writes of named tables. CALL, DO and EXECUTE run code that may
# write anything: they report UNKNOWN_TABLE in writes.
_OTHER_WORDS = frozenset(
    {"listen", "unlisten", "notify", "show", "prepare", "deallocate", "fetch", "move", "declare", "close",
     "checkpoint", "load"}
)  # fmt: skip
_RUNS_CODE = frozenset({"do", "call", "execute"})
_NILADIC = frozenset({"current_date", "current_time", "current_timestamp", "localtime", "localtimestamp"})
_FROM_IN_CALL = frozenset({"extract", "substring", "trim", "overlay", "position"})
# PostgreSQL's reserved keywords (docs, appendix C) that may stand before "(" without naming a function: `AND (`,
# `IN (`, `OVER (`, `AS (`... They are never function names (a reserved word can name a function only quoted, and a
# quoted name is a QIDENT), so the lexical scan must not report them as calls. The niladic datetime keywords and
# the type/function-name keywords (left(), right(), ...) are not in this list.
_RESERVED_WORDS = frozenset(
    {"all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric", "both", "case", "cast", "check",
     "collate", "column", "constraint", "create", "default", "deferrable", "desc", "distinct", "do", "else", "end",
     "except", "false", "fetch", "for", "foreign", "from", "grant", "group", "having", "in", "initially", "intersect",
     "into", "lateral", "leading", "limit", "not", "null", "offset", "on", "only", "or", "order", "placing",
     "primary", "references", "returning", "select", "some", "symmetric", "table", "then", "to", "trailing", "true",
     "union", "unique", "using", "variadic", "when", "where", "window", "with",
     # not reserved, but only ever syntax before "(" in a query: window and aggregate clauses, row constructors
     "over", "filter", "within", "values", "exists", "between", "row", "conflict", "partition"}
)  # fmt: skip
_LOCK_STRENGTHS = (
    (("update",), "FOR UPDATE"),
    (("no", "key", "update"), "FOR NO KEY UPDATE"),
    (("share",), "FOR SHARE"),
    (("key", "share"), "FOR KEY SHARE"),
)


def analyze(sql: str, backslash_quotes: bool = False) -> QueryInfo:
    """Analyze one SQL string (one or several statements). Never raises.

    `backslash_quotes`: the session has standard_conforming_strings off (analysis/strings.py).

    >>> info = analyze("SELECT name FROM users WHERE id = $1")
    >>> info.kind, sorted(info.reads), info.cacheable
    (<Kind.READ: 'read'>, [(None, 'users')], True)
    """
    try:
        return _analyze(sql, backslash_quotes)
    except Exception as exc:  # RecursionError on absurd nesting, or a bug: fail safe, never fail the proxy
        return QueryInfo(
            kind=Kind.OTHER,
            statement_count=1,
            reads=frozenset(),
            writes=frozenset({UNKNOWN_TABLE}),
            functions=frozenset(),
            cacheable=False,
            reason=f"could not analyze: {type(exc).__name__}",
        )


# How much of a statement too long to analyze is read for its leading keywords (see `analyze_head`).
_HEAD_CHARS = 512


def analyze_head(sql: str, why: str, *, unknown: bool = False) -> QueryInfo:
    """What is assumed of a statement not analyzed (`why` says why: too long to): not cacheable; it may write
    anything.

    Even a long SELECT may call a function that writes, so only the session-level effects are ruled out by its
    leading keywords: a long DO or CALL is what it is (unknown effects, OTHER), and an EXECUTE names its statement.
    `unknown`: nothing of it can be read (a statement that cannot be decoded may be anything, a SET too): OTHER,
    whose unknown effects include the session's state.

    >>> info = analyze_head("EXECUTE big(" + "1," * 10000 + "1)", "too long")
    >>> info.kind, info.executes, info.cacheable
    (<Kind.OTHER: 'other'>, 'big', False)
    """
    tokens = tokenize(sql[:_HEAD_CHARS])
    while tokens and tokens[0].kind == OP and tokens[0].text == "(":
        tokens = tokens[1:]
    word = tokens[0].sub if tokens and tokens[0].kind == WORD else None
    return QueryInfo(
        kind=Kind.OTHER if unknown or word in _RUNS_CODE else Kind.WRITE,
        statement_count=1,
        reads=frozenset(),
        writes=frozenset({UNKNOWN_TABLE}),
        functions=frozenset(),
        cacheable=False,
        reason=why,
        executes=_statement_name(tokens, 1) if word == "execute" else None,
    )


class Analyzer:
    """`analyze` memoized by fingerprint in a bounded LRU.

    Results that carry a session change are not stored: their value is a literal, which the fingerprint hides.
    """

    def __init__(self, max_entries: int = 10000) -> None:
        self.max_entries = max(0, max_entries)  # 0 disables the memo (every call is a miss)
        self.memo_hits = 0
        self.memo_misses = 0
        self._memo: OrderedDict[str, QueryInfo] = OrderedDict()

    def __len__(self) -> int:
        return len(self._memo)

    def analyze(self, sql: str, backslash_quotes: bool = False, *, key: str | None = None) -> QueryInfo:
        """`key`: `fingerprint(sql)`, when the caller has it already."""
        if backslash_quotes:  # rare; the fingerprint lexes strings the standard way: not memoized
            return analyze(sql, backslash_quotes)
        if key is None:
            key = fingerprint(sql)
        info = self._memo.get(key)
        if info is not None:
            self._memo.move_to_end(key)
            self.memo_hits += 1
            return info
        self.memo_misses += 1
        info = analyze(sql)
        if self.max_entries and info.session is None and not any(s.session is not None for s in info.statements):
            self._memo[key] = info
            if len(self._memo) > self.max_entries:
                self._memo.popitem(last=False)
        return info


# --- whole strings -----------------------------------------------------------------------------------------------


def _analyze(sql: str, backslash_quotes: bool = False) -> QueryInfo:
    tokens = tokenize(sql, backslash_quotes)
    statements = split_statements(tokens)
    if not statements:
        return QueryInfo(Kind.OTHER, 0, frozenset(), frozenset(), frozenset(), False, "empty query")
    pg_temp = any(tok.kind in (WORD, QIDENT) and "pg_temp" in tok.text.lower() for tok in tokens)
    infos = [_finish(_statement(tokens, sql), pg_temp) for tokens in statements]
    if len(infos) == 1:
        return infos[0]
    return QueryInfo(
        kind=max((i.kind for i in infos), key=KIND_STRENGTH.__getitem__),
        statement_count=len(infos),
        reads=frozenset().union(*(i.reads for i in infos)),
        writes=frozenset().union(*(i.writes for i in infos)),
        functions=frozenset().union(*(i.functions for i in infos)),
        cacheable=False,
        reason="multiple statements",
        temp_tables_created=frozenset().union(*(i.temp_tables_created for i in infos)),
        data_modifying_cte=any(i.data_modifying_cte for i in infos),
        copy_from_stdin=any(i.copy_from_stdin for i in infos),
        alters_role_settings=any(i.alters_role_settings for i in infos),
        mentions_pg_temp=pg_temp,
        operators=frozenset().union(*(i.operators for i in infos)),
        casts=frozenset().union(*(i.casts for i in infos)),
        time_casts=frozenset().union(*(i.time_casts for i in infos)),
        attributes=frozenset().union(*(i.attributes for i in infos)),
        names=frozenset().union(*(i.names for i in infos)),
        statements=tuple(infos),
    )


def _finish(d: Draft, pg_temp: bool = False) -> QueryInfo:
    reason = d.reason
    if not d.cacheable and reason is None:
        reason = f"not a read ({d.label})"
    return QueryInfo(
        kind=d.kind,
        statement_count=1,
        reads=frozenset(d.reads),
        writes=frozenset(d.writes),
        functions=frozenset(d.functions),
        cacheable=d.cacheable,
        reason=None if d.cacheable else reason,
        tx=d.tx,
        session=d.session,
        temp_tables_created=frozenset(d.temp_tables),
        data_modifying_cte=d.data_modifying_cte,
        prepares=d.prepares,
        drops_database=d.drops_database,
        mentions_pg_temp=pg_temp,
        deallocates=d.deallocates,
        deallocates_all=d.deallocates_all,
        executes=d.executes,
        copy_from_stdin=d.copy_from_stdin,
        alters_role_settings=d.alters_role_settings,
        operators=frozenset(d.operators),
        casts=frozenset(d.casts),
        time_casts=frozenset(d.time_casts),
        attributes=frozenset(d.attributes),
        names=frozenset(d.names),
    )


# --- one statement -----------------------------------------------------------------------------------------------


def _statement(tokens: Sequence[Token], sql: str) -> Draft:
    """Dispatch one statement (non-empty token list) on its leading keyword."""
    first = tokens[0]
    word = first.sub if first.kind == WORD else None
    c = Cursor(tokens, sql)

    def sub(inner: Sequence[Token]) -> Draft:
        if not inner:
            return Draft(Kind.OTHER, "EMPTY")
        return _statement(inner, sql)

    if word in _QUERY_WORDS or word in _DML_WORDS or (first.kind == OP and first.text == "("):
        return _query(tokens, sql, word or "select")
    if word in _TX_WORDS or (word == "start" and c.word(1) == "transaction"):
        return commands.transaction(c)
    if word == "prepare" and c.word(1) == "transaction":
        return commands.transaction(c)
    if word in _SESSION_WORDS:
        return commands.session(c)
    if word in _DDL_WORDS:
        return commands.ddl(c, sub)
    if word == "truncate":
        return commands.truncate(c)
    if word == "copy":
        return commands.copy(c, sub)
    if word == "lock":
        return commands.lock(c)
    if word in ("vacuum", "analyze", "analyse"):
        return commands.vacuum(c)
    if word == "explain":
        return _explain(c, sub)
    if word in _RUNS_CODE:
        draft = Draft(Kind.OTHER, word.upper(), writes={UNKNOWN_TABLE})
        if word == "execute":
            draft.executes = _statement_name(tokens, 1)
        return draft
    if word in _OTHER_WORDS:
        return _other(c, word, sub)
    shown = first.text[:40]
    return Draft(
        Kind.OTHER, shown.upper(), writes={UNKNOWN_TABLE}, reason=f"could not parse: unrecognised statement {shown!r}"
    )


def _explain(c: Cursor, sub: commands.SubAnalyze) -> Draft:
    analyze_on, start = commands.explain_target(c)
    inner = sub(c.tokens[start:])
    draft = Draft(Kind.OTHER, "EXPLAIN", reads=inner.reads, reason="EXPLAIN is not cached")
    draft.take_code(inner)
    if analyze_on and (inner.kind in (Kind.WRITE, Kind.DDL) or inner.writes):  # EXPLAIN ANALYZE runs the statement
        draft.kind = inner.kind if inner.kind in (Kind.WRITE, Kind.DDL) else Kind.OTHER
        draft.writes = inner.writes
        draft.data_modifying_cte = inner.data_modifying_cte
        draft.reason = f"not a read (EXPLAIN ANALYZE {inner.label})"
    return draft


def _other(c: Cursor, word: str, sub: commands.SubAnalyze) -> Draft:
    draft = Draft(Kind.OTHER, word.upper())
    if word == "prepare":
        draft.prepares = _statement_name(c.tokens, 1)
    elif word == "deallocate":
        at = 2 if is_word(c.tokens[1] if len(c.tokens) > 1 else None, "prepare") else 1
        if is_word(c.tokens[at] if at < len(c.tokens) else None, "all"):
            draft.deallocates_all = True
        else:
            draft.deallocates = _statement_name(c.tokens, at)
    # DECLARE c CURSOR FOR query / PREPARE p AS statement: report what the query reads (it does not run yet).
    keyword = "for" if word == "declare" else "as" if word == "prepare" else None
    if keyword is not None:
        j = c.find_top_word(keyword)
        if j >= 0 and j + 1 < len(c.tokens):
            inner = sub(c.tokens[j + 1 :])
            draft.reads |= inner.reads
            draft.take_code(inner)
    return draft


def _statement_name(tokens: Sequence[Token], i: int) -> str | None:
    """The prepared statement named at tokens[i] (PREPARE name, EXECUTE name, DEALLOCATE name)."""
    if i < len(tokens) and tokens[i].kind in (WORD, QIDENT):
        return ident_value(tokens[i])
    return None


# --- queries and DML (parsed by sqlglot) -------------------------------------------------------------------------


def _query(tokens: Sequence[Token], sql: str, word: str) -> Draft:
    if any(tok.kind == STRING and tok.sub == "e" and tok.text[:1] in "'nN" and "\\" in tok.text for tok in tokens):
        # A backslash escape in '...' (standard_conforming_strings off): sqlglot would read the string otherwise.
        return _unparsed(tokens, word, "could not parse: backslash escape with standard_conforming_strings off")
    text = sql[tokens[0].start : tokens[-1].end]
    calls = _lexical_calls(tokens)
    parsed = syntax.parse(text, frozenset(calls))
    if isinstance(parsed, str) or parsed.root in ("command", "other"):
        message = parsed if isinstance(parsed, str) else "sqlglot fell back to a generic command"
        return _unparsed(tokens, word, f"could not parse: {message}"[:136])
    denied = {name for name in calls if function_denied(name)}
    functions = parsed.functions | denied
    if parsed.root != "select":
        draft = _hidden_code(
            Draft(Kind.WRITE, parsed.root.upper(), reads=parsed.reads, writes=parsed.writes, functions=functions),
            tokens,
            parsed,
        )
        draft.data_modifying_cte = parsed.data_modifying_cte
        return draft
    draft = _hidden_code(
        Draft(Kind.READ, "SELECT", reads=parsed.reads, writes=parsed.writes, functions=functions), tokens, parsed
    )
    if parsed.into is not None:
        draft.kind, draft.label, draft.reason = Kind.WRITE, "SELECT INTO", "SELECT INTO creates a table"
        if parsed.into_temp or parsed.into[0] == "pg_temp":
            draft.temp_tables.add(parsed.into)
        return draft
    if parsed.data_modifying_cte:
        draft.kind, draft.label, draft.data_modifying_cte = Kind.WRITE, "WITH", True
        draft.reason = "not a read (data-modifying WITH)"
        return draft
    draft.reason = _read_reason(tokens, parsed, functions)
    draft.cacheable = draft.reason is None
    return draft


def _hidden_code(draft: Draft, tokens: Sequence[Token], parsed: syntax.Parsed) -> Draft:
    """Record what may run code without a call written: operators, casts, attribute notation, date/time input."""
    draft.operators = operator_symbols(tokens)
    draft.casts = parsed.casts
    draft.time_casts = parsed.time_casts
    draft.attributes = parsed.attributes
    return draft


def _read_reason(tokens: Sequence[Token], parsed: syntax.Parsed, functions: set[str]) -> str | None:
    """Why a successfully parsed read may not be cached (None: statically cacheable)."""
    missing = _unaccounted_relation(tokens, parsed.reads | parsed.writes, parsed.cte_names)
    if missing is not None:
        return f"could not parse: relation {missing} not understood"
    lock = _locking_clause(tokens)
    if lock is not None or parsed.locks:
        return f"locking clause {lock or 'FOR UPDATE/SHARE'}"
    for name in sorted(functions):
        if function_denied(name):
            return f"calls volatile function {name}()"
    for i, tok in enumerate(tokens):
        if tok.kind == STRING:
            words = special_words(tok) & TIME_DEPENDENT_WORDS
            if words:
                return f"time-dependent literal {tok.text[:40]}"
            if tok.sub == "u" and has_uescape(tokens, i):
                return "unicode string with UESCAPE"
        elif tok.kind == WORD:
            low = tok.sub
            if low in REG_TYPES:
                return f"casts to {low} (catalog lookup)"
            if low == "tablesample" and not any(is_word(t, "repeatable") for t in tokens[i:]):
                return "TABLESAMPLE without REPEATABLE"
    if "" in parsed.time_casts:
        return "casts a computed value to a date/time type (text such as 'now' is read when the query runs)"
    for ref in sorted(parsed.reads, key=lambda r: (r[0] or "", r[1])):
        why = relation_reason(ref)
        if why is not None:
            return why
    return None


def _unparsed(tokens: Sequence[Token], word: str, reason: str) -> Draft:
    """A query or DML statement sqlglot could not parse: classify it by keywords, name the target if simple."""
    if word in _DML_WORDS:
        c = Cursor(tokens, "")
        c.i = 1
        c.accept("into") or c.accept("from")
        c.accept("only")
        ref = c.table()
        return Draft(Kind.WRITE, word.upper(), writes={ref or UNKNOWN_TABLE}, reason=reason)
    dml_inside = any(is_word(t, *_DML_WORDS) for t in tokens)
    if (word == "with" and dml_inside) or _top_level_into(tokens):
        return Draft(Kind.WRITE, word.upper(), writes={UNKNOWN_TABLE}, reason=reason)
    # A read we could not parse is not cached. It may still run code that writes: a function called, an operator,
    # a cast, a view or a function in attribute notation. Every call, operator symbol and name written is reported
    # (more than it uses), so the catalog check of what writes (policy.verdict.write_scope) stays conservative
    # without taking every such read for a write: a driver's catalog query (asyncpg's type introspection, which
    # sqlglot cannot parse) must not flush the database at each connect.
    names = {ident_value(tok) for tok in tokens if tok.kind in (WORD, QIDENT)}
    lowered = {name.lower() for name in names}
    return Draft(
        Kind.READ,
        "SELECT",
        functions=_lexical_calls(tokens) - _cte_column_lists(tokens) - syntax.SYNTAX_BEFORE_PAREN,
        operators=operator_symbols(tokens),
        casts=names | lowered,
        attributes=names | lowered,
        names=names | lowered,
        reason=reason,
    )


# --- lexical checks ----------------------------------------------------------------------------------------------


def _lexical_calls(tokens: Sequence[Token]) -> set[str]:
    """Names written as calls (`name(`, `schema.name(`) plus the niladic datetime keywords.

    Generous on purpose: it backs the deny list when sqlglot renames a builtin. A type modifier after `::` or AS
    (`numeric(10, 2)`) is not a call.
    """
    calls: set[str] = set()
    n = len(tokens)
    for j, tok in enumerate(tokens):
        if tok.kind not in (WORD, QIDENT):
            continue
        qualified = (
            j >= 2
            and tokens[j - 1].kind == OP
            and tokens[j - 1].text == "."
            and tokens[j - 2].kind
            in (
                WORD,
                QIDENT,
            )
        )
        if j + 1 < n and tokens[j + 1].kind == OP and tokens[j + 1].text == "(":
            before = tokens[j - 3] if qualified and j >= 3 else tokens[j - 1] if j >= 1 and not qualified else None
            if before is not None and ((before.kind == OP and before.text == ":") or is_word(before, "as")):
                continue
            name = ident_value(tok).lower()
            if tok.kind == WORD and not qualified and name in _RESERVED_WORDS:
                continue
            calls.add(f"{ident_value(tokens[j - 2]).lower()}.{name}" if qualified else name)
        elif tok.kind == WORD and not qualified and tok.sub in _NILADIC:
            calls.add(tok.sub)
    return calls


def _cte_column_lists(tokens: Sequence[Token]) -> set[str]:
    """Names of CTEs declared with a column list (`name (a, b) AS [NOT] [MATERIALIZED] (`), which look like calls."""
    found: set[str] = set()
    n = len(tokens)
    for j, tok in enumerate(tokens[:-1]):
        if tok.kind not in (WORD, QIDENT) or tokens[j + 1].text != "(":
            continue
        depth, k = 0, j + 1
        while k < n:
            depth += tokens[k].text == "(" and tokens[k].kind == OP
            depth -= tokens[k].text == ")" and tokens[k].kind == OP
            if depth == 0:
                break
            k += 1
        k += 1
        if k < n and is_word(tokens[k], "as"):
            k += 1
            while k < n and is_word(tokens[k], "not", "materialized"):
                k += 1
            if k < n and tokens[k].kind == OP and tokens[k].text == "(":
                found.add(ident_value(tok).lower())
    return found


def _locking_clause(tokens: Sequence[Token]) -> str | None:
    for j, tok in enumerate(tokens):
        if is_word(tok, "for"):
            for words, label in _LOCK_STRENGTHS:
                if all(is_word(tokens[j + 1 + k] if j + 1 + k < len(tokens) else None, w) for k, w in enumerate(words)):
                    return label
    return None


def _top_level_into(tokens: Sequence[Token]) -> bool:
    depth = 0
    for tok in tokens:
        if tok.kind == OP and tok.text in "()":
            depth += 1 if tok.text == "(" else -1
        elif depth == 0 and is_word(tok, "into"):
            return True
    return False


def _unaccounted_relation(tokens: Sequence[Token], known: set[TableRef], ctes: set[str]) -> str | None:
    """A relation written right after FROM/JOIN that sqlglot's tree does not contain, if any.

    A safety net against a parse that silently dropped part of the query. FROM inside EXTRACT/SUBSTRING/TRIM/
    OVERLAY/POSITION and IS [NOT] DISTINCT FROM are not table sources.
    """
    names = {r[1] for r in known}
    stack: list[str] = []
    n = len(tokens)
    for j, tok in enumerate(tokens):
        if tok.kind == OP:
            if tok.text == "(":
                prev = tokens[j - 1] if j else None
                stack.append(prev.sub if prev is not None and prev.kind == WORD else "")
            elif tok.text == ")" and stack:
                stack.pop()
            continue
        if not is_word(tok, "from", "join") or (stack and stack[-1] in _FROM_IN_CALL):
            continue
        if j and is_word(tokens[j - 1], "distinct"):
            continue
        k = j + 1
        while k < n and is_word(tokens[k], "only", "lateral"):
            k += 1
        if (
            k >= n
            or (tokens[k].kind == OP)
            or (is_word(tokens[k], "rows") and k + 1 < n and is_word(tokens[k + 1], "from"))
        ):
            continue
        parts, after = read_name(tokens, k)
        if not parts or (after < n and tokens[after].kind == OP and tokens[after].text == "("):
            continue
        ref = table_ref(parts)
        if ref in known or (ref[0] is None and (ref[1] in ctes or ref[1] in names)):
            continue
        return ".".join(parts)
    return None
