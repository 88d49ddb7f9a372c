"""One MySQL client connection: relays its handshake and commands to its own upstream connection, and caches reads.

The relay is byte-faithful: every packet goes through as the peer sent it, sequence ids included, except the
greeting's capability flags (compression, query attributes and MariaDB's extended capabilities are masked: the
proxy does not implement them; CLIENT_SSL is the proxy's own, which terminates TLS: cacheproxy/mysql/login.py, which
also renumbers the connection phase when only one side uses TLS). Authentication is relayed whatever the plugin
(mysql_native_password, caching_sha2_password with its RSA exchange, ed25519, auth switches), so the client's
connection id is the upstream thread's own and KILL QUERY reaches the right thread. Commands are answered one at a
time; the `ResponseTracker` tells where each answer ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Hashable

from cacheproxy.analysis.model import Kind
from cacheproxy.analysis.mysql import MyInfo
from cacheproxy.cache.engine import CacheEngine
from cacheproxy.cache.entry import TableId, database_id
from cacheproxy.mysql import codec
from cacheproxy.mysql.admin import is_admin_command, run_admin
from cacheproxy.mysql.codec import Capability, CodecError, Command, Packet, PacketReader, Reply, ResponseTracker
from cacheproxy.mysql.interfaces import PLAN_PENDING, FrontEnd
from cacheproxy.mysql.login import MASKED, Link, Refused, authenticate, handshake
from cacheproxy.mysql.state import SessionState
from cacheproxy.mysql.tls_stream import ByteReader, ByteWriter
from cacheproxy.policy.rules import Decision

log = logging.getLogger("cacheproxy.mysql.session")

_READ_SIZE = 256 * 1024
_U32 = struct.Struct("<I")
# Statement kinds that may change data (reads that call a possibly stored function are flagged on their own).
_MAY_WRITE = frozenset((Kind.WRITE, Kind.DDL))
_NO_REPLY = {Command.STMT_CLOSE: Reply.NONE, Command.STMT_SEND_LONG_DATA: Reply.NONE, Command.QUIT: Reply.NONE}
_REPLIES = {
    Command.STMT_PREPARE: Reply.PREPARE,
    Command.FIELD_LIST: Reply.FIELD_LIST,
    Command.STATISTICS: Reply.STRING,
    Command.CHANGE_USER: Reply.AUTH,
    **_NO_REPLY,
}
_REFUSED = {
    Command.BINLOG_DUMP: "COM_BINLOG_DUMP",
    Command.BINLOG_DUMP_GTID: "COM_BINLOG_DUMP_GTID",
    Command.REGISTER_SLAVE: "COM_REGISTER_SLAVE",
    Command.STMT_BULK_EXECUTE: "COM_STMT_BULK_EXECUTE",
}
ER_NOT_SUPPORTED = 1235  # ER_NOT_SUPPORTED_YET
ER_NET_PACKET_TOO_LARGE = 1153
ER_UNKNOWN = 1105  # ER_UNKNOWN_ERROR
ER_CONNECTION_KILLED = 1927


class Closed(Exception):
    """A peer went away (or broke the protocol); the reason is logged."""


class Stream:
    """Packets of one socket direction, read whole (split packets joined) and written as raw bytes; or, for a
    reply being relayed, raw runs of whole packets (`reply_bytes`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str, max_payload: int):
        # Plain streams, or a TLSStream as both once the client has started TLS (cacheproxy/mysql/login.py).
        self.reader: ByteReader = reader
        self.writer: ByteWriter = writer
        self.name = name
        self.max_payload = max_payload
        self.packets = PacketReader(max_payload)
        self.pending: list[Packet] = []
        self.held = bytearray()  # bytes `reply_bytes` read past the end of a reply, or of an incomplete packet

    async def read(self) -> Packet:
        while not self.pending:
            if self.held:
                data, self.held = bytes(self.held), bytearray()
            else:
                data = await self.reader.read(_READ_SIZE)
                if not data:
                    raise Closed(f"{self.name} closed the connection")
            self.pending = self.packets.feed(data)
        return self.pending.pop(0)

    async def reply_bytes(self, tracker: ResponseTracker) -> tuple[bytes, str]:
        """The next whole packets of the reply `tracker` follows, as they came (one bytes object, never empty), and
        the tracker's step after them. What follows the reply's end stays for the next read."""
        if self.pending or self.packets.buffered:  # (never in practice: the server waits for a command)
            self.held[:0] = b"".join(p.raw for p in self.pending) + self.packets.take()
            self.pending = []
        while True:
            held = self.held
            if held:
                pos, step = tracker.scan(held)
                if pos:
                    out = bytes(held[:pos])
                    del held[:pos]
                    return out, step
            data = await self.reader.read(_READ_SIZE)
            if not data:
                raise Closed(f"{self.name} closed the connection")
            if held:
                held += data
                continue
            pos, step = tracker.scan(data)  # the common case: the reply's packets in one read, nothing held
            if pos == len(data):
                return data, step
            held += data[pos:]
            if pos:
                return data[:pos], step

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Prepared:
    """A statement the client prepared through the proxy: its text and analysis, and its parameters' state."""

    __slots__ = ("info", "long_data", "params", "text", "types", "upstream_types")

    def __init__(self, text: bytes, info: MyInfo, params: int) -> None:
        self.text = text
        self.info = info
        self.params = params  # the parameter count COM_STMT_PREPARE_OK gave
        self.types: bytes | None = None  # the parameter types bound by its last execute
        self.upstream_types: bytes | None = None  # the parameter types the server last saw
        self.long_data = False  # given COM_STMT_SEND_LONG_DATA since its last execute


class MySQLSession:
    """A client connection and its upstream connection, from greeting to COM_QUIT or a disconnect."""

    def __init__(self, server: FrontEnd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.client = Stream(reader, writer, "client", server.max_packet)
        self.upstream: Stream | None = None
        self.state: SessionState | None = None
        self.statements: dict[int, Prepared] = {}  # by the server's statement id
        self.busy = False
        self.next_seq = 1  # the sequence id of the next packet of the reply being relayed
        self.link = Link(False, False, b"", b"")  # the connection phase's transports and scramble

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        reason = "client quit"
        try:
            if await self._handshake():
                await self._commands()
        except Closed as exc:
            reason = str(exc)
            if self.busy and exc.args and str(exc.args[0]).startswith("upstream"):
                # The server went away mid-command: the client gets an error in place of the rest of the reply.
                self._send_error(ER_CONNECTION_KILLED, "70100", f"cacheproxy: {reason}", self.next_seq)
        except CodecError as exc:
            reason = f"protocol error: {exc}"
            self._send_error(ER_NET_PACKET_TOO_LARGE if "over the limit" in str(exc) else ER_UNKNOWN, "08S01", str(exc))
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        finally:
            log.debug("session ends: %s", reason)
            self.close()

    def close(self) -> None:
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
            self.server.metrics.upstream_closed()

    def _send_error(self, code: int, sqlstate: str, message: str, seq: int = 1) -> None:
        with contextlib.suppress(Exception):
            self.client.write(codec.encode_packet(seq, codec.err_payload(code, sqlstate, message)))

    # -- handshake ---------------------------------------------------------------------------------------------

    async def _handshake(self) -> bool:
        upstream = self.server.config.upstream
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(upstream.host, upstream.port, limit=_READ_SIZE), upstream.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            self._send_error(2003, "HY000", f"cacheproxy: cannot reach the upstream server: {exc}", seq=0)
            return False
        self.upstream = Stream(reader, writer, "upstream", self.server.max_packet)
        self.server.metrics.upstream_opened()
        try:
            greeted = await handshake(self.client, self.upstream, self.server.config, self.server.tls_context)
        except Refused as exc:
            self.client.write(exc.packet())
            raise Closed(f"connection refused: {exc.message}") from exc
        if greeted is None:
            return False
        server, response, self.link = greeted.handshake, greeted.response, greeted.link
        capabilities = response.capabilities & (server.capabilities & ~MASKED)
        database = response.database.decode() if response.database else None
        self.state = SessionState(response.user.decode(), database, response.charset, capabilities, server.status)
        return await self._authenticate()

    async def _authenticate(self) -> bool:
        """Relay an authentication exchange (after a handshake response or COM_CHANGE_USER) to its OK or ERR."""
        assert self.upstream is not None
        try:
            tracker = await authenticate(self.client, self.upstream, self.link)
        except Refused as exc:
            self.client.write(exc.packet())
            raise Closed(f"authentication refused: {exc.message}") from exc
        self.link.delta = 0  # a later exchange (COM_CHANGE_USER) starts at sequence id 0 on both sides
        if tracker.error is not None:
            return False
        if tracker.status is not None and self.state is not None:
            self.state.on_status(tracker.status)
        return True

    # -- commands ----------------------------------------------------------------------------------------------

    async def _commands(self) -> None:
        assert self.upstream is not None and self.state is not None
        while True:
            self.busy = False
            packet = await self.client.read()
            self.busy = True
            self.next_seq = 1
            if not packet.payload:
                raise Closed("empty command packet")
            command = packet.payload[0]
            if command == Command.QUIT:
                self.upstream.write(packet.raw)
                return
            if command in _REFUSED:
                self._send_error(ER_NOT_SUPPORTED, "42000", f"cacheproxy does not relay {_REFUSED[command]}")
                continue
            started = time.monotonic()
            if command == Command.QUERY:
                await self._on_query(packet, started)
            elif command == Command.STMT_EXECUTE:
                await self._on_execute(packet, started)
            else:
                await self._on_other(packet, command)

    async def _relay(self, packet: Packet, reply: int, *, binary: bool = False,
                     capture: bool = False, before_end: Callable[[ResponseTracker], None] | None = None
                     ) -> tuple[ResponseTracker, bytes | None]:  # fmt: skip
        """Send `packet` upstream and relay the answer; `before_end` runs before the answer's last bytes reach the
        client (invalidations must be done by then). With `capture`, also return the answer's bytes."""
        upstream, client = self.upstream, self.client
        assert upstream is not None and self.state is not None
        upstream.write(packet.raw)
        deprecate = bool(self.state.capabilities & Capability.DEPRECATE_EOF)
        tracker = ResponseTracker(reply, deprecate, binary, max_payload=upstream.max_payload)
        if reply == Reply.NONE:
            return tracker, None
        captured: list[bytes] | None = [] if capture else None
        size = 0
        limit = self.server.engine.max_entry_size if self.server.engine is not None else 0
        while True:
            out, step = await upstream.reply_bytes(tracker)
            self.next_seq = tracker.last_seq + 1
            if captured is not None:
                captured.append(out)
                size += len(out)
                if size > limit:  # too big to be stored: stop holding a copy of it
                    captured = None
            if step == "done":
                if before_end is not None:
                    before_end(tracker)
                client.write(out)
                if captured is None:
                    return tracker, None
                return tracker, out if len(captured) == 1 else b"".join(captured)
            client.write(out)
            await client.writer.drain()  # a slow client slows the relay rather than filling the proxy's memory
            if step == "client":
                await self._client_turn(tracker)

    async def _client_turn(self, tracker: ResponseTracker) -> None:
        """The server waits for the client: LOCAL INFILE contents (up to an empty packet) or an auth answer."""
        assert self.upstream is not None
        await self.client.writer.drain()
        if tracker.state == "infile":
            while True:
                packet = await self.client.read()
                self.upstream.write(packet.raw)
                if not packet.payload:
                    return
        else:
            self.upstream.write((await self.client.read()).raw)

    # -- COM_QUERY ---------------------------------------------------------------------------------------------

    async def _on_query(self, packet: Packet, started: float) -> None:
        assert self.state is not None
        sql = packet.payload[1:]
        if is_admin_command(sql):
            self.client.write(await run_admin(self.server, self.state, sql))
            return
        info = self.server.analyze(sql)
        cache = self.server.plan(self.state, info, sql=sql)
        if cache is PLAN_PENDING:
            cache = await self.server.cache_plan(self.state, info, sql=sql)
        if isinstance(cache, str) or cache is None:
            await self._uncached(packet, info, sql)
            self.server.metrics.query(info.kind.value, "bypass", time.monotonic() - started)
            return
        key, tables, decision = cache
        if self._answer_hit(key):
            return
        generations = self._engine().generations(tables)
        tracker, data = await self._relay(packet, Reply.GENERIC, capture=True)
        self._after_reply(tracker, info, sql)
        self._store(tracker, data, key, tables, decision, sql, generations)
        self.server.metrics.query("read", "miss", time.monotonic() - started)

    def _engine(self) -> CacheEngine:
        engine = self.server.engine
        assert engine is not None  # a plan is only made with the cache on
        return engine

    def _answer_hit(self, key: Hashable) -> bool:
        """Answer from the cache when `key` is live there (counted as a hit)."""
        entry = self._engine().get(key, time.monotonic())
        if entry is None:
            return False
        self.client.write(entry.value)
        self.server.metrics.hit()
        return True

    def _store(
        self,
        tracker: ResponseTracker,
        data: bytes | None,
        key: Hashable,
        tables: frozenset[TableId],
        decision: Decision,
        sql: bytes,
        generations: tuple[int, ...],
    ) -> None:
        """Store a captured result that may be: one result set, no error or warning, outside a transaction or inside
        one that reads the cache (READ COMMITTED, before its first write)."""
        if data is not None and self._storable(tracker):
            self._engine().put(key, data, tables=tables, ttl=decision.ttl, now=time.monotonic(),
                               query=sql.decode(errors="replace"), rule=decision.rule,
                               generations=generations)  # fmt: skip

    def _storable(self, tracker: ResponseTracker) -> bool:
        assert self.state is not None
        return (
            tracker.error is None
            and tracker.result_sets == 1
            and tracker.warnings == 0
            and tracker.status is not None
            and self.state.reads_cache
        )

    async def _uncached(self, packet: Packet, info: MyInfo, sql: bytes) -> None:
        def before_end(tracker: ResponseTracker) -> None:
            self._after_reply(tracker, info, sql)

        await self._relay(packet, Reply.GENERIC, before_end=before_end)

    def _after_reply(self, tracker: ResponseTracker, info: MyInfo, sql: bytes) -> None:
        """Apply a statement's effects once its answer is in: session changes, writes, invalidations."""
        state = self.state
        assert state is not None
        if tracker.status is not None:
            state.on_status(tracker.status)
        ok = tracker.error is None
        if info.statement_count > 1 and info.sets:
            state.on_lost("a session change inside a multi-statement query")
        elif ok and info.sets:
            state.on_set(sql)
        elif ok and info.use_database is not None:
            state.on_use(info.use_database)
        if ok and info.temp_created:
            state.temp_tables |= info.temp_created
        if info.invalidate_all:
            self.server.invalidate_all(info.reason or "unknown effects")
        elif info.invalidate_databases or info.kind.value == "ddl":
            databases = set(info.invalidate_databases)
            if state.database:
                databases.add(state.database.lower())
            self.server.invalidate_databases(databases, "ddl")
        # A stored function may write: as for PostgreSQL, the database's entries go (unknown_writes: ignore keeps
        # them, for applications whose functions only read).
        if info.calls_unknown and state.database and self.server.config.invalidation.unknown_writes != "ignore":
            state.pending_databases.add(state.database.lower())
        if info.isolation is not None and (ok or info.isolation == "unknown"):
            state.on_isolation(info.isolation)
        if info.invalidate_all or info.calls_unknown:
            state.on_isolation("unknown")  # a procedure or stored function may SET the isolation level
        if (
            info.writes
            or info.invalidate_all
            or info.calls_unknown
            or info.kind in _MAY_WRITE
            or info.isolation == "unknown"
        ):
            state.on_write()  # (failed or not: the proxy does not know what a failed statement did first)
        if info.writes:
            self.server.note_writes(state, info.writes)
        tables, databases = state.take_pending()
        if tables or databases:
            self.server.invalidate(tables, databases)

    # -- prepared statements -----------------------------------------------------------------------------------

    async def _on_execute(self, packet: Packet, started: float) -> None:
        state = self.state
        assert state is not None
        payload = packet.payload
        if len(payload) < 10:
            raise CodecError("truncated COM_STMT_EXECUTE")
        statement = self.statements.get(_U32.unpack_from(payload, 1)[0])
        if statement is None:  # not prepared through this session: the server answers with an error
            await self._relay(packet, Reply.GENERIC, binary=True, before_end=self._unknown_effects)
            self.server.metrics.query("other", "bypass", time.monotonic() - started)
            return
        params = payload[10:]
        bound = self._bound_params(statement, params) if params else params
        long_data, statement.long_data = statement.long_data, False
        info = statement.info
        plan = None
        if payload[5] == 0 and not long_data and bound is not None:  # no cursor, no long data: a result to key
            plan = self.server.plan(state, info, execute=bound, sql=statement.text)
            if plan is PLAN_PENDING:
                plan = await self.server.cache_plan(state, info, execute=bound, sql=statement.text)
        if plan is None or isinstance(plan, str):

            def before_end(tracker: ResponseTracker) -> None:
                self._after_reply(tracker, info, statement.text)

            upstream = self._for_upstream(packet, statement, params)
            await self._relay(upstream, Reply.GENERIC, binary=True, before_end=before_end)
            self.server.metrics.query(info.kind.value, "bypass", time.monotonic() - started)
            return
        key, tables, decision = plan
        if self._answer_hit(key):
            return
        generations = self._engine().generations(tables)
        upstream = self._for_upstream(packet, statement, params)
        tracker, data = await self._relay(upstream, Reply.GENERIC, binary=True, capture=True)
        self._after_reply(tracker, info, statement.text)
        self._store(tracker, data, key, tables, decision, statement.text, generations)
        self.server.metrics.query("read", "miss", time.monotonic() - started)

    def _unknown_effects(self, tracker: ResponseTracker) -> None:
        assert self.state is not None
        if tracker.status is not None:
            self.state.on_status(tracker.status)
        self.state.on_isolation("unknown")
        self.state.on_write()

    def _for_upstream(self, packet: Packet, statement: Prepared, params: bytes) -> Packet:
        """The execute as the server must get it. A cache hit answers an execute that binds parameter types without
        the server seeing those types; a later execute that does not re-send them (new-params-bound 0) would then
        run with the types the server last saw: re-send the client's types in it when they differ."""
        types = statement.types
        if not statement.params or types is None:
            return packet
        bitmap = (statement.params + 7) // 8
        if len(params) > bitmap and params[bitmap] == 0 and statement.upstream_types != types:
            head = packet.payload[: len(packet.payload) - len(params)]
            payload = head + params[:bitmap] + b"\x01" + types + params[bitmap + 1 :]
            packet = Packet(packet.seq, payload, codec.encode_packet(packet.seq, payload), packet.seq)
        statement.upstream_types = types
        return packet

    def _bound_params(self, statement: Prepared, params: bytes) -> bytes | None:
        """The parameter bytes with their types: an execute that does not re-send the types (new-params-bound 0)
        uses those of the statement's last execute, which must then be in the key too."""
        # The NULL bitmap's length depends on the parameter count, which COM_STMT_PREPARE_OK told us.
        nparams = statement.params
        bitmap = (nparams + 7) // 8
        if len(params) < bitmap + 1:
            return None
        if params[bitmap] == 1:
            statement.types = params[bitmap + 1 : bitmap + 1 + 2 * nparams]
            return params
        last = statement.types
        return None if last is None else params + b"\x00" + last

    # -- everything else ---------------------------------------------------------------------------------------

    async def _on_other(self, packet: Packet, command: int) -> None:
        state = self.state
        assert state is not None
        reply = _REPLIES.get(command, Reply.GENERIC)
        if command == Command.STMT_SEND_LONG_DATA:
            prepared = self.statements.get(codec.statement_id(packet.payload))
            if prepared is not None:
                prepared.long_data = True
        if command == Command.STMT_CLOSE:
            self.statements.pop(codec.statement_id(packet.payload), None)
        if command == Command.CHANGE_USER:
            await self._change_user(packet)
            return
        binary = command == Command.STMT_FETCH
        tracker, _ = await self._relay(packet, reply, binary=binary)
        if tracker.status is not None:
            state.on_status(tracker.status)
        if tracker.error is not None:
            return
        if command == Command.INIT_DB:
            state.on_use(packet.payload[1:].decode(errors="replace"))
        elif command == Command.RESET_CONNECTION:
            state.reset()
            self._forget_statements()
        elif command == Command.STMT_PREPARE and tracker.prepared is not None:
            text = bytes(packet.payload[1:])
            prepared = Prepared(text, self.server.analyze(text), tracker.prepared.params)
            self.statements[tracker.prepared.statement_id] = prepared
        elif command in (Command.CREATE_DB, Command.DROP_DB):
            self.server.invalidate_databases({packet.payload[1:].decode(errors="replace").lower()}, "ddl")

    async def _change_user(self, packet: Packet) -> None:
        assert self.upstream is not None and self.state is not None
        self.upstream.write(packet.raw)
        user, database = _change_user_fields(packet.payload, self.state.capabilities)
        if await self._authenticate():
            self.state.reset(user, database, change_user=True)
            self._forget_statements()

    def _forget_statements(self) -> None:
        self.statements.clear()


def _change_user_fields(payload: bytes, capabilities: int) -> tuple[str, str | None]:
    """COM_CHANGE_USER: user, auth response, database (MySQL "COM_CHANGE_USER")."""
    user, pos = codec.read_nul_str(payload, 1)
    if capabilities & Capability.SECURE_CONNECTION:
        pos += 1 + payload[pos]
    else:
        _, pos = codec.read_nul_str(payload, pos)
    database, _ = codec.read_nul_str(payload, pos) if pos < len(payload) else (b"", pos)
    return user.decode(errors="replace"), database.decode(errors="replace") or None


def table_ids(state: SessionState, tables: frozenset[tuple[str | None, str]]) -> set[tuple[str, str]] | None:
    """(db or the current one, table) ids; None when a name is unqualified and no database is selected."""
    out: set[tuple[str, str]] = set()
    for db, name in tables:
        db = db or (state.database.lower() if state.database else None)
        if db is None:
            return None
        out.add((db, name))
    return out


def whole(database: str) -> tuple[str, str]:
    return database_id(database)
