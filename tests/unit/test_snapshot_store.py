"""Writing and loading snapshot files against a fake upstream (the evidence readers are replaced: no sockets)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from cacheproxy import cli
from cacheproxy.cache.engine import CacheEngine
from cacheproxy.config import UpstreamConfig
from cacheproxy.snapshot import evidence, load_snapshot, write_snapshot
from cacheproxy.snapshot.format import decode_snapshot
from cacheproxy.snapshot.report import inspect_snapshot

UPSTREAM = UpstreamConfig.from_url("postgres://proxy@127.0.0.1:1/app")
RULES = "r" * 32


class FakeUpstream:
    def __init__(self) -> None:
        self.system_identifier = "111"
        self.tables: dict[str, dict[str, str]] = {"app": {"items": "i1", "users": "u1"}}
        self.oids = {"app": 5}

    async def read_cluster(self, upstream: UpstreamConfig, database: str) -> evidence.Cluster:
        return evidence.Cluster(self.system_identifier, "0/10")

    async def read_database(self, upstream: UpstreamConfig, database: str) -> dict[str, object]:
        if database not in self.tables:
            raise OSError("no such database")
        return {"oid": self.oids[database], "tables": dict(self.tables[database])}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeUpstream:
    upstream = FakeUpstream()
    monkeypatch.setattr(evidence, "read_cluster", upstream.read_cluster)
    monkeypatch.setattr(evidence, "read_database", upstream.read_database)
    return upstream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _engine() -> CacheEngine:
    return CacheEngine(max_memory=64 << 20, max_entry_size=1 << 20, shards=4)


def _fill(engine: CacheEngine, now: float) -> None:
    for i in range(200):
        tables = frozenset({("app", "items")} if i % 2 else {("app", "users")})
        ttl = 1.0 if i % 10 == 0 else 300.0
        engine.put(("q", "app", "u", b"", f"SELECT {i}".encode()), b"v" * (i + 1), tables=tables, ttl=ttl, now=now)


def _state(engine: CacheEngine) -> dict[Any, tuple[bytes, frozenset[tuple[str, str]], str, str | None]]:
    return {e.key: (e.value, e.tables, e.query, e.rule) for e in engine.entries()}


async def _write(path: Path, engine: CacheEngine, clock: Clock) -> None:
    await write_snapshot(str(path), engine, UPSTREAM, RULES, clock)


async def test_write_then_load_keeps_live_entries_and_skips_expired(fake: FakeUpstream, tmp_path: Path) -> None:
    clock = Clock()
    source = _engine()
    _fill(source, clock.now)
    path = tmp_path / "cache.snap"
    await _write(path, source, clock)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    time.sleep(1.1)  # the ttl=1s entries expire (expiry is wall-clock in the file)
    target = _engine()
    result = await load_snapshot(str(path), target, UPSTREAM, RULES, Clock())
    expected = {
        k: v for k, v in _state(source).items() if k[4] not in {f"SELECT {i}".encode() for i in range(0, 200, 10)}
    }
    assert _state(target) == expected
    assert result.outcome == "loaded" and result.loaded == 180 and result.dropped == {"expired": 20}
    assert path.exists()


async def test_changed_table_and_recreated_database_drop_their_entries(fake: FakeUpstream, tmp_path: Path) -> None:
    clock = Clock()
    source = _engine()
    _fill(source, clock.now)
    path = tmp_path / "cache.snap"
    await _write(path, source, clock)
    fake.tables["app"]["users"] = "u2"
    target = _engine()
    result = await load_snapshot(str(path), target, UPSTREAM, RULES, Clock())
    assert {t for e in target.entries() for t in e.tables} == {("app", "items")}
    assert result.loaded == 100 and result.dropped == {"changed": 100}
    fake.oids["app"] = 6
    target = _engine()
    result = await load_snapshot(str(path), target, UPSTREAM, RULES, Clock())
    assert len(target) == 0 and result.dropped == {"changed": 200}


async def test_changed_rules_load_nothing(fake: FakeUpstream, tmp_path: Path) -> None:
    source = _engine()
    _fill(source, 1000.0)
    path = tmp_path / "cache.snap"
    await _write(path, source, Clock())
    target = _engine()
    result = await load_snapshot(str(path), target, UPSTREAM, "other rules", Clock())
    assert len(target) == 0 and result.dropped == {"rules_changed": 200} and path.exists()


async def test_another_cluster_is_refused_and_its_file_kept_aside(fake: FakeUpstream, tmp_path: Path) -> None:
    source = _engine()
    _fill(source, 1000.0)
    path = tmp_path / "cache.snap"
    await _write(path, source, Clock())
    fake.system_identifier = "222"
    target = _engine()
    result = await load_snapshot(str(path), target, UPSTREAM, RULES, Clock())
    assert result.outcome == "corrupt" and len(target) == 0
    assert not path.exists() and result.aside is not None and Path(result.aside).exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
async def test_damaged_file_gives_a_cold_start_with_the_file_kept_aside(
    fake: FakeUpstream, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = _engine()
    _fill(source, 1000.0)
    path = tmp_path / "cache.snap"
    await _write(path, source, Clock())
    data = path.read_bytes()
    for cut in range(len(data) - 1, 0, -max(1, len(data) // 37)):
        damaged = data[:cut] if damage == "truncate" else data[:cut] + bytes([data[cut] ^ 0x10]) + data[cut + 1 :]
        path.write_bytes(damaged)
        target = _engine()
        caplog.clear()
        result = await load_snapshot(str(path), target, UPSTREAM, RULES, Clock())
        assert result.outcome == "corrupt", cut
        assert len(target) == 0
        assert result.aside is not None and Path(result.aside).read_bytes() == damaged
        assert not path.exists()
        os.unlink(result.aside)
        assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1


async def test_missing_file_and_unreachable_upstream_are_cold_starts(fake: FakeUpstream, tmp_path: Path) -> None:
    path = tmp_path / "cache.snap"
    assert (await load_snapshot(str(path), _engine(), UPSTREAM, RULES, Clock())).outcome == "missing"
    source = _engine()
    _fill(source, 1000.0)
    await _write(path, source, Clock())

    async def down(upstream: UpstreamConfig, database: str) -> evidence.Cluster:
        raise OSError("connection refused")

    fake_read = evidence.read_cluster
    try:
        evidence.read_cluster = down  # type: ignore[assignment]
        result = await load_snapshot(str(path), _engine(), UPSTREAM, RULES, Clock())
    finally:
        evidence.read_cluster = fake_read  # type: ignore[assignment]
    assert result.outcome == "unverifiable" and path.exists()  # a good file is kept in place


async def test_inspect_reports_header_tables_and_validity(fake: FakeUpstream, tmp_path: Path) -> None:
    source = _engine()
    _fill(source, 1000.0)
    path = tmp_path / "cache.snap"
    await _write(path, source, Clock())
    valid, report = inspect_snapshot(str(path))
    assert valid
    assert "system identifier: 111" in report and "app.items: 100" in report and "app.users: 100" in report
    assert "entries: 200" in report and "valid: yes" in report
    path.write_bytes(path.read_bytes()[:-5])
    valid, report = inspect_snapshot(str(path))
    assert not valid and "valid: no: truncated" in report


async def test_tables_invalidated_while_writing_are_dropped_at_load(fake: FakeUpstream, tmp_path: Path) -> None:
    source = _engine()
    _fill(source, 1000.0)
    users_before = sum(("app", "users") in e.tables for e in source.entries())
    calls = 0

    def clock() -> float:  # called once per shard as it is copied: a write lands after the first shard
        nonlocal calls
        calls += 1
        if calls == 2:
            source.invalidate_tables([("app", "users")])
        return 1000.0

    path = tmp_path / "cache.snap"
    await write_snapshot(str(path), source, UPSTREAM, RULES, clock)
    _, records, end = decode_snapshot(path.read_bytes())
    assert end.invalidated == {("app", "users")}
    written_users = sum(("app", "users") in r.tables for r in records)
    assert 0 < written_users < users_before  # the first shard's were written before the write landed
    target = _engine()
    result = await load_snapshot(str(path), target, UPSTREAM, RULES, Clock())
    assert {t for e in target.entries() for t in e.tables} == {("app", "items")}
    assert result.loaded == 100 and result.dropped == {"changed": written_users}


async def test_cli_snapshot_inspect(fake: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _engine()
    _fill(source, 1000.0)
    path = tmp_path / "cache.snap"
    await _write(path, source, Clock())
    assert cli.main(["snapshot", "inspect", str(path)]) == 0
    assert "valid: yes" in capsys.readouterr().out
    path.write_bytes(b"garbage")
    assert cli.main(["snapshot", "inspect", str(path)]) == 1
    assert "valid: no: not a cacheproxy snapshot" in capsys.readouterr().out
    assert cli.main(["snapshot", "inspect", str(tmp_path / "missing")]) == 2
