"""CachingRelay: the relay of one session when the cache is on: frames both directions, answers what it can from the
cache, forwards the rest with captures, and applies what completes (stores, invalidations, transaction ends).

Who owns what (each in its module): the transaction and settings state, and whether the session may use the cache
at all, is the TransactionTracker's (transaction.py, sans-IO); the client's statements and portals the
StatementRegistry's (protocol/statements.py); which reply answers which request the ReplyTracker's
(protocol/replies.py); local answers to an extended batch are computed by local_answers.py from this relay's
lookups; write-through refreshes are planned by write_through.py; classification is the service's (policy/).

Client side: simple queries are handled one by one; extended-protocol messages are held until Sync (or Flush) so
that a batch is either answered locally as a whole, or forwarded as a whole. Local answers are only given when
nothing is pending upstream, so replies never overtake each other (`_cache_use`, the one decision). Results read
inside a transaction block are stored only once it commits.

Upstream side: every reply goes through the ReplyTracker. Replies to the proxy's own requests (a Parse replayed for
a statement it answered locally, a Describe that gives a captured result its RowDescription) are stripped; captured
results are stored when their request completes without error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from cacheproxy.analysis.lexer import names_time_word
from cacheproxy.analysis.model import Kind
from cacheproxy.cache import keys
from cacheproxy.cache.entry import TableId
from cacheproxy.cache.keys import CacheKey
from cacheproxy.config import LimitsConfig
from cacheproxy.errors import ProtocolViolation
from cacheproxy.policy.classify import Classified, dependencies
from cacheproxy.policy.verdict import WriteScope
from cacheproxy.protocol import frontend as fe
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE, Framer
from cacheproxy.protocol.messages import IDLE
from cacheproxy.protocol.replies import Capture, Op, Pending
from cacheproxy.protocol.statements import Portal, Statement, StatementRegistry, key_types
from cacheproxy.proxy import local_answers
from cacheproxy.proxy.admin_console import is_admin_command
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.explain import explain_rows
from cacheproxy.proxy.inflight import ANSWER, NONE, STORE, InFlight
from cacheproxy.proxy.interfaces import RelayHost
from cacheproxy.proxy.local_answers import WAIT, Wait
from cacheproxy.proxy.requests import KIND_LABELS, Described, Fill, ParseDone, Request

log = logging.getLogger("cacheproxy.caching")

# A batch held for a Sync is forwarded anyway past this many messages, or limits.max_pipeline_bytes.
_MAX_BATCH_MESSAGES = 512
# How long a miss waits for another session's fill of the same key before asking upstream itself.
_SINGLE_FLIGHT_WAIT = 2.0
# How long a session waits for its database's catalog before deciding without the cache.
_CATALOG_WAIT = 2.0
_REFRESH_WAIT = 5.0  # a request behind write-through refreshes waits this long for them, then goes upstream
_ADMIN_WAIT = 60.0  # a CACHEPROXY command pipelined behind slow queries waits for their replies this long
_SYNC = b"S\x00\x00\x00\x04"
# Messages after which the cache may answer (a hit): checked against a client that does not read its answers.
_CYCLE_ENDS = frozenset((m.QUERY, m.SYNC, m.FLUSH))


class CachingRelay:
    """The caching relay of one session (its transports are already taken over by Links)."""

    def __init__(
        self,
        session: RelayHost,
        service: CacheService,
        limits: LimitsConfig,
        write_upstream: Callable[[bytes], None],
        write_client: Callable[[bytes], None],
    ) -> None:
        self.session = session
        self.service = service
        self._tier = service.tier  # the cache tier this relay looks up and stores through (cache/tier.py)
        self._write_upstream = write_upstream
        self._write_client = write_client
        self.database = session.database
        self.user = session.user
        self.tx = session.transaction
        self.tx.epoch, self.tx.digest = str(service.settings_epoch), None
        self.registry = StatementRegistry(limits.max_prepared_statements)
        self._statements = self.registry.statements  # (the same dict: read on the hot path)
        # The upstream side; its parts used on every request are bound here (the same objects: no extra call).
        self.inflight = InFlight(session, service, self.registry, write_upstream, write_client)
        self.tracker = self.inflight.tracker
        self._leading = self.inflight.leading
        self._stale = self.inflight.stale
        self._cache_use = self.inflight.cache_use
        self._queue = self.inflight.queue
        self.on_upstream_data = self.inflight.on_upstream_data
        self._client_framer = Framer(limits.max_message_size)
        self._max_batch_bytes = limits.max_pipeline_bytes
        self._inbox: deque[tuple[int, bytes]] = deque()
        self._batch: list[tuple[int, bytes]] = []
        self._batch_bytes = 0
        self._waiting = False
        self._waited = False  # the message at the inbox head already waited once: do not wait again
        self.terminated = False
        service.watch(self.database)

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.tracker.pending) or bool(self._batch) or bool(self._inbox)

    def close(self) -> None:
        """The session ended (see InFlight.close)."""
        self.inflight.close()

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
        if out:
            self._write_upstream(b"".join(out))

    def _dispatch(self, msg_type: int, message: bytes, out: list[bytes]) -> bool:
        """Handle one client message; False when it must wait (it will be dispatched again)."""
        if self.tracker.pending and not self._waited and self.tracker.quiet_only():
            # Only write-through refreshes are pending: wait for them, and this request will likely hit.
            drained = self.inflight.drained = asyncio.get_running_loop().create_future()
            self._wait_for(drained, _REFRESH_WAIT)
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
                    self.inflight.complete(ignored)
        elif msg_type == m.FUNCTION_CALL:
            # A fast-path call can run any function: assume it wrote anything.
            scope = WriteScope(frozenset(), True, "FunctionCall", code="function_call")
            self.inflight.before_write(scope)
            # It may as well have changed settings (set_config() through the fast path): unknowable from here.
            self.tx.stop_caching("a FunctionCall ran")
            request = Request(scope, "other", "bypass", self.service.clock(), b"<FunctionCall>")
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
        self._statements.pop("", None)  # a simple Query replaces the unnamed statement (and portal)
        classified = self._classify(sql)
        if classified is None:
            return False
        info = classified.info
        capture: Capture | None = None
        scope: WriteScope | None = None
        changes_state = False
        started = self.service.clock()
        if (
            info.kind is Kind.READ
            and info.statement_count == 1
            and self._cache_use() == ANSWER
            and self.tx.may_read(classified)
        ):
            key = keys.query_key(self.database, self.user, self.tx.digest or self.tx.state_digest(), sql)
            entry = self._tier.get(key, started)
            if entry is not None:
                self._write_client(entry.value + self.tx.status.ready)
                self.service.observe_hit(classified.verdict.tables)
                return True
            fill = self._begin_fill(key, classified, sql)
            if fill is None:
                return False
            capture = Capture(self.service.max_entry_size, fill)
            self.service.observe_miss(classified.verdict.tables)
        else:
            if self._statement_only_here(classified, out):
                return True
            scope, changes_state = self.inflight.before_send(classified, sql, idle=not self.tracker.pending)
        request = Request(scope, KIND_LABELS[info.kind], "miss" if capture else "bypass", started, sql)
        if changes_state:
            request.changes_state = True
            request.discards_all = info.session is not None and info.session.op == "discard_all"
        self._queue(Pending(Op.QUERY, capture=capture, on_done=request))
        self.tx.sent_query()  # a Query ends any implicit transaction
        out.append(message)
        return True

    def _statement_only_here(self, classified: Classified, out: list[bytes]) -> bool:
        """SQL DEALLOCATE or EXECUTE naming a statement whose Parse was answered here (it does not exist upstream).
        True when the Query was answered here; else what the server needs first is added to `out`."""
        info = classified.info
        if info.statement_count == 1 and info.deallocates is not None:
            existing = self._statements.get(info.deallocates)
            if existing is None or existing.upstream or not existing.query:
                return False
            # Deallocating it is ours to answer (in order, outside a failed transaction block).
            if self.tracker.pending or self.tx.status is m.FAILED:
                return False
            del self._statements[info.deallocates]
            self._write_client(m.command_complete("DEALLOCATE") + self.tx.status.ready)
            return True
        for statement in info.statements or (info,):
            name = statement.executes
            existing = self._statements.get(name) if name is not None else None
            if name is None or existing is None or existing.upstream or not existing.query:
                continue
            # EXECUTE of it: create it upstream first, closed by its own Sync so that a failing Parse does not make
            # the server discard the Query behind it.
            self._replay(name, existing, out)
            out.append(_SYNC)
            self._queue(Pending(Op.SYNC, strip=True))
        return False

    def _on_admin_command(self, sql: bytes, message: bytes, out: list[bytes]) -> bool:
        """Answer a CACHEPROXY command in order: after every reply still due from upstream."""
        if self.tracker.pending:
            if not self._waited:
                drained = self.inflight.drained = asyncio.get_running_loop().create_future()
                self._wait_for(drained, _ADMIN_WAIT)
                return False
            # Still busy after the wait: an answer now would overtake replies. The server answers instead.
            self._queue(Pending(Op.QUERY))
            out.append(message)
            return True
        self._write_client(self.session.admin_command(sql) + self.tx.status.ready)
        return True

    def explain(self, sql: bytes) -> list[tuple[str, str]]:
        """Why `sql` would or would not be served from the cache in this session (CACHEPROXY EXPLAIN)."""
        classified = self.service.classify(self.database, sql)
        return explain_rows(
            classified,
            may_read=self.tx.may_read(classified),
            uncertain=self.tx.uncertain,
            blind=self.service.blind.get(self.database),
            database=self.database,
            catalog=self.service.last_catalog(self.database),
        )

    def _classify(self, sql: bytes) -> Classified | None:
        """Classify, first waiting (once, bounded) for the database's catalog when it is still loading."""
        if self._wait_for_catalog():
            return None
        return self.service.classify(self.database, sql)

    def _wait_for_catalog(self) -> bool:
        """True when the session now waits for its database's catalog (a first query, or one after DDL) or for its
        invalidation feed to start listening."""
        service = self.service
        if self._waited or (service.catalog_ready(self.database) and self.database not in service.blind):
            return False
        pending = service.watch(self.database)
        if pending is None:
            return False  # unreadable catalog, or a feed that was lost: decide without them (nothing is cached)
        self._wait_for(pending, _CATALOG_WAIT)
        return True

    def _begin_fill(self, key: CacheKey, classified: Classified, sql: bytes) -> Fill | None:
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
        return self._fill(key, classified, dependencies(self.database, classified), sql, leader)

    def _fill(
        self, key: CacheKey, classified: Classified, tables: frozenset[TableId], sql: bytes, leader: bool
    ) -> Fill:
        verdict = classified.verdict
        return Fill(key, tables, self._tier.generations(tables), verdict.ttl, sql.decode("utf-8", "replace"),
                    verdict.rule, leader, deferred=self.tx.status is not IDLE)  # fmt: skip

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

    # -- extended protocol ----------------------------------------------------------------------------------

    def _on_batch_end(self, out: list[bytes]) -> bool:
        use = self._cache_use()
        if use != NONE and self._wait_for_catalog():
            return False  # the first batch of a session: its results are cacheable once the catalog is read
        # A batch ending in Flush is answered here only if it binds no portal: the client may go on using a portal
        # after a Flush, and it must then exist upstream. (Parse + Describe + Flush, a driver preparing, is fine.)
        batch = self._batch
        if use == ANSWER and (batch[-1][0] == m.SYNC or all(t != m.BIND for t, _ in batch)):
            try:
                hot = local_answers.answer_hot(batch, self._statements, self.tx.status.ready, self)
                if hot is False:
                    answer = local_answers.answer_batch(batch, self.registry, self.tx.status.ready, self)
                    hot = self._apply_answer(answer, out) if isinstance(answer, local_answers.Answer) else answer
            except ProtocolViolation:
                hot = None  # a malformed message: the server will say what is wrong with it
            except Exception:
                log.exception("session %d: cache lookup failed; relaying the batch upstream", self.session.id)
                hot = None
            if hot is WAIT:
                return False  # waiting for a catalog or another session's fill
            if hot:
                self._write_client(hot)
                executes = sum(1 for msg_type, _ in batch if msg_type == m.EXECUTE)
                for _ in range(executes):
                    self.service.observe_hit(())
                batch.clear()
                self._batch_bytes = 0
                return True
        self._forward_batch(out)
        return True

    def _apply_answer(self, answer: local_answers.Answer, out: list[bytes]) -> bytes:
        """A batch answered whole by answer_batch: its effects on the session's statements."""
        self._statements.update(answer.parsed)
        for name in answer.closed:
            self._statements.pop(name, None)
        for name, statement in answer.created:
            # Create named statements upstream now, planned as they were described: after DDL the server then
            # refuses them (0A000) as it would without the proxy, instead of planning them afresh at their first
            # Bind and returning rows of a shape the client was never told.
            self._replay(name, statement, out, quiet=True)
            out.append(_SYNC)
            self._queue(Pending(Op.SYNC, strip=True, quiet=True))
        return answer.replies

    # Lookups for local_answers (called only when `_cache_use()` is ANSWER).

    def result(self, statement: Statement, arguments: bytes, max_rows: int) -> bytes | Wait | None:
        """The cached result of an Execute, or None; WAIT when another session fills that very key (once)."""
        classified = self.service.classify(self.database, statement.query)
        if not self.tx.may_read(classified):
            return None  # a write, or a read not served here
        key = keys.execute_key(self.database, self.user, self.tx.digest or self.tx.state_digest(), statement.query,
                               statement.param_types, arguments, max_rows)  # fmt: skip
        entry = self._tier.get(key, self.service.clock())
        if entry is not None:
            return entry.value
        in_flight = self.service.fill_in_flight(key)
        if in_flight is not None and not self._waited:
            self._wait_for(in_flight, _SINGLE_FLIGHT_WAIT)
            return WAIT
        return None

    def description(self, statement: Statement) -> bytes | None:
        classified = self.service.classify(self.database, statement.query)
        if not self.tx.may_read(classified):
            return None
        key = keys.describe_key(
            self.database, self.user, self.tx.state_digest(), statement.query, statement.param_types
        )
        entry = self._tier.get(key, self.service.clock(), count_miss=False)
        return entry.value if entry is not None else None

    def _forward_batch(self, out: list[bytes]) -> None:
        """Forward the held batch, replaying statements that exist only here and arranging captures."""
        described: dict[str, Capture | None] = {}
        serve = self._cache_use() >= STORE
        registry, tx = self.registry, self.tx
        idle = not self.tracker.pending and tx.status is IDLE  # before this batch queues anything
        for index, (msg_type, message) in enumerate(self._batch):
            body = message[HEADER_SIZE:]
            if msg_type == m.PARSE:
                parse = fe.decode_parse(body)
                registry.check_limit(parse.statement)
                existing = self._statements.get(parse.statement)
                if parse.statement and existing is not None and not existing.upstream:
                    self._replay(parse.statement, existing, out)  # so that the server says "already exists"
                statement = Statement(parse.query.encode("utf-8", "surrogateescape"), parse.param_types, upstream=True)
                self._statements[parse.statement] = statement
                # Taken back if the server refuses (or skips) the Parse: no statement by that name then exists.
                self._queue(Pending(Op.PARSE, on_done=ParseDone(parse.statement, statement)))
                out.append(message)
            elif msg_type == m.BIND:
                bind = fe.decode_bind(body)
                bound = self._statements.get(bind.statement)
                if bound is not None:
                    if not bound.upstream:
                        self._replay(bind.statement, bound, out)
                    registry.portals[bind.portal] = Portal(bound, bind)
                registry.executed.discard(bind.portal)
                self._expect(Op.BIND, message, out)
            elif msg_type == m.DESCRIBE:
                describe = fe.decode_describe(body)
                if describe.kind == "S":
                    self._forward_describe_statement(describe.name, message, out, serve)
                else:
                    rows = local_answers.next_execute_rows(self._batch, index, describe.name)
                    fresh = describe.name not in registry.executed and not tx.unsynced_write
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
                (self._statements if close.kind == "S" else registry.portals).pop(close.name, None)
                self._expect(Op.CLOSE, message, out)
            elif msg_type == m.SYNC:
                self._expect(Op.SYNC, message, out)
            else:  # Flush
                out.append(message)
            tx.sent_extended(sync=msg_type == m.SYNC)
        for unused in described.values():  # a Describe whose Execute did not capture: free its single-flight slot
            if unused is not None:
                unused.fail()
                self.inflight.release_fill(unused)
        self._batch.clear()
        self._batch_bytes = 0

    def _expect(self, op: Op, message: bytes, out: list[bytes]) -> None:
        self._queue(Pending(op))
        out.append(message)

    def _replay(self, name: str, statement: Statement, out: list[bytes], *, quiet: bool = False) -> None:
        """Create upstream a statement whose Parse was answered locally; its ParseComplete is not the client's
        (nor, when `quiet`, an error: the statement then stays local, and its use will replay it again)."""
        out.append(fe.encode_parse(name, statement.query.decode("utf-8", "surrogateescape"), statement.param_types))
        statement.upstream = True
        self._queue(Pending(Op.PARSE, strip=True, quiet=quiet, on_done=ParseDone(name, statement, replay=True)))

    def _forward_describe_statement(self, name: str, message: bytes, out: list[bytes], serve: bool) -> None:
        statement = self._statements.get(name)
        capture: Capture | None = None
        if statement is not None:
            if not statement.upstream:
                self._replay(name, statement, out)
            classified = self.service.classify(self.database, statement.query)
            if serve and self.tx.may_read(classified) and statement.query:
                # A description depends on the tables' shape, not on their rows: a write to one row leaves it.
                tables = frozenset((self.database, name) for name in classified.verdict.tables)
                key = keys.describe_key(self.database, self.user, self.tx.state_digest(), statement.query,
                                        statement.param_types)  # fmt: skip
                capture = Capture(self.service.max_entry_size, self._fill(key, classified, tables, statement.query,
                                                                          leader=False))  # fmt: skip
        if statement is not None and capture is None:
            capture = Capture(self.service.max_entry_size)  # only to learn the statement's row description
        on_done = Described(statement) if statement is not None else None
        self._queue(Pending(Op.DESCRIBE_STATEMENT, capture=capture, on_done=on_done))
        out.append(message)

    def _execute_capture(self, portal_name: str, max_rows: int) -> Capture | None:
        portal = self.registry.portals.get(portal_name)
        if portal is None or not portal.statement.query:
            return None
        statement = portal.statement
        classified = self.service.classify(self.database, statement.query)
        if classified.info.kind is not Kind.READ or not self.tx.may_read(classified):
            return None
        if names_time_word(portal.bind.arguments):
            return None  # a parameter such as 'now' is evaluated when the statement runs: never cache it
        key = keys.execute_key(self.database, self.user, self.tx.state_digest(), statement.query,
                               statement.param_types, portal.bind.arguments, max_rows)  # fmt: skip
        leader = self.service.fill_in_flight(key) is None
        if leader:
            self.service.begin_fill(key)
            self._leading.add(key)
        tables = dependencies(self.database, classified, portal.bind.arguments, key_types(statement),
                              fe.bind_parameter)  # fmt: skip
        return Capture(self.service.max_entry_size, self._fill(key, classified, tables, statement.query, leader))

    def _forward_execute(
        self,
        execute: fe.Execute,
        message: bytes,
        out: list[bytes],
        described: dict[str, Capture | None],
        serve: bool,
        idle: bool,
    ) -> None:
        portal = self.registry.portals.get(execute.portal)
        executed = self.registry.executed
        capture: Capture | None = None
        on_done: WriteScope | None = None
        changes_state = discards_all = copy_from = False
        kind = "other"
        if portal is not None and portal.statement.query:
            classified = self.service.classify(self.database, portal.statement.query)
            info = classified.info
            copy_from = info.copy_from_stdin
            # Not after a write earlier in this batch (its reads see it uncommitted), nor a further Execute of a portal
            # (it continues the result where the last one stopped).
            fill = serve and not self.tx.unsynced_write and execute.portal not in executed
            kind = KIND_LABELS[info.kind]
            if info.kind is Kind.READ and fill and self.tx.may_read(classified):
                if execute.portal in described:
                    capture = described.pop(execute.portal)
                else:
                    capture = self._execute_capture(execute.portal, execute.max_rows)
                    if capture is not None:
                        # The result must carry its RowDescription: ask for it, and keep the answer from the client.
                        out.append(fe.encode_describe("P", execute.portal))
                        self._queue(Pending(Op.DESCRIBE_PORTAL, strip=True, capture=capture))
            elif info.kind is not Kind.READ or not classified.verdict.cacheable:
                on_done, changes_state = self.inflight.before_send(
                    classified, portal.statement.query, idle=idle, bind=portal.bind,
                    param_types=key_types(portal.statement),
                )  # fmt: skip
                discards_all = info.session is not None and info.session.op == "discard_all"
                self.tx.sent_write()
        else:
            # A portal the proxy does not know, or a statement prepared with SQL PREPARE (its text unknown here):
            # it may write anything.
            on_done = WriteScope(
                frozenset(), True, "Execute of a statement the proxy cannot see", code="unknown_effects"
            )
            self.inflight.before_write(on_done)
            self.tx.sent_write()
        executed.add(execute.portal)
        query = portal.statement.query if portal is not None else b"<unknown portal>"
        request = Request(on_done, kind, "miss" if capture else "bypass", self.service.clock(), query)
        request.changes_state, request.discards_all = changes_state, discards_all
        self._queue(Pending(Op.EXECUTE, capture=capture, on_done=request, copy_from=copy_from))
        out.append(message)
