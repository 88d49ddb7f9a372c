"""The cache-hit path of the caching relay, measured without sockets: `python3 -m bench.hit_path`.

A CachingRelay is driven in-process by a fake session (no transports, no PostgreSQL: a catalog is put in place), for
a simple Query, the hot extended batch (Parse, Bind, Describe, Execute, Sync) and a prepared execution (Bind,
Describe, Execute, Sync) that hit. It prints the best time per hit over several rounds, and the function calls per
hit (cProfile: deterministic, unlike times on a shared machine); `--requests N` runs N hits of each kind and nothing
else, for callgrind. A companion to `python3 -m bench` (the whole proxy over TCP), for comparing code before and
after."""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from struct import pack

from cacheproxy.cache import keys
from cacheproxy.catalog.model import Catalog, Relation
from cacheproxy.config import build_config
from cacheproxy.protocol.framing import encode
from cacheproxy.protocol.statements import Statement
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.caching import CachingRelay
from cacheproxy.proxy.listens import Listens
from cacheproxy.proxy.transaction import TransactionTracker

_ROUNDS, _HITS = 7, 20_000
_SQL = b"SELECT a FROM t WHERE id = 1"
_XSQL = b"SELECT a FROM t WHERE id = $1"
_ARGUMENTS = pack("!HHi", 0, 1, 1) + b"7" + pack("!H", 0)
_RESULT = (
    encode(b"T", pack("!H", 1) + b"a\x00" + pack("!IHIhiH", 0, 0, 23, 4, -1, 0))
    + encode(b"D", pack("!Hi", 1, 1) + b"1")
    + encode(b"C", b"SELECT 1\x00")
)
REQUESTS = {
    "simple": encode(b"Q", _SQL + b"\x00"),
    "extended": encode(b"P", b"\x00" + _XSQL + b"\x00" + pack("!H", 0))
    + encode(b"B", b"\x00\x00" + _ARGUMENTS)
    + encode(b"D", b"P\x00")
    + encode(b"E", b"\x00" + pack("!i", 0))
    + encode(b"S"),
    # libpq's PQexecPrepared of a statement prepared before (pgbench -M prepared): no Parse.
    "prepared": encode(b"B", b"\x00p\x00" + _ARGUMENTS)
    + encode(b"D", b"P\x00")
    + encode(b"E", b"\x00" + pack("!i", 0))
    + encode(b"S"),
}


class _Session:
    """The RelayHost of a session whose client always reads its answers."""

    id = 1
    database = "db"
    user = "u"

    def __init__(self) -> None:
        self.startup_parameters: Mapping[str, str] = {"user": "u", "database": "db"}
        self.parameters: dict[str, str] = {"TimeZone": "UTC"}
        self.transaction = TransactionTracker(1, self.startup_parameters, self.parameters)
        self.listens = Listens()

    def note_parameter(self, body: bytes) -> None: ...
    def note_error(self, body: bytes) -> None: ...
    def admin_command(self, sql: bytes) -> bytes:
        return b""

    def client_backlogged(self) -> bool:
        return False

    def pause_client(self) -> None: ...
    def resume_client(self) -> None: ...
    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        coro.close()

    def run_guarded(self, fn: Callable[[], None]) -> None:
        fn()


async def _relay() -> tuple[CachingRelay, list[int]]:
    config = build_config({"listen": "127.0.0.1:0", "upstream": "postgresql://u@127.0.0.1:1/db",
                           "admin": {"listen": None}, "invalidation": {"bus": False}})  # fmt: skip
    service = CacheService(config)
    service.catalogs.install("db", Catalog.build("db", 1, [Relation("public", "t", "r", False)], [], [], []))
    written = [0, 0]  # bytes to the client, to the server

    def to_client(data: bytes) -> None:
        written[0] += len(data)

    def to_server(data: bytes) -> None:
        written[1] += len(data)

    relay = CachingRelay(_Session(), service, config.limits, to_server, to_client)
    state, now, tables = relay.tx.state_digest(), service.clock(), frozenset({("db", "t")})
    service.engine.put(keys.query_key("db", "u", state, _SQL), _RESULT, tables=tables, ttl=3600, now=now)
    key = keys.execute_key("db", "u", state, _XSQL, (), _ARGUMENTS, 0)
    service.engine.put(key, _RESULT, tables=tables, ttl=3600, now=now)
    relay.registry.statements["p"] = Statement(_XSQL, (), upstream=True)
    return relay, written


async def main(argv: list[str]) -> None:
    relay, written = await _relay()
    for name, request in REQUESTS.items():
        if "--kind" in argv and argv[argv.index("--kind") + 1] != name:
            continue
        relay.on_client_data(request)
        if "--requests" in argv:  # only N hits, for instruction counts (see bench/miss_path.py)
            for _ in range(int(argv[argv.index("--requests") + 1])):
                relay.on_client_data(request)
            continue
        best = float("inf")
        for _ in range(_ROUNDS):
            started = time.perf_counter()
            for _ in range(_HITS):
                relay.on_client_data(request)
            best = min(best, (time.perf_counter() - started) / _HITS)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(1000):
            relay.on_client_data(request)
        profile.disable()
        calls = pstats.Stats(profile).total_calls / 1000  # type: ignore[attr-defined]
        assert written[1] == 0, "a request went upstream: not a hit"
        print(f"{name:9} {best * 1e6:6.2f} µs/hit  {calls:5.1f} calls/hit")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
