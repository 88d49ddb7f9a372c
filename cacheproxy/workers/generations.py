"""SharedGenerations: invalidation generation counters in memory shared by the worker processes of one host.

Why: with `server.workers` > 1 every worker has its own cache, and a write committed through one worker must make
every worker's entries of what it wrote unservable BEFORE that commit is acknowledged to its client. Messages
between processes cannot promise that (the other worker may be busy); a memory store can. The writing worker
bumps counters here synchronously, before the reply leaves it; a worker about to serve an entry reads the counters
the entry was filled under and serves it only if none moved (a few array reads).

Layout: one anonymous shared mapping (made by the supervisor before it forks the workers, so every worker and
every restarted worker maps the same pages) of `slots` x `writers` unsigned 64-bit integers, slot-major. A slot
stands for a dependency id (cache.entry.TableId: a table, a row bucket "t\\x00<n>", a table's other reads "t\\x00*",
a database's own id) by a stable hash (crc32: Python's str hash is salted per process); slot 0 is the global
generation (a FLUSH). Each worker writes only its own column, so a bump is a plain 8-byte store by a single writer:
no lock (a worker killed mid-bump cannot leave one held) and no lost update. The generation of a slot is the sum
of its columns, and every column only grows, so:

- a sum over any set of slots changes if and only if one of them was bumped (no ABA: nothing ever decreases);
- two ids that share a slot (a hash collision) only cause extra misses, never a stale answer.

Memory order: the bump is a store followed, before the client can learn of the commit, by a system call (the write
to the client's socket); a reader's load happens after its own client's request was received, a system call that
is causally after. Aligned 8-byte stores and loads (memoryview of format "Q": one memcpy of 8 bytes) do not tear
on the 64-bit platforms CPython supports.

The interface is small on purpose: `stamp(tables)` when a query goes upstream, `valid(stamp)` before serving,
`bump(tables)` / `bump_all()` when something is invalidated. A shared tier across hosts (per-table generations in
Redis) can offer the same three operations.
"""

from __future__ import annotations

import mmap
import zlib
from collections.abc import Callable, Iterable
from operator import itemgetter

from cacheproxy.cache.entry import TableId, database_id

WORD = 8  # bytes per counter
GLOBAL_SLOT = 0
# Bumped after every other bump: while it has not moved since an entry was last checked, nothing was invalidated
# anywhere, and the entry's own slots need not be read (a hit on a host with no writes reads N counters, not 4N).
CHANGES_SLOT = 1
FIRST_HASHED_SLOT = 2
DEFAULT_SLOTS = 1 << 17  # 1 MiB per worker: collisions stay rare for about 10^4 hot dependency ids
_SLOT_MEMO = 100_000  # dependency id -> slot indices, for the ids seen most; cleared whole when full


class Stamp:
    """What an entry was filled under: the counter indices to read (every worker's column of every slot it
    depends on) and their sum then; and the changes counter when it was last found valid."""

    __slots__ = ("cells", "checked", "read", "total")

    def __init__(self, cells: tuple[int, ...], total: int, checked: int) -> None:
        self.cells = cells
        self.total = total
        self.checked = checked
        self.read = _reader(cells)  # the counters' values in one C call (itemgetter), not one call per counter


def _reader(cells: tuple[int, ...]) -> Callable[[memoryview], tuple[int, ...]]:
    """itemgetter over `cells`, always returning a tuple (itemgetter of one item returns the item itself)."""
    if len(cells) == 1:
        cell = cells[0]
        return lambda view: (view[cell],)
    getter: Callable[[memoryview], tuple[int, ...]] = itemgetter(*cells)
    return getter


def mapping_size(slots: int, writers: int) -> int:
    return slots * writers * WORD


def new_mapping(slots: int, writers: int) -> mmap.mmap:
    """An anonymous shared mapping, zero-filled; made before fork() so that the children share it."""
    return mmap.mmap(-1, mapping_size(slots, writers), flags=mmap.MAP_SHARED)


class SharedGenerations:
    """The counters as seen by one writer (worker `writer` of `writers`). Sans-IO: the buffer is given."""

    __slots__ = ("_changes", "_mask", "_memo", "_read_changes", "_view", "slots", "writer", "writers")

    def __init__(self, buffer: mmap.mmap | bytearray, *, slots: int, writers: int, writer: int) -> None:
        if slots < 4 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two >= 4, got {slots}")
        if not 0 <= writer < writers:
            raise ValueError(f"writer {writer} is not one of {writers}")
        if len(buffer) < mapping_size(slots, writers):
            raise ValueError("the buffer is smaller than slots x writers counters")
        self._view = memoryview(buffer).cast("B")[: mapping_size(slots, writers)].cast("Q")
        self.slots = slots
        self.writers = writers
        self.writer = writer
        self._mask = slots - 1
        self._memo: dict[TableId, int] = {}
        self._changes = tuple(range(CHANGES_SLOT * writers, CHANGES_SLOT * writers + writers))
        self._read_changes = _reader(self._changes)

    def slot(self, table: TableId) -> int:
        """The slot of a dependency id (never the global or the changes slot)."""
        found = self._memo.get(table)
        if found is not None:
            return found
        data = f"{table[0]}\x00{table[1]}".encode("utf-8", "surrogateescape")
        found = zlib.crc32(data) & self._mask
        if found < FIRST_HASHED_SLOT:
            found += FIRST_HASHED_SLOT
        if len(self._memo) >= _SLOT_MEMO:
            self._memo.clear()
        self._memo[table] = found
        return found

    def slots_of(self, tables: Iterable[TableId]) -> list[int]:
        """The slots a result depending on `tables` must watch: each id's, each database's, and the global one."""
        slots = {GLOBAL_SLOT}
        for table in tables:
            slots.add(self.slot(table))
            slots.add(self.slot(database_id(table[0])))
        return sorted(slots)

    def stamp(self, tables: Iterable[TableId]) -> Stamp:
        """Take before the query goes upstream (and keep with the entry)."""
        view = self._view
        checked = sum(self._read_changes(view))  # first: a bump after this read is seen below or later
        writers = self.writers
        cells = tuple(slot * writers + column for slot in self.slots_of(tables) for column in range(writers))
        stamp = Stamp(cells, 0, checked)
        stamp.total = sum(stamp.read(view))
        return stamp

    @property
    def changes(self) -> memoryview:
        """Every worker's changes counter (its sum moves with every bump anywhere): for a caller's fast path."""
        base = CHANGES_SLOT * self.writers
        return self._view[base : base + self.writers]

    def valid(self, stamp: Stamp) -> bool:
        """True when nothing `stamp` watches was bumped since it was taken."""
        view = self._view
        changes = sum(self._read_changes(view))
        if changes == stamp.checked:
            return True
        if sum(stamp.read(view)) != stamp.total:
            return False
        stamp.checked = changes
        return True

    def bump(self, tables: Iterable[TableId]) -> None:
        """Invalidate these dependency ids (a database's own id invalidates all of the database)."""
        view = self._view
        writers, column = self.writers, self.writer
        for slot in {self.slot(table) for table in tables}:
            cell = slot * writers + column
            view[cell] += 1
        self._changed()

    def bump_all(self) -> None:
        cell = GLOBAL_SLOT * self.writers + self.writer
        self._view[cell] += 1
        self._changed()

    def _changed(self) -> None:
        # After the slots: a reader that sees this counter unmoved may serve, as the bump is not complete yet
        # (its writer has not released the reply that it protects).
        cell = CHANGES_SLOT * self.writers + self.writer
        self._view[cell] += 1

    def generation(self, table: TableId) -> int:
        """The current generation of `table`'s slot (for tests and operators)."""
        base = self.slot(table) * self.writers
        return sum(self._view[base : base + self.writers])

    def release(self) -> None:
        """Drop this view of the buffer (the mapping may be closed afterwards)."""
        self._view.release()
