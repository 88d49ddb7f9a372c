"""Client-side authentication (sans-IO): SCRAM-SHA-256 against RFC 7677's vector, MD5 against PostgreSQL's own
value, and the ways a server may misbehave."""

from __future__ import annotations

import base64
import hashlib
import hmac
from struct import pack

import pytest

from cacheproxy.errors import UpstreamError
from cacheproxy.protocol.client_auth import (
    ClientAuth,
    ScramClient,
    ScramState,
    md5_password,
    saslprep,
)
from cacheproxy.protocol.framing import split_messages

# RFC 7677 section 3 (user "user", password "pencil").
NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def auth_request(code: int, data: bytes = b"") -> bytes:
    """The body of an Authentication ('R') message."""
    return pack("!I", code) + data


def sasl_offer(*mechanisms: str) -> bytes:
    return auth_request(10, b"".join(m.encode() + b"\x00" for m in mechanisms) + b"\x00")


def server_signature(password: str, auth_message: bytes) -> bytes:
    """RFC 5802 section 3, as the server computes it (salt and iterations of SERVER_FIRST)."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest())


def one_message(data: bytes) -> tuple[str, bytes]:
    [(msg_type, body)] = split_messages(data)
    return chr(msg_type), body


def test_scram_rfc7677_vector() -> None:
    scram = ScramClient("pencil", user="user", nonce=NONCE)
    assert scram.client_first() == b"n,,n=user,r=" + NONCE.encode()
    assert scram.client_final(SERVER_FIRST) == CLIENT_FINAL
    scram.verify(SERVER_FINAL)
    assert scram.state is ScramState.VERIFIED


def test_scram_login_as_postgresql_runs_it() -> None:
    # PostgreSQL takes the user from the StartupMessage: the client-first-message carries an empty name, which
    # changes the AuthMessage and so the proof; the server's answers below are the RFC's, re-signed for that.
    auth = ClientAuth("user", "pencil", scram_nonce=NONCE)
    msg_type, body = one_message(auth.receive(sasl_offer("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")))
    assert msg_type == "p"
    first = b"n,,n=,r=" + NONCE.encode()
    assert body == b"SCRAM-SHA-256\x00" + pack("!i", len(first)) + first
    msg_type, body = one_message(auth.receive(auth_request(11, SERVER_FIRST)))
    assert msg_type == "p"
    assert body.startswith(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=")
    assert body != CLIENT_FINAL  # the empty user name is part of what is signed
    without_proof = body[: body.index(b",p=")]
    signature = server_signature("pencil", first[3:] + b"," + SERVER_FIRST + b"," + without_proof)
    assert auth.receive(auth_request(12, b"v=" + signature)) == b""
    assert not auth.done
    assert auth.receive(auth_request(0)) == b""
    assert auth.done
    assert auth.method == "scram-sha-256"


def test_wrong_server_signature_raises() -> None:
    scram = ScramClient("pencil", user="user", nonce=NONCE)
    scram.client_final(SERVER_FIRST)
    forged = bytearray(base64.b64decode(SERVER_FINAL[2:]))
    forged[0] ^= 1
    with pytest.raises(UpstreamError, match="incorrect server signature") as excinfo:
        scram.verify(b"v=" + base64.b64encode(bytes(forged)))
    assert excinfo.value.sqlstate == "08P01"
    assert scram.state is ScramState.SENT_FINAL


def test_wrong_password_gives_a_different_proof() -> None:
    scram = ScramClient("pencil!", user="user", nonce=NONCE)
    assert scram.client_final(SERVER_FIRST) != CLIENT_FINAL
    with pytest.raises(UpstreamError, match="incorrect server signature"):
        scram.verify(SERVER_FINAL)


def test_authentication_ok_without_the_server_signature_is_refused() -> None:
    # A server that skips AuthenticationSASLFinal has not proved it knows the password.
    auth = ClientAuth("user", "pencil", scram_nonce=NONCE)
    auth.receive(sasl_offer("SCRAM-SHA-256"))
    auth.receive(auth_request(11, SERVER_FIRST))
    with pytest.raises(UpstreamError, match="without proving"):
        auth.receive(auth_request(0))
    assert not auth.done


def test_server_error_attribute_in_final_message() -> None:
    scram = ScramClient("pencil", user="user", nonce=NONCE)
    scram.client_final(SERVER_FIRST)
    with pytest.raises(UpstreamError, match="invalid-proof"):
        scram.verify(b"e=invalid-proof")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=someoneElsesNonce123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nonce not extending ours
        b"r=" + NONCE.encode() + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nothing added by the server
        SERVER_FIRST.replace(b"i=4096", b"i=0"),
        SERVER_FIRST.replace(b",s=W22ZaJ0SNY7soEsUEjb6gQ==", b""),
        SERVER_FIRST.replace(b"s=W22Z", b"s=!!!"),
        b"garbage",
    ],
)
def test_malformed_server_first_message(server_first: bytes) -> None:
    scram = ScramClient("pencil", nonce=NONCE)
    with pytest.raises(UpstreamError) as excinfo:
        scram.client_final(server_first)
    assert excinfo.value.sqlstate == "08P01"


def test_only_channel_binding_offered_is_refused() -> None:
    with pytest.raises(UpstreamError, match="SCRAM-SHA-256-PLUS") as excinfo:
        ClientAuth("u", "p").receive(sasl_offer("SCRAM-SHA-256-PLUS"))
    assert excinfo.value.sqlstate == "28000"


def test_out_of_order_sasl_messages() -> None:
    with pytest.raises(UpstreamError, match="without a SASL exchange"):
        ClientAuth("u", "p").receive(auth_request(11, SERVER_FIRST))
    scram = ScramClient("pencil", nonce=NONCE)
    with pytest.raises(UpstreamError, match="unexpected"):
        scram.verify(SERVER_FINAL)


def test_md5_matches_postgresql() -> None:
    # From PostgreSQL 15: SELECT 'md5' || md5(md5('bob-secretbob_md5') || 'abcd')
    assert md5_password("bob_md5", "bob-secret", b"abcd") == "md50f61ec1ae54ed5fa943e7418c8356eb3"
    auth = ClientAuth("bob_md5", "bob-secret")
    assert one_message(auth.receive(auth_request(5, b"abcd"))) == ("p", b"md50f61ec1ae54ed5fa943e7418c8356eb3\x00")
    assert auth.method == "md5"


def test_md5_salt_must_be_four_bytes() -> None:
    with pytest.raises(UpstreamError, match="salt"):
        ClientAuth("u", "p").receive(auth_request(5, b"abc"))


def test_cleartext_password() -> None:
    auth = ClientAuth("carol", "it's secret")
    assert one_message(auth.receive(auth_request(3))) == ("p", b"it's secret\x00")
    auth.receive(auth_request(0))
    assert auth.done


def test_trust_is_just_authentication_ok() -> None:
    auth = ClientAuth("postgres", None)
    assert auth.receive(auth_request(0)) == b""
    assert auth.done
    assert auth.method == "trust"
    with pytest.raises(UpstreamError, match="after authentication completed"):
        auth.receive(auth_request(0))


@pytest.mark.parametrize("code", [3, 5, 10])
def test_no_password_for_a_password_method(code: int) -> None:
    body = sasl_offer("SCRAM-SHA-256") if code == 10 else auth_request(code, b"abcd" if code == 5 else b"")
    with pytest.raises(UpstreamError, match='user "app", but no password') as excinfo:
        ClientAuth("app", None).receive(body)
    assert excinfo.value.sqlstate == "28000"


@pytest.mark.parametrize("code", [2, 7, 9, 99])
def test_unsupported_methods(code: int) -> None:
    with pytest.raises(UpstreamError, match="not supported") as excinfo:
        ClientAuth("app", "secret-value").receive(auth_request(code))
    assert excinfo.value.sqlstate == "28000"
    assert "secret-value" not in str(excinfo.value)


def test_short_authentication_request() -> None:
    with pytest.raises(UpstreamError, match="too short"):
        ClientAuth("app", "x").receive(b"\x00\x00")


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("pencil", b"pencil"),
        ("I\u00adX", b"IX"),  # B.1: soft hyphen mapped to nothing
        ("a\u00a0b", b"a b"),  # C.1.2: non-ASCII space mapped to SPACE
        ("\u2168", b"IX"),  # NFKC: ROMAN NUMERAL NINE
        ("a\u0007b\u00e9", "a\u0007b\u00e9".encode()),  # prohibited control character: used unnormalized
        ("\u0627\u0031", "\u0627\u0031".encode()),  # RandALCat not at both ends: used unnormalized
    ],
)
def test_saslprep(password: str, prepared: bytes) -> None:
    assert saslprep(password) == prepared
