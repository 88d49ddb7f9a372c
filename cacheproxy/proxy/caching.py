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
from collections.abc import Callable, Hashable
from random import random
from typing import Final

from cacheproxy.advice.workload import StatementStats
from cacheproxy.analysis.model import Kind
from cacheproxy.cache import keys
from cacheproxy.cache.entry import Entry, TableId
from cacheproxy.cache.keys import CacheKey
from cacheproxy.config import LimitsConfig
from cacheproxy.errors import ProtocolViolation, ProxyError
from cacheproxy.policy.classify import Classified, dependencies
from cacheproxy.policy.verdict import WriteScope
from cacheproxy.protocol import frontend as fe
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE, Framer
from cacheproxy.protocol.messages import IDLE
from cacheproxy.protocol.replies import Capture, Op, Pending
from cacheproxy.protocol.statements import Statement, StatementRegistry, key_types
from cacheproxy.proxy import local_answers
from cacheproxy.proxy.admin_console import is_admin_command
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.explain import explain_rows
from cacheproxy.proxy.inflight import ANSWER, NONE, InFlight
from cacheproxy.proxy.interfaces import RelayHost
from cacheproxy.proxy.local_answers import WAIT
from cacheproxy.proxy.requests import KIND_LABELS, Fill, Missed, Request

log: Final = logging.getLogger("cacheproxy.caching")

# A batch held for a Sync is forwarded anyway past this many messages, or limits.max_pipeline_bytes.
_MAX_BATCH_MESSAGES: Final = 512
# PostgreSQL's output buffer (PQ_SEND_BUFFER_SIZE): it sends replies before a Sync or Flush only once this fills.
_SERVER_OUTPUT_BUFFER: Final = 8192
# How long a miss waits for another session's fill of the same key before asking upstream itself.
_SINGLE_FLIGHT_WAIT: Final = 2.0
# How long a session waits for its database's catalog before deciding without the cache.
_CATALOG_WAIT: Final = 2.0
_REFRESH_WAIT: Final = 5.0  # a request behind write-through refreshes waits this long for them, then goes upstream
_RELEASE_WAIT: Final = 10.0  # a DROP DATABASE waits this long for the proxy's own connections to it to close
_ADMIN_WAIT: Final = 60.0  # a CACHEPROXY command pipelined behind slow queries waits for their replies this long
_SYNC: Final = b"S\x00\x00\x00\x04"
# Messages after which the cache may answer (a hit): checked against a client that does not read its answers.
_CYCLE_ENDS: Final = frozenset((m.QUERY, m.SYNC, m.FLUSH))
# Messages held in a batch until its Sync; a batch of this many messages read whole takes `_whole_batch`.
_BATCH_TYPES: Final = frozenset((m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE))
_MIN_WHOLE_BATCH, _MAX_WHOLE_BATCH = 2, 8


class CachingRelay(local_answers.Lookups):
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
        self.tx.epoch = str(service.settings_epoch)
        self.tx.parameter_reported()  # (those of the startup phase: the digest and string rules are taken anew)
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
        # Lookups.count: a hit or miss is counted once its outcome is known (and, with verification on, sampled).
        self._verify = service.verifier
        self._count: Callable[[Hashable, Entry | None], None] = (
            self._verify.counting(self._tier.count, self.tx) if self._verify.rate else self._tier.count
        )
        # The shared tier behind the in-process one (cache/shared_tier.py): asked on an in-process miss (`strict`:
        # before serving an in-process hit too), at most once per key per client message (`_asked`).
        self._shared = service.shared
        self._strict = self._shared is not None and self._shared.strict
        self._asked: dict[Hashable, asyncio.Task[Entry | None] | None] = {}
        if self._shared is not None:
            shared = self._shared.config
            self._shared_wait = 2 * shared.timeout + shared.lock_wait
            self._write_client = self.inflight.write_client  # behind bytes held for generation bumps
        self._client_framer = Framer(limits.max_message_size)
        self._max_batch_bytes = limits.max_pipeline_bytes
        self._inbox: deque[tuple[int, bytes]] = deque()
        self._batch: list[tuple[int, bytes]] = []
        self._batch_bytes = 0
        self._waiting = False
        self._waited = False  # the message at the inbox head already waited once: do not wait again
        # The statements `result` found in the batch being answered (their advisor hits, if it is answered here):
        # the first in a slot, any others in a list (no call on the hot path: one Execute).
        self._found: StatementStats | None = None
        self._found_more: list[StatementStats | None] = []
        # The last lookup of `result` that missed, in the batch being answered: forwarded without computing it again.
        self._missed: Missed | None = None
        self.terminated = False
        self._released = False  # the message at the inbox head (a DROP DATABASE) already waited for a release
        service.attach(self.database)
        service.watch(self.database)

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.tracker.pending) or bool(self._batch) or bool(self._inbox)

    def close(self) -> None:
        """The session ended (see InFlight.close)."""
        self.inflight.close()

    def take_held(self) -> bytes:
        """The client's bytes not forwarded yet: a held batch, the inbox, a message not complete. Taken: a successor
        relay on a new upstream is fed them (cacheproxy/proxy/reattach.py)."""
        held = [message for _, message in (*self._batch, *self._inbox)]
        held.append(self._client_framer.take_partial())
        self._batch, self._batch_bytes = [], 0
        self._inbox.clear()
        return b"".join(held)

    # -- client -> upstream ----------------------------------------------------------------------------------

    def on_client_data(self, data: bytes) -> None:
        region, frames = self._client_framer.feed(data)
        if (
            _MIN_WHOLE_BATCH <= len(frames) <= _MAX_WHOLE_BATCH
            and frames[-1][0] == m.SYNC
            and not self._inbox
            and not self._batch
            and not self._waiting
            and not self.tracker.pending
            and len(region) <= self._max_batch_bytes
        ):
            self._whole_batch(region, frames)
            return
        if (
            len(frames) == 1
            and frames[0][0] == m.QUERY
            and not self._inbox
            and not self._batch
            and not self._waiting
            and not self.tracker.pending
            and not self.session.client_backlogged()
        ):
            # One simple Query with nothing before it: dispatched as `_drain_inbox` would, without the inbox.
            out: list[bytes] = []
            message = region[frames[0][1] : frames[0][2]]
            if self._on_query(message, out):
                self._waited = self._released = False
            else:
                self._inbox.append((m.QUERY, message))  # waiting: dispatched again afterwards, from the inbox head
            if out:
                self._write_upstream(b"".join(out))
            return
        for msg_type, start, end in frames:
            self._inbox.append((msg_type, region[start:end]))
        self._drain_inbox()

    def _whole_batch(self, region: bytes, frames: list[tuple[int, int, int]]) -> None:
        """The common case, one whole extended batch read at once with nothing before it: dispatched as
        `_drain_inbox` would (each message held, then the Sync ends the batch), without the inbox round trip."""
        batch = self._batch
        for msg_type, start, end in frames:
            if msg_type not in _BATCH_TYPES and (msg_type != m.SYNC or end != len(region)):
                batch.clear()  # another kind of message: the general path
                for other_type, other_start, other_end in frames:
                    self._inbox.append((other_type, region[other_start:other_end]))
                self._drain_inbox()
                return
            batch.append((msg_type, region[start:end]))
        self._batch_bytes = len(region)
        if self.session.client_backlogged():
            batch.pop()  # held with the Sync at the inbox head, until the client reads (the Session resumes us)
            self._inbox.append((m.SYNC, region[frames[-1][1] :]))
            return
        out: list[bytes] = []
        if self._on_batch_end(out):
            self._waited = self._released = False
        else:
            batch.pop()  # waiting: the Sync is dispatched again afterwards, from the inbox head
            self._inbox.append((m.SYNC, region[frames[-1][1] :]))
        if out:
            self._write_upstream(b"".join(out))

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
            self._waited = self._released = False
            if self._asked:
                self._asked.clear()
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
        self.registry.local_portals = {}  # ... and ends the implicit transaction its portals lived in
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
            entry = self._tier.get(key, started, count_miss=False, count_hit=not self._strict)
            if entry is not None and (not self._strict or self._verified(key, entry)):
                self._write_client(entry.value + self.tx.status.ready)
                self.service.observe_hit(classified.verdict.tables, classified.stats)
                if self._verify.rate and random() < self._verify.rate:  # shadow verification (verify/verifier.py)
                    self._verify.offer(entry, self.tx)
                return True
            if self._shared is not None and self._ask_shared(key, dependencies(self.database, classified), entry):
                return False  # dispatched again once the shared tier answered (a hit is then in process)
            fill = self._begin_fill(key, classified, sql)
            if fill is None:
                return False  # (a miss is counted once, when the query goes upstream)
            self._tier.count(key, None)
            capture = Capture(self.service.max_entry_size, fill)
            self.service.observe_miss(classified.verdict.tables)
        else:
            if info.drops_database is not None and self._release(info.drops_database):
                return False
            if self._statement_only_here(classified, out):
                return True
            scope, changes_state = self.inflight.before_send(classified, sql, idle=not self.tracker.pending)
        request = Request(scope, KIND_LABELS[info.kind], "miss" if capture else "bypass", started, sql,
                          stats=classified.stats)  # fmt: skip
        if changes_state:
            request.changes_state = True
            request.discards_all = info.session is not None and info.session.op == "discard_all"
        self._queue(Pending(Op.QUERY, capture=capture, on_done=request))
        self.tx.sent_query()  # a Query ends any implicit transaction
        out.append(message)
        if self.tx.probe_wanted:
            self.inflight.probe_isolation(out)
        return True

    def _release(self, database: str) -> bool:
        """DROP DATABASE: the proxy's own connections to that database would make it fail ("being accessed by other
        users"). True when the session now waits (once, bounded) for them to close."""
        if self._released:
            return False
        release = self.service.release(database, "DROP DATABASE through the proxy")
        if release is None:
            return False
        self._released = True
        self._wait_for(release, _RELEASE_WAIT)
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
            self.inflight.replay(name, existing, out)
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
        classified = self.service.classify(self.database, sql, self.tx.strings)
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
        return self.service.classify(self.database, sql, self.tx.strings)

    def _wait_for_catalog(self) -> bool:
        """True when the session now waits for its database's catalog (a first query, or one after DDL) or for its
        invalidation feed to start listening."""
        service = self.service
        # (service.catalog_ready, read directly: this runs for every batch)
        if self._waited or (self.database in service.catalogs.fresh and self.database not in service.blind):
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
        return self.inflight.fill(key, classified, dependencies(self.database, classified), sql, leader)

    def _verified(self, key: Hashable, entry: Entry) -> bool:
        """strict: an in-process hit is served only once the shared generations confirmed it (counted then)."""
        assert self._shared is not None
        if not self._shared.verified(entry, self._asked.get(key)):
            return False
        self.count(key, entry)
        return True

    def _ask_shared(self, key: Hashable, tables: frozenset[TableId], entry: Entry | None) -> bool:
        """After an in-process miss (strict: or an unconfirmed hit, `entry`): ask the shared tier, once per key per
        message. True when the session now waits for its answer."""
        assert self._shared is not None
        if key in self._asked:
            return False
        task = self._asked[key] = self._shared.lookup(self.database, key, tables, local=entry is not None)
        if task is None:
            return False  # the tier is away: the in-process tier alone
        self._wait_for(task, self._shared_wait, counts=False)
        return True

    def _wait_for(
        self,
        awaitable: asyncio.Future[object] | asyncio.Task[object] | asyncio.Future[None] | asyncio.Task[Entry | None],
        timeout: float,
        *,
        counts: bool = True,
    ) -> None:
        """Pause this session's client side until `awaitable` is done (or `timeout`), then go on where it was.
        `counts`: this is the message's one wait for a catalog or another session's fill (a shared-tier lookup is
        not: the message may still wait for those)."""
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
            self._waited = self._waited or counts
            self.session.resume_client()
            self.session.run_guarded(self._drain_inbox)

        self.session.spawn(wait())

    # -- extended protocol ----------------------------------------------------------------------------------

    def _on_batch_end(self, out: list[bytes]) -> bool:
        use = self._cache_use()
        if use != NONE and self._wait_for_catalog():
            return False  # the first batch of a session: its results are cacheable once the catalog is read
        # A batch ending in Flush that binds a portal is answered here only outside a transaction block: the portal
        # lives until the Sync, and is kept here until then (bound upstream if a forwarded message needs it).
        batch = self._batch
        idle = self.tx.status is IDLE
        self._forget_found()
        if use == ANSWER and (batch[-1][0] == m.SYNC or idle or all(t != m.BIND for t, _ in batch)):
            self._forget_missed()
            try:
                hot = local_answers.answer_hot(batch, self._statements, self.tx.status.ready, idle, self)
                if hot is None and self._missed is not None:
                    # The hot shape, looked up and missed (answer_hot said so): forwarded with what it computed.
                    missed, self._missed = self._missed, None
                    if self.inflight.forward_hot_miss(batch, missed, out, use):  # (nothing changed `use` since)
                        batch.clear()
                        self._batch_bytes = 0
                        return True
                if hot is False:
                    answer = local_answers.answer_batch(batch, self.registry, self.tx.status.ready, idle, self)
                    hot = self._apply_answer(answer, out) if isinstance(answer, local_answers.Answer) else answer
                elif hot:
                    self.registry.local_portals = {}  # (a Sync ends the implicit transaction, and its portals)
            except ProtocolViolation:
                hot = None  # a malformed message: the server will say what is wrong with it
            except ProxyError:
                raise  # the client's error (a session limit): not a failure of the lookup to relay around
            except Exception:
                log.exception("session %d: cache lookup failed; relaying the batch upstream", self.session.id)
                hot = None
            self._missed = None
            if hot is WAIT:
                return False  # waiting for a catalog or another session's fill
            if hot:
                self._write_client(hot)
                for msg_type, _ in batch:  # (a loop, not a generator: this runs for every hit)
                    if msg_type == m.EXECUTE:
                        self.service.observe_hit(())
                found = self._found  # the advisor's per-statement hits
                if found is not None:
                    found.hits += 1
                if self._found_more:
                    for stats in self._found_more:
                        if stats is not None:
                            stats.hits += 1
                batch.clear()
                self._batch_bytes = 0
                return True
        self._forward_batch(out)
        return True

    def _forget_found(self) -> None:
        """Resets the advisor's hits of a batch before its lookups (which set them). A method, not assignments in the
        caller: mypy would keep `self._found` narrowed to None there after the lookups, and compiled code checks
        that narrowed type (TypeError when a lookup did set it)."""
        self._found = None
        if self._found_more:
            self._found_more.clear()

    def _forget_missed(self) -> None:
        """Resets the hot lookup's miss before it runs (which may set it): a method for the reason `_forget_found`
        gives (an assignment here made compiled code reject the Missed that answer_hot then stored)."""
        self._missed = None

    def _held_batch_answerable(self) -> bool:
        """The batch held so far (no Sync or Flush yet) could be answered here as it stands, and its replies would
        fit in the server's output buffer (8 kB), which it would not send before a Sync or Flush."""
        if self._cache_use() != ANSWER:
            return False
        self._forget_found()
        try:
            answer = local_answers.answer_batch(
                self._batch, self.registry, self.tx.status.ready, self.tx.status is IDLE, self, dry_run=True
            )
        except Exception:  # a malformed message, or a lookup that failed: the server's to answer, now
            return False
        finally:
            self._missed = None
        return isinstance(answer, local_answers.Answer) and 0 < len(answer.replies) < _SERVER_OUTPUT_BUFFER

    def _forward_batch(self, out: list[bytes]) -> None:
        self.inflight.forward_batch(self._batch, out)
        self._batch.clear()
        self._batch_bytes = 0

    def _apply_answer(self, answer: local_answers.Answer, out: list[bytes]) -> bytes:
        """A batch answered whole by answer_batch: its effects on the session's statements and portals."""
        self._statements.update(answer.parsed)
        for name in answer.closed:
            self._statements.pop(name, None)
        self.registry.local_portals = answer.local_portals
        for name, statement in answer.created:
            # Create named statements upstream now, planned as they were described: after DDL the server then
            # refuses them (0A000) as it would without the proxy, instead of planning them afresh at their first
            # Bind and returning rows of a shape the client was never told.
            self.inflight.replay(name, statement, out, quiet=True)
            out.append(_SYNC)
            self._queue(Pending(Op.SYNC, strip=True, quiet=True))
        return answer.replies

    # Lookups for local_answers (called only when `_cache_use()` is ANSWER).

    def count(self, key: Hashable, entry: Entry | None) -> None:
        self._count(key, entry)

    def result(self, statement: Statement, arguments: bytes, max_rows: int) -> Entry | None:
        """The cached result of an Execute, or None (not counted: see Lookups.count)."""
        classified = self.service.classify(self.database, statement.query, self.tx.strings)
        if not self.tx.may_read(classified):
            self._missed = Missed(statement, arguments, max_rows, None, classified)
            return None  # a write, or a read not served here
        key = keys.execute_key(self.database, self.user, self.tx.digest or self.tx.state_digest(), statement.query,
                               statement.param_types, arguments, max_rows)  # fmt: skip
        entry = self._tier.get(key, self.service.clock(), count_miss=False, count_hit=False)
        if entry is None:
            self._missed = Missed(statement, arguments, max_rows, key, classified)
            return None
        if self._strict:
            assert self._shared is not None
            if not self._shared.verified(entry, self._asked.get(key)):
                return None  # not confirmed yet: `fill_in_flight` asks the shared tier
        if entry is not None:  # a hit for the advisor, if the batch is answered here
            if self._found is None:
                self._found = classified.stats
            else:
                self._found_more.append(classified.stats)
        return entry

    def fill_in_flight(self, statement: Statement, arguments: bytes, max_rows: int) -> bool:
        """After a miss: ask the shared tier (if any); wait (once) when another session is filling that very key."""
        missed = self._missed
        if (
            missed is not None
            and missed.statement is statement
            and missed.arguments is arguments
            and missed.max_rows == max_rows
        ):
            if missed.key is None:
                return False  # not a read this session may read from the cache: not filled here either
            key = missed.key  # (the lookup that just missed)
        else:
            key = keys.execute_key(self.database, self.user, self.tx.state_digest(), statement.query,
                                   statement.param_types, arguments, max_rows)  # fmt: skip
        if self._shared is not None:
            classified = self.service.classify(self.database, statement.query, self.tx.strings)
            tables = dependencies(self.database, classified, arguments, key_types(statement), fe.bind_parameter)
            entry = self._tier.get(key, self.service.clock(), count_miss=False, count_hit=False)
            if self._ask_shared(key, tables, entry):
                return True
        if self._waited:
            return False
        in_flight = self.service.fill_in_flight(key)
        if in_flight is None:
            return False
        self._wait_for(in_flight, _SINGLE_FLIGHT_WAIT)
        return True

    def description(self, statement: Statement) -> bytes | None:
        classified = self.service.classify(self.database, statement.query, self.tx.strings)
        if not self.tx.may_read(classified):
            return None
        key = keys.describe_key(
            self.database, self.user, self.tx.state_digest(), statement.query, statement.param_types
        )
        entry = self._tier.get(key, self.service.clock(), count_miss=False, count_hit=False)
        return entry.value if entry is not None else None
