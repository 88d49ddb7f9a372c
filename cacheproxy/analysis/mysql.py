"""MySQL/MariaDB statements: kind, tables read and written, the static cacheability verdict (sqlglot, mysql).

The PostgreSQL analyzer has its own lexer and rules; MySQL differs enough (backticks, `@` variables, `#` comments,
REPLACE, LOAD DATA, locking-read spellings, a different list of non-deterministic builtins) that it gets this small
module. Function calls are found on tokens, not on the AST: sqlglot maps builtins to its own node classes, which
would hide the name the server runs. A call is cacheable only when it is a known deterministic builtin: anything
else may be a stored function, whose DETERMINISTIC flag the server does not enforce.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sqlglot
from sqlglot import exp
from sqlglot.dialects.mysql import MySQL
from sqlglot.errors import SqlglotError
from sqlglot.tokenizer_core import Token, TokenType

from cacheproxy.analysis.model import Kind

# (database or None for the session's current one, table name), both lower-cased.
MyTable = tuple[str | None, str]

SYSTEM_SCHEMAS = frozenset(("information_schema", "performance_schema", "mysql", "sys"))

NONDETERMINISTIC = frozenset(
    [
        "now",
        "sysdate",
        "curdate",
        "curtime",
        "current_date",
        "current_time",
        "current_timestamp",
        "localtime",
        "localtimestamp",
        "utc_date",
        "utc_time",
        "utc_timestamp",
        "unix_timestamp",
        "rand",
        "uuid",
        "uuid_short",
        "sys_guid",
        "connection_id",
        "last_insert_id",
        "found_rows",
        "row_count",
        "sleep",
        "get_lock",
        "release_lock",
        "release_all_locks",
        "is_free_lock",
        "is_used_lock",
        "benchmark",
        "user",
        "current_user",
        "session_user",
        "system_user",
        "database",
        "schema",
        "version",
        "current_role",
        "master_pos_wait",
        "master_gtid_wait",
        "source_pos_wait",
        "nextval",
        "lastval",
        "setval",
        "load_file",
        "random_bytes",
        "password",
        "encrypt",
        "des_encrypt",
        "des_decrypt",
        "convert_tz",
        "last_value_of",
    ]
)
# Keywords that read the clock or the session without parentheses.
_BARE_NONDETERMINISTIC = frozenset(
    [
        "current_date",
        "current_time",
        "current_timestamp",
        "localtime",
        "localtimestamp",
        "utc_date",
        "utc_time",
        "utc_timestamp",
        "current_user",
        "current_role",
    ]
)
DETERMINISTIC = frozenset(
    [
        "abs",
        "acos",
        "asin",
        "atan",
        "atan2",
        "ceil",
        "ceiling",
        "conv",
        "cos",
        "cot",
        "crc32",
        "degrees",
        "exp",
        "floor",
        "ln",
        "log",
        "log10",
        "log2",
        "mod",
        "pi",
        "pow",
        "power",
        "radians",
        "round",
        "sign",
        "sin",
        "sqrt",
        "tan",
        "truncate",
        "ascii",
        "bin",
        "bit_length",
        "char",
        "char_length",
        "character_length",
        "concat",
        "concat_ws",
        "elt",
        "export_set",
        "field",
        "find_in_set",
        "format",
        "from_base64",
        "hex",
        "insert",
        "instr",
        "lcase",
        "left",
        "length",
        "locate",
        "lower",
        "lpad",
        "ltrim",
        "make_set",
        "mid",
        "oct",
        "octet_length",
        "ord",
        "position",
        "quote",
        "repeat",
        "replace",
        "reverse",
        "right",
        "rpad",
        "rtrim",
        "soundex",
        "space",
        "strcmp",
        "substr",
        "substring",
        "substring_index",
        "to_base64",
        "trim",
        "ucase",
        "unhex",
        "upper",
        "weight_string",
        "coalesce",
        "greatest",
        "least",
        "if",
        "ifnull",
        "nullif",
        "isnull",
        "interval",
        "cast",
        "convert",
        "count",
        "sum",
        "avg",
        "min",
        "max",
        "group_concat",
        "bit_and",
        "bit_or",
        "bit_xor",
        "bit_count",
        "std",
        "stddev",
        "stddev_pop",
        "stddev_samp",
        "var_pop",
        "var_samp",
        "variance",
        "date_format",
        "date_add",
        "date_sub",
        "adddate",
        "subdate",
        "addtime",
        "subtime",
        "datediff",
        "timediff",
        "timestampdiff",
        "timestampadd",
        "date",
        "time",
        "year",
        "month",
        "day",
        "dayofmonth",
        "dayofweek",
        "dayofyear",
        "dayname",
        "monthname",
        "hour",
        "minute",
        "second",
        "microsecond",
        "week",
        "weekday",
        "weekofyear",
        "yearweek",
        "quarter",
        "last_day",
        "makedate",
        "maketime",
        "str_to_date",
        "to_days",
        "from_days",
        "to_seconds",
        "time_to_sec",
        "sec_to_time",
        "period_add",
        "period_diff",
        "extract",
        "get_format",
        "time_format",
        "timestamp",
        "from_unixtime",
        "md5",
        "sha",
        "sha1",
        "sha2",
        "row_number",
        "rank",
        "dense_rank",
        "ntile",
        "lag",
        "lead",
        "first_value",
        "last_value",
        "nth_value",
        "percent_rank",
        "cume_dist",
        "regexp_replace",
        "regexp_substr",
        "regexp_instr",
        "regexp_like",
        "inet_aton",
        "inet_ntoa",
        "inet6_aton",
        "inet6_ntoa",
        "is_ipv4",
        "is_ipv6",
        "json_extract",
        "json_unquote",
        "json_object",
        "json_array",
        "json_contains",
        "json_length",
        "json_keys",
        "json_valid",
        "json_type",
        "json_quote",
        "json_arrayagg",
        "json_objectagg",
        "json_value",
        "any_value",
        "bin_to_uuid",
        "uuid_to_bin",
        "compress",
        "uncompress",
        "uncompressed_length",
    ]
)
# Words that can stand before "(" without being a call.
_NOT_CALLS = frozenset(
    [
        "in",
        "exists",
        "values",
        "using",
        "on",
        "as",
        "from",
        "join",
        "select",
        "where",
        "and",
        "or",
        "not",
        "any",
        "all",
        "some",
        "union",
        "intersect",
        "except",
        "over",
        "with",
        "by",
        "having",
        "when",
        "then",
        "else",
        "case",
        "like",
        "between",
        "is",
        "into",
        "set",
        "table",
        "row",
        "key",
        "index",
        "partition",
        "window",
        "recursive",
        "lateral",
        "distinct",
        "escape",
        "div",
        "xor",
        "regexp",
        "rlike",
        "signed",
        "unsigned",
        "binary",
        "varchar",
        "datetime",
        "decimal",
        "numeric",
        "float",
        "double",
        "char_",
        "nchar",
        "integer",
        "int",
        "bigint",
        "smallint",
        "tinyint",
        "mediumint",
        "json",
        "precision",
        "limit",
        "offset",
        "group",
        "order",
        "natural",
        "inner",
        "outer",
        "cross",
        "straight_join",
        "left_join",
        "for",
        "update",
    ]
)
_CAST_TYPES = frozenset(
    [
        "char",
        "varchar",
        "binary",
        "decimal",
        "datetime",
        "time",
        "date",
        "signed",
        "unsigned",
        "nchar",
        "double",
        "float",
    ]
)

_DIALECT = MySQL()

_DDL = frozenset(["create", "alter", "drop", "rename", "truncate"])
_PRIVILEGES = frozenset(["grant", "revoke"])
_TX = frozenset(["begin", "start", "commit", "rollback", "savepoint", "release", "xa"])
_HARMLESS = frozenset(
    [
        "show",
        "explain",
        "describe",
        "desc",
        "help",
        "kill",
        "checksum",
        "check",
        "analyze",
        "optimize",
        "repair",
        "cache",
        "lock",
        "unlock",
        "binlog",
        "purge",
        "reset",
        "flush",
        "install",
        "uninstall",
        "shutdown",
        "signal",
        "resignal",
        "get",
    ]
)


@dataclass(frozen=True, slots=True)
class MyInfo:
    """What the MySQL front end needs to know about one COM_QUERY string."""

    kind: Kind
    statement_count: int
    reads: frozenset[MyTable] = frozenset()
    writes: frozenset[MyTable] = frozenset()
    cacheable: bool = False
    reason: str | None = None
    # Effects the session applies once the server said OK:
    use_database: str | None = None  # USE db
    sets: bool = False  # a SET statement: session state that may change results
    rollback: bool = False
    temp_created: frozenset[str] = frozenset()  # CREATE TEMPORARY TABLE names
    # What a write does to the cache beyond its tables:
    invalidate_databases: frozenset[str] = frozenset()  # DDL: these databases' entries (plus the current one)
    invalidate_all: bool = False  # unknown effects (CALL, GRANT, ...): every entry
    # Calls a function that may be a stored one, which may write (invalidation.unknown_writes decides).
    calls_unknown: bool = False
    # How a SET changes the session's transaction isolation level (see isolation_of_set): None (it does not), a
    # level ("read-committed", ...), "next" (the next transaction only) or "unknown".
    isolation: str | None = None


def _tokens(sql: str) -> list[Token]:
    return list(_DIALECT.tokenizer_class(dialect=_DIALECT).tokenize(sql))


def split_statements(tokens: list[Token]) -> list[list[Token]]:
    statements: list[list[Token]] = [[]]
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            statements.append([])
        else:
            statements[-1].append(token)
    return [s for s in statements if s]


def analyze_mysql(sql: str) -> MyInfo:
    """Analyze one COM_QUERY text (one or several statements).

    >>> analyze_mysql("SELECT name FROM users WHERE id = 1").cacheable
    True
    >>> analyze_mysql("SELECT NOW()").reason
    'non-deterministic function now()'
    >>> sorted(analyze_mysql("UPDATE shop.orders SET x = 1").writes)
    [('shop', 'orders')]
    """
    try:
        tokens = _tokens(sql)
    except SqlglotError:
        return MyInfo(Kind.OTHER, 1, reason="could not tokenize", invalidate_all=True)
    statements = split_statements(tokens)
    if not statements:
        return MyInfo(Kind.OTHER, 0, reason="empty query")
    if len(statements) == 1:
        return _statement(sql, statements[0])
    parts = [_statement(_text(sql, s), s) for s in statements]
    return MyInfo(
        Kind.OTHER,
        len(parts),
        writes=frozenset().union(*(p.writes for p in parts)),
        reason="several statements in one query",
        # A session change inside a multi-statement string: the proxy cannot tell which ones ran.
        use_database=None,
        sets=any(p.sets or p.use_database or p.temp_created for p in parts),
        invalidate_databases=frozenset().union(*(p.invalidate_databases for p in parts)),
        # DDL inside a multi-statement query may name tables of any database unqualified: drop everything.
        invalidate_all=any(p.invalidate_all or p.kind == Kind.DDL for p in parts),
        calls_unknown=any(p.calls_unknown for p in parts),
    )


def _text(sql: str, tokens: list[Token]) -> str:
    return sql[tokens[0].start : tokens[-1].end + 1]


def _word(token: Token) -> str:
    return token.text.lower()


def _statement(sql: str, tokens: list[Token]) -> MyInfo:
    first = _word(tokens[0])
    if first in ("select", "with", "(", "table", "values"):
        return _read(sql, tokens)
    if first in ("insert", "update", "delete", "replace", "load"):
        return _write(sql, tokens, first)
    if first == "set":
        if len(tokens) > 1 and _word(tokens[1]) == "statement":
            return _set_statement(sql, tokens)
        return MyInfo(Kind.SESSION, 1, sets=True, reason="a session change", isolation=isolation_of_set(tokens))
    if first == "use":
        name = tokens[1].text if len(tokens) > 1 else None
        return MyInfo(Kind.SESSION, 1, use_database=name, reason="a session change")
    if first in _TX:
        words = [_word(t) for t in tokens]
        rollback = first == "rollback" and "to" not in words
        return MyInfo(Kind.TRANSACTION, 1, rollback=rollback, reason="transaction control")
    if first in _PRIVILEGES or (len(tokens) > 1 and _word(tokens[1]) in ("user", "role")):
        return MyInfo(Kind.DDL, 1, reason="privileges", invalidate_all=True)
    if first in _DDL:
        return _ddl(sql, tokens)
    if first in _HARMLESS and not _runs_statement(tokens):
        return MyInfo(Kind.OTHER, 1, reason=f"{first.upper()} is not cached")
    # CALL, DO, HANDLER, EXECUTE, ANALYZE UPDATE ... and whatever else: effects unknown.
    return MyInfo(Kind.OTHER, 1, reason=f"{first.upper()}: effects unknown", invalidate_all=True)


def _set_statement(sql: str, tokens: list[Token]) -> MyInfo:
    """MariaDB's SET STATEMENT var = value [, ...] FOR <statement>: the settings last for that one statement, which is
    analyzed for its writes and effects (it is not cached: its result depends on the settings in its text)."""
    words = [_word(t) for t in tokens]
    if "for" not in words:
        return MyInfo(Kind.OTHER, 1, reason="SET STATEMENT without FOR: effects unknown", invalidate_all=True)
    inner = tokens[words.index("for") + 1 :]
    if not inner:
        return MyInfo(Kind.OTHER, 1, reason="SET STATEMENT without a statement", invalidate_all=True)
    info = _statement(_text(sql, inner), inner)
    return replace(info, cacheable=False, reason=info.reason or "SET STATEMENT ... FOR", sets=False)


_LEVELS = {
    "read uncommitted": "read-uncommitted",
    "read committed": "read-committed",
    "repeatable read": "repeatable-read",
    "serializable": "serializable",
}
_ISOLATION_VARIABLES = frozenset(("tx_isolation", "transaction_isolation"))
_SCOPES = frozenset(("global", "session", "local", "persist", "persist_only"))


def isolation_of_set(tokens: list[Token]) -> str | None:
    """How a SET changes the session's transaction isolation level: None (it does not), a level for the session's
    transactions from now on ("read-committed", "repeatable-read", "serializable", "read-uncommitted"), "next" (SET
    TRANSACTION without a scope: the next transaction only) or "unknown" (anything the proxy cannot be sure of:
    a call, which may be a stored function, a value that is not a literal level, `SET @@tx_isolation`, which is the
    session's in MariaDB but the next transaction's in MySQL).

    >>> isolation_of_set(_tokens("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"))
    'read-committed'
    >>> isolation_of_set(_tokens("SET tx_isolation = 'REPEATABLE-READ', autocommit = 0"))
    'repeatable-read'
    >>> isolation_of_set(_tokens("SET GLOBAL transaction_isolation = 'READ-COMMITTED'")) is None
    True
    """
    if any(t.token_type == TokenType.L_PAREN for t in tokens):
        return "unknown"
    words = [_word(t) for t in tokens]
    if "isolation" not in words and _ISOLATION_VARIABLES.isdisjoint(words):
        return None
    i = 2 if words[1:2] and words[1] in _SCOPES else 1
    scope = words[1] if i == 2 else None
    if words[i : i + 3] == ["transaction", "isolation", "level"]:
        rest = words[i + 3 :]
        level = _LEVELS.get(" ".join(rest[:2])) or _LEVELS.get(" ".join(rest[:1]))
        if level is None:
            return "unknown"
        if scope is None:
            return "next"
        return None if scope != "session" and scope != "local" else level
    change: str | None = None
    seen = False
    scope = None
    for part in _assignments(tokens[1:]):
        names = [_word(t) for t in part]
        if names and names[0] in _SCOPES:  # a scope keyword holds for the assignments after it too
            scope, names = names[0], names[1:]
        at = names[:1] == ["@@"]
        if at:
            names = names[1:]
        if names[1:2] == ["."] and names[0] in _SCOPES:
            local_scope: str | None = names[0]
            names = names[2:]
        else:
            local_scope = None if at else scope
        if not names or names[0] not in _ISOLATION_VARIABLES:
            continue
        seen = True
        if local_scope in ("global", "persist", "persist_only"):
            continue
        value = names[2:] if names[1:2] in (["="], [":="]) else []
        level = _LEVELS.get(value[0].replace("-", " ").replace("_", " ")) if len(value) == 1 else None
        change = "unknown" if level is None or (at and local_scope is None) else level
    return change if seen else "unknown"


def _assignments(tokens: list[Token]) -> list[list[Token]]:
    parts: list[list[Token]] = [[]]
    for token in tokens:
        if token.token_type == TokenType.COMMA:
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def _runs_statement(tokens: list[Token]) -> bool:
    """EXPLAIN ANALYZE / MariaDB's ANALYZE run the statement they name."""
    return any(_word(t) in ("insert", "update", "delete", "replace") for t in tokens[1:4])


def _read(sql: str, tokens: list[Token]) -> MyInfo:
    reason = _read_reason(tokens)
    unknown = reason is not None and reason.startswith("calls ")
    try:
        tree = sqlglot.parse_one(sql, read=_DIALECT)
    except SqlglotError:
        return MyInfo(Kind.READ, 1, reason=reason or "could not parse", calls_unknown=unknown)
    if not isinstance(tree, exp.Query):  # WITH ... UPDATE/DELETE (MySQL 8)
        return MyInfo(Kind.WRITE, 1, writes=_tables(tree), reason="a data-modifying statement")
    reads = _tables(tree)
    if reason is None:
        system = sorted({db for db, _ in reads if db in SYSTEM_SCHEMAS})
        if system:
            reason = f"reads the system schema {system[0]}"
    return MyInfo(Kind.READ, 1, reads=reads, cacheable=reason is None, reason=reason, calls_unknown=unknown)


def _tables(tree: exp.Expr) -> frozenset[MyTable]:
    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    found: set[MyTable] = set()
    for table in tree.find_all(exp.Table):
        name = table.name.lower()
        db = table.db.lower() or None
        if not name or (db is None and name in ctes) or (db is None and name == "dual"):
            continue
        found.add((db, name))
    return frozenset(found)


def _read_reason(tokens: list[Token]) -> str | None:
    """Why a read's result cannot be cached whatever its tables: calls, variables, locks, INTO, hints."""
    words = [_word(t) for t in tokens]
    for i, token in enumerate(tokens):
        kind = token.token_type
        if kind in (TokenType.PARAMETER, TokenType.SESSION_PARAMETER):
            return "reads a user or system variable"
        word = words[i]
        if kind in (TokenType.STRING, TokenType.NUMBER):
            continue
        if word in ("sql_no_cache", "sql_calc_found_rows"):
            return f"{word.upper()}"
        if word == "into":
            return "SELECT ... INTO"
        if word == "for" and i + 1 < len(words) and words[i + 1] in ("update", "share"):
            return "a locking read"
        if word == "lock" and words[i + 1 : i + 4] == ["in", "share", "mode"]:
            return "a locking read"
        if word in ("next", "previous") and words[i + 1 : i + 3] == ["value", "for"]:
            return "reads a sequence"
        if word in _BARE_NONDETERMINISTIC and kind != TokenType.IDENTIFIER:
            return f"non-deterministic function {word}()"
        follows_paren = i + 1 < len(tokens) and tokens[i + 1].token_type == TokenType.L_PAREN
        if not follows_paren:
            continue
        qualified = i > 0 and tokens[i - 1].token_type == TokenType.DOT
        if qualified or kind == TokenType.IDENTIFIER:
            return f"calls {word}(), maybe a stored function"
        if word in NONDETERMINISTIC:
            return f"non-deterministic function {word}()"
        if word in _CAST_TYPES and i > 0 and words[i - 1] == "as":
            continue
        if word in _NOT_CALLS or word in DETERMINISTIC:
            continue
        return f"calls {word}(), not a known deterministic built-in (maybe a stored function)"
    return None


def _write(sql: str, tokens: list[Token], first: str) -> MyInfo:
    if first == "replace":  # sqlglot reads REPLACE as a command with a string; its syntax is INSERT's
        start = tokens[0].end + 1
        sql = "INSERT" + sql[start:]
        tokens = _tokens(sql)
        first = "insert"
    if first in ("insert", "update", "delete"):
        try:
            tree = sqlglot.parse_one(sql, read=_DIALECT)
        except SqlglotError:
            tree = None
        if tree is not None and not isinstance(tree, exp.Command):
            tables = _tables(tree)
            if tables:
                return MyInfo(Kind.WRITE, 1, writes=tables, reason="a write")
    target = _target_after(tokens, "table" if first == "load" else None)
    if target is None:
        return MyInfo(Kind.WRITE, 1, reason="a write whose table is not known", invalidate_all=True)
    return MyInfo(Kind.WRITE, 1, writes=frozenset((target,)), reason="a write")


_MODIFIERS = frozenset(["low_priority", "delayed", "high_priority", "ignore", "into", "quick", "if", "not", "exists"])


def _target_after(tokens: list[Token], keyword: str | None) -> MyTable | None:
    """The table a REPLACE / INSERT / LOAD DATA ... INTO TABLE names (the first name after the modifiers)."""
    i = 1
    if keyword is not None:
        words = [_word(t) for t in tokens]
        if keyword not in words:
            return None
        i = words.index(keyword) + 1
    while i < len(tokens) and _word(tokens[i]) in _MODIFIERS:
        i += 1
    if i >= len(tokens) or tokens[i].token_type not in (TokenType.VAR, TokenType.IDENTIFIER):
        return None
    name = tokens[i].text.lower()
    if i + 2 < len(tokens) and tokens[i + 1].token_type == TokenType.DOT:
        return name, tokens[i + 2].text.lower()
    return None, name


def _ddl(sql: str, tokens: list[Token]) -> MyInfo:
    words = [_word(t) for t in tokens]
    temp = words[1:2] == ["temporary"]
    databases: set[str] = set()
    if len(words) > 2 and words[1] in ("database", "schema"):
        name = tokens[-1].text.lower()
        databases.add(name)
    for i, token in enumerate(tokens[:-2]):
        if tokens[i + 1].token_type == TokenType.DOT and token.token_type in (TokenType.VAR, TokenType.IDENTIFIER):
            databases.add(token.text.lower())
    created: frozenset[str] = frozenset()
    if temp and words[0] == "create":
        target = _target_after(tokens, "table")
        if target is not None:
            created = frozenset((target[1],))
    return MyInfo(Kind.DDL, 1, reason="DDL", temp_created=created, invalidate_databases=frozenset(databases))
