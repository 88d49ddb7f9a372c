"""Client session: one client connection and its own upstream connection, from accept to close.

Phases: startup negotiation (SSL/GSS refusal, cancel requests, admission), the authentication exchange relayed
between client and upstream, then the relay proper. The relay runs two pumps, one per direction; each reads what has
arrived, frames it (the framer reads headers only), notes the few messages that change session state, and forwards
the whole region in one write.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from enum import Enum
from typing import Any, Protocol, cast

from cacheproxy.config import Config
from cacheproxy.errors import (
    ADMIN_SHUTDOWN,
    IDLE_SESSION_TIMEOUT,
    INTERNAL_ERROR,
    INVALID_AUTHORIZATION_SPECIFICATION,
    QUERY_CANCELED,
    ProtocolViolation,
    ProxyError,
    UpstreamError,
)
from cacheproxy.observability.metrics import Metrics
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE, encode
from cacheproxy.protocol.messages import IDLE
from cacheproxy.protocol.startup import (
    CancelRequest,
    GSSEncRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
    read_length,
)
from cacheproxy.proxy.admin_console import is_admin_command
from cacheproxy.proxy.auth_source import AuthSource
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.caching import CachingRelay
from cacheproxy.proxy.interfaces import ConsoleSession
from cacheproxy.proxy.link import Link
from cacheproxy.proxy.listens import Listens
from cacheproxy.proxy.offline import OfflineRelay, offline_startup
from cacheproxy.proxy.plain_relay import FATAL_SEVERITIES, PlainStreams
from cacheproxy.proxy.reattach import RelayState, Survival, relay_state, successor
from cacheproxy.proxy.spare_upstream import SpareUpstream
from cacheproxy.proxy.streams import (
    MAX_STARTUP_MESSAGE,
    client_auth_request,
    drain_stream_buffer,
    peer_name,
    read_message,
    read_upstream_message,
)
from cacheproxy.proxy.terminating_auth import AUTHENTICATION_OK, authenticate_client
from cacheproxy.proxy.transaction import TransactionTracker
from cacheproxy.proxy.upstream_login import UpstreamLogin, UpstreamRefused
from cacheproxy.upstream import connection_lost_error, open_upstream
from cacheproxy.upstream_hosts import UpstreamHosts

log = logging.getLogger("cacheproxy.session")

# Authentication requests after which the server waits for nothing from the client (AuthenticationOk and
# AuthenticationSASLFinal); every other request code expects one PasswordMessage-family reply.
_NO_REPLY_AUTH = frozenset((m.AUTH_OK, m.AUTH_SASL_FINAL))
_CLOSE_GRACE = 5.0
_MAX_NEGOTIATIONS = 2
# Bytes queued for a client beyond which the caching relay stops answering its requests (hits are written by the
# proxy itself, so the server's own backpressure does not hold them): resumed when the buffer drains.
_CLIENT_BACKLOG = 1 << 20
# How long a spare upstream connection (proxy/spare_upstream.py) gets to answer the StartupMessage before a new
# connection replaces it: far longer than a healthy server takes, short enough that a dead route costs little.
_SPARE_PATIENCE = 2.0

UpstreamStart = tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]  # (reader, writer, it was a spare)


class AdminConsole(Protocol):
    def execute(self, session: ConsoleSession, sql: str) -> bytes: ...


class SessionServer(Protocol):
    """What a session needs of the proxy server that owns it (ProxyServer): configuration, the cache, admission,
    cancel keys, the admin console."""

    @property
    def config(self) -> Config: ...

    @property
    def cache(self) -> CacheService | None: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def tls_context(self) -> ssl.SSLContext | None: ...

    @property
    def admin_console(self) -> AdminConsole: ...

    @property
    def auth(self) -> AuthSource: ...

    @property
    def spares(self) -> SpareUpstream: ...

    @property
    def failover(self) -> UpstreamHosts | None: ...

    def admit(self, session: Session) -> None: ...

    def issue_key(self, session: Session, upstream_pid: int) -> tuple[int, int]: ...

    def forget(self, session: Session) -> None: ...

    async def forward_cancel(self, process_id: int, secret_key: int) -> None: ...


class Phase(Enum):
    """Where a session is in its life; `Session._set_phase` is the only writer."""

    STARTUP = "startup"
    """Reading SSLRequest/GSSENCRequest/StartupMessage."""
    AUTHENTICATING = "authenticating"
    """Upstream connected; relaying the authentication exchange."""
    READY = "ready"
    """Authenticated: relaying queries and results."""
    CLOSING = "closing"
    """A close was decided; pumps are stopping."""
    CLOSED = "closed"


class SessionEnd(Exception):
    """Ends a session without an error of ours to report (the reason is logged)."""


class Session:
    """One client connection and the upstream connection opened for it."""

    def __init__(
        self, server: SessionServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session_id: int
    ) -> None:
        self.server = server
        self.id = session_id
        self.peer = peer_name(writer)
        self.tls = False  # the client's connection is encrypted (it asked, and tls.mode allows it)
        self.startup: StartupMessage | None = None
        self.phase = Phase.STARTUP
        self.process_id = 0
        self.secret_key = 0
        self.upstream_key: tuple[int, bytes] | None = None
        # auth.mode terminate: how to log in upstream as this client again, at any time (upstream_login.py).
        self.upstream_login: UpstreamLogin | None = None
        self.parameters: dict[str, str] = {}
        # The transaction and settings state (its `status` changes only at ReadyForQuery, in `on_ready`).
        self.transaction = TransactionTracker(session_id, parameters=self.parameters)
        self.opened_at = time.monotonic()
        self._client_reader = reader
        self._client_writer = writer
        self._up_reader: asyncio.StreamReader | None = None
        self._up_writer: asyncio.StreamWriter | None = None
        self._client_terminated = False
        self._upstream_fatal = False  # the upstream already told the client why it is closing
        self._close_requested: str | None = None
        self._relay_end: asyncio.Future[str] | None = None
        # With the cache off: what the relay reads of both streams (its loops compiled: proxy/plain_relay.py).
        self._plain = PlainStreams(server.config.limits.max_message_size, self.transaction, self.parameters)
        self._idle_timeout = server.config.limits.idle_client_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self._caching: CachingRelay | None = None
        self._offline: OfflineRelay | None = None  # stale-if-error: no upstream, answered from the cache alone
        self._tasks: set[asyncio.Task[None]] = set()
        # Failover (proxy/reattach.py): re-attaches this session elsewhere when its upstream is lost, logging in
        # with `upstream_login` (auth.mode terminate; None: the new server must let the user in without a password).
        self._survival: Survival | None = None
        self.listens = Listens()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _set_phase(self, phase: Phase, why: str) -> None:
        log.debug("session %d: %s -> %s (%s)", self.id, self.phase.value, phase.value, why)
        self.phase = phase

    @property
    def idle(self) -> bool:
        """Between request cycles and outside a transaction block: safe to close without losing work."""
        if self.phase is not Phase.READY or self.transaction.status is not IDLE:
            return False
        if self._caching is not None:
            return not self._caching.busy
        return not self._plain.in_flight and not self._plain.open_batch

    @property
    def user(self) -> str:
        return self.startup.user if self.startup else ""

    @property
    def database(self) -> str:
        return self.startup.database if self.startup else ""

    @property
    def startup_parameters(self) -> dict[str, str]:
        return self.startup.parameters if self.startup else {}

    async def run(self) -> None:
        reason = "closed"
        error: bytes | None = None
        try:
            reason = await self._run()
        except UpstreamError as exc:
            reason = exc.message
            error = None if self._upstream_fatal else _error_message(exc)
        except ProxyError as exc:
            reason = exc.message
            error = _error_message(exc)
        except SessionEnd as exc:
            reason = str(exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            reason = self._close_requested or "client disconnected"
        except asyncio.CancelledError:
            reason = self._close_requested or "cancelled"
            error = m.error_response("FATAL", ADMIN_SHUTDOWN, "terminating connection: " + reason)
        except Exception:
            log.exception("session %d: internal error", self.id)
            reason = "internal error"
            error = m.error_response("FATAL", INTERNAL_ERROR, "cacheproxy internal error")
        finally:
            self._set_phase(Phase.CLOSING, reason)
            await self._close(error)
            self._set_phase(Phase.CLOSED, reason)
            if self._up_writer is not None:
                self.server.metrics.upstream_closed()
            if self._caching is not None:
                self._caching.close()
            for task in self._tasks:
                task.cancel()
            self.server.forget(self)
            self._log_closed(reason)

    async def _run(self) -> str:
        startup = await self._negotiate_startup()
        if startup is None:
            return "cancel request handled"
        self.startup = startup
        self.transaction.startup = startup.parameters
        self.server.admit(self)  # raises TOO_MANY_CONNECTIONS
        log.info(
            "session %d: client %s user=%s database=%s application_name=%s",
            self.id,
            self.peer,
            startup.user,
            startup.database,
            startup.parameters.get("application_name", ""),
        )
        timeout = self.server.config.limits.startup_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._authenticate(startup)
        except TimeoutError as exc:
            raise ProxyError(QUERY_CANCELED, f"canceling authentication due to timeout ({timeout:g}s)") from exc
        self._set_phase(Phase.READY, "authenticated")
        if self._offline is not None:
            return await self._offline.run()
        return await self._relay()

    def request_close(self, reason: str) -> None:
        """Ask the session to end as soon as it is idle (graceful shutdown); immediately if it is idle now."""
        self._close_requested = reason
        if self.phase is not Phase.READY or self.idle:
            self.abort(reason)

    def abort(self, reason: str) -> None:
        """End the session now; the client is told why (FATAL 57P01)."""
        self._close_requested = reason
        if self._relay_end is not None:
            self._end_relay(ProxyError(ADMIN_SHUTDOWN, "terminating connection: " + reason))
        else:  # still in startup or authentication: nothing to lose
            self._client_writer.transport.abort()

    async def _close(self, error: bytes | None) -> None:
        """Close both transports; queued bytes (the error for the client, Terminate for the upstream) are flushed.

        A peer that does not read within `_CLOSE_GRACE` seconds is cut off, so a stalled client cannot pin memory.
        """
        loop = asyncio.get_running_loop()
        client = self._client_writer.transport
        if not client.is_closing():
            if error is not None:
                client.write(error)
            client.close()
            loop.call_later(_CLOSE_GRACE, client.abort)
        if self._up_writer is not None:
            upstream = self._up_writer.transport
            if not upstream.is_closing():
                if not self._client_terminated:
                    upstream.write(m.terminate())  # let the backend end cleanly instead of logging an EOF
                upstream.close()
                loop.call_later(_CLOSE_GRACE, upstream.abort)

    def _log_closed(self, reason: str) -> None:
        user = self.startup.user if self.startup else "-"
        log.info(
            "session %d: closed after %.3fs (client %s user=%s): %s",
            self.id,
            time.monotonic() - self.opened_at,
            self.peer,
            user,
            reason,
        )

    # -- startup ---------------------------------------------------------------------------------------------

    async def _negotiate_startup(self) -> StartupMessage | None:
        """Read startup packets until a StartupMessage (returned) or a CancelRequest (handled; None)."""
        try:
            async with asyncio.timeout(self.server.config.limits.startup_timeout):
                return await self._read_startup_packets()
        except TimeoutError as exc:
            raise SessionEnd("no startup packet received in time") from exc
        except asyncio.IncompleteReadError as exc:
            raise SessionEnd("client disconnected during startup") from exc

    async def _read_startup_packets(self) -> StartupMessage | None:
        reader, writer = self._client_reader, self._client_writer
        negotiations = 0
        tls_context = self.server.tls_context
        while True:
            header = await reader.readexactly(4)
            request = decode_startup(header + await reader.readexactly(read_length(header) - 4))
            if isinstance(request, SSLRequest | GSSEncRequest):
                # libpq sends at most a GSSENCRequest then an SSLRequest; more is a client stalling for time.
                negotiations += 1
                if negotiations > _MAX_NEGOTIATIONS:
                    raise ProtocolViolation("too many encryption requests before the startup message")
                if isinstance(request, SSLRequest) and tls_context is not None and not self.tls:
                    writer.write(b"S")
                    await writer.drain()
                    await writer.start_tls(tls_context)  # the reader reads decrypted bytes from here on
                    self.tls = True
                    continue
                writer.write(b"N")  # GSSAPI encryption is not offered; nor TLS when it is disabled
                continue
            if isinstance(request, CancelRequest):
                await self.server.forward_cancel(request.process_id, request.secret_key)
                return None
            if self.server.config.tls.mode == "require" and not self.tls:
                raise ProxyError(
                    INVALID_AUTHORIZATION_SPECIFICATION,
                    "cacheproxy requires TLS (tls.mode: require): connect with sslmode=require",
                )
            return request

    async def _authenticate(self, startup: StartupMessage) -> None:
        if self.server.config.auth.mode == "terminate":
            await self._authenticate_terminating(startup)
            return
        self._set_phase(Phase.AUTHENTICATING, "upstream connect")
        msg_type, body = await self._first_upstream_message(startup)
        up_reader = self._up_reader
        assert up_reader is not None
        client = self._client_writer
        # What the client is sent is gathered and written once, when it must answer (a password or SASL request)
        # or at ReadyForQuery: one write instead of one per message (a dozen ParameterStatus messages).
        pending = bytearray()
        while True:
            if msg_type == m.AUTHENTICATION:
                code = m.auth_code(body)
                pending += client_auth_request(code, body)
                if code == m.AUTH_OK:
                    break
                if code not in _NO_REPLY_AUTH:
                    client.write(pending)
                    pending.clear()
                    await self._relay_auth_reply()
            elif msg_type == m.ERROR_RESPONSE:
                client.write(pending + encode(bytes((msg_type,)), body))
                raise SessionEnd("upstream refused: " + m.decode_error_fields(body).get("M", "error"))
            elif msg_type in (m.NOTICE_RESPONSE, m.NEGOTIATE_PROTOCOL_VERSION):
                pending += encode(bytes((msg_type,)), body)
            else:
                raise ProtocolViolation(f"unexpected message {chr(msg_type)!r} from upstream during authentication")
            msg_type, body = await read_upstream_message(up_reader)
        await self._finish_startup(up_reader, pending)

    async def _open_upstream(self, startup: StartupMessage | None, *, spare: bool = True) -> UpstreamStart:
        """Connect upstream (a spare connection when one is ready) and send `startup` on it, if given."""
        if spare:
            reader, writer, was_spare = await self.server.spares.connect()
        else:
            reader, writer = await open_upstream(self.server.config.upstream)
            was_spare = False
        if startup is not None:
            writer.write(startup.raw)
        return reader, writer, was_spare

    async def _first_upstream_message(self, startup: StartupMessage) -> tuple[int, bytes]:
        """Open the upstream connection, send the StartupMessage, and read the server's first answer.

        A spare that was closed meanwhile (the server's authentication_timeout) or does not answer within
        `_SPARE_PATIENCE` (its route went dead while it waited) is replaced by a new connection: the client has been
        sent nothing yet.
        """
        reader, spare = self._adopt_upstream(await self._open_upstream(startup))
        if not spare:
            return await read_upstream_message(reader)
        try:
            async with asyncio.timeout(_SPARE_PATIENCE):
                return await read_upstream_message(reader)
        except (UpstreamError, TimeoutError) as exc:
            self._spare_failed(exc)
        reader, _ = self._adopt_upstream(await self._open_upstream(startup, spare=False))
        return await read_upstream_message(reader)

    async def _login_upstream(self, login: UpstreamLogin, spare: bool) -> list[bytes] | None:
        """auth.mode terminate: log in upstream as the client; the server's notices, or None when the connection
        was a spare that turned out dead (closed, or no answer within `_SPARE_PATIENCE`): the caller connects
        again, as in `_first_upstream_message`."""
        assert self._up_reader is not None and self._up_writer is not None
        if not spare:
            return await login.authenticate(self._up_reader, self._up_writer)
        try:
            async with asyncio.timeout(_SPARE_PATIENCE):
                return await login.authenticate(self._up_reader, self._up_writer)
        except UpstreamRefused:
            raise
        except (UpstreamError, TimeoutError) as exc:
            self._spare_failed(exc)
            return None

    async def _opened_or_offline(self, startup: StartupMessage, opening: Awaitable[UpstreamStart]) -> bool:
        """Adopt the upstream connection `opening` gives; False when it could not be opened and the session was
        taken offline instead (stale_if_error: `_go_offline`)."""
        try:
            opened = await opening
        except UpstreamError as exc:
            if self._go_offline(startup, exc):
                return False
            raise
        self._adopt_upstream(opened)
        return True

    def _spare_failed(self, exc: Exception) -> None:
        why = "no answer" if isinstance(exc, TimeoutError) else str(exc)
        log.info("session %d: the spare upstream connection failed (%s); connecting again", self.id, why)

    def _adopt_upstream(self, opened: UpstreamStart) -> tuple[asyncio.StreamReader, bool]:
        """Make `opened` this session's upstream connection (a previous one, a dead spare, is closed)."""
        reader, writer, was_spare = opened
        if self._up_writer is None:
            self.server.metrics.upstream_opened()
        else:
            self._up_writer.close()
        self._up_reader, self._up_writer = reader, writer
        return reader, was_spare

    async def _authenticate_terminating(self, startup: StartupMessage) -> None:
        """auth.mode terminate: authenticate the client here, then log in upstream as it (terminating_auth.py).

        The upstream connection is opened (or a spare taken) while the client authenticates, so that the connect
        and the server's fork overlap the client's exchange; the StartupMessage is sent only once the client has
        proven who it is (a client with a wrong password must not make the server start a session for it).
        """
        self._set_phase(Phase.AUTHENTICATING, "client authentication (auth.mode: terminate)")
        opening = asyncio.ensure_future(self._open_upstream(None))
        try:
            login = await authenticate_client(self._client_reader, self._client_writer, startup, self.server.auth)
        except BaseException:
            _discard_unused(opening)
            raise
        self.upstream_login = login
        if not await self._opened_or_offline(startup, opening):
            return
        spare = opening.result()[2]
        try:
            notices = await self._login_upstream(login, spare)
            if notices is None:  # a dead spare: a new connection, as if there had been no spare
                if not await self._opened_or_offline(startup, self._open_upstream(None, spare=False)):
                    return
                notices = await self._login_upstream(login, spare=False)
        except UpstreamRefused as exc:
            self._client_writer.write(encode(b"E", exc.body))
            raise SessionEnd("upstream refused: " + exc.message) from exc
        assert notices is not None
        up_reader = self._up_reader  # (a new connection if the spare failed)
        assert up_reader is not None
        await self._finish_startup(up_reader, bytearray(AUTHENTICATION_OK + b"".join(notices)))
        self.server.auth.logins.remember(startup, self.parameters)

    def _go_offline(self, startup: StartupMessage, exc: UpstreamError) -> bool:
        """The upstream cannot be reached: serve this authenticated client from the cache alone (offline.py), if
        the cache is on, a rule has stale_if_error (else the client is refused as before) and a login like this one
        was seen before (its ParameterStatus values are replayed)."""
        remembered = self.server.auth.logins.recall(startup)
        service = self.server.cache
        stale_rules = any(rule.stale_if_error for rule in self.server.config.rules)
        if service is None or remembered is None or not stale_rules:
            return False
        log.warning("session %d: %s; serving it from the cache only (stale_if_error)", self.id, exc.message)
        self.parameters.update(remembered)
        self.process_id, self.secret_key = self.server.issue_key(self, 0)
        self._client_writer.write(AUTHENTICATION_OK + offline_startup(remembered, self.process_id, self.secret_key))
        self._offline = OfflineRelay(
            self._client_reader, self._client_writer, service, self.transaction, database=self.database,
            user=self.user, max_message_size=self.server.config.limits.max_message_size,
            admin_command=self.admin_command,
        )  # fmt: skip
        return True

    async def _relay_auth_reply(self) -> None:
        """Forward the client's one reply (password, SASL or GSS response) to an authentication request."""
        assert self._up_writer is not None
        await self._client_writer.drain()
        msg_type, body = await read_message(self._client_reader, MAX_STARTUP_MESSAGE)
        if msg_type != m.PASSWORD:
            raise ProtocolViolation(f"expected an authentication response, got message type {chr(msg_type)!r}")
        self._up_writer.write(encode(b"p", body))

    async def _finish_startup(self, up_reader: asyncio.StreamReader, pending: bytearray) -> None:
        """After AuthenticationOk: relay ParameterStatus and notices, swap in our BackendKeyData, up to 'Z'.

        `pending` holds what the client has not been sent yet (AuthenticationOk at least); all of it goes in one
        write with ReadyForQuery (or the ErrorResponse that ends the startup).
        """
        client = self._client_writer
        while True:
            msg_type, body = await read_upstream_message(up_reader)
            if msg_type == m.BACKEND_KEY_DATA:
                # The client cancels through us, so it gets our key; the upstream's stays here (see forward_cancel).
                self.upstream_key = m.decode_backend_key_data(body)
                self.process_id, self.secret_key = self.server.issue_key(self, self.upstream_key[0])
                pending += m.backend_key_data(self.process_id, self.secret_key)
                continue
            pending += encode(bytes((msg_type,)), body)
            if msg_type == m.PARAMETER_STATUS:
                name, value = m.decode_parameter_status(body)
                self.parameters[name] = value
            elif msg_type == m.READY_FOR_QUERY:
                self.transaction.on_ready(bytes(body[:1]))
                break
            elif msg_type == m.ERROR_RESPONSE:
                client.write(pending)
                raise SessionEnd("upstream refused: " + m.decode_error_fields(body).get("M", "error"))
        client.write(pending)
        await client.drain()

    # -- relay -----------------------------------------------------------------------------------------------

    async def _relay(self) -> str:
        """Hand both transports to Links and relay until one side ends; return why it ended."""
        assert self._up_reader is not None and self._up_writer is not None
        loop = asyncio.get_running_loop()
        self._relay_end = loop.create_future()
        # Bytes the streams read ahead of the protocol swap would be lost with them: relay them first.
        client_early = drain_stream_buffer(self._client_reader)
        upstream_early = drain_stream_buffer(self._up_reader)
        # uvloop's transports implement asyncio.Transport without subclassing it.
        client_transport = cast(asyncio.Transport, self._client_writer.transport)
        up_transport = cast(asyncio.Transport, self._up_writer.transport)
        self._client_link = Link.take_over(client_transport, self._on_client_data, self._on_client_closed)
        self._up_link = Link.take_over(up_transport, self._on_upstream_data, self._on_upstream_closed)
        self._client_link.peer, self._up_link.peer = up_transport, client_transport
        self._client_link.pause_self = True
        self._client_link.on_drained = self._on_client_drained
        service = self.server.cache
        if service is not None and "replication" not in self.startup_parameters:
            self._caching = CachingRelay(
                self, service, self.server.config.limits, up_transport.write, client_transport.write
            )
        hosts = self.server.failover
        if self._caching is not None and hosts is not None and hosts.settings.wait > 0:
            self._survival = Survival(self, hosts)
        client_transport.resume_reading()  # a StreamReader may have paused it on a full buffer
        up_transport.resume_reading()
        if upstream_early:
            self._on_upstream_data(upstream_early)
        if client_early:
            self._on_client_data(client_early)
        if self._close_requested:  # shutdown began while we were authenticating
            self.request_close(self._close_requested)
        try:
            return await self._relay_end
        finally:
            self._cancel_idle_timer()

    def _end_relay(self, outcome: str | BaseException) -> None:
        """The one place the relay ends: the first outcome wins, later ones (the other side closing) are moot."""
        if self._relay_end is None or self._relay_end.done():
            return
        if isinstance(outcome, BaseException):
            self._relay_end.set_exception(outcome)
        else:
            self._relay_end.set_result(outcome)

    def _on_client_data(self, data: bytes) -> None:
        """Client -> upstream. Counts request cycles so that `idle` is known without parsing results."""
        if self._idle_timer is not None:
            self._cancel_idle_timer()
        if self._survival is not None and self._survival.lost_transaction is not None:
            rest = self._survival.client_data(data)  # its transaction was lost in a failover: tell it first
            if rest is None:
                return
            data = rest
        if self._caching is not None:
            self._guarded(self._caching.on_client_data, data)
            if self._caching.terminated:
                self._client_terminated = True
                self._end_relay("client sent Terminate")
            return
        plain = self._plain
        try:
            region, frames = plain.client_framer.feed(data)
        except ProtocolViolation as exc:
            self._end_relay(exc)
            return
        if frames and frames[0][0] == m.QUERY and self._answer_admin_command(region, frames):
            return
        invalid = plain.count_client(frames)
        if invalid >= 0:
            self._end_relay(ProtocolViolation(f"invalid frontend message type {invalid}"))
            return
        if region:
            self._up_writer_transport().write(region)
        if plain.terminated:
            self._client_terminated = True
            self._end_relay("client sent Terminate")

    def _on_upstream_data(self, data: bytes) -> None:
        """Upstream -> client. Tracks ReadyForQuery (transaction status), ParameterStatus and FATAL errors."""
        if data[-1] == 0 and self._survival is not None:
            data = self._survival.withhold(data)  # a server going down: told only if the session cannot re-attach
            if not data:
                return
        if self._caching is not None:
            self._guarded(self._caching.on_upstream_data, data)
            self._after_upstream_data()
            return
        plain = self._plain
        region = plain.from_upstream(data)
        if plain.fatal:
            self._upstream_fatal = True
        self._client_writer.transport.write(region)
        self._after_upstream_data()

    def _after_upstream_data(self) -> None:
        if self._close_requested is None and self._idle_timeout is None:
            return  # (the common case: nothing waits for the session to become idle)
        if self.idle:
            if self._close_requested:
                self._end_relay(ProxyError(ADMIN_SHUTDOWN, "terminating connection: " + self._close_requested))
            elif self._idle_timeout is not None:
                self._arm_idle_timer()

    def explain(self, sql: bytes) -> list[tuple[str, str]]:
        if self._caching is None:
            return [("cacheable", "no"), ("reason", "the cache is disabled (cache.enabled: false)")]
        return self._caching.explain(sql)

    def acknowledge_after(self, task: asyncio.Task[Any]) -> None:
        if self._caching is not None:  # (without the cache there is no shared tier to wait for)
            self._caching.inflight.acknowledge_after(task)

    def _answer_admin_command(self, region: bytes, frames: list[tuple[int, int, int]]) -> bool:
        """Without the cache the relay reads no queries, but the admin console must still answer: a lone Query
        starting with CACHEPROXY, with nothing in flight, is answered here."""
        if len(frames) != 1 or frames[0][0] != m.QUERY or self._plain.in_flight or self._plain.open_batch:
            return False
        sql = region[HEADER_SIZE:-1]
        if not is_admin_command(sql):
            return False
        self._client_writer.transport.write(self.admin_command(sql) + self.transaction.status.ready)
        return True

    def admin_command(self, sql: bytes) -> bytes:
        """Run a CACHEPROXY command for this session: its replies, without ReadyForQuery."""
        return self.server.admin_console.execute(self, sql.decode("utf-8", "replace"))

    # -- services for the caching relay (interfaces.RelayHost) -----------------------------------------------

    def note_parameter(self, body: bytes) -> None:
        name, value = m.decode_parameter_status(body)
        self.parameters[name] = value

    def note_error(self, body: bytes) -> None:
        severity = m.decode_error_fields(body).get("V", "")
        self._upstream_fatal = self._upstream_fatal or severity in FATAL_SEVERITIES

    def client_backlogged(self) -> bool:
        """The client has more than `_CLIENT_BACKLOG` bytes of answers it has not read yet."""
        return self._client_writer.transport.get_write_buffer_size() > _CLIENT_BACKLOG

    def _on_client_drained(self) -> None:
        """The client read its backlog: let the caching relay answer what it held back. Deferred, because a
        transport may report the drain from inside a write the relay itself is making."""
        caching = self._caching
        if caching is not None and caching.busy:
            asyncio.get_running_loop().call_soon(self.run_guarded, lambda: caching.on_client_data(b""))

    def pause_client(self) -> None:
        self._client_writer.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_client(self) -> None:
        if self._survival is not None and self._survival.running:
            return  # re-attaching: the client is resumed once the new upstream is ready
        if not self._client_writer.transport.is_closing():
            self._client_writer.transport.resume_reading()  # type: ignore[attr-defined]

    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def run_guarded(self, fn: Callable[[], None]) -> None:
        """Run relay work that resumes outside a transport callback (after a wait), with the same guards."""
        if self._relay_end is None or self._relay_end.done():
            return
        self._guarded(lambda _: fn(), b"")
        if self._caching is not None and self._caching.terminated:
            self._client_terminated = True
            self._end_relay("client sent Terminate")
            return
        self._after_upstream_data()

    def _guarded(self, fn: Callable[[bytes], None], data: bytes) -> None:
        """Run relay code from a transport callback: its errors end this session (never the event loop)."""
        try:
            fn(data)
        except ProxyError as exc:
            self._end_relay(exc)
        except Exception as exc:
            if isinstance(exc, RuntimeError) and self._client_writer.transport.is_closing():
                # uvloop refuses a write to a transport it has closed (asyncio's own loop ignores it): the client
                # went away in this same loop iteration, before its connection_lost was delivered. Not our error.
                log.debug("session %d: the client's connection closed under a write: %s", self.id, exc)
                self._end_relay("client disconnected")
                return
            log.exception("session %d: internal error in the caching relay", self.id)
            self._end_relay(ProxyError(INTERNAL_ERROR, f"cacheproxy internal error: {exc.__class__.__name__}"))

    def _on_client_closed(self, exc: Exception | None) -> None:
        self._end_relay("client disconnected" if exc else "client closed the connection")

    def _on_upstream_closed(self, exc: Exception | None) -> None:
        survival = self._survival
        if (
            survival is not None
            and self.relaying
            and not self._upstream_fatal  # the client was already told the session ends (57P05, 25P03...)
            and not self._client_terminated
            and not self._close_requested
        ):
            why = survival.lost(f"session {self.id} lost its connection")
            if why is None:
                self._up_link.detach()
                self.spawn(survival.run())
                return
            log.info("session %d: cannot re-attach to a new upstream: %s", self.id, why)
            if survival.withheld is not None:
                self._client_writer.transport.write(survival.withheld)
                self._upstream_fatal = True
        if self._upstream_fatal:
            self._end_relay(SessionEnd("upstream closed the connection after a FATAL error"))
        else:
            self._end_relay(connection_lost_error())

    # -- failover (proxy/reattach.SurvivingSession) ------------------------------------------------------------

    @property
    def relaying(self) -> bool:
        """The relay has not ended (a client gone, a close decided)."""
        return self._relay_end is not None and not self._relay_end.done()

    def relay_state(self) -> RelayState | None:
        return relay_state(self._caching) if self._caching is not None else None

    def write_client(self, data: bytes) -> None:
        if not self._client_writer.transport.is_closing():
            self._client_writer.transport.write(data)

    def feed_client(self, data: bytes) -> None:
        """Client bytes the old relay held, dispatched as if they had just arrived."""
        if data and self._relay_end is not None and not self._relay_end.done():
            self._on_client_data(data)

    def adopt_upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """Relay through a new upstream connection (logged in, state replayed) with a new caching relay; returns
        the client's bytes the old relay held (to feed once the client was told what it lost)."""
        assert self._caching is not None and self.server.cache is not None
        metrics = self.server.metrics
        metrics.upstream_closed()
        metrics.upstream_opened()
        self._up_reader, self._up_writer = reader, writer
        self._upstream_fatal = False
        early = drain_stream_buffer(reader)
        up_transport = cast(asyncio.Transport, writer.transport)
        client_transport = cast(asyncio.Transport, self._client_writer.transport)
        self._up_link = Link.take_over(up_transport, self._on_upstream_data, self._on_upstream_closed)
        self._up_link.peer = client_transport
        self._client_link.peer = up_transport
        old = self._caching
        self._caching = CachingRelay(
            self, self.server.cache, self.server.config.limits, up_transport.write, client_transport.write
        )
        unsent = successor(old, self._caching)
        up_transport.resume_reading()
        if early:
            self._on_upstream_data(early)
        return unsent

    def fail(self, error: ProxyError) -> None:
        self._end_relay(error)

    def end(self, reason: str) -> None:
        self._end_relay(SessionEnd(reason))

    def _up_writer_transport(self) -> asyncio.WriteTransport:
        assert self._up_writer is not None
        return self._up_writer.transport

    def _arm_idle_timer(self) -> None:
        assert self._idle_timeout is not None
        self._cancel_idle_timer()
        self._idle_timer = asyncio.get_running_loop().call_later(self._idle_timeout, self._on_idle_timeout)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _on_idle_timeout(self) -> None:
        self._idle_timer = None
        if self.idle:
            self._end_relay(ProxyError(IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout"))


def _error_message(exc: ProxyError) -> bytes:
    return m.error_response(exc.severity, exc.sqlstate, exc.message, detail=exc.detail)


def _discard_unused(opening: asyncio.Future[UpstreamStart]) -> None:
    """An upstream connection opened for a session that ended before using it (its client failed to authenticate,
    or left) is closed, whether it is still being opened or already open."""

    def close(done: asyncio.Future[UpstreamStart]) -> None:
        if not done.cancelled() and done.exception() is None:  # (.exception() also marks a failure as seen)
            done.result()[1].close()

    if not opening.done():
        opening.cancel()
    opening.add_done_callback(close)
