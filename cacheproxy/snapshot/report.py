"""`cacheproxy snapshot inspect PATH`: a snapshot's header, entries per table, sizes and validity, offline."""

from __future__ import annotations

import os
import time
from collections import Counter

from cacheproxy.snapshot.format import Block, End, Header, SnapshotCorrupt, SnapshotDecoder

_CHUNK = 1024 * 1024


def inspect_snapshot(path: str, now: float | None = None) -> tuple[bool, str]:
    """(valid, a human-readable report). Reads the file alone: no upstream, so evidence is shown, not checked."""
    now = time.time() if now is None else now
    lines = [f"file: {path} ({os.path.getsize(path)} bytes)"]
    decoder = SnapshotDecoder()
    header: Header | None = None
    per_table: Counter[str] = Counter()
    entries = expired = raw = stored = value_bytes = blocks = 0
    error: str | None = None
    try:
        with open(path, "rb") as file:
            while not decoder.finished:
                event = decoder.next_event()
                if event is None:
                    decoder.receive_data(file.read(_CHUNK))
                elif isinstance(event, Header):
                    header = event
                    lines += _header_lines(event, now)
                elif isinstance(event, Block):
                    blocks += 1
                    raw += event.raw_size
                    stored += event.stored_size
                    for record in event.records:
                        entries += 1
                        value_bytes += len(record.value)
                        expired += record.expires_at <= now
                        per_table.update(f"{db}.{table}" for db, table in sorted(record.tables))
                elif isinstance(event, End):
                    decoder.receive_data(file.read(_CHUNK))
                    decoder.receive_data(b"")
                    decoder.next_event()
    except SnapshotCorrupt as exc:
        error = str(exc)
    if header is not None:
        lines.append(f"entries: {entries} in {blocks} blocks ({expired} expired now)")
        lines.append(f"sizes: values {value_bytes} bytes, records {raw} bytes, compressed {stored} bytes")
        lines.append("entries per table:")
        lines += [f"  {table}: {count}" for table, count in sorted(per_table.items())] or ["  (none)"]
    lines.append(f"valid: {'no: ' + error if error else 'yes'}")
    return error is None, "\n".join(lines) + "\n"


def _header_lines(header: Header, now: float) -> list[str]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(header.created_at))
    lines = [
        f"format version: {header.version}",
        f"created: {created} ({now - header.created_at:.0f}s ago)",
        f"system identifier: {header.system_identifier}",
        f"WAL position: {header.wal_lsn}",
        f"rules fingerprint: {header.rules}",
    ]
    for database, evidence in sorted(header.databases.items()):
        tables = evidence.get("tables", {}) if isinstance(evidence, dict) else {}
        oid = evidence.get("oid") if isinstance(evidence, dict) else None
        lines.append(f"database {database} (oid {oid}): evidence for {len(tables)} tables")
    return lines
