"""TransactionTracker: one session's transaction and settings state, sans-IO (no sockets, no clock, no awaits).

It is fed what the relay sends ("a statement with this analysis went upstream", "a Query / Sync / write in an
extended batch was sent", "that SET completed", "this write completed", "this result was read in the block") and
what the server answers (ReadyForQuery(status), ErrorResponse). It returns what a transaction's end means (TxEnd:
committed or not, the writes to invalidate again and publish, the results read inside it to store now, whether the
settings that key results changed), and it owns the answers to "in which state is the session" (`status`, the one
writer of the transaction status) and "may this session use the cache at all" (`uncertain`, set only through
`stop_caching`, which logs why).

Rules (PostgreSQL docs, "Transactions" and "Message Flow"):
- ReadyForQuery 'I' after a block that was open ('T') ends it: committed if a COMMIT was sent and no error came
  since the last ReadyForQuery (a COMMIT of a failed block, 'E', is a rollback); 'I' after 'I' ends an implicit
  transaction (a Query, or an extended batch up to its Sync), committed unless it failed.
- 'T' after 'T' with a COMMIT sent and no error: COMMIT AND CHAIN, committed, and a new block opened.
- A block may read the cache only when its statements each see the latest committed data (READ COMMITTED): said by
  its BEGIN, or, when the BEGIN names no isolation level, by the server, asked right behind it (`probe_wanted`,
  `probe_sent`, `probe_answered`: the default may come from anywhere, ALTER SYSTEM to PGOPTIONS). SET LOCAL / SET
  TRANSACTION stop that until the block ends.
- Results read inside a block are stored if it commits; if it rolls back, those read before its first write (or
  before its effects became unknown) are stored too: they are what autocommit reads would have read.
- SET/RESET/DISCARD ALL become part of the key state at the next ReadyForQuery if nothing failed before it and no
  block is open then; inside a block (it may yet roll back) or a pipeline, the state is unknowable: stop caching.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cacheproxy.analysis.model import UNKNOWN_TABLE, Kind, QueryInfo, TxInfo, TxOp
from cacheproxy.analysis.strings import mode as string_mode
from cacheproxy.cache import keys
from cacheproxy.cache.entry import base_table
from cacheproxy.catalog.model import Catalog
from cacheproxy.errors import ProtocolViolation
from cacheproxy.policy.classify import Classified
from cacheproxy.policy.verdict import ReadVerdict, WriteScope
from cacheproxy.protocol.messages import IDLE, IN_BLOCK, TX_STATUS_OF, TxStatus
from cacheproxy.proxy.requests import Fill, IsolationProbe

log: Final = logging.getLogger("cacheproxy.caching")

# Isolation levels under which every statement sees the latest committed data, as a cached result does.
FRESH_ISOLATION: Final = ("read committed", "read uncommitted")
_SET_CONFIG: Final = ("set_config", "pg_catalog.set_config")
# Session-state functions whose answer names the backend's own temporary schema once it has one (current_schemas(true)
# lists it; current_schema() returns it when pg_temp comes first in the search_path).
_SCHEMA_FUNCTIONS: Final = frozenset(
    {"current_schema", "current_schemas", "pg_catalog.current_schema", "pg_catalog.current_schemas"}
)


@dataclass(slots=True, unsafe_hash=True)
class TxEnd:
    """A transaction ended at a ReadyForQuery (an explicit block, or an implicit one)."""

    committed: bool
    chained: bool  # COMMIT AND CHAIN: committed, and a new block is open
    writes: tuple[WriteScope, ...]  # what it wrote: invalidate again (another session may have refilled) and publish
    fills: tuple[tuple[Fill, bytes], ...]  # results read inside it, to store now (see the rules above)
    settings_changed: bool  # SET/RESET/DISCARD ALL applied (state_digest changed)
    discarded: bool  # DISCARD ALL among them: prepared statements are gone too

    def __init__(
        self,
        committed: bool,
        chained: bool,
        writes: tuple[WriteScope, ...],
        fills: tuple[tuple[Fill, bytes], ...],
        settings_changed: bool,
        discarded: bool,
    ) -> None:
        self.committed = committed
        self.chained = chained
        self.writes = writes
        self.fills = fills
        self.settings_changed = settings_changed
        self.discarded = discarded


# The common ends, preallocated: most transactions are a lone autocommit statement that wrote nothing.
_PLAIN: Final = [TxEnd(bool(i & 2), bool(i & 1), (), (), False, False) for i in range(4)]  # [committed * 2 + chained]


class TransactionTracker:
    """The state of one session's transactions and settings (see the module docstring)."""

    __slots__ = (
        "_begin_fresh",
        "_begin_sent",
        "_clean_fills",
        "_commit_sent",
        "_failed",
        "_fills",
        "_state_changes",
        "digest",
        "epoch",
        "parameters",
        "probe",
        "probe_wanted",
        "reads_cache",
        "session_id",
        "set_history",
        "startup",
        "status",
        "strings",
        "temp_tables",
        "uncertain",
        "unsynced",
        "unsynced_write",
        "writes",
    )

    def __init__(
        self,
        session_id: int = 0,
        startup: Mapping[str, str] | None = None,
        parameters: Mapping[str, str] | None = None,
    ) -> None:
        self.session_id = session_id  # for the log
        self.startup: Mapping[str, str] = startup or {}  # the StartupMessage parameters (any GUC may come there)
        self.parameters: Mapping[str, str] = parameters if parameters is not None else {}  # reported by the server
        self.epoch = ""  # the cache service's settings epoch when the session started (see state_digest)
        self.digest: bytes | None = None  # state_digest(), until the state changes
        # The session's string rules (analysis/strings.py), from what the server reported: "" almost always.
        self.strings = ""
        self.status: TxStatus = IDLE
        # Why the session's settings can no longer be known (None: they are): then it never uses the cache again.
        self.uncertain: str | None = None
        self.reads_cache = False  # the block open now may read the cache
        self._begin_fresh = False  # the BEGIN just sent opens a block that may
        self._begin_sent = False
        self._commit_sent = False
        self._failed = False  # an ErrorResponse since the last ReadyForQuery
        self._state_changes: list[tuple[bytes, bool]] = []  # (SET/RESET/DISCARD text, is DISCARD ALL) completed
        self.set_history: list[bytes] = []  # every SET/RESET applied, in order: part of the key state
        self.temp_tables: set[str] = set()  # created by this session: a read naming one is never cached
        self.writes: list[WriteScope] = []  # written in the transaction open now (explicit or implicit)
        self._fills: list[tuple[Fill, bytes]] = []  # results read in the open block, stored if it commits
        # How many of `_fills` were read before the block's first write (None: it wrote nothing): those read what an
        # autocommit read would have, and are stored even if the block rolls back.
        self._clean_fills: int | None = None
        self.probe_wanted = False  # a BEGIN that names no isolation level was sent: ask the server which it is
        self.probe: IsolationProbe | None = None  # the question in flight, for the block opened last
        self.unsynced = False  # extended messages forwarded since the last forwarded Sync (an implicit transaction)
        self.unsynced_write = False  # ... and one of them was not a cacheable read: the implicit transaction wrote

    # -- the state that keys results ----------------------------------------------------------------------------

    def state_digest(self) -> bytes:
        """The digest of everything in this session's state that can change a result (cache/keys.py), cached until
        a setting changes. The hot path reads `digest` first and calls this only when it is None."""
        if self.digest is None:
            startup = {**self.startup, "cacheproxy.settings_epoch": self.epoch}
            self.digest = keys.state_digest(startup, self.parameters, self.set_history)
        return self.digest

    def parameter_reported(self) -> None:
        """The server reported a parameter's new value (ParameterStatus): part of the state, and maybe of how the
        session's statements are read (standard_conforming_strings, client_encoding)."""
        self.digest = None
        parameters = self.parameters
        self.strings = string_mode(parameters.get("standard_conforming_strings"), parameters.get("client_encoding"))

    # -- the one switch off ------------------------------------------------------------------------------------

    def stop_caching(self, reason: str) -> None:
        """From now on this session neither reads nor stores cached results: its settings cannot be known."""
        if self.uncertain is None:
            self.uncertain = reason
            log.info("session %d stops using the cache: %s", self.session_id, reason)

    # -- what a read may do ------------------------------------------------------------------------------------

    def may_read(self, classified: Classified) -> bool:
        """Cacheable for this session: the verdict, no temporary table of the session shadowing a name, and inside a
        transaction block what the tables' rules say (`in_transaction`)."""
        verdict = classified.verdict
        if not verdict.cacheable:
            return False
        if self.temp_tables and self.temp_tables & {name for _, name in classified.info.reads}:
            return False
        if classified.info.functions & _SCHEMA_FUNCTIONS and (self.temp_tables or self._names_pg_temp()):
            return False  # they name this backend's own pg_temp_N
        return self.status is IDLE or self._in_transaction_allows(verdict)

    def _names_pg_temp(self) -> bool:
        """pg_temp is named in the session's settings (a search_path set at startup or by SET)."""
        startup = " ".join(f"{k}={v}" for k, v in self.startup.items()).lower().encode()
        return b"pg_temp" in startup or any(b"pg_temp" in sql.lower() for sql in self.set_history)

    def _in_transaction_allows(self, verdict: ReadVerdict) -> bool:
        """Inside a (READ COMMITTED) transaction block: `never` bypasses; `until_write` reads the cache until the
        transaction has written anything; `always` reads it for every table the transaction has not written."""
        mode = verdict.in_transaction
        if mode == "never":
            return False
        if not self.writes:
            return True
        if mode == "until_write":
            return False
        return not any(
            scope.everything or {base_table(name) for name in scope.tables} & verdict.tables for scope in self.writes
        )

    # -- what was sent -----------------------------------------------------------------------------------------

    def on_statement(self, info: QueryInfo, *, idle: bool, catalog: Catalog | None) -> bool:
        """A statement not answered from the cache goes upstream. `idle`: nothing else was pending and no block was
        open when it was sent. True when it changes the session's settings once it succeeds (SET, RESET, DISCARD
        ALL...): the caller reports that with `state_changed`."""
        changes_state = False
        for statement in info.statements or (info,):
            if statement.tx is not None:
                self._on_transaction_control(statement.tx)
            if statement.session is not None:
                changes_state = self._on_session_change(statement.session.op, idle=idle and info.statement_count == 1)
            if statement.kind is Kind.OTHER and UNKNOWN_TABLE in statement.writes:
                self.stop_caching("a statement with unknown effects (DO, CALL, EXECUTE) ran")
        if info.temp_tables_created:
            self.temp_tables |= {name for _, name in info.temp_tables_created}
        if info.kind is Kind.DDL or any(statement.kind is Kind.DDL for statement in info.statements):
            self._note_private_names(info)
        for function in info.functions:
            # A function that may write may also change settings (set_config(), SET inside it): unknowable.
            if function in _SET_CONFIG or catalog is None or catalog.may_write(function):
                self.stop_caching(f"{function}() may have changed settings the proxy cannot see")
        return changes_state

    def _note_private_names(self, info: QueryInfo) -> None:
        """DDL may give this session's private (temporary) objects names that other sessions with the same settings
        read as shared ones: a temporary table renamed (its new name is temporary too), anything created while
        pg_temp is named in the search_path (`CREATE TABLE t` then creates a temporary table, and current_schema()
        becomes pg_temp_N), or an object put in pg_temp explicitly that is not a temporary table tracked by name."""
        names = {name for _, name in info.writes}
        if self.temp_tables & names:
            self.temp_tables |= names
        if self._names_pg_temp() or (info.mentions_pg_temp and not info.temp_tables_created):
            self.stop_caching("DDL while pg_temp is in the search_path, or in pg_temp")

    def _on_transaction_control(self, tx: TxInfo) -> None:
        if tx.op is TxOp.BEGIN:
            # READ ONLY DEFERRABLE matters only under SERIALIZABLE. With no level named, the default decides, and the
            # proxy cannot know it (ALTER SYSTEM, postgresql.conf, ALTER DATABASE/ROLE SET, PGOPTIONS, a SET in a
            # function...): the server is asked.
            self._begin_fresh = tx.isolation in FRESH_ISOLATION
            self.probe_wanted = tx.isolation is None
            self._begin_sent = True
        elif tx.op is TxOp.COMMIT:
            self._commit_sent = True

    def probe_sent(self) -> IsolationProbe:
        """The question for the block a BEGIN just opened goes upstream, pipelined behind it."""
        self.probe_wanted = False
        probe = self.probe = IsolationProbe()
        return probe

    def probe_answered(self, probe: IsolationProbe, level: str | None) -> None:
        """The server's answer (None: none readable). It completes before its own ReadyForQuery is read: the status
        is the BEGIN's. Until it says READ COMMITTED, the block does not read the cache."""
        if probe is self.probe:
            self.probe = None
            if self.status is IN_BLOCK and level in FRESH_ISOLATION:
                self.reads_cache = True

    def _on_session_change(self, op: str, *, idle: bool) -> bool:
        if op in ("set_local", "set_transaction"):
            # Lasts until the transaction ends, and the cache's results were not read with it: bypass until then.
            self.reads_cache = self._begin_fresh = self.probe_wanted = False
            self.probe = None
            return False
        if not idle or self.status is not IDLE:
            # Inside a transaction block a SET may yet be rolled back (and DISCARD ALL fails there): the proxy
            # cannot tell which state holds, so this session stops using the cache.
            self.stop_caching("SET, RESET or DISCARD inside a transaction block or a pipeline")
            return False
        return True

    def sent_query(self) -> None:
        """A simple Query went upstream: it ends any implicit transaction of extended messages."""
        self.unsynced = self.unsynced_write = False

    def sent_extended(self, *, sync: bool) -> None:
        """An extended-protocol message went upstream (`sync`: a Sync, which ends the implicit transaction)."""
        self.unsynced = not sync
        if sync:
            self.unsynced_write = False

    def sent_write(self) -> None:
        """An Execute that may write went upstream: reads later in the same implicit transaction see it uncommitted."""
        self.unsynced_write = True

    # -- what completed ----------------------------------------------------------------------------------------

    def state_changed(self, sql: bytes, *, discards_all: bool) -> None:
        """A SET/RESET/DISCARD completed without error: applied at ReadyForQuery if nothing failed before it (an
        error later in the same implicit transaction rolls it back)."""
        self._state_changes.append((sql, discards_all))

    def about_to_write(self) -> None:
        """A write goes upstream (or a statement whose effects are unknown): results read in the block from now on
        may show it uncommitted, and are not stored if the block rolls back."""
        if self._clean_fills is None:
            self._clean_fills = len(self._fills)

    def wrote(self, scope: WriteScope) -> None:
        """A write completed: invalidated again when its transaction ends (after a rollback, merely safe)."""
        self.writes.append(scope)

    def read_in_block(self, fill: Fill, value: bytes) -> None:
        """A result read inside a transaction block: stored only if the block commits."""
        self._fills.append((fill, value))

    def on_error(self) -> None:
        """An ErrorResponse reached the client."""
        self._failed = True

    # -- ReadyForQuery -----------------------------------------------------------------------------------------

    def on_ready(self, status_byte: bytes) -> TxEnd | None:
        """ReadyForQuery(status): the one place the transaction status changes. A TxEnd when a transaction ended."""
        status = TX_STATUS_OF.get(status_byte)
        if status is None:
            raise ProtocolViolation(f"invalid transaction status {status_byte!r} in ReadyForQuery")
        previous = self.status
        self.status = status
        if status is IN_BLOCK:
            if previous is not IN_BLOCK or self._begin_sent:  # (a BEGIN after a COMMIT in one Query, too)
                self.reads_cache = self._begin_fresh
        else:
            self.reads_cache = False
        self._begin_fresh = self._begin_sent = False
        end = None
        if status is IDLE:
            # Committed: autocommit without error, or a COMMIT of a block that had not failed.
            committed = previous is IDLE or (previous is IN_BLOCK and self._commit_sent)
            end = self._end(committed and not self._failed, chained=False)
            self._commit_sent = False
        elif previous is IN_BLOCK and self._commit_sent and not self._failed:
            end = self._end(True, chained=True)  # COMMIT AND CHAIN
            self._commit_sent = False
        if status is not IDLE and self._state_changes:
            self.stop_caching("SET inside a transaction block")  # it may yet be rolled back
        self._state_changes.clear()
        self._failed = False
        return end

    def _end(self, committed: bool, *, chained: bool) -> TxEnd:
        settings_changed = discarded = False
        if not self._failed and not chained:
            for sql, discards_all in self._state_changes:
                if discards_all:
                    self.set_history.clear()
                    self.temp_tables.clear()
                    discarded = True
                else:
                    self.set_history.append(sql)
                settings_changed = True
            if settings_changed:
                self.digest = None
        writes, fills, clean = self.writes, self._fills, self._clean_fills
        self._clean_fills = None
        if not writes and not fills and not settings_changed:
            return _PLAIN[committed * 2 + chained]
        self.writes, self._fills = [], []
        # Rolled back (ORMs and pools end read-only transactions so): what it read before writing anything is what
        # autocommit reads would have read, in a block that may read the cache (READ COMMITTED). What it read after
        # a write may show that uncommitted write: never stored then.
        stored = fills if committed or clean is None else fills[:clean]
        return TxEnd(committed, chained, tuple(writes), tuple(stored), settings_changed, discarded)
