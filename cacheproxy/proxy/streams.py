"""Startup and authentication over asyncio streams: whole messages read (few and small), the authentication request
as the client sees it, what a stream already holds when the relay takes its transport over, a peer's name."""

from __future__ import annotations

import asyncio

from cacheproxy.errors import ProtocolViolation
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE, encode
from cacheproxy.upstream import connection_lost_error

# Upstream messages during authentication are small; anything bigger is not a PostgreSQL server.
MAX_STARTUP_MESSAGE = 1 << 20


async def read_message(reader: asyncio.StreamReader, max_size: int) -> tuple[int, bytes]:
    """Read one whole message (startup and authentication phases only, where messages are few and small)."""
    header = await reader.readexactly(HEADER_SIZE)
    length = int.from_bytes(header[1:5], "big")
    if length < 4 or length > max_size:
        raise ProtocolViolation(f"invalid message length {length} for message type {chr(header[0])!r}")
    return header[0], await reader.readexactly(length - 4)


async def read_upstream_message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One upstream message during startup; a lost connection is an UpstreamError."""
    try:
        return await read_message(reader, MAX_STARTUP_MESSAGE)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        raise connection_lost_error() from exc


def drain_stream_buffer(reader: asyncio.StreamReader) -> bytes:
    """Whatever a StreamReader already holds, without waiting (the relay takes over its transport next)."""
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    data = bytes(buffer)
    buffer.clear()
    return data


def peer_name(writer: asyncio.StreamWriter) -> str:
    """The client's address as host:port, for the log."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "unknown")


def client_auth_request(code: int, body: bytes) -> bytes:
    """The authentication request as the client should see it.

    SCRAM-SHA-256-PLUS binds the exchange to the TLS channel it runs on; the client's channel ends at this proxy, so
    a client that picked -PLUS would fail. Only the mechanisms without channel binding are offered.
    """
    if code == m.AUTH_SASL:
        return m.authentication_sasl([mech for mech in m.sasl_mechanisms(body) if not mech.endswith("-PLUS")])
    return encode(b"R", body)
