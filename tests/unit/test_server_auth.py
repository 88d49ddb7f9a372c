"""Terminating authentication, sans-IO: the server side (ServerAuth: SCRAM-SHA-256 via scramp, md5), the ClientKey it
recovers, and the pass-through login (ClientAuth with ScramKeys) that a real SCRAM server accepts."""

from __future__ import annotations

import hashlib
from struct import pack, unpack_from

import pytest
import scramp

from cacheproxy.errors import ProtocolViolation, UpstreamError
from cacheproxy.protocol.client_auth import ClientAuth, ScramClient, ScramKeys, md5_password
from cacheproxy.protocol.server_auth import AuthenticationFailed, Md5Hash, ServerAuth
from cacheproxy.protocol.verifiers import (
    Md5Verifier,
    PlainPassword,
    md5_verifier,
    parse_userlist,
    parse_verifier,
    scram_verifier,
)

PASSWORD = "correct horse"


def _body(message: bytes) -> bytes:
    """An 'R' message without its 5-byte header."""
    assert message[:1] == b"R"
    return message[5:]


def _scram_login(auth: ServerAuth, password: str, user: str = "") -> bytes:
    """Drive `auth` with our own client (libpq's style: empty SCRAM user name); returns the server-final body."""
    client = ScramClient(password, user=user)
    start = _body(auth.start())
    assert unpack_from("!i", start)[0] == 10 and b"SCRAM-SHA-256" in start
    first = client.client_first()
    server_first = _body(auth.receive(b"SCRAM-SHA-256\x00" + pack("!i", len(first)) + first))
    final = _body(auth.receive(client.client_final(server_first[4:])))
    client.verify(final[4:])  # the proxy proves it holds the verifier, as PostgreSQL does
    return final


def test_scram_login_recovers_the_client_key() -> None:
    verifier = scram_verifier(PASSWORD)
    auth = ServerAuth("alice", verifier)
    _scram_login(auth, PASSWORD)
    assert auth.done
    keys = auth.credential
    assert isinstance(keys, ScramKeys)
    assert hashlib.sha256(keys.client_key).digest() == verifier.stored_key
    assert (keys.salt, keys.iterations, keys.server_key) == (verifier.salt, verifier.iterations, verifier.server_key)


def test_scram_user_name_in_the_message_is_accepted() -> None:
    auth = ServerAuth("alice", scram_verifier(PASSWORD))
    _scram_login(auth, PASSWORD, user="alice")
    assert auth.done


def test_scram_wrong_password_fails_as_postgres_says() -> None:
    auth = ServerAuth("alice", scram_verifier(PASSWORD))
    with pytest.raises(AuthenticationFailed) as failed:
        _scram_login(auth, "wrong")
    assert failed.value.sqlstate == "28P01"
    assert failed.value.severity == "FATAL"
    assert failed.value.message == 'password authentication failed for user "alice"'
    assert not auth.done and auth.credential is None


def test_unknown_user_gets_the_same_failure() -> None:
    auth = ServerAuth("nobody", None)
    with pytest.raises(AuthenticationFailed) as failed:
        _scram_login(auth, "anything")
    assert failed.value.message == 'password authentication failed for user "nobody"'


def test_plain_password_from_a_file_is_checked_by_scram() -> None:
    auth = ServerAuth("carol", PlainPassword(PASSWORD))
    _scram_login(auth, PASSWORD)
    assert auth.credential == PlainPassword(PASSWORD)
    with pytest.raises(AuthenticationFailed):
        _scram_login(ServerAuth("carol", PlainPassword(PASSWORD)), "nope")


def test_md5_login() -> None:
    verifier = md5_verifier("bob", PASSWORD)
    auth = ServerAuth("bob", verifier)
    request = _body(auth.start())
    assert unpack_from("!i", request)[0] == 5
    salt = request[4:8]
    assert auth.receive(md5_password("bob", PASSWORD, salt).encode() + b"\x00") == b""
    assert auth.credential == Md5Hash(verifier.digest)
    wrong = ServerAuth("bob", verifier)
    salt = _body(wrong.start())[4:8]
    with pytest.raises(AuthenticationFailed):
        wrong.receive(md5_password("bob", "nope", salt).encode() + b"\x00")


def test_unsupported_mechanism_is_refused() -> None:
    auth = ServerAuth("alice", scram_verifier(PASSWORD))
    auth.start()
    with pytest.raises(ProtocolViolation):
        auth.receive(b"SCRAM-SHA-256-PLUS\x00" + pack("!i", 3) + b"p=x")


def _scramp_server_for(verifier_text: str) -> scramp.core.ScramServer:
    v = parse_verifier(verifier_text)
    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    return mechanism.make_server(lambda _user: (v.salt, v.stored_key, v.server_key, v.iterations))


def _as_verifier_text(salt: bytes, iterations: int, password: str) -> str:
    import base64

    v = scram_verifier(password, salt, iterations)
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(v.stored_key).decode()}:{b64(v.server_key).decode()}"


def test_pass_through_keys_log_in_to_an_independent_scram_server() -> None:
    """The keys a client's exchange with the proxy yields log in to a SCRAM server (scramp's, standing in for
    PostgreSQL) that holds the same verifier: the password itself is never given to the proxy."""
    salt = b"0123456789abcdef"
    text = _as_verifier_text(salt, 4096, PASSWORD)
    proxy_side = ServerAuth("alice", parse_verifier(text))
    _scram_login(proxy_side, PASSWORD)
    keys = proxy_side.credential
    assert isinstance(keys, ScramKeys)

    upstream = _scramp_server_for(text)
    login = ClientAuth("alice", None, scram_keys=keys)
    first = login.receive(pack("!i", 10) + b"SCRAM-SHA-256\x00\x00")
    client_first = first[5 + len(b"SCRAM-SHA-256\x00") + 4 :]
    upstream.set_client_first(client_first.decode().replace("n=,", "n=alice,"))
    upstream.client_first_bare = client_first.decode()[3:]
    final = login.receive(pack("!i", 11) + upstream.get_server_first().encode())
    upstream.set_client_final(final[5:].decode())  # raises unless the proof is right
    login.receive(pack("!i", 12) + upstream.get_server_final().encode())
    login.receive(pack("!i", 0))
    assert login.done


def test_pass_through_refuses_another_salt() -> None:
    keys = ScramKeys(b"a" * 16, 4096, b"k" * 32, b"s" * 32)
    login = ClientAuth("alice", None, scram_keys=keys)
    client_first = login.receive(pack("!i", 10) + b"SCRAM-SHA-256\x00\x00")[5 + 14 + 4 :].decode()
    nonce = client_first.split("r=")[1]
    server_first = f"r={nonce}xyz,s=YmJiYmJiYmJiYmJiYmJiYg==,i=4096".encode()
    with pytest.raises(UpstreamError, match="not the one the client was authenticated against"):
        login.receive(pack("!i", 11) + server_first)


def test_md5_verifier_answers_an_md5_challenge() -> None:
    digest = md5_verifier("bob", PASSWORD).digest
    login = ClientAuth("bob", None, md5_digest=digest)
    salt = b"\x01\x02\x03\x04"
    reply = login.receive(pack("!i", 5) + salt)
    assert reply[5:-1].decode() == md5_password("bob", PASSWORD, salt)


def test_keys_cannot_answer_a_cleartext_request() -> None:
    login = ClientAuth("carol", None, scram_keys=ScramKeys(b"a" * 16, 4096, b"k" * 32, b"s" * 32))
    with pytest.raises(UpstreamError, match="holds only SCRAM keys"):
        login.receive(pack("!i", 3))


def test_verifier_kinds() -> None:
    assert isinstance(parse_verifier(md5_verifier("u", "p").digest), Md5Verifier)
    assert isinstance(parse_verifier("plain text"), PlainPassword)
    with pytest.raises(ValueError):
        parse_verifier("SCRAM-SHA-256$4096:bad")
    assert "correct" not in repr(PlainPassword(PASSWORD))


def test_userlist() -> None:
    text = '"alice" "SCRAM-SHA-256$x"\n\n; comment\n# another\n"b""ob" "md5abc"  \n'
    assert parse_userlist(text) == {"alice": "SCRAM-SHA-256$x", 'b"ob': "md5abc"}
    with pytest.raises(ValueError, match="line 2"):
        parse_userlist('"a" "b"\n"broken\n')
