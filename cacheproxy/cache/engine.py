"""The result cache: routes keys to shards, guards fills against invalidation races, and totals the counters.

Fill-race guard. The proxy fills lazily: on a miss it sends the query upstream and stores the result when it
arrives. A write committed meanwhile invalidates the tables, but the result in flight may predate that write. So
the proxy takes `generations(tables)` before sending the query and passes it to `put`, which refuses the result if
any of those tables has been invalidated since. A table's generation is the sum of three counters that only grow:
the global one (bumped by `flush`), its database's (bumped by `invalidate_database`) and its own (bumped by
`invalidate_tables`), so any of those invalidations changes it.

Sharding only splits the LRU lists and dicts into smaller ones; every shard has `max_memory // shards` bytes. The
shard of a key is `hash(key) & (shards - 1)`. Python's str/bytes hashes are salted per process: that is fine for
choosing an in-memory shard, and it means a snapshot is reloaded by `put`ting its entries again, never by shard
number.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, fields

from cacheproxy.cache.entry import Entry, TableId
from cacheproxy.cache.shard import Shard


@dataclass(slots=True, unsafe_hash=True)
class CacheStats:
    """Counters (since start) and gauges (now) of a shard or, summed with `+`, of the whole cache.

    `rejected` counts `put`s that stored nothing: too big, ttl <= 0, or a fill that raced an invalidation.
    """

    hits: int = 0
    misses: int = 0
    sets: int = 0
    evictions: int = 0
    expirations: int = 0
    invalidations: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0
    rejected: int = 0

    def __init__(
        self,
        hits: int = 0,
        misses: int = 0,
        sets: int = 0,
        evictions: int = 0,
        expirations: int = 0,
        invalidations: int = 0,
        entries: int = 0,
        bytes: int = 0,
        max_bytes: int = 0,
        rejected: int = 0,
    ) -> None:
        self.hits = hits
        self.misses = misses
        self.sets = sets
        self.evictions = evictions
        self.expirations = expirations
        self.invalidations = invalidations
        self.entries = entries
        self.bytes = bytes
        self.max_bytes = max_bytes
        self.rejected = rejected

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


class CacheEngine:
    """The in-memory result cache. Sans-IO: every time-dependent method takes `now` (monotonic seconds)."""

    __slots__ = (
        "_db_generations",
        "_global_generation",
        "_holders",
        "_mask",
        "_max_entry_size",
        "_max_memory",
        "_rejected",
        "_shards",
        "_sweep_next",
        "_table_generations",
    )

    def __init__(self, *, max_memory: int, max_entry_size: int, shards: int) -> None:
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"shards must be a power of two, got {shards}")
        if max_memory < shards:
            raise ValueError(f"max_memory must be at least one byte per shard, got {max_memory} for {shards} shards")
        if max_entry_size <= 0:
            raise ValueError(f"max_entry_size must be positive, got {max_entry_size}")
        self._max_memory = max_memory
        self._max_entry_size = max_entry_size
        # Table -> bit mask of the shards whose index has it (bits are set when a shard first indexes a table and
        # cleared when the table is invalidated; a bit may outlive the entries, which only costs a visit).
        self._holders: dict[TableId, int] = {}
        self._shards = [Shard(max_memory // shards, self._holder(index)) for index in range(shards)]
        self._mask = shards - 1
        self._rejected = [0] * shards  # per shard, so that the shards' stats add up to the total
        self._sweep_next = 0
        self._global_generation = 0
        self._db_generations: dict[str, int] = {}
        # One int per distinct table ever invalidated; never shrinks (a dropped counter could make an old
        # generations() tuple match again).
        self._table_generations: dict[TableId, int] = {}

    def _holder(self, index: int) -> Callable[[TableId], None]:
        bit = 1 << index
        holders = self._holders

        def note(table: TableId) -> None:
            holders[table] = holders.get(table, 0) | bit

        return note

    @property
    def max_memory(self) -> int:
        return self._max_memory

    @property
    def max_entry_size(self) -> int:
        return self._max_entry_size

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    def __len__(self) -> int:
        return sum(len(shard) for shard in self._shards)

    def shard_for(self, key: Hashable) -> Shard:
        return self._shards[hash(key) & self._mask]

    # -- lookups and fills --------------------------------------------------------------------------------------

    def get(self, key: Hashable, now: float, *, count_miss: bool = True, count_hit: bool = True) -> Entry | None:
        """The live entry for `key`, or None. The returned entry's `value` is the stored bytes object itself."""
        return self._shards[hash(key) & self._mask].get(key, now, count_miss=count_miss, count_hit=count_hit)

    def get_stale(self, key: Hashable, now: float) -> Entry | None:
        """Stale-if-error: the entry for `key`, live or expired within its stale window (see Shard.get_stale)."""
        return self._shards[hash(key) & self._mask].get_stale(key, now)

    def count(self, key: Hashable, entry: Entry | None) -> None:
        """Count an uncounted lookup of `key` now that its outcome is known: served from `entry`, or (None) sent
        upstream. Hits and misses then say what reached the server."""
        self._shards[hash(key) & self._mask].count(entry)

    def generations(self, tables: Iterable[TableId]) -> tuple[int, ...]:
        """One generation per table, in `sorted(tables)` order; take it before the query goes upstream.

        An empty table set gives `(global generation,)`, so a `flush` still refuses a table-less fill in flight."""
        base = self._global_generation
        if isinstance(tables, frozenset) and len(tables) == 1:  # the common case: no sorting, no generator
            for table in tables:
                return (base + self._db_generations.get(table[0], 0) + self._table_generations.get(table, 0),)
        ordered = sorted(tables)
        if not ordered:
            return (base,)
        db_gens = self._db_generations
        table_gens = self._table_generations
        # (a list comprehension: one call, where a generator is resumed once per table; this runs twice per miss)
        return tuple([base + db_gens.get(table[0], 0) + table_gens.get(table, 0) for table in ordered])

    def put(
        self,
        key: Hashable,
        value: bytes,
        *,
        tables: frozenset[TableId],
        ttl: float,
        now: float,
        query: str = "",
        rule: str | None = None,
        generations: tuple[int, ...] | None = None,
        stale_for: float = 0.0,
    ) -> bool:
        """Store `value` (not copied) under `key` for `ttl` seconds. False, counted as `rejected`, when: ttl is not
        positive, the entry's accounted size exceeds max_entry_size or the shard's budget, or `generations` (from
        `generations(tables)` before the query went upstream) no longer matches: the result may predate a write."""
        index = hash(key) & self._mask
        entry = self._admit(key, value, tables, ttl, now, query, rule, generations)
        if entry is not None and stale_for > 0:
            entry.stale_for = stale_for
            entry.stale_until = entry.expires_at + stale_for
        if entry is not None and self._shards[index].put(entry, now):
            return True
        self._rejected[index] += 1
        return False

    def _admit(
        self,
        key: Hashable,
        value: bytes,
        tables: frozenset[TableId],
        ttl: float,
        now: float,
        query: str,
        rule: str | None,
        generations: tuple[int, ...] | None,
    ) -> Entry | None:
        if not ttl > 0:  # also refuses NaN
            return None
        if generations is not None and generations != self.generations(tables):
            return None
        entry = Entry(key, value, tables=tables, created_at=now, expires_at=now + ttl, query=query, rule=rule)
        if entry.size > self._max_entry_size:
            return None
        return entry

    # -- invalidation -------------------------------------------------------------------------------------------

    def invalidate_tables(self, tables: Iterable[TableId], dropped: list[Entry] | None = None) -> int:
        """Bump each table's generation (even with nothing cached), then remove its dependents from every shard.

        Each shard finds dependents through its reverse index: O(shards x tables) dict lookups plus O(entries
        removed), never a scan of the entries. Returns the number of entries removed; they are appended to
        `dropped` when given."""
        targets = set(tables)
        table_gens = self._table_generations
        holders = self._holders
        mask = 0
        for table in targets:  # first, so that a fill racing with this call is refused by put()
            table_gens[table] = table_gens.get(table, 0) + 1
            mask |= holders.pop(table, 0)
        removed = 0
        index = 0
        while mask:
            if mask & 1:
                removed += self._shards[index].invalidate(targets, dropped)
            mask >>= 1
            index += 1
        return removed

    def invalidate_database(self, database: str, dropped: list[Entry] | None = None) -> int:
        """Bump `database`'s generation (changing every one of its tables' generations), then remove its entries."""
        self._db_generations[database] = self._db_generations.get(database, 0) + 1
        for table in [table for table in self._holders if table[0] == database]:
            del self._holders[table]
        return sum(shard.invalidate_database(database, dropped) for shard in self._shards)

    def expire_database(self, database: str, now: float) -> int:
        """Its invalidation feed was lost: like `invalidate_database` (fills in flight are refused), except that
        entries with a stale-if-error window expire now and are kept for it. Returns the number removed."""
        self._db_generations[database] = self._db_generations.get(database, 0) + 1
        return sum(shard.expire_database(database, now) for shard in self._shards)

    def flush(self) -> int:
        """Remove everything and bump the global generation (refusing every fill in flight)."""
        self._global_generation += 1
        self._holders.clear()
        return sum(shard.clear() for shard in self._shards)

    # -- maintenance --------------------------------------------------------------------------------------------

    def sweep(self, now: float, max_checks: int = 256) -> int:
        """One bounded step of active expiry: at most `max_checks` entries looked at, over shards taken in turn
        (each continues its own pass where it left off). Returns the number of expired entries removed."""
        removed = 0
        remaining = max_checks
        shards = self._shards
        for _ in range(len(shards)):
            if remaining <= 0:
                break
            shard = shards[self._sweep_next]
            self._sweep_next = (self._sweep_next + 1) & self._mask
            checks = min(remaining, len(shard))
            removed += shard.sweep(now, checks)
            remaining -= checks
        return removed

    # -- for operators ------------------------------------------------------------------------------------------

    def shard_stats(self) -> list[CacheStats]:
        return [
            CacheStats(
                hits=shard.hits,
                misses=shard.misses,
                sets=shard.sets,
                evictions=shard.evictions,
                expirations=shard.expirations,
                invalidations=shard.invalidations,
                entries=len(shard),
                bytes=shard.bytes,
                max_bytes=shard.max_bytes,
                rejected=rejected,
            )
            for shard, rejected in zip(self._shards, self._rejected, strict=True)
        ]

    def stats(self) -> CacheStats:
        """The sum of `shard_stats()`."""
        return sum(self.shard_stats(), CacheStats())

    def shard_entries(self, index: int) -> list[Entry]:
        """The live entries of shard `index`, LRU first (a copy: the snapshot writer walks the cache a shard at a
        time, yielding to the event loop in between)."""
        return self._shards[index].snapshot()

    def entries(self) -> Iterator[Entry]:
        """Every live entry, shard by shard, LRU first within a shard. Each shard is copied when reached, so the
        cache may change during the iteration (later shards then show their state at that later moment)."""
        for shard in self._shards:
            yield from shard.snapshot()
