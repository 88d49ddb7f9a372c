"""CacheTier: the interface the request path stores and looks up results through (the seam for a shared tier).

The request path's tier is `CacheEngine`, in process memory. The shared tier (shared_tier.py: Redis / Valkey,
filled and read by every sidecar) sits behind it rather than behind this Protocol, because its lookups are awaited:
on an in-process miss the relay waits for `SharedTier.lookup`, which puts a shared hit into this tier, and the
request is dispatched again and served from here; stores here are passed on to it. Keys are cache.keys NamedTuples
(stable across processes: the shared tier digests them, as a snapshot writes them); `generations` is the in-process
fill-race guard (cache/engine.py explains it), which the shared tier gives across processes with generation keys
(cache/generations.py).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Protocol

from cacheproxy.cache.entry import Entry, TableId


class CacheTier(Protocol):
    """What the relay and the cache service need of a cache tier."""

    def get(self, key: Hashable, now: float, *, count_miss: bool = True, count_hit: bool = True) -> Entry | None:
        """The live entry for `key`, or None. Counted as a hit or miss unless told not to (`count` does it later)."""
        ...

    def get_stale(self, key: Hashable, now: float) -> Entry | None:
        """Stale-if-error, while the upstream cannot be reached: the entry if live or expired within its
        `stale_for` window; counts nothing. Never used while the upstream answers."""
        ...

    def count(self, key: Hashable, entry: Entry | None) -> None:
        """Count an uncounted lookup of `key` once its outcome is known: served from `entry`, or (None) sent
        upstream."""
        ...

    def generations(self, tables: Iterable[TableId]) -> tuple[int, ...]:
        """Taken before a query goes upstream; `put` refuses the result if any table was invalidated since."""
        ...

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
        """Store a result that depends on `tables`; False when refused (too big, expired, or stale: generations)."""
        ...

    def invalidate_tables(self, tables: Iterable[TableId], dropped: list[Entry] | None = None) -> int:
        """Drop every entry that depends on one of `tables` (appended to `dropped` when given); how many."""
        ...

    def invalidate_database(self, database: str, dropped: list[Entry] | None = None) -> int:
        """Drop every entry of `database`; how many."""
        ...

    def expire_database(self, database: str, now: float) -> int:
        """Its invalidation feed was lost: every entry of `database` expires now; those with a stale-if-error
        window are kept for it, the rest dropped (how many)."""
        ...
