"""CachingRelay: the relay of one session when the cache is on. It answers what it can from the cache and tracks
every request it forwards, so that results can be captured on their way back and writes invalidate what they touch.

Client side: simple queries are handled one by one; extended-protocol messages are held until Sync (or Flush) so
that a batch is either answered locally as a whole, or forwarded as a whole. Local answers are only given when
nothing is pending upstream, so replies never overtake each other, and outside a transaction block or inside a READ
COMMITTED one that the rules let read the cache (`in_transaction`). Results read inside a transaction block are
stored only once it commits.

Upstream side: every reply goes through the ReplyTracker, which says which request it answers. Replies to the
proxy's own requests (a Parse replayed for a statement it answered locally, a Describe that gives a captured result
its RowDescription) are stripped; captured results are stored when their request completes without error.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cacheproxy.analysis.model import UNKNOWN_TABLE, Kind, QueryInfo, TxInfo, TxOp
from cacheproxy.analysis.strings import mode as string_mode
from cacheproxy.cache import keys
from cacheproxy.cache.entry import Entry, TableId, base_table
from cacheproxy.errors import ProtocolViolation, ProxyError
from cacheproxy.policy.verdict import ReadVerdict, WriteScope, write_scope
from cacheproxy.protocol import frontend as fe
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE, Framer, encode
from cacheproxy.protocol.replies import Capture, Op, Pending, ReplyTracker
from cacheproxy.proxy.admin_console import is_admin_command
from cacheproxy.proxy.cache_service import CacheService, Classified

if TYPE_CHECKING:
    from cacheproxy.proxy.session import Session

log = logging.getLogger("cacheproxy.caching")

# A batch held for a Sync is forwarded anyway past this many messages, or limits.max_pipeline_bytes.
_MAX_BATCH_MESSAGES = 512
# PostgreSQL's output buffer (PQ_SEND_BUFFER_SIZE): it sends replies before a Sync or Flush only once this fills.
_SERVER_OUTPUT_BUFFER = 8192
CONFIGURATION_LIMIT_EXCEEDED = "53400"
# How long a miss waits for another session's fill of the same key before asking upstream itself.
_SINGLE_FLIGHT_WAIT = 2.0
# How long a session waits for its database's catalog before deciding without the cache.
_CATALOG_WAIT = 2.0
_REFRESH_WAIT = 5.0  # a request behind write-through refreshes waits this long for them, then goes upstream
_ADMIN_WAIT = 60.0  # a CACHEPROXY command pipelined behind slow queries waits for their replies this long
_READY_IDLE = m.ready_for_query(b"I")
_READY = {b"I": _READY_IDLE, b"T": m.ready_for_query(b"T")}
_PARSE_BIND_COMPLETE = fe.PARSE_COMPLETE + fe.BIND_COMPLETE
# Isolation levels under which every statement sees the latest committed data, as a cached result does.
_FRESH_ISOLATION = ("read committed", "read uncommitted")
# Asked after a BEGIN that names no isolation level, pipelined behind it (see _probe_isolation); its reply is stripped.
# SHOW takes no snapshot, so a SET TRANSACTION after it still works.
_ISOLATION_PROBE = encode(b"Q", b"SHOW transaction_isolation\x00")
# Date/time input words PostgreSQL evaluates when it reads them (docs, "Special Date/Time Inputs").
_TIME_WORDS = re.compile(rb"(?i)(?<![a-z])(now|today|tomorrow|yesterday|current)(?![a-z])")
_NAMES_STATEMENT = re.compile(rb"^\s*(deallocate\s+(?:prepare\s+)?|execute\s+)(\"(?:[^\"]|\"\")+\"|[\w$]+)", re.I)
_SYNC = b"S\x00\x00\x00\x04"
# Messages after which the cache may answer (a hit): checked against a client that does not read its answers.
_CYCLE_ENDS = frozenset((m.QUERY, m.SYNC, m.FLUSH))
_COPY_FROM_STDIN = re.compile(rb"^\s*copy\b(?:(?!\bto\b).)*\bfrom\s+stdin\b", re.I | re.S)
_ROLE_SETTINGS = re.compile(rb"^\s*alter\s+(?:role|user|database)\s.*\b(?:set|reset)\b", re.I | re.S)
_DISCARD_ALL = re.compile(rb"^\s*discard\s+all\s*;?\s*$", re.I)
_DEALLOCATE = re.compile(rb"^\s*deallocate\s+(?:prepare\s+)?(all\b|\"(?:[^\"]|\"\")+\"|[\w$]+)", re.I)
_DROP_DATABASE = re.compile(rb"^\s*drop\s+database\s+(?:if\s+exists\s+)?(\"(?:[^\"]|\"\")+\"|[\w$]+)", re.I)
_RELEASE_WAIT = 10.0  # a DROP DATABASE waits this long for the proxy's own connections to it to close
# Session-state functions whose answer names the backend's own temporary schema once it has one (current_schemas(true)
# lists it; current_schema() returns it when pg_temp comes first in the search_path).
_SCHEMA_FUNCTIONS = frozenset(
    {"current_schema", "current_schemas", "pg_catalog.current_schema", "pg_catalog.current_schemas"}
)
_PREPARE = re.compile(rb"^\s*prepare\s+(\"(?:[^\"]|\"\")+\"|[\w$]+)", re.I)


@dataclass(slots=True)
class Statement:
    """A named (or the unnamed) prepared statement of the client's, as the proxy knows it."""

    query: bytes
    param_types: tuple[int, ...]
    upstream: bool  # False while it exists only here (its Parse was answered locally)
    # The RowDescription the client was last given for it by a Describe: a later Bind/Execute without a Describe is
    # decoded with it, so a cached result is served for it only if its columns are those (see _same_shape).
    description: bytes | None = None
    # Its parameter types as the server inferred them (ParameterDescription), for reading a key parameter sent in
    # binary when the Parse declared no type.
    inferred: tuple[int, ...] = ()
    shaped: bytes | None = None  # the last cached RowDescription found to match it (a fast path for _same_shape)


@dataclass(slots=True)
class Portal:
    statement: Statement
    bind: fe.Bind


_KIND_LABELS = {
    Kind.READ: "read",
    Kind.WRITE: "write",
    Kind.DDL: "ddl",
    Kind.TRANSACTION: "tx",
    Kind.SESSION: "session",
    Kind.OTHER: "other",
}


@dataclass(slots=True)
class _ParseDone:
    """A Parse sent upstream: if the server refuses or skips it, the statement does not exist there."""

    name: str
    statement: Statement
    replay: bool = False


@dataclass(slots=True)
class _Request:
    """A forwarded query or Execute, for what happens when it completes: invalidation, session state, metrics and
    the slow-query log."""

    scope: WriteScope | None
    kind: str
    outcome: str  # "miss" (its result will be stored) or "bypass"
    started: float
    sql: bytes
    changes_state: bool = False  # a SET/RESET/DISCARD to record if it succeeds


# In a batch answered locally: the statement, its Bind, the row limit of its Execute, and its entry once found.
_LocalPortal = tuple[Statement, fe.Bind, int, Entry | None]


@dataclass(slots=True)
class Fill:
    """What storing a captured result needs: its key, its dependencies, and the generations taken at send time."""

    key: Hashable
    tables: frozenset[TableId]
    generations: tuple[int, ...]
    ttl: float
    query: str
    rule: str
    leader: bool  # this session registered the single-flight entry for the key
    deferred: bool = False  # read inside a transaction block: stored only if that transaction commits


@dataclass(slots=True)
class _Described:
    """A Describe of a statement sent upstream: its reply tells the client the statement's RowDescription."""

    statement: Statement


class _IsolationProbe:
    """The proxy's own question, after a BEGIN that named no isolation level: which level the transaction has."""

    __slots__ = ()


@dataclass(slots=True)
class _Refresh:
    """A write-through refresh this session sent for another result: counted when it completes."""


class CachingRelay:
    """The caching relay of one session (its transports are already taken over by Links)."""

    def __init__(
        self,
        session: Session,
        service: CacheService,
        write_upstream: Callable[[bytes], None],
        write_client: Callable[[bytes], None],
    ) -> None:
        self.session = session
        self.service = service
        self._write_upstream = write_upstream
        self._write_client = write_client
        self.database = session.database
        self.user = session.user
        self.tracker = ReplyTracker()
        self._epoch = str(service.settings_epoch)
        limits = session.server.config.limits
        self._client_framer = Framer(limits.max_message_size)
        self._max_batch_bytes = limits.max_pipeline_bytes
        self._max_statements = limits.max_prepared_statements
        self._up_framer = Framer(1 << 31)
        self._inbox: deque[tuple[int, bytes]] = deque()
        self._batch: list[tuple[int, bytes]] = []
        self._batch_bytes = 0
        self._statements: dict[str, Statement] = {}
        self._portals: dict[str, Portal] = {}
        self._executed_portals: set[str] = set()  # executed since their Bind: a further Execute continues them
        # Portals bound by a batch answered here that ended in a Flush (they live until the Sync): their Bind, and
        # the row limit of the Execute answered here if any. Bound (and run to that point) upstream before any
        # forwarded message could use them (`_replay_local_portals`).
        self._local_portals: dict[str, tuple[Statement, fe.Bind, int | None]] = {}
        self._state_changes: list[bytes] = []  # SET/RESET/DISCARD ALL done, to apply at ReadyForQuery
        self._failed_since_ready = False  # an ErrorResponse since the last ReadyForQuery
        self._set_history: list[bytes] = []
        self._digest: bytes | None = None
        self._uncertain: str | None = None  # why the session's state can no longer be known: caching stops
        self._temp_tables: set[str] = set()
        self._tx_writes: list[WriteScope] = []
        # Transaction blocks (see `_in_transaction_allows`): whether the one open now may read the cache, whether the
        # BEGIN just sent opens one that may, whether a COMMIT was sent, and results read in it, to store at commit.
        self._tx_reads_cache = False
        self._begin_fresh = False
        self._begin_sent = False
        self._commit_sent = False
        self._probe_wanted = False  # a BEGIN that names no isolation level was sent: ask the server which it is
        self._probe: _IsolationProbe | None = None  # the question in flight, for the transaction opened last
        self._tx_fills: list[tuple[Fill, bytes]] = []
        # How many of `_tx_fills` were read before the transaction's first write (None: it wrote nothing): those
        # read what an autocommit read would have, and are stored even if the transaction rolls back.
        self._tx_clean_fills: int | None = None
        self._created_here: list[tuple[str, Statement]] = []  # named statements a local answer just created
        # Entries this session's writes removed, for write-through refreshes once they commit.
        self._stale: list[Entry] = []
        self._leading: set[Hashable] = set()
        self._unsynced = False  # extended messages forwarded since the last forwarded Sync
        self._unsynced_write = False  # ... and one of them was not a cacheable read: an implicit transaction wrote
        self._waiting = False
        self._drained: asyncio.Future[None] | None = None
        self._waited = False  # the message at the inbox head already waited once: do not wait again
        self.terminated = False
        service.attach(self.database)
        service.watch(self.database)

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.tracker.pending) or bool(self._batch) or bool(self._inbox)

    def _can_serve(self) -> bool:
        """Local answers only when the server is idle as far as this session goes: nothing pending, no extended
        messages forwarded since the last Sync (an implicit transaction may be open), no transaction block but one
        that may read the cache, and the database's invalidation feed is up."""
        return (
            not self.tracker.pending
            and not self._unsynced
            and not self.tracker.skipping
            and (self.session.tx_status == b"I" or (self._tx_reads_cache and self.session.tx_status == b"T"))
            and self._uncertain is None
            and self.database not in self.service.blind
        )

    def _state_digest(self) -> bytes:
        if self._digest is None:
            session = self.session
            startup = {**session.startup_parameters, "cacheproxy.settings_epoch": self._epoch}
            self._digest = keys.state_digest(startup, session.parameters, self._set_history)
        return self._digest

    def close(self) -> None:
        """The session ended: release every single-flight slot it held, so that waiters go upstream themselves.
        Writes whose outcome it will never read (sent, or done in a transaction still open) may have committed:
        invalidate and publish them as if they had (merely safe if they did not)."""
        self.service.detach(self.database)
        for key in self._leading:
            self.service.end_fill(key)
        self._leading.clear()
        unknown = [p.on_done.scope for p in self.tracker.pending if isinstance(p.on_done, _Request) and p.on_done.scope]
        unknown += self._tx_writes
        if unknown:
            for scope in unknown:
                self.service.invalidate(self.database, scope, counted=False)
            self.service.publish(self.database, unknown)
            self._tx_writes.clear()

    # -- client -> upstream ----------------------------------------------------------------------------------

    def on_client_data(self, data: bytes) -> None:
        region, frames = self._client_framer.feed(data)
        for msg_type, start, end in frames:
            self._inbox.append((msg_type, region[start:end]))
        self._drain_inbox()

    def _drain_inbox(self) -> None:
        out: list[bytes] = []
        inbox = self._inbox
        while inbox and not self._waiting:
            msg_type, message = inbox[0]
            if msg_type in _CYCLE_ENDS and self.session.client_backlogged():
                break  # the client is not reading our answers: hold the rest until it does (the Session resumes us)
            if not self._dispatch(msg_type, message, out):
                break  # waiting: the message stays at the head and is dispatched again after the wait
            inbox.popleft()
            self._waited = False
        # The client sent all it has and no Sync or Flush ends the batch: the server would run each message as it
        # arrives (and send an error at once), so a client that waits now must not wait for us. Held still only if
        # the cache can answer it all: the server would then have sent nothing yet either.
        if (
            self._batch
            and not inbox
            and not self._waiting
            and not self._client_framer.buffered
            and not self._held_batch_answerable()
        ):
            self._forward_batch(out)
        if out:
            self._write_upstream(b"".join(out))

    def _dispatch(self, msg_type: int, message: bytes, out: list[bytes]) -> bool:
        """Handle one client message; False when it must wait (it will be dispatched again)."""
        if self.tracker.pending and not self._waited and self.tracker.quiet_only():
            # Only write-through refreshes are pending: wait for them, and this request will likely hit.
            self._drained = asyncio.get_running_loop().create_future()
            self._wait_for(self._drained, _REFRESH_WAIT)
            return False
        if msg_type == m.QUERY:
            if self._batch:
                self._forward_batch(out)
            return self._on_query(message, out)
        if msg_type in (m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE):
            self._batch.append((msg_type, message))
            self._batch_bytes += len(message)
            if len(self._batch) > _MAX_BATCH_MESSAGES or self._batch_bytes > self._max_batch_bytes:
                self._forward_batch(out)
            return True
        if msg_type in (m.SYNC, m.FLUSH):
            self._batch.append((msg_type, message))
            if self._on_batch_end(out):
                return True
            self._batch.pop()  # waiting: the Sync (or Flush) is dispatched again afterwards
            return False
        if self._batch:
            self._forward_batch(out)
        if msg_type in (m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL):
            out.append(message)
            if msg_type != m.COPY_DATA:
                for ignored in self.tracker.client_copy_end():
                    self._complete(ignored)
        elif msg_type == m.FUNCTION_CALL:
            # A fast-path call can run any function: assume it wrote anything.
            scope = WriteScope(frozenset(), True, "FunctionCall", code="function_call")
            self._before_write(scope)
            # It may as well have changed settings (set_config() through the fast path): unknowable from here.
            self._uncertain = self._uncertain or "a FunctionCall ran"
            request = _Request(scope, "other", "bypass", self.service.clock(), b"<FunctionCall>")
            self._queue(Pending(Op.FUNCTION_CALL, on_done=request))
            out.append(message)
        elif msg_type == m.TERMINATE:
            self.terminated = True
            out.append(message)
        else:
            raise ProtocolViolation(f"invalid frontend message type {msg_type}")
        return True

    # -- simple query ----------------------------------------------------------------------------------------

    def _on_query(self, message: bytes, out: list[bytes]) -> bool:
        sql = message[HEADER_SIZE:-1]
        if is_admin_command(sql):
            return self._on_admin_command(sql, message, out)
        if not self._waited and (dropping := _DROP_DATABASE.match(sql)) is not None:
            # The proxy's own connections to that database would make it fail ("being accessed by other users").
            release = self.service.release(_identifier(dropping.group(1)), "DROP DATABASE through the proxy")
            if release is not None:
                self._wait_for(release, _RELEASE_WAIT)
                return False
        self._statements.pop("", None)  # a simple Query replaces the unnamed statement (and portal)
        self._local_portals = {}  # ... and ends the implicit transaction its portals lived in
        classified = self._classify(sql)
        if classified is None:
            return False
        info = classified.info
        capture: Capture | None = None
        scope: WriteScope | None = None
        changes_state = False
        started = self.service.clock()
        if info.kind is Kind.READ and info.statement_count == 1 and self._servable(classified):
            key = keys.query_key(self.database, self.user, self._state_digest(), sql)
            entry = self.service.engine.get(key, started, count_miss=False)
            if entry is not None:
                self._write_client(entry.value + _READY[self.session.tx_status])
                self.service.observe_hit(classified.verdict.tables)
                return True
            fill = self._begin_fill(key, classified, sql)
            if fill is None:
                return False  # (a miss is counted once, when the query goes upstream)
            self.service.engine.count(key, None)
            capture = Capture(self.service.max_entry_size, fill)
            self.service.observe_miss(classified.verdict.tables)
        else:
            if self._statement_only_here(sql, out):
                return True
            scope, changes_state = self._note_effects(classified, sql, idle=not self.tracker.pending)
        request = _Request(scope, _KIND_LABELS[info.kind], "miss" if capture else "bypass", started, sql)
        request.changes_state = changes_state
        self._queue(Pending(Op.QUERY, capture=capture, on_done=request))
        self._unsynced = self._unsynced_write = False  # a Query ends any implicit transaction
        out.append(message)
        if self._probe_wanted:
            self._probe_isolation(out)
        return True

    def _statement_only_here(self, sql: bytes, out: list[bytes]) -> bool:
        """SQL DEALLOCATE or EXECUTE naming a statement whose Parse was answered here (it does not exist upstream).
        True when the Query was answered here; else what the server needs first is added to `out`."""
        named = _NAMES_STATEMENT.match(sql)
        if named is None:
            return False
        name = _identifier(named.group(2))
        existing = self._statements.get(name)
        if existing is None or existing.upstream or not existing.query:
            return False
        if named.group(1).lower().startswith(b"deallocate"):
            # Deallocating it is ours to answer (in order, outside a failed transaction block).
            if self.tracker.pending or self.session.tx_status == b"E":
                return False
            del self._statements[name]
            self._write_client(m.command_complete("DEALLOCATE") + m.ready_for_query(self.session.tx_status))
            return True
        # EXECUTE of it: create it upstream first, closed by its own Sync so that a failing Parse does not make the
        # server discard the Query behind it.
        self._replay(name, existing, out)
        out.append(_SYNC)
        self._queue(Pending(Op.SYNC, strip=True))
        return False

    def _on_admin_command(self, sql: bytes, message: bytes, out: list[bytes]) -> bool:
        """Answer a CACHEPROXY command in order: after every reply still due from upstream."""
        if self.tracker.pending:
            if not self._waited:
                self._drained = asyncio.get_running_loop().create_future()
                self._wait_for(self._drained, _ADMIN_WAIT)
                return False
            # Still busy after the wait: an answer now would overtake replies. The server answers instead.
            self._queue(Pending(Op.QUERY))
            out.append(message)
            return True
        reply = self.session.server.admin_console.execute(self.session, sql.decode("utf-8", "replace"))
        self._write_client(reply + m.ready_for_query(self.session.tx_status))
        return True

    def explain(self, sql: bytes) -> list[tuple[str, str]]:
        """Why `sql` would or would not be served from the cache in this session (CACHEPROXY EXPLAIN)."""
        classified = self.service.classify(self.database, sql, self._strings())
        info, verdict = classified.info, classified.verdict
        servable = self._cacheable_here(classified) and info.statement_count == 1
        reason = verdict.reason
        if verdict.cacheable and not servable:
            reason = "reads a temporary table of this session" if info.statement_count == 1 else "multiple statements"
        if servable and self._uncertain is not None:
            servable, reason = False, f"this session's settings are unknown: {self._uncertain}"
        if servable and self.database in self.service.blind:
            servable, reason = False, f"database {self.database} is not served: {self.service.blind[self.database]}"
        rows = [
            ("cacheable", "yes" if servable else "no"),
            ("reason", reason or ("outside a transaction block" if servable else "")),
            ("kind", info.kind.value),
            ("reads", ", ".join(sorted(f"{s}.{n}" if s else n for s, n in info.reads))),
            ("depends_on", ", ".join(sorted(verdict.tables))),
            ("row_level", _row_level(classified)),
            ("rule", verdict.rule),
            ("ttl", f"{verdict.ttl:g}s" if verdict.cacheable else ""),
            ("strategy", verdict.strategy if verdict.cacheable else ""),
        ]
        scope = write_scope(info, self.service.catalogs.last_known(self.database))
        if not scope.empty:
            what = "the whole database" if scope.everything else ", ".join(sorted(scope.tables))
            if classified.point is not None and not scope.everything:
                what += f" (only the rows of the {classified.point.column} values it names)"
            rows.append(("invalidates", what))
        return rows

    def _strings(self) -> str:
        """The session's string rules, as last reported by the server (analysis/strings.py): "" almost always."""
        parameters = self.session.parameters
        return string_mode(parameters.get("standard_conforming_strings"), parameters.get("client_encoding"))

    def _classify(self, sql: bytes) -> Classified | None:
        """Classify, first waiting (once, bounded) for the database's catalog when it is still loading."""
        if self._wait_for_catalog():
            return None
        return self.service.classify(self.database, sql, self._strings())

    def _wait_for_catalog(self) -> bool:
        """True when the session now waits for its database's catalog (a first query, or one after DDL) or for its
        invalidation feed to start listening."""
        service = self.service
        if self._waited or (service.catalogs.get(self.database) is not None and self.database not in service.blind):
            return False
        pending = service.watch(self.database)
        if pending is None:
            return False  # unreadable catalog, or a feed that was lost: decide without them (nothing is cached)
        self._wait_for(pending, _CATALOG_WAIT)
        return True

    def _can_fill(self) -> bool:
        """Results read now may be stored: the session is settled and the database's invalidation feed is up."""
        return self._settled() and self.database not in self.service.blind

    def _settled(self) -> bool:
        """The server's state is known (nothing pending but reads sent since the last Sync, as when pg8000 sends a
        Bind and then its Execute, each with a Flush), no transaction block but one that may read the cache, and no
        write of this session's that is not yet committed (an implicit extended-protocol transaction)."""
        status = self.session.tx_status
        return (
            (not self.tracker.pending or (self._unsynced and self.tracker.within_batch()))
            and not self._unsynced_write
            and (status == b"I" or (self._tx_reads_cache and status == b"T"))
            and self._uncertain is None
        )

    def _servable(self, classified: Classified) -> bool:
        """Cacheable, and the session is where a local answer may be given now."""
        return self._can_serve() and self._cacheable_here(classified)

    def _cacheable_here(self, classified: Classified) -> bool:
        """Cacheable for this session: the verdict, no temporary table of the session shadowing a name, and inside a
        transaction block what the tables' rules say (`in_transaction`)."""
        verdict = classified.verdict
        if not verdict.cacheable:
            return False
        if self._temp_tables and self._temp_tables & {name for _, name in classified.info.reads}:
            return False
        if classified.info.functions & _SCHEMA_FUNCTIONS and (self._temp_tables or self._names_pg_temp()):
            return False  # they name this backend's own pg_temp_N
        return self.session.tx_status == b"I" or self._in_transaction_allows(verdict)

    def _in_transaction_allows(self, verdict: ReadVerdict) -> bool:
        """Inside a (READ COMMITTED) transaction block: `never` bypasses; `until_write` reads the cache until the
        transaction has written anything; `always` reads it for every table the transaction has not written."""
        mode = verdict.in_transaction
        if mode == "never":
            return False
        if not self._tx_writes:
            return True
        if mode == "until_write":
            return False
        return not any(
            scope.everything or {base_table(name) for name in scope.tables} & verdict.tables
            for scope in self._tx_writes
        )

    @staticmethod
    def _fresh_transaction(tx: TxInfo) -> bool | None:
        """Whether a BEGIN opens a transaction whose statements each see the latest committed data (READ COMMITTED;
        READ ONLY DEFERRABLE matters only under SERIALIZABLE). None when it names no isolation level: the default
        then decides, and the proxy cannot know it (ALTER SYSTEM, postgresql.conf, ALTER DATABASE/ROLE SET,
        PGOPTIONS, a SET in a function...): the server is asked (`_probe_isolation`)."""
        if tx.isolation is None:
            return None
        return tx.isolation in _FRESH_ISOLATION

    def _begin_fill(self, key: Hashable, classified: Classified, sql: bytes) -> Fill | None:
        """Prepare to capture a miss; None when another session is already filling it (we wait, then retry)."""
        service = self.service
        in_flight = service.fill_in_flight(key)
        if in_flight is not None and key not in self._leading:
            if not self._waited:
                self._wait_for(in_flight, _SINGLE_FLIGHT_WAIT)
                return None
            leader = False
        else:
            service.begin_fill(key)
            self._leading.add(key)
            leader = True
        verdict = classified.verdict
        tables = service.dependencies(self.database, classified)
        return Fill(
            key,
            tables,
            service.engine.generations(tables),
            verdict.ttl,
            sql.decode("utf-8", "replace"),
            verdict.rule,
            leader,
            deferred=self.session.tx_status != b"I",
        )

    def _wait_for(
        self, awaitable: asyncio.Future[object] | asyncio.Task[object] | asyncio.Future[None], timeout: float
    ) -> None:
        """Pause this session's client side until `awaitable` is done (or `timeout`), then go on where it was."""
        self._waiting = True
        self.session.pause_client()

        async def wait() -> None:
            try:
                await asyncio.wait_for(asyncio.shield(awaitable), timeout)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the session is closing: nothing more to dispatch
            except Exception:  # timed out, or what we waited for failed: go on without it
                pass
            self._waiting = False
            self._waited = True
            self.session.resume_client()
            self.session.run_guarded(self._drain_inbox)

        self.session.spawn(wait())

    # -- what a statement does to the session and the cache ---------------------------------------------------

    def _note_effects(
        self, classified: Classified, sql: bytes, *, idle: bool, bind: fe.Bind | None = None,
        param_types: tuple[int, ...] = (),
    ) -> tuple[WriteScope | None, bool]:  # fmt: skip
        """Before a non-cached statement goes upstream: invalidate what it may write, and see what it does to the
        session's state. `idle`: nothing else was pending and no transaction block was open when it was sent;
        `bind`: its Bind, for extended protocol (a point write's key may be a parameter).
        Returns the write scope, and whether the statement, once it succeeds, changes the session's state."""
        info = classified.info
        changes_state = False
        for statement in info.statements or (info,):
            if statement.tx is not None:
                self._on_transaction_control(statement.tx)
            if statement.session is not None:
                changes_state = self._on_session_change(statement.session.op, idle=idle and info.statement_count == 1)
            if statement.kind is Kind.OTHER and UNKNOWN_TABLE in statement.writes:
                self._uncertain = self._uncertain or "a statement with unknown effects (DO, CALL, EXECUTE) ran"
        if info.temp_tables_created:
            self._temp_tables |= {name for _, name in info.temp_tables_created}
        if info.kind is Kind.DDL or any(statement.kind is Kind.DDL for statement in info.statements):
            self._note_private_names(info, sql)
        if (prepared := _PREPARE.match(sql)) is not None:
            self._check_statement_limit(_identifier(prepared.group(1)))
            self._statements[_identifier(prepared.group(1))] = Statement(b"", (), upstream=True)
        elif (dealloc := _DEALLOCATE.match(sql)) is not None:
            target = dealloc.group(1)
            if target.lower() == b"all":
                self._statements.clear()
            else:
                self._statements.pop(_identifier(target), None)
        catalog = self.service.catalogs.last_known(self.database)
        for function in info.functions:
            # A function that may write may also change settings (set_config(), SET inside it): unknowable.
            if function in ("set_config", "pg_catalog.set_config") or catalog is None or catalog.may_write(function):
                self._uncertain = self._uncertain or f"{function}() may have changed settings the proxy cannot see"
        scope = self.service.row_scope(
            classified, write_scope(info, catalog), bind.arguments if bind is not None else None, param_types
        )
        if scope.code == "function_call":  # also a view, operator or cast running such a function (verdict.py)
            self._uncertain = self._uncertain or f"{scope.why}: settings may have changed"
        if _ROLE_SETTINGS.match(sql):
            self.service.settings_epoch += 1
            self.service.publish(self.database, (), settings=True)
        if scope.ddl:
            # Decide nothing with the old catalog from now on; it is read again once the DDL has completed.
            self.service.catalogs.mark_stale(self.database)
        if self._uncertain is not None and self._tx_clean_fills is None:
            self._tx_clean_fills = len(self._tx_fills)  # effects unknown: as if it wrote (see _transaction_ended)
        if scope.empty:
            return None, changes_state
        self._before_write(scope)
        return scope, changes_state

    def _names_pg_temp(self) -> bool:
        """pg_temp is named in the session's settings (a search_path set at startup or by SET)."""
        startup = " ".join(f"{k}={v}" for k, v in self.session.startup_parameters.items()).lower().encode()
        return b"pg_temp" in startup or any(b"pg_temp" in sql.lower() for sql in self._set_history)

    def _note_private_names(self, info: QueryInfo, sql: bytes) -> None:
        """DDL may give this session's private (temporary) objects names that other sessions with the same settings
        read as shared ones: a temporary table renamed (its new name is temporary too), anything created while
        pg_temp is named in the search_path (`CREATE TABLE t` then creates a temporary table, and current_schema()
        becomes pg_temp_N), or an object put in pg_temp explicitly that is not a temporary table tracked by name."""
        names = {name for _, name in info.writes}
        if self._temp_tables & names:
            self._temp_tables |= names
        if self._names_pg_temp() or (b"pg_temp" in sql.lower() and not info.temp_tables_created):
            self._uncertain = self._uncertain or "DDL while pg_temp is in the search_path, or in pg_temp"

    def _on_transaction_control(self, tx: TxInfo) -> None:
        if tx.op is TxOp.BEGIN:
            fresh = self._fresh_transaction(tx)
            self._begin_fresh = fresh is True
            self._probe_wanted = fresh is None
            self._begin_sent = True
        elif tx.op is TxOp.COMMIT:
            self._commit_sent = True

    def _probe_isolation(self, out: list[bytes]) -> None:
        """Ask the server the isolation level of the transaction a BEGIN just opened, pipelined behind it: no round
        trip of its own, and the client's next request waits only for this reply (a quiet request) before the cache
        may answer it. Until the answer says READ COMMITTED, the transaction does not read the cache."""
        self._probe_wanted = False
        probe = self._probe = _IsolationProbe()
        out.append(_ISOLATION_PROBE)
        self._queue(Pending(Op.QUERY, strip=True, quiet=True, capture=Capture(1024, probe), on_done=probe))

    def _on_session_change(self, op: str, *, idle: bool) -> bool:
        """True when the change is to be recorded once the statement succeeds (SET, RESET, DISCARD ALL...)."""
        if op in ("set_local", "set_transaction"):
            # Lasts until the transaction ends, and the cache's results were not read with it: bypass until then.
            self._tx_reads_cache = self._begin_fresh = self._probe_wanted = False
            self._probe = None
            return False
        if not idle or self.session.tx_status != b"I":
            # Inside a transaction block a SET may yet be rolled back (and DISCARD ALL fails there): the proxy
            # cannot tell which state holds, so this session stops using the cache.
            self._uncertain = self._uncertain or "SET, RESET or DISCARD inside a transaction block or a pipeline"
            return False
        return True

    def _apply_session_change(self, sql: bytes) -> None:
        """A SET/RESET/DISCARD completed without error: it becomes part of the state that keys results."""
        if _DISCARD_ALL.match(sql):
            self._set_history.clear()
            self._temp_tables.clear()
            self._statements.clear()
        else:
            self._set_history.append(sql)
        self._digest = None

    def _before_write(self, scope: WriteScope) -> None:
        """Invalidate before the write is sent: fills already in flight for these tables will not be stored."""
        if self._tx_clean_fills is None:
            self._tx_clean_fills = len(self._tx_fills)
        self.service.invalidate(self.database, scope, counted=False, removed=self._stale)

    def _after_write(self, scope: WriteScope) -> None:
        self.service.invalidate(self.database, scope, removed=self._stale)
        self.service.after_write(self.database, scope)
        # Again when the transaction ends (explicit, or the implicit one of an extended batch up to its Sync):
        # invalidating after a rollback is merely safe.
        self._tx_writes.append(scope)

    # -- extended protocol ----------------------------------------------------------------------------------

    def _on_batch_end(self, out: list[bytes]) -> bool:
        if self._settled() and self._wait_for_catalog():
            return False  # the first batch of a session: its results are cacheable once the catalog is read
        # A batch ending in Flush that binds a portal is answered here only outside a transaction block: the portal
        # lives until the Sync, and is kept here until then (bound upstream if a forwarded message needs it).
        if self._can_serve() and (
            self._batch[-1][0] == m.SYNC or self.session.tx_status == b"I" or all(t != m.BIND for t, _ in self._batch)
        ):
            local: bytes | None
            try:
                hot = self._answer_hot_batch()
                local = self._answer_locally() if hot is False else hot
            except ProtocolViolation:
                local = b""  # a malformed message: the server will say what is wrong with it
            except Exception:
                log.exception("session %d: cache lookup failed; relaying the batch upstream", self.session.id)
                local = b""
            if local is None:
                return False  # waiting for a catalog or another session's fill
            if local:
                self._write_client(local)
                if self._batch[-1][0] == m.SYNC:
                    self._local_portals = {}  # the implicit transaction ended, and its portals with it
                for name, statement in self._created_here:
                    # Create named statements upstream now, planned as they were described: after DDL the server
                    # then refuses them (0A000) as it would without the proxy, instead of planning them afresh at
                    # their first Bind and returning rows of a shape the client was never told.
                    self._replay(name, statement, out, quiet=True)
                    out.append(_SYNC)
                    self._queue(Pending(Op.SYNC, strip=True, quiet=True))
                self._created_here = []
                executes = sum(1 for msg_type, _ in self._batch if msg_type == m.EXECUTE)
                for _ in range(executes):
                    self.service.observe_hit(())
                self._batch.clear()
                self._batch_bytes = 0
                return True
        self._forward_batch(out)
        return True

    def _held_batch_answerable(self) -> bool:
        """The batch held so far (no Sync or Flush yet) could be answered here as it stands, and its replies would
        fit in the server's output buffer (8 kB), which it would not send before a Sync or Flush."""
        if not self._can_serve():
            return False
        try:
            local = self._answer_locally(dry_run=True)
        except Exception:  # a malformed message, or a lookup that failed: the server's to answer, now
            return False
        return local is not None and 0 < len(local) < _SERVER_OUTPUT_BUFFER

    def _answer_hot_batch(self) -> bytes | Literal[False] | None:
        """The common batch, answered without decoding it fully: [Parse ""], Bind, [Describe portal], Execute, Sync.

        This is what drivers send for every execution of a prepared or parameterized query; the general path
        (`_answer_locally`) gives the same answer for it, with more work. False: not this shape (ask the general
        path); b"": a miss; None: waiting for another session's fill of this key; else the replies.
        """
        batch = self._batch
        count = len(batch)
        if count < 3 or count > 5 or batch[-1][0] != m.SYNC or batch[-2][0] != m.EXECUTE:
            return False
        first = 0
        statement: Statement | None = None
        if batch[0][0] == m.PARSE:
            parse = batch[0][1]
            if parse[HEADER_SIZE] != 0:
                return False  # a named Parse: "already exists" and friends are the general path's
            end = parse.index(0, HEADER_SIZE + 1)
            params = parse[end + 1 :]
            n_types = int.from_bytes(params[:2], "big")
            types = tuple(int.from_bytes(params[2 + 4 * i : 6 + 4 * i], "big") for i in range(n_types))
            statement = Statement(parse[HEADER_SIZE + 1 : end], types, upstream=False)
            first = 1
        if batch[first][0] != m.BIND or count - first - 3 not in (0, 1):
            return False
        bind = batch[first][1]
        portal_end = bind.index(0, HEADER_SIZE)
        name_end = bind.index(0, portal_end + 1)
        portal = bind[HEADER_SIZE:portal_end]
        execute = batch[-2][1]
        if execute[HEADER_SIZE:-5] != portal:
            return False
        if portal and self.session.tx_status != b"I":
            return b""  # a named portal outlives the Sync in a transaction block: it must exist upstream
        describe = batch[first + 1][1] if count - first == 4 else None
        if describe is not None and (batch[first + 1][0] != m.DESCRIBE or describe[HEADER_SIZE + 1 : -1] != portal
                                     or describe[HEADER_SIZE] != ord("P")):  # fmt: skip
            return False
        name = bind[portal_end + 1 : name_end].decode("utf-8", "surrogateescape")
        if statement is None:
            statement = self._statements.get(name)
            if statement is None or not statement.query:
                return False
        elif name:
            return False  # binds a named statement after an unnamed Parse: general path
        classified = self.service.classify(self.database, statement.query, self._strings())
        if not self._cacheable_here(classified):  # (the caller checked _can_serve already)
            return b""  # a write, or a read not served here: the general path would not answer it either
        max_rows = int.from_bytes(execute[-4:], "big", signed=True)
        key = keys.execute_key(
            self.database, self.user, self._state_digest(), statement.query, statement.param_types,
            bind[name_end + 1 :], max_rows,
        )  # fmt: skip
        entry = self.service.engine.get(key, self.service.clock(), count_miss=False, count_hit=False)
        if entry is None:
            in_flight = self.service.fill_in_flight(key)
            if in_flight is not None and not self._waited:
                self._wait_for(in_flight, _SINGLE_FLIGHT_WAIT)
                return None
            return b""
        value = entry.value
        if describe is None and not _same_shape(statement, value):
            return b""  # the client knows another row shape for this statement (DDL since): the server's to say
        header = _header_length(value)
        body: bytes | memoryview = value if describe is not None else memoryview(value)[header:]
        self.service.engine.count(key, entry)  # served: a hit (a miss is counted where the batch goes upstream)
        if first:
            self._statements[""] = statement
            return b"".join((_PARSE_BIND_COMPLETE, body, _READY[self.session.tx_status]))
        return b"".join((fe.BIND_COMPLETE, body, _READY[self.session.tx_status]))

    def _answer_locally(self, *, dry_run: bool = False) -> bytes | None:
        """The whole batch's replies from the cache; b"" when it cannot be, None to wait and retry. `dry_run`:
        only whether it could be, now (the batch, not ended yet, changes nothing and waits for nothing)."""
        served: list[Entry] = []
        parsed: dict[str, Statement] = {}
        portals: dict[str, _LocalPortal] = {
            name: (statement, bind, 0 if rows is None else rows, None)
            for name, (statement, bind, rows) in self._local_portals.items()
        }
        executed: set[str] = {name for name, (_, _, rows) in self._local_portals.items() if rows is not None}
        closed: list[str] = []
        closed_portals: set[str] = set()
        described_portals: set[str] = set()
        unproven: dict[str, Statement] = {}
        replies: list[bytes] = []
        statement: Statement | None
        for index, (msg_type, message) in enumerate(self._batch):
            body = message[HEADER_SIZE:]
            if msg_type == m.PARSE:
                parse = fe.decode_parse(body)
                if parse.statement and (parse.statement in self._statements or parse.statement in parsed):
                    return b""  # "already exists" is the server's to say
                self._check_statement_limit(parse.statement, len(parsed))
                query = parse.query.encode("utf-8", "surrogateescape")
                new = Statement(query, parse.param_types, upstream=False)
                if self._describe_entry(query, parse.param_types) is None:
                    # Only a stored result of this very statement (below) proves it parses for this session.
                    unproven[parse.statement] = new
                parsed[parse.statement] = new
                replies.append(fe.PARSE_COMPLETE)
            elif msg_type == m.BIND:
                bind = fe.decode_bind(body)
                if bind.portal and self.session.tx_status != b"I":
                    return b""  # a named portal outlives the Sync in a transaction block: it must exist upstream
                statement = parsed.get(bind.statement) or self._statements.get(bind.statement)
                if statement is None or not statement.query:
                    return b""
                rows = self._next_execute_rows(index, bind.portal)
                flushed = rows is None and self._batch[-1][0] == m.FLUSH
                if rows is None and not flushed:
                    return b""  # a Bind never executed: let the server validate it
                portals[bind.portal] = (statement, bind, rows or 0, None)
                if flushed and self._portal_result(portals, bind.portal) is None:
                    return b""  # only a stored result for these very arguments proves that the Bind succeeds
                executed.discard(bind.portal)  # a Bind (re)creates the portal
                closed_portals.discard(bind.portal)
                replies.append(fe.BIND_COMPLETE)
            elif msg_type == m.DESCRIBE:
                describe = fe.decode_describe(body)
                if describe.kind == "S":
                    statement = parsed.get(describe.name) or self._statements.get(describe.name)
                    if statement is None or not statement.query:
                        return b""
                    described = self._describe_entry(statement.query, statement.param_types)
                    if described is None:
                        return b""
                    replies.append(described)
                    if not dry_run:
                        _note_described(statement, described)
                else:
                    found = self._portal_result(portals, describe.name)
                    if found is None:
                        return self._miss_or_wait(portals, describe.name, may_wait=not dry_run)
                    value = found.value
                    replies.append(value[: _header_length(value)])
                    described_portals.add(describe.name)
            elif msg_type == m.EXECUTE:
                execute = fe.decode_execute(body)
                if execute.portal in executed or execute.portal in closed_portals:
                    return b""  # executing a portal again continues it: the server's to answer
                if execute.portal in portals and portals[execute.portal][2] != execute.max_rows:
                    return b""  # a portal bound in an earlier batch, looked up without a row limit
                found = self._portal_result(portals, execute.portal)
                if found is None:
                    return self._miss_or_wait(portals, execute.portal, may_wait=not dry_run)
                value = found.value
                if execute.portal not in described_portals and not _same_shape(portals[execute.portal][0], value):
                    return b""  # the client decodes these rows with a description the entry does not have
                replies.append(value[_header_length(value) :])
                served.append(found)
                executed.add(execute.portal)
                hit_statement = portals[execute.portal][0]
                unproven = {name: st for name, st in unproven.items() if st is not hit_statement}
            elif msg_type == m.CLOSE:
                if any(t not in (m.CLOSE, m.SYNC, m.FLUSH) for t, _ in self._batch[index + 1 :]):
                    return b""  # something after it uses what it closes: the server's to answer
                close = fe.decode_close(body)
                # Only what exists here alone is closed here: a statement or portal the server may hold (one it
                # created, or one made by SQL PREPARE or DECLARE that the proxy never saw) must be closed there.
                if close.kind == "S":
                    existing = self._statements.get(close.name)
                    if (existing is not None and existing.upstream) or (existing is None and close.name not in parsed):
                        return b""
                    closed.append(close.name)
                elif close.name not in portals or close.name in closed_portals:
                    return b""
                else:
                    closed_portals.add(close.name)
                replies.append(fe.CLOSE_COMPLETE)
            elif msg_type == m.SYNC:
                replies.append(m.ready_for_query(self.session.tx_status))
        if unproven:
            return b""
        if dry_run:
            return b"".join(replies)
        for entry in served:
            self.service.engine.count(entry.key, entry)  # hits: only now that the batch is answered here
        self._local_portals = {}
        if self._batch[-1][0] == m.FLUSH:  # (a Sync ends the implicit transaction, and its portals)
            for name, (statement, bind, rows, _) in portals.items():
                if name not in closed_portals:
                    self._local_portals[name] = (statement, bind, rows if name in executed else None)
        self._statements.update(parsed)
        self._created_here = [(n, st) for n, st in parsed.items() if n and not st.upstream and n not in closed]
        for name in closed:
            self._statements.pop(name, None)
        return b"".join(replies)

    def _next_execute_rows(self, index: int, portal: str) -> int | None:
        """max_rows of the first Execute of `portal` after batch position `index` (None if there is none)."""
        for msg_type, message in self._batch[index + 1 :]:
            if msg_type == m.EXECUTE:
                execute = fe.decode_execute(message[HEADER_SIZE:])
                if execute.portal == portal:
                    return execute.max_rows
            elif msg_type == m.BIND and fe.decode_bind(message[HEADER_SIZE:]).portal == portal:
                return None
        return None

    def _execute_key(self, statement: Statement, bind: fe.Bind, max_rows: int) -> keys.ExecuteKey:
        return keys.execute_key(
            self.database,
            self.user,
            self._state_digest(),
            statement.query,
            statement.param_types,
            bind.arguments,
            max_rows,
        )

    def _describe_key(self, query: bytes, param_types: tuple[int, ...]) -> keys.DescribeKey:
        return keys.describe_key(self.database, self.user, self._state_digest(), query, param_types)

    def _describe_entry(self, query: bytes, param_types: tuple[int, ...]) -> bytes | None:
        classified = self.service.classify(self.database, query, self._strings())
        if not self._servable(classified):
            return None
        key = self._describe_key(query, param_types)
        entry = self.service.engine.get(key, self.service.clock(), count_miss=False, count_hit=False)
        return entry.value if entry is not None else None

    def _portal_result(self, portals: dict[str, _LocalPortal], name: str) -> Entry | None:
        """The cached result for a portal bound in the batch (not counted: the batch may yet go upstream)."""
        found = portals.get(name)
        if found is None:
            return None
        statement, bind, rows, entry = found
        if entry is not None:
            return entry
        classified = self.service.classify(self.database, statement.query, self._strings())
        if not self._servable(classified):
            return None
        key = self._execute_key(statement, bind, rows)
        entry = self.service.engine.get(key, self.service.clock(), count_miss=False, count_hit=False)
        if entry is None:
            return None
        portals[name] = (statement, bind, rows, entry)
        return entry

    def _miss_or_wait(self, portals: dict[str, _LocalPortal], name: str, *, may_wait: bool) -> bytes | None:
        """A miss in a batch: wait once if another session is filling that very key, else forward the batch."""
        found = portals.get(name)
        if found is not None and may_wait and not self._waited:
            statement, bind, rows, _ = found
            in_flight = self.service.fill_in_flight(self._execute_key(statement, bind, rows))
            if in_flight is not None:
                self._wait_for(in_flight, _SINGLE_FLIGHT_WAIT)
                return None
        return b""

    def _forward_batch(self, out: list[bytes]) -> None:
        """Forward the held batch, replaying statements that exist only here and arranging captures."""
        described: dict[str, Capture | None] = {}
        serve = self._can_fill()
        idle = not self.tracker.pending and self.session.tx_status == b"I"  # before this batch queues anything
        self._replay_local_portals(out)
        for index, (msg_type, message) in enumerate(self._batch):
            body = message[HEADER_SIZE:]
            if msg_type == m.PARSE:
                parse = fe.decode_parse(body)
                self._check_statement_limit(parse.statement)
                existing = self._statements.get(parse.statement)
                if parse.statement and existing is not None and not existing.upstream:
                    self._replay(parse.statement, existing, out)  # so that the server says "already exists"
                statement = Statement(parse.query.encode("utf-8", "surrogateescape"), parse.param_types, upstream=True)
                self._statements[parse.statement] = statement
                # Taken back if the server refuses (or skips) the Parse: no statement by that name then exists.
                self._queue(Pending(Op.PARSE, on_done=_ParseDone(parse.statement, statement)))
                out.append(message)
            elif msg_type == m.BIND:
                bind = fe.decode_bind(body)
                bound = self._statements.get(bind.statement)
                if bound is not None:
                    if not bound.upstream:
                        self._replay(bind.statement, bound, out)
                    self._portals[bind.portal] = Portal(bound, bind)
                self._executed_portals.discard(bind.portal)
                self._expect(Op.BIND, message, out)
            elif msg_type == m.DESCRIBE:
                describe = fe.decode_describe(body)
                if describe.kind == "S":
                    self._forward_describe_statement(describe.name, message, out, serve)
                else:
                    rows = self._next_execute_rows(index, describe.name)
                    fresh = describe.name not in self._executed_portals and not self._unsynced_write
                    capture = (
                        self._execute_capture(describe.name, rows) if serve and fresh and rows is not None else None
                    )
                    described[describe.name] = capture
                    self._queue(Pending(Op.DESCRIBE_PORTAL, capture=capture))
                    out.append(message)
            elif msg_type == m.EXECUTE:
                self._forward_execute(fe.decode_execute(body), message, out, described, serve, idle)
            elif msg_type == m.CLOSE:
                close = fe.decode_close(body)
                (self._statements if close.kind == "S" else self._portals).pop(close.name, None)
                self._expect(Op.CLOSE, message, out)
            elif msg_type == m.SYNC:
                self._expect(Op.SYNC, message, out)
                if self._probe_wanted:
                    self._probe_isolation(out)
            else:  # Flush
                out.append(message)
            self._unsynced = msg_type != m.SYNC
            if msg_type == m.SYNC:
                self._unsynced_write = False
        for unused in described.values():  # a Describe whose Execute did not capture: free its single-flight slot
            if unused is not None:
                unused.fail()
                self._release_fill(unused)
        self._batch.clear()
        self._batch_bytes = 0

    def _replay_local_portals(self, out: list[bytes]) -> None:
        """Before anything is forwarded: create upstream the portals a batch answered here bound (and run, to the
        point the client was answered to), so that what the client sends next finds them as it left them. Their
        replies are not the client's."""
        for name, (statement, bind, rows) in self._local_portals.items():
            if self._statements.get(bind.statement) is not statement and bind.statement:
                continue  # its statement was closed since, and the portal with it
            if not statement.upstream or self._statements.get(bind.statement) is not statement:
                self._replay(bind.statement, statement, out)
            body = name.encode("utf-8", "surrogateescape") + b"\x00" + bind.statement.encode("utf-8", "surrogateescape")
            out.append(encode(b"B", body + b"\x00" + bind.arguments))
            self._queue(Pending(Op.BIND, strip=True))
            self._portals[name] = Portal(statement, bind)
            if rows is not None:
                out.append(encode(b"E", name.encode("utf-8", "surrogateescape") + b"\x00" + rows.to_bytes(4, "big")))
                self._queue(Pending(Op.EXECUTE, strip=True))
                self._executed_portals.add(name)
        self._local_portals = {}

    def _check_statement_limit(self, name: str, adding: int = 0) -> None:
        """limits.max_prepared_statements: the proxy keeps every named statement's text, so a client that prepares
        without ever closing would grow its memory without bound. Past the limit the session ends, clearly."""
        named = len(self._statements) - ("" in self._statements)  # the unnamed statement is not counted
        if name and name not in self._statements and named + adding >= self._max_statements:
            raise ProxyError(
                CONFIGURATION_LIMIT_EXCEEDED,
                f"too many prepared statements in this session (limits.max_prepared_statements = "
                f"{self._max_statements}); close or deallocate the ones no longer used",
            )

    def _expect(self, op: Op, message: bytes, out: list[bytes]) -> None:
        self._queue(Pending(op))
        out.append(message)

    def _queue(self, pending: Pending) -> None:
        """Track a request sent upstream; one the server will discard (after an error, before a Sync) completes
        at once, so that its invalidation and its single-flight slot are not left waiting for a reply."""
        if not self.tracker.expect(pending):
            self._complete(pending)

    def _replay(self, name: str, statement: Statement, out: list[bytes], *, quiet: bool = False) -> None:
        """Create upstream a statement whose Parse was answered locally; its ParseComplete is not the client's
        (nor, when `quiet`, an error: the statement then stays local, and its use will replay it again)."""
        out.append(fe.encode_parse(name, statement.query.decode("utf-8", "surrogateescape"), statement.param_types))
        statement.upstream = True
        self._queue(Pending(Op.PARSE, strip=True, quiet=quiet, on_done=_ParseDone(name, statement, replay=True)))

    def _forward_describe_statement(self, name: str, message: bytes, out: list[bytes], serve: bool) -> None:
        statement = self._statements.get(name)
        capture: Capture | None = None
        if statement is not None:
            if not statement.upstream:
                self._replay(name, statement, out)
            classified = self.service.classify(self.database, statement.query, self._strings())
            if serve and self._cacheable_here(classified) and statement.query:
                verdict = classified.verdict
                tables = self.service.shape_dependencies(self.database, classified)
                fill = Fill(
                    self._describe_key(statement.query, statement.param_types),
                    tables,
                    self.service.engine.generations(tables),
                    verdict.ttl,
                    statement.query.decode("utf-8", "replace"),
                    verdict.rule,
                    leader=False,
                    deferred=self.session.tx_status != b"I",
                )
                capture = Capture(self.service.max_entry_size, fill)
        if statement is not None and capture is None:
            capture = Capture(self.service.max_entry_size)  # only to learn the statement's row description
        on_done = _Described(statement) if statement is not None else None
        self._queue(Pending(Op.DESCRIBE_STATEMENT, capture=capture, on_done=on_done))
        out.append(message)

    def _execute_capture(self, portal_name: str, max_rows: int) -> Capture | None:
        portal = self._portals.get(portal_name)
        if portal is None or not portal.statement.query:
            return None
        classified = self.service.classify(self.database, portal.statement.query, self._strings())
        if classified.info.kind is not Kind.READ or not self._cacheable_here(classified):
            return None
        if _TIME_WORDS.search(portal.bind.arguments):
            return None  # a parameter such as 'now' is evaluated when the statement runs: never cache it
        key = self._execute_key(portal.statement, portal.bind, max_rows)
        self.service.engine.count(key, None)  # a cacheable read sent upstream: the miss
        in_flight = self.service.fill_in_flight(key)
        leader = in_flight is None
        if leader:
            self.service.begin_fill(key)
            self._leading.add(key)
        verdict = classified.verdict
        tables = self.service.dependencies(
            self.database, classified, portal.bind.arguments, _key_types(portal.statement)
        )
        fill = Fill(
            key,
            tables,
            self.service.engine.generations(tables),
            verdict.ttl,
            portal.statement.query.decode("utf-8", "replace"),
            verdict.rule,
            leader,
            deferred=self.session.tx_status != b"I",
        )
        return Capture(self.service.max_entry_size, fill)

    def _forward_execute(
        self,
        execute: fe.Execute,
        message: bytes,
        out: list[bytes],
        described: dict[str, Capture | None],
        serve: bool,
        idle: bool,
    ) -> None:
        portal = self._portals.get(execute.portal)
        capture: Capture | None = None
        on_done: WriteScope | None = None
        changes_state = False
        kind = "other"
        if portal is not None and portal.statement.query:
            classified = self.service.classify(self.database, portal.statement.query, self._strings())
            # Not after a write earlier in this batch (its reads see it uncommitted), nor a further Execute of a portal
            # (it continues the result where the last one stopped).
            fill = serve and not self._unsynced_write and execute.portal not in self._executed_portals
            kind = _KIND_LABELS[classified.info.kind]
            if classified.info.kind is Kind.READ and fill and self._cacheable_here(classified):
                if execute.portal in described:
                    capture = described.pop(execute.portal)
                else:
                    capture = self._execute_capture(execute.portal, execute.max_rows)
                    if capture is not None:
                        # The result must carry its RowDescription: ask for it, and keep the answer from the client.
                        out.append(fe.encode_describe("P", execute.portal))
                        self._queue(Pending(Op.DESCRIBE_PORTAL, strip=True, capture=capture))
            elif classified.info.kind is not Kind.READ or not classified.verdict.cacheable:
                on_done, changes_state = self._note_effects(
                    classified, portal.statement.query, idle=idle, bind=portal.bind,
                    param_types=_key_types(portal.statement),
                )  # fmt: skip
                self._unsynced_write = True
        else:
            # A portal the proxy does not know, or a statement prepared with SQL PREPARE (its text unknown here):
            # it may write anything.
            on_done = WriteScope(
                frozenset(), True, "Execute of a statement the proxy cannot see", code="unknown_effects"
            )
            self._before_write(on_done)
            self._unsynced_write = True
        self._executed_portals.add(execute.portal)
        query = portal.statement.query if portal is not None else b"<unknown portal>"
        request = _Request(on_done, kind, "miss" if capture else "bypass", self.service.clock(), query)
        request.changes_state = changes_state
        copy_from = _COPY_FROM_STDIN.match(query) is not None
        self._queue(Pending(Op.EXECUTE, capture=capture, on_done=request, copy_from=copy_from))
        out.append(message)

    # -- upstream -> client ----------------------------------------------------------------------------------

    def on_upstream_data(self, data: bytes) -> None:
        region, frames = self._up_framer.feed(data)
        tracker = self.tracker
        pieces: list[bytes] | None = None
        last = 0
        for msg_type, start, end in frames:
            outcome = tracker.on_message(msg_type, region, start, end)
            if not outcome.relay:
                if pieces is None:
                    pieces = []
                pieces.append(region[last:start])
                last = end
            # Invalidate and store as each request completes, all before the client sees any of these bytes:
            # its next query must find the cache current.
            for pending in outcome.done:
                self._complete(pending)
            if msg_type == m.READY_FOR_QUERY:
                status = region[start + HEADER_SIZE : start + HEADER_SIZE + 1]
                previous = self.session.tx_status
                self.session.tx_status = status
                if status == b"T":
                    if previous != b"T" or self._begin_sent:  # (a BEGIN after a COMMIT in one Query, too)
                        self._tx_reads_cache = self._begin_fresh
                else:
                    self._tx_reads_cache = False
                self._begin_fresh = self._begin_sent = False
                if status == b"I":
                    # Committed: autocommit without error, or a COMMIT of a block that had not failed.
                    # (A COMMIT of a failed block, 'E', is a rollback.)
                    committed = previous == b"I" or (previous == b"T" and self._commit_sent)
                    self._transaction_ended(committed and not self._failed_since_ready)
                    self._commit_sent = False
                elif previous == b"T" and self._commit_sent and not self._failed_since_ready:
                    # COMMIT AND CHAIN: committed, and a new transaction (with the same characteristics) began.
                    self._transaction_ended(True, chained=True)
                    self._commit_sent = False
                if status != b"I" and self._state_changes:
                    # A SET that ran inside what turned out to be a transaction block: it may yet be rolled back.
                    self._uncertain = self._uncertain or "SET inside a transaction block"
                self._state_changes.clear()
                self._failed_since_ready = False
            elif msg_type == m.PARAMETER_STATUS:
                self.session.note_parameter(region[start + HEADER_SIZE : end])
                self._digest = None
            elif msg_type == m.ERROR_RESPONSE and outcome.relay:  # (a failed refresh of ours is not the client's)
                self.session.note_error(region[start + HEADER_SIZE : end])
                self._failed_since_ready = True
        if not tracker.pending and self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None
        if pieces is None:
            self._write_client(region)
        else:
            pieces.append(region[last:])
            self._write_client(b"".join(pieces))

    def _transaction_ended(self, committed: bool, *, chained: bool = False) -> None:
        """ReadyForQuery 'I' (or 'T' after COMMIT AND CHAIN, `chained`): whatever this session wrote is committed
        (or rolled back) now. Invalidate it again, so that no entry filled by another session while the write was
        uncommitted survives, and tell the other proxies; store what was read inside the transaction if it
        committed; portals are gone."""
        service = self.service
        if not self._failed_since_ready and not chained:
            # First, so that write-through refreshes below are keyed by the state they run in (a SET in the same
            # batch as the write is in effect on the connection already).
            for sql in self._state_changes:
                self._apply_session_change(sql)
        for scope in self._tx_writes:
            service.invalidate(self.database, scope, counted=False, removed=self._stale)
            service.after_write(self.database, scope)  # the committed schema, as other sessions now see it
        if self._tx_writes:
            service.publish(self.database, self._tx_writes)
        self._tx_writes.clear()
        if self._tx_fills:
            # Rolled back (ORMs and pools end read-only transactions so): what it read before writing anything is
            # what autocommit reads would have read, in a transaction that may read the cache (READ COMMITTED).
            # What it read after a write may show that uncommitted write: never stored then.
            clean = len(self._tx_fills) if committed or self._tx_clean_fills is None else self._tx_clean_fills
            for fill, value in self._tx_fills[:clean]:
                self._store(fill, value)
            self._tx_fills.clear()
        self._tx_clean_fills = None
        if self._stale:
            if committed and not chained and not self.tracker.pending:
                self._refresh(self._stale)
            self._stale.clear()
        self._portals.clear()
        self._executed_portals.clear()

    def _refresh(self, stale: list[Entry]) -> None:
        """Write-through: run again the results of `strategy: write_through` tables that this session's committed
        writes removed, hottest first, within `write_through.concurrency` and the budget, so that the next read
        hits. They go on this session's own connection, idle now (ReadyForQuery 'I', nothing pending), so each runs
        with exactly the role and settings its key was taken under: only entries keyed by this very state are
        refreshed (others are left to refill on their next miss). The replies are the proxy's own, errors included;
        the client's next request simply queues behind them."""
        service = self.service
        if self._uncertain is not None or self.tracker.skipping or self.database in service.blind:
            return
        digest = self._state_digest()
        mine: dict[Hashable, Entry] = {}
        for entry in stale:
            key = entry.key
            if isinstance(key, tuple) and key[0] in ("q", "x") and key[1:4] == (self.database, self.user, digest):
                mine[key] = entry
        out: list[bytes] = []
        budget = service.config.write_through.concurrency
        for entry in sorted(mine.values(), key=lambda e: e.hits, reverse=True):
            classified = service.classify(self.database, entry.key[4], self._strings())  # type: ignore[index]
            if classified.verdict.strategy != "write_through" or not self._cacheable_here(classified):
                continue
            if budget == 0 or not service.take_refresh():
                service.metrics.refreshed("skipped")
                continue
            budget -= 1
            self._send_refresh(entry, classified.verdict.ttl, out)
        if out:
            self._write_upstream(b"".join(out))
            # The refreshes used the unnamed statement and portal: the client's must be created again before use.
            unnamed = self._statements.get("")
            if unnamed is not None:
                unnamed.upstream = False
            self._portals.pop("", None)

    def _send_refresh(self, entry: Entry, ttl: float, out: list[bytes]) -> None:
        key = entry.key
        assert isinstance(key, tuple)
        service = self.service
        leader = service.fill_in_flight(key) is None
        if leader:  # readers that miss it meanwhile wait for this refresh rather than all asking upstream
            service.begin_fill(key)
            self._leading.add(key)
        fill = Fill(key, entry.tables, service.engine.generations(entry.tables), ttl, entry.query,
                    entry.rule or "", leader)  # fmt: skip
        capture = Capture(service.max_entry_size, fill)
        if key[0] == "q":
            out.append(encode(b"Q", key[4] + b"\x00"))
            self._queue(Pending(Op.QUERY, strip=True, quiet=True, capture=capture, on_done=_Refresh()))
            return
        _, _, _, _, sql, param_types, arguments, max_rows = key
        out.append(fe.encode_parse("", sql.decode("utf-8", "surrogateescape"), param_types))
        out.append(encode(b"B", b"\x00\x00" + arguments))  # the unnamed portal, of the unnamed statement
        out.append(fe.encode_describe("P", ""))
        out.append(encode(b"E", b"\x00" + max_rows.to_bytes(4, "big", signed=True)))
        out.append(_SYNC)
        for op in (Op.PARSE, Op.BIND):
            self._queue(Pending(op, strip=True, quiet=True))
        self._queue(Pending(Op.DESCRIBE_PORTAL, strip=True, quiet=True, capture=capture))
        self._queue(Pending(Op.EXECUTE, strip=True, quiet=True, capture=capture, on_done=_Refresh()))
        self._queue(Pending(Op.SYNC, strip=True, quiet=True))

    def _complete(self, pending: Pending) -> None:
        request = pending.on_done
        if isinstance(request, _IsolationProbe):
            if request is self._probe:
                self._probe = None
                # Completed before its own ReadyForQuery is read: the status is the BEGIN's.
                if self.session.tx_status == b"T" and _probed_level(pending) in _FRESH_ISOLATION:
                    self._tx_reads_cache = True
            return
        if isinstance(request, _ParseDone):
            if pending.seen_error:
                if request.replay:
                    request.statement.upstream = False
                elif self._statements.get(request.name) is request.statement:
                    del self._statements[request.name]
            return
        if isinstance(request, _Request):
            if request.scope is not None:
                self._after_write(request.scope)
            if request.changes_state and not pending.seen_error:
                # Applied at ReadyForQuery, if nothing failed before it: an error later in the same implicit
                # transaction (an extended batch up to its Sync) rolls the SET back.
                self._state_changes.append(request.sql)
            self.service.observe(request.kind, request.outcome, self.service.clock() - request.started, request.sql)
        capture = pending.capture
        if isinstance(request, _Described) and capture is not None:
            usable = not capture.failed and not pending.seen_error
            if usable:
                _note_described(request.statement, capture.header)
            else:
                request.statement.description = None
        if capture is None or pending.op is Op.DESCRIBE_PORTAL or not isinstance(capture.context, Fill):
            return
        fill = capture.context
        try:
            usable = not capture.failed and not pending.seen_error and bool(capture.header)
            if usable and fill.deferred:
                self._tx_fills.append((fill, capture.value()))
                return
            stored = usable and self._store(fill, capture.value())
            if isinstance(request, _Refresh):
                self.service.metrics.refreshed("stored" if stored else "failed")
        finally:
            self._release_fill(capture)

    def _store(self, fill: Fill, value: bytes) -> bool:
        """Store a captured result, unless one of its tables was invalidated since its request was sent (the
        generations taken then no longer match): by this session's transaction or by anyone else."""
        return self.service.engine.put(
            fill.key,
            value,
            tables=fill.tables,
            ttl=fill.ttl,
            now=self.service.clock(),
            query=fill.query,
            rule=fill.rule,
            generations=fill.generations,
        )

    def _release_fill(self, capture: Capture) -> None:
        """Give up the single-flight slot of a fill this session leads (waiters then look up, or go upstream)."""
        fill = capture.context
        if isinstance(fill, Fill) and fill.leader and fill.key in self._leading:
            self._leading.discard(fill.key)
            self.service.end_fill(fill.key)


def _probed_level(pending: Pending) -> str | None:
    """The one text value of the isolation probe's reply (RowDescription, DataRow, CommandComplete), or None."""
    capture = pending.capture
    if capture is None or capture.failed or pending.seen_error or len(capture.parts) != 2:
        return None
    row = capture.parts[0]
    if row[:1] != b"D" or int.from_bytes(row[5:7], "big") != 1:
        return None
    size = int.from_bytes(row[7:11], "big", signed=True)
    return row[11 : 11 + size].decode("ascii", "replace") if size >= 0 else None


def _row_level(classified: Classified) -> str:
    """For EXPLAIN: which reads of this statement's tables a write of one row leaves in place."""
    point = classified.point
    if classified.verdict.cacheable and point is not None:
        return f"a point read of {point.table} by {point.column}: only writes of that row drop it"
    if classified.point_tables:
        return f"every write to {', '.join(sorted(classified.point_tables))} drops it (not a point read)"
    return ""


def _same_shape(statement: Statement, value: bytes) -> bool:
    """Whether a cached result (its RowDescription first) has the columns the client was described for
    `statement`. A statement's description has no result formats yet (they come with Bind), so those are not
    compared: names, table and column numbers, types, sizes and modifiers are."""
    if statement.shaped is not None and value.startswith(statement.shaped):
        return True
    if statement.description is None:
        return False
    header = value[: _header_length(value)]
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


def _note_described(statement: Statement, described: bytes) -> None:
    """What a statement's Describe reply (ParameterDescription, then RowDescription or NoData) tells about it."""
    statement.description = _row_description(described)
    if described[:1] == b"t":
        count = int.from_bytes(described[5:7], "big")
        statement.inferred = tuple(int.from_bytes(described[7 + 4 * i : 11 + 4 * i], "big") for i in range(count))


def _key_types(statement: Statement) -> tuple[int, ...]:
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
    start = _header_length(described) if described[:1] == b"t" else 0
    return described[start:] if described[start : start + 1] == b"T" else None


def _header_length(value: bytes) -> int:
    """Length of the RowDescription that starts a stored result (its Int32 length + the type byte)."""
    return 1 + int.from_bytes(value[1:5], "big")


def _identifier(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower()
