"""The MySQL connection phase's sans-IO parts and its relay joined to scripted peers by an in-memory link (no
sockets): sequence ids across one-sided TLS, and caching_sha2_password's full authentication, which no server here
can run (Debian ships MariaDB only, without caching_sha2_password)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("cryptography")
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cacheproxy.mysql import codec
from cacheproxy.mysql.codec import Capability, Packet, PacketReader
from cacheproxy.mysql.login import Link, Refused, authenticate, renumber, rsa_password

NONCE = bytes(range(1, 21))


class Scripted:
    """One side of a session: reads return the scripted packets in order; writes are recorded as packets."""

    def __init__(self, packets: list[tuple[int, bytes]]) -> None:
        self.script = [Packet(seq, payload, codec.encode_packet(seq, payload), seq) for seq, payload in packets]
        self.written: list[tuple[int, bytes]] = []
        self.packets = PacketReader()
        self.pending: list[Packet] = []
        self.reader = self.writer = self  # unused by the relay

    async def read(self) -> Packet:
        return self.script.pop(0)

    def write(self, data: bytes) -> None:
        self.written += [(p.seq, p.payload) for p in PacketReader().feed(data)]


def _key() -> tuple[rsa.RSAPrivateKey, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, pem


def _decrypt(private: rsa.RSAPrivateKey, blob: bytes) -> bytes:
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    mixed = private.decrypt(blob, oaep)
    return bytes(b ^ NONCE[i % len(NONCE)] for i, b in enumerate(mixed))


def test_rsa_password_is_what_the_server_decrypts() -> None:
    private, pem = _key()
    assert _decrypt(private, rsa_password(b"s3cret\x00", NONCE, pem)) == b"s3cret\x00"
    assert _decrypt(private, rsa_password(b"s3cret", NONCE, pem)) == b"s3cret\x00"  # the NUL is added if missing
    with pytest.raises(ValueError):
        rsa_password(b"x", NONCE, b"not a key")


def test_capability_helpers() -> None:
    caps = Capability.PROTOCOL_41 | Capability.PLUGIN_AUTH | Capability.SECURE_CONNECTION
    hs = codec.build_handshake(7, b"10.11", NONCE, caps, 45, 2, b"x")
    offered = codec.offer_capabilities(codec.mask_handshake(hs, Capability.SSL), Capability.SSL)
    assert codec.parse_handshake(offered).capabilities & Capability.SSL
    assert codec.parse_handshake(offered).auth_data == NONCE  # every other byte kept
    response = codec.build_handshake_response(Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION, b"u", b"", None,
                                              b"mysql_native_password")  # fmt: skip
    changed = codec.with_capabilities(response, Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.SSL)
    parsed = codec.parse_handshake_response(changed)
    assert parsed.capabilities & Capability.SSL and parsed.user == b"u"
    assert codec.parse_handshake_response(changed[:32]).ssl_request


def test_renumber_moves_sequence_ids_and_keeps_raw_bytes_when_aligned() -> None:
    packet = Packet(2, b"\x00abc", codec.encode_packet(2, b"\x00abc"), 2)
    assert renumber(packet, 0) is packet.raw
    assert PacketReader().feed(renumber(packet, 1))[0].seq == 3
    assert PacketReader().feed(renumber(Packet(0, b"", b"", 0), -1))[0].seq == 255


def test_native_password_over_tls_to_the_client_only_is_renumbered() -> None:
    """Client: greeting 0, SSLRequest 1, response 2; upstream: greeting 0, response 1. The OK at upstream seq 2
    reaches the client as seq 3."""
    ok = codec.ok_payload(2)
    client, upstream = Scripted([]), Scripted([(2, ok)])
    link = Link(True, False, NONCE, b"mysql_native_password", delta=-1)
    tracker = asyncio.run(authenticate(client, upstream, link))
    assert tracker.error is None and client.written == [(3, ok)]


def test_caching_sha2_full_auth_from_a_tls_client_becomes_the_rsa_exchange_upstream() -> None:
    private, pem = _key()
    ok = codec.ok_payload(2)
    upstream = Scripted([(2, b"\x01\x04"), (4, b"\x01" + pem), (6, ok)])
    client = Scripted([(4, b"s3cret\x00")])
    link = Link(True, False, NONCE, b"caching_sha2_password", delta=-1)
    tracker = asyncio.run(authenticate(client, upstream, link))
    assert tracker.error is None
    assert client.written == [(3, b"\x01\x04"), (5, ok)]  # the client never sees the key exchange
    assert [seq for seq, _ in upstream.written] == [3, 5] and upstream.written[0][1] == b"\x02"
    assert _decrypt(private, upstream.written[1][1]) == b"s3cret\x00"  # never the clear password on that wire


def test_caching_sha2_full_auth_with_tls_on_both_sides_is_relayed_as_is() -> None:
    ok = codec.ok_payload(2)
    upstream = Scripted([(3, b"\x01\x04"), (5, ok)])
    client = Scripted([(4, b"s3cret\x00")])
    link = Link(True, True, NONCE, b"caching_sha2_password")
    asyncio.run(authenticate(client, upstream, link))
    assert upstream.written == [(4, b"s3cret\x00")] and client.written == [(3, b"\x01\x04"), (5, ok)]


def test_caching_sha2_full_auth_from_a_plaintext_client_to_a_tls_upstream_is_refused() -> None:
    upstream = Scripted([(3, b"\x01\x04")])
    client = Scripted([(3, b"\x02")])  # the client asks for the server's public key
    link = Link(False, True, NONCE, b"caching_sha2_password", delta=1)
    with pytest.raises(Refused) as refused:
        asyncio.run(authenticate(client, upstream, link))
    assert refused.value.code == 1045 and refused.value.seq == 4 and upstream.written == []


def test_switch_to_a_cleartext_plugin_is_refused_when_upstream_is_plaintext() -> None:
    switch = b"\xfemysql_clear_password\x00"
    upstream = Scripted([(2, switch)])
    client = Scripted([(4, b"s3cret\x00")])
    link = Link(True, False, NONCE, b"mysql_native_password", delta=-1)
    with pytest.raises(Refused) as refused:
        asyncio.run(authenticate(client, upstream, link))
    assert "plaintext upstream" in refused.value.message and refused.value.seq == 3
    assert client.written == [] and upstream.written == []
