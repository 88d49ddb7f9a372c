"""What one request costs the proxy in Python, counted without sockets or timers: `python3 -m bench.cost`.

For each protocol mode (simple Query; extended: Parse/Bind/Describe/Execute/Sync of the unnamed statement; prepared:
Bind/Describe/Execute/Sync of a named statement, as `pgbench -M` sends them) and each kind of request:

- hit: a cached read answered by the caching relay;
- miss: a cacheable read of a new key each time, forwarded, its result captured and stored;
- write: an UPDATE of one row by its primary key in autocommit (invalidation before and after, the commit's
  bookkeeping and the bus's publish queue);
- pass: the same read through a session with the cache off (the plain relay).

The relay is driven in-process (a fake session, a catalog put in place with `t.id` as its primary key, as
pgbench_accounts has; canned server replies fed back as the server would send them). It prints the Python function
calls per request (cProfile; deterministic, independent of the machine's load). `--instructions` runs the same
requests under `valgrind --tool=callgrind` and prints CPU instructions per request instead (stable to about 1%,
with a fixed hash seed; about a minute): each measured run is bracketed by `os.getppid()` calls, before which
callgrind dumps its counters (`--dump-before`), so that start-up and warm-up are left out. `--profile MODE KIND`
prints the top functions of one by cProfile (interpreted code only); `--top MODE KIND` by callgrind: the functions
with the most CPU instructions per request, inclusive (compiled and interpreted, CPython's own C functions too).
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from struct import pack
from typing import Any

from bench.hit_path import _Session as _Host  # (the same stand-in session as the hit-path benchmark)
from cacheproxy.catalog.model import Catalog, Relation
from cacheproxy.config import build_config
from cacheproxy.protocol.framing import encode
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.caching import CachingRelay
from cacheproxy.proxy.session import Session

MODES = ("simple", "extended", "prepared")
KINDS = ("hit", "miss", "write", "pass")
_WARMUP, _REQUESTS = 200, 1000
_READ = "SELECT a FROM t WHERE id = "
_WRITE = "UPDATE t SET a = a + 1 WHERE id = "
_FIRST_KEY = 1_000_000
_ROW_DESCRIPTION = encode(b"T", pack("!H", 1) + b"a\x00" + pack("!IHIhiH", 0, 0, 23, 4, -1, 0))
_ROWS = encode(b"D", pack("!Hi", 1, 1) + b"1") + encode(b"C", b"SELECT 1\x00")
_READY = encode(b"Z", b"I")
_UPDATED = encode(b"C", b"UPDATE 1\x00")
_PARSE_COMPLETE, _BIND_COMPLETE, _NO_DATA = encode(b"1"), encode(b"2"), encode(b"n")
_CONFIG = {"listen": "127.0.0.1:0", "upstream": "postgresql://u@127.0.0.1:1/db", "admin": {"listen": None},
           "invalidation": {"bus": False}}  # fmt: skip


def _parse(name: bytes, sql: str) -> bytes:
    return encode(b"P", name + b"\x00" + sql.encode() + b"\x00" + pack("!H", 0))


def _bind_execute(statement: bytes, argument: int) -> bytes:
    """Bind (one text parameter), Describe of the portal, Execute, Sync: libpq's PQexecParams/PQexecPrepared."""
    text = str(argument).encode()
    bind = encode(b"B", b"\x00" + statement + b"\x00" + pack("!HHi", 0, 1, len(text)) + text + pack("!H", 0))
    return bind + encode(b"D", b"P\x00") + encode(b"E", b"\x00" + pack("!i", 0)) + encode(b"S")


@dataclass(frozen=True)
class Scenario:
    """One mode and kind: the set-up (sent once, with its reply), each request's bytes, and the server's reply."""

    setup: bytes
    setup_reply: bytes
    request: Callable[[int], bytes]
    reply: bytes


def scenario(mode: str, kind: str) -> Scenario:
    sql = _WRITE if kind == "write" else _READ
    result = _NO_DATA + _UPDATED if kind == "write" else _ROW_DESCRIPTION + _ROWS
    if mode == "simple":
        return Scenario(b"", b"", lambda n: encode(b"Q", (sql + str(n)).encode() + b"\x00"), result + _READY)
    if mode == "extended":
        parse = _parse(b"", sql + "$1")
        return Scenario(b"", b"", lambda n: parse + _bind_execute(b"", n),
                        _PARSE_COMPLETE + _BIND_COMPLETE + result + _READY)  # fmt: skip
    name = b"w" if kind == "write" else b"r"
    return Scenario(_parse(name, sql + "$1") + encode(b"S"), _PARSE_COMPLETE + _READY,
                    lambda n: _bind_execute(name, n), _BIND_COMPLETE + result + _READY)  # fmt: skip


class _Counter:
    """A transport (and StreamWriter) that counts the bytes written to it."""

    def __init__(self) -> None:
        self.written = 0
        self.transport = self

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str) -> Any:
        return None

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


class _Server:
    """The SessionServer of a session with the cache off (only what the relay reads)."""

    def __init__(self) -> None:
        self.config = build_config(_CONFIG)
        self.cache = None


class Target:
    """Feeds requests to a caching relay (cache on) or a plain session relay (cache off)."""

    def __init__(self, cached: bool) -> None:
        self.to_server, self.to_client = _Counter(), _Counter()
        self.relay: CachingRelay | None = None
        if cached:
            config = build_config(_CONFIG)
            service = CacheService(config)
            catalog = Catalog.build("db", 1, [Relation("public", "t", "r", False)], [], [], [])
            service.catalogs.install("db", catalog.with_primary_keys([("public", "t", "id")]))
            self.relay = CachingRelay(_Host(), service, config.limits, self.to_server.write, self.to_client.write)
            self.client_data, self.server_data = self.relay.on_client_data, self.relay.on_upstream_data
        else:
            session = Session(_Server(), None, self.to_client, 1)  # type: ignore[arg-type]
            session._up_writer = self.to_server  # type: ignore[assignment]
            self.client_data, self.server_data = session._on_client_data, session._on_upstream_data

    def run(self, requests: list[bytes], reply: bytes, *, hits: bool) -> None:
        """Each request, then (unless all hit) the server's reply; checks that each went where it should."""
        client_data, server_data, to_server = self.client_data, self.server_data, self.to_server
        for request in requests:
            before = to_server.written
            client_data(request)
            if hits:
                assert to_server.written == before, "a request went upstream: not a hit"
                continue
            assert to_server.written > before, "not forwarded"
            server_data(reply)


class Case:
    """One mode and kind, set up and warmed, with its measured requests ready (built ahead: not measured)."""

    def __init__(self, mode: str, kind: str, requests: int) -> None:
        self.mode, self.kind = mode, kind
        self.target = Target(cached=kind != "pass")
        self.scenario = case = scenario(mode, kind)
        if case.setup:
            self.target.client_data(case.setup)
            self.target.server_data(case.setup_reply)
        self.hits = kind == "hit"
        if self.hits:  # the one miss that fills the key every later request hits
            self.target.run([case.request(_FIRST_KEY)], case.reply, hits=False)
        keys = iter(range(_FIRST_KEY + 1, _FIRST_KEY + 1 + _WARMUP + requests))
        self.warmup = [case.request(_FIRST_KEY if self.hits else next(keys)) for _ in range(_WARMUP)]
        self.requests = [case.request(_FIRST_KEY if self.hits else next(keys)) for _ in range(requests)]

    def warm(self) -> None:
        self.target.run(self.warmup, self.scenario.reply, hits=self.hits)

    def measure(self) -> None:
        self.target.run(self.requests, self.scenario.reply, hits=self.hits)
        relay = self.target.relay
        assert relay is None or not relay.busy, "replies left pending"
        if relay is not None and self.kind == "miss":
            assert relay.service.engine.stats().entries >= len(self.requests), "misses not stored"


async def calls(argv: list[str]) -> None:
    """Function calls per request, by cProfile."""
    if "--profile" in argv:
        at = argv.index("--profile")
        case = Case(argv[at + 1], argv[at + 2], _REQUESTS)
        case.warm()
        profile = cProfile.Profile()
        profile.runcall(case.measure)
        pstats.Stats(profile).sort_stats("tottime").print_stats(40)
        return
    print("Python function calls per request (cProfile)")
    _table({(mode, kind): _calls(Case(mode, kind, _REQUESTS)) for mode in MODES for kind in KINDS})


def _calls(case: Case) -> float:
    case.warm()
    profile = cProfile.Profile()
    profile.runcall(case.measure)
    return pstats.Stats(profile).total_calls / len(case.requests)  # type: ignore[attr-defined,no-any-return]


async def marked(only: tuple[str, str] | None = None) -> None:
    """Under callgrind: each case's measured requests between two `os.getppid()` marks (see `instructions`)."""
    for mode in MODES:
        for kind in KINDS:
            if only is not None and (mode, kind) != only:
                continue
            case = Case(mode, kind, _REQUESTS)
            case.warm()
            os.getppid()
            case.measure()
            os.getppid()


def instructions() -> None:
    """Instructions per request: this module's `marked` run under callgrind, one dump per mark."""
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as directory:
        totals = [_total(path) for path in _callgrind(Path(directory))]
    # Dumps: before each case's first mark (its set-up), then its measured requests at its second mark.
    measured = totals[1::2]
    cases = [(mode, kind) for mode in MODES for kind in KINDS]
    if len(measured) < len(cases):
        sys.exit(f"callgrind wrote {len(totals)} dumps, expected {2 * len(cases)}")
    print("CPU instructions per request (callgrind)")
    _table({case: total / _REQUESTS for case, total in zip(cases, measured, strict=False)})


def _callgrind(directory: Path, *only: str) -> list[Path]:
    """Run this module's `marked` requests (all cases, or `only` MODE KIND) under callgrind; its dumps, in order."""
    out = directory / "cg.out"
    command = ["valgrind", "--tool=callgrind", "--dump-before=os_getppid", f"--callgrind-out-file={out}",
               os.path.realpath(sys.executable), "-m", "bench.cost", "--marked", *only]  # fmt: skip
    # A fixed hash seed: str hashes (dict probes, set order) then do not vary the counts from run to run.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return sorted(directory.glob("cg.out.*"), key=lambda path: int(path.name.rsplit(".", 1)[1]))


def top(mode: str, kind: str, count: int = 25) -> None:
    """The functions with the most instructions per request (inclusive) for one mode and kind, by callgrind."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as directory:
        measured = _callgrind(Path(directory), mode, kind)[1]  # (dump 1: up to the first mark; 2: the requests)
        annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(measured)],
                                   check=True, capture_output=True, text=True).stdout  # fmt: skip
    print(f"CPU instructions per request, inclusive, {mode} {kind} (callgrind; top {count})")
    for instructions, name in _top_functions(annotated, count):
        print(f"{instructions / _REQUESTS:10,.0f}  {name}")


def _top_functions(annotated: str, count: int) -> list[tuple[int, str]]:
    """callgrind_annotate's inclusive lines as (instructions, readable name): mypyc's C names made dotted, the
    driver's frames (the event loop, this module) left out, each name once."""
    seen: dict[str, int] = {}
    totals = re.search(r"([\d,]+) \([\s\d.]+%\)\s+PROGRAM TOTALS", annotated)
    everything = int(totals.group(1).replace(",", "")) if totals else 0
    for line in annotated.splitlines():
        match = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(\S+)", line)
        if match is None:
            continue
        instructions, where = int(match.group(1).replace(",", "")), match.group(2)
        function = where.rsplit(":", 1)[-1].split("'")[0]
        if function.startswith("CPyDef_"):
            name = function.removeprefix("CPyDef_").replace("___", ".")  # module___Class___method
        elif function.startswith(("CPyPy_", "0x", "_start", "main", "__libc")) or "below main" in where:
            continue  # (Python-callable wrappers of the same functions; the driver's own frames)
        else:
            name = f"{function} (CPython)"
        if name not in seen and len(seen) < 4 * count:
            seen[name] = instructions
    # The frames around the measured calls (the interpreter running this module, the event loop) include all of it.
    ranked = [(value, name) for name, value in seen.items() if value < 0.97 * everything]
    return ranked[:count]


def _total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError(f"{path}: no totals")


def _table(values: dict[tuple[str, str], float]) -> None:
    print(f"{'mode':10}" + "".join(f"{kind:>10}" for kind in KINDS))
    for mode in MODES:
        print(f"{mode:10}" + "".join(f"{values[(mode, kind)]:10,.0f}" for kind in KINDS))


def main(argv: list[str]) -> None:
    if "--marked" in argv:
        at = argv.index("--marked")
        asyncio.run(marked((argv[at + 1], argv[at + 2]) if len(argv) > at + 2 else None))
    elif "--top" in argv:
        at = argv.index("--top")
        top(argv[at + 1], argv[at + 2])
    elif "--instructions" in argv:
        instructions()
    else:
        asyncio.run(calls(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
