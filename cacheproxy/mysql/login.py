"""The MySQL connection phase through the proxy: the greeting, TLS on each side, and the relayed authentication.

The proxy terminates the client's TLS and opens its own towards the server (MySQL "Protocol::SSLRequest": the
client sends the first 32 bytes of its HandshakeResponse41 with CLIENT_SSL, both ends start TLS, and the whole
response follows over it with the next sequence id). Each side decides on its own: tls.mode for the client (CLIENT_SSL
is offered unless it is disable; require refuses a client that does not ask), the upstream URL's sslmode for the
server (cacheproxy/mysql/tls.py). When only one side uses TLS, the two sequences of the authentication exchange are
one packet apart: `Link.delta` renumbers every relayed packet until the exchange ends.

Authentication stays end to end (the server's scramble reaches the client unchanged), so mysql_native_password and
ed25519 work over any mix of transports. Plugins that send the password itself must never put it on a plaintext
wire the client did not choose: when the client uses TLS and the upstream does not, caching_sha2_password's full
authentication (the client sends the password in clear, trusting its TLS) is turned into the RSA exchange the server
expects on a plaintext connection, and sha256_password, mysql_clear_password and dialog are refused. In the other
direction (plaintext client, TLS upstream) the client's RSA exchange cannot be answered and is refused too.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Protocol

from cacheproxy.config import Config
from cacheproxy.mysql import codec, tls_stream
from cacheproxy.mysql.codec import Capability, Packet, PacketReader, Reply, ResponseTracker
from cacheproxy.mysql.tls import UpstreamTLSError, server_hostname, upstream_context
from cacheproxy.mysql.tls_stream import ByteReader, ByteWriter

log = logging.getLogger("cacheproxy.mysql.login")

# What the proxy cannot honour: the greeting it relays does not offer these (CLIENT_SSL is offered by the proxy
# itself when it terminates TLS).
MASKED = (
    Capability.COMPRESS
    | Capability.SSL
    | Capability.ZSTD_COMPRESSION
    | Capability.QUERY_ATTRIBUTES
    | Capability.SSL_VERIFY_SERVER_CERT
    | Capability.MULTI_FACTOR_AUTHENTICATION
    | Capability.CAPABILITY_EXTENSION
    | Capability.OPTIONAL_RESULTSET_METADATA
)
CACHING_SHA2 = b"caching_sha2_password"
# Plugins whose client answer holds the password itself (in clear, or encrypted to a key the proxy does not have).
_CLEARTEXT = (b"sha256_password", b"mysql_clear_password", b"dialog")
_FULL_AUTH = b"\x01\x04"  # caching_sha2_password: "perform full authentication"
_REQUEST_PUBLIC_KEY = b"\x02"
_MAX_FIRST_PACKET = 64 * 1024  # a handshake response is a few hundred bytes (connection attributes: up to 64 KiB)

ER_NOT_SUPPORTED = 1235
ER_ACCESS_DENIED = 1045
ER_SECURE_TRANSPORT_REQUIRED = 3159
CR_SSL_CONNECTION_ERROR = 2026


class PacketStream(Protocol):
    """One side of a session (cacheproxy.mysql.session.Stream)."""

    reader: ByteReader
    writer: ByteWriter
    packets: PacketReader
    pending: list[Packet]

    async def read(self) -> Packet: ...

    def write(self, data: bytes) -> None: ...


class Refused(Exception):
    """The connection phase ends with this error sent to the client (code, SQLSTATE, message, sequence id)."""

    def __init__(self, code: int, sqlstate: str, message: str, seq: int) -> None:
        super().__init__(message)
        self.code, self.sqlstate, self.message, self.seq = code, sqlstate, message, seq

    def packet(self) -> bytes:
        return codec.encode_packet(self.seq, codec.err_payload(self.code, self.sqlstate, f"cacheproxy: {self.message}"))


@dataclass(slots=True)
class Link:
    """How the two sides of one authentication exchange line up."""

    client_tls: bool
    upstream_tls: bool
    nonce: bytes  # the scramble the client answers (the greeting's, or an auth switch request's)
    plugin: bytes  # the plugin in use (the client's choice, then the server's switch)
    delta: int = 0  # upstream sequence id - client sequence id

    @property
    def mixed(self) -> bool:
        return self.client_tls != self.upstream_tls


@dataclass(frozen=True, slots=True)
class Greeted:
    handshake: codec.Handshake
    response: codec.HandshakeResponse
    link: Link


async def handshake(client: PacketStream, upstream: PacketStream, config: Config,
                    tls: ssl.SSLContext | None) -> Greeted | None:  # fmt: skip
    """Relay the greeting and the client's response, starting TLS on each side as configured. None: the server
    refused the connection (its ERR was relayed). Raises Refused."""
    greeting = await upstream.read()
    if greeting.payload[:1] == b"\xff":  # the server refused us (too many connections, host blocked)
        client.write(greeting.raw)
        return None
    server = codec.parse_handshake(greeting.payload)
    offered = codec.mask_handshake(greeting.payload, MASKED)
    if tls is not None:
        offered = codec.offer_capabilities(offered, Capability.SSL)
    client.write(codec.encode_packet(greeting.seq, offered))
    answer, received = await _first_packet(client)
    response = codec.parse_handshake_response(answer.payload)
    client_tls = response.ssl_request
    if client_tls:
        answer = await _client_tls(client, answer, received, tls, config.upstream.connect_timeout)
        response = codec.parse_handshake_response(answer.payload)
        if response.ssl_request:
            raise Refused(ER_NOT_SUPPORTED, "08S01", "a second SSL request", answer.seq + 1)
    elif config.tls.mode == "require":
        raise Refused(ER_SECURE_TRANSPORT_REQUIRED, "08004",
                      "TLS is required (tls.mode: require): connect with SSL/TLS", answer.seq + 1)  # fmt: skip
    else:
        client.pending = client.packets.feed(received)  # plaintext: what followed is MySQL packets
    seq = greeting.seq + 1
    capabilities = response.capabilities & ~MASKED
    upstream_tls = await _upstream_tls(upstream, config, server, answer, seq, capabilities)
    if upstream_tls:
        seq += 1
        capabilities |= Capability.SSL
    plugin = response.auth_plugin or server.auth_plugin
    link = Link(client_tls, upstream_tls, server.auth_data, plugin, seq - answer.seq)
    if client_tls and not upstream_tls and plugin in _CLEARTEXT:
        raise Refused(ER_ACCESS_DENIED, "28000", _cleartext_refusal(plugin), answer.seq + 1)
    upstream.write(codec.encode_packet(seq, codec.with_capabilities(answer.payload, capabilities)))
    return Greeted(server, response, link)


async def _first_packet(client: PacketStream) -> tuple[Packet, bytes]:
    """The client's first packet, and the bytes read after it. They are kept apart: after an SSLRequest they are
    the start of the client's TLS handshake, not MySQL packets."""
    data = bytearray()
    while True:
        if len(data) >= codec.HEADER_SIZE:
            end = codec.HEADER_SIZE + int.from_bytes(data[:3], "little")
            if end > _MAX_FIRST_PACKET:
                raise codec.CodecError(f"a handshake response of {end} bytes, over {_MAX_FIRST_PACKET}")
            if len(data) >= end:
                payload = bytes(data[codec.HEADER_SIZE : end])
                return Packet(data[3], payload, bytes(data[:end]), data[3]), bytes(data[end:])
        chunk = await client.reader.read(_MAX_FIRST_PACKET)
        if not chunk:
            raise ConnectionError("the client closed the connection before its handshake response")
        data += chunk


async def _client_tls(client: PacketStream, request: Packet, received: bytes, tls: ssl.SSLContext | None,
                      timeout: float) -> Packet:  # fmt: skip
    """Start TLS with the client after its SSLRequest (`received`: what followed it, the start of its TLS
    handshake); its HandshakeResponse41 then comes over TLS."""
    if tls is None:
        raise Refused(ER_NOT_SUPPORTED, "08004", "TLS to the proxy is not enabled (tls.mode: disable)", request.seq + 1)
    try:
        stream = await tls_stream.start(client.reader, client.writer, tls, received, timeout)
    except (ssl.SSLError, TimeoutError) as exc:
        raise ConnectionError(f"TLS handshake with the client failed: {exc}") from exc
    client.reader = client.writer = stream
    answer = await client.read()
    return answer


async def _upstream_tls(upstream: PacketStream, config: Config, server: codec.Handshake, answer: Packet, seq: int,
                        capabilities: int) -> bool:  # fmt: skip
    """Start TLS with the server when sslmode asks for it: our own SSLRequest, made of the client's capabilities."""
    cfg = config.upstream
    try:
        context = upstream_context(cfg, server.capabilities)
        if context is None:
            return False
        request = codec.with_capabilities(answer.payload[:32], capabilities | Capability.SSL)
        upstream.write(codec.encode_packet(seq, request))
        writer = upstream.writer
        assert isinstance(writer, asyncio.StreamWriter)  # the upstream side is always a plain asyncio stream
        await writer.start_tls(context, server_hostname=server_hostname(cfg))
    except UpstreamTLSError as exc:
        raise Refused(CR_SSL_CONNECTION_ERROR, "HY000", str(exc), answer.seq + 1) from exc
    except (ssl.SSLError, OSError) as exc:
        log.warning("TLS to the MySQL server %s:%s failed: %s", cfg.host, cfg.port, exc)
        raise Refused(CR_SSL_CONNECTION_ERROR, "HY000", f"TLS to the upstream server failed: {exc}",
                      answer.seq + 1) from exc  # fmt: skip
    return True


def _cleartext_refusal(plugin: bytes) -> str:
    return (f"{plugin.decode(errors='replace')} would send the password over the proxy's plaintext upstream "
            "connection: set sslmode=require (or prefer with a TLS server) in the upstream URL")  # fmt: skip


def renumber(packet: Packet, delta: int) -> bytes:
    """A relayed packet's wire bytes with its sequence id moved by `delta` (the raw bytes when it is 0)."""
    if not delta:
        return packet.raw
    return codec.encode_packet((packet.seq + delta) & 0xFF, packet.payload)


async def authenticate(client: PacketStream, upstream: PacketStream, link: Link) -> ResponseTracker:
    """Relay an authentication exchange (after a handshake response or COM_CHANGE_USER) to its OK or ERR; the
    tracker says which. Raises Refused when a password would cross a plaintext wire the client did not choose."""
    tracker = ResponseTracker(Reply.AUTH, deprecate_eof=False)
    while True:
        packet = await upstream.read()
        step = tracker.feed(packet.payload)
        head = packet.payload[:1]
        if head == b"\xfe" and step == "client":  # an auth switch request: a new plugin and scramble
            name, pos = codec.read_nul_str(packet.payload, 1)
            link.plugin, link.nonce = name, packet.payload[pos:].rstrip(b"\x00")
            if link.client_tls and not link.upstream_tls and name in _CLEARTEXT:
                raise Refused(ER_ACCESS_DENIED, "28000", _cleartext_refusal(name), packet.seq - link.delta)
        client.write(renumber(packet, -link.delta))
        if step == "done":
            return tracker
        if step != "client":
            continue
        answer = await client.read()
        if link.plugin == CACHING_SHA2 and packet.payload == _FULL_AUTH and link.mixed:
            await _full_auth(upstream, link, answer)
        else:
            upstream.write(renumber(answer, link.delta))


async def _full_auth(upstream: PacketStream, link: Link, answer: Packet) -> None:
    """caching_sha2_password's full authentication when one side only uses TLS (MySQL "caching_sha2_password"
    docs: over TLS the client sends the password NUL-terminated; otherwise it asks for the server's RSA public key
    and sends the password, XORed with the scramble, encrypted with RSA-OAEP)."""
    if not link.client_tls:
        raise Refused(ER_ACCESS_DENIED, "28000",
                      "caching_sha2_password full authentication over a plaintext client connection cannot be relayed "
                      "to the TLS upstream: connect to the proxy with TLS", answer.seq + 1)  # fmt: skip
    seq = answer.seq + link.delta
    upstream.write(codec.encode_packet(seq, _REQUEST_PUBLIC_KEY))
    key = await upstream.read()
    if key.payload[:1] != b"\x01":
        raise Refused(ER_ACCESS_DENIED, "28000", "the server sent no RSA public key", answer.seq + 1)
    try:
        encrypted = rsa_password(answer.payload, link.nonce, key.payload[1:])
    except ValueError as exc:
        raise Refused(ER_ACCESS_DENIED, "28000", f"the server's RSA public key is not usable: {exc}",
                      answer.seq + 1) from exc  # fmt: skip
    upstream.write(codec.encode_packet(seq + 2, encrypted))
    link.delta += 2  # two packets the client never sees: our key request and the server's key


def rsa_password(password: bytes, nonce: bytes, pem: bytes) -> bytes:
    """The password (NUL-terminated, as the client sent it over TLS), XORed with the scramble and encrypted with
    the server's RSA public key, OAEP padding (MySQL 8.0.5+; PyMySQL and libmysqlclient do the same). Raises
    ValueError for a key that is not a PEM RSA public key."""
    try:  # imported only here: the one path that needs it (PyMySQL's `rsa` extra installs it)
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError as exc:
        raise ValueError("the `cryptography` package is not installed") from exc

    if not password.endswith(b"\x00"):
        password += b"\x00"
    mixed = bytes(byte ^ nonce[i % len(nonce)] for i, byte in enumerate(password))
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA key")
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    return key.encrypt(mixed, oaep)
