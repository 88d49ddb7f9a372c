"""The admin HTTP endpoint: /metrics, /healthz, /readyz, /stats (and the routes added, such as the status page's
`/` and `/status.json`) over a minimal HTTP/1.1 server.

Deliberately small: one request per connection (every response says `Connection: close`), GET and HEAD only, no
request body read, the request line and headers limited to 8 KiB and to `read_timeout` seconds. The parser
(`parse_request`) is sans-IO; `AdminServer` only reads bytes, dispatches and writes one response. Nothing a peer
sends can raise out of a connection handler: a malformed request gets a 4xx, a handler bug a 500 (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from cacheproxy.observability.metrics import Metrics

log = logging.getLogger(__name__)

MAX_HEAD = 8192
READ_TIMEOUT = 5.0
# How long a response may take to reach a slow reader, and ready() to answer, before the connection is dropped.
WRITE_TIMEOUT = 5.0
READY_TIMEOUT = 5.0

_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_ALLOWED_METHODS = frozenset({"GET", "HEAD"})
# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9112 section 3: request-line = method SP request-target SP HTTP-version.
_REQUEST_LINE = re.compile(rf"({_TOKEN.pattern}) (\S+) HTTP/1\.[01]")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str


@dataclass(frozen=True, slots=True)
class BadRequest:
    """The peer sent something we will not serve: answer `status` and close."""

    status: int
    why: str


def find_head_end(buffer: bytes | bytearray) -> int:
    """The length of the request head (through its blank line) in `buffer`, or -1 if it is not complete yet.

    Bare LF line endings are accepted as well as CRLF (RFC 9112 section 2.2)."""
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 4
    return lf + 2 if lf >= 0 else -1


def parse_request(head: bytes) -> Request | BadRequest:
    """Parse a complete request head (request line and header fields). Never raises.

    >>> parse_request(b"GET /metrics?x=1 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
    Request(method='GET', path='/metrics')
    >>> parse_request(b"\\x16\\x03\\x01garbage\\r\\n\\r\\n").status
    400
    """
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        return BadRequest(400, "malformed request line")
    method, target = match.group(1), match.group(2)
    if not target.startswith("/"):
        # Only origin-form: absolute-form is for proxies, authority-form for CONNECT, asterisk-form for OPTIONS.
        return BadRequest(400, "request target is not a path")
    for line in lines[1:]:
        if not line:
            continue
        name, colon, _value = line.partition(":")
        if not colon or _TOKEN.fullmatch(name) is None:
            return BadRequest(400, "malformed header field")
    return Request(method, target.partition("?")[0])


def build_response(status: int, body: bytes, content_type: str, *, head_only: bool = False) -> bytes:
    """One complete HTTP/1.1 response that closes the connection; `head_only` omits the body (HEAD)."""
    extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
    header = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return header if head_only else header + body


class AdminServer:
    """Serves the admin routes on host:port (port 0: an ephemeral port, see `port`)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Metrics,
        ready: Callable[[], Awaitable[tuple[bool, str]]],
        stats: Callable[[], dict[str, object]],
        read_timeout: float = READ_TIMEOUT,
        advice: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._ready = ready
        self._stats = stats
        self._read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._routes: dict[str, Callable[[], Awaitable[tuple[int, bytes, str]]]] = {
            "/metrics": self._metrics_route,
            "/healthz": self._healthz_route,
            "/readyz": self._readyz_route,
            "/stats": self._stats_route,
        }
        if advice is not None:  # the rule advisor's advice as JSON (cacheproxy/advice)
            self._routes["/advice"] = lambda: _json_route(advice)

    def add_routes(self, routes: dict[str, Callable[[], Awaitable[tuple[int, bytes, str]]]]) -> None:
        """More routes (the status page's: observability/status.py); each returns (status, body, content type)."""
        self._routes.update(routes)

    @property
    def port(self) -> int:
        """The bound port once started (the first listening socket's, if the host resolved to several)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, self._host, self._port, limit=MAX_HEAD)
        log.info("admin HTTP listening on %s:%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop listening, then drop the connections still being served."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # -- one connection ----------------------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        started = time.monotonic()
        peer = writer.get_extra_info("peername")
        try:
            await self._serve(reader, writer, peer, started)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("admin HTTP %s: connection dropped: %r", peer, exc)
        except Exception:
            log.exception("admin HTTP %s: unexpected error", peer)
        finally:
            writer.close()
            # wait_closed() re-raises the transport's error (a reset peer): nothing left to do about it.
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object, started: float
    ) -> None:
        try:
            async with asyncio.timeout(self._read_timeout):
                head = await _read_head(reader)
        except TimeoutError:
            head = BadRequest(408, "read timeout")
        if head is None:
            log.debug("admin HTTP %s: closed before sending a request", peer)
            return
        request = parse_request(head) if isinstance(head, bytes) else head
        if isinstance(request, BadRequest):
            response = build_response(request.status, f"{request.why}\n".encode(), _TEXT)
            method, path, status = "-", "-", request.status
        else:
            method, path = request.method, request.path
            status, response = await self._respond(request)
        writer.write(response)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
        log.debug(
            "admin HTTP %s %s %s -> %d (%.1f ms)", peer, method, path, status, (time.monotonic() - started) * 1000
        )

    async def _respond(self, request: Request) -> tuple[int, bytes]:
        route = self._routes.get(request.path)
        if route is None:
            status, body, content_type = 404, b"not found\n", _TEXT
        elif request.method not in _ALLOWED_METHODS:
            status, body, content_type = 405, b"method not allowed\n", _TEXT
        else:
            try:
                status, body, content_type = await route()
            except Exception:
                log.exception("admin HTTP %s failed", request.path)
                status, body, content_type = 500, b"internal error\n", _TEXT
        return status, build_response(status, body, content_type, head_only=request.method == "HEAD")

    # -- routes: each returns (status, body, content type) ------------------------------------------------------

    async def _metrics_route(self) -> tuple[int, bytes, str]:
        body, content_type = self._metrics.render()
        return 200, body, content_type

    async def _healthz_route(self) -> tuple[int, bytes, str]:
        return 200, b"ok\n", _TEXT

    async def _readyz_route(self) -> tuple[int, bytes, str]:
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                ok, text = await self._ready()
        except TimeoutError:
            ok, text = False, "readiness check timed out"
        return (200 if ok else 503), f"{text}\n".encode(), _TEXT

    async def _stats_route(self) -> tuple[int, bytes, str]:
        return 200, orjson.dumps(self._stats()), _JSON


async def _json_route(source: Callable[[], dict[str, object]]) -> tuple[int, bytes, str]:
    return 200, orjson.dumps(source()), _JSON


async def _read_head(reader: asyncio.StreamReader) -> bytes | BadRequest | None:
    """The request head, a 431 if it grows past MAX_HEAD, or None if the peer closed before completing one."""
    buffer = bytearray()
    while True:
        end = find_head_end(buffer)
        if end >= 0:
            return bytes(buffer[:end]) if end <= MAX_HEAD else BadRequest(431, "request head too large")
        if len(buffer) > MAX_HEAD:
            return BadRequest(431, "request head too large")
        chunk = await reader.read(4096)
        if not chunk:
            return None
        buffer += chunk
