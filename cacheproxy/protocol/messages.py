"""Builders and small decoders for the backend and frontend messages the proxy itself writes or reads.

Builders are pure functions returning wire bytes (PostgreSQL docs, "Message Formats"). Everything the proxy merely
relays is never decoded at all.
"""

from __future__ import annotations

from enum import Enum
from struct import Struct
from typing import Final

from cacheproxy.protocol.framing import encode

_INT32: Final = Struct("!I")
_KEY: Final = Struct("!II")

# Backend message types (as ints, the way the framer reports them). Final literals: compiled code inlines them (a
# plain module attribute is read through the module object, several hundred CPU instructions each time).
AUTHENTICATION: Final = 82  # "R"
BACKEND_KEY_DATA: Final = 75  # "K"
COMMAND_COMPLETE: Final = 67  # "C"
ERROR_RESPONSE: Final = 69  # "E"
NEGOTIATE_PROTOCOL_VERSION: Final = 118  # "v"
NOTICE_RESPONSE: Final = 78  # "N"
PARAMETER_STATUS: Final = 83  # "S"
READY_FOR_QUERY: Final = 90  # "Z"

# Frontend message types.
BIND: Final = 66  # "B"
CLOSE: Final = 67  # "C"
COPY_DATA: Final = 100  # "d"
COPY_DONE: Final = 99  # "c"
COPY_FAIL: Final = 102  # "f"
DESCRIBE: Final = 68  # "D"
EXECUTE: Final = 69  # "E"
FLUSH: Final = 72  # "H"
FUNCTION_CALL: Final = 70  # "F"
PARSE: Final = 80  # "P"
PASSWORD: Final = 112  # "p"; also SASLInitialResponse, SASLResponse and GSSResponse
QUERY: Final = 81  # "Q"
SYNC: Final = 83  # "S"
TERMINATE: Final = 88  # "X"

FRONTEND_TYPES: Final = frozenset(b"BCdcfDEHFpPQSX")

# Authentication request codes (the Int32 after 'R').
AUTH_OK: Final = 0
AUTH_SASL: Final = 10
AUTH_SASL_FINAL: Final = 12


def error_response(
    severity: str, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None
) -> bytes:
    return encode(b"E", _fields(severity, sqlstate, message, detail, hint))


def notice_response(severity: str, sqlstate: str, message: str, *, detail: str | None = None) -> bytes:
    return encode(b"N", _fields(severity, sqlstate, message, detail, None))


def _fields(severity: str, sqlstate: str, message: str, detail: str | None, hint: str | None) -> bytes:
    # 'S' is the localized severity, 'V' the non-localized one (both sent by PostgreSQL >= 9.6).
    parts = [b"S" + severity.encode(), b"V" + severity.encode(), b"C" + sqlstate.encode(), b"M" + message.encode()]
    if detail:
        parts.append(b"D" + detail.encode())
    if hint:
        parts.append(b"H" + hint.encode())
    return b"\x00".join(parts) + b"\x00\x00"


def ready_for_query(status: bytes) -> bytes:
    return encode(b"Z", status)


class TxStatus(Enum):
    """The transaction status a ReadyForQuery reports (docs, "Message Formats", ReadyForQuery)."""

    IDLE = b"I"
    """Not in a transaction block."""
    IN_BLOCK = b"T"
    """In a transaction block."""
    FAILED = b"E"
    """In a failed transaction block: queries are rejected until it ends."""

    # Its ReadyForQuery message, precomputed (set below): a hit appends it to the cached reply. An attribute, since
    # hashing an Enum member runs Python code, and so does reading a member off its class: hot code compares with
    # module-level aliases (`status is IDLE`).
    ready: bytes


for _status in TxStatus:
    _status.ready = ready_for_query(_status.value)
IDLE, IN_BLOCK, FAILED = TxStatus.IDLE, TxStatus.IN_BLOCK, TxStatus.FAILED
# The status byte of a ReadyForQuery -> TxStatus (a bytes-keyed dict: calling TxStatus(b"I") runs Python code).
TX_STATUS_OF: Final[dict[bytes, TxStatus]] = {status.value: status for status in TxStatus}


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return encode(b"K", _KEY.pack(process_id, secret_key))


def terminate() -> bytes:
    return encode(b"X")


def decode_backend_key_data(body: bytes) -> tuple[int, bytes]:
    """(process id, secret). The secret stays bytes: 4 in protocol 3.0, up to 256 in 3.2."""
    pid: int = _INT32.unpack_from(body)[0]
    return pid, bytes(body[4:])


def decode_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse body -> {field code: value}, e.g. {'S': 'ERROR', 'C': '42601', ...}."""
    fields: dict[str, str] = {}
    for part in bytes(body).split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def decode_parameter_status(body: bytes) -> tuple[str, str]:
    name, value, *_ = bytes(body).split(b"\x00")
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def auth_code(body: bytes) -> int:
    code: int = _INT32.unpack_from(body)[0]
    return code


def sasl_mechanisms(body: bytes) -> list[str]:
    """Mechanism names of an AuthenticationSASL body (code, then NUL-terminated names, then a NUL)."""
    return [m.decode() for m in bytes(body[4:]).split(b"\x00") if m]


def authentication_sasl(mechanisms: list[str]) -> bytes:
    body = _INT32.pack(AUTH_SASL) + b"".join(m.encode() + b"\x00" for m in mechanisms) + b"\x00"
    return encode(b"R", body)


_TEXT_OID: Final = 25


def row_description(columns: list[str]) -> bytes:
    """A RowDescription of text columns (type text, no table), as the proxy's own result sets use."""
    body = len(columns).to_bytes(2, "big")
    for name in columns:
        # name, table oid, column number, type oid, type size, type modifier, format code (text)
        body += name.encode() + b"\x00" + b"\x00\x00\x00\x00\x00\x00" + _INT32.pack(_TEXT_OID) + b"\xff\xff"
        body += b"\xff\xff\xff\xff\x00\x00"
    return encode(b"T", body)


def data_row(values: list[str | None]) -> bytes:
    body = len(values).to_bytes(2, "big")
    for value in values:
        if value is None:
            body += b"\xff\xff\xff\xff"
        else:
            data = value.encode()
            body += _INT32.pack(len(data)) + data
    return encode(b"D", body)


def command_complete(tag: str) -> bytes:
    return encode(b"C", tag.encode() + b"\x00")
