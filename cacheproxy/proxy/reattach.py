"""Sessions that survive the loss of their upstream: re-attached to the server that answers next, state replayed.

When a session's upstream connection is lost (the primary stopped, crashed, or failed over), the session is kept
open if its state can be rebuilt, and logs in again on the host the proxy chooses (cacheproxy/upstream_hosts.py),
within `failover.wait`, at most `failover.reattach_concurrency` sessions at a time. What is replayed: the
StartupMessage (user, database, startup parameters), every SET/RESET applied since (SET ROLE and SET SESSION
AUTHORIZATION included: the TransactionTracker's set_history, the same record the cache keys use), the named
prepared statements (marked as not existing upstream: the relay re-Parses each before its next use, as it does for
the statements it answered locally), and the LISTEN/UNLISTEN statements (proxy/listens.py). Notifications sent
while the session was between servers are lost, as they are for any reconnecting listener. The client sees a delay,
and ParameterStatus for what the new server reports differently.

What the client is told, by the state the loss found the session in:
- idle outside a transaction block: nothing;
- a request in flight outside a transaction block: ERROR 08006 for it ("the database failed over ... outcome
  unknown"); it is never run again (a write may or may not have committed on the old primary);
- inside a transaction block: its next request (or the one in flight) gets ERROR 40001 ("the database failed over:
  the transaction was lost"), ReadyForQuery says idle, and the session goes on. A ROLLBACK is simply answered.

What cannot be rebuilt ends the session with FATAL 08006, as before: no cache relay (cache.enabled: false: the
session's state is not tracked), settings the proxy could not follow (TransactionTracker.uncertain), temporary
tables, statements prepared with SQL PREPARE (their text is not known), a COPY or an unsynced extended batch in
flight, LISTEN sent together with other statements in one Query, and a server that asks for a password (below).

Re-authentication. In `auth.mode: relay` (the default) the proxy never holds credentials: the new login works when
the server lets the user in without a password (trust, peer-mapped certificates), and otherwise the session ends
with 08006. In `auth.mode: terminate`, `Session.upstream_login`
(proxy/upstream_login.py) holds the SCRAM keys of the client's own exchange, and the new login uses them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cacheproxy.errors import CANNOT_CONNECT_NOW, CONNECTION_FAILURE, ProtocolViolation, ProxyError, UpstreamError
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE, encode
from cacheproxy.protocol.messages import IDLE
from cacheproxy.protocol.replies import Op, Pending
from cacheproxy.protocol.startup import StartupMessage
from cacheproxy.proxy.caching import CachingRelay
from cacheproxy.proxy.listens import Listens
from cacheproxy.proxy.requests import Request
from cacheproxy.proxy.streams import read_upstream_message
from cacheproxy.proxy.transaction import TransactionTracker
from cacheproxy.proxy.upstream_login import UpstreamLogin, UpstreamRefused
from cacheproxy.upstream import open_upstream
from cacheproxy.upstream_hosts import HostState, UpstreamHosts

log = logging.getLogger("cacheproxy.reattach")

SERIALIZATION_FAILURE = "40001"
# FATALs a server sends its sessions when it goes down (57P01 admin shutdown, 57P02 crash, 57P03 cannot connect
# now): withheld from the client until it is known whether the session can go on elsewhere.
_SHUTDOWN_CODES = frozenset(("57P01", "57P02", "57P03"))
_CYCLE_OPS = frozenset((Op.QUERY, Op.SYNC, Op.FUNCTION_CALL))
_RUNS = frozenset((Op.QUERY, Op.EXECUTE, Op.FUNCTION_CALL))
_WORD = re.compile(rb"[\s(]*([A-Za-z]+)")
LOST_IN_FLIGHT = (
    "the database failed over (or its server was lost) while this statement ran; its outcome is unknown "
    "(it may have committed): it was not run again"
)
LOST_READ = "the database failed over (or its server was lost) while this query ran; run it again"
LOST_TRANSACTION = (
    "the database failed over (or its server was lost): the transaction in progress was lost (rolled back); "
    "run it again"
)


class SurvivingSession(Protocol):
    """What a re-attach needs of its session (Session implements it)."""

    id: int
    startup: StartupMessage | None
    parameters: dict[str, str]
    transaction: TransactionTracker
    upstream_key: tuple[int, bytes] | None
    upstream_login: UpstreamLogin | None
    listens: Listens

    @property
    def relaying(self) -> bool: ...

    def relay_state(self) -> RelayState | None: ...

    def pause_client(self) -> None: ...

    def resume_client(self) -> None: ...

    def write_client(self, data: bytes) -> None: ...

    def adopt_upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes: ...

    def feed_client(self, data: bytes) -> None: ...

    def fail(self, error: ProxyError) -> None:
        """End the session with this error for the client."""
        ...

    def end(self, reason: str) -> None:
        """End the session without an error of the proxy's (the client was told already)."""
        ...


@dataclass(frozen=True, slots=True)
class RelayState:
    """What a re-attach reads of the session's caching relay before it is replaced."""

    pending: tuple[Pending, ...]
    sql_prepared: bool  # a statement prepared with SQL PREPARE (its text unknown: it cannot be prepared again)
    unsynced: bool  # extended messages forwarded without their Sync


def relay_state(relay: CachingRelay) -> RelayState:
    statements = relay.registry.statements
    return RelayState(
        tuple(relay.tracker.pending),
        any(name and not statement.query for name, statement in statements.items()),
        relay.tx.unsynced,
    )


def successor(old: CachingRelay, new: CachingRelay) -> bytes:
    """Hand what the old relay held to its successor on the new upstream: the client's named statements (to be
    Parsed again before their next use) and the client's messages not forwarded yet (returned, to feed the new
    relay). The old one is closed: its pending writes are invalidated as if they had committed."""
    for name, statement in old.registry.statements.items():
        if name:
            statement.upstream = False  # (its description stays: the client was told that shape)
            new.registry.statements[name] = statement
    unsent = old.take_held()
    old.close()
    return unsent


# -- deciding (sans-IO) -------------------------------------------------------------------------------------------


def why_not(session: SurvivingSession, relay: RelayState | None) -> str | None:
    """Why the session's state cannot be rebuilt on another connection (None: it can)."""
    tx = session.transaction
    if session.startup is None:
        return "it had not started"
    if relay is None:
        return "the cache is off, so its state is not tracked"
    if "replication" in session.startup.parameters:
        return "it is a replication connection"
    if tx.uncertain is not None:
        return f"its settings are not known ({tx.uncertain})"
    if tx.temp_tables:
        return "it created temporary tables"
    if session.listens.unknown:
        return "it sent LISTEN together with other statements"
    if relay.sql_prepared:
        return "it has statements prepared with SQL PREPARE"
    if relay.unsynced:
        return "an extended-protocol batch was in flight without its Sync"
    if any(p.copy_from or p.during_copy for p in relay.pending):
        return "a COPY was in flight"
    return None


def in_flight(pending: Sequence[Pending], in_block: bool) -> tuple[int, str, str]:
    """What the client waits for and is told: (request cycles, SQLSTATE, message). A COMMIT in flight may have
    committed (08006, outcome unknown); a transaction block open, or opened by the request in flight, was lost
    (40001); outside one, a statement that may write has an unknown outcome, a read can simply be run again."""
    cycles = 0
    writes = commits = begins = False
    for p in pending:
        if p.quiet:
            continue
        if p.op in _CYCLE_OPS:
            cycles += 1
        if p.op not in _RUNS:
            continue
        request = p.on_done if isinstance(p.on_done, Request) else None
        if request is None or request.kind != "read" or request.scope:
            writes = True
        if request is not None and request.kind == "tx":
            word = _first_word(request.sql)
            commits = commits or word in (b"commit", b"end", b"prepare")
            begins = begins or word in (b"begin", b"start")
    if commits:
        return cycles, CONNECTION_FAILURE, LOST_IN_FLIGHT
    if in_block or begins:
        return cycles, SERIALIZATION_FAILURE, LOST_TRANSACTION
    return cycles, CONNECTION_FAILURE, LOST_IN_FLIGHT if writes else LOST_READ


def _first_word(sql: bytes) -> bytes:
    match = _WORD.match(sql)
    return match[1].lower() if match else b""


def shutdown_fatal(data: bytes) -> bool:
    """`data` is exactly one ErrorResponse, FATAL, of a server going down."""
    if len(data) < HEADER_SIZE or data[0] != m.ERROR_RESPONSE:
        return False
    if int.from_bytes(data[1:5], "big") + 1 != len(data):
        return False
    fields = m.decode_error_fields(data[HEADER_SIZE:])
    return fields.get("V") in ("FATAL", "PANIC") and fields.get("C") in _SHUTDOWN_CODES


def trailing_shutdown_fatal(data: bytes) -> int | None:
    """Where a server-shutdown FATAL that ends `data` starts (None: `data` does not end with one). The server sends
    it last, often in one write with output it had buffered (a RowDescription), so it is looked for at the end."""
    if data[-1] != 0:  # an ErrorResponse ends with its field list's terminator; most reads end with 'Z' or mid-row
        return None
    floor = max(0, len(data) - 1024)
    mark = data.rfind(b"C57P0", floor)
    if mark < 0:
        return None
    start = data.rfind(b"E", floor, mark)
    while start >= 0:
        if shutdown_fatal(data[start:]):
            return start
        start = data.rfind(b"E", floor, start)
    return None


class LostTransaction:
    """Answers the client's next request cycle after its transaction block was lost: 40001 (or, for a ROLLBACK,
    just ROLLBACK), then ReadyForQuery idle. Sans-IO: `feed` returns (bytes for the client, bytes left for the
    relay, done)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._errored = False

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= HEADER_SIZE:
            end = 1 + int.from_bytes(self._buf[1:5], "big")
            if len(self._buf) < end:
                break
            msg_type, body = self._buf[0], bytes(self._buf[HEADER_SIZE:end])
            del self._buf[:end]
            if msg_type == m.TERMINATE:
                return b"".join(out), encode(b"X"), True
            if msg_type == m.QUERY and not self._errored and _is_rollback(body):
                out.append(m.command_complete("ROLLBACK") + m.ready_for_query(b"I"))
                return b"".join(out), bytes(self._buf), True
            if not self._errored:
                out.append(m.error_response("ERROR", SERIALIZATION_FAILURE, LOST_TRANSACTION))
                self._errored = True
            if msg_type in (m.QUERY, m.SYNC, m.FUNCTION_CALL):
                out.append(m.ready_for_query(b"I"))
                return b"".join(out), bytes(self._buf), True
        return b"".join(out), b"", False


def _is_rollback(body: bytes) -> bool:
    words = body.rstrip(b"\x00; \t\r\n").split()
    return bool(words) and words[0].upper() in (b"ROLLBACK", b"ABORT") and len(words) <= 2


# -- doing --------------------------------------------------------------------------------------------------------


class Survival:
    """One session's part in failover: withholds a shutdown FATAL, decides at the loss, runs the re-attach."""

    def __init__(self, session: SurvivingSession, hosts: UpstreamHosts) -> None:
        self.session = session
        self.hosts = hosts
        self.withheld: bytes | None = None
        self.lost_transaction: LostTransaction | None = None
        self.running = False

    def withhold(self, data: bytes) -> bytes:
        """Keep a server-shutdown FATAL that ends `data` from the client for now (`lost` decides whether it is
        relayed); returns the rest of `data`, to relay as usual."""
        if self.withheld is not None:
            return data
        start = trailing_shutdown_fatal(data)
        if start is None:
            return data
        self.withheld = data[start:]
        return data[:start]

    def lost(self, reason: str) -> str | None:
        """The upstream connection is gone: None when a re-attach was started, else why not."""
        relay = self.session.relay_state()
        why = why_not(self.session, relay)
        if why is None and self.running:
            why = "a re-attach is already running"
        if why is not None:
            return why
        self.running = True
        self.hosts.suspect(reason)
        self.session.pause_client()
        return None

    async def run(self) -> None:
        """Wait for a server, log in again, replay the state; then tell the client what it lost."""
        session = self.session
        relay = session.relay_state()
        assert relay is not None
        in_block = session.transaction.status is not IDLE
        cycles, code, message = in_flight(relay.pending, in_block)
        started = time.monotonic()
        try:
            if self.withheld is not None and await self._deliberate(started):
                # The server is up and the same: this backend alone was terminated (pg_terminate_backend).
                session.write_client(self.withheld)
                session.end("upstream closed the connection after a FATAL error")
                return
            reader, writer, chosen = await self._attach(started + self.hosts.settings.wait)
        except ProxyError as exc:
            if exc.sqlstate != CONNECTION_FAILURE:
                exc = UpstreamError(f"lost connection to the upstream server; re-attach failed: {exc.message}",
                                    sqlstate=CONNECTION_FAILURE)  # fmt: skip
            session.fail(exc)
            return
        except Exception as exc:  # a bug must not leave the client paused forever
            log.exception("session %d: re-attach failed", session.id)
            session.fail(UpstreamError(f"lost connection to the upstream server; re-attach failed: {exc}",
                                       sqlstate=CONNECTION_FAILURE))  # fmt: skip
            return
        finally:
            self.running = False
        self.withheld = None
        if not session.relaying:  # the client left (or a shutdown ended the session) meanwhile
            writer.close()
            return
        unsent = session.adopt_upstream(reader, writer)
        self._tell_client(cycles, code, message, in_block)
        log.info(
            "session %d: re-attached to %s after %.3fs (%d requests in flight, %s)",
            session.id, chosen.describe(), time.monotonic() - started, cycles,
            "in a transaction block" if in_block else "outside a transaction",
        )  # fmt: skip
        session.resume_client()
        session.feed_client(unsent)

    async def _attach(self, deadline: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, HostState]:
        """Log in on the chosen server and replay the state; a server not ready yet (refused, starting up, gone
        again) is tried again until `deadline`."""
        while True:
            chosen = await self.hosts.wait_for_server(deadline)
            if chosen is None:
                raise UpstreamError(
                    f"lost connection to the upstream server; no server answered within failover.wait "
                    f"({self.hosts.settings.wait:g}s)",
                    sqlstate=CONNECTION_FAILURE,
                )
            try:
                with await self.hosts.login_slot():
                    async with asyncio.timeout(max(deadline - time.monotonic(), 1.0)):
                        reader, writer = await self._login()
                        try:
                            await self._replay(reader, writer)
                        except BaseException:
                            writer.close()
                            raise
                return reader, writer, chosen
            except (_NotReady, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise UpstreamError(
                        f"lost connection to the upstream server; re-attaching failed until failover.wait "
                        f"({self.hosts.settings.wait:g}s): {exc or exc.__class__.__name__}",
                        sqlstate=CONNECTION_FAILURE,
                    ) from exc
                self.hosts.suspect(f"session {self.session.id} could not log in: {exc or exc.__class__.__name__}")
                await asyncio.sleep(0.1)

    async def _deliberate(self, since: float) -> bool:
        """After a 57P01: is the same server still up (a terminated backend, not a server going down)? Asked with a
        probe started after the loss (one made before it would say yes)."""
        before = self.hosts.current
        now = await self.hosts.check_current(since)
        return now is not None and before is not None and now == before

    async def _login(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        session = self.session
        assert session.startup is not None
        try:
            reader, writer = await open_upstream(self.hosts.cfg)
        except UpstreamError as exc:
            raise _NotReady(exc.message) from exc
        try:
            if session.upstream_login is not None:  # auth.mode terminate: the keys of the client's own exchange
                await self._login_with(session.upstream_login, reader, writer)
            else:
                await self._login_without_password(session.startup, reader, writer)
            await self._until_ready(reader, startup=True)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    @staticmethod
    async def _login_with(login: UpstreamLogin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await login.authenticate(reader, writer)
        except UpstreamRefused as exc:
            if exc.sqlstate == CANNOT_CONNECT_NOW:  # starting up, shutting down
                raise _NotReady(exc.message) from exc
            raise UpstreamError("the server refused the login: " + exc.message, sqlstate=CONNECTION_FAILURE) from exc

    @staticmethod
    async def _login_without_password(
        startup: StartupMessage, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(startup.raw)
        while True:
            msg_type, body = await read_upstream_message(reader)
            if msg_type == m.AUTHENTICATION:
                if m.auth_code(body) == m.AUTH_OK:
                    return
                raise UpstreamError(
                    "the server asks for a password, which the proxy does not hold (auth.mode: relay)",
                    sqlstate=CONNECTION_FAILURE,
                )
            if msg_type == m.ERROR_RESPONSE:
                if m.decode_error_fields(body).get("C") == CANNOT_CONNECT_NOW:  # starting up, shutting down
                    raise _NotReady(_message(body))
                raise UpstreamError("the server refused the login: " + _message(body), sqlstate=CONNECTION_FAILURE)
            if msg_type not in (m.NOTICE_RESPONSE, m.NEGOTIATE_PROTOCOL_VERSION):
                raise ProtocolViolation(f"unexpected message {chr(msg_type)!r} from upstream during login")

    async def _until_ready(self, reader: asyncio.StreamReader, *, startup: bool = False) -> None:
        """Read up to ReadyForQuery: ParameterStatus (changed ones go to the client), the new BackendKeyData."""
        session = self.session
        error: str | None = None
        while True:
            msg_type, body = await read_upstream_message(reader)
            if msg_type == m.BACKEND_KEY_DATA and startup:
                session.upstream_key = m.decode_backend_key_data(body)
            elif msg_type == m.PARAMETER_STATUS:
                name, value = m.decode_parameter_status(body)
                if session.parameters.get(name) != value:
                    session.parameters[name] = value
                    session.transaction.parameter_reported()
                    session.write_client(encode(b"S", body))
            elif msg_type == m.ERROR_RESPONSE:
                error = _message(body)
            elif msg_type == m.READY_FOR_QUERY:
                if error is not None:
                    raise UpstreamError("replaying the session's state failed: " + error, sqlstate=CONNECTION_FAILURE)
                return

    async def _replay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The SET/RESET history, in order, one Query each (a SET ROLE after a SET of its settings, as it was), then
        the LISTEN/UNLISTEN statements."""
        for sql in [*self.session.transaction.set_history, *self.session.listens.statements]:
            writer.write(encode(b"Q", sql + b"\x00"))
            await self._until_ready(reader)

    def _tell_client(self, cycles: int, code: str, message: str, in_block: bool) -> None:
        session = self.session
        tx = session.transaction
        if cycles:
            error = m.error_response("ERROR", code, message)
            session.write_client((error + m.ready_for_query(b"I")) * cycles)
            tx.on_error()  # (so that nothing of it counts as committed)
            tx.on_ready(b"I")
        elif in_block:
            self.lost_transaction = LostTransaction()

    def client_data(self, data: bytes) -> bytes | None:
        """While a lost transaction is to be reported: answer the client's next cycle; the rest goes on (None: all
        of `data` was consumed here)."""
        lost = self.lost_transaction
        assert lost is not None
        reply, rest, done = lost.feed(data)
        if reply:
            self.session.write_client(reply)
        if done:
            self.lost_transaction = None
            tx = self.session.transaction
            tx.on_error()
            tx.on_ready(b"I")
        return rest or None


class _NotReady(Exception):
    """The chosen server cannot take the login yet (refused, starting up, shutting down): try again."""


def _message(body: bytes) -> str:
    return m.decode_error_fields(body).get("M", "error")
