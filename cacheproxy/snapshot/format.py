"""The snapshot file format: sans-IO encoder and decoder (bytes in, bytes or events out; no files, clocks or awaits).

Layout (all integers big-endian)::

    header   MAGIC (8) | version u16 | length u32 | JSON metadata (length bytes) | crc32 u32
    block    b"B" | entries u32 | raw length u32 | compressed length u32 | crc32 u32 | zstd frame
    ...
    trailer  b"T" | blocks u32 | entries u64 | chain u32 | length u32 | JSON list of invalidated tables |
             crc32 u32 | END_MAGIC (8)

A header's crc covers version, length and metadata; a block's crc covers its first 13 bytes and its compressed
payload; `chain` is the crc32 of every block's crc in order, so a lost, repeated or reordered block is detected; the
trailer's crc covers all of the trailer. The invalidated tables are those the proxy invalidated while the entries
were being written: their entries in this file may predate the write, and the loader drops them. A file is valid
only once its trailer has been read and nothing follows it: a truncated file is never half-trusted.

An entry record inside a block (uncompressed)::

    key (tagged, below) | value: u32 length + bytes | expires_at: f64 wall-clock seconds |
    tables: u16 count, each (str database, str table) | query: str | rule: u8 present + str

where `str` is a u32 length and UTF-8 bytes. Keys are tuples of str, bytes, int and tuples (cache/keys.py) and are
written with a tagged encoding of our own, never pickle (loading a pickle runs code chosen by whoever wrote the file):
``s`` str, ``b`` bytes, ``i`` int (i64), ``t`` tuple (u32 count, then its members).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import zstandard

from cacheproxy.cache.entry import Entry, TableId
from cacheproxy.cache.keys import typed

MAGIC = b"\x89CPSNAP\n"
END_MAGIC = b"CPSNEND\n"
VERSION = 1
# Refuse absurd lengths before allocating: a flipped bit in a length must not become a multi-GiB allocation.
MAX_HEADER = 64 * 1024 * 1024
MAX_BLOCK = 256 * 1024 * 1024
# A block is sealed once its raw records reach this size: small enough that encoding it on the event loop takes
# well under a millisecond, large enough that zstd compresses well and per-block overhead is negligible.
BLOCK_TARGET = 1024 * 1024
ZSTD_LEVEL = 3

_HEAD = struct.Struct(">HI")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_CRC = struct.Struct(">I")
_BLOCK = struct.Struct(">cIII")  # tag, entries, raw length, compressed length (the crc follows)
_TRAILER = struct.Struct(">cIQII")  # tag, blocks, entries, chain, invalidated length (JSON, then the crc follow)


class SnapshotCorrupt(Exception):
    """The bytes are not a whole, valid snapshot of a version we read: truncated, damaged, foreign or too new."""


class Unencodable(ValueError):
    """A key holds a type the format cannot write (the entry is skipped, never pickled)."""


@dataclass(frozen=True, slots=True)
class Header:
    """The snapshot's metadata. `databases` maps a database name to {"oid": int, "tables": {name: evidence}}."""

    version: int
    created_at: float
    system_identifier: str
    wal_lsn: str | None
    rules: str
    databases: dict[str, Any]
    timeline: int | None = None  # the upstream's WAL timeline when written (absent in older files)


@dataclass(frozen=True, slots=True)
class Record:
    """One entry as stored: `expires_at` is wall-clock (time.time()) seconds."""

    key: Hashable
    value: bytes
    expires_at: float
    tables: frozenset[TableId]
    query: str
    rule: str | None


@dataclass(frozen=True, slots=True)
class Block:
    records: list[Record]
    raw_size: int
    stored_size: int


@dataclass(frozen=True, slots=True)
class End:
    blocks: int
    entries: int
    invalidated: frozenset[TableId] = frozenset()


# -- encoding ----------------------------------------------------------------------------------------------------


def encode_header(header: Header) -> bytes:
    meta = orjson.dumps(
        {
            "created_at": header.created_at,
            "system_identifier": header.system_identifier,
            "wal_lsn": header.wal_lsn,
            "rules": header.rules,
            "databases": header.databases,
            "timeline": header.timeline,
        }
    )
    body = _HEAD.pack(header.version, len(meta)) + meta
    return MAGIC + body + _CRC.pack(zlib.crc32(body))


def _str(text: str, out: list[bytes]) -> None:
    data = text.encode()
    out.append(_U32.pack(len(data)))
    out.append(data)


def encode_key(key: object, out: list[bytes]) -> None:
    """Append the tagged encoding of `key` to `out`; Unencodable for anything but str/bytes/int/tuple."""
    if isinstance(key, str):
        out.append(b"s")
        _str(key, out)
    elif isinstance(key, bytes):
        out.append(b"b")
        out.append(_U32.pack(len(key)))
        out.append(key)
    elif isinstance(key, int) and not isinstance(key, bool):
        if not -(2**63) <= key < 2**63:
            raise Unencodable(f"int out of range: {key}")
        out.append(b"i")
        out.append(_I64.pack(key))
    elif isinstance(key, tuple):
        out.append(b"t")
        out.append(_U32.pack(len(key)))
        for member in key:
            encode_key(member, out)
    else:
        raise Unencodable(f"cannot store a key member of type {type(key).__name__}")


def encode_entry(entry: Entry, wall_offset: float, out: list[bytes]) -> None:
    """Append one record; `wall_offset` is time.time() - time.monotonic(), turning expiry into wall-clock time.
    On Unencodable, `out` is left as it was."""
    mark = len(out)
    try:
        encode_key(entry.key, out)
    except Unencodable:
        del out[mark:]
        raise
    value = entry.value
    out.append(_U32.pack(len(value)))
    out.append(value)
    out.append(_F64.pack(entry.expires_at + wall_offset))
    out.append(_U16.pack(len(entry.tables)))
    for database, table in sorted(entry.tables):
        _str(database, out)
        _str(table, out)
    _str(entry.query, out)
    if entry.rule is None:
        out.append(b"\x00")
    else:
        out.append(b"\x01")
        _str(entry.rule, out)


class BlockSealer:
    """Compresses and frames blocks, and writes the trailer. Not thread-safe: one caller at a time, in order."""

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level)
        self.blocks = 0
        self.entries = 0
        self._chain = 0

    def seal(self, raw: bytes, count: int) -> bytes:
        payload = self._compressor.compress(raw)
        prefix = _BLOCK.pack(b"B", count, len(raw), len(payload))
        crc = zlib.crc32(payload, zlib.crc32(prefix))
        crc_bytes = _CRC.pack(crc)
        self._chain = zlib.crc32(crc_bytes, self._chain)
        self.blocks += 1
        self.entries += count
        return prefix + crc_bytes + payload

    def trailer(self, invalidated: Iterable[TableId] = ()) -> bytes:
        tables = orjson.dumps(sorted(invalidated))
        body = _TRAILER.pack(b"T", self.blocks, self.entries, self._chain, len(tables)) + tables
        return body + _CRC.pack(zlib.crc32(body)) + END_MAGIC


def encode_snapshot(header: Header, entries: Iterable[Entry], wall_offset: float) -> bytes:
    """A whole snapshot in memory (tests and tools; the proxy streams blocks instead)."""
    sealer = BlockSealer()
    parts = [encode_header(header)]
    out: list[bytes] = []
    count = size = 0
    for entry in entries:
        mark = len(out)
        encode_entry(entry, wall_offset, out)
        count += 1
        size += sum(len(p) for p in out[mark:])
        if size >= BLOCK_TARGET:
            parts.append(sealer.seal(b"".join(out), count))
            out, count, size = [], 0, 0
    if count:
        parts.append(sealer.seal(b"".join(out), count))
    parts.append(sealer.trailer())
    return b"".join(parts)


# -- decoding ----------------------------------------------------------------------------------------------------


class SnapshotDecoder:
    """Feed bytes with `receive_data`, then call `next_event()` until it returns None (it needs more data).

    Events come in order: one Header, any number of Blocks, one End. `receive_data(b"")` marks the end of the file;
    after it, a missing trailer or trailing bytes raise SnapshotCorrupt. Raises SnapshotCorrupt on any damage.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._state = "header"  # header -> blocks -> done
        self._blocks = 0
        self._entries = 0
        self._chain = 0
        self._decompressor = zstandard.ZstdDecompressor()

    @property
    def finished(self) -> bool:
        """The trailer has been read."""
        return self._state == "done"

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Header | Block | End | None:
        if self._state == "header":
            return self._header()
        if self._state == "blocks":
            return self._block_or_end()
        if self._buf:
            raise SnapshotCorrupt(f"{len(self._buf)} bytes after the trailer")
        return None

    def _need(self, size: int, what: str) -> bool:
        """True when `size` bytes are buffered; at end of file, a shortfall is truncation."""
        if len(self._buf) >= size:
            return True
        if self._eof:
            raise SnapshotCorrupt(f"truncated in the {what} ({len(self._buf)} of {size} bytes)")
        return False

    def _header(self) -> Header | None:
        fixed = len(MAGIC) + _HEAD.size
        seen = min(len(self._buf), len(MAGIC))
        if self._buf[:seen] != MAGIC[:seen]:  # as early as possible, so another kind of file is named as such
            raise SnapshotCorrupt("not a cacheproxy snapshot (bad magic)")
        if not self._need(fixed, "header"):
            return None
        version, length = _HEAD.unpack_from(self._buf, len(MAGIC))
        if version != VERSION:
            raise SnapshotCorrupt(f"unknown format version {version} (this build reads version {VERSION})")
        if length > MAX_HEADER:
            raise SnapshotCorrupt(f"header length {length} is implausible")
        if not self._need(fixed + length + _CRC.size, "header"):
            return None
        body = bytes(self._buf[len(MAGIC) : fixed + length])
        (crc,) = _CRC.unpack_from(self._buf, fixed + length)
        if zlib.crc32(body) != crc:
            raise SnapshotCorrupt("header checksum mismatch")
        del self._buf[: fixed + length + _CRC.size]
        try:
            meta = orjson.loads(body[_HEAD.size :])
            header = Header(
                version=version,
                created_at=float(meta["created_at"]),
                system_identifier=str(meta["system_identifier"]),
                wal_lsn=meta["wal_lsn"],
                rules=str(meta["rules"]),
                databases=dict(meta["databases"]),
                timeline=meta.get("timeline"),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SnapshotCorrupt(f"header metadata unreadable: {exc}") from exc
        self._state = "blocks"
        return header

    def _block_or_end(self) -> Block | End | None:
        if not self._need(1, "block list"):
            return None
        tag = self._buf[0:1]
        if tag == b"T":
            return self._end()
        if tag != b"B":
            raise SnapshotCorrupt(f"unknown block tag {bytes(tag)!r} after block {self._blocks}")
        fixed = _BLOCK.size + _CRC.size
        if not self._need(fixed, f"block {self._blocks}"):
            return None
        _, count, raw_len, stored_len = _BLOCK.unpack_from(self._buf)
        if raw_len > MAX_BLOCK or stored_len > MAX_BLOCK:
            raise SnapshotCorrupt(f"block {self._blocks} has an implausible length")
        if not self._need(fixed + stored_len, f"block {self._blocks}"):
            return None
        view = memoryview(self._buf)
        try:
            (crc,) = _CRC.unpack_from(view, _BLOCK.size)
            payload = bytes(view[fixed : fixed + stored_len])
            if zlib.crc32(payload, zlib.crc32(view[: _BLOCK.size])) != crc:
                raise SnapshotCorrupt(f"block {self._blocks} checksum mismatch")
        finally:
            view.release()
        self._chain = zlib.crc32(_CRC.pack(crc), self._chain)
        del self._buf[: fixed + stored_len]
        try:
            raw = self._decompressor.decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise SnapshotCorrupt(f"block {self._blocks} does not decompress: {exc}") from exc
        if len(raw) != raw_len:
            raise SnapshotCorrupt(f"block {self._blocks} decompressed to {len(raw)} bytes, not {raw_len}")
        records = decode_records(raw, count)
        self._blocks += 1
        self._entries += count
        return Block(records, raw_len, fixed + stored_len)

    def _end(self) -> End | None:
        if not self._need(_TRAILER.size, "trailer"):
            return None
        _, blocks, entries, chain, length = _TRAILER.unpack_from(self._buf)
        if length > MAX_HEADER:
            raise SnapshotCorrupt("trailer damaged")
        body = _TRAILER.size + length
        size = body + _CRC.size + len(END_MAGIC)
        if not self._need(size, "trailer"):
            return None
        (crc,) = _CRC.unpack_from(self._buf, body)
        if zlib.crc32(self._buf[:body]) != crc or self._buf[body + _CRC.size : size] != END_MAGIC:
            raise SnapshotCorrupt("trailer damaged")
        try:
            listed = orjson.loads(self._buf[_TRAILER.size : body])
            invalidated = frozenset((str(db), str(table)) for db, table in listed)
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            raise SnapshotCorrupt(f"trailer unreadable: {exc}") from exc
        if (blocks, entries, chain) != (self._blocks, self._entries, self._chain):
            raise SnapshotCorrupt(
                f"trailer says {blocks} blocks / {entries} entries, the file holds {self._blocks} / {self._entries}"
            )
        del self._buf[:size]
        self._state = "done"
        return End(blocks, entries, invalidated)


def decode_records(raw: bytes, count: int) -> list[Record]:
    """The `count` records of one decompressed block; SnapshotCorrupt if they do not fill it exactly."""
    records: list[Record] = []
    pos = 0
    try:
        for _ in range(count):
            key, pos = _decode_key(raw, pos, 0)
            (length,) = _U32.unpack_from(raw, pos)
            pos += 4
            value = raw[pos : pos + length]
            if len(value) != length:
                raise SnapshotCorrupt("record value runs past its block")
            pos += length
            (expires_at,) = _F64.unpack_from(raw, pos)
            (ntables,) = _U16.unpack_from(raw, pos + 8)
            pos += 10
            tables: list[TableId] = []
            for _ in range(ntables):
                database, pos = _decode_str(raw, pos)
                table, pos = _decode_str(raw, pos)
                tables.append((database, table))
            query, pos = _decode_str(raw, pos)
            (has_rule,) = _U8.unpack_from(raw, pos)
            pos += 1
            rule: str | None = None
            if has_rule == 1:
                rule, pos = _decode_str(raw, pos)
            elif has_rule != 0:
                raise SnapshotCorrupt("bad rule flag")
            records.append(Record(typed(key), value, expires_at, frozenset(tables), query, rule))
    except (struct.error, UnicodeDecodeError) as exc:
        raise SnapshotCorrupt(f"record {len(records)} unreadable: {exc}") from exc
    if pos != len(raw):
        raise SnapshotCorrupt(f"{len(raw) - pos} stray bytes after the records of a block")
    return records


def _decode_str(raw: bytes, pos: int) -> tuple[str, int]:
    (length,) = _U32.unpack_from(raw, pos)
    end = pos + 4 + length
    if end > len(raw):
        raise SnapshotCorrupt("string runs past its block")
    return raw[pos + 4 : end].decode(), end


def _decode_key(raw: bytes, pos: int, depth: int) -> tuple[Hashable, int]:
    if depth > 8:
        raise SnapshotCorrupt("key nested too deeply")
    tag = raw[pos : pos + 1]
    pos += 1
    if tag == b"s":
        return _decode_str(raw, pos)
    if tag == b"b":
        (length,) = _U32.unpack_from(raw, pos)
        end = pos + 4 + length
        if end > len(raw):
            raise SnapshotCorrupt("key bytes run past their block")
        return raw[pos + 4 : end], end
    if tag == b"i":
        return _I64.unpack_from(raw, pos)[0], pos + 8
    if tag == b"t":
        (count,) = _U32.unpack_from(raw, pos)
        pos += 4
        if count > len(raw) - pos:
            raise SnapshotCorrupt("key tuple longer than its block")
        members: list[Hashable] = []
        for _ in range(count):
            member, pos = _decode_key(raw, pos, depth + 1)
            members.append(member)
        return tuple(members), pos
    raise SnapshotCorrupt(f"unknown key tag {tag!r}")


def decode_snapshot(data: bytes) -> tuple[Header, list[Record], End]:
    """Decode a whole snapshot held in memory (tests and tools); SnapshotCorrupt unless it is whole and valid."""
    decoder = SnapshotDecoder()
    decoder.receive_data(data)
    decoder.receive_data(b"")
    header: Header | None = None
    records: list[Record] = []
    while True:
        event = decoder.next_event()
        if isinstance(event, Header):
            header = event
        elif isinstance(event, Block):
            records += event.records
        elif isinstance(event, End):
            assert header is not None
            decoder.next_event()  # raises on trailing bytes
            return header, records, event
        else:
            raise SnapshotCorrupt("truncated")
