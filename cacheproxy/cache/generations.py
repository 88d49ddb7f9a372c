"""Shared-tier exactness, sans-IO: key names, generation stamps, the entry format, and the verdict on a lookup.

The rule. Every dependency id an entry has (`TableId` names: tables, row buckets "t\\x00<bucket>" and "t\\x00*",
and the database itself, `WHOLE_DATABASE`) has a generation key in the shared tier. A writer sets each name it
wrote to a fresh random value ("bumps" it) before its commit is acknowledged to its client; an entry records the
values it was filled under, read before its query went upstream; a reader fetches the entry and the current values
in one MGET and serves the entry only if every value is equal. A generation key that is missing (a restart, an
eviction, a key deleted by hand) can never equal a recorded value, so a lost tier reads as "everything changed".

Why random values, not counters: a counter that is lost and recreated starts again at 1 and could equal what an old
entry recorded; 63 random bits cannot (in any practical sense), and only equality is ever asked.

Slots. Every key of one (cluster, database) carries the same hash tag, ``{cp:<system id>:<database digest>}``, so
that an entry and all its generation keys share one Redis Cluster slot: the check is one MGET, with no script and
no cross-slot request. The cost: one database's shared entries live on one master (databases spread over masters).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import orjson
import zstandard

from cacheproxy.cache.entry import WHOLE_DATABASE, TableId

_MAGIC = b"CPS1"
_HEADER = struct.Struct(">4sBI")  # magic, flags, length of the metadata (JSON) that follows
_COMPRESSED = 1
_VERSION = b"1"  # in every key: a change of format or meaning changes every key


class Outcome(Enum):
    """What a lookup found."""

    HIT = "hit"  # the entry, filled under the current generations
    MISS = "miss"  # no entry
    STALE = "stale"  # an entry filled under other generations (a write since, or a late fill)
    CHANGED = "changed"  # a generation key is missing: everything it covers is taken as changed


@dataclass(frozen=True, slots=True)
class SharedEntry:
    """A decoded shared entry."""

    value: bytes
    names: tuple[str, ...]
    generations: tuple[bytes, ...]
    expires_at: float  # wall-clock seconds (time.time()): a TTL is the key's own expiry too
    query: str
    rule: str | None


class Namespace:
    """The key names of one database of one PostgreSQL cluster (see the module docstring for the hash tag)."""

    __slots__ = ("database", "tag")

    def __init__(self, system_id: str, database: str) -> None:
        digest = hashlib.blake2b(database.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
        self.database = database
        self.tag = f"{{cp{_VERSION.decode()}:{system_id}:{digest}}}".encode()

    def entry_key(self, key: Hashable) -> bytes:
        return self.tag + b"e:" + key_digest(key)

    def lock_key(self, key: Hashable) -> bytes:
        return self.tag + b"l:" + key_digest(key)

    def generation_key(self, name: str) -> bytes:
        return self.tag + b"g:" + name.encode("utf-8", "surrogateescape")


def key_digest(key: Hashable) -> bytes:
    """A cache key (cache/keys.py: a tuple of str, bytes, ints and int tuples) as 32 hex digits, the same in every
    process: repr() of those types is stable (unlike hash(), salted per process).

    >>> key_digest(("q", "db", "u", b"s", b"SELECT 1")) == key_digest(("q", "db", "u", b"s", b"SELECT 1"))
    True
    """
    return hashlib.blake2b(repr(tuple(key) if isinstance(key, tuple) else key).encode(), digest_size=16).hexdigest(
    ).encode()  # fmt: skip


def dependency_names(tables: Iterable[TableId]) -> tuple[str, ...]:
    r"""The generation names an entry depends on: its dependency ids' names, and always the database's own.

    >>> dependency_names([("db", "b"), ("db", "a\x001")])
    ('\x00', 'a\x001', 'b')
    """
    return tuple(sorted({name for _, name in tables} | {WHOLE_DATABASE}))


def encode_entry(entry: SharedEntry, compress_above: int) -> bytes:
    """The stored bytes: a header, the metadata as JSON, then the wire bytes (zstd-compressed when large)."""
    meta = orjson.dumps(
        {
            "n": list(entry.names),
            "g": [g.decode() for g in entry.generations],
            "x": entry.expires_at,
            "q": entry.query,
            "r": entry.rule,
        }
    )
    body = entry.value
    flags = 0
    if len(body) > compress_above:
        packed = zstandard.ZstdCompressor(level=1).compress(body)
        if len(packed) < len(body):
            body, flags = packed, _COMPRESSED
    return _HEADER.pack(_MAGIC, flags, len(meta)) + meta + body


def decode_entry(blob: bytes) -> SharedEntry | None:
    """The entry stored as `blob`; None when it is not one of ours (another format version, garbage)."""
    if len(blob) < _HEADER.size:
        return None
    magic, flags, length = _HEADER.unpack_from(blob)
    if magic != _MAGIC or len(blob) < _HEADER.size + length:
        return None
    try:
        meta = orjson.loads(blob[_HEADER.size : _HEADER.size + length])
        body = blob[_HEADER.size + length :]
        if flags & _COMPRESSED:
            body = zstandard.ZstdDecompressor().decompress(body)
        return SharedEntry(
            body,
            tuple(meta["n"]),
            tuple(g.encode() for g in meta["g"]),
            float(meta["x"]),
            str(meta["q"]),
            meta["r"],
        )
    except (orjson.JSONDecodeError, zstandard.ZstdError, KeyError, TypeError, ValueError):
        return None


def judge(
    blob: bytes | None, names: Sequence[str], current: Sequence[bytes | None], now_wall: float
) -> tuple[Outcome, SharedEntry | None]:
    """The verdict on one lookup: the entry's bytes (None: absent) and the current generation values of `names`
    (None: missing), as one MGET returned them. A hit only when the entry was filled for exactly these names under
    exactly these values, and has not expired."""
    if any(value is None for value in current):
        return Outcome.CHANGED, None
    if blob is None:
        return Outcome.MISS, None
    entry = decode_entry(blob)
    if entry is None or entry.names != tuple(names) or entry.generations != tuple(current):
        return Outcome.STALE, None
    if entry.expires_at <= now_wall:
        return Outcome.MISS, None
    return Outcome.HIT, entry


def new_generation(random_bits: int) -> bytes:
    """A generation value from 63 random bits (the caller draws them: this module does no I/O)."""
    return str(random_bits).encode()
