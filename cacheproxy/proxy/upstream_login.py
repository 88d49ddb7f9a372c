"""UpstreamLogin: logs in to the upstream as a client the proxy authenticated itself (`auth.mode: terminate`), at
any time and as often as needed (the session's first connection, a re-attach after a failover), with no password.

Interface (kept on the session as `session.upstream_login`; None in relay mode):

    login.user, login.database          who the connection is for (from the client's StartupMessage)
    login.startup                       the client's StartupMessage (`raw` is what is sent upstream, as is)
    login.method                        how the client authenticated: "scram-sha-256" or "md5"

    reader, writer = await open_upstream(cfg)       # or any connected stream pair (another host after a failover)
    result = await login.login(reader, writer)      # StartupMessage, authentication, then up to ReadyForQuery
        result.parameters   [(name, value), ...]    the ParameterStatus messages, in order
        result.backend_key  (pid, secret bytes)     the new backend's key (cancel requests go to it)
        result.status       b"I"                    the transaction status of its first ReadyForQuery
        result.notices      [raw NoticeResponse messages]
    await login.authenticate(reader, writer)        # the same, stopping after AuthenticationOk (the session's first
                                                    # connection relays ParameterStatus/BackendKeyData itself)

Both raise `UpstreamRefused` (an UpstreamError carrying the server's ErrorResponse, `body`, and its SQLSTATE) when
the server refuses the login, and UpstreamError when the connection is lost or the server asks for a method the
credential cannot answer. The caller owns the streams: it closes the writer on error.

The credential: SCRAM keys recovered from the client's proof (SCRAM pass-through: works while the server's verifier
is the one the client was checked against, i.e. same salt and iteration count); an md5 verifier (md5 upstream
logins only); or a plain password from auth.file (any method). A server that trusts the user needs none.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cacheproxy.errors import PROTOCOL_VIOLATION, UpstreamError
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.client_auth import ClientAuth, ScramKeys
from cacheproxy.protocol.framing import encode
from cacheproxy.protocol.server_auth import Md5Hash, UpstreamCredential
from cacheproxy.protocol.startup import StartupMessage
from cacheproxy.proxy.streams import read_upstream_message

_LOGIN_TIMEOUT = 30.0


class UpstreamRefused(UpstreamError):
    """The server answered the login with an ErrorResponse (`body`, relayable to the client as it is)."""

    def __init__(self, body: bytes) -> None:
        fields = m.decode_error_fields(body)
        super().__init__(fields.get("M", "the upstream server refused the login"), sqlstate=fields.get("C", "08004"))
        self.body = body


@dataclass(slots=True)
class LoginResult:
    """What the server said after AuthenticationOk, up to its first ReadyForQuery."""

    parameters: list[tuple[str, str]] = field(default_factory=list)
    backend_key: tuple[int, bytes] = (0, b"")
    status: bytes = b"I"
    notices: list[bytes] = field(default_factory=list)


@dataclass(frozen=True, slots=True, repr=False)
class UpstreamLogin:
    """One client's way into the upstream: its StartupMessage and the credential its own exchange yielded."""

    startup: StartupMessage
    credential: UpstreamCredential
    method: str

    @property
    def user(self) -> str:
        return self.startup.user

    @property
    def database(self) -> str:
        return self.startup.database

    def __repr__(self) -> str:
        return f"UpstreamLogin(user={self.user!r}, database={self.database!r}, method={self.method!r})"

    def _client_auth(self) -> ClientAuth:
        credential = self.credential
        if isinstance(credential, ScramKeys):
            return ClientAuth(self.user, None, scram_keys=credential)
        if isinstance(credential, Md5Hash):
            return ClientAuth(self.user, None, md5_digest=credential.digest)
        return ClientAuth(self.user, credential.password)

    async def authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout: float = _LOGIN_TIMEOUT
    ) -> list[bytes]:
        """Send the StartupMessage and answer the server up to AuthenticationOk; returns the notices it sent."""
        auth = self._client_auth()
        notices: list[bytes] = []
        writer.write(self.startup.raw)
        async with asyncio.timeout(timeout):
            while not auth.done:
                msg_type, body = await read_upstream_message(reader)
                if msg_type == m.AUTHENTICATION:
                    reply = auth.receive(body)
                    if reply:
                        writer.write(reply)
                elif msg_type == m.ERROR_RESPONSE:
                    raise UpstreamRefused(body)
                elif msg_type == m.NOTICE_RESPONSE:
                    notices.append(encode(bytes((msg_type,)), body))
                elif msg_type != m.NEGOTIATE_PROTOCOL_VERSION:
                    raise UpstreamError(
                        f"unexpected message {chr(msg_type)!r} from upstream during authentication",
                        sqlstate=PROTOCOL_VIOLATION,
                    )
        return notices

    async def login(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout: float = _LOGIN_TIMEOUT
    ) -> LoginResult:
        """`authenticate`, then read ParameterStatus, BackendKeyData and notices up to the first ReadyForQuery."""
        result = LoginResult(notices=await self.authenticate(reader, writer, timeout=timeout))
        async with asyncio.timeout(timeout):
            while True:
                msg_type, body = await read_upstream_message(reader)
                if msg_type == m.PARAMETER_STATUS:
                    result.parameters.append(m.decode_parameter_status(body))
                elif msg_type == m.BACKEND_KEY_DATA:
                    result.backend_key = m.decode_backend_key_data(body)
                elif msg_type == m.READY_FOR_QUERY:
                    result.status = bytes(body[:1])
                    return result
                elif msg_type == m.ERROR_RESPONSE:
                    raise UpstreamRefused(body)
                elif msg_type == m.NOTICE_RESPONSE:
                    result.notices.append(encode(bytes((msg_type,)), body))
