"""Writing a snapshot file from the cache, loading one into it, and inspecting one: the I/O around `format`."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from cacheproxy.cache.engine import CacheEngine
from cacheproxy.cache.entry import WHOLE_DATABASE, TableId, base_table
from cacheproxy.config import Config, UpstreamConfig
from cacheproxy.snapshot import evidence
from cacheproxy.snapshot.format import (
    BLOCK_TARGET,
    VERSION,
    Block,
    BlockSealer,
    End,
    Header,
    Record,
    SnapshotCorrupt,
    SnapshotDecoder,
    Unencodable,
    encode_entry,
    encode_header,
)

log = logging.getLogger("cacheproxy.snapshot")

READ_CHUNK = 1024 * 1024
# Why an entry of the file was not loaded (the metric's `reason` label).
DROP_REASONS = ("expired", "changed", "no_evidence", "rules_changed", "rejected")


class SnapshotFailed(Exception):
    """A snapshot could not be written (the previous file, if any, is untouched)."""


@dataclass(slots=True)
class WriteResult:
    path: str
    entries: int
    skipped: int
    size: int
    seconds: float


@dataclass(slots=True)
class LoadResult:
    """What a load did. `outcome`: loaded, missing, corrupt, foreign, unverifiable."""

    outcome: str
    loaded: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    aside: str | None = None


class Evidence(Protocol):
    """What identifies the upstream and proves a snapshot's entries still valid: PostgreSQL's system identifier and
    per-table counters (`PostgresEvidence`), or MySQL's server identity and binlog (cacheproxy/mysql/evidence.py)."""

    errors: tuple[type[BaseException], ...]  # what reading it may raise: a failure, never a bug

    async def read_cluster(self) -> evidence.Cluster: ...

    async def read_database(self, database: str) -> dict[str, object]: ...

    async def unchanged(self, header: Header, followed: set[str] | None) -> dict[TableId, bool]: ...


class PostgresEvidence:
    """The PostgreSQL front end's evidence (evidence.py), read over control connections as the URL's user."""

    errors: tuple[type[BaseException], ...] = evidence.ERRORS

    def __init__(self, upstream: UpstreamConfig) -> None:
        self.upstream = upstream

    async def read_cluster(self) -> evidence.Cluster:
        return await evidence.read_cluster(self.upstream, _control_database(self.upstream))

    async def read_database(self, database: str) -> dict[str, object]:
        return await evidence.read_database(self.upstream, database)

    async def unchanged(self, header: Header, followed: set[str] | None) -> dict[TableId, bool]:
        return await _unchanged_tables(header, self.upstream, followed)


def rules_fingerprint(config: Config) -> str:
    """A digest of what decides TTLs and cacheability: the rules and the default TTL."""
    text = repr((config.rules, config.cache.default_ttl))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _control_database(upstream: UpstreamConfig) -> str:
    return upstream.database or upstream.user or "postgres"


# -- writing -----------------------------------------------------------------------------------------------------


async def write_snapshot(
    path: str,
    engine: CacheEngine,
    upstream: UpstreamConfig,
    rules: str,
    clock: Callable[[], float],
    source: Evidence | None = None,
) -> WriteResult:
    """Write the cache to `path`: a temp file, fsync, atomic rename, fsync of the directory.

    Evidence is read BEFORE the entries are written: a write that lands while the entries are being written then
    shows as a change on load (a needless drop at worst), whereas evidence read after could include a write whose
    invalidation the file no longer reflects, and vouch for the stale entry. The event loop encodes one block
    (~1 MiB) at a time; compression, checksums and file writes run in a worker thread (zstd and file I/O release
    the GIL), so extra memory is one block and its compressed copy.
    """
    started = time.monotonic()
    databases: set[str] = set()
    for index in range(engine.shard_count):
        databases.update(table[0] for entry in engine.shard_entries(index) for table in entry.tables)
        await asyncio.sleep(0)
    source = source if source is not None else PostgresEvidence(upstream)
    try:
        cluster = await source.read_cluster()
    except source.errors as exc:
        raise SnapshotFailed(f"cannot read the upstream's identity: {_describe(exc)}") from exc
    known: dict[str, object] = {}
    for database in sorted(databases):
        try:
            known[database] = await source.read_database(database)
        except source.errors as exc:  # its entries are left out: without evidence they could not be trusted
            log.warning("snapshot: database %r left out, its evidence cannot be read: %s", database, _describe(exc))
    header = Header(VERSION, time.time(), cluster.system_identifier, cluster.wal_lsn, rules, known, cluster.timeline)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        written, skipped, size = await _write_file(tmp, header, engine, set(known), clock)
        await asyncio.to_thread(_commit, tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return WriteResult(path, written, skipped, size, time.monotonic() - started)


async def _write_file(
    tmp: str, header: Header, engine: CacheEngine, databases: set[str], clock: Callable[[], float]
) -> tuple[int, int, int]:
    sealer = BlockSealer()
    skipped = 0
    # Each table's generation when its entries were copied out of their shard: one that changes before the file is
    # finished was invalidated by a write meanwhile, and the trailer tells the loader to drop its entries.
    generations: dict[TableId, int] = {}
    with open(tmp, "wb") as file:
        size = await asyncio.to_thread(file.write, encode_header(header))
        out: list[bytes] = []
        count = raw = 0
        for index in range(engine.shard_count):
            now = clock()
            wall_offset = time.time() - now
            entries = engine.shard_entries(index)
            for table in {table for entry in entries for table in entry.tables}.difference(generations):
                generations[table] = engine.generations((table,))[0]
            for entry in entries:
                if entry.expired(now) or any(table[0] not in databases for table in entry.tables):
                    skipped += 1
                    continue
                mark = len(out)
                try:
                    encode_entry(entry, wall_offset, out)
                except Unencodable:
                    skipped += 1
                    continue
                count += 1
                raw += sum(len(part) for part in out[mark:])
                if raw >= BLOCK_TARGET:
                    size += await asyncio.to_thread(_seal_and_write, file, sealer, out, count)
                    out, count, raw = [], 0, 0
                    now = clock()
                    wall_offset = time.time() - now
            await asyncio.sleep(0)
        if count:
            size += await asyncio.to_thread(_seal_and_write, file, sealer, out, count)
        invalidated = [table for table, gen in generations.items() if engine.generations((table,))[0] != gen]
        size += await asyncio.to_thread(_finish, file, sealer, invalidated)
    return sealer.entries, skipped, size


def _seal_and_write(file: BinaryIO, sealer: BlockSealer, parts: list[bytes], count: int) -> int:
    block = sealer.seal(b"".join(parts), count)
    file.write(block)
    return len(block)


def _finish(file: BinaryIO, sealer: BlockSealer, invalidated: list[TableId]) -> int:
    trailer = sealer.trailer(invalidated)
    file.write(trailer)
    file.flush()
    os.fsync(file.fileno())
    return len(trailer)


def _commit(tmp: str, path: str) -> None:
    """Rename the synced temp file over `path`, then fsync the directory so the rename itself is durable."""
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- loading -----------------------------------------------------------------------------------------------------


async def load_snapshot(
    path: str,
    engine: CacheEngine,
    upstream: UpstreamConfig,
    rules: str,
    clock: Callable[[], float],
    listen: Callable[[list[str]], Awaitable[set[str]]] | None = None,
    source: Evidence | None = None,
) -> LoadResult:
    """Load `path` into `engine`, keeping only entries that are live and whose every table shows no change.

    `listen`, when given, starts following the invalidations of the snapshot's databases and returns those that are
    followed now: it is called before the change evidence is read, so that a write committed after that reading is
    heard of, and the entries of the other databases are dropped (their writes in between could be missed).

    Never raises for a bad file: a corrupt, truncated, unknown-version or foreign file is renamed aside
    (`<path>.bad-<timestamp>`), logged in one line, and the cache is left empty (a cold start).
    """
    started = time.monotonic()
    _remove_leftovers(path)
    if not os.path.exists(path):
        log.info("snapshot: no file at %s: cold start", path)
        return LoadResult("missing")
    try:
        result = await _load(path, engine, source if source is not None else PostgresEvidence(upstream), rules,
                             clock, listen)  # fmt: skip
    except SnapshotCorrupt as exc:
        engine.flush()  # whatever was put from the valid blocks before the damage: a bad file serves nothing
        aside = _set_aside(path)
        log.error("snapshot: %s is unusable (%s); kept aside as %s; cold start", path, exc, aside)
        result = LoadResult("corrupt", aside=aside)
    except OSError as exc:
        engine.flush()
        log.error("snapshot: cannot read %s (%s); cold start", path, exc)
        result = LoadResult("corrupt")
    result.seconds = time.monotonic() - started
    return result


async def _load(
    path: str,
    engine: CacheEngine,
    source: Evidence,
    rules: str,
    clock: Callable[[], float],
    listen: Callable[[list[str]], Awaitable[set[str]]] | None,
) -> LoadResult:
    decoder = SnapshotDecoder()
    with open(path, "rb") as file:
        header = _read_header(file, decoder)
        try:
            cluster = await source.read_cluster()
        except source.errors as exc:
            log.error("snapshot: cannot verify %s against the upstream (%s); cold start", path, _describe(exc))
            return LoadResult("unverifiable")
        if cluster.system_identifier != header.system_identifier:
            raise SnapshotCorrupt(
                f"taken from another cluster (system identifier {header.system_identifier}, "
                f"the upstream is {cluster.system_identifier})"
            )
        if header.timeline is not None and cluster.timeline is not None and header.timeline != cluster.timeline:
            # A failover happened since (a promoted standby): it may have lost commits the entries were read from.
            raise SnapshotCorrupt(
                f"written before a failover (on timeline {header.timeline}, the upstream is on timeline "
                f"{cluster.timeline})"
            )
        if header.rules != rules:
            log.warning("snapshot: the rules changed since %s was written; its entries are not loaded", path)
            return LoadResult("loaded", dropped=Counter(rules_changed=_count_rest(file, decoder)))
        followed = await listen(list(header.databases)) if listen is not None else None
        try:
            valid = await source.unchanged(header, followed)
        except source.errors as exc:
            log.error("snapshot: cannot verify %s against the upstream (%s); cold start", path, _describe(exc))
            return LoadResult("unverifiable")
        result = LoadResult("loaded")
        while True:
            event = _next(file, decoder)
            if isinstance(event, End):
                _drop_invalidated(event, engine, valid, result)
                break
            if not isinstance(event, Block):  # pragma: no cover - the decoder yields one header, then blocks
                raise SnapshotCorrupt("unexpected event")
            _put_block(event, engine, valid, clock, result)
            await asyncio.sleep(0)
        _next(file, decoder)  # anything after the trailer is damage
    log.info(
        "snapshot: loaded %d entries from %s (taken %s ago); dropped: %s",
        result.loaded,
        path,
        _age(header.created_at),
        ", ".join(f"{n} {reason}" for reason, n in sorted(result.dropped.items())) or "none",
    )
    return result


def _put_block(
    block: Block, engine: CacheEngine, valid: dict[TableId, bool], clock: Callable[[], float], result: LoadResult
) -> None:
    wall = time.time()
    now = clock()
    for record in block.records:
        reason = _drop_reason(record, valid, wall)
        if reason is None and not engine.put(
            record.key,
            record.value,
            tables=record.tables,
            ttl=record.expires_at - wall,
            now=now,
            query=record.query,
            rule=record.rule,
        ):
            reason = "rejected"
        if reason is None:
            result.loaded += 1
        else:
            result.dropped[reason] += 1


def _drop_invalidated(end: End, engine: CacheEngine, valid: dict[TableId, bool], result: LoadResult) -> None:
    """Drop the entries of tables the proxy invalidated while the file was being written (listed in the trailer).
    They are already in the engine; nothing is served yet, so removing them now is as good as never loading them."""
    tables = {table for table in end.invalidated if valid.get(_evidence_id(table))}
    if tables:
        removed = engine.invalidate_tables(tables)
        result.loaded -= removed
        result.dropped["changed"] += removed


def _evidence_id(table: TableId) -> TableId:
    """Row-level dependency ids ("t\\x00<bucket>") are covered by their table's evidence; the database's own id
    (WHOLE_DATABASE) by its catalog digest (evidence.read_database)."""
    if table[1] == WHOLE_DATABASE:
        return table
    return (table[0], base_table(table[1]))


def _drop_reason(record: Record, valid: dict[TableId, bool], wall: float) -> str | None:
    if record.expires_at <= wall:
        return "expired"
    for table in record.tables:
        unchanged = valid.get(_evidence_id(table))
        if unchanged is None:
            return "no_evidence"
        if not unchanged:
            return "changed"
    return None


async def _unchanged_tables(header: Header, upstream: UpstreamConfig, followed: set[str] | None) -> dict[TableId, bool]:
    """Per (database, table) with evidence both then and now: whether it is unchanged. Tables not in the result
    have no evidence on one side, or their database's invalidations are not `followed`; only the entries of
    unchanged tables may be loaded."""
    valid: dict[TableId, bool] = {}
    for database, then in header.databases.items():
        if followed is not None and database not in followed:
            log.warning("snapshot: entries of database %r dropped: its invalidation feed is not up", database)
            continue
        try:
            now = await evidence.read_database(upstream, database)
        except evidence.ERRORS as exc:
            log.warning("snapshot: entries of database %r dropped, no evidence now: %s", database, _describe(exc))
            continue
        old_tables, new_tables = then.get("tables") if isinstance(then, dict) else None, now["tables"]
        if not isinstance(old_tables, dict) or not isinstance(new_tables, dict):
            continue
        same_database = then.get("oid") == now["oid"]  # else dropped and re-created under the same name
        for name, digest in old_tables.items():
            if name in new_tables:
                valid[(database, name)] = same_database and new_tables[name] == digest
    return valid


def _read_header(file: BinaryIO, decoder: SnapshotDecoder) -> Header:
    event = _next(file, decoder)
    if not isinstance(event, Header):  # pragma: no cover - the decoder yields the header first
        raise SnapshotCorrupt("no header")
    return event


def _next(file: BinaryIO, decoder: SnapshotDecoder) -> Header | Block | End | None:
    """The decoder's next event, reading more of `file` as needed; None only after the trailer at end of file."""
    while True:
        event = decoder.next_event()
        if event is not None:
            return event
        chunk = file.read(READ_CHUNK)
        if not chunk and decoder.finished:
            return None
        decoder.receive_data(chunk)


def _count_rest(file: BinaryIO, decoder: SnapshotDecoder) -> int:
    """Validate the rest of the file (so a damaged one is still set aside) and count its entries."""
    entries = 0
    while True:
        event = _next(file, decoder)
        if isinstance(event, Block):
            entries += len(event.records)
        elif isinstance(event, End):
            _next(file, decoder)
            return entries


def _remove_leftovers(path: str) -> None:
    """Delete temp files of writes that never finished (a crash or kill mid-write): never valid, never read."""
    for leftover in glob.glob(glob.escape(path) + ".tmp-*"):
        with contextlib.suppress(OSError):
            os.unlink(leftover)
            log.info("snapshot: removed %s, left by an interrupted write", leftover)


def _set_aside(path: str) -> str | None:
    aside = f"{path}.bad-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    try:
        os.replace(path, aside)
    except OSError as exc:
        log.error("snapshot: cannot move %s aside: %s", path, exc)
        return None
    return aside


def _age(created_at: float) -> str:
    return f"{max(0.0, time.time() - created_at):.0f}s"


def _describe(exc: BaseException) -> str:
    return exc.__class__.__name__ + (f": {exc}" if str(exc) else "")
