"""One cache shard: an LRU list within a byte budget, a reverse index table -> keys, TTL expiry and counters.

Rules (sans-IO: time is the `now` argument, monotonic seconds; nothing here reads a clock):

- An entry is expired once `now >= expires_at`; `get` never returns one. An entry with a stale-if-error window
  (`stale_for`) is kept until `stale_until` (expires_at + stale_for): only `get_stale` returns it then. `get` removes
  an expired entry past that window it meets (an expiration and a miss); `sweep` removes those it visits; `put`
  counts an LRU victim that had already expired as an expiration, not an eviction.
- `bytes` is always the sum of the live entries' `size` and never exceeds `max_bytes`.
- The index maps each TableId to the keys of the live entries that depend on it; a table with no live dependents
  has no index key.
- Counters: `hits + misses` == number of `get` calls; `sets` counts stored entries; `evictions` entries dropped for
  room; `expirations` entries dropped because expired; `invalidations` entries dropped by `invalidate`,
  `invalidate_database` or `clear`. `remove` (a targeted delete by the owner) counts nothing.

The LRU order is an intrusive doubly linked list through the entries (`Entry._prev` / `_next`) around a root
sentinel: root._next is the least recently used entry, root._prev the most recent. A list (rather than an
OrderedDict) because the sweep keeps a cursor *into* the order across calls, which an OrderedDict cannot do without
copying its keys; a hit still costs a dict lookup plus a few pointer writes, with no allocation.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

from cacheproxy.cache.entry import DETACHED, Entry, TableId, make_sentinel


class Shard:
    """An LRU + TTL + byte-budget cache segment. Not thread-safe (the proxy calls it from one event loop)."""

    __slots__ = (
        "_cursor",
        "_entries",
        "_index",
        "_on_new_table",
        "_root",
        "bytes",
        "evictions",
        "expirations",
        "hits",
        "invalidations",
        "max_bytes",
        "misses",
        "sets",
    )

    def __init__(self, max_bytes: int, on_new_table: Callable[[TableId], None] | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"a shard's max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.sets = 0
        self.evictions = 0
        self.expirations = 0
        self.invalidations = 0
        self._entries: dict[Hashable, Entry] = {}
        self._index: dict[TableId, set[Hashable]] = {}
        # Told when the index gains a table: the engine keeps which shards hold which tables, so that invalidating a
        # table (or a row) visits only those shards.
        self._on_new_table = on_new_table
        self._root = make_sentinel()
        # The next entry the sweep looks at; the root means "start a new pass at the LRU end".
        self._cursor = self._root

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> int:
        """Gauge: number of live entries."""
        return len(self._entries)

    # -- the hot path -------------------------------------------------------------------------------------------

    def get(self, key: Hashable, now: float, *, count_miss: bool = True, count_hit: bool = True) -> Entry | None:
        """The live entry for `key` (moved to the MRU end, hits + 1), or None (expired ones are removed).

        `count_miss=False` for probes that are not a query's own lookup (is this statement known to parse?);
        `count_hit=False` for lookups whose entry may yet not be served (the caller counts it with `count`)."""
        entry = self._entries.get(key)
        if entry is None:
            if count_miss:
                self.misses += 1
            return None
        if now >= entry.expires_at:
            if now >= entry.stale_until:  # (kept while stale-if-error may still serve it)
                self._drop(entry)
                self.expirations += 1
            if count_miss:
                self.misses += 1
            return None
        root = self._root
        if entry._next is not root:  # not already the most recent: move it there
            if self._cursor is entry:
                self._cursor = entry._next
            prev, nxt = entry._prev, entry._next
            prev._next = nxt
            nxt._prev = prev
            last = root._prev
            last._next = entry
            entry._prev = last
            entry._next = root
            root._prev = entry
        if count_hit:
            entry.hits += 1
            self.hits += 1
        return entry

    def get_stale(self, key: Hashable, now: float) -> Entry | None:
        """Stale-if-error only (the upstream cannot be reached): the entry for `key` if it is live or expired less
        than its `stale_for` ago. Counts nothing and leaves the LRU order alone (the caller counts stale serves)."""
        entry = self._entries.get(key)
        if entry is None or now >= entry.stale_until:
            return None
        return entry

    def expire_database(self, database: str, now: float) -> int:
        """The database's invalidation feed was lost: its entries expire now. Those without a stale-if-error window
        are removed (counted as invalidations), the others kept for their window (`Entry.expire`). Returns how many
        were removed."""
        doomed: list[Entry] = []
        entries = self._entries
        seen: set[Hashable] = set()
        for table in [table for table in self._index if table[0] == database]:
            for key in self._index.get(table, ()):
                if key in seen:
                    continue
                seen.add(key)
                entry = entries[key]
                if entry.stale_for > 0:
                    entry.expire(now)
                else:
                    doomed.append(entry)
        for entry in doomed:
            self._drop(entry)
        self.invalidations += len(doomed)
        return len(doomed)

    def count(self, entry: Entry | None) -> None:
        """Count a lookup made with `count_hit=False` / `count_miss=False` once its outcome is known: a hit of
        `entry` (served), or a miss (None: the query went upstream)."""
        if entry is None:
            self.misses += 1
        else:
            entry.hits += 1
            self.hits += 1

    def put(self, entry: Entry, now: float) -> bool:
        """Store `entry` as the most recent, replacing any entry with its key and evicting from the LRU end until it
        fits. False (and nothing changes) if the entry alone is larger than the shard's budget."""
        if entry.size > self.max_bytes:
            return False
        old = self._entries.get(entry.key)
        if old is not None:
            self._drop(old)
        root = self._root
        while self.bytes + entry.size > self.max_bytes:
            # Cannot reach the root: an empty shard has bytes == 0 and entry.size <= max_bytes.
            victim = root._next
            self._drop(victim)
            if now >= victim.expires_at:
                self.expirations += 1
            else:
                self.evictions += 1
        key = entry.key
        self._entries[key] = entry
        last = root._prev
        last._next = entry
        entry._prev = last
        entry._next = root
        root._prev = entry
        index = self._index
        for table in entry.tables:
            keys = index.get(table)
            if keys is None:
                index[table] = {key}
                if self._on_new_table is not None:
                    self._on_new_table(table)
            else:
                keys.add(key)
        self.bytes += entry.size
        self.sets += 1
        return True

    # -- removal ------------------------------------------------------------------------------------------------

    def remove(self, key: Hashable) -> bool:
        """Delete `key`'s entry if present (counts nothing: the caller knows why)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        self._drop(entry)
        return True

    def invalidate(self, tables: Iterable[TableId], dropped: list[Entry] | None = None) -> int:
        """Remove every entry that depends on any of `tables`; O(entries removed). Returns that count; the entries
        are appended to `dropped` when given (write-through refreshes them)."""
        removed = 0
        entries = self._entries
        for table in tables:
            keys = self._index.pop(table, None)
            if keys is None:
                continue
            # `keys` is out of the index now, so _drop's index cleanup cannot mutate the set we iterate.
            for key in keys:
                entry = entries[key]
                self._drop(entry)
                if dropped is not None:
                    dropped.append(entry)
            removed += len(keys)
        self.invalidations += removed
        return removed

    def invalidate_database(self, database: str, dropped: list[Entry] | None = None) -> int:
        """Remove every entry that depends on a table of `database`. O(distinct tables indexed + entries removed).

        The proxy gives every entry a dependency on its database (entry.database_id), so this drops entries that read
        no table too; an entry put with no dependency at all belongs to no database and stays."""
        return self.invalidate([table for table in self._index if table[0] == database], dropped)

    def clear(self) -> int:
        """Remove everything (counted as invalidations). Returns the number of entries removed."""
        removed = len(self._entries)
        root = self._root
        node = root._next
        while node is not root:  # detach each entry so none stays reachable through a neighbour held elsewhere
            nxt = node._next
            node._prev = node._next = DETACHED
            node = nxt
        root._prev = root._next = root
        self._cursor = root
        self._entries.clear()
        self._index.clear()
        self.bytes = 0
        self.invalidations += removed
        return removed

    def sweep(self, now: float, max_checks: int) -> int:
        """Active expiry, one bounded step: look at up to `max_checks` entries (never more than the shard holds),
        continuing from where the previous call stopped, oldest first; remove the expired ones.

        The cursor walks from the LRU end to the MRU end, then starts a new pass. Entries that move (a hit) or
        arrive (a put) go behind the cursor's direction of travel, to the MRU end, so every entry present when a
        pass starts is looked at during that pass unless it is removed first. Returns the number removed."""
        root = self._root
        node = self._cursor
        removed = 0
        for _ in range(min(max_checks, len(self._entries))):
            if node is root:
                node = root._next  # wrap: a new pass (the shard is not empty: len() bounds the loop)
            nxt = node._next
            if now >= node.stale_until:
                self._drop(node)
                removed += 1
            node = nxt
        self._cursor = node
        self.expirations += removed
        return removed

    # -- for operators and tests ------------------------------------------------------------------------------

    def snapshot(self) -> list[Entry]:
        """The live entries, least recently used first (a copy: safe to hold while the shard changes)."""
        result: list[Entry] = []
        root = self._root
        node = root._next
        while node is not root:
            result.append(node)
            node = node._next
        return result

    def check_invariants(self) -> None:
        """Raise AssertionError if the list, dict, index, cursor or byte count disagree. O(n): tests only."""
        listed = self.snapshot()
        assert len(listed) == len(self._entries), "list and dict sizes differ"
        root = self._root
        prev = root
        for entry in listed:
            assert entry._prev is prev, "broken back link"
            assert self._entries.get(entry.key) is entry, "listed entry not in dict"
            prev = entry
        assert root._prev is prev, "root's back link is not the last entry"
        assert sum(entry.size for entry in listed) == self.bytes, "bytes differs from the sum of sizes"
        assert self.bytes <= self.max_bytes, "over budget"
        assert self._cursor is root or self._entries.get(self._cursor.key) is self._cursor, "dangling cursor"
        expected: dict[TableId, set[Hashable]] = {}
        for entry in listed:
            for table in entry.tables:
                expected.setdefault(table, set()).add(entry.key)
        assert self._index == expected, "reverse index differs from the entries' tables"

    # -- the one place an entry leaves the shard --------------------------------------------------------------

    def _drop(self, entry: Entry) -> None:
        key = entry.key
        del self._entries[key]
        if self._cursor is entry:
            self._cursor = entry._next
        prev, nxt = entry._prev, entry._next
        prev._next = nxt
        nxt._prev = prev
        entry._prev = entry._next = DETACHED
        index = self._index
        for table in entry.tables:
            keys = index.get(table)
            if keys is not None:  # None while `invalidate` walks this table's (already popped) key set
                keys.discard(key)
                if not keys:
                    del index[table]
        self.bytes -= entry.size
