"""The sans-IO codec: message framing, startup packets and message builders, byte for byte, with no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cacheproxy.errors import FEATURE_NOT_SUPPORTED, PROGRAM_LIMIT_EXCEEDED, PROTOCOL_VIOLATION, ProtocolViolation
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import Framer, encode, split_messages
from cacheproxy.protocol.startup import (
    CancelRequest,
    GSSEncRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
    encode_cancel,
    encode_ssl_request,
    encode_startup,
    read_length,
)

# (description, message bytes, expected type, expected body) -- layouts from "Message Formats" in the PG docs.
MESSAGE_TABLE = [
    ("Query", b"Q\x00\x00\x00\x0dSELECT 1\x00", ord("Q"), b"SELECT 1\x00"),
    ("Sync", b"S\x00\x00\x00\x04", ord("S"), b""),
    ("Terminate", b"X\x00\x00\x00\x04", ord("X"), b""),
    ("Flush", b"H\x00\x00\x00\x04", ord("H"), b""),
    (
        "Parse unnamed, 1 param int4",
        b"P\x00\x00\x00\x15\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17",
        ord("P"),
        b"\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17",
    ),
    ("Describe portal", b"D\x00\x00\x00\x06P\x00", ord("D"), b"P\x00"),
    ("Execute unnamed, all rows", b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00", ord("E"), b"\x00\x00\x00\x00\x00"),
    ("CopyData", b"d\x00\x00\x00\x08abcd", ord("d"), b"abcd"),
    ("ReadyForQuery idle", b"Z\x00\x00\x00\x05I", ord("Z"), b"I"),
    (
        "BackendKeyData",
        b"K\x00\x00\x00\x0c\x00\x00\x30\x39\x00\x00\x00\x2a",
        ord("K"),
        b"\x00\x00\x30\x39\x00\x00\x00\x2a",
    ),
    ("AuthenticationOk", b"R\x00\x00\x00\x08\x00\x00\x00\x00", ord("R"), b"\x00\x00\x00\x00"),
]


@pytest.mark.parametrize(("name", "wire", "msg_type", "body"), MESSAGE_TABLE, ids=[r[0] for r in MESSAGE_TABLE])
def test_message_table_decodes_and_encodes(name: str, wire: bytes, msg_type: int, body: bytes) -> None:
    assert split_messages(wire) == [(msg_type, body)]
    assert encode(bytes((msg_type,)), body) == wire


# A client stream as asyncpg sends it for a prepared query, followed by psql-style simple queries and a COPY.
CLIENT_STREAM = b"".join(
    [
        encode(b"P", b"stmt1\x00SELECT * FROM t WHERE id = $1\x00\x00\x01\x00\x00\x00\x17"),
        encode(b"D", b"Sstmt1\x00"),
        encode(b"H"),
        encode(b"B", b"\x00stmt1\x00\x00\x01\x00\x01\x00\x01\x00\x00\x00\x04\x00\x00\x00\x07\x00\x01\x00\x01"),
        encode(b"E", b"\x00\x00\x00\x00\x00"),
        encode(b"S"),
        encode(b"Q", b"BEGIN; SELECT 1; COMMIT\x00"),
        encode(b"Q", b"COPY t FROM STDIN\x00"),
        encode(b"d", b"1\tone\n" * 50),
        encode(b"c"),
        encode(b"X"),
    ]
)


def _frame_in_chunks(stream: bytes, cuts: list[int]) -> tuple[list[tuple[int, bytes]], bytes]:
    framer = Framer(1 << 20)
    got: list[tuple[int, bytes]] = []
    relayed = b""
    prev = 0
    for cut in [*sorted(cuts), len(stream)]:
        region, frames = framer.feed(stream[prev:cut])
        relayed += region
        got += [(t, bytes(region[s + 5 : e])) for t, s, e in frames]
        prev = cut
    assert framer.buffered == 0
    return got, relayed


def test_every_two_way_split_yields_the_same_messages() -> None:
    expected = split_messages(CLIENT_STREAM)
    assert [chr(t) for t, _ in expected] == list("PDHBESQQdcX")
    for cut in range(len(CLIENT_STREAM) + 1):
        got, relayed = _frame_in_chunks(CLIENT_STREAM, [cut])
        assert got == expected, cut
        assert relayed == CLIENT_STREAM


def test_byte_at_a_time_yields_the_same_messages() -> None:
    got, relayed = _frame_in_chunks(CLIENT_STREAM, list(range(1, len(CLIENT_STREAM))))
    assert got == split_messages(CLIENT_STREAM)
    assert relayed == CLIENT_STREAM


@given(st.lists(st.integers(min_value=0, max_value=len(CLIENT_STREAM)), max_size=30))
def test_any_chunking_yields_the_same_messages(cuts: list[int]) -> None:
    got, relayed = _frame_in_chunks(CLIENT_STREAM, cuts)
    assert got == split_messages(CLIENT_STREAM)
    assert relayed == CLIENT_STREAM


def test_whole_messages_are_relayed_without_a_copy() -> None:
    framer = Framer(1 << 20)
    region, frames = framer.feed(CLIENT_STREAM)
    assert region is CLIENT_STREAM
    assert len(frames) == 11


def test_oversized_message_is_refused_from_its_header_alone() -> None:
    framer = Framer(1000)
    header_only = b"Q" + (5000).to_bytes(4, "big")
    with pytest.raises(ProtocolViolation) as info:
        framer.feed(header_only)
    assert info.value.sqlstate == PROGRAM_LIMIT_EXCEEDED
    assert "5000" in info.value.message


@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_below_four_is_a_protocol_violation(length: int) -> None:
    with pytest.raises(ProtocolViolation) as info:
        Framer(1000).feed(b"Q" + length.to_bytes(4, "big") + b"xxxx")
    assert info.value.sqlstate == PROTOCOL_VIOLATION


def test_trailing_partial_message_is_reported() -> None:
    with pytest.raises(ProtocolViolation):
        split_messages(encode(b"S") + b"Q\x00\x00")


# -- startup packets -----------------------------------------------------------------------------------------


def test_startup_message_round_trip() -> None:
    params = {"user": "alice", "database": "app", "application_name": "psql", "options": "-c search_path=x"}
    raw = encode_startup(params)
    decoded = decode_startup(raw)
    assert decoded == StartupMessage(3, 0, params, raw)
    assert decoded.user == "alice"
    assert decoded.database == "app"


def test_database_defaults_to_user() -> None:
    decoded = decode_startup(encode_startup({"user": "bob"}))
    assert isinstance(decoded, StartupMessage)
    assert decoded.database == "bob"


def test_protocol_3_2_is_accepted_for_upstream_negotiation() -> None:
    decoded = decode_startup(encode_startup({"user": "u"}, minor=2))
    assert isinstance(decoded, StartupMessage)
    assert (decoded.major, decoded.minor) == (3, 2)


def test_special_requests() -> None:
    assert decode_startup(encode_ssl_request()) == SSLRequest()
    assert decode_startup(b"\x00\x00\x00\x08\x04\xd2\x16\x30") == GSSEncRequest()
    assert decode_startup(encode_cancel(4242, 0xDEADBEEF)) == CancelRequest(4242, 0xDEADBEEF)
    assert encode_cancel(1, 2) == b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x01\x00\x00\x00\x02"
    assert encode_cancel(1, b"\x00\x00\x00\x02") == encode_cancel(1, 2)
    assert len(encode_cancel(1, bytes(32))) == 44  # protocol 3.2's longer keys pass through whole


@pytest.mark.parametrize(
    ("packet", "sqlstate"),
    [
        (b"\x00\x00\x00\x08\x00\x02\x00\x00", FEATURE_NOT_SUPPORTED),  # protocol 2.0
        (encode_startup({"user": "u"})[:-1] + b"x", PROTOCOL_VIOLATION),  # no terminator
        (encode_startup({"database": "d"}), "28000"),  # no user
        (b"\x00\x00\x00\x0f\x00\x03\x00\x00user\x00u\x00\x00", PROTOCOL_VIOLATION),  # length mismatch
        (b"\x00\x00\x00\x0e\x00\x03\x00\x00user\x00\x00", PROTOCOL_VIOLATION),  # name without value
    ],
)
def test_bad_startup_packets(packet: bytes, sqlstate: str) -> None:
    with pytest.raises(ProtocolViolation) as info:
        decode_startup(packet)
    assert info.value.sqlstate == sqlstate


@pytest.mark.parametrize("length", [0, 7, 10001, 2**31])
def test_startup_length_limits(length: int) -> None:
    with pytest.raises(ProtocolViolation):
        read_length(length.to_bytes(4, "big"))


# -- builders and small decoders ---------------------------------------------------------------------------


def test_error_response_layout() -> None:
    wire = m.error_response("FATAL", "53300", "sorry, too many clients already", detail="d")
    [(msg_type, body)] = split_messages(wire)
    assert msg_type == ord("E")
    assert body == b"SFATAL\x00VFATAL\x00C53300\x00Msorry, too many clients already\x00Dd\x00\x00"
    assert m.decode_error_fields(body) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "53300",
        "M": "sorry, too many clients already",
        "D": "d",
    }


def test_key_data_and_ready_for_query() -> None:
    assert m.ready_for_query(b"T") == b"Z\x00\x00\x00\x05T"
    wire = m.backend_key_data(12345, 0xFFFFFFFF)
    [(_, body)] = split_messages(wire)
    assert m.decode_backend_key_data(body) == (12345, b"\xff\xff\xff\xff")


def test_sasl_mechanism_list_round_trip() -> None:
    wire = m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    [(msg_type, body)] = split_messages(wire)
    assert msg_type == m.AUTHENTICATION
    assert m.auth_code(body) == m.AUTH_SASL
    assert m.sasl_mechanisms(body) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    assert body.endswith(b"SCRAM-SHA-256\x00\x00")


def test_parameter_status() -> None:
    assert m.decode_parameter_status(b"TimeZone\x00UTC\x00") == ("TimeZone", "UTC")


def test_oversized_message_is_refused_when_its_header_arrives_in_pieces() -> None:
    framer = Framer(1000)
    assert framer.feed(b"Q\x00") == (b"", [])
    with pytest.raises(ProtocolViolation) as info:
        framer.feed((5000).to_bytes(4, "big")[1:] + b"x" * 10)
    assert info.value.sqlstate == PROGRAM_LIMIT_EXCEEDED


def test_a_large_message_in_many_reads_is_held_until_whole_then_relayed_with_what_follows() -> None:
    big = encode(b"D", b"r" * 100_000)
    stream = encode(b"T", b"desc") + big + encode(b"C", b"SELECT 1\x00") + b"Z\x00"
    framer = Framer(1 << 20)
    regions: list[bytes] = []
    types: list[int] = []
    for start in range(0, len(stream), 4096):
        region, frames = framer.feed(stream[start : start + 4096])
        regions.append(region)
        types += [frame[0] for frame in frames]
    assert b"".join(regions) == stream[:-2] and framer.buffered == 2  # the last, partial header stays
    assert bytes(types) == b"TDC"
    assert sum(1 for region in regions if region) == 2  # T; then D once whole, with the C behind it
