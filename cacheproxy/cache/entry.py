"""One cached result (`Entry`), the unit of invalidation (`TableId`) and the byte accounting of an entry."""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Final

# (database, table name): the unit of invalidation. Deliberately coarse: the proxy maps schema-qualified names onto
# it, so a write to any schema's table `t` invalidates every cached `t` of that database.
TableId = tuple[str, str]

# Row-level dependencies use the same (database, name) ids, with names that no table can have (identifiers never hold
# NUL): "t\x00<bucket>" for the point reads of keys in that bucket of `t`, "t\x00*" for every other read of `t`
# (analysis/points.py). A write to one row invalidates its bucket and "t\x00*"; a write to `t` invalidates "t", on
# which both kinds depend too. Keys are bucketed so that the engine's generation counters stay bounded.
ROW_BUCKETS: Final = 16384  # at most this many generation counters per table (about 1.6 MB)


# Every entry also depends on its database as a whole, under a name no table can have: a result that reads no table
# (`SELECT f()`, `SELECT 'ok'::mood > 'sad'::mood`, a Describe's type OIDs) still depends on the database's catalog
# (function bodies, types, privileges), so invalidating the database (DDL, GRANT/REVOKE, a catalog change seen by the
# poll, a lost feed) must drop it too.
WHOLE_DATABASE: Final = "\x00"


def database_id(database: str) -> TableId:
    return (database, WHOLE_DATABASE)


def row_id(table: str, key: int) -> str:
    r"""The dependency id of the point reads of `key` in `table`.

    >>> row_id("accounts", 16385) == row_id("accounts", 1) == "accounts\x001"
    True
    >>> base_table(row_id("accounts", -5)), base_table(any_row("accounts")), base_table("accounts")
    ('accounts', 'accounts', 'accounts')
    """
    return f"{table}\x00{key % ROW_BUCKETS}"


def any_row(table: str) -> str:
    return f"{table}\x00*"


def base_table(name: str) -> str:
    """The table a dependency id belongs to (itself for a table name)."""
    return name.partition("\x00")[0]


# Fixed bytes accounted per entry on top of its value, key and query text: the Entry object, its slot in the shard's
# dict, its links and its reverse-index memberships. An estimate, not a measurement: it only has to be the right size
# so that a budget full of tiny results still holds a bounded number of entries.
ENTRY_OVERHEAD: Final = 200

# Fixed bytes accounted per key (the tuple object and its hash slot), on top of its str/bytes members.
KEY_OVERHEAD: Final = 64


def key_size(key: Hashable) -> int:
    """Cheap estimate of a key's memory: the len() of its str/bytes members (nested tuples included) + KEY_OVERHEAD.

    >>> key_size(("db", "user", b"SELECT 1"))
    78
    >>> key_size(42)
    64
    """
    return KEY_OVERHEAD + _members_len(key)


def _members_len(part: object) -> int:
    # A loop over the key's members, recursing only into nested tuples: this runs for every fill.
    if isinstance(part, str | bytes):
        return len(part)
    if not isinstance(part, tuple):
        return 0  # ints, None, ...: covered by the fixed overhead
    total = 0
    for member in part:
        kind = type(member)
        if kind is str or kind is bytes:
            total += len(member)
        elif kind is not int:
            total += _members_len(member)
    return total


class Entry:
    """A cached result: the backend's wire bytes, served as-is (never copied), and what it depends on.

    Everything but `hits` is fixed at creation. `_prev` / `_next` are the shard's LRU links: only `Shard` touches
    them (an intrusive list, so that a hit moves the entry without allocating and a sweep can keep a cursor).
    """

    __slots__ = (
        "_next",
        "_prev",
        "created_at",
        "expires_at",
        "hits",
        "key",
        "query",
        "rule",
        "size",
        "stale_for",
        "stale_until",
        "stamp",
        "tables",
        "value",
    )

    key: Hashable
    value: bytes
    tables: frozenset[TableId]
    size: int
    created_at: float
    expires_at: float
    hits: int
    query: str
    rule: str | None
    stale_for: float
    stale_until: float
    stamp: object  # what a tier that checks generations at each hit keeps with the entry (workers/engine.py)
    _prev: Entry
    _next: Entry

    def __init__(
        self,
        key: Hashable,
        value: bytes,
        *,
        tables: frozenset[TableId],
        created_at: float,
        expires_at: float,
        query: str = "",
        rule: str | None = None,
        stale_for: float = 0.0,
    ) -> None:
        self.key = key
        self.value = value
        self.tables = tables
        # len(query) counts characters, not UTF-8 bytes: close enough for SQL text, and no encode() per put.
        self.size = len(value) + key_size(key) + len(query) + ENTRY_OVERHEAD
        self.created_at = created_at
        self.expires_at = expires_at
        self.hits = 0
        self.query = query
        self.rule = rule
        # Stale-if-error (opt-in per rule): kept this long past its expiry, served then only while the upstream
        # cannot be reached (get_stale); never by `get`.
        self.stale_for = stale_for
        self.stale_until = expires_at + stale_for
        self.stamp = None
        # _prev / _next stay unset until a Shard links the entry.

    def expired(self, now: float) -> bool:
        """True once `now` has reached the entry's expiry time (an entry with expires_at == now is expired)."""
        return now >= self.expires_at

    def gone(self, now: float) -> bool:
        """Expired and past its stale-if-error window: nothing may serve it any more (the shard drops it)."""
        return now >= self.stale_until

    def expire(self, now: float) -> None:
        """Expire the entry now (if later), its stale window counted from now: its freshness can no longer be
        vouched for (the invalidation feed was lost), but stale-if-error may still serve it."""
        if now < self.expires_at:
            self.expires_at = now
        self.stale_until = min(self.stale_until, now + self.stale_for)

    def ttl_left(self, now: float) -> float:
        """Seconds until expiry (0.0 once expired); for operators."""
        return max(0.0, self.expires_at - now)

    def __repr__(self) -> str:
        return (
            f"Entry(key={self.key!r}, size={self.size}, tables={sorted(self.tables)!r}, "
            f"expires_at={self.expires_at!r}, hits={self.hits}, rule={self.rule!r})"
        )


def make_sentinel() -> Entry:
    """An Entry that is never a real result: a list root, or the DETACHED marker. Never expires; links to itself."""
    entry = Entry(object(), b"", tables=frozenset(), created_at=0.0, expires_at=math.inf)
    entry._prev = entry._next = entry
    return entry


# What a removed entry's links point at. Not the entry itself: a self-loop is a reference cycle, and an evicted entry
# (with its possibly large value) would then wait for a full GC pass instead of being freed by reference counting.
DETACHED: Final[Entry] = make_sentinel()
