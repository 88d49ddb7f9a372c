"""Shared generations across workers (cacheproxy/workers): the counters, the engine's hit check, the metrics sums.

Two `SharedGenerations` over one buffer stand for two worker processes over one shared mapping.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cacheproxy.cache.entry import any_row, database_id, row_id
from cacheproxy.config import Config, ConfigError, load_config
from cacheproxy.observability.metrics import Metrics
from cacheproxy.workers.control import Field, WorkerTable, new_table
from cacheproxy.workers.engine import Dropped, SharedCacheEngine
from cacheproxy.workers.generations import SharedGenerations, new_mapping
from cacheproxy.workers.observe import merge_metrics, merge_stats

SLOTS = 1 << 10
T = ("db", "t")
U = ("db", "u")


def _pair(slots: int = SLOTS) -> tuple[SharedGenerations, SharedGenerations]:
    buffer = bytearray(slots * 2 * 8)
    return (
        SharedGenerations(buffer, slots=slots, writers=2, writer=0),
        SharedGenerations(buffer, slots=slots, writers=2, writer=1),
    )


def _engine(gens: SharedGenerations, notify: list[Dropped] | None = None) -> SharedCacheEngine:
    return SharedCacheEngine(
        max_memory=1 << 20,
        max_entry_size=1 << 16,
        shards=4,
        generations=gens,
        notify=notify.append if notify is not None else None,
    )


def test_a_bump_by_either_worker_invalidates_the_stamps_of_both() -> None:
    a, b = _pair()
    stamp_a, stamp_b = a.stamp([T]), b.stamp([T])
    assert a.valid(stamp_a) and b.valid(stamp_b)
    b.bump([T])
    assert not a.valid(stamp_a) and not b.valid(stamp_b)
    fresh = a.stamp([T])
    a.bump([U])
    assert a.valid(fresh) or a.slot(U) == a.slot(T)  # another table's bump leaves it (unless they collide)


def test_a_database_bump_reaches_every_table_of_it_and_a_flush_everything() -> None:
    a, b = _pair()
    stamp = a.stamp([T, ("db", row_id("t", 5))])
    other = a.stamp([("elsewhere", "t")])
    b.bump([database_id("db")])
    assert not a.valid(stamp)
    assert a.valid(other) or a.slot(("elsewhere", "\x00")) == a.slot(database_id("db"))
    b.bump_all()
    assert not a.valid(other)


def test_a_row_write_spares_other_buckets_but_not_the_table_s_other_reads() -> None:
    a, b = _pair(1 << 16)
    point_1, point_2 = ("db", row_id("t", 1)), ("db", row_id("t", 2))
    read_1 = a.stamp([T, point_1])
    read_2 = a.stamp([T, point_2])
    scan = a.stamp([T, ("db", any_row("t"))])
    b.bump([point_1, ("db", any_row("t"))])  # what a write of row 1 invalidates (entry.py)
    assert not a.valid(read_1) and not a.valid(scan)
    assert a.valid(read_2)


def test_collisions_only_cost_misses() -> None:
    """With 4 slots, tables share the two hashed ones: a bump invalidates every table of its slot, never less."""
    a, b = _pair(slots=4)
    tables = [("db", f"t{i}") for i in range(20)]
    stamps = [a.stamp([table]) for table in tables]
    b.bump([tables[0]])
    assert [a.valid(stamp) for stamp in stamps] == [a.slot(tables[0]) not in a.slots_of([t]) for t in tables]
    assert not a.valid(stamps[0])
    assert {a.slot(table) for table in tables} == {2, 3}


def test_an_unmoved_changes_counter_skips_the_slots() -> None:
    a, b = _pair()
    stamp = a.stamp([T])
    a.bump([U])  # elsewhere: the changes counter moves, the full check finds T unchanged and remembers
    assert a.valid(stamp) or a.slot(U) == a.slot(T)
    b.bump([T])
    assert not a.valid(stamp) and not a.valid(stamp)


def test_counters_never_go_back_so_no_old_stamp_matches_again() -> None:
    a, b = _pair()
    old = a.stamp([T])
    for _ in range(3):
        a.bump([T])
        b.bump([T])
    assert not a.valid(old)
    assert a.generation(T) == b.generation(T) == 6


def test_the_slot_hash_is_the_same_in_every_process() -> None:
    """crc32, not Python's salted str hash: a worker restarted with another hash seed finds the same slots."""
    a, _ = _pair(1 << 16)
    script = (
        "from cacheproxy.workers.generations import SharedGenerations;"
        f"print(SharedGenerations(bytearray({(1 << 16) * 16}), slots={1 << 16}, writers=2, writer=0).slot(('db', 't')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )  # fmt: skip
    assert int(out.stdout) == a.slot(T)


def test_a_forked_child_shares_the_mapping() -> None:
    mapping = new_mapping(SLOTS, 2)
    parent = SharedGenerations(mapping, slots=SLOTS, writers=2, writer=0)
    stamp = parent.stamp([T])
    pid = os.fork()
    if pid == 0:  # the "worker": bump with its own column, and leave
        try:
            SharedGenerations(mapping, slots=SLOTS, writers=2, writer=1).bump([T])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert not parent.valid(stamp)
    parent.release()
    mapping.close()


def test_the_engine_does_not_serve_an_entry_another_worker_invalidated() -> None:
    a, b = _pair()
    notified: list[Dropped] = []
    mine, theirs = _engine(a, notified), _engine(b)
    key = ("q", "db", "u", b"", b"SELECT * FROM t")
    assert mine.put(key, b"rows", tables=frozenset({T}), ttl=60, now=0.0, generations=mine.generations({T}))
    assert mine.get(key, 1.0) is not None
    theirs.invalidate_tables([T])  # a write through the other worker
    assert mine.get(key, 2.0) is None
    stats = mine.stats()
    assert (stats.hits, stats.misses, stats.entries, mine.stale_hits) == (1, 1, 0, 1)
    mine.invalidate_tables([U])
    assert notified == [("t", "db", ("u",))]


def test_a_fill_that_raced_another_worker_s_write_is_refused() -> None:
    a, b = _pair()
    mine, theirs = _engine(a), _engine(b)
    key = ("q", "db", "u", b"", b"SELECT * FROM t")
    taken = mine.generations({T})  # before the query goes upstream
    theirs.invalidate_database("db")  # meanwhile, through the other worker
    assert not mine.put(key, b"old rows", tables=frozenset({T}), ttl=60, now=0.0, generations=taken)
    assert mine.get(key, 0.0) is None


def test_drop_frees_memory_without_bumping() -> None:
    a, b = _pair()
    mine = _engine(a)
    key = ("q", "db", "u", b"", b"SELECT 1")
    mine.put(key, b"x", tables=frozenset({T}), ttl=60, now=0.0)
    before = b.generation(T)
    assert mine.drop(("t", "db", ("t",))) == 1
    assert b.generation(T) == before and len(mine) == 0


def test_worker_table_rows() -> None:
    table = WorkerTable(new_table(2), 2)
    table.set(1, Field.PID, 4242)
    table.add(1, Field.RESTARTS, 1)
    table.add(0, Field.CLIENTS, -1)  # never below zero
    rows = table.rows()
    assert (rows[1].pid, rows[1].restarts, rows[0].clients) == (4242, 1, 0)


def test_metrics_of_two_workers_add_up() -> None:
    one, two = Metrics(), Metrics()
    one.client_opened()
    one.hit()
    two.client_opened()
    two.client_opened()
    two.query("read", "miss", 0.003)
    merged = merge_metrics([one.render()[0].decode(), two.render()[0].decode()])
    lines = dict(line.rpartition(" ")[::2] for line in merged.splitlines() if not line.startswith("#"))
    assert lines["cacheproxy_client_connections"] == "3"
    assert lines["cacheproxy_client_connections_total"] == "3"
    assert lines['cacheproxy_queries_total{kind="read",outcome="hit"}'] == "1"
    assert lines['cacheproxy_query_duration_seconds_count{outcome="miss"}'] == "1"
    assert lines['cacheproxy_query_duration_seconds_bucket{le="0.005",outcome="miss"}'] == "1"
    assert [key for key in lines if key.startswith("cacheproxy_info")] == [
        next(key for key in lines if key.startswith("cacheproxy_info"))
    ]
    assert next(value for key, value in lines.items() if key.startswith("cacheproxy_info")) == "1"
    assert merged.count("# TYPE cacheproxy_client_connections gauge") == 1


def test_stats_of_two_workers_add_up() -> None:
    merged = merge_stats([
        {"cache": {"hits": 3, "misses": 1}, "uptime_seconds": 5.0, "version": "x",
         "invalidation_bus": {"blind_databases": ["a"]}},
        {"cache": {"hits": 1, "misses": 3}, "uptime_seconds": 7.0, "version": "x",
         "invalidation_bus": {"blind_databases": ["b"]}},
    ])  # fmt: skip
    assert merged["cache"] == {"hits": 4, "misses": 4}
    assert merged["hit_ratio"] == 0.5 and merged["uptime_seconds"] == 7.0 and merged["version"] == "x"
    assert merged["invalidation_bus"] == {"blind_databases": ["a", "b"]}


@pytest.mark.parametrize(("value", "count"), [(1, 1), (3, 3), ("auto", 2), ("4", 4)])
def test_server_workers(value: object, count: int, tmp_path: Path) -> None:
    config = _config(tmp_path, {"server": {"workers": value}})
    assert config.server.worker_count(2) == count


def test_server_workers_auto_is_capped(tmp_path: Path) -> None:
    assert _config(tmp_path, {"server": {"workers": "auto"}}).server.worker_count(96) == 8


@pytest.mark.parametrize("value", [0, -1, 65, "many", True])
def test_server_workers_refuses(value: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.workers"):
        _config(tmp_path, {"server": {"workers": value}})


def _config(tmp_path: Path, tree: dict[str, object]) -> Config:
    path = tmp_path / "cacheproxy.yaml"
    path.write_text(yaml.safe_dump({"upstream": "postgres://u@127.0.0.1/db", **tree}))
    return load_config(str(path), env={})


def test_mapping_is_shared_and_zeroed() -> None:
    mapping = new_mapping(4, 2)
    assert isinstance(mapping, mmap.mmap) and bytes(mapping) == bytes(64)
    mapping.close()
