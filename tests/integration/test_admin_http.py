"""The admin HTTP server over real sockets: every route with a raw client and with urllib, and hostile peers."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cacheproxy.cache.engine import CacheStats
from cacheproxy.observability.admin_http import AdminServer, BadRequest, Request, find_head_end, parse_request
from cacheproxy.observability.metrics import Metrics


@dataclass
class Readiness:
    ok: bool = True
    text: str = "ready"
    calls: int = 0
    error: Exception | None = None

    async def __call__(self) -> tuple[bool, str]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.ok, self.text


@dataclass
class Admin:
    server: AdminServer
    metrics: Metrics
    readiness: Readiness
    stats: dict[str, object] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.server.port


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    metrics = Metrics(stats=lambda: CacheStats(hits=5, misses=1, max_bytes=1 << 20))
    readiness = Readiness()
    holder: dict[str, object] = {}

    def stats() -> dict[str, object]:
        return {**metrics.snapshot(), **holder}

    server = AdminServer("127.0.0.1", 0, metrics=metrics, ready=readiness, stats=stats, read_timeout=1.0)
    await server.start()
    try:
        yield Admin(server, metrics, readiness, holder)
    finally:
        await server.stop()


async def exchange(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    """Send `data`, read until the server closes; returns what came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def parse_response(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(status), headers, body)


async def get(port: int, path: str, method: str = "GET") -> Response:
    raw = await exchange(port, f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n".encode())
    response = parse_response(raw)
    assert response.headers["connection"] == "close"
    if method != "HEAD":
        assert int(response.headers["content-length"]) == len(response.body)
    return response


def urlopen(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) via urllib, including error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read()


async def assert_serving(port: int) -> None:
    response = await get(port, "/healthz")
    assert (response.status, response.body) == (200, b"ok\n")


# -- the parser alone ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Request("GET", "/metrics")),
        (b"HEAD /stats?pretty=1 HTTP/1.0\r\n\r\n", Request("HEAD", "/stats")),
        (b"GET /healthz HTTP/1.1\nHost: x\n\n", Request("GET", "/healthz")),
        (b"DELETE /metrics HTTP/1.1\r\n\r\n", Request("DELETE", "/metrics")),
        (b"GET http://x/metrics HTTP/1.1\r\n\r\n", BadRequest(400, "request target is not a path")),
        (b"GET /metrics HTTP/2.0\r\n\r\n", BadRequest(400, "malformed request line")),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", BadRequest(400, "malformed request line")),
        (b"G\xffT / HTTP/1.1\r\n\r\n", BadRequest(400, "malformed request line")),
        (b"\r\n\r\n", BadRequest(400, "malformed request line")),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", BadRequest(400, "malformed header field")),
        (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", BadRequest(400, "malformed header field")),
    ],
)
def test_parse_request(head: bytes, expected: Request | BadRequest) -> None:
    assert parse_request(head) == expected


def test_find_head_end() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1
    assert find_head_end(b"GET / HTTP/1.1\r\n\r\nbody") == 18
    assert find_head_end(b"GET / HTTP/1.1\n\nbody") == 16


# -- routes --------------------------------------------------------------------------------------------------------


async def test_port_zero_is_ephemeral(admin: Admin) -> None:
    assert admin.port > 0


async def test_healthz(admin: Admin) -> None:
    response = await get(admin.port, "/healthz")
    assert response.status == 200
    assert response.body == b"ok\n"
    assert response.headers["content-type"].startswith("text/plain")


async def test_metrics(admin: Admin) -> None:
    admin.metrics.client_opened()
    admin.metrics.query("read", "hit", 0.0001)
    response = await get(admin.port, "/metrics?from=test")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.body.decode())
        for s in family.samples
    }
    assert samples[("cacheproxy_cache_hits_total", ())] == 5
    assert samples[("cacheproxy_client_connections", ())] == 1
    assert samples[("cacheproxy_queries_total", (("kind", "read"), ("outcome", "hit")))] == 1


async def test_stats(admin: Admin) -> None:
    admin.stats["extra"] = {"sessions": 3}
    response = await get(admin.port, "/stats")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    stats = orjson.loads(response.body)
    assert stats["cache"]["hits"] == 5
    assert stats["extra"] == {"sessions": 3}


async def test_readyz(admin: Admin) -> None:
    response = await get(admin.port, "/readyz")
    assert (response.status, response.body) == (200, b"ready\n")
    admin.readiness.ok, admin.readiness.text = False, "upstream unreachable"
    response = await get(admin.port, "/readyz")
    assert (response.status, response.body) == (503, b"upstream unreachable\n")
    assert admin.readiness.calls == 2


async def test_head_has_headers_only(admin: Admin) -> None:
    full = await get(admin.port, "/metrics")
    head = await get(admin.port, "/metrics", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert int(head.headers["content-length"]) == pytest.approx(len(full.body), abs=64)  # uptime moves


async def test_every_route_with_urllib(admin: Admin) -> None:
    base = f"http://127.0.0.1:{admin.port}"
    status, content_type, body = await asyncio.to_thread(urlopen, base + "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, content_type, body = await asyncio.to_thread(urlopen, base + "/metrics")
    assert status == 200
    assert b"cacheproxy_info{" in body
    status, content_type, body = await asyncio.to_thread(urlopen, base + "/stats")
    assert (status, content_type) == (200, "application/json")
    assert orjson.loads(body)["connections"]["clients"] == 0
    status, _, body = await asyncio.to_thread(urlopen, base + "/readyz")
    assert (status, body) == (200, b"ready\n")
    admin.readiness.ok = False
    status, _, body = await asyncio.to_thread(urlopen, base + "/readyz")
    assert (status, body) == (503, b"ready\n")
    status, _, _ = await asyncio.to_thread(urlopen, base + "/nope")
    assert status == 404


# -- errors --------------------------------------------------------------------------------------------------------


async def test_unknown_path_is_404(admin: Admin) -> None:
    assert (await get(admin.port, "/")).status == 404
    assert (await get(admin.port, "/metrics/extra")).status == 404


async def test_other_methods_are_405(admin: Admin) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        response = await get(admin.port, "/metrics", method=method)
        assert response.status == 405
        assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "data",
    [
        b"hello\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET http://127.0.0.1/metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n: no name\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"\x00" * 100 + b"\n\n",
    ],
)
async def test_garbage_is_400(admin: Admin, data: bytes) -> None:
    response = parse_response(await exchange(admin.port, data))
    assert response.status == 400
    await assert_serving(admin.port)


async def test_oversized_head_is_431(admin: Admin) -> None:
    data = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n"
    raw = await exchange(admin.port, data)
    assert parse_response(raw).status == 431
    await assert_serving(admin.port)


async def test_route_errors_are_500(admin: Admin) -> None:
    admin.readiness.error = RuntimeError("boom")
    assert (await get(admin.port, "/readyz")).status == 500
    admin.stats["bad"] = object()  # orjson cannot serialise it
    assert (await get(admin.port, "/stats")).status == 500
    await assert_serving(admin.port)


# -- hostile or broken peers ---------------------------------------------------------------------------------------


async def test_silent_client_that_disconnects(admin: Admin) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.close()
    await writer.wait_closed()
    assert await exchange(admin.port, b"", half_close=True) == b""
    await assert_serving(admin.port)


async def test_partial_request_then_disconnect(admin: Admin) -> None:
    assert await exchange(admin.port, b"GET /metrics HTTP/1.1\r\nHost: x", half_close=True) == b""
    await assert_serving(admin.port)


async def test_slow_client_gets_408(admin: Admin) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)  # the fixture's read_timeout is 1 s
    writer.close()
    assert parse_response(raw).status == 408
    await assert_serving(admin.port)


async def test_100k_of_garbage(admin: Admin) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    raw = b""
    try:
        writer.write(bytes(range(256)) * 400)  # 100 KiB, no blank line anywhere
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        pass  # the server may reset a connection it closed with unread data: that is fine
    finally:
        writer.close()
    if raw:
        assert parse_response(raw).status in (400, 431)
    await assert_serving(admin.port)


async def test_many_concurrent_clients(admin: Admin) -> None:
    responses = await asyncio.gather(*(get(admin.port, "/healthz") for _ in range(50)))
    assert {r.status for r in responses} == {200}


async def test_stop_drops_idle_connections() -> None:
    server = AdminServer("127.0.0.1", 0, metrics=Metrics(), ready=Readiness(), stats=dict, read_timeout=30.0)
    await server.start()
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")  # incomplete: the server is waiting for more
    await writer.drain()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.stop(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await server.stop()  # idempotent
