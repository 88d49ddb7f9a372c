"""The analysis result types: what kind of statement, which tables it touches, and whether it may be cached."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# (schema or None when unqualified, name). Unquoted identifiers are folded to lower case (ASCII only, as PostgreSQL
# does for a UTF-8 database); quoted identifiers are kept exactly. An unqualified name is resolved by the server
# through search_path, so a consumer must match (None, "t") against every schema's "t".
TableRef = tuple[str | None, str]

# Put in `writes` when a statement writes something whose name the analyzer could not extract (DDL on a function,
# CALL, DO, EXECUTE, GRANT ... ON ALL TABLES IN SCHEMA, DROP ... CASCADE, ...): "invalidate the whole database".
UNKNOWN_TABLE: TableRef = (None, "<unknown>")


class Kind(Enum):
    """What a statement does, as far as a cache is concerned."""

    READ = "read"
    """A query that only reads: SELECT, VALUES, TABLE, WITH ... SELECT, set operations of those, COPY ... TO."""
    WRITE = "write"
    """Changes rows: INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY ... FROM, SELECT INTO, data-modifying WITH."""
    DDL = "ddl"
    """Changes the schema or privileges: CREATE/ALTER/DROP, COMMENT, GRANT/REVOKE, REFRESH MATERIALIZED VIEW, ..."""
    TRANSACTION = "transaction"
    """Transaction control: BEGIN, COMMIT, ROLLBACK, SAVEPOINT, PREPARE TRANSACTION, ..."""
    SESSION = "session"
    """Changes session state: SET, RESET, DISCARD, SET ROLE, SET SESSION AUTHORIZATION, SET TRANSACTION."""
    OTHER = "other"
    """Everything else (LISTEN, NOTIFY, DO, CALL, EXPLAIN, VACUUM, SHOW, cursors, ...) and what we cannot parse."""


# Used to pick the kind of a multi-statement string: the highest rank wins.
KIND_STRENGTH: dict[Kind, int] = {
    Kind.READ: 0,
    Kind.TRANSACTION: 1,
    Kind.SESSION: 2,
    Kind.OTHER: 3,
    Kind.WRITE: 4,
    Kind.DDL: 5,
}


class TxOp(Enum):
    """A transaction-control operation."""

    BEGIN = "begin"
    """BEGIN or START TRANSACTION."""
    COMMIT = "commit"
    """COMMIT or END."""
    ROLLBACK = "rollback"
    """ROLLBACK or ABORT (of the whole transaction)."""
    SAVEPOINT = "savepoint"
    """SAVEPOINT name."""
    RELEASE = "release"
    """RELEASE [SAVEPOINT] name."""
    ROLLBACK_TO = "rollback_to"
    """ROLLBACK TO [SAVEPOINT] name: the transaction stays open."""
    PREPARE_TRANSACTION = "prepare_transaction"
    """PREPARE TRANSACTION 'gid': ends the session's transaction, its effects are not visible yet."""
    COMMIT_PREPARED = "commit_prepared"
    """COMMIT PREPARED 'gid': effects of a prepared transaction become visible."""
    ROLLBACK_PREPARED = "rollback_prepared"
    """ROLLBACK PREPARED 'gid'."""


@dataclass(frozen=True, slots=True)
class TxInfo:
    """Details of one transaction-control statement."""

    op: TxOp
    isolation: str | None = None  # "read committed" | "repeatable read" | "serializable" | "read uncommitted"
    read_only: bool | None = None  # READ ONLY -> True, READ WRITE -> False, not given -> None
    deferrable: bool | None = None  # DEFERRABLE -> True, NOT DEFERRABLE -> False, not given -> None
    chain: bool = False  # COMMIT/ROLLBACK AND CHAIN


@dataclass(frozen=True, slots=True)
class SessionChange:
    """Details of one session-state statement.

    `op` is one of "set", "reset", "reset_all", "discard_all", "discard_other", "set_role", "reset_role",
    "set_session_authorization", "set_local", "set_transaction". `name` is lower-cased ("timezone", "search_path",
    "role", "session_authorization", "plans", ...); `value` is the text as written after TO/= (quotes kept), None
    when there is none (RESET, DISCARD, SET SESSION AUTHORIZATION DEFAULT).
    """

    op: str
    name: str | None = None
    value: str | None = None


@dataclass(frozen=True, slots=True)
class QueryInfo:
    """Everything the proxy needs to know about one SQL string (one or several statements)."""

    kind: Kind  # several statements: the strongest (DDL > WRITE > OTHER > SESSION > TRANSACTION > READ)
    statement_count: int
    reads: frozenset[TableRef]  # relations read; CTE names and table functions are not relations
    writes: frozenset[TableRef]  # relations written; UNKNOWN_TABLE when a write target could not be named
    functions: frozenset[str]  # functions called, lower-cased, "schema.name" when written qualified
    cacheable: bool  # the static verdict: the proxy must still check the catalog (see analysis/README notes)
    reason: str | None  # why not cacheable, for operators
    tx: TxInfo | None = None  # a single transaction-control statement
    session: SessionChange | None = None  # a single session-state statement
    temp_tables_created: frozenset[TableRef] = frozenset()
    data_modifying_cte: bool = False
    # Prepared statements named in SQL (the protocol's own Parse/Close are not SQL): PREPARE name, DEALLOCATE name
    # (or DEALLOCATE ALL: `deallocates_all`), EXECUTE name. Names as the server stores them (folded, truncated).
    prepares: str | None = None
    deallocates: str | None = None
    deallocates_all: bool = False
    executes: str | None = None
    copy_from_stdin: bool = False  # COPY ... FROM STDIN: the client sends CopyData after it
    # ALTER ROLE/USER/DATABASE ... SET/RESET: sessions opened from now on start with other settings.
    alters_role_settings: bool = False
    drops_database: str | None = None  # DROP DATABASE name
    # The text names pg_temp (an object put in this session's temporary schema, or a search_path naming it).
    mentions_pg_temp: bool = False
    # What may run code the statement does not name as a call (checked against the catalog's user objects):
    operators: frozenset[str] = frozenset()  # operator symbols written (every run of operator characters, split)
    casts: frozenset[str] = frozenset()  # target types of explicit casts, as pg_type.typname when known
    # Columns whose text is cast to a date/time type ('now' in a row is read when the query runs); "" for a computed
    # value, which makes a read statically not cacheable.
    time_casts: frozenset[str] = frozenset()
    attributes: frozenset[str] = frozenset()  # names written after a qualifier (`x.f`): maybe a call of f(x)
    # Every name in a read the analyzer could not parse: any of them may be a view that runs code.
    names: frozenset[str] = frozenset()
    # Per-statement analyses when statement_count > 1 (else empty): lets the proxy see a SET or BEGIN hidden in a
    # multi-statement simple query, which the single `tx` / `session` fields cannot express.
    statements: tuple[QueryInfo, ...] = ()
