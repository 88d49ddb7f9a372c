"""The client's prepared statements and portals as the proxy knows them (StatementRegistry), and the row-shape
helpers that say whether a cached result has the columns a client was described for a statement. Sans-IO."""

from __future__ import annotations

from dataclasses import dataclass

from cacheproxy.errors import CONFIGURATION_LIMIT_EXCEEDED, ProxyError
from cacheproxy.protocol import frontend as fe


@dataclass(slots=True)
class Statement:
    """A named (or the unnamed) prepared statement of the client's, as the proxy knows it."""

    query: bytes  # b"" for one prepared with SQL PREPARE (its text is not known here)
    param_types: tuple[int, ...]
    upstream: bool  # False while it exists only here (its Parse was answered locally)
    # The RowDescription the client was last given for it by a Describe: a later Bind/Execute without a Describe is
    # decoded with it, so a cached result is served for it only if its columns are those (see same_shape).
    description: bytes | None = None
    # Its parameter types as the server inferred them (ParameterDescription), for reading a key parameter sent in
    # binary when the Parse declared no type.
    inferred: tuple[int, ...] = ()
    shaped: bytes | None = None  # the last cached RowDescription found to match it (a fast path for same_shape)

    def __init__(
        self,
        query: bytes,
        param_types: tuple[int, ...],
        upstream: bool,
        description: bytes | None = None,
        inferred: tuple[int, ...] = (),
        shaped: bytes | None = None,
    ) -> None:
        self.query = query
        self.param_types = param_types
        self.upstream = upstream
        self.description = description
        self.inferred = inferred
        self.shaped = shaped


@dataclass(slots=True)
class Portal:
    statement: Statement
    bind: fe.Bind

    def __init__(self, statement: Statement, bind: fe.Bind) -> None:
        self.statement = statement
        self.bind = bind


# A portal bound by a batch answered here that ended in a Flush (it lives until the Sync): its statement, its Bind,
# and the row limit of the Execute answered here if any. Bound (and run to that point) upstream before any forwarded
# message could use it.
LocalPortal = tuple[Statement, fe.Bind, int | None]


class StatementRegistry:
    """The statements and portals of one session. `statements` and `portals` are plain dicts, read directly by the
    hot path; the changes that follow a rule (the statement limit, DISCARD ALL, SQL PREPARE / DEALLOCATE, the end of
    a transaction) are methods here."""

    __slots__ = ("executed", "local_portals", "max_statements", "portals", "statements")

    def __init__(self, max_statements: int) -> None:
        self.statements: dict[str, Statement] = {}
        self.portals: dict[str, Portal] = {}  # portals that exist upstream
        self.executed: set[str] = set()  # portals executed since their Bind: a further Execute continues them
        self.local_portals: dict[str, LocalPortal] = {}  # portals that exist only here, until the Sync
        self.max_statements = max_statements

    def check_limit(self, name: str, adding: int = 0) -> None:
        """limits.max_prepared_statements: the proxy keeps every named statement's text, so a client that prepares
        without ever closing would grow its memory without bound. Past the limit the session ends, clearly."""
        statements = self.statements
        named = len(statements) - ("" in statements)  # the unnamed statement is not counted
        if name and name not in statements and named + adding >= self.max_statements:
            raise ProxyError(
                CONFIGURATION_LIMIT_EXCEEDED,
                f"too many prepared statements in this session (limits.max_prepared_statements = "
                f"{self.max_statements}); close or deallocate the ones no longer used",
            )

    def prepared_in_sql(self, name: str) -> None:
        """SQL PREPARE name: a statement exists upstream whose text the proxy does not know."""
        self.check_limit(name)
        self.statements[name] = Statement(b"", (), upstream=True)

    def deallocated(self, name: str | None) -> None:
        """SQL DEALLOCATE name (None: DEALLOCATE ALL)."""
        if name is None:
            self.statements.clear()
        else:
            self.statements.pop(name, None)

    def transaction_ended(self) -> None:
        """Portals live until the end of their transaction."""
        self.portals.clear()
        self.executed.clear()


def same_shape(statement: Statement, value: bytes) -> bool:
    """Whether a cached result (its RowDescription first) has the columns the client was described for
    `statement`. A statement's description has no result formats yet (they come with Bind), so those are not
    compared: names, table and column numbers, types, sizes and modifiers are."""
    if statement.shaped is not None and value.startswith(statement.shaped):
        return True
    if statement.description is None:
        return False
    header = value[: header_length(value)]
    if _columns(header) != _columns(statement.description):
        return False
    statement.shaped = header
    return True


def _columns(row_description: bytes) -> bytes | None:
    """A RowDescription without its format codes (the last Int16 of each field); None if it is malformed."""
    try:
        count = int.from_bytes(row_description[5:7], "big")
        pos, parts = 7, []
        for _ in range(count):
            end = row_description.index(0, pos) + 1 + 18  # name, then table oid, attnum, type, size, modifier, format
            parts.append(row_description[pos : end - 2])
            pos = end
        return b"".join(parts) if pos == len(row_description) else None
    except ValueError:
        return None


def note_described(statement: Statement, described: bytes) -> None:
    """What a statement's Describe reply (ParameterDescription, then RowDescription or NoData) tells about it."""
    statement.description = _row_description(described)
    if described[:1] == b"t":
        count = int.from_bytes(described[5:7], "big")
        statement.inferred = tuple(int.from_bytes(described[7 + 4 * i : 11 + 4 * i], "big") for i in range(count))


def key_types(statement: Statement) -> tuple[int, ...]:
    """The statement's parameter types: declared ones, else the server's inference when it is known."""
    declared, inferred = statement.param_types, statement.inferred
    if not inferred:
        return declared
    return (
        tuple(d or (inferred[i] if i < len(inferred) else 0) for i, d in enumerate(declared))
        + inferred[len(declared) :]
    )


def _row_description(described: bytes) -> bytes | None:
    """The RowDescription in a statement's Describe reply (ParameterDescription, then RowDescription or NoData)."""
    start = header_length(described) if described[:1] == b"t" else 0
    return described[start:] if described[start : start + 1] == b"T" else None


def header_length(value: bytes) -> int:
    """Length of the RowDescription that starts a stored result (its Int32 length + the type byte)."""
    return 1 + int.from_bytes(value[1:5], "big")
