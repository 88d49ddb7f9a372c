"""Stale-if-error: a client session with no upstream connection, answered from the cache alone.

When it exists: `auth.mode: terminate` (the proxy can authenticate the client without the database) and the
upstream connect failed (refused, timed out). In relay mode the client cannot be authenticated while the upstream
is down, so it gets FATAL 08006 as before. A session whose upstream is lost mid-session ends as before (its re-attach
is the failover code's; it can hand the client to an OfflineRelay while it waits).

What is answered: a read (simple Query, or an extended batch up to Sync) whose result is cached under a rule with
`stale_if_error`, live or expired less than that long ago, with a NoticeResponse (WARNING, SQLSTATE 01000) saying
it was served while the upstream cannot be reached; `cacheproxy_stale_served_total` counts them. Everything else
(writes, transactions, misses, results of rules without stale_if_error) fails at once with ERROR 08006 and the
session goes on (ReadyForQuery 'I'): nothing waits for the upstream. Nothing stale is served in normal operation:
only this relay calls `get_stale`.

The session starts as a normal one would, with the ParameterStatus values the last successful login of the same
user, database and startup parameters received (remembered by `LoginMemory`): the client sees what PostgreSQL sent
then, and the session's cache keys (which include those values) are the ones its results were stored under.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable

from cacheproxy.analysis.model import Kind
from cacheproxy.cache import keys
from cacheproxy.cache.entry import Entry
from cacheproxy.errors import CONNECTION_FAILURE, ProtocolViolation
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE, encode
from cacheproxy.protocol.messages import IDLE
from cacheproxy.protocol.startup import StartupMessage
from cacheproxy.protocol.statements import Statement, StatementRegistry
from cacheproxy.proxy import local_answers
from cacheproxy.proxy.admin_console import is_admin_command
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.streams import read_message
from cacheproxy.proxy.transaction import TransactionTracker

log = logging.getLogger("cacheproxy.offline")

_OFFLINE_MESSAGE = "the upstream server cannot be reached"
_UNANSWERABLE_DETAIL = (
    "While the database is unreachable, cacheproxy answers only reads whose results it holds under a rule with "
    "stale_if_error; writes, transactions and other reads fail."
)


def _startup_key(startup: StartupMessage) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(startup.parameters.items()))


class LoginMemory:
    """The ParameterStatus values of the last successful login per (startup parameters): what an offline session
    of the same client replays. Bounded: the oldest is forgotten past `limit` distinct startups."""

    def __init__(self, limit: int = 1000) -> None:
        self._limit = limit
        self._seen: dict[tuple[tuple[str, str], ...], list[tuple[str, str]]] = {}

    def remember(self, startup: StartupMessage, parameters: dict[str, str]) -> None:
        key = _startup_key(startup)
        self._seen.pop(key, None)
        self._seen[key] = list(parameters.items())
        if len(self._seen) > self._limit:
            del self._seen[next(iter(self._seen))]

    def recall(self, startup: StartupMessage) -> list[tuple[str, str]] | None:
        return self._seen.get(_startup_key(startup))


class OfflineRelay(local_answers.Lookups):
    """Answers one client from the cache only (see the module docstring). `run()` returns why it ended."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        service: CacheService,
        tx: TransactionTracker,
        *,
        database: str,
        user: str,
        max_message_size: int,
        admin_command: Callable[[bytes], bytes],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.service = service
        self.tx = tx
        self.database = database
        self.user = user
        self._max_message_size = max_message_size
        self._admin_command = admin_command
        self.registry = StatementRegistry(10000)
        self._batch: list[tuple[int, bytes]] = []
        self._skipping = False  # an error was sent for the batch: discard up to its Sync, as PostgreSQL does
        self._stale_used: list[Entry] = []
        tx.epoch = str(service.settings_epoch)
        tx.parameter_reported()

    async def run(self) -> str:
        self.service.attach(self.database)  # (keeps the database's entries from an idle release meanwhile)
        try:
            while True:
                msg_type, message = await self._read()
                if msg_type == m.TERMINATE:
                    return "client sent Terminate"
                self._writer.write(self._dispatch(msg_type, message))
                await self._writer.drain()
        finally:
            self.service.detach(self.database)

    async def _read(self) -> tuple[int, bytes]:
        msg_type, body = await read_message(self._reader, self._max_message_size)
        return msg_type, encode(bytes((msg_type,)), body)

    def _dispatch(self, msg_type: int, message: bytes) -> bytes:
        if msg_type == m.QUERY:
            return self._on_query(message[HEADER_SIZE:-1])
        if msg_type in (m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE):
            if not self._skipping:
                self._batch.append((msg_type, message))
            return b""
        if msg_type in (m.SYNC, m.FLUSH):
            return self._on_batch_end(msg_type, message)
        if msg_type == m.FUNCTION_CALL:
            return self._refuse("a function call") + self.tx.status.ready
        return b""  # CopyData/CopyDone/CopyFail outside a COPY: PostgreSQL ignores them too

    # -- simple query ----------------------------------------------------------------------------------------

    def _on_query(self, sql: bytes) -> bytes:
        ready = self.tx.status.ready
        if is_admin_command(sql):
            return self._admin_command(sql) + ready
        classified = self.service.classify(self.database, sql, self.tx.strings)
        info = classified.info
        if info.kind is not Kind.READ or info.statement_count != 1:
            return self._refuse("a write, a transaction or a statement that is not a single read") + ready
        key = keys.query_key(self.database, self.user, self.tx.digest or self.tx.state_digest(), sql)
        entry = self._lookup(key) if self.tx.may_read(classified) else None
        if entry is None:
            return self._refuse("a read whose result is not cached") + ready
        return self._served(entry) + entry.value + ready

    # -- extended protocol -----------------------------------------------------------------------------------

    def _on_batch_end(self, msg_type: int, message: bytes) -> bytes:
        if self._skipping:
            if msg_type == m.SYNC:
                self._skipping = False
                return self.tx.status.ready
            return b""
        self._batch.append((msg_type, message))
        batch, self._batch = self._batch, []
        self._stale_used = []
        try:
            answer = local_answers.answer_batch(batch, self.registry, self.tx.status.ready, True, self)
        except ProtocolViolation:
            answer = None
        if isinstance(answer, local_answers.Answer):
            self.registry.statements.update(answer.parsed)
            for name in answer.closed:
                self.registry.statements.pop(name, None)
            self.registry.local_portals = answer.local_portals
            notices = b"".join(self._served(entry) for entry in self._stale_used)
            return notices + answer.replies
        error = self._refuse("a request that the cache cannot answer whole")
        if msg_type == m.SYNC:
            return error + self.tx.status.ready
        self._skipping = True
        return error

    # Lookups for local_answers: only entries of rules with stale_if_error, live or within their window.

    def count(self, key: Hashable, entry: Entry | None) -> None:
        self.service.tier.count(key, entry)

    def result(self, statement: Statement, arguments: bytes, max_rows: int) -> Entry | None:
        classified = self.service.classify(self.database, statement.query, self.tx.strings)
        if not self.tx.may_read(classified):
            return None
        key = keys.execute_key(self.database, self.user, self.tx.digest or self.tx.state_digest(), statement.query,
                               statement.param_types, arguments, max_rows)  # fmt: skip
        entry = self._lookup(key)
        if entry is not None:
            self._stale_used.append(entry)
        return entry

    def fill_in_flight(self, statement: Statement, arguments: bytes, max_rows: int) -> bool:
        return False  # nothing is filled while the upstream is away

    def description(self, statement: Statement) -> bytes | None:
        classified = self.service.classify(self.database, statement.query, self.tx.strings)
        if not self.tx.may_read(classified):
            return None
        key = keys.describe_key(
            self.database, self.user, self.tx.state_digest(), statement.query, statement.param_types
        )
        entry = self.service.tier.get_stale(key, self.service.clock())
        return entry.value if entry is not None else None

    # -- answers ---------------------------------------------------------------------------------------------

    def _lookup(self, key: Hashable) -> Entry | None:
        entry = self.service.tier.get_stale(key, self.service.clock())
        if entry is None or entry.stale_for <= 0:
            return None  # no stale_if_error on its rule: nothing is served without the upstream
        return entry

    def _served(self, entry: Entry) -> bytes:
        """The NOTICE that goes with a result served without the upstream; counted."""
        self.service.metrics.stale_served()
        age = self.service.clock() - entry.expires_at
        when = f"it expired {age:.1f}s ago" if age > 0 else "its time to live had not run out"
        log.info("session for %s@%s: served a cached result while the upstream is unreachable (%s)",
                 self.user, self.database, when)  # fmt: skip
        return m.notice_response(
            "WARNING",
            "01000",
            f"{_OFFLINE_MESSAGE}: this result was served from cacheproxy's cache ({when}; stale_if_error allows "
            f"{entry.stale_for:g}s past expiry)",
        )

    def _refuse(self, what: str) -> bytes:
        return m.error_response(
            "ERROR", CONNECTION_FAILURE, f"{_OFFLINE_MESSAGE}: cannot answer {what}", detail=_UNANSWERABLE_DETAIL
        )


def offline_startup(parameters: list[tuple[str, str]], process_id: int, secret_key: int) -> bytes:
    """What follows AuthenticationOk for an offline session: the remembered ParameterStatus values, a notice that
    the upstream is unreachable, our BackendKeyData and ReadyForQuery (idle)."""
    out = [encode(b"S", name.encode() + b"\x00" + value.encode() + b"\x00") for name, value in parameters]
    out.append(m.backend_key_data(process_id, secret_key))
    out.append(
        m.notice_response(
            "WARNING",
            "01000",
            f"{_OFFLINE_MESSAGE}: this session is answered from cacheproxy's cache only (stale_if_error)",
        )
    )
    out.append(IDLE.ready)
    return b"".join(out)
