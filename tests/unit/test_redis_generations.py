"""cache/generations.py: the shared tier's key names, entry format and lookup verdicts (no sockets)."""

from __future__ import annotations

import pytest

from cacheproxy.cache import keys
from cacheproxy.cache.entry import WHOLE_DATABASE
from cacheproxy.cache.generations import (
    Namespace,
    Outcome,
    SharedEntry,
    decode_entry,
    dependency_names,
    encode_entry,
    judge,
    key_digest,
    new_generation,
)

KEY = keys.query_key("db", "alice", b"\x01" * 16, b"SELECT 1")


def _slot_tag(name: bytes) -> bytes:
    """The part of a key Redis Cluster hashes: between the first { and the next }."""
    start = name.index(b"{")
    return name[start + 1 : name.index(b"}", start)]


def test_entry_and_generation_keys_share_one_hash_tag_per_database() -> None:
    ns = Namespace("7300000000000000001", "db")
    names = [ns.entry_key(KEY), ns.lock_key(KEY), ns.generation_key("items"), ns.generation_key("items\x00*")]
    assert len({_slot_tag(name) for name in names}) == 1


def test_clusters_and_databases_never_share_keys() -> None:
    a, b, c = Namespace("1", "db"), Namespace("2", "db"), Namespace("1", "other")
    assert len({a.entry_key(KEY), b.entry_key(KEY), c.entry_key(KEY)}) == 3
    assert len({a.generation_key("t"), b.generation_key("t"), c.generation_key("t")}) == 3


def test_a_database_name_with_braces_keeps_the_tag_intact() -> None:
    ns = Namespace("1", "we}ird{db")
    assert _slot_tag(ns.entry_key(KEY)) == _slot_tag(ns.generation_key("t"))
    assert b"we}ird" not in ns.tag


def test_key_digest_differs_for_every_part_of_the_key() -> None:
    variants = [
        keys.query_key("db", "alice", b"\x01" * 16, b"SELECT 2"),
        keys.query_key("db", "bob", b"\x01" * 16, b"SELECT 1"),
        keys.query_key("db", "alice", b"\x02" * 16, b"SELECT 1"),
        keys.execute_key("db", "alice", b"\x01" * 16, b"SELECT 1", (), b"", 0),
    ]
    assert len({key_digest(key) for key in [KEY, *variants]}) == 5
    assert key_digest(KEY) == key_digest(tuple(KEY))  # a NamedTuple and its plain tuple: one key


def test_every_entry_depends_on_its_database() -> None:
    assert dependency_names([]) == (WHOLE_DATABASE,)
    assert dependency_names([("db", "b"), ("db", "a")]) == (WHOLE_DATABASE, "a", "b")


@pytest.mark.parametrize("size", [0, 100, 100_000])
def test_entries_round_trip_compressed_or_not(size: int) -> None:
    entry = SharedEntry(b"D" * size, ("\x00", "t"), (b"12", b"34"), 1e9, "SELECT", "rule")
    blob = encode_entry(entry, compress_above=4096)
    if size > 4096:
        assert len(blob) < size  # compressed
    assert decode_entry(blob) == entry


def test_garbage_is_not_an_entry() -> None:
    assert decode_entry(b"") is None
    assert decode_entry(b"CPS1\x00\x00\x00\x00\x05{") is None
    assert decode_entry(b"pickle?" * 3) is None


def _blob(generations: tuple[bytes, ...], expires_at: float = 2e9) -> bytes:
    return encode_entry(SharedEntry(b"rows", ("\x00", "t"), generations, expires_at, "q", None), 1 << 20)


def test_a_hit_needs_every_generation_equal() -> None:
    outcome, entry = judge(_blob((b"1", b"2")), ("\x00", "t"), [b"1", b"2"], 1e9)
    assert outcome is Outcome.HIT and entry is not None and entry.value == b"rows"
    assert judge(_blob((b"1", b"2")), ("\x00", "t"), [b"1", b"3"], 1e9)[0] is Outcome.STALE


def test_a_missing_generation_reads_as_changed_even_with_an_entry() -> None:
    assert judge(_blob((b"1", b"2")), ("\x00", "t"), [b"1", None], 1e9)[0] is Outcome.CHANGED
    assert judge(None, ("\x00", "t"), [None, None], 1e9)[0] is Outcome.CHANGED


def test_an_entry_filled_for_other_dependencies_is_stale() -> None:
    # (a reader whose catalog maps the query to other tables than the filler's did)
    assert judge(_blob((b"1", b"2")), ("\x00", "u"), [b"1", b"2"], 1e9)[0] is Outcome.STALE


def test_expired_and_absent_entries_miss() -> None:
    assert judge(_blob((b"1", b"2"), expires_at=5.0), ("\x00", "t"), [b"1", b"2"], 6.0)[0] is Outcome.MISS
    assert judge(None, ("\x00", "t"), [b"1", b"2"], 6.0)[0] is Outcome.MISS


def test_generations_are_decimal_bytes() -> None:
    assert new_generation(42) == b"42"
