"""The snapshot format, sans-IO: round trips, and every kind of damage detected (no sockets, no files)."""

from __future__ import annotations

import random

import pytest

from cacheproxy.cache.engine import CacheEngine
from cacheproxy.cache.keys import describe_key, execute_key, query_key
from cacheproxy.snapshot.format import (
    MAGIC,
    VERSION,
    Block,
    End,
    Header,
    SnapshotCorrupt,
    SnapshotDecoder,
    Unencodable,
    decode_snapshot,
    encode_entry,
    encode_header,
    encode_snapshot,
)

HEADER = Header(
    version=VERSION,
    created_at=1_700_000_000.5,
    system_identifier="7301234567890123456",
    wal_lsn="0/1A2B3C4",
    rules="0" * 32,
    databases={"app": {"oid": 16384, "tables": {"items": "ab" * 16, "users": "cd" * 16}}},
)
OFFSET = 1_000_000.0  # wall-clock minus monotonic, for these tests


def _engine(entries: int = 300, value_size: int = 5000) -> CacheEngine:
    engine = CacheEngine(max_memory=1 << 30, max_entry_size=1 << 22, shards=4)
    rng = random.Random(7)
    for i in range(entries):
        if i % 3 == 0:
            key: tuple[object, ...] = query_key("app", "alice", b"\x01" * 16, f"SELECT {i} FROM items".encode())
        elif i % 3 == 1:
            key = execute_key("app", "bob", b"\x02" * 16, b"SELECT $1", (23, -1), i.to_bytes(4, "big"), i)
        else:
            key = describe_key("app", "b\u00e9b", b"", "SELECT 'é'".encode(), ())
            key = (*key, i, ((1, 2), ("x", b"y")))
        value = rng.randbytes(value_size // 2) + bytes(value_size // 2)
        tables = frozenset({("app", "items")} if i % 2 else {("app", "items"), ("app", "users")})
        rule = None if i % 4 else "public.items"
        engine.put(key, value, tables=tables, ttl=30.0 + i, now=100.0, query=f"SELECT {i} -- é", rule=rule)
    return engine


def _snapshot(engine: CacheEngine) -> bytes:
    return encode_snapshot(HEADER, engine.entries(), OFFSET)


def test_round_trip_keeps_every_entry_identical() -> None:
    engine = _engine()
    header, records, end = decode_snapshot(_snapshot(engine))
    assert header == HEADER
    originals = {e.key: e for e in engine.entries()}
    assert end.entries == len(records) == len(originals) == 300
    assert end.blocks > 1  # several blocks, so block chaining is exercised
    for record in records:
        entry = originals[record.key]
        assert (record.value, record.tables, record.query, record.rule) == (
            entry.value,
            entry.tables,
            entry.query,
            entry.rule,
        )
        assert record.expires_at == entry.expires_at + OFFSET
        assert hash(record.key) == hash(entry.key)


def test_streaming_decoder_fed_in_small_pieces_gives_the_same_records() -> None:
    data = _snapshot(_engine(50))
    _, expected, _ = decode_snapshot(data)
    decoder = SnapshotDecoder()
    records = []
    events = []
    for i in range(0, len(data), 997):
        decoder.receive_data(data[i : i + 997])
        while (event := decoder.next_event()) is not None:
            events.append(event)
            if isinstance(event, Block):
                records += event.records
    decoder.receive_data(b"")
    assert decoder.next_event() is None and decoder.finished
    assert isinstance(events[0], Header) and isinstance(events[-1], End)
    assert records == expected


def test_empty_cache_round_trips() -> None:
    header, records, end = decode_snapshot(encode_snapshot(HEADER, [], OFFSET))
    assert header == HEADER and records == [] and (end.blocks, end.entries) == (0, 0)


def test_truncation_at_any_offset_is_refused() -> None:
    data = _snapshot(_engine(40, 3000))
    offsets = set(range(0, 400)) | set(range(len(data) - 400, len(data))) | set(range(0, len(data), 211))
    for cut in sorted(offsets):
        with pytest.raises(SnapshotCorrupt):
            decode_snapshot(data[:cut])


def test_random_flipped_bytes_are_refused() -> None:
    data = _snapshot(_engine(40, 3000))
    rng = random.Random(42)
    for _ in range(400):
        damaged = bytearray(data)
        position = rng.randrange(len(data))
        damaged[position] ^= 1 << rng.randrange(8)
        with pytest.raises(SnapshotCorrupt):
            decode_snapshot(bytes(damaged))


def test_trailing_bytes_unknown_version_and_foreign_magic_are_refused() -> None:
    data = _snapshot(_engine(5))
    with pytest.raises(SnapshotCorrupt, match="after the trailer"):
        decode_snapshot(data + b"\x00")
    future = bytearray(data)
    future[len(MAGIC) : len(MAGIC) + 2] = (VERSION + 1).to_bytes(2, "big")
    with pytest.raises(SnapshotCorrupt, match="unknown format version"):
        decode_snapshot(bytes(future))
    with pytest.raises(SnapshotCorrupt, match="bad magic"):
        decode_snapshot(b"PGDMP" + data[5:])


def test_a_dropped_or_repeated_block_is_refused() -> None:
    data = _snapshot(_engine(60, 40_000))
    decoder = SnapshotDecoder()
    decoder.receive_data(data)
    header_len = len(encode_header(HEADER))
    sizes = []
    while (event := decoder.next_event()) is not None:
        if isinstance(event, Block):
            sizes.append(event.stored_size)
    first = data[header_len : header_len + sizes[0]]
    rest = data[header_len + sizes[0] :]
    with pytest.raises(SnapshotCorrupt):
        decode_snapshot(data[:header_len] + rest)  # first block lost
    with pytest.raises(SnapshotCorrupt):
        decode_snapshot(data[:header_len] + first + first + rest)  # a block twice


def test_keys_that_are_not_str_bytes_int_tuple_are_never_written() -> None:
    engine = CacheEngine(max_memory=1 << 20, max_entry_size=1 << 16, shards=1)
    engine.put(("q", 1.5), b"v", tables=frozenset(), ttl=10, now=0)
    [entry] = engine.entries()
    out: list[bytes] = [b"before"]
    with pytest.raises(Unencodable):
        encode_entry(entry, 0.0, out)
    assert out == [b"before"]
