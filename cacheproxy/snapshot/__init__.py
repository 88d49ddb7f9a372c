"""Snapshots of the result cache: written periodically, at graceful shutdown and on demand; loaded at start.

The file (format.py) holds a header (format version, creation time, the upstream's system identifier, the WAL
position, a fingerprint of the rules, and per database its oid and per-table change evidence), then the entries
(key, value, wall-clock expiry, tables, query text, rule) in zstd-compressed blocks with a crc32 each, then a
trailer. It is written to a temp file, fsynced, renamed over the old one and the directory fsynced, so a crash at
any point leaves the previous snapshot whole. Writing walks the cache a shard and a ~1 MiB block at a time and
compresses in a worker thread, so the event loop is never held for long; it never forks.

The guarantee at load. An entry is loaded only if: the file is whole and every checksum matches; the upstream has
the same system identifier as when the file was written (another cluster is refused); the rules fingerprint is
unchanged (TTLs and cacheability were decided under those rules); the entry has not expired (expiry is stored as
wall-clock time); and for every table it depends on, the evidence read now equals the evidence read just before the
entries were written. A table's evidence covers every relation of that name in any schema, with its partitions and
inheritance children: relfilenode (TRUNCATE, VACUUM FULL, CLUSTER, table rewrites) and pg_stat_user_tables'
n_tup_ins / n_tup_upd / n_tup_del / n_tup_hot_upd. Any difference (including counters going backwards), missing
evidence, or a database re-created under the same name drops the entries concerned. The evidence is read before
the entries are written, so a write landing during the write shows as a change; and the tables the proxy itself
invalidated while the file was being written are listed in the trailer and dropped at load. Entries are loaded by
`put`, never by shard number (the in-memory shard of a key is salted per process).

What it cannot see:
- Statistics are not transactional and are flushed late: PostgreSQL 15+ backends flush their counters at most once
  a second, and an idle backend only after a ~10 s timeout (up to 60 s for a backend that never goes idle); a
  backend that exits flushes at once. A write committed shortly before the proxy starts, by a client whose backend
  has not flushed yet, is invisible to the comparison. Before PostgreSQL 15, counters travel to the statistics
  collector over UDP, which may drop them under load: such a write is never seen.
- `pg_stat_reset()` / `pg_stat_reset_single_table_counters()` followed by exactly as many new writes as before the
  reset would restore equal counters; a crash or immediate shutdown of PostgreSQL resets them (showing as change).
- Changes that touch no counter and no relfilenode: e.g. a function an entry's query calls being redefined
  (only immutable functions are cached), a change of a role's settings or privileges, or a sequence's value.
- Which copy of a cluster it is: a logical replica or a new initdb has another system identifier and is refused,
  but a physical standby or a restore from a base backup shares it. Their counters differ (a standby keeps its own,
  recovery resets them), so their entries are dropped in practice, not by design.
- Within one running proxy, entries were never more consistent than the proxy's own invalidation made them: a
  write that bypassed the proxy while it ran is bounded by TTL as before, and the snapshot does not fix that.
There is no replication-based replay yet: the WAL position is recorded for information and for that future use.

Loading happens before the listener accepts clients: loading while serving could resurrect an entry after a
write through the proxy invalidated its table (the write's invalidation would run, then the snapshot's older
entry would be put back), and would also serve entries whose evidence has not been checked yet.
"""

from cacheproxy.snapshot.format import SnapshotCorrupt
from cacheproxy.snapshot.store import (
    DROP_REASONS,
    LoadResult,
    SnapshotFailed,
    WriteResult,
    load_snapshot,
    rules_fingerprint,
    write_snapshot,
)

__all__ = [
    "DROP_REASONS",
    "LoadResult",
    "SnapshotCorrupt",
    "SnapshotFailed",
    "WriteResult",
    "load_snapshot",
    "rules_fingerprint",
    "write_snapshot",
]
