"""The in-memory result cache: entries, LRU/TTL shards with a table index, and the sharded engine (sans-IO)."""

from cacheproxy.cache.engine import CacheEngine, CacheStats
from cacheproxy.cache.entry import ENTRY_OVERHEAD, KEY_OVERHEAD, Entry, TableId, key_size
from cacheproxy.cache.shard import Shard

__all__ = ["ENTRY_OVERHEAD", "KEY_OVERHEAD", "CacheEngine", "CacheStats", "Entry", "Shard", "TableId", "key_size"]
