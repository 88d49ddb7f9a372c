"""Decoders for the extended-query messages a client sends, and builders for the replies the proxy answers with.

Layouts from the PostgreSQL docs, "Message Formats": Parse, Bind, Describe, Execute, Close (frontend) and
ParseComplete, BindComplete, CloseComplete, NoData, EmptyQueryResponse (backend). Decoders take the message body
(without type byte and length) and never copy more than the names and the SQL text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from struct import Struct
from typing import Final

from cacheproxy.errors import ProtocolViolation
from cacheproxy.protocol.framing import encode

_INT16: Final = Struct("!H")
_INT32: Final = Struct("!I")
_INT32S: Final = Struct("!i")

# Annotated: other modules of the compiled group use them at import, where an inferred type may not be known yet.
PARSE_COMPLETE: Final[bytes] = encode(b"1")
BIND_COMPLETE: Final[bytes] = encode(b"2")
CLOSE_COMPLETE: Final[bytes] = encode(b"3")
NO_DATA: Final[bytes] = encode(b"n")


@dataclass(slots=True, unsafe_hash=True)
class Parse:
    statement: str
    query: str
    param_types: tuple[int, ...]

    def __init__(self, statement: str, query: str, param_types: tuple[int, ...]) -> None:
        self.statement = statement
        self.query = query
        self.param_types = param_types


@dataclass(slots=True, unsafe_hash=True)
class Bind:
    portal: str
    statement: str
    # Everything after the two names: parameter formats, values and result formats. It is the part of the cache
    # key that the parameters contribute, taken as bytes so that text and binary parameters are both exact.
    arguments: bytes
    result_formats: tuple[int, ...]

    def __init__(self, portal: str, statement: str, arguments: bytes, result_formats: tuple[int, ...]) -> None:
        self.portal = portal
        self.statement = statement
        self.arguments = arguments
        self.result_formats = result_formats


@dataclass(slots=True, unsafe_hash=True)
class Describe:
    kind: str  # "S" (statement) or "P" (portal)
    name: str

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name


@dataclass(slots=True, unsafe_hash=True)
class Execute:
    portal: str
    max_rows: int

    def __init__(self, portal: str, max_rows: int) -> None:
        self.portal = portal
        self.max_rows = max_rows


@dataclass(slots=True, unsafe_hash=True)
class Close:
    kind: str
    name: str

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation("invalid message format: missing string terminator")
    # The bytes are in the client's encoding (client_encoding may be LATIN1...): keep them exactly, so that
    # what is replayed upstream is what the client sent.
    return body[pos:end].decode("utf-8", "surrogateescape"), end + 1


def _need(body: bytes, pos: int, size: int) -> None:
    if pos + size > len(body):
        raise ProtocolViolation("invalid message format: message is shorter than its fields")


def decode_parse(body: bytes) -> Parse:
    name, pos = _cstring(body, 0)
    query, pos = _cstring(body, pos)
    _need(body, pos, 2)
    count = _INT16.unpack_from(body, pos)[0]
    pos += 2
    _need(body, pos, 4 * count)
    types = tuple(_INT32.unpack_from(body, pos + 4 * i)[0] for i in range(count))
    if pos + 4 * count != len(body):
        raise ProtocolViolation("invalid message format: Parse has trailing bytes")
    return Parse(name, query, types)


def decode_bind(body: bytes) -> Bind:
    portal, pos = _cstring(body, 0)
    statement, pos = _cstring(body, pos)
    arguments_at = pos
    size = len(body)
    # Bounds are checked by unpack_from (struct.error past the end) and by the final length check: one Bind per
    # forwarded execution, so no check per field.
    unpack16, unpack32 = _INT16.unpack_from, _INT32S.unpack_from
    try:
        n_formats = unpack16(body, pos)[0]
        pos += 2 + 2 * n_formats
        n_params = unpack16(body, pos)[0]
        pos += 2
        for _ in range(n_params):
            length = unpack32(body, pos)[0]
            pos += 4
            if length > 0:
                pos += length
            elif length < -1:
                raise ProtocolViolation(f"invalid message format: parameter length {length}")
        n_results = unpack16(body, pos)[0]
    except struct.error:
        raise ProtocolViolation("invalid message format: message is shorter than its fields") from None
    pos += 2
    if pos + 2 * n_results != size:
        if pos + 2 * n_results > size:
            raise ProtocolViolation("invalid message format: message is shorter than its fields")
        raise ProtocolViolation("invalid message format: Bind has trailing bytes")
    results = tuple(unpack16(body, pos + 2 * i)[0] for i in range(n_results)) if n_results else ()
    return Bind(portal, statement, bytes(body[arguments_at:]), results)


def bind_parameter(arguments: bytes, number: int) -> tuple[int, bytes | None] | None:
    """Parameter `number` (1-based) of a Bind's `arguments` (as in `Bind.arguments`, already validated by
    decode_bind): its format code and its value (None for NULL); None when there is no such parameter.

    >>> arguments = bytes([0, 0, 0, 2, 0, 0, 0, 1]) + b"7" + bytes([255, 255, 255, 255, 0, 0])
    >>> bind_parameter(arguments, 1), bind_parameter(arguments, 2), bind_parameter(arguments, 3)
    ((0, b'7'), (0, None), None)
    """
    try:
        n_formats = _INT16.unpack_from(arguments, 0)[0]
        formats = [_INT16.unpack_from(arguments, 2 + 2 * i)[0] for i in range(n_formats)]
        pos = 2 + 2 * n_formats
        n_params = _INT16.unpack_from(arguments, pos)[0]
        pos += 2
        if not 1 <= number <= n_params:
            return None
        for index in range(number):
            length = _INT32S.unpack_from(arguments, pos)[0]
            pos += 4
            if index == number - 1:
                fmt = formats[0] if n_formats == 1 else formats[index] if n_formats > 1 else 0
                return fmt, (None if length < 0 else bytes(arguments[pos : pos + length]))
            pos += max(length, 0)
    except (IndexError, struct.error):
        return None
    return None


def decode_describe(body: bytes) -> Describe:
    return Describe(*_kind_and_name(body, "Describe"))


def decode_close(body: bytes) -> Close:
    return Close(*_kind_and_name(body, "Close"))


def _kind_and_name(body: bytes, what: str) -> tuple[str, str]:
    if len(body) < 2 or body[0] not in b"SP":
        raise ProtocolViolation(f"invalid {what} message subtype")
    name, pos = _cstring(body, 1)
    if pos != len(body):
        raise ProtocolViolation(f"invalid message format: {what} has trailing bytes")
    return chr(body[0]), name


def decode_execute(body: bytes) -> Execute:
    portal, pos = _cstring(body, 0)
    if pos + 4 != len(body):
        raise ProtocolViolation("invalid message format: Execute")
    return Execute(portal, _INT32S.unpack_from(body, pos)[0])


def decode_query(body: bytes) -> str:
    text, _ = _cstring(body, 0)
    return text


def encode_parse(statement: str, query: str, param_types: tuple[int, ...]) -> bytes:
    body = statement.encode("utf-8", "surrogateescape") + b"\x00" + query.encode("utf-8", "surrogateescape")
    body += b"\x00" + _INT16.pack(len(param_types))
    body += b"".join(_INT32.pack(t) for t in param_types)
    return encode(b"P", body)


def encode_describe(kind: str, name: str) -> bytes:
    return encode(b"D", kind.encode() + name.encode("utf-8", "surrogateescape") + b"\x00")
