"""Unit tests for cacheproxy.cache: LRU, TTL and sweep, byte budget, table index, generations, stats. No sockets."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheproxy.cache import ENTRY_OVERHEAD, KEY_OVERHEAD, CacheEngine, CacheStats, Entry, Shard, TableId, key_size

USERS: TableId = ("app", "users")
ORDERS: TableId = ("app", "orders")
OTHER_USERS: TableId = ("other", "users")


def entry(key: Hashable, size: int = 100, *, tables: frozenset[TableId] = frozenset(), ttl: float = 60.0) -> Entry:
    return Entry(key, b"x" * size, tables=tables, created_at=0.0, expires_at=ttl)


def engine(*, max_memory: int = 1 << 20, max_entry_size: int = 1 << 16, shards: int = 4) -> CacheEngine:
    return CacheEngine(max_memory=max_memory, max_entry_size=max_entry_size, shards=shards)


def check_all(cache: CacheEngine) -> None:
    for shard in shards_of(cache):
        shard.check_invariants()


def shards_of(cache: CacheEngine) -> list[Shard]:
    # hash(i) == i for small non-negative ints, so keys 0..n-1 land on shards 0..n-1.
    return [cache.shard_for(i) for i in range(cache.shard_count)]


# -- entry sizes --------------------------------------------------------------------------------------------------


def test_key_size_counts_str_and_bytes_members() -> None:
    assert key_size(("db", "user", b"SELECT 1", 5, None)) == KEY_OVERHEAD + 2 + 4 + 8
    assert key_size(("db", ("p1", b"p2"))) == KEY_OVERHEAD + 2 + 2 + 2
    assert key_size("abc") == KEY_OVERHEAD + 3
    assert key_size(7) == KEY_OVERHEAD


def test_entry_size_counts_value_key_query_and_overhead() -> None:
    e = Entry(("k",), b"v" * 10, tables=frozenset(), created_at=0.0, expires_at=1.0, query="SELECT 1")
    assert e.size == 10 + KEY_OVERHEAD + 1 + len("SELECT 1") + ENTRY_OVERHEAD


# -- LRU ----------------------------------------------------------------------------------------------------------


def test_get_refreshes_and_eviction_takes_the_least_recently_used() -> None:
    size = entry("a").size
    shard = Shard(3 * size)
    for key in "abc":
        assert shard.put(entry(key), now=0.0)
    assert shard.get("a", now=1.0) is not None  # order now: b, c, a
    assert shard.put(entry("d"), now=1.0)
    assert shard.get("b", now=1.0) is None
    assert [e.key for e in shard.snapshot()] == ["c", "a", "d"]
    assert shard.evictions == 1 and shard.expirations == 0
    shard.check_invariants()


def test_eviction_of_an_already_expired_victim_counts_as_expiration() -> None:
    size = entry("a").size
    shard = Shard(2 * size)
    shard.put(entry("a", ttl=5.0), now=0.0)
    shard.put(entry("b", ttl=50.0), now=0.0)
    shard.put(entry("c", ttl=50.0), now=10.0)  # evicts "a", which expired at 5
    assert (shard.evictions, shard.expirations) == (0, 1)
    shard.put(entry("d", ttl=50.0), now=10.0)  # evicts "b", still fresh
    assert (shard.evictions, shard.expirations) == (1, 1)


def test_hit_counts_and_value_is_not_copied() -> None:
    cache = engine()
    value = b"row bytes" * 100
    assert cache.put(("k",), value, tables=frozenset({USERS}), ttl=10, now=0.0)
    first = cache.get(("k",), now=1.0)
    second = cache.get(("k",), now=2.0)
    assert first is second and first is not None
    assert first.value is value
    assert first.hits == 2
    assert cache.get(("missing",), now=2.0) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.sets) == (2, 1, 1)


def test_replacing_a_key_adjusts_bytes() -> None:
    shard = Shard(10_000)
    shard.put(entry("k", 100), now=0.0)
    small = shard.bytes
    shard.put(entry("k", 1000), now=0.0)
    assert shard.bytes == small + 900
    assert len(shard) == 1
    shard.put(entry("k", 10, tables=frozenset({USERS})), now=0.0)
    assert shard.bytes == small - 90
    assert shard.evictions == 0 and shard.sets == 3
    shard.check_invariants()


def test_put_larger_than_the_shard_budget_is_refused_and_keeps_the_old_entry() -> None:
    shard = Shard(1000)
    shard.put(entry("k", 100), now=0.0)
    assert not shard.put(entry("k", 1000), now=0.0)
    kept = shard.get("k", now=0.0)
    assert kept is not None and len(kept.value) == 100


# -- TTL and sweep ------------------------------------------------------------------------------------------------


def test_expired_get_returns_none_and_counts_an_expiration() -> None:
    cache = engine()
    cache.put("k", b"v", tables=frozenset({USERS}), ttl=10.0, now=100.0)
    assert cache.get("k", now=109.999) is not None
    assert cache.get("k", now=110.0) is None  # expires_at itself is expired
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.expirations, stats.entries, stats.bytes) == (1, 1, 1, 0, 0)
    check_all(cache)


def test_sweep_removes_expired_and_leaves_fresh() -> None:
    shard = Shard(1 << 20)
    for i in range(50):
        shard.put(entry(i, tables=frozenset({USERS}), ttl=5.0 if i % 2 else 500.0), now=0.0)
    assert shard.sweep(now=10.0, max_checks=1000) == 25
    assert {e.key for e in shard.snapshot()} == set(range(0, 50, 2))
    assert all(e.hits == 0 for e in shard.snapshot())  # looking is not a hit
    assert shard.expirations == 25 and shard.hits == 0
    shard.check_invariants()


def test_sweep_work_is_bounded_per_call() -> None:
    shard = Shard(1 << 20)
    for i in range(100):
        shard.put(entry(i, ttl=1.0), now=0.0)
    for call in range(10):
        assert shard.sweep(now=2.0, max_checks=10) == 10
        assert len(shard) == 90 - 10 * call
    assert shard.sweep(now=2.0, max_checks=10) == 0


def test_sweep_cursor_covers_the_whole_shard_even_when_the_oldest_are_fresh() -> None:
    shard = Shard(1 << 20)
    # The 30 oldest entries live long; restarting from the LRU end every call would never get past them.
    for i in range(30):
        shard.put(entry(("fresh", i), ttl=1000.0), now=0.0)
    for i in range(70):
        shard.put(entry(("short", i), ttl=1.0), now=0.0)
    removed = 0
    for _ in range(10):  # 10 x 10 checks = one pass
        removed += shard.sweep(now=2.0, max_checks=10)
    assert removed == 70 and len(shard) == 30
    shard.check_invariants()


def test_a_hit_on_the_entry_under_the_cursor_does_not_restart_the_pass() -> None:
    shard = Shard(1 << 20)
    for i in range(20):
        shard.put(entry(("fresh", i), ttl=1000.0), now=0.0)
    for i in range(80):
        shard.put(entry(("short", i), ttl=1.0), now=0.0)
    assert shard.sweep(now=2.0, max_checks=10) == 0  # the cursor now rests on ("fresh", 10)
    assert shard.get(("fresh", 10), now=2.0) is not None  # moves it to the MRU end
    removed = sum(shard.sweep(now=2.0, max_checks=10) for _ in range(9))  # 90 more checks finish the pass
    assert removed == 80


def test_sweep_coverage_survives_hits_removals_and_puts_between_calls() -> None:
    rng = random.Random(7)
    shard = Shard(1 << 20)
    for i in range(200):
        shard.put(entry(i, tables=frozenset({USERS}) if i % 5 == 0 else frozenset(), ttl=rng.choice([1.0, 1000.0])), 0)
    expired = {e.key for e in shard.snapshot() if e.expires_at <= 2.0}
    for step in range(100):
        shard.sweep(now=2.0, max_checks=5)
        key = rng.randrange(200)
        if key not in expired:
            shard.get(key, now=2.0)  # moves it, possibly the entry under the cursor
        if step % 10 == 0:
            shard.remove(rng.randrange(200))
            shard.put(entry(("new", step), ttl=1000.0), now=2.0)
        if step == 50:
            shard.invalidate([USERS])
        shard.check_invariants()
    assert not any(e.expires_at <= 2.0 for e in shard.snapshot())


def test_engine_sweep_is_bounded_and_rotates_over_shards() -> None:
    cache = engine(shards=4)
    for i in range(400):
        cache.put(i, b"v", tables=frozenset(), ttl=1.0, now=0.0)
    per_shard = [s.entries for s in cache.shard_stats()]
    assert per_shard == [100, 100, 100, 100]  # hash(int) == int
    for call in range(8):
        assert cache.sweep(now=5.0, max_checks=50) == 50
        assert len(cache) == 400 - 50 * (call + 1)
    assert cache.stats().expirations == 400
    check_all(cache)


def test_engine_sweep_spends_the_budget_across_small_shards() -> None:
    cache = engine(shards=8)
    for i in range(16):  # two entries per shard
        cache.put(i, b"v", tables=frozenset(), ttl=1.0, now=0.0)
    assert cache.sweep(now=5.0, max_checks=256) == 16


# -- invalidation -------------------------------------------------------------------------------------------------


def test_invalidate_tables_removes_only_dependents_across_shards() -> None:
    cache = engine(shards=16)
    deps: dict[int, frozenset[TableId]] = {}
    for i in range(300):
        tables = [frozenset({USERS}), frozenset({ORDERS}), frozenset({USERS, ORDERS}), frozenset({OTHER_USERS})][i % 4]
        deps[i] = tables
        assert cache.put(("q", i), b"r", tables=tables, ttl=60, now=0.0)
    assert cache.invalidate_tables([USERS]) == 150
    remaining = {e.key for e in cache.entries()}
    assert remaining == {("q", i) for i, tables in deps.items() if USERS not in tables}
    assert cache.stats().invalidations == 150
    assert cache.invalidate_tables([USERS]) == 0
    check_all(cache)


def test_invalidate_database_removes_its_entries_only() -> None:
    cache = engine()
    cache.put("a", b"1", tables=frozenset({USERS}), ttl=60, now=0.0)
    cache.put("b", b"2", tables=frozenset({USERS, ORDERS}), ttl=60, now=0.0)
    cache.put("c", b"3", tables=frozenset({OTHER_USERS}), ttl=60, now=0.0)
    cache.put("d", b"4", tables=frozenset(), ttl=60, now=0.0)  # no table, no database
    assert cache.invalidate_database("app") == 2
    assert sorted(str(e.key) for e in cache.entries()) == ["c", "d"]
    check_all(cache)


def test_invalidation_hands_back_the_removed_entries() -> None:
    # Write-through refreshes what a write removed: the engine gives the entries back, each once.
    cache = engine(shards=4)
    cache.put("a", b"1", tables=frozenset({USERS, ORDERS}), ttl=60, now=0.0)
    cache.put("b", b"2", tables=frozenset({ORDERS}), ttl=60, now=0.0)
    cache.put("c", b"3", tables=frozenset({OTHER_USERS}), ttl=60, now=0.0)
    dropped: list[Entry] = []
    assert cache.invalidate_tables([USERS, ORDERS], dropped) == 2
    assert sorted(str(e.key) for e in dropped) == ["a", "b"]
    assert cache.invalidate_database("other", dropped) == 1
    assert sorted(str(e.key) for e in dropped) == ["a", "b", "c"]
    check_all(cache)


def test_flush_removes_everything() -> None:
    cache = engine()
    for i in range(20):
        cache.put(i, b"v", tables=frozenset({USERS}), ttl=60, now=0.0)
    assert cache.flush() == 20
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.invalidations) == (0, 0, 20)
    assert cache.put(1, b"v", tables=frozenset({USERS}), ttl=60, now=0.0)
    check_all(cache)


def test_entries_iteration_is_safe_while_the_cache_changes() -> None:
    cache = engine(shards=2)
    for i in range(50):
        cache.put(i, b"v", tables=frozenset({USERS}), ttl=60, now=0.0)
    seen = 0
    for _ in cache.entries():
        seen += 1
        cache.invalidate_tables([USERS])
        cache.put(("new", seen), b"v", tables=frozenset({USERS}), ttl=60, now=0.0)
    assert seen >= 1


# -- generations and the fill-race guard --------------------------------------------------------------------------


def test_fill_racing_an_invalidation_is_refused() -> None:
    cache = engine()
    tables = frozenset({USERS, ORDERS})
    before = cache.generations(tables)
    cache.invalidate_tables([ORDERS])  # nothing cached: the generation must move anyway
    assert not cache.put("k", b"v", tables=tables, ttl=60, now=0.0, generations=before)
    assert cache.get("k", now=0.0) is None
    assert cache.stats().rejected == 1
    assert cache.put("k", b"v", tables=tables, ttl=60, now=0.0, generations=cache.generations(tables))


def test_unrelated_invalidation_does_not_refuse_a_fill() -> None:
    cache = engine()
    before = cache.generations({USERS})
    cache.invalidate_tables([ORDERS, OTHER_USERS])
    cache.invalidate_database("other")
    assert cache.put("k", b"v", tables=frozenset({USERS}), ttl=60, now=0.0, generations=before)


def test_generations_follow_sorted_order_and_move_on_every_kind_of_invalidation() -> None:
    cache = engine()
    cache.invalidate_tables([USERS])
    gens = cache.generations([USERS, ORDERS])
    assert gens == cache.generations([ORDERS, USERS])  # sorted: orders, users
    assert gens[0] < gens[1]
    g0 = cache.generations([OTHER_USERS])
    cache.invalidate_database("other")
    g1 = cache.generations([OTHER_USERS])
    assert g1 != g0
    cache.flush()
    assert cache.generations([OTHER_USERS]) != g1


def test_flush_refuses_a_table_less_fill_in_flight() -> None:
    cache = engine()
    before = cache.generations([])
    cache.flush()
    assert not cache.put("select 1", b"v", tables=frozenset(), ttl=60, now=0.0, generations=before)


# -- refusals -----------------------------------------------------------------------------------------------------


def test_max_entry_size_refusal() -> None:
    key = ("k",)
    overhead = Entry(key, b"", tables=frozenset(), created_at=0, expires_at=1).size
    cache = engine(max_entry_size=overhead + 100)
    assert cache.put(key, b"x" * 100, tables=frozenset(), ttl=60, now=0.0)
    assert not cache.put(("k2",), b"x" * 101, tables=frozenset(), ttl=60, now=0.0)
    stats = cache.stats()
    assert (stats.sets, stats.rejected, stats.entries) == (1, 1, 1)


@pytest.mark.parametrize("ttl", [0.0, -1.0, math.nan])
def test_non_positive_ttl_is_refused(ttl: float) -> None:
    cache = engine()
    assert not cache.put("k", b"v", tables=frozenset(), ttl=ttl, now=0.0)
    assert cache.stats().rejected == 1


def test_entry_over_the_shard_budget_is_rejected() -> None:
    cache = engine(max_memory=4 * 1000, max_entry_size=10_000, shards=4)
    assert not cache.put("k", b"x" * 2000, tables=frozenset(), ttl=60, now=0.0)
    assert cache.stats().rejected == 1


# -- configuration, sharding, stats ------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [0, -4, 3, 6, 12])
def test_shards_must_be_a_power_of_two(shards: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        engine(shards=shards)


@pytest.mark.parametrize("shards", [1, 2, 16, 64])
def test_budget_is_split_evenly(shards: int) -> None:
    cache = engine(max_memory=1 << 20, shards=shards)
    assert all(s.max_bytes == (1 << 20) // shards for s in cache.shard_stats())
    assert cache.max_memory == 1 << 20 and cache.max_entry_size == 1 << 16


def test_keys_spread_evenly_over_shards() -> None:
    rng = random.Random(1)
    cache = engine(max_memory=1 << 30, shards=16)
    for _ in range(10_000):
        key = ("db", "user", f"SELECT * FROM t WHERE id = {rng.getrandbits(64)}", rng.randbytes(8))
        cache.put(key, b"", tables=frozenset(), ttl=60, now=0.0)
    counts = [s.entries for s in cache.shard_stats()]
    mean = sum(counts) / len(counts)
    assert sum(counts) == 10_000
    assert all(0.7 * mean <= c <= 1.3 * mean for c in counts), counts


def test_stats_total_is_the_sum_of_shard_stats() -> None:
    rng = random.Random(3)
    cache = engine(max_memory=16 * 2000, shards=16)
    for step in range(2000):
        key = rng.randrange(300)
        if rng.random() < 0.5:
            cache.put(
                key, b"x" * rng.randrange(0, 1500), tables=frozenset({USERS}), ttl=rng.choice([0, 1, 50]), now=step
            )
        else:
            cache.get(key, now=step)
        if step % 97 == 0:
            cache.invalidate_tables([USERS])
        if step % 31 == 0:
            cache.sweep(now=step, max_checks=8)
    total = cache.stats()
    assert total == sum(cache.shard_stats(), CacheStats())
    assert total.max_bytes == 16 * 2000
    assert total.hits + total.misses > 0 and total.rejected > 0 and total.evictions > 0


# -- random workloads ---------------------------------------------------------------------------------------------

TABLES: list[TableId] = [("a", "t1"), ("a", "t2"), ("b", "t1"), ("b", "t3")]
table_sets = st.frozensets(st.sampled_from(TABLES), max_size=3)
keys = st.tuples(st.just("q"), st.integers(0, 20))
ops = st.one_of(
    st.tuples(
        st.just("put"), keys, st.integers(0, 900), table_sets, st.sampled_from([-1.0, 1.0, 5.0, 100.0]), st.booleans()
    ),
    st.tuples(st.just("get"), keys),
    st.tuples(st.just("remove"), keys),
    st.tuples(st.just("invalidate"), st.lists(st.sampled_from(TABLES), max_size=2)),
    st.tuples(st.just("invalidate_database"), st.sampled_from(["a", "b", "c"])),
    st.tuples(st.just("sweep"), st.integers(0, 10)),
    st.tuples(st.just("tick"), st.floats(0.0, 10.0)),
    st.tuples(st.just("flush")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=80), st.sampled_from([1, 2, 4]))
def test_random_workload_keeps_every_invariant(program: list[tuple[object, ...]], shards: int) -> None:
    cache = engine(max_memory=shards * 2500, max_entry_size=1400, shards=shards)
    now = 0.0
    stored: dict[Hashable, bytes] = {}  # the last value successfully put per key
    for op in program:
        name = op[0]
        if name == "put":
            _, key, size, tables, ttl, raced = op
            assert isinstance(size, int) and isinstance(ttl, float) and isinstance(tables, frozenset)
            gens = cache.generations(tables)
            if raced and tables:
                cache.invalidate_tables([sorted(tables)[0]])
            value = bytes([size % 256]) * size
            ok = cache.put(key, value, tables=tables, ttl=ttl, now=now, generations=gens)
            assert ok == (ttl > 0 and not (raced and tables) and size + key_size(key) + ENTRY_OVERHEAD <= 1400)
            if ok:
                stored[key] = value
        elif name == "get":
            got = cache.get(op[1], now)
            if got is not None:
                assert now < got.expires_at
                assert got.value is stored[op[1]]
        elif name == "remove":
            cache.shard_for(op[1]).remove(op[1])
        elif name == "invalidate":
            targets = op[1]
            assert isinstance(targets, list)
            cache.invalidate_tables(targets)
            assert not any(e.tables & set(targets) for e in cache.entries())
        elif name == "invalidate_database":
            cache.invalidate_database(str(op[1]))
            assert not any(t[0] == op[1] for e in cache.entries() for t in e.tables)
        elif name == "sweep":
            assert isinstance(op[1], int)
            before = len(cache)
            removed = cache.sweep(now, op[1])
            assert removed <= op[1] and len(cache) == before - removed
        elif name == "tick":
            assert isinstance(op[1], float)
            now += op[1]
        else:
            cache.flush()
            assert len(cache) == 0
        check_all(cache)
        stats = cache.stats()
        assert stats == sum(cache.shard_stats(), CacheStats())
        assert stats.bytes == sum(e.size for e in cache.entries()) <= stats.max_bytes


def test_invalidation_visits_only_the_shards_that_hold_the_table() -> None:
    # Correctness does not depend on the holders map (a stale bit only costs a visit); this checks it is complete.
    cache = engine(shards=16)
    for i in range(64):
        cache.put(("k", i), b"v", tables=frozenset({USERS} if i % 2 else {ORDERS}), ttl=60, now=0.0)
    cache.flush()
    for i in range(64):
        cache.put(("k", i), b"v", tables=frozenset({USERS} if i % 2 else {ORDERS}), ttl=60, now=0.0)
    assert cache.invalidate_tables([USERS]) == 32
    assert cache.invalidate_tables([USERS]) == 0
    cache.put(("k", 1), b"v", tables=frozenset({USERS}), ttl=60, now=0.0)
    assert cache.invalidate_database(USERS[0]) == 33  # ORDERS is in the same database
    cache.put(("k", 3), b"v", tables=frozenset({USERS}), ttl=60, now=0.0)
    assert cache.invalidate_tables([USERS]) == 1
    check_all(cache)
