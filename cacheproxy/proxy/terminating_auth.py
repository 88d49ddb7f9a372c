"""Terminating authentication (`auth.mode: terminate`): the proxy itself authenticates a client, then logs in
upstream on its behalf with what the exchange yielded (upstream_login.py), instead of relaying the exchange.

Order, as PgBouncer does it: the client's exchange (SCRAM-SHA-256, or md5 when the stored verifier is md5) up to
AuthenticationSASLFinal; then the upstream login; only then AuthenticationOk to the client, followed by what the
server sent (its ParameterStatus messages, our BackendKeyData, ReadyForQuery: the session relays those), so the
client sees what PostgreSQL itself would send. A refused upstream login reaches the client as the server's own
ErrorResponse.
"""

from __future__ import annotations

import asyncio
import logging

from cacheproxy.errors import ProtocolViolation
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import encode
from cacheproxy.protocol.server_auth import AuthenticationFailed, ServerAuth
from cacheproxy.protocol.startup import StartupMessage
from cacheproxy.proxy.auth_source import AuthSource
from cacheproxy.proxy.streams import MAX_STARTUP_MESSAGE, read_message
from cacheproxy.proxy.upstream_login import UpstreamLogin

log = logging.getLogger("cacheproxy.auth")

AUTHENTICATION_OK = encode(b"R", b"\x00\x00\x00\x00")


async def authenticate_client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, startup: StartupMessage, source: AuthSource
) -> UpstreamLogin:
    """Run the client's authentication exchange; raises AuthenticationFailed (FATAL 28P01) on a wrong password."""
    verifier = await source.verifier(startup.user)
    auth = ServerAuth(startup.user, verifier)
    writer.write(auth.start())
    try:
        while not auth.done:
            await writer.drain()
            msg_type, body = await read_message(reader, MAX_STARTUP_MESSAGE)
            if msg_type != m.PASSWORD:
                raise ProtocolViolation(f"expected an authentication response, got message type {chr(msg_type)!r}")
            reply = auth.receive(body)
            if reply:
                writer.write(reply)
    except AuthenticationFailed as exc:
        log.info("client authentication failed for user %s (%s): %s", startup.user, auth.method, exc.why)
        raise
    assert auth.credential is not None
    return UpstreamLogin(startup, auth.credential, auth.method)
