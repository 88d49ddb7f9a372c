"""Splits a byte stream of regular v3 messages into whole messages without copying them one by one.

Wire format (PostgreSQL docs, "Message Formats"): one type byte, then an Int32 length that counts itself and the
body but not the type byte. The framer only reads headers: a relay forwards the returned region in one write and
looks at the few messages it cares about by offset.
"""

from __future__ import annotations

from struct import Struct
from typing import Final

from cacheproxy.errors import PROGRAM_LIMIT_EXCEEDED, ProtocolViolation

_HEADER: Final = Struct("!cI")
HEADER_SIZE: Final = 5

# (type byte as int, offset of the type byte in the region, offset one past the message's last byte)
Frame = tuple[int, int, int]


class Framer:
    """Incremental framer for one direction of a connection.

    `feed(data)` returns `(region, frames)`: `region` is the bytes of every message completed so far, and `frames`
    locates each message in it. Bytes of an incomplete message stay buffered until a later feed completes it. A
    header announcing a message larger than `max_size` raises before any of its body is buffered.
    """

    __slots__ = ("_buf", "_max_size")

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self._max_size = max_size

    @property
    def buffered(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._buf)

    def take_partial(self) -> bytes:
        """The bytes of a message not complete yet, removed (to hand them to another framer)."""
        partial = bytes(self._buf)
        self._buf.clear()
        return partial

    def feed(self, data: bytes) -> tuple[bytes, list[Frame]]:
        frames: list[Frame] = []
        if self._buf:
            return self._feed_buffered(data, frames)
        pos = _scan(data, frames, self._max_size)
        if pos == len(data):
            return data, frames
        self._buf = bytearray(data[pos:])
        return data[:pos], frames

    def _feed_buffered(self, data: bytes, frames: list[Frame]) -> tuple[bytes, list[Frame]]:
        buffer = self._buf
        buffer += data
        if len(buffer) >= HEADER_SIZE:
            length = _length(bytes(buffer[:HEADER_SIZE]), 0)
            if 4 <= length <= self._max_size and length + 1 > len(buffer):
                return b"", frames  # the first message is still incomplete: no copy, no scan (a large row arriving)
        whole = bytes(buffer)
        pos = _scan(whole, frames, self._max_size)
        del buffer[:pos]
        return whole[:pos], frames


def _length(buf: bytes, pos: int) -> int:
    """The Int32 length of the message whose type byte is at `pos` (bytes indexed one by one: compiled, this is a
    few machine instructions, where Struct.unpack_from is a call through Python's API)."""
    return (buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8) | buf[pos + 4]


def _scan(buf: bytes, frames: list[Frame], max_size: int) -> int:
    """Appends the frame of each whole message of `buf` to `frames`; returns the offset past the last one."""
    pos = 0
    end_of_data = len(buf)
    while end_of_data - pos >= HEADER_SIZE:
        length = _length(buf, pos)
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(buf[pos])!r}")
        if length > max_size:
            raise ProtocolViolation(
                f"message of type {chr(buf[pos])!r} is {length} bytes, over the limit of {max_size} bytes",
                sqlstate=PROGRAM_LIMIT_EXCEEDED,
            )
        end = pos + 1 + length
        if end > end_of_data:
            break
        frames.append((buf[pos], pos, end))
        pos = end
    return pos


def split_messages(data: bytes, max_size: int = 1 << 30) -> list[tuple[int, bytes]]:
    """Decode a buffer holding only whole messages into (type, body) pairs (tests and small control paths)."""
    framer = Framer(max_size)
    region, frames = framer.feed(data)
    if framer.buffered:
        raise ProtocolViolation(f"{framer.buffered} trailing bytes do not form a whole message")
    return [(t, region[s + HEADER_SIZE : e]) for t, s, e in frames]


def encode(msg_type: bytes, body: bytes = b"") -> bytes:
    """One regular message: type byte, Int32 length, body."""
    return _HEADER.pack(msg_type, len(body) + 4) + body
