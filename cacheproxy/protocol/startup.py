"""Startup-phase packets: SSLRequest, GSSENCRequest, CancelRequest and StartupMessage.

These packets have no type byte: an Int32 length (counting itself), an Int32 request code, then the body
(PostgreSQL docs, "Message Formats"). PostgreSQL refuses startup packets over 10000 bytes; so do we.
"""

from __future__ import annotations

from dataclasses import dataclass
from struct import Struct

from cacheproxy.errors import FEATURE_NOT_SUPPORTED, INVALID_AUTHORIZATION_SPECIFICATION, ProtocolViolation

MAX_STARTUP_PACKET = 10000
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3 = 3

_INT32 = Struct("!I")
_CANCEL = Struct("!IIII")


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks to switch to TLS before the StartupMessage."""


@dataclass(frozen=True, slots=True)
class GSSEncRequest:
    """The client asks for GSSAPI encryption before the StartupMessage."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """A new connection asking to cancel the query running in the session with this key."""

    process_id: int
    secret_key: int


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """Protocol version and parameters (user, database, options, application_name, ...).

    `raw` is the packet exactly as received (length prefix included), so that it can be relayed unchanged.
    """

    major: int
    minor: int
    parameters: dict[str, str]
    raw: bytes

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        # PostgreSQL: the database defaults to the user name.
        return self.parameters.get("database") or self.user


StartupPacket = SSLRequest | GSSEncRequest | CancelRequest | StartupMessage


def read_length(header: bytes) -> int:
    """Validate the Int32 length that starts a startup packet; return it."""
    length: int = _INT32.unpack(header)[0]
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")
    return length


def decode_startup(packet: bytes) -> StartupPacket:
    """Decode a whole startup-phase packet, length prefix included."""
    if len(packet) < 8 or _INT32.unpack_from(packet, 0)[0] != len(packet):
        raise ProtocolViolation("invalid length of startup packet")
    code: int = _INT32.unpack_from(packet, 4)[0]
    if code == SSL_REQUEST_CODE and len(packet) == 8:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and len(packet) == 8:
        return GSSEncRequest()
    if code == CANCEL_REQUEST_CODE and len(packet) == 16:
        _, _, pid, secret = _CANCEL.unpack(packet)
        return CancelRequest(pid, secret)
    major, minor = code >> 16, code & 0xFFFF
    if major != PROTOCOL_3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{minor}: cacheproxy supports 3.x",
            sqlstate=FEATURE_NOT_SUPPORTED,
        )
    return StartupMessage(major, minor, _decode_parameters(packet[8:]), packet)


def _decode_parameters(body: bytes) -> dict[str, str]:
    # Name/value pairs of NUL-terminated strings, ended by one more NUL.
    if not body.endswith(b"\x00"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    pairs = body[:-1]
    if pairs and not pairs.endswith(b"\x00"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parts = pairs[:-1].split(b"\x00") if pairs else []
    if len(parts) % 2:
        raise ProtocolViolation("invalid startup packet layout: a parameter has no value")
    try:
        strings = [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid startup packet: parameters are not valid UTF-8") from exc
    params = dict(zip(strings[0::2], strings[1::2], strict=True))
    if not params.get("user"):
        raise ProtocolViolation(
            "no PostgreSQL user name specified in startup packet", sqlstate=INVALID_AUTHORIZATION_SPECIFICATION
        )
    return params


def encode_startup(parameters: dict[str, str], major: int = 3, minor: int = 0) -> bytes:
    body = _INT32.pack((major << 16) | minor)
    for key, value in parameters.items():
        body += key.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return _INT32.pack(len(body) + 4) + body


def encode_cancel(process_id: int, secret_key: int | bytes) -> bytes:
    """A CancelRequest. The secret is 4 bytes in protocol 3.0; 3.2 servers may issue longer ones (as bytes)."""
    secret = secret_key.to_bytes(4, "big") if isinstance(secret_key, int) else secret_key
    return _INT32.pack(12 + len(secret)) + _INT32.pack(CANCEL_REQUEST_CODE) + _INT32.pack(process_id) + secret


def encode_ssl_request() -> bytes:
    return _INT32.pack(8) + _INT32.pack(SSL_REQUEST_CODE)
