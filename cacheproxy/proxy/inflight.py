"""InFlight: the requests one session has in flight upstream, what each does to the session and the cache before it
is sent (`before_send`: the transaction tracker told, SQL PREPARE/DEALLOCATE noted, its writes invalidated) and when
it completes: the ReplyTracker (which reply answers which request), the single-flight slots the session leads, stores
of captured results, invalidations after writes, transaction ends (told by the TransactionTracker) and write-through
refreshes.

It also holds the one session-level decision of whether the cache may be used now (`cache_use`), since most of its
conditions are about what is in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Final

from cacheproxy.advice.workload import StatementStats
from cacheproxy.analysis.lexer import names_time_word
from cacheproxy.analysis.model import Kind
from cacheproxy.cache import keys
from cacheproxy.cache.entry import Entry, TableId
from cacheproxy.cache.generations import dependency_names
from cacheproxy.cache.keys import CacheKey
from cacheproxy.policy.classify import Classified, dependencies, row_scope, shape_dependencies
from cacheproxy.policy.verdict import WriteScope
from cacheproxy.protocol import frontend as fe
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE, Framer, encode
from cacheproxy.protocol.messages import IDLE, IN_BLOCK
from cacheproxy.protocol.replies import Capture, Op, Pending, ReplyTracker
from cacheproxy.protocol.statements import Portal, Statement, StatementRegistry, key_types, note_described
from cacheproxy.proxy import write_through
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.interfaces import RelayHost
from cacheproxy.proxy.local_answers import next_execute_rows
from cacheproxy.proxy.requests import KIND_LABELS, Described, Fill, IsolationProbe, Missed, ParseDone, Refresh, Request
from cacheproxy.proxy.transaction import TxEnd

# Asked after a BEGIN that names no isolation level, pipelined behind it (see probe_isolation); its reply is stripped.
_ISOLATION_PROBE: Final = encode(b"Q", b"SHOW transaction_isolation\x00")

# What `cache_use` decides, weakest first.
NONE: Final = 0  # the session may not use the cache now: forward, store nothing
BLIND: Final = 1  # it may, but its database's invalidation feed is down (or not up yet): forward, store nothing
STORE: Final = 2  # results read now may be stored, but nothing answered here: extended messages are in flight upstream
ANSWER: Final = 3  # answer from the cache, and store what is read


class InFlight:
    """The upstream side of one session's caching relay (see the module docstring)."""

    def __init__(
        self,
        session: RelayHost,
        service: CacheService,
        registry: StatementRegistry,
        write_upstream: Callable[[bytes], None],
        write_client: Callable[[bytes], None],
    ) -> None:
        self.session = session
        self.service = service
        self._tier = service.tier
        self.tx = session.transaction
        self.registry = registry
        self._statements = registry.statements
        self.database = session.database
        self.user = session.user
        self._write_upstream = write_upstream
        self._write_client = write_client
        self.tracker = ReplyTracker()
        self._up_framer = Framer(1 << 31)
        self.leading: set[CacheKey] = set()  # keys whose single-flight slot this session holds
        self.stale: list[Entry] = []  # entries this session's writes removed: refreshed once committed
        self.drained: asyncio.Future[None] | None = None  # set when nothing is pending any more (someone waits)
        # Shared tier (cache/shared_tier.py): generation bumps of committed writes not yet made, and the client's
        # bytes held until they are (a commit is acknowledged only once every sidecar would see it).
        self._bumps: list[asyncio.Task[object]] = []
        self._held: list[bytes] | None = None
        # Write-through refreshes waiting for a bump, which also reads the generations they are stamped with.
        self._refreshing: tuple[asyncio.Task[object], list[Entry]] | None = None

    def cache_use(self) -> int:
        """The one decision of whether this session may use the cache now (per statement, `tx.may_read` adds what
        the verdict and the transaction's rules say). Not while anything is pending upstream (its replies would be
        overtaken, and the server's state is not known), nor inside a transaction block but one that may read the
        cache, nor once the session's settings are unknown, nor after a write of an implicit transaction not yet
        synced (its reads see it uncommitted), nor while the database's invalidation feed is down; and answers only
        when no extended message went upstream since the last Sync."""
        tx = self.tx
        status = tx.status
        pending = self.tracker.pending
        if (
            # (nothing pending but reads sent since the last Sync may still store: pg8000 sends a Bind and then its
            # Execute, each with a Flush)
            (pending and not (tx.unsynced and self.tracker.within_batch()))
            or tx.uncertain is not None
            or not (status is IDLE or (status is IN_BLOCK and tx.reads_cache))
            or tx.unsynced_write
        ):
            return NONE
        if self.database in self.service.blind:
            return BLIND
        if pending or tx.unsynced or self.tracker.skipping:
            return STORE
        return ANSWER

    def close(self) -> None:
        """The session ended: release every single-flight slot it held, so that waiters go upstream themselves.
        Writes whose outcome it will never read (sent, or done in a transaction still open) may have committed:
        invalidate and publish them as if they had (merely safe if they did not)."""
        self.service.detach(self.database)
        for key in self.leading:
            self.service.end_fill(key)
        self.leading.clear()
        unknown = [p.on_done.scope for p in self.tracker.pending if isinstance(p.on_done, Request) and p.on_done.scope]
        unknown += self.tx.writes
        if unknown:
            for scope in unknown:
                self.service.invalidate(self.database, scope, counted=False)
            self._bump_then_publish(unknown)
            self.tx.writes.clear()

    # -- before a request goes upstream -----------------------------------------------------------------------

    def before_send(
        self, classified: Classified, sql: bytes, *, idle: bool, bind: fe.Bind | None = None,
        param_types: tuple[int, ...] = (),
    ) -> tuple[WriteScope | None, bool]:  # fmt: skip
        """Before a non-cached statement goes upstream: tell the transaction tracker, note SQL PREPARE/DEALLOCATE,
        and invalidate what it may write. `idle`: nothing else was pending and no transaction block was open when
        it was sent; `bind`: its Bind, for extended protocol (a point write's key may be a parameter).
        Returns the write scope, and whether the statement, once it succeeds, changes the session's state."""
        info = classified.info
        service = self.service
        catalog = service.last_catalog(self.database)
        changes_state = self.tx.on_statement(info, idle=idle, catalog=catalog)
        if info.kind is Kind.OTHER:
            self.session.listens.note(sql)  # LISTEN/UNLISTEN: replayed if the session re-attaches (reattach.py)
        for statement in info.statements or (info,):
            if statement.prepares is not None:
                self.registry.prepared_in_sql(statement.prepares)
            elif statement.deallocates_all or statement.deallocates is not None:
                self.registry.deallocated(statement.deallocates)
        scope = row_scope(classified, service.write_scope(info, catalog), bind.arguments if bind is not None else None,
                          param_types, fe.bind_parameter)  # fmt: skip
        if scope.code == "function_call":  # also a view, operator or cast running such a function (verdict.py)
            self.tx.stop_caching(f"{scope.why}: settings may have changed")
        if info.alters_role_settings:
            service.role_settings_changed(self.database)
        if scope.ddl:
            # Decide nothing with the old catalog from now on; it is read again once the DDL has completed.
            service.schema_changing(self.database)
        if self.tx.uncertain is not None:
            self.tx.about_to_write()  # effects unknown: as if it wrote (see TransactionTracker._end)
        if scope.empty:
            return None, changes_state
        self.before_write(scope)
        return scope, changes_state

    def before_write(self, scope: WriteScope) -> None:
        """Invalidate before the write is sent: fills already in flight for these tables will not be stored."""
        self.tx.about_to_write()
        self.service.invalidate(self.database, scope, counted=False, removed=self.stale)

    # -- sending: forwarding with captures ----------------------------------------------------------------------

    def forward_batch(self, batch: list[tuple[int, bytes]], out: list[bytes]) -> None:
        """Forward a batch the client sent, replaying statements and portals that exist only here and arranging
        captures; the caller clears it."""
        described: dict[str, Capture | None] = {}
        serve = self.cache_use() >= STORE
        registry, tx = self.registry, self.tx
        idle = not self.tracker.pending and tx.status is IDLE  # before this batch queues anything
        self._replay_local_portals(out)
        for index, (msg_type, message) in enumerate(batch):
            body = message[HEADER_SIZE:]
            if msg_type == m.PARSE:
                parse = fe.decode_parse(body)
                registry.check_limit(parse.statement)
                existing = self._statements.get(parse.statement)
                if parse.statement and existing is not None and not existing.upstream:
                    self.replay(parse.statement, existing, out)  # so that the server says "already exists"
                statement = Statement(parse.query.encode("utf-8", "surrogateescape"), parse.param_types, upstream=True)
                self._statements[parse.statement] = statement
                # Taken back if the server refuses (or skips) the Parse: no statement by that name then exists.
                self.queue(Pending(Op.PARSE, on_done=ParseDone(parse.statement, statement)))
                out.append(message)
            elif msg_type == m.BIND:
                bind = fe.decode_bind(body)
                bound = self._statements.get(bind.statement)
                if bound is not None:
                    if not bound.upstream:
                        self.replay(bind.statement, bound, out)
                    registry.portals[bind.portal] = Portal(bound, bind)
                registry.executed.discard(bind.portal)
                self.queue(Pending(Op.BIND))
                out.append(message)
            elif msg_type == m.DESCRIBE:
                describe = fe.decode_describe(body)
                if describe.kind == "S":
                    self._forward_describe_statement(describe.name, message, out, serve)
                else:
                    rows = next_execute_rows(batch, index, describe.name)
                    fresh = describe.name not in registry.executed and not tx.unsynced_write
                    capture = (
                        self._execute_capture(describe.name, rows) if serve and fresh and rows is not None else None
                    )
                    described[describe.name] = capture
                    self.queue(Pending(Op.DESCRIBE_PORTAL, capture=capture))
                    out.append(message)
            elif msg_type == m.EXECUTE:
                self._forward_execute(fe.decode_execute(body), message, out, described, serve, idle)
            elif msg_type == m.CLOSE:
                close = fe.decode_close(body)
                (self._statements if close.kind == "S" else registry.portals).pop(close.name, None)
                self.queue(Pending(Op.CLOSE))
                out.append(message)
            elif msg_type == m.SYNC:
                self.queue(Pending(Op.SYNC))
                out.append(message)
                if tx.probe_wanted:
                    self.probe_isolation(out)
                # (each message ends the implicit transaction or continues it: only a Sync changes what the
                # loop reads, `unsynced_write`; the last message decides `unsynced`, below)
                tx.sent_extended(sync=True)
            else:  # Flush
                out.append(message)
        if batch and batch[-1][0] != m.SYNC:
            tx.sent_extended(sync=False)
        for unused in described.values():  # a Describe whose Execute did not capture: free its single-flight slot
            if unused is not None:
                unused.fail()
                self.release_fill(unused)

    def forward_hot_miss(self, batch: list[tuple[int, bytes]], missed: Missed, out: list[bytes], use: int) -> bool:
        """Forward the hot batch that its lookup did not answer (`missed`): `[Parse of the unnamed statement,] Bind,
        Describe of the portal, Execute, Sync`, as local_answers.answer_hot found it, with the classification (and,
        for a read this session may read, the key) that the lookup computed. It does what `forward_batch` does for
        that batch, without decoding, classifying and keying it again; False (nothing done) for any other shape,
        which `forward_batch` handles. `use`: `cache_use()`, as the caller just found it."""
        registry, tx = self.registry, self.tx
        parsed = batch[0][0] == m.PARSE
        if len(batch) - parsed != 4 or registry.local_portals:
            return False
        statement = missed.statement
        if not parsed and not statement.upstream:
            return False  # exists only here: replayed first (forward_batch)
        # Decoded as forward_batch would (a malformed message ends the session there too, ProtocolViolation).
        if parsed:
            parse = fe.decode_parse(batch[0][1][HEADER_SIZE:])
            if parse.statement or parse.param_types != statement.param_types:
                return False
        bind = fe.decode_bind(batch[parsed][1][HEADER_SIZE:])
        describe = fe.decode_describe(batch[parsed + 1][1][HEADER_SIZE:])
        execute = fe.decode_execute(batch[parsed + 2][1][HEADER_SIZE:])
        portal = bind.portal
        if (
            describe.kind != "P"
            or describe.name != portal
            or execute.portal != portal
            or execute.max_rows != missed.max_rows
            or bind.arguments != missed.arguments
        ):
            return False
        serve = use >= STORE
        idle = not self.tracker.pending and tx.status is IDLE  # before this batch queues anything
        if parsed:
            # The unnamed statement this Parse replaces: the one answer_hot read from it (same text and types).
            statement.upstream = True
            self._statements[""] = statement
            self.queue(Pending(Op.PARSE, on_done=ParseDone("", statement)))
            out.append(batch[0][1])
        registry.portals[portal] = Portal(statement, bind)
        registry.executed.discard(portal)
        self.queue(Pending(Op.BIND))
        out.append(batch[parsed][1])
        capture = None
        if serve and not tx.unsynced_write and missed.key is not None:
            capture = self._read_capture(statement, bind.arguments, missed.classified, missed.key)
        self.queue(Pending(Op.DESCRIBE_PORTAL, capture=capture))
        out.append(batch[parsed + 1][1])
        self._forward_execute(execute, batch[parsed + 2][1], out, {portal: capture}, serve, idle, missed.classified)
        self.queue(Pending(Op.SYNC))
        out.append(batch[-1][1])
        if tx.probe_wanted:
            self.probe_isolation(out)
        tx.sent_extended(sync=True)
        return True

    def replay(self, name: str, statement: Statement, out: list[bytes], *, quiet: bool = False) -> None:
        """Create upstream a statement whose Parse was answered locally; its ParseComplete is not the client's
        (nor, when `quiet`, an error: the statement then stays local, and its use will replay it again)."""
        out.append(fe.encode_parse(name, statement.query.decode("utf-8", "surrogateescape"), statement.param_types))
        statement.upstream = True
        self.queue(Pending(Op.PARSE, strip=True, quiet=quiet, on_done=ParseDone(name, statement, replay=True)))

    def _forward_describe_statement(self, name: str, message: bytes, out: list[bytes], serve: bool) -> None:
        statement = self._statements.get(name)
        capture: Capture | None = None
        if statement is not None:
            if not statement.upstream:
                self.replay(name, statement, out)
            classified = self.service.classify(self.database, statement.query, self.tx.strings)
            if serve and self.tx.may_read(classified) and statement.query:
                tables = shape_dependencies(self.database, classified)
                key = keys.describe_key(self.database, self.user, self.tx.state_digest(), statement.query,
                                        statement.param_types)  # fmt: skip
                capture = Capture(self.service.max_entry_size, self.fill(key, classified, tables, statement.query,
                                                                          leader=False))  # fmt: skip
        if statement is not None and capture is None:
            capture = Capture(self.service.max_entry_size)  # only to learn the statement's row description
        on_done = Described(statement) if statement is not None else None
        self.queue(Pending(Op.DESCRIBE_STATEMENT, capture=capture, on_done=on_done))
        out.append(message)

    def _execute_capture(self, portal_name: str, max_rows: int) -> Capture | None:
        portal = self.registry.portals.get(portal_name)
        if portal is None or not portal.statement.query:
            return None
        statement = portal.statement
        classified = self.service.classify(self.database, statement.query, self.tx.strings)
        if classified.info.kind is not Kind.READ or not self.tx.may_read(classified):
            return None
        key = keys.execute_key(self.database, self.user, self.tx.state_digest(), statement.query,
                               statement.param_types, portal.bind.arguments, max_rows)  # fmt: skip
        return self._read_capture(statement, portal.bind.arguments, classified, key)

    def _read_capture(
        self, statement: Statement, arguments: bytes, classified: Classified, key: CacheKey
    ) -> Capture | None:
        """The capture of a cacheable read (`classified`, that this session may read) about to go upstream under
        `key`: counted as a miss, its single-flight slot taken if free."""
        if names_time_word(arguments):
            return None  # a parameter such as 'now' is evaluated when the statement runs: never cache it
        self._tier.count(key, None)  # a cacheable read sent upstream: the miss
        leader = self.service.fill_in_flight(key) is None
        if leader:
            self.service.begin_fill(key)
            self.leading.add(key)
        tables = dependencies(self.database, classified, arguments, key_types(statement), fe.bind_parameter)
        return Capture(self.service.max_entry_size, self.fill(key, classified, tables, statement.query, leader))

    def _forward_execute(
        self,
        execute: fe.Execute,
        message: bytes,
        out: list[bytes],
        described: dict[str, Capture | None],
        serve: bool,
        idle: bool,
        classified: Classified | None = None,
    ) -> None:
        """`classified`: the portal's statement's classification, when the caller has it."""
        portal = self.registry.portals.get(execute.portal)
        executed = self.registry.executed
        capture: Capture | None = None
        on_done: WriteScope | None = None
        changes_state = discards_all = copy_from = False
        kind = "other"
        stats: StatementStats | None = None
        if portal is not None and portal.statement.query:
            if classified is None:
                classified = self.service.classify(self.database, portal.statement.query, self.tx.strings)
            info = classified.info
            stats = classified.stats
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
                        self.queue(Pending(Op.DESCRIBE_PORTAL, strip=True, capture=capture))
            elif info.kind is not Kind.READ or not classified.verdict.cacheable:
                on_done, changes_state = self.before_send(
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
            self.before_write(on_done)
            self.tx.sent_write()
        executed.add(execute.portal)
        query = portal.statement.query if portal is not None else b"<unknown portal>"
        request = Request(on_done, kind, "miss" if capture else "bypass", self.service.clock(), query, stats=stats)
        request.changes_state, request.discards_all = changes_state, discards_all
        self.queue(Pending(Op.EXECUTE, capture=capture, on_done=request, copy_from=copy_from))
        out.append(message)

    def fill(self, key: CacheKey, classified: Classified, tables: frozenset[TableId], sql: bytes, leader: bool) -> Fill:
        verdict = classified.verdict
        fill = Fill(key, tables, self._tier.generations(tables), verdict.ttl, sql.decode("utf-8", "replace"),
                    verdict.rule, leader, deferred=self.tx.status is not IDLE,
                    stale_for=verdict.stale_if_error)  # fmt: skip
        if self.service.shared is not None:  # taken now, as the query goes upstream (see SharedTier.take)
            fill.shared = self.service.shared.take(key)
        return fill

    def probe_isolation(self, out: list[bytes]) -> None:
        """Ask the server the isolation level of the transaction a BEGIN just opened, pipelined behind it: no round
        trip of its own, and the client's next request waits only for this reply (a quiet request) before the cache
        may answer it. SHOW takes no snapshot, so a SET TRANSACTION after it still works."""
        probe = self.tx.probe_sent()
        out.append(_ISOLATION_PROBE)
        self.queue(Pending(Op.QUERY, strip=True, quiet=True, capture=Capture(1024, probe), on_done=probe))

    def _replay_local_portals(self, out: list[bytes]) -> None:
        """Before anything is forwarded: create upstream the portals a batch answered here bound (and run, to the
        point the client was answered to), so that what the client sends next finds them as it left them. Their
        replies are not the client's."""
        registry = self.registry
        for name, (statement, bind, rows) in registry.local_portals.items():
            if self._statements.get(bind.statement) is not statement and bind.statement:
                continue  # its statement was closed since, and the portal with it
            if not statement.upstream or self._statements.get(bind.statement) is not statement:
                self.replay(bind.statement, statement, out)
            body = name.encode("utf-8", "surrogateescape") + b"\x00" + bind.statement.encode("utf-8", "surrogateescape")
            out.append(encode(b"B", body + b"\x00" + bind.arguments))
            self.queue(Pending(Op.BIND, strip=True))
            registry.portals[name] = Portal(statement, bind)
            if rows is not None:
                out.append(encode(b"E", name.encode("utf-8", "surrogateescape") + b"\x00" + rows.to_bytes(4, "big")))
                self.queue(Pending(Op.EXECUTE, strip=True))
                registry.executed.add(name)
        registry.local_portals = {}

    def queue(self, pending: Pending) -> None:
        """Track a request sent upstream; one the server will discard (after an error, before a Sync) completes
        at once, so that its invalidation and its single-flight slot are not left waiting for a reply."""
        if not self.tracker.expect(pending):
            self.complete(pending)

    def after_write(self, scope: WriteScope) -> None:
        self.service.invalidate(self.database, scope, removed=self.stale)
        self.service.after_write(self.database, scope)  # (DDL, unknown effects: the catalog is read again)
        # Again when the transaction ends (explicit, or the implicit one of an extended batch up to its Sync).
        self.tx.wrote(scope)

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
                if pending.on_done is not None or pending.capture is not None:
                    self.complete(pending)
            if msg_type == m.READY_FOR_QUERY:
                ended = self.tx.on_ready(region[start + HEADER_SIZE : start + HEADER_SIZE + 1])
                if ended is not None:
                    self._transaction_ended(ended)
            elif msg_type == m.PARAMETER_STATUS:
                self.session.note_parameter(region[start + HEADER_SIZE : end])
                self.tx.parameter_reported()
            elif msg_type == m.ERROR_RESPONSE and outcome.relay:  # (a failed refresh of ours is not the client's)
                self.session.note_error(region[start + HEADER_SIZE : end])
                self.tx.on_error()
        if not tracker.pending and self.drained is not None:
            if not self.drained.done():
                self.drained.set_result(None)
            self.drained = None
        data = region if pieces is None else b"".join((*pieces, region[last:]))
        if self._held is None and not self._bumps:
            self._write_client(data)
        else:
            self.write_client(data)

    def acknowledge_after(self, task: asyncio.Task[object]) -> None:
        """Hold what is written to the client next until `task` (a generation bump not of a commit's: an admin
        command's) is done, as a commit's acknowledgement is held."""
        self._bumps.append(task)

    def write_client(self, data: bytes) -> None:
        """Write to the client, after what is held (with a shared tier, every client write goes through here)."""
        if self._held is None and self._bumps:
            self._held = []
            self.session.spawn(self._release_held())
        if self._held is None:
            self._write_client(data)
        else:
            self._held.append(data)

    async def _release_held(self) -> None:
        """Acknowledge (write what is held) once the generation bumps are made, or their time is up: the tier is
        then away, and its breaker open (shared_tier.py says what that leaves open)."""
        while self._bumps:
            bumps, self._bumps = self._bumps, []
            await asyncio.wait(bumps, timeout=self.service.config.cache.shared.timeout)
        if self._refreshing is not None:  # before the acknowledgement: the client's next read waits for them
            bump, stale = self._refreshing
            self._refreshing = None
            read = bump.result() if bump.done() and not bump.cancelled() and bump.exception() is None else None
            generations = read if isinstance(read, dict) else None
            if not self.tracker.pending:
                self.session.run_guarded(lambda: self._refresh(stale, generations))
        held, self._held = self._held or [], None
        self._write_client(b"".join(held))

    def _transaction_ended(self, end: TxEnd) -> None:
        """A transaction ended (the tracker says how): invalidate again what it wrote, so that no entry filled by
        another session while the write was uncommitted survives, and tell the other proxies; store what was read
        inside it if it committed; refresh write-through results; its portals are gone."""
        service = self.service
        if end.discarded:
            self._statements.clear()  # DISCARD ALL (the tracker already took the new state for refreshes below)
        for scope in end.writes:
            service.invalidate(self.database, scope, counted=False, removed=self.stale)
            service.after_write(self.database, scope)  # the committed schema, as other sessions now see it
        refresh = bool(self.stale) and end.committed and not end.chained and not self.tracker.pending
        bump = None
        if end.writes:
            read = self._refresh_names() if refresh and service.shared is not None else ()
            bump = self._bump_then_publish(list(end.writes), read)
            if bump is not None:
                self._bumps.append(bump)
        for fill, value in end.fills:
            self.store(fill, value)
        if self.stale:
            if refresh and bump is not None:
                self._refreshing = (bump, list(self.stale))  # sent once the bump read their generations
            elif refresh:
                self._refresh(self.stale)
            self.stale.clear()
        self.registry.transaction_ended()

    def _bump_then_publish(self, writes: list[WriteScope], read: Iterable[str] = ()) -> asyncio.Task[object] | None:
        """Tell the other proxies what committed writes invalidated: at once without a shared tier; with one, once
        their generations are bumped there (CacheService.settle says why). The bump task, if any."""
        service = self.service
        bump = service.bump_shared(self.database, writes, read)
        if bump is None:
            service.publish(self.database, writes)
        else:
            database = self.database
            bump.add_done_callback(lambda _: service.settle(database, writes))
        return bump

    def _refresh_names(self) -> set[str]:
        """The generation names of the entries write-through may refresh (read by the bump, for their stamps)."""
        names: set[str] = set()
        for entry in write_through.candidates(self.stale, self.database, self.user, self.tx.state_digest()):
            names.update(dependency_names(entry.tables))
        return names

    def _refresh(self, stale: list[Entry], generations: dict[str, bytes | None] | None = None) -> None:
        """Write-through (write_through.py): run again, hottest first, within `write_through.concurrency` and the
        budget, the results of `write_through` tables that this session's committed writes removed (`stale`). With
        `generations` (read after the commit's bump, before these are sent), their results fill the shared tier."""
        service = self.service
        if self.cache_use() != ANSWER:
            return
        out: list[bytes] = []
        budget = service.refresh_concurrency
        for entry in write_through.candidates(stale, self.database, self.user, self.tx.state_digest()):
            key = entry.key
            assert isinstance(key, keys.QueryKey | keys.ExecuteKey)
            classified = service.classify(self.database, key.sql, self.tx.strings)
            if classified.verdict.strategy != "write_through" or not self.tx.may_read(classified):
                continue
            if budget == 0 or not service.take_refresh():
                service.observe_refresh("skipped")
                continue
            budget -= 1
            leader = service.fill_in_flight(key) is None
            if leader:  # readers that miss it meanwhile wait for this refresh rather than all asking upstream
                service.begin_fill(key)
                self.leading.add(key)
            fill = Fill(key, entry.tables, self._tier.generations(entry.tables), classified.verdict.ttl, entry.query,
                        entry.rule or "", leader, stale_for=classified.verdict.stale_if_error)  # fmt: skip
            if generations is not None and service.shared is not None:
                fill.shared = service.shared.stamp(self.database, entry.tables, generations)
            messages, requests = write_through.refresh_requests(key, Capture(service.max_entry_size, fill))
            out += messages
            for pending in requests:
                self.queue(pending)
        if out:
            self._write_upstream(b"".join(out))
            # The refreshes used the unnamed statement and portal: the client's must be created again before use.
            unnamed = self._statements.get("")
            if unnamed is not None:
                unnamed.upstream = False
            self.registry.portals.pop("", None)

    def complete(self, pending: Pending) -> None:
        request = pending.on_done
        if request is None and pending.capture is None:
            return  # a Bind, Sync or Close of the client's: nothing to account for
        if isinstance(request, IsolationProbe):
            self.tx.probe_answered(request, _probed_level(pending))
            return
        if isinstance(request, ParseDone):
            if pending.seen_error:
                if request.replay:
                    request.statement.upstream = False
                elif self._statements.get(request.name) is request.statement:
                    del self._statements[request.name]
            return
        if isinstance(request, Request):
            if request.scope is not None:
                self.after_write(request.scope)
            if request.changes_state and not pending.seen_error:
                self.tx.state_changed(request.sql, discards_all=request.discards_all)
            self.service.observe(
                request.kind, request.outcome, self.service.clock() - request.started, request.sql, request.stats
            )
        capture = pending.capture
        if isinstance(request, Described) and capture is not None:
            usable = not capture.failed and not pending.seen_error
            if usable:
                note_described(request.statement, capture.header)
            else:
                request.statement.description = None
        if capture is None or pending.op is Op.DESCRIBE_PORTAL or not isinstance(capture.context, Fill):
            return
        fill = capture.context
        try:
            usable = not capture.failed and not pending.seen_error and bool(capture.header)
            if usable and fill.deferred:
                self.tx.read_in_block(fill, capture.value())
                return
            stored = usable and self.store(fill, capture.value())
            if isinstance(request, Refresh):
                self.service.observe_refresh("stored" if stored else "failed")
        finally:
            self.release_fill(capture)

    def store(self, fill: Fill, value: bytes) -> bool:
        """Store a captured result, unless one of its tables was invalidated since its request was sent (the
        generations taken then no longer match): by this session's transaction or by anyone else."""
        stored = self._tier.put(fill.key, value, tables=fill.tables, ttl=fill.ttl, now=self.service.clock(),
                                query=fill.query, rule=fill.rule, generations=fill.generations,
                                stale_for=fill.stale_for)  # fmt: skip
        shared = self.service.shared
        if stored and shared is not None:
            shared.fill(fill.key, value, fill.tables, fill.ttl, fill.query, fill.rule, fill.shared)
        return stored

    def release_fill(self, capture: Capture) -> None:
        """Give up the single-flight slot of a fill this session leads (waiters then look up, or go upstream)."""
        fill = capture.context
        if isinstance(fill, Fill) and fill.leader and fill.key in self.leading:
            self.leading.discard(fill.key)
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
