"""SharedCacheEngine: one worker's cache, kept exact against the other workers' writes by shared generations.

Each worker caches in its own memory (a `CacheEngine`); what makes the workers' caches one is `SharedGenerations`
(generations.py): every invalidation this worker makes (its clients' writes, the feeds, the admin console) bumps the
shared counters first, synchronously; every entry keeps the counters' sum it was filled under (taken before its
query went upstream: the fill-race guard of cache/engine.py, across processes), and a hit serves it only if that sum
has not moved. So a write acknowledged through any worker is never followed by a hit on an older entry in any other.

The invalidations are also handed to `notify` (the in-host channel sends them to the other workers, which drop the
entries with the `drop_*` methods). That is only to free memory early: the generation check alone is exact, and an
entry found stale at a hit is dropped then.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

from cacheproxy.cache.engine import CacheEngine
from cacheproxy.cache.entry import Entry, TableId, database_id
from cacheproxy.workers.generations import SharedGenerations, Stamp

# What `notify` is told: ("t", database, names) tables, ("d", database, ()) a whole database, ("a", "", ()) all.
Dropped = tuple[str, str, tuple[str, ...]]


class SharedCacheEngine(CacheEngine):
    """A CacheEngine whose generations are the host's shared ones (see the module docstring)."""

    __slots__ = ("_changes", "_gens", "_notify", "stale_hits")

    def __init__(
        self,
        *,
        max_memory: int,
        max_entry_size: int,
        shards: int,
        generations: SharedGenerations,
        notify: Callable[[Dropped], None] | None = None,
    ) -> None:
        super().__init__(max_memory=max_memory, max_entry_size=max_entry_size, shards=shards)
        self._gens = generations
        self._changes = generations.changes
        self._notify = notify
        self.stale_hits = 0  # entries found invalidated (by another worker) at a lookup, and dropped then

    @property
    def shared(self) -> SharedGenerations:
        return self._gens

    # -- lookups and fills --------------------------------------------------------------------------------------

    def get(self, key: Hashable, now: float, *, count_miss: bool = True, count_hit: bool = True) -> Entry | None:
        # The hot path: while the host's changes counter has not moved since the entry was last found valid,
        # nothing was invalidated anywhere and its slots are not read (valid() does the rest).
        shard = self._shards[hash(key) & self._mask]
        entry = shard.get(key, now, count_miss=count_miss, count_hit=False)
        if entry is None:
            return None
        stamp: Stamp | None = entry.stamp  # type: ignore[assignment]
        if stamp is not None and sum(self._changes) != stamp.checked and not self._gens.valid(stamp):
            shard.remove(key)
            shard.invalidations += 1
            self.stale_hits += 1
            if count_miss:
                shard.misses += 1
            return None
        if count_hit:
            entry.hits += 1
            shard.hits += 1
        return entry

    def generations(self, tables: Iterable[TableId]) -> tuple[int, ...]:
        """The shared stamp as a tuple: the changes counter, the sum, then the counter indices it reads."""
        stamp = self._gens.stamp(tables)
        return (stamp.checked, stamp.total, *stamp.cells)

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
        current = self.generations(tables)
        # (the changes counter, first, may have moved for other slots: only the sum over these slots must match)
        if generations is not None and generations[1:] != current[1:]:
            return None
        entry = super()._admit(key, value, tables, ttl, now, query, rule, None)
        if entry is not None:
            # Without `generations` (a snapshot being loaded), the entry is valid as of now. Its stamp is the one
            # taken before the query went upstream, which still matches.
            taken = generations if generations is not None else current
            entry.stamp = Stamp(taken[2:], taken[1], taken[0])
        return entry

    # -- invalidation: shared first, then this worker's memory, then the others' (asynchronously) -------------

    def invalidate_tables(self, tables: Iterable[TableId], dropped: list[Entry] | None = None) -> int:
        targets = list(tables)
        self._gens.bump(targets)
        if self._notify is not None:
            by_database: dict[str, list[str]] = {}
            for database, name in targets:
                by_database.setdefault(database, []).append(name)
            for database, names in by_database.items():
                self._notify(("t", database, tuple(names)))
        return super().invalidate_tables(targets, dropped)

    def invalidate_database(self, database: str, dropped: list[Entry] | None = None) -> int:
        self._gens.bump((database_id(database),))
        if self._notify is not None:
            self._notify(("d", database, ()))
        return super().invalidate_database(database, dropped)

    def flush(self) -> int:
        self._gens.bump_all()
        if self._notify is not None:
            self._notify(("a", "", ()))
        return super().flush()

    # -- what another worker invalidated: already unservable here (its bump); free the memory ----------------

    def drop(self, what: Dropped) -> int:
        kind, database, names = what
        if kind == "t":
            return super().invalidate_tables([(database, name) for name in names])
        if kind == "d":
            return super().invalidate_database(database)
        return super().flush()
