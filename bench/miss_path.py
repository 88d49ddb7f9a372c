"""The miss and write paths of the caching relay, measured without sockets: `python3 -m bench.miss_path`.

A companion to bench/hit_path.py (same fake session): each request is sent by the client, forwarded (the bytes to the
server are counted, not sent), and answered by canned server replies fed back as the server would send them. For a
simple Query and a prepared Bind/Execute/Sync that miss (a new key each time: the fill is stored), and for a
prepared UPDATE (an invalidation, published on the bus when it commits). It prints the best time per request and
the function calls per request (cProfile: deterministic, unlike times on a shared machine); `--profile` also prints
the top functions by calls. `--requests N` runs N requests of each kind once, nothing else: for instruction counts,
`valgrind --tool=callgrind python3 -m bench.miss_path --requests N` for two values of N, the difference divided.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from struct import pack

from bench.hit_path import _relay
from cacheproxy.protocol.framing import encode
from cacheproxy.proxy.caching import CachingRelay

_ROUNDS, _REQUESTS = 5, 5_000
_XSQL = b"SELECT a FROM t WHERE id = $1"
_WSQL = b"UPDATE t SET a = a + 1 WHERE id = $1"
_ROW_DESCRIPTION = encode(b"T", pack("!H", 1) + b"a\x00" + pack("!IHIhiH", 0, 0, 23, 4, -1, 0))
_READ_REPLY = _ROW_DESCRIPTION + encode(b"D", pack("!Hi", 1, 1) + b"1") + encode(b"C", b"SELECT 1\x00")
_READY = encode(b"Z", b"I")


def _bind(statement: bytes, argument: int) -> bytes:
    text = str(argument).encode()
    return encode(b"B", b"\x00" + statement + b"\x00" + pack("!HHi", 0, 1, len(text)) + text + pack("!H", 0))


def _execute() -> bytes:
    """libpq's PQexecPrepared (pgbench -M prepared): Describe of the portal, Execute, Sync."""
    return encode(b"D", b"P\x00") + encode(b"E", b"\x00" + pack("!i", 0)) + encode(b"S")


def _scenarios() -> dict[str, tuple[bytes, Callable[[int], bytes], bytes]]:
    """name -> (set-up request and its reply, per-request bytes from the client, the server's reply)."""
    parse_read = encode(b"P", b"r\x00" + _XSQL + b"\x00" + pack("!H", 0))
    parse_write = encode(b"P", b"w\x00" + _WSQL + b"\x00" + pack("!H", 0))
    return {
        "simple": (
            b"",
            lambda n: encode(b"Q", b"SELECT a FROM t WHERE id = " + str(n).encode() + b"\x00"),
            _READ_REPLY + _READY,
        ),
        "prepared": (
            parse_read + encode(b"S"),
            lambda n: _bind(b"r", n) + _execute(),
            encode(b"2") + _READ_REPLY + _READY,
        ),
        "write": (
            parse_write + encode(b"S"),
            lambda n: _bind(b"w", n) + _execute(),
            encode(b"2") + encode(b"n") + encode(b"C", b"UPDATE 1\x00") + _READY,
        ),
    }


class _Driver:
    """Sends requests that miss through a relay and feeds back the server's replies."""

    def __init__(self, relay: CachingRelay, written: list[int]) -> None:
        self.relay, self.written, self.counter = relay, written, 1_000_000

    def run(self, n: int, request: Callable[[int], bytes], reply: bytes) -> None:
        relay, written = self.relay, self.written
        for _ in range(n):
            self.counter += 1
            before = written[1]
            relay.on_client_data(request(self.counter))
            assert written[1] > before, "not forwarded: a hit?"
            relay.on_upstream_data(reply)


async def main(argv: list[str]) -> None:
    relay, written = await _relay()
    driver = _Driver(relay, written)
    for name, (setup, request, reply) in _scenarios().items():
        if "--kind" in argv and argv[argv.index("--kind") + 1] != name:
            continue
        if setup:
            relay.on_client_data(setup)
            relay.on_upstream_data(encode(b"1") + _READY)
        driver.run(100, request, reply)
        if "--requests" in argv:
            driver.run(int(argv[argv.index("--requests") + 1]), request, reply)
            continue
        best = float("inf")
        for _ in range(_ROUNDS):
            started = time.perf_counter()
            driver.run(_REQUESTS, request, reply)
            best = min(best, (time.perf_counter() - started) / _REQUESTS)
        profile = cProfile.Profile()
        profile.enable()
        driver.run(1000, request, reply)
        profile.disable()
        stats = pstats.Stats(profile)
        calls = stats.total_calls / 1000  # type: ignore[attr-defined]
        assert not relay.busy, "replies left pending"
        print(f"{name:9} {best * 1e6:6.2f} µs/request  {calls:5.1f} calls/request")
        if "--profile" in argv:
            stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
