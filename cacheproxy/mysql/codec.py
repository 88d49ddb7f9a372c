"""Sans-IO MySQL/MariaDB client/server protocol: packets, handshake v10, OK/ERR/EOF, column definitions, rows.

Wire format (MySQL "Client/Server Protocol", MariaDB "Protocol" docs): every packet is a 3-byte little-endian payload
length, a 1-byte sequence id, then the payload. A payload of 2^24-1 bytes or more is sent as several packets of
0xFFFFFF bytes followed by a shorter one (possibly empty); the reader joins them into one logical packet. Nothing here
does I/O: bytes in, packets and small frozen dataclasses out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

MAX_PAYLOAD = 0xFFFFFF
HEADER_SIZE = 4

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class CodecError(Exception):
    """Bytes that are not valid MySQL protocol (a bad peer), or a packet over the configured size limit."""


class Capability:
    """Capability flags (MySQL "Capabilities Flags"); the proxy masks those it cannot honour. Plain ints: the
    hot path tests them on every reply, and IntFlag operators cost a Python call each."""

    LONG_PASSWORD = 1
    FOUND_ROWS = 1 << 1
    LONG_FLAG = 1 << 2
    CONNECT_WITH_DB = 1 << 3
    NO_SCHEMA = 1 << 4
    COMPRESS = 1 << 5
    ODBC = 1 << 6
    LOCAL_FILES = 1 << 7
    IGNORE_SPACE = 1 << 8
    PROTOCOL_41 = 1 << 9
    INTERACTIVE = 1 << 10
    SSL = 1 << 11
    IGNORE_SIGPIPE = 1 << 12
    TRANSACTIONS = 1 << 13
    RESERVED = 1 << 14
    SECURE_CONNECTION = 1 << 15
    MULTI_STATEMENTS = 1 << 16
    MULTI_RESULTS = 1 << 17
    PS_MULTI_RESULTS = 1 << 18
    PLUGIN_AUTH = 1 << 19
    CONNECT_ATTRS = 1 << 20
    PLUGIN_AUTH_LENENC_DATA = 1 << 21
    CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
    SESSION_TRACK = 1 << 23
    DEPRECATE_EOF = 1 << 24
    OPTIONAL_RESULTSET_METADATA = 1 << 25
    ZSTD_COMPRESSION = 1 << 26
    QUERY_ATTRIBUTES = 1 << 27
    MULTI_FACTOR_AUTHENTICATION = 1 << 28
    CAPABILITY_EXTENSION = 1 << 29
    SSL_VERIFY_SERVER_CERT = 1 << 30
    REMEMBER_OPTIONS = 1 << 31


class Status:
    """Server status flags carried by OK and EOF packets (MySQL "SERVER_STATUS_flags_enum")."""

    IN_TRANS = 0x0001
    AUTOCOMMIT = 0x0002
    MORE_RESULTS_EXISTS = 0x0008
    NO_GOOD_INDEX_USED = 0x0010
    NO_INDEX_USED = 0x0020
    CURSOR_EXISTS = 0x0040
    LAST_ROW_SENT = 0x0080
    DB_DROPPED = 0x0100
    NO_BACKSLASH_ESCAPES = 0x0200
    METADATA_CHANGED = 0x0400
    QUERY_WAS_SLOW = 0x0800
    PS_OUT_PARAMS = 0x1000
    IN_TRANS_READONLY = 0x2000
    SESSION_STATE_CHANGED = 0x4000


class Command:
    """Command bytes: the first payload byte of a client packet in the command phase."""

    QUIT = 0x01
    INIT_DB = 0x02
    QUERY = 0x03
    FIELD_LIST = 0x04
    CREATE_DB = 0x05
    DROP_DB = 0x06
    REFRESH = 0x07
    STATISTICS = 0x09
    PROCESS_INFO = 0x0A
    PROCESS_KILL = 0x0C
    DEBUG = 0x0D
    PING = 0x0E
    CHANGE_USER = 0x11
    BINLOG_DUMP = 0x12
    REGISTER_SLAVE = 0x15
    STMT_PREPARE = 0x16
    STMT_EXECUTE = 0x17
    STMT_SEND_LONG_DATA = 0x18
    STMT_CLOSE = 0x19
    STMT_RESET = 0x1A
    SET_OPTION = 0x1B
    STMT_FETCH = 0x1C
    RESET_CONNECTION = 0x1F
    BINLOG_DUMP_GTID = 0x1E
    STMT_BULK_EXECUTE = 0xFA  # MariaDB


OK_HEADER = 0x00
EOF_HEADER = 0xFE
ERR_HEADER = 0xFF
LOCAL_INFILE_HEADER = 0xFB


# --- packets ----------------------------------------------------------------------------------------------------


def encode_packet(seq: int, payload: bytes) -> bytes:
    """One logical packet as wire bytes, split into 0xFFFFFF-byte pieces when it is that long or longer.

    >>> encode_packet(0, b"\\x0e")
    b'\\x01\\x00\\x00\\x00\\x0e'
    >>> len(encode_packet(0, bytes(MAX_PAYLOAD)))  # a full piece, then an empty one
    16777223
    """
    out = bytearray()
    pos = 0
    while True:
        piece = payload[pos : pos + MAX_PAYLOAD]
        out += len(piece).to_bytes(3, "little") + bytes((seq & 0xFF,)) + piece
        seq += 1
        pos += MAX_PAYLOAD
        if len(piece) < MAX_PAYLOAD:
            return bytes(out)


class Packet(NamedTuple):
    """One logical packet: its first sequence id, payload (pieces joined) and the raw wire bytes it came in.
    A NamedTuple: one is made per packet, and a frozen dataclass's __init__ costs a Python call per field."""

    seq: int
    payload: bytes
    raw: bytes
    last_seq: int  # the sequence id of its last piece (== seq unless it was split)


class PacketReader:
    """Incremental reader for one direction: `feed(bytes)` returns the logical packets completed so far.

    `max_payload` bounds a logical packet (the pieces of a split one added up); a longer one raises CodecError as
    soon as its size is known, before its body is buffered.
    """

    __slots__ = ("_buf", "_max_payload", "_parts", "_raw", "_seq", "_size")

    def __init__(self, max_payload: int = 1 << 30) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._parts: list[bytes] = []  # the pieces of a split packet read so far
        self._raw = bytearray()
        self._seq = 0
        self._size = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) + len(self._raw)

    def take(self) -> bytes:
        """The raw bytes not yet returned as packets (a split packet's pieces included); the reader is left empty."""
        data = bytes(self._raw) + bytes(self._buf)
        self._buf, self._raw, self._parts, self._size = bytearray(), bytearray(), [], 0
        return data

    def feed(self, data: bytes) -> list[Packet]:
        self._buf += data
        buf = self._buf
        packets: list[Packet] = []
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            if self._size + length > self._max_payload:
                raise CodecError(f"packet of {self._size + length} bytes or more, over the limit of "
                                 f"{self._max_payload} bytes")  # fmt: skip
            end = pos + HEADER_SIZE + length
            if end > len(buf):
                break
            seq = buf[pos + 3]
            piece = bytes(buf[pos + HEADER_SIZE : end])
            if not self._parts and length < MAX_PAYLOAD:  # the common case: a whole packet in one piece
                packets.append(Packet(seq, piece, bytes(buf[pos:end]), seq))
            else:
                if not self._parts:
                    self._seq = seq
                self._parts.append(piece)
                self._raw += buf[pos:end]
                self._size += length
                if length < MAX_PAYLOAD:
                    packets.append(Packet(self._seq, b"".join(self._parts), bytes(self._raw), seq))
                    self._parts, self._raw, self._size = [], bytearray(), 0
            pos = end
        del buf[:pos]
        return packets


# --- integers and strings (MySQL "Basic Data Types") --------------------------------------------------------------


def lenenc_int(value: int) -> bytes:
    """A length-encoded integer.

    >>> lenenc_int(250), lenenc_int(251), lenenc_int(70000)
    (b'\\xfa', b'\\xfc\\xfb\\x00', b'\\xfdp\\x11\\x01')
    """
    if value < 251:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + _U16.pack(value)
    if value < 1 << 24:
        return b"\xfd" + value.to_bytes(3, "little")
    return b"\xfe" + _U64.pack(value)


def lenenc_str(value: bytes) -> bytes:
    return lenenc_int(len(value)) + value


def read_lenenc_int(buf: bytes, pos: int) -> tuple[int | None, int]:
    """(value, next position); value None for the NULL marker 0xFB (a NULL column in a text row)."""
    if pos >= len(buf):
        raise CodecError("truncated length-encoded integer")
    first = buf[pos]
    if first < 0xFB:
        return first, pos + 1
    if first == 0xFB:
        return None, pos + 1
    width = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if width is None or pos + 1 + width > len(buf):
        raise CodecError(f"bad length-encoded integer (first byte 0x{first:02x})")
    return int.from_bytes(buf[pos + 1 : pos + 1 + width], "little"), pos + 1 + width


def read_lenenc_str(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    length, pos = read_lenenc_int(buf, pos)
    if length is None:
        return None, pos
    if pos + length > len(buf):
        raise CodecError("truncated length-encoded string")
    return bytes(buf[pos : pos + length]), pos + length


def read_nul_str(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise CodecError("unterminated string")
    return bytes(buf[pos:end]), end + 1


# --- handshake (MySQL "Protocol::HandshakeV10", "Protocol::HandshakeResponse41") -----------------------------------


@dataclass(frozen=True, slots=True)
class Handshake:
    """The server's greeting. `capabilities` is all 32 bits; MariaDB's extended ones are in `mariadb_capabilities`."""

    protocol_version: int
    server_version: bytes
    connection_id: int
    auth_data: bytes  # both parts of the scramble, without the trailing NUL
    capabilities: int
    charset: int
    status: int
    auth_plugin: bytes
    mariadb_capabilities: int = 0

    @property
    def is_mariadb(self) -> bool:
        return b"MariaDB" in self.server_version


# Offsets of the capability words inside a v10 handshake payload, found while parsing (the lower word follows the
# first 8 bytes of the scramble and a filler byte; the upper word follows charset and status).
def parse_handshake(payload: bytes) -> Handshake:
    """Parse a HandshakeV10 payload (an ERR packet instead means the server refused the connection)."""
    if not payload or payload[0] != 10:
        raise CodecError(f"unsupported handshake protocol version {payload[:1]!r}")
    version, pos = read_nul_str(payload, 1)
    if pos + 4 + 8 + 1 + 2 > len(payload):
        raise CodecError("truncated handshake")
    connection_id = _U32.unpack_from(payload, pos)[0]
    pos += 4
    auth1 = payload[pos : pos + 8]
    pos += 9
    caps = _U16.unpack_from(payload, pos)[0]
    pos += 2
    charset = status = 0
    auth_len = 0
    plugin = b""
    auth2 = b""
    mariadb_caps = 0
    if pos < len(payload):
        charset = payload[pos]
        status = _U16.unpack_from(payload, pos + 1)[0]
        caps |= _U16.unpack_from(payload, pos + 3)[0] << 16
        auth_len = payload[pos + 5]
        mariadb_caps = _U32.unpack_from(payload, pos + 12)[0] if not caps & Capability.LONG_PASSWORD else 0
        pos += 16
        if caps & Capability.SECURE_CONNECTION:
            n = max(13, auth_len - 8)
            auth2 = payload[pos : pos + n]
            pos += n
        if caps & Capability.PLUGIN_AUTH:
            end = payload.find(b"\x00", pos)
            plugin = payload[pos : end if end >= 0 else len(payload)]
    return Handshake(10, version, connection_id, (auth1 + auth2).rstrip(b"\x00"), caps, charset, status, plugin,
                     mariadb_caps)  # fmt: skip


def _capability_offsets(payload: bytes) -> tuple[int, int | None]:
    pos = payload.index(b"\x00", 1) + 1 + 4 + 8 + 1
    upper = pos + 2 + 3 if pos + 2 + 3 + 2 <= len(payload) else None
    return pos, upper


def mask_handshake(payload: bytes, mask: int) -> bytes:
    """The handshake payload with the capability bits in `mask` cleared, every other byte as the server sent it.

    MariaDB's extended capabilities (the last 4 of the 10 reserved bytes, used when CLIENT_LONG_PASSWORD is clear)
    are all cleared: progress reports, bulk operations, extended and cached metadata change the reply formats the
    proxy parses.

    >>> hs = build_handshake(7, b"8.0.0", b"a" * 20, 0xFFFFFFFF & ~1, 45, 2, b"mysql_native_password")
    >>> bool(parse_handshake(mask_handshake(hs, Capability.SSL | Capability.COMPRESS)).capabilities & Capability.SSL)
    False
    """
    lower, upper = _capability_offsets(payload)
    out = bytearray(payload)
    _U16.pack_into(out, lower, _U16.unpack_from(out, lower)[0] & ~mask & 0xFFFF)
    if upper is not None:
        _U16.pack_into(out, upper, _U16.unpack_from(out, upper)[0] & ~(mask >> 16) & 0xFFFF)
        if not out[lower] & Capability.LONG_PASSWORD and upper + 2 + 1 + 10 <= len(out):
            out[upper + 2 + 1 + 6 : upper + 2 + 1 + 10] = bytes(4)
    return bytes(out)


def offer_capabilities(payload: bytes, bits: int) -> bytes:
    """The handshake payload with the (lower 16) capability bits in `bits` set: what the proxy itself offers on
    top of the server's, such as CLIENT_SSL when it terminates TLS.

    >>> hs = build_handshake(7, b"8.0.0", b"a" * 20, Capability.PROTOCOL_41, 45, 2, b"mysql_native_password")
    >>> bool(parse_handshake(offer_capabilities(hs, Capability.SSL)).capabilities & Capability.SSL)
    True
    """
    lower, _ = _capability_offsets(payload)
    out = bytearray(payload)
    _U16.pack_into(out, lower, _U16.unpack_from(out, lower)[0] | (bits & 0xFFFF))
    return bytes(out)


def build_handshake(
    connection_id: int, version: bytes, scramble: bytes, caps: int, charset: int, status: int, plugin: bytes
) -> bytes:
    """A HandshakeV10 payload (for tests and for a proxy that greets on its own)."""
    return (
        b"\x0a" + version + b"\x00" + _U32.pack(connection_id) + scramble[:8] + b"\x00" + _U16.pack(caps & 0xFFFF)
        + bytes((charset,)) + _U16.pack(status) + _U16.pack(caps >> 16) + bytes((len(scramble) + 1,)) + bytes(10)
        + scramble[8:] + b"\x00" + plugin + b"\x00"
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    """What the client answered: who it is, which database, the capabilities it wants, its auth plugin."""

    capabilities: int
    max_packet: int
    charset: int
    user: bytes
    auth_response: bytes
    database: bytes | None
    auth_plugin: bytes | None
    ssl_request: bool = False  # only the first 32 bytes: the client asks to start TLS


def parse_handshake_response(payload: bytes) -> HandshakeResponse:
    """Parse a HandshakeResponse41 (or an SSLRequest, which is its first 32 bytes)."""
    if len(payload) < 32:
        raise CodecError("truncated handshake response (the proxy needs CLIENT_PROTOCOL_41)")
    caps = _U32.unpack_from(payload, 0)[0]
    if not caps & Capability.PROTOCOL_41:
        raise CodecError("the client does not speak protocol 4.1")
    max_packet = _U32.unpack_from(payload, 4)[0]
    charset = payload[8]
    if len(payload) == 32:
        return HandshakeResponse(caps, max_packet, charset, b"", b"", None, None, ssl_request=True)
    user, pos = read_nul_str(payload, 32)
    if caps & Capability.PLUGIN_AUTH_LENENC_DATA:
        auth, pos = read_lenenc_str(payload, pos)
        auth = auth or b""
    elif caps & Capability.SECURE_CONNECTION:
        n = payload[pos]
        auth, pos = payload[pos + 1 : pos + 1 + n], pos + 1 + n
    else:
        auth, pos = read_nul_str(payload, pos)
    database = None
    if caps & Capability.CONNECT_WITH_DB and pos < len(payload):
        database, pos = read_nul_str(payload, pos)
    plugin = None
    if caps & Capability.PLUGIN_AUTH and pos < len(payload):
        plugin, pos = read_nul_str(payload, pos)
    return HandshakeResponse(caps, max_packet, charset, user, bytes(auth), database, plugin)


def build_handshake_response(
    caps: int, user: bytes, auth: bytes, database: bytes | None, plugin: bytes, charset: int = 45
) -> bytes:
    out = _U32.pack(caps) + _U32.pack(1 << 24) + bytes((charset,)) + bytes(23) + user + b"\x00"
    out += lenenc_str(auth) if caps & Capability.PLUGIN_AUTH_LENENC_DATA else bytes((len(auth),)) + auth
    if database is not None:
        out += database + b"\x00"
    return out + plugin + b"\x00"


def with_capabilities(payload: bytes, capabilities: int) -> bytes:
    """A HandshakeResponse41 (or SSLRequest) with its capability word replaced, every other byte kept."""
    return _U32.pack(capabilities & 0xFFFFFFFF) + payload[4:]


def mask_handshake_response(payload: bytes, mask: int) -> bytes:
    """The client's response with the capability bits in `mask` cleared (what the server must not see)."""
    out = bytearray(payload)
    _U32.pack_into(out, 0, _U32.unpack_from(out, 0)[0] & ~mask & 0xFFFFFFFF)
    return bytes(out)


# --- OK / ERR / EOF --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ok:
    affected_rows: int
    last_insert_id: int
    status: int
    warnings: int
    info: bytes = b""


@dataclass(frozen=True, slots=True)
class Err:
    code: int
    sqlstate: str
    message: str


@dataclass(frozen=True, slots=True)
class Eof:
    warnings: int
    status: int


def parse_ok(payload: bytes) -> Ok:
    """An OK packet (header 0x00, or 0xFE when it ends a result set under CLIENT_DEPRECATE_EOF)."""
    affected, pos = read_lenenc_int(payload, 1)
    insert_id, pos = read_lenenc_int(payload, pos)
    if pos + 4 > len(payload):
        raise CodecError("truncated OK packet")
    status, warnings = _U16.unpack_from(payload, pos)[0], _U16.unpack_from(payload, pos + 2)[0]
    return Ok(affected or 0, insert_id or 0, status, warnings, bytes(payload[pos + 4 :]))


def parse_err(payload: bytes) -> Err:
    if len(payload) < 3:
        raise CodecError("truncated ERR packet")
    code = _U16.unpack_from(payload, 1)[0]
    if len(payload) >= 9 and payload[3:4] == b"#":
        return Err(code, payload[4:9].decode("ascii", "replace"), payload[9:].decode("utf-8", "replace"))
    return Err(code, "HY000", payload[3:].decode("utf-8", "replace"))


def parse_eof(payload: bytes) -> Eof:
    if len(payload) < 5:
        return Eof(0, 0)  # pre-4.1 EOF: no warnings, no status
    return Eof(_U16.unpack_from(payload, 1)[0], _U16.unpack_from(payload, 3)[0])


def ok_payload(status: int, *, affected: int = 0, insert_id: int = 0, warnings: int = 0, eof: bool = False) -> bytes:
    return (
        bytes((EOF_HEADER if eof else OK_HEADER,))
        + lenenc_int(affected)
        + lenenc_int(insert_id)
        + _U16.pack(status)
        + _U16.pack(warnings)
    )


def err_payload(code: int, sqlstate: str, message: str) -> bytes:
    """An ERR packet's payload (always with the 4.1 SQLSTATE marker: every client the proxy takes speaks 4.1).

    >>> parse_err(err_payload(1105, "HY000", "boom"))
    Err(code=1105, sqlstate='HY000', message='boom')
    """
    return b"\xff" + _U16.pack(code) + b"#" + sqlstate.encode("ascii")[:5].ljust(5, b"0") + message.encode()


def eof_payload(status: int, warnings: int = 0) -> bytes:
    return b"\xfe" + _U16.pack(warnings) + _U16.pack(status)


def is_eof(payload: bytes, deprecate_eof: bool) -> bool:
    """Is this packet, where a row could also be, the end of a result set?

    A text row can start with 0xFE only as an 8-byte length, so the row is at least 9 bytes long; with
    CLIENT_DEPRECATE_EOF the terminator is an OK packet with the 0xFE header, shorter than a maximal packet.
    """
    if not payload or payload[0] != EOF_HEADER:
        return False
    return len(payload) < MAX_PAYLOAD if deprecate_eof else len(payload) < 9


# --- column definitions and rows (MySQL "Protocol::ColumnDefinition41", "Text/Binary Resultset") -----------------


@dataclass(frozen=True, slots=True)
class Column:
    schema: bytes
    table: bytes
    org_table: bytes
    name: bytes
    org_name: bytes
    charset: int
    length: int
    type: int
    flags: int
    decimals: int


def parse_column(payload: bytes) -> Column:
    parts: list[bytes] = []
    pos = 0
    for _ in range(6):  # catalog, schema, table, org_table, name, org_name
        value, pos = read_lenenc_str(payload, pos)
        parts.append(value or b"")
    _, pos = read_lenenc_int(payload, pos)  # length of the fixed fields: 0x0c
    if pos + 10 > len(payload):
        raise CodecError("truncated column definition")
    charset = _U16.unpack_from(payload, pos)[0]
    length = _U32.unpack_from(payload, pos + 2)[0]
    return Column(parts[1], parts[2], parts[3], parts[4], parts[5], charset, length, payload[pos + 6],
                  _U16.unpack_from(payload, pos + 7)[0], payload[pos + 9])  # fmt: skip


def column_payload(name: bytes, type_: int = 0xFD, *, charset: int = 45, length: int = 1024, flags: int = 0) -> bytes:
    """A ColumnDefinition41 for a computed column (no schema or table), as the proxy's own answers use."""
    head = b"".join(lenenc_str(part) for part in (b"def", b"", b"", b"", name, name))
    return (
        head + b"\x0c" + _U16.pack(charset) + _U32.pack(length) + bytes((type_,)) + _U16.pack(flags) + b"\x00\x00\x00"
    )


def parse_text_row(payload: bytes, columns: int) -> tuple[bytes | None, ...]:
    values: list[bytes | None] = []
    pos = 0
    for _ in range(columns):
        value, pos = read_lenenc_str(payload, pos)
        values.append(value)
    return tuple(values)


def text_row_payload(values: tuple[bytes | None, ...]) -> bytes:
    return b"".join(b"\xfb" if v is None else lenenc_str(v) for v in values)


# Binary protocol value sizes by column type (MySQL "Binary Protocol Value"); None: length-encoded string.
_FIXED = {0x01: 1, 0x02: 2, 0x0D: 2, 0x03: 4, 0x09: 4, 0x04: 4, 0x05: 8, 0x08: 8}
_DATETIME = (0x07, 0x0A, 0x0C, 0x0B)  # timestamp, date, datetime, time: a length byte then that many bytes


def parse_binary_row(payload: bytes, types: tuple[int, ...]) -> tuple[bytes | None, ...]:
    """A binary row's values as raw bytes (decoding each type is the client's job); None for NULL."""
    if not payload or payload[0] != 0:
        raise CodecError("a binary row starts with 0x00")
    bitmap_len = (len(types) + 7 + 2) // 8
    bitmap = payload[1 : 1 + bitmap_len]
    pos = 1 + bitmap_len
    values: list[bytes | None] = []
    for i, type_ in enumerate(types):
        bit = i + 2
        if bitmap[bit // 8] & (1 << (bit % 8)):
            values.append(None)
            continue
        if type_ in _FIXED:
            n = _FIXED[type_]
            values.append(bytes(payload[pos : pos + n]))
            pos += n
        elif type_ in _DATETIME:
            n = payload[pos]
            values.append(bytes(payload[pos + 1 : pos + 1 + n]))
            pos += 1 + n
        else:
            value, pos = read_lenenc_str(payload, pos)
            values.append(value)
    return tuple(values)


# --- prepared statements ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrepareOk:
    statement_id: int
    columns: int
    params: int
    warnings: int


def parse_prepare_ok(payload: bytes) -> PrepareOk:
    """COM_STMT_PREPARE_OK: 0x00, statement id, column count, parameter count, filler, warnings."""
    if len(payload) < 10 or payload[0] != 0:
        raise CodecError("bad COM_STMT_PREPARE_OK")
    warnings = _U16.unpack_from(payload, 10)[0] if len(payload) >= 12 else 0
    return PrepareOk(_U32.unpack_from(payload, 1)[0], _U16.unpack_from(payload, 5)[0], _U16.unpack_from(payload, 7)[0],
                     warnings)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Execute:
    """A COM_STMT_EXECUTE, split where the cache needs it: the statement, the cursor flags, the parameter bytes."""

    statement_id: int
    flags: int
    params: bytes  # everything after the iteration count (NULL bitmap, new-params-bound flag, types, values)


def parse_execute(payload: bytes) -> Execute:
    if len(payload) < 10:
        raise CodecError("truncated COM_STMT_EXECUTE")
    return Execute(_U32.unpack_from(payload, 1)[0], payload[5], bytes(payload[10:]))


def statement_id(payload: bytes) -> int:
    """The statement id of a COM_STMT_* packet (the 4 bytes after the command byte)."""
    if len(payload) < 5:
        raise CodecError("truncated statement command")
    return int(_U32.unpack_from(payload, 1)[0])


# --- responses: where a command's answer ends -------------------------------------------------------------------


class Reply:
    """What kind of answer a command gets, so that `ResponseTracker` knows where it ends."""

    GENERIC = 0  # OK, ERR, or a result set (COM_QUERY, COM_STMT_EXECUTE, COM_STMT_FETCH...)
    PREPARE = 1  # COM_STMT_PREPARE_OK and its parameter and column definitions
    FIELD_LIST = 2  # column definitions up to an EOF (COM_FIELD_LIST)
    STRING = 3  # one packet whatever it holds (COM_STATISTICS)
    NONE = 4  # no answer (COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA, COM_QUIT)
    AUTH = 5  # an authentication exchange (COM_CHANGE_USER): ends at OK or ERR


@dataclass(slots=True)
class ResponseTracker:
    """Follows the server's packets answering one command and says when the answer is complete.

    `feed(payload)` returns what the caller must do after relaying that packet: "more" (keep reading the server),
    "done" (the answer is complete), "client" (the server waits for the client: LOCAL INFILE data or an auth
    switch / more-data exchange). It records the final status flags, warnings, how many result sets and rows came,
    and whether an error ended it.
    """

    reply: int
    deprecate_eof: bool
    binary: bool = False
    state: str = "first"
    columns_left: int = 0
    params_left: int = 0
    result_sets: int = 0
    rows: int = 0
    status: int | None = None
    warnings: int = 0
    error: Err | None = None
    ok: Ok | None = None
    prepared: PrepareOk | None = None
    max_payload: int = 1 << 30  # a logical packet's limit in `scan` (PacketReader's, for the relay's raw bytes)
    last_seq: int = -1  # the sequence id of the last packet `scan` went past
    _pieces: list[bytes] | None = None  # the pieces so far of a split (16 MiB or more) packet, in `scan`
    _split_size: int = 0

    def feed(self, payload: bytes) -> str:
        handler = getattr(self, "_on_" + self.state)
        result: str = handler(payload)
        return result

    def scan(self, buf: bytes | bytearray) -> tuple[int, str]:
        """Follow the reply through raw wire bytes: (offset, step). Every whole packet of `buf` up to `offset` was
        followed; the step is the last packet's ("done" or "client": the reply, or this turn of it, ends at
        `offset`), or "more" when `buf[offset:]` is an incomplete packet, to be given again with the bytes after it.

        The relay's hot loop: rows are told from a result set's end by their header byte alone, without a packet
        object each (the whole packet is parsed for everything else). A packet over `max_payload` raises CodecError
        as soon as its header is read.

        >>> t = ResponseTracker(Reply.GENERIC, deprecate_eof=False)
        >>> t.scan(encode_packet(1, ok_payload(2))[:5])
        (0, 'more')
        >>> t.scan(encode_packet(1, ok_payload(2)) + b"extra")
        (11, 'done')
        """
        end = len(buf)
        pos = 0
        step = "more"
        while end - pos >= HEADER_SIZE:
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            if self._split_size + length > self.max_payload:
                raise CodecError(f"packet of {self._split_size + length} bytes or more, over the limit of "
                                 f"{self.max_payload} bytes")  # fmt: skip
            body = pos + HEADER_SIZE
            stop = body + length
            if stop > end:
                break
            self.last_seq = buf[pos + 3]
            if self._pieces is not None or length == MAX_PAYLOAD:  # a piece of a split packet: joined, then fed
                if self._pieces is None:
                    self._pieces = []
                self._pieces.append(bytes(buf[body:stop]))
                self._split_size += length
                pos = stop
                if length == MAX_PAYLOAD:
                    continue
                payload = b"".join(self._pieces)
                self._pieces, self._split_size = None, 0
                step = self.feed(payload)
            elif (
                self.state == "rows"
                and length
                and (head := buf[body]) != ERR_HEADER
                and (head != EOF_HEADER or (length >= 9 and not self.deprecate_eof))
            ):
                self.rows += 1  # a row (see is_eof: a row may start with 0xFE only when it is 9 bytes or more)
                pos = stop
                continue
            elif self.state == "columns" and self.columns_left > 1:  # a column definition, not the last one
                self.columns_left -= 1
                pos = stop
                continue
            else:
                step = self.feed(bytes(buf[body:stop]))
                pos = stop
            if step != "more":
                return pos, step
        return pos, "more"

    def _end_packet(self, payload: bytes) -> str:
        """OK or ERR where a whole answer may end; follows SERVER_MORE_RESULTS_EXISTS to the next result set."""
        head = payload[0] if payload else -1
        if head == ERR_HEADER:
            self.error = parse_err(payload)
            return "done"
        if head == OK_HEADER or (head == EOF_HEADER and len(payload) < 9):
            self.ok = parse_ok(payload) if head == OK_HEADER else None
            self._status(parse_ok(payload) if head == OK_HEADER else parse_eof(payload))
            return self._after_status()
        raise CodecError(f"unexpected packet 0x{head:02x} in a reply")

    def _status(self, packet: Ok | Eof) -> None:
        self.status = packet.status
        self.warnings += packet.warnings

    def _after_status(self) -> str:
        if self.status is not None and self.status & Status.MORE_RESULTS_EXISTS:
            self.state = "first"
            return "more"
        self.state = "finished"
        return "done"

    def _on_first(self, payload: bytes) -> str:
        if self.reply == Reply.NONE:
            raise CodecError("a reply to a command that has none")
        if self.reply == Reply.STRING:
            self.state = "finished"
            return "done"
        head = payload[0] if payload else -1
        if self.reply == Reply.AUTH:
            if head in (OK_HEADER, ERR_HEADER):
                return self._end_packet(payload)
            if head == 0x01 and payload[1:2] == b"\x03":  # caching_sha2 fast auth success: an OK follows
                return "more"
            return "client"  # an auth switch request or more auth data: the client answers
        if self.reply == Reply.FIELD_LIST:
            if head == ERR_HEADER or is_eof(payload, False):
                return self._end_packet(payload) if head == ERR_HEADER else self._field_list_end(payload)
            return "more"
        if self.reply == Reply.PREPARE:
            if head == ERR_HEADER:
                return self._end_packet(payload)
            self.prepared = parse_prepare_ok(payload)
            self.warnings = self.prepared.warnings
            self.params_left, self.columns_left = self.prepared.params, self.prepared.columns
            return self._prepare_next()
        if head in (OK_HEADER, ERR_HEADER):
            return self._end_packet(payload)
        if head == LOCAL_INFILE_HEADER:
            self.state = "infile"
            return "client"
        count, _ = read_lenenc_int(payload, 0)
        if not count:
            raise CodecError("a result set with no columns")
        self.columns_left = count
        self.result_sets += 1
        self.state = "columns"
        return "more"

    def _field_list_end(self, payload: bytes) -> str:
        self._status(parse_eof(payload))
        self.state = "finished"
        return "done"

    def _on_infile(self, payload: bytes) -> str:
        # After the client's file contents (and their empty terminator) the server answers with OK or ERR.
        return self._end_packet(payload)

    def _on_columns(self, payload: bytes) -> str:
        self.columns_left -= 1
        if self.columns_left == 0:
            self.state = "rows" if self.deprecate_eof else "columns_eof"
        return "more"

    def _on_columns_eof(self, payload: bytes) -> str:
        if not is_eof(payload, False):
            raise CodecError("expected an EOF after the column definitions")
        eof = parse_eof(payload)
        if eof.status & Status.CURSOR_EXISTS:  # COM_STMT_EXECUTE opened a cursor: rows come with COM_STMT_FETCH
            self._status(eof)
            self.state = "finished"
            return "done"
        self.state = "rows"
        return "more"

    def _on_rows(self, payload: bytes) -> str:
        head = payload[0] if payload else -1
        if head == ERR_HEADER:
            return self._end_packet(payload)
        if is_eof(payload, self.deprecate_eof):
            packet = parse_ok(payload) if self.deprecate_eof else parse_eof(payload)
            self._status(packet)
            return self._after_status()
        self.rows += 1
        return "more"

    def _prepare_next(self) -> str:
        if self.params_left:
            self.state = "prepare_params"
            return "more"
        if self.columns_left:
            self.state = "prepare_columns"
            return "more"
        self.state = "finished"
        return "done"

    def _on_prepare_params(self, payload: bytes) -> str:
        return self._prepare_definition(payload, "params_left")

    def _on_prepare_columns(self, payload: bytes) -> str:
        return self._prepare_definition(payload, "columns_left")

    def _prepare_definition(self, payload: bytes, counter: str) -> str:
        left = getattr(self, counter)
        if left == 0:  # the EOF after a block of definitions (absent under CLIENT_DEPRECATE_EOF)
            setattr(self, counter, -1)
            return self._prepare_next_block()
        setattr(self, counter, left - 1)
        if left - 1 == 0 and self.deprecate_eof:
            setattr(self, counter, -1)
            return self._prepare_next_block()
        return "more"

    def _prepare_next_block(self) -> str:
        if self.params_left > 0:
            self.state = "prepare_params"
            return "more"
        if self.columns_left > 0:
            self.state = "prepare_columns"
            return "more"
        self.state = "finished"
        return "done"

    def _on_finished(self, payload: bytes) -> str:
        raise CodecError("a packet after the reply was complete")


def text_result_set(
    columns: list[bytes], rows: list[tuple[bytes | None, ...]], status: int, *, deprecate_eof: bool, seq: int = 1
) -> bytes:
    """A whole text result set as wire bytes, sequence ids from `seq` (the proxy's own answers).

    >>> data = text_result_set([b"a"], [(b"1",)], 2, deprecate_eof=False)
    >>> [p.payload[:1] for p in PacketReader().feed(data)]
    [b'\\x01', b'\\x03', b'\\xfe', b'\\x01', b'\\xfe']
    """
    payloads = [lenenc_int(len(columns))] + [column_payload(name) for name in columns]
    if not deprecate_eof:
        payloads.append(eof_payload(status))
    payloads += [text_row_payload(row) for row in rows]
    payloads.append(ok_payload(status, eof=True) if deprecate_eof else eof_payload(status))
    return b"".join(encode_packet(seq + i, p) for i, p in enumerate(payloads))
