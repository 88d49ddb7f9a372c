"""The proxy's own raw-protocol upstream connections: login, request/reply as exact wire bytes, CopyBoth streams.

asyncpg hides the wire; write-through refreshes need the exact reply bytes of a query (they are what the cache
stores), and logical replication needs the CopyBoth stream of START_REPLICATION. Both use a `RawConnection`:

    conn = await connect_raw(cfg, "app", purpose="refresh")
    reply = await conn.request(query_bytes)      # every backend byte up to and including ReadyForQuery
    conn.close(); await conn.wait_closed()        # or: async with await connect_raw(...) as conn

The connection is opened by `open_upstream` (same sslmode handling as client sessions), logs in with
`cacheproxy.protocol.client_auth` (trust, cleartext, MD5, SCRAM-SHA-256), and is identified in pg_stat_activity as
application_name ``cacheproxy-<purpose>``. Failures are `UpstreamError`s with the server's message and SQLSTATE
when the server sent one; no message ever holds the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
from collections import deque
from types import TracebackType

from cacheproxy.config import UpstreamConfig
from cacheproxy.errors import CONNECTION_FAILURE, PROTOCOL_VIOLATION, ProtocolViolation, UpstreamError
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.client_auth import ClientAuth
from cacheproxy.protocol.framing import HEADER_SIZE, Frame, Framer, encode, split_messages
from cacheproxy.protocol.startup import encode_startup
from cacheproxy.upstream import READ_LIMIT, open_upstream

log = logging.getLogger("cacheproxy.raw_client")

# PostgreSQL never sends a message over 1 GiB (a DataRow is bounded by MaxAllocSize).
_MAX_BACKEND_MESSAGE = 1 << 30

_COPY_IN_RESPONSE = ord("G")
_COPY_BOTH_RESPONSE = ord("W")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
_FATAL_SEVERITIES = ("FATAL", "PANIC")

# Sent when a request turns out to be a COPY FROM STDIN: the raw client has no data to give, and failing the COPY
# keeps the connection in step (the server answers ErrorResponse, then ReadyForQuery).
_COPY_FAIL = encode(b"f", b"COPY FROM STDIN is not supported by the cacheproxy raw client\x00")


async def connect_raw(
    cfg: UpstreamConfig,
    database: str,
    *,
    purpose: str,
    user: str | None = None,
    password: str | None = None,
    replication: bool = False,
    settings: dict[str, str] | None = None,
) -> RawConnection:
    """Open and log in a raw connection to `database`; returns once the server is ReadyForQuery.

    `user` defaults to the upstream URL's user (then to the OS user, as libpq does); `password` defaults to the
    URL's password when the user is the URL's user. `replication=True` asks for a logical replication connection
    (``replication=database``), which accepts the replication commands (IDENTIFY_SYSTEM, START_REPLICATION...).
    `settings` are extra startup parameters (client_encoding, options...). The whole login is bounded by
    `cfg.connect_timeout`.
    """
    login_user = user if user is not None else (cfg.user or getpass.getuser())
    if password is None and login_user == (cfg.user or login_user):
        password = cfg.password
    parameters = {"user": login_user, "database": database, "application_name": f"cacheproxy-{purpose}"}
    if replication:
        parameters["replication"] = "database"
    parameters.update(settings or {})
    reader, writer = await open_upstream(cfg)
    conn = RawConnection(reader, writer, purpose=purpose)
    try:
        await asyncio.wait_for(conn._login(parameters, ClientAuth(login_user, password)), timeout=cfg.connect_timeout)
    except TimeoutError as exc:
        conn.close()
        raise UpstreamError(
            f"upstream server {cfg.host}:{cfg.port}: login as {login_user!r} timed out after {cfg.connect_timeout:g}s"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


class RawConnection:
    """One logged-in upstream connection speaking the raw protocol; not shared between concurrent requests
    (a lock serializes `request()`).

    Reading goes through one `Framer`; whole messages read past the end of a reply (a ParameterStatus or notice
    that arrived after ReadyForQuery) are kept, unmodified, for the next read.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, purpose: str) -> None:
        self.reader = reader
        self.writer = writer
        self.purpose = purpose
        self.backend_pid = 0
        self.secret_key = b""
        self.parameters: dict[str, str] = {}
        #: the transaction status of the last ReadyForQuery: b"I" idle, b"T" in a transaction, b"E" failed one
        self.transaction_status = b"I"
        self._framer = Framer(_MAX_BACKEND_MESSAGE)
        # Whole messages read but not consumed yet: (type, region, start, end) into a region returned by the framer.
        self._pending: deque[tuple[int, bytes, int, int]] = deque()
        self._lock = asyncio.Lock()
        self._fatal: dict[str, str] | None = None
        self._closed = False

    # -- login ----------------------------------------------------------------------------------------------------

    async def _login(self, parameters: dict[str, str], auth: ClientAuth) -> None:
        self.writer.write(encode_startup(parameters))
        while True:
            msg_type, body = await self.next_message()
            if msg_type == m.AUTHENTICATION:
                reply = auth.receive(body)
                if reply:
                    self.writer.write(reply)
                    await self._drain()
            elif msg_type == m.ERROR_RESPONSE:
                raise _server_error(m.decode_error_fields(body))
            elif msg_type == m.BACKEND_KEY_DATA:
                self.backend_pid, self.secret_key = m.decode_backend_key_data(body)
            elif msg_type == m.READY_FOR_QUERY:
                if not auth.done:
                    raise UpstreamError(
                        "the server sent ReadyForQuery before AuthenticationOk", sqlstate=PROTOCOL_VIOLATION
                    )
                self.transaction_status = bytes(body[:1])
                return
            # ParameterStatus is recorded by next_message; NoticeResponse and NegotiateProtocolVersion (we ask for
            # 3.0, the version every server speaks) need nothing.

    # -- request / reply -------------------------------------------------------------------------------------------

    async def request(self, payload: bytes) -> bytes:
        """Send already-encoded frontend messages and return every backend byte of the reply, raw.

        The reply ends with the ReadyForQuery answering the payload's last Sync or Query (one per Sync/Query in the
        payload is awaited). A COPY FROM STDIN is failed (CopyFail) since there is no data to send. If the request
        is cancelled or fails midway, the connection is closed: its position in the reply stream is lost.
        """
        expected = sum(1 for t, _ in split_messages(payload) if t in (m.SYNC, m.QUERY))
        if expected == 0:
            raise ValueError("request() needs a payload that ends with a Sync or a Query")
        async with self._lock:
            self._check_open()
            try:
                self.writer.write(payload)
                await self._drain()
                return await self._read_reply(expected)
            except BaseException:
                self.close()
                raise

    async def _read_reply(self, expected: int) -> bytes:
        chunks: list[bytes] = []
        while True:
            if not self._pending:
                await self._read_more()
            region, first, last, remaining = self._take_reply_messages(expected)
            chunks.append(region[first:last])
            expected = remaining
            if expected == 0:
                return b"".join(chunks)

    def _take_reply_messages(self, expected: int) -> tuple[bytes, int, int, int]:
        """Consume pending messages of one region up to the `expected`-th ReadyForQuery (or the region's end);
        return (region, start, end, ReadyForQuerys still expected). Looks only at type bytes, except for the few
        messages that change connection state."""
        msg_type, region, first, last = self._pending.popleft()
        start = first
        while True:
            self._observe(msg_type, region, start, last)
            if msg_type == m.READY_FOR_QUERY:
                self.transaction_status = region[last - 1 : last]
                expected -= 1
                if expected == 0:
                    return region, first, last, 0
            if not self._pending or self._pending[0][1] is not region:
                return region, first, last, expected
            msg_type, _, start, last = self._pending.popleft()

    def _observe(self, msg_type: int, region: bytes, start: int, end: int) -> None:
        # Only the messages that change what this object knows, or need an answer, are decoded.
        if msg_type == m.PARAMETER_STATUS:
            name, value = m.decode_parameter_status(region[start + HEADER_SIZE : end])
            self.parameters[name] = value
        elif msg_type == _COPY_IN_RESPONSE:
            self.writer.write(_COPY_FAIL)
        elif msg_type == _COPY_BOTH_RESPONSE:
            raise UpstreamError("request() got CopyBothResponse: use start_copy_both()", sqlstate=PROTOCOL_VIOLATION)

    # -- CopyBoth (replication) ------------------------------------------------------------------------------------

    async def start_copy_both(self, query: bytes) -> None:
        """Send a Query (START_REPLICATION ...) and wait for CopyBothResponse; then read the stream with
        `next_message()` and answer with `send_copy_data()`. An ErrorResponse instead raises `UpstreamError`."""
        self._check_open()
        self.writer.write(query)
        await self._drain()
        while True:
            msg_type, body = await self.next_message()
            if msg_type == _COPY_BOTH_RESPONSE:
                return
            if msg_type == m.ERROR_RESPONSE:
                fields = m.decode_error_fields(body)
                await self._skip_to_ready()
                raise _server_error(fields)
            if msg_type == m.READY_FOR_QUERY:
                raise UpstreamError("the server did not start a CopyBoth stream", sqlstate=PROTOCOL_VIOLATION)

    async def send_copy_data(self, data: bytes) -> None:
        self._check_open()
        self.writer.write(encode(b"d", data))
        await self._drain()

    async def _skip_to_ready(self) -> None:
        while (await self.next_message())[0] != m.READY_FOR_QUERY:
            pass

    async def next_message(self) -> tuple[int, bytes]:
        """The next backend message as (type, body). ParameterStatus updates `parameters` on the way."""
        if not self._pending:
            await self._read_more()
        msg_type, region, start, end = self._pending.popleft()
        body = region[start + HEADER_SIZE : end]
        if msg_type == m.PARAMETER_STATUS:
            name, value = m.decode_parameter_status(body)
            self.parameters[name] = value
        return msg_type, body

    async def _read_more(self) -> None:
        """Read until at least one whole message is pending; a closed connection raises, with the server's FATAL
        message when it sent one before closing."""
        while not self._pending:
            try:
                data = await self.reader.read(READ_LIMIT)
            except OSError as exc:
                raise self._lost(str(exc)) from exc
            if not data:
                raise self._lost("the server closed the connection")
            try:
                region, frames = self._framer.feed(data)
            except ProtocolViolation as exc:
                raise UpstreamError(
                    f"invalid data from the upstream server: {exc.message}", sqlstate=PROTOCOL_VIOLATION
                ) from exc
            self._queue(region, frames)

    def _queue(self, region: bytes, frames: list[Frame]) -> None:
        for msg_type, start, end in frames:
            if msg_type == m.ERROR_RESPONSE:
                fields = m.decode_error_fields(region[start + HEADER_SIZE : end])
                if fields.get("V", fields.get("S")) in _FATAL_SEVERITIES:
                    self._fatal = fields
            self._pending.append((msg_type, region, start, end))

    def _lost(self, reason: str) -> UpstreamError:
        self.close()
        if self._fatal is not None:
            return _server_error(self._fatal)
        return UpstreamError(f"lost connection to the upstream server: {reason}", sqlstate=CONNECTION_FAILURE)

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except OSError as exc:
            raise self._lost(str(exc)) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise UpstreamError("the upstream connection is closed", sqlstate=CONNECTION_FAILURE)

    # -- lifetime -------------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Send Terminate (best effort) and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, RuntimeError):
            if not self.writer.is_closing():
                self.writer.write(m.terminate())
            self.writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> RawConnection:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        await self.wait_closed()


def _server_error(fields: dict[str, str]) -> UpstreamError:
    return UpstreamError(fields.get("M", "upstream server error"), sqlstate=fields.get("C", CONNECTION_FAILURE))
