"""The server side of PostgreSQL authentication (sans-IO), for `auth.mode: terminate`: SCRAM-SHA-256 or md5
against a stored verifier, and the upstream credential that a successful exchange yields.

The SCRAM checks (nonces, channel-binding flag, the client's proof against StoredKey) are scramp's `ScramServer`.
What scramp does not expose is SCRAM pass-through: the client's proof is ClientKey XOR HMAC(StoredKey, AuthMessage),
so once the proof is verified, ClientKey = proof XOR HMAC(StoredKey, AuthMessage) (RFC 5802 section 3). With ClientKey
and the verifier's ServerKey the proxy can later run a SCRAM exchange upstream as this client (client_auth.py's
ScramClient with `ScramKeys`), as PgBouncer does: no password is ever seen or stored. That recovery is the few lines
of hmac below.

Use: `ServerAuth(user, verifier).start()` gives the first Authentication request; feed `receive()` the body of every
PasswordMessage-family ('p') message; it returns the bytes to send back. When `done`, send AuthenticationOk once
the upstream login succeeded; `credential` is what to log in upstream with. A wrong password (or an unknown user,
which gets a mock exchange, as in PostgreSQL) raises `AuthenticationFailed`: FATAL 28P01 worded as PostgreSQL's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from functools import cache
from struct import Struct
from typing import Any

from cacheproxy.errors import ProtocolViolation, ProxyError
from cacheproxy.protocol.client_auth import AUTH_MD5, AUTH_SASL_CONTINUE, SCRAM_SHA_256, ScramKeys
from cacheproxy.protocol.framing import encode
from cacheproxy.protocol.messages import AUTH_SASL_FINAL, authentication_sasl
from cacheproxy.protocol.verifiers import Md5Verifier, PlainPassword, ScramVerifier, Verifier, scram_verifier

INVALID_PASSWORD = "28P01"
_INT32 = Struct("!i")


class AuthenticationFailed(ProxyError):
    """The client did not prove it knows the password: what PostgreSQL says (auth.c, auth_failed())."""

    def __init__(self, user: str, why: str) -> None:
        super().__init__(INVALID_PASSWORD, f'password authentication failed for user "{user}"')
        self.why = why  # for the proxy's log only: PostgreSQL tells the client no more than the message above


@dataclass(frozen=True, slots=True, repr=False)
class Md5Hash:
    """An md5 verifier used as a credential: md5 authentication upstream needs nothing more."""

    digest: str


# What the proxy logs in upstream with, on a client's behalf.
UpstreamCredential = ScramKeys | Md5Hash | PlainPassword


class ServerAuth:
    """One client's authentication as `user` against `verifier` (None: no such user; the exchange fails)."""

    def __init__(self, user: str, verifier: Verifier | None, *, nonce: str | None = None) -> None:
        self.user = user
        self._verifier = verifier
        self._nonce = nonce
        self._scram: Any = None  # scramp's ScramServer, once the client chose SCRAM
        self._scram_verifier: ScramVerifier | None = None
        self._md5_salt = b""
        self.done = False
        self.credential: UpstreamCredential | None = None
        self.method = "md5" if isinstance(verifier, Md5Verifier) else "scram-sha-256"

    def start(self) -> bytes:
        """The first request: AuthenticationMD5Password for an md5 verifier, else AuthenticationSASL."""
        if isinstance(self._verifier, Md5Verifier):
            self._md5_salt = secrets.token_bytes(4)
            return encode(b"R", _INT32.pack(AUTH_MD5) + self._md5_salt)
        return authentication_sasl([SCRAM_SHA_256])

    def receive(self, body: bytes) -> bytes:
        if self.done:
            raise ProtocolViolation("authentication message after authentication completed")
        if self.method == "md5":
            return self._on_md5(body)
        if self._scram is None:
            return self._on_sasl_initial(body)
        return self._on_sasl_response(body)

    # -- md5 ---------------------------------------------------------------------------------------------------

    def _on_md5(self, body: bytes) -> bytes:
        assert isinstance(self._verifier, Md5Verifier)
        answer = bytes(body).rstrip(b"\x00")
        digest = self._verifier.digest
        expected = "md5" + hashlib.md5(digest[3:].encode() + self._md5_salt).hexdigest()
        if not hmac.compare_digest(answer, expected.encode()):
            raise AuthenticationFailed(self.user, "md5 password does not match")
        self.done = True
        self.credential = Md5Hash(digest)
        return b""

    # -- SCRAM-SHA-256 -----------------------------------------------------------------------------------------

    def _on_sasl_initial(self, body: bytes) -> bytes:
        mechanism, sep, rest = bytes(body).partition(b"\x00")
        if not sep or len(rest) < 4:
            raise ProtocolViolation("malformed SASLInitialResponse")
        if mechanism.decode("utf-8", "replace") != SCRAM_SHA_256:
            raise ProtocolViolation("client selected an invalid SASL authentication mechanism")
        (length,) = _INT32.unpack_from(rest)
        client_first = rest[4 : 4 + length] if length >= 0 else b""
        self._scram_verifier = self._known_scram_verifier()
        scramp = _scramp()
        server = scramp.ScramMechanism(SCRAM_SHA_256).make_server(self._auth_fn, s_nonce=self._nonce)
        try:
            text = client_first.decode("utf-8")
            gs2_end = text.find(",", text.find(",") + 1) + 1
            bare = text[gs2_end:]
            # libpq and most PostgreSQL drivers leave the SCRAM user name empty ("n=,r=..."), which scramp's parser
            # refuses: it is given a placeholder name, then the client's own text back for the AuthMessage (which
            # must be the bytes the client signed).
            server.set_client_first(text[:gs2_end] + "n=*" + bare[2:] if bare.startswith("n=,") else text)
            server.client_first_bare = bare
            server_first = server.get_server_first()
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise ProtocolViolation(f"malformed SCRAM message: {exc}") from exc
        self._scram = server
        return encode(b"R", _INT32.pack(AUTH_SASL_CONTINUE) + server_first.encode())

    def _on_sasl_response(self, body: bytes) -> bytes:
        server, verifier = self._scram, self._scram_verifier
        assert server is not None and verifier is not None
        try:
            client_final = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("malformed SCRAM message: not UTF-8") from exc
        try:
            server.set_client_final(client_final)
        except _scramp().ScramException as exc:
            raise AuthenticationFailed(self.user, str(exc)) from exc
        if self._verifier is None:  # the mock exchange of an unknown user: no proof can match, but be sure
            raise AuthenticationFailed(self.user, "no such user")
        client_key = recover_client_key(verifier, server.client_first_bare, server.server_first, client_final)
        if isinstance(self._verifier, PlainPassword):
            self.credential = self._verifier
        else:
            self.credential = ScramKeys(verifier.salt, verifier.iterations, client_key, verifier.server_key)
        self.done = True
        return encode(b"R", _INT32.pack(AUTH_SASL_FINAL) + server.get_server_final().encode())

    def _known_scram_verifier(self) -> ScramVerifier:
        verifier = self._verifier
        if isinstance(verifier, ScramVerifier):
            return verifier
        if isinstance(verifier, PlainPassword):
            return scram_verifier(verifier.password)
        # An unknown user: a verifier of a random password, so the exchange runs its course and then fails, telling
        # the client nothing about which roles exist (PostgreSQL's scram_mock_salt does the same).
        return scram_verifier(secrets.token_urlsafe(24))

    def _auth_fn(self, _username: str) -> tuple[bytes, bytes, bytes, int]:
        # The SCRAM user name is ignored, as PostgreSQL does: the StartupMessage's user is the one authenticated.
        verifier = self._scram_verifier
        assert verifier is not None
        return verifier.salt, verifier.stored_key, verifier.server_key, verifier.iterations


@cache
def _scramp() -> Any:
    """scramp, imported at the first SCRAM exchange: it costs ~0.15 s of start-up (asn1crypto), which only
    auth.mode terminate needs."""
    import scramp

    return scramp


def recover_client_key(verifier: ScramVerifier, client_first_bare: str, server_first: str, client_final: str) -> bytes:
    """ClientKey from a verified client-final-message: proof XOR HMAC(StoredKey, AuthMessage) (RFC 5802 3)."""
    without_proof, sep, proof_b64 = client_final.rpartition(",p=")
    if not sep:
        raise ProtocolViolation("malformed SCRAM client-final-message: no proof")
    proof = base64.b64decode(proof_b64)
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(verifier.stored_key, auth_message, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key):
        raise ProtocolViolation("SCRAM proof does not yield the stored key")  # scramp verified it: cannot happen
    return client_key
