"""The client side of PostgreSQL authentication (sans-IO): cleartext, MD5 and SCRAM-SHA-256.

The proxy's own upstream connections log in with these; so do client sessions in `auth.mode: terminate`, with the
SCRAM keys or md5 verifier their own exchange with the proxy yielded (pass-through: `ScramKeys`); in relay mode the
client's exchange is relayed instead.
`ClientAuth.receive(body)` takes the body of each Authentication ('R') message and returns the bytes to send back;
no sockets, no clock. Formats: PostgreSQL docs, "Message Formats" and "SASL Authentication"; SCRAM: RFC 5802 and
RFC 7677 as PostgreSQL does it: no channel binding (gs2 header ``n,,``), the user name left empty in the
client-first-message (the server takes it from the StartupMessage), and the server signature checked before
AuthenticationOk is accepted, so that a server that does not know the password cannot complete the login.

Every error is an `UpstreamError` whose text never holds the password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass
from enum import Enum
from struct import Struct

from cacheproxy.errors import INVALID_AUTHORIZATION_SPECIFICATION, PROTOCOL_VIOLATION, UpstreamError
from cacheproxy.protocol.framing import encode
from cacheproxy.protocol.messages import AUTH_OK, AUTH_SASL, AUTH_SASL_FINAL, auth_code, sasl_mechanisms

_INT32 = Struct("!i")

# Authentication request codes besides those in messages.py (PostgreSQL docs, "Message Formats").
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL_CONTINUE = 11
_UNSUPPORTED = {2: "Kerberos V5", 6: "SCM credentials", 7: "GSSAPI", 8: "GSSAPI", 9: "SSPI"}

SCRAM_SHA_256 = "SCRAM-SHA-256"
_GS2_HEADER = "n,,"  # "n": the client does not support channel binding


# -- frontend message builders (all are 'p' messages; the server knows which by its own state) ---------------


def password_message(password: str) -> bytes:
    """PasswordMessage: a cleartext password or an MD5 hash, NUL-terminated."""
    return encode(b"p", password.encode() + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    """SASLInitialResponse: the mechanism name, then the length-prefixed client-first-message."""
    return encode(b"p", mechanism.encode() + b"\x00" + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    """SASLResponse: the client-final-message, unprefixed."""
    return encode(b"p", data)


def md5_password(user: str, password: str, salt: bytes) -> str:
    """What AuthenticationMD5Password asks for: ``"md5" + md5(md5(password + user) + salt)``, in hex.

    >>> md5_password("bob", "secret", b"\\x01\\x02\\x03\\x04")
    'md5f21dfe33ff3a9e03dbc3e008251fe5cc'
    """
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


# -- SCRAM-SHA-256 ----------------------------------------------------------------------------------------------


class ScramState(Enum):
    """Where a SCRAM exchange stands."""

    #: client-first-message produced, waiting for the server-first-message
    SENT_FIRST = 1
    #: client-final-message produced, waiting for the server-final-message
    SENT_FINAL = 2
    #: the server's signature matched: the server knows the password
    VERIFIED = 3


@dataclass(frozen=True, slots=True, repr=False)
class ScramKeys:
    """SCRAM pass-through: what a client's own exchange with the proxy yields (server_auth.py). ClientKey and
    ServerKey are enough to log in as that client wherever the server stores the same verifier (same salt and
    iteration count), without the password. repr=False: keys are password-equivalent for SCRAM."""

    salt: bytes
    iterations: int
    client_key: bytes
    server_key: bytes


class ScramClient:
    """One SCRAM-SHA-256 exchange: `client_first()`, `client_final(server_first)`, `verify(server_final)`.

    `nonce` is for tests (the RFC's vectors); by default 18 random bytes, base64-encoded as libpq does. With `keys`
    instead of a password (pass-through), the server's salt and iteration count must be those the keys came from.
    """

    def __init__(
        self, password: str, *, user: str = "", nonce: str | None = None, keys: ScramKeys | None = None
    ) -> None:
        self._password = saslprep(password)
        self._keys = keys
        self._client_nonce = nonce if nonce is not None else base64.b64encode(secrets.token_bytes(18)).decode()
        self._first_bare = f"n={_sasl_name(user)},r={self._client_nonce}"
        self._server_signature = b""
        self.state = ScramState.SENT_FIRST

    def client_first(self) -> bytes:
        return (_GS2_HEADER + self._first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        if self.state is not ScramState.SENT_FIRST:
            raise _protocol_error("unexpected SCRAM server-first-message")
        text = _decode(server_first)
        attrs = _attributes(text)
        nonce, salt_b64, iterations = attrs.get("r", ""), attrs.get("s"), attrs.get("i", "")
        if not nonce.startswith(self._client_nonce) or len(nonce) == len(self._client_nonce):
            raise _protocol_error("invalid SCRAM server-first-message: the server nonce does not extend ours")
        if salt_b64 is None or not iterations.isdigit() or int(iterations) < 1:
            raise _protocol_error("invalid SCRAM server-first-message: bad salt or iteration count")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except ValueError as exc:
            raise _protocol_error("invalid SCRAM server-first-message: the salt is not base64") from exc
        client_key, server_key = self._keys_for(salt, int(iterations))
        without_proof = f"c={base64.b64encode(_GS2_HEADER.encode()).decode()},r={nonce}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        client_signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
        self._server_signature = _hmac(server_key, auth_message)
        self.state = ScramState.SENT_FINAL
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def _keys_for(self, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
        """(ClientKey, ServerKey) for the server's salt and iteration count."""
        keys = self._keys
        if keys is not None:
            if (keys.salt, keys.iterations) != (salt, iterations):
                raise UpstreamError(
                    "SCRAM pass-through failed: the server's verifier for this role is not the one the client was "
                    "authenticated against (another salt or iteration count: was the password changed, or does "
                    "auth.file hold another verifier?)",
                    sqlstate=INVALID_AUTHORIZATION_SPECIFICATION,
                )
            return keys.client_key, keys.server_key
        # PBKDF2 is deliberately slow (4096 iterations by default: a few ms); control connections are rare.
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)
        return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")

    def verify(self, server_final: bytes) -> None:
        """Check the server-final-message; raises unless it carries the signature only the password can give."""
        if self.state is not ScramState.SENT_FINAL:
            raise _protocol_error("unexpected SCRAM server-final-message")
        attrs = _attributes(_decode(server_final))
        if "e" in attrs:
            raise UpstreamError(
                f"SCRAM authentication failed: server error {attrs['e']!r}", sqlstate=PROTOCOL_VIOLATION
            )
        try:
            signature = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError as exc:
            raise _protocol_error("invalid SCRAM server-final-message: the signature is not base64") from exc
        if not hmac.compare_digest(signature, self._server_signature):
            raise UpstreamError(
                "SCRAM authentication failed: incorrect server signature (the server does not know the password)",
                sqlstate=PROTOCOL_VIOLATION,
            )
        self.state = ScramState.VERIFIED


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _sasl_name(user: str) -> str:
    # RFC 5802 section 5.1: "=" and "," are escaped in saslname.
    return user.replace("=", "=3D").replace(",", "=2C")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _protocol_error("invalid SCRAM message: not UTF-8") from exc


def _attributes(text: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if len(name) != 1 or not eq:
            raise _protocol_error("invalid SCRAM message: malformed attribute")
        attrs.setdefault(name, value)
    return attrs


def saslprep(password: str) -> bytes:
    """The password as SCRAM hashes it: SASLprep (RFC 4013) when that succeeds, else the raw UTF-8 bytes.

    This is what PostgreSQL (pg_saslprep) does on both sides: pure ASCII is used as is; a password that SASLprep
    prohibits is used unnormalized rather than refused.

    >>> saslprep("I\\u00adX") == b"IX"
    True
    """
    raw = password.encode("utf-8")
    if password.isascii():
        return raw
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch for ch in password if not stringprep.in_table_b1(ch))
    text = unicodedata.normalize("NFKC", mapped)
    if not text or any(_prohibited(ch) for ch in text):
        return raw
    if any(stringprep.in_table_d1(ch) for ch in text):
        # RFC 3454 section 6: RandALCat text has no LCat and starts and ends with RandALCat.
        if any(stringprep.in_table_d2(ch) for ch in text):
            return raw
        if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
            return raw
    return text.encode("utf-8")


def _prohibited(ch: str) -> bool:
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
        or stringprep.in_table_a1(ch)
    )


# -- the login state machine -------------------------------------------------------------------------------------


class ClientAuth:
    """Answers a server's Authentication requests for one login as `user` with `password` (None: no password).

    Feed `receive()` the body of every 'R' message, in order, and send what it returns (b"" for nothing);
    `done` turns true on AuthenticationOk. After a SCRAM exchange, AuthenticationOk is accepted only once the
    server's signature has been verified (mutual authentication).
    """

    def __init__(
        self,
        user: str,
        password: str | None,
        *,
        scram_nonce: str | None = None,
        scram_keys: ScramKeys | None = None,
        md5_digest: str | None = None,
    ) -> None:
        self._user = user
        self._password = password
        self._scram_keys = scram_keys  # pass-through: log in by SCRAM with these instead of a password
        self._md5_digest = md5_digest  # an md5 verifier ("md5" + md5(password + user)): md5 needs no more
        self._scram_nonce = scram_nonce
        self._scram: ScramClient | None = None
        self.done = False
        self.method = "trust"

    def receive(self, body: bytes) -> bytes:
        if self.done:
            raise _protocol_error("authentication request after authentication completed")
        if len(body) < 4:
            raise _protocol_error("invalid authentication request: too short")
        code = auth_code(body)
        if code == AUTH_OK:
            return self._on_ok()
        if code == AUTH_CLEARTEXT:
            self.method = "password"
            return password_message(self._need_password())
        if code == AUTH_MD5:
            self.method = "md5"
            if len(body) != 8:
                raise _protocol_error("invalid AuthenticationMD5Password: the salt is not 4 bytes")
            salt = bytes(body[4:8])
            if self._md5_digest is not None and self._password is None:
                return password_message("md5" + hashlib.md5(self._md5_digest[3:].encode() + salt).hexdigest())
            return password_message(md5_password(self._user, self._need_password(), salt))
        if code == AUTH_SASL:
            return self._on_sasl(body)
        if code == AUTH_SASL_CONTINUE:
            return sasl_response(self._scram_in_progress().client_final(bytes(body[4:])))
        if code == AUTH_SASL_FINAL:
            self._scram_in_progress().verify(bytes(body[4:]))
            return b""
        method = _UNSUPPORTED.get(code, f"code {code}")
        raise UpstreamError(
            f"authentication method {method} requested by the server is not supported by cacheproxy",
            sqlstate=INVALID_AUTHORIZATION_SPECIFICATION,
        )

    def _on_ok(self) -> bytes:
        if self._scram is not None and self._scram.state is not ScramState.VERIFIED:
            raise _protocol_error("the server ended SCRAM authentication without proving it knows the password")
        self.done = True
        return b""

    def _on_sasl(self, body: bytes) -> bytes:
        if self._scram is not None:
            raise _protocol_error("a second AuthenticationSASL during one login")
        mechanisms = sasl_mechanisms(body)
        if SCRAM_SHA_256 not in mechanisms:
            raise UpstreamError(
                f"none of the server's SASL authentication mechanisms ({', '.join(mechanisms)}) is supported",
                sqlstate=INVALID_AUTHORIZATION_SPECIFICATION,
            )
        self.method = "scram-sha-256"
        if self._scram_keys is not None and self._password is None:
            self._scram = ScramClient("", nonce=self._scram_nonce, keys=self._scram_keys)
        else:
            self._scram = ScramClient(self._need_password(), nonce=self._scram_nonce)
        return sasl_initial_response(SCRAM_SHA_256, self._scram.client_first())

    def _scram_in_progress(self) -> ScramClient:
        if self._scram is None:
            raise _protocol_error("SASL continuation without a SASL exchange in progress")
        return self._scram

    def _need_password(self) -> str:
        if self._password is None and (self._scram_keys is not None or self._md5_digest is not None):
            held = "SCRAM keys" if self._scram_keys is not None else "an md5 verifier"
            raise UpstreamError(
                f'the server requested {self.method} authentication for user "{self._user}", but the proxy holds '
                f"only {held} for it (auth.mode: terminate): let the server use "
                f"{'scram-sha-256' if self._scram_keys is not None else 'md5'} for the proxy, or put the password in "
                "clear in auth.file",
                sqlstate=INVALID_AUTHORIZATION_SPECIFICATION,
            )
        if self._password is None:
            raise UpstreamError(
                f'the server requested password authentication for user "{self._user}", but no password is set',
                sqlstate=INVALID_AUTHORIZATION_SPECIFICATION,
            )
        return self._password


def _protocol_error(message: str) -> UpstreamError:
    return UpstreamError(message, sqlstate=PROTOCOL_VIOLATION)
