"""Benchmark: write and load a snapshot of a ~1 GiB cache; time, file size, longest event-loop stall, load time.

    python3 -m bench.snapshot [--gib 1.0] [--dir /tmp] [--shards 16]

It fills a CacheEngine with result sets shaped like the proxy's (RowDescription, DataRows of ids, names, prices,
timestamps and text, CommandComplete; sizes from ~200 B to ~256 KiB, log-uniform), keyed like simple and extended
queries over 40 tables in 2 databases. A ticker task measures the longest gap between its wake-ups while the
snapshot is written: the longest time anything held the event loop. The upstream's change evidence is faked (no
PostgreSQL needed): reading it costs one short query per database, not measured here. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path

from cacheproxy.app import new_event_loop
from cacheproxy.cache.engine import CacheEngine
from cacheproxy.cache.keys import execute_key, query_key
from cacheproxy.config import UpstreamConfig
from cacheproxy.protocol import messages as m
from cacheproxy.snapshot import evidence, load_snapshot, write_snapshot

_UPSTREAM = UpstreamConfig.from_url("postgres://bench@127.0.0.1:1/bench")
_TABLES = [(db, f"table_{i}") for db in ("app", "reporting") for i in range(20)]
_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo"]


async def _fake_cluster(upstream: UpstreamConfig, database: str) -> evidence.Cluster:
    return evidence.Cluster("7300000000000000000", "0/5000000")


async def _fake_database(upstream: UpstreamConfig, database: str) -> dict[str, object]:
    return {"oid": 16384, "tables": {table: "0" * 32 for db, table in _TABLES if db == database}}


def _result(rng: random.Random, target: int) -> bytes:
    parts = [m.row_description(["id", "name", "price", "created_at", "note"])]
    size = len(parts[0])
    row = 0
    while size < target:
        row += 1
        values: list[str | None] = [
            str(rng.randrange(1, 10_000_000)),
            " ".join(rng.choices(_WORDS, k=rng.randrange(1, 4))),
            f"{rng.randrange(0, 100_000) / 100:.2f}",
            f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} {rng.randrange(24):02d}:00:00+00",
            None if rng.random() < 0.3 else " ".join(rng.choices(_WORDS, k=rng.randrange(3, 20))),
        ]
        data = m.data_row(values)
        parts.append(data)
        size += len(data)
    parts.append(m.command_complete(f"SELECT {row}"))
    return b"".join(parts)


def _fill(engine: CacheEngine, total: int, rng: random.Random) -> tuple[int, int]:
    entries = size = 0
    while size < total:
        value = _result(rng, int(2 ** rng.uniform(7.6, 18)))
        db, table = rng.choice(_TABLES)
        sql = f"SELECT id, name, price, created_at, note FROM {table} WHERE id > {entries} LIMIT 50".encode()
        if entries % 2:
            key: tuple[object, ...] = query_key(db, "app_user", b"\x07" * 16, sql)
        else:
            key = execute_key(db, "app_user", b"\x07" * 16, sql, (23,), entries.to_bytes(8, "big"), 0)
        tables = frozenset({(db, table)})
        if engine.put(key, value, tables=tables, ttl=3600.0, now=time.monotonic(), query=sql.decode()):
            entries += 1
            size += len(value)
    return entries, size


async def _ticker(stop: asyncio.Event, gaps: list[float]) -> None:
    """Wake every millisecond; a wake-up late by X means something held the loop for about X."""
    interval = 0.001
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(interval)
        now = time.perf_counter()
        gaps.append(max(0.0, now - last - interval))
        last = now


async def _bench(gib: float, directory: str, shards: int) -> None:
    evidence.read_cluster = _fake_cluster
    evidence.read_database = _fake_database
    total = int(gib * (1 << 30))
    engine = CacheEngine(max_memory=total * 2, max_entry_size=1 << 20, shards=shards)
    started = time.perf_counter()
    entries, size = _fill(engine, total, random.Random(1))
    print(f"filled: {entries} entries, {size / (1 << 20):.0f} MiB of values in {time.perf_counter() - started:.1f}s")
    path = os.path.join(directory, "bench.snap")
    stop = asyncio.Event()
    gaps: list[float] = []
    ticker = asyncio.get_running_loop().create_task(_ticker(stop, gaps))
    await asyncio.sleep(0.05)
    result = await write_snapshot(path, engine, _UPSTREAM, "bench", time.monotonic)
    stop.set()
    await ticker
    gaps.sort()
    file_size = os.path.getsize(path)
    rate = size / (1 << 20) / result.seconds
    print(f"snapshot: {result.entries} entries in {result.seconds:.2f}s ({rate:.0f} MiB/s of values)")
    print(f"file size: {file_size / (1 << 20):.0f} MiB ({file_size / size:.1%} of the values)")
    print(
        f"event-loop stall while writing: longest {gaps[-1] * 1000:.2f} ms, "
        f"p99 {gaps[int(len(gaps) * 0.99)] * 1000:.2f} ms over {len(gaps)} ticks"
    )
    del engine
    fresh = CacheEngine(max_memory=total * 2, max_entry_size=1 << 20, shards=shards)
    loaded = await load_snapshot(path, fresh, _UPSTREAM, "bench", time.monotonic)
    print(f"load: {loaded.loaded} entries in {loaded.seconds:.2f}s (dropped: {dict(loaded.dropped) or 'none'})")
    os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench.snapshot", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of cached values (default 1)")
    parser.add_argument("--dir", default=None, help="where to write the snapshot (default: a temp dir)")
    parser.add_argument("--shards", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        Path(directory).mkdir(exist_ok=True)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_bench(args.gib, directory, args.shards))


if __name__ == "__main__":
    main()
