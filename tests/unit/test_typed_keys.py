"""Typed cache keys: named parts, still tuples (equal and hashing alike), and typed again after a snapshot."""

from __future__ import annotations

from cacheproxy.cache.engine import CacheEngine
from cacheproxy.cache.keys import DescribeKey, ExecuteKey, QueryKey, describe_key, execute_key, query_key, typed
from cacheproxy.snapshot.format import VERSION, Header, decode_snapshot, encode_snapshot

KEYS = [
    query_key("app", "alice", b"\x01" * 16, b"SELECT 1"),
    execute_key("app", "bob", b"\x02" * 16, b"SELECT $1", (23,), b"\x00\x00\x00\x01", 10),
    describe_key("app", "bob", b"", b"SELECT $1", (23,)),
]


def test_parts_have_names() -> None:
    query, execute, describe = KEYS
    assert isinstance(query, QueryKey) and (query.kind, query.database, query.sql) == ("q", "app", b"SELECT 1")
    assert isinstance(execute, ExecuteKey) and (execute.param_types, execute.max_rows) == ((23,), 10)
    assert isinstance(describe, DescribeKey) and describe.user == "bob"


def test_a_typed_key_is_the_plain_tuple_of_its_parts() -> None:
    for key in KEYS:
        plain = tuple(key)
        assert key == plain and hash(key) == hash(plain)
        assert typed(plain) == key and type(typed(plain)) is type(key)
    assert typed(("q", "too", "short")) == ("q", "too", "short")  # not a key of ours: left as it is


def test_snapshot_gives_keys_back_typed() -> None:
    engine = CacheEngine(max_memory=1 << 20, max_entry_size=1 << 16, shards=1)
    for key in KEYS:
        engine.put(key, b"value", tables=frozenset({("app", "t")}), ttl=60.0, now=0.0)
    header = Header(version=VERSION, created_at=0.0, system_identifier="", wal_lsn="", rules="", databases={})
    _, records, _ = decode_snapshot(encode_snapshot(header, engine.entries(), 0.0))
    assert sorted((type(r.key).__name__, r.key) for r in records) == sorted((type(k).__name__, k) for k in KEYS)
