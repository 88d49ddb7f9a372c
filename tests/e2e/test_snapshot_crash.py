"""kill -9 in the middle of a snapshot write leaves the previous snapshot whole (temp file, fsync, atomic rename)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cacheproxy.cache.engine import CacheEngine
from cacheproxy.config import UpstreamConfig
from cacheproxy.snapshot import evidence, load_snapshot
from cacheproxy.snapshot.format import decode_snapshot

# A child process that fills a cache and writes one snapshot through the real writer; the upstream's evidence is
# faked (this test is about the file protocol, not the evidence).
_WRITER = """
import asyncio, os, sys
from cacheproxy.cache.engine import CacheEngine
from cacheproxy.config import UpstreamConfig
from cacheproxy.snapshot import evidence, write_snapshot

async def cluster(upstream, database):
    return evidence.Cluster("1", "0/1")

async def tables(upstream, database):
    return {"oid": 1, "tables": {"t": "x"}}

evidence.read_cluster, evidence.read_database = cluster, tables
path, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
engine = CacheEngine(max_memory=1 << 33, max_entry_size=1 << 22, shards=16)
for i in range(count):
    engine.put(("q", "db", i), os.urandom(size), tables=frozenset({("db", "t")}), ttl=3600, now=0.0)
print("filled", flush=True)
asyncio.run(write_snapshot(path, engine, UpstreamConfig.from_url("postgres://u@h/db"), "r", lambda: 0.0))
print("done", flush=True)
"""
_ROOT = str(Path(__file__).resolve().parents[2])


def _writer(path: Path, count: int, size: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(count), str(size)],
        cwd=_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_kill_9_mid_write_leaves_the_previous_snapshot_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cache.snap"
    small = _writer(path, 100, 1000)
    assert small.communicate(timeout=60)[0].split() == ["filled", "done"]
    previous = path.read_bytes()
    assert len(decode_snapshot(previous)[1]) == 100

    big = _writer(path, 4000, 64 * 1024)  # ~256 MiB of incompressible values
    try:
        assert big.stdout is not None and big.stdout.readline().strip() == "filled"
        tmp = tmp_path / f"cache.snap.tmp-{big.pid}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if tmp.exists() and tmp.stat().st_size > 16 * 1024 * 1024:
                break
            time.sleep(0.001)
        os.kill(big.pid, signal.SIGKILL)
    finally:
        big.kill()
        big.wait(timeout=30)
    assert big.returncode == -signal.SIGKILL
    assert tmp.exists()  # killed mid-write, before the rename
    assert path.read_bytes() == previous
    _, records, end = decode_snapshot(path.read_bytes())
    assert end.entries == len(records) == 100

    # The next start loads the previous snapshot and removes the interrupted write's temp file.
    async def cluster(upstream: UpstreamConfig, database: str) -> evidence.Cluster:
        return evidence.Cluster("1", "0/1")

    async def tables(upstream: UpstreamConfig, database: str) -> dict[str, object]:
        return {"oid": 1, "tables": {"t": "x"}}

    monkeypatch.setattr(evidence, "read_cluster", cluster)
    monkeypatch.setattr(evidence, "read_database", tables)
    engine = CacheEngine(max_memory=1 << 30, max_entry_size=1 << 20, shards=4)
    result = asyncio.run(
        load_snapshot(str(path), engine, UpstreamConfig.from_url("postgres://u@h/db"), "r", lambda: 0.0)
    )
    assert result.loaded == 100 and len(engine) == 100
    assert not tmp.exists()
