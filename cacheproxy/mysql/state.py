"""Sans-IO state of one MySQL client session: who and where it is, what can change its results, its transaction.

The cache key of a result is (current database, user, digest of the session state, statement text); the digest
holds the client's character set, the negotiated capabilities that change the reply's bytes, and every SET the
session ran, in order (sql_mode, time_zone, character_set_*, collation_*, div_precision_increment... all change
results; recording every SET is simpler and safe). The transaction state comes from the server itself: the status
flags of each OK/EOF (SERVER_STATUS_IN_TRANS; autocommit off means every statement runs inside a transaction).

Reads inside a transaction use the cache only where that is exact: at READ COMMITTED (every consistent read sees
the latest committed data, as a cached result does) and before the transaction's first write (or statement whose
effects the proxy cannot see). The level is the one the session set itself, as the proxy saw it: a session starts
at the server's default, which the proxy does not know, so until a SET names READ COMMITTED its transactions do not
read the cache. Under REPEATABLE READ nothing is: a transaction's reads must all come from the snapshot its first
read took, which the cache cannot know (a hit takes no snapshot, so the server's later reads would see commits the
hit did not, and a hit after the snapshot may show commits made since).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cacheproxy.mysql.codec import Capability, Status

# Capabilities that change the bytes of a reply: a stored reply may only be replayed to a client that negotiated the
# same ones.
FORMAT_CAPABILITIES = (
    Capability.DEPRECATE_EOF
    | Capability.OPTIONAL_RESULTSET_METADATA
    | Capability.SESSION_TRACK
    | Capability.PROTOCOL_41
    | Capability.LONG_FLAG
    | Capability.FOUND_ROWS
)


@dataclass(slots=True)
class SessionState:
    """What the proxy knows of one client session. Only the methods below change it, after the server said OK."""

    user: str
    database: str | None
    charset: int
    capabilities: int
    status: int = Status.AUTOCOMMIT
    sets: list[bytes] = field(default_factory=list)
    temp_tables: set[str] = field(default_factory=set)
    # Tables written in the open transaction: invalidated when it ends (the server's status says so).
    pending: set[tuple[str, str]] = field(default_factory=set)
    pending_databases: set[str] = field(default_factory=set)
    # Set when the proxy lost track of the session state (a USE or SET inside a multi-statement query).
    lost: str | None = None
    # The session's transaction isolation level as its own SETs made it (None: the server's default, unknown).
    isolation: str | None = None
    # The transaction open now (or the next one) may not run at `isolation`: a SET TRANSACTION for the next one only,
    # or a level changed inside a transaction (which applies from the next one). Cleared when a transaction ends.
    isolation_pending: bool = False
    # The open transaction may have written (or run something whose effects the proxy cannot see).
    wrote: bool = False
    _digest: bytes | None = None

    @property
    def in_transaction(self) -> bool:
        return bool(self.status & Status.IN_TRANS) or not self.status & Status.AUTOCOMMIT

    @property
    def reads_cache(self) -> bool:
        """Whether a read now may use the cache (be answered from it, and stored): outside a transaction, or inside
        a READ COMMITTED one before its first write."""
        if not (self.status & Status.IN_TRANS or not self.status & Status.AUTOCOMMIT):
            return True
        return self.isolation == "read-committed" and not self.isolation_pending and not self.wrote

    def why_not_in_transaction(self) -> str:
        if self.wrote:
            return "inside a transaction that has written"
        if self.isolation is None:
            return "inside a transaction at the server's default isolation level (not set by the session)"
        if self.isolation_pending:
            return "inside a transaction whose isolation level is not the session's"
        return f"inside a {self.isolation.upper().replace('-', ' ')} transaction"

    def on_isolation(self, change: str) -> None:
        """A SET changed the isolation level (a level, "next" or "unknown": see analysis.mysql.isolation_of_set)."""
        if change == "next" or self.in_transaction:
            self.isolation_pending = True
        if change == "unknown":
            self.isolation = None
        elif change != "next":
            self.isolation = change

    def on_write(self) -> None:
        """A statement that may write (or whose effects are unknown) ran: the open transaction holds its changes."""
        if self.in_transaction:
            self.wrote = True

    def digest(self) -> bytes:
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(b"%d/%d" % (self.charset, self.capabilities & FORMAT_CAPABILITIES))
            for statement in self.sets:
                h.update(b"\x01" + statement)
            self._digest = h.digest()
        return self._digest

    def on_status(self, status: int) -> None:
        if not status & Status.IN_TRANS:
            # No transaction open (its changes are committed or rolled back): the next one starts clean.
            self.wrote = False
            if self.status & Status.IN_TRANS:
                self.isolation_pending = False
        self.status = status

    def on_set(self, statement: bytes) -> None:
        self.sets.append(statement)
        self._digest = None

    def on_use(self, database: str) -> None:
        self.database = database

    def on_lost(self, why: str) -> None:
        self.lost = why

    def reset(self, user: str | None = None, database: str | None = None, *, change_user: bool = False) -> None:
        """COM_RESET_CONNECTION (same user and database) or COM_CHANGE_USER (new ones): a fresh session."""
        if change_user:
            self.user = user or ""
            self.database = database
        self.sets.clear()
        self.temp_tables.clear()
        self.status = Status.AUTOCOMMIT
        self.lost = None
        self.isolation = None
        self.isolation_pending = False
        self.wrote = False
        self._digest = None

    def take_pending(self) -> tuple[set[tuple[str, str]], set[str]]:
        """The writes to invalidate now that no transaction is open (empty while one is)."""
        if self.status & Status.IN_TRANS or not (self.pending or self.pending_databases):
            return set(), set()
        tables, databases = self.pending, self.pending_databases
        self.pending, self.pending_databases = set(), set()
        return tables, databases
