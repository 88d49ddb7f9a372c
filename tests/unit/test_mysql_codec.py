"""The MySQL codec and analysis without sockets: framing, split packets, handshake masking, where replies end."""

from __future__ import annotations

import pytest

from cacheproxy.analysis.model import Kind
from cacheproxy.analysis.mysql import analyze_mysql
from cacheproxy.mysql import codec
from cacheproxy.mysql.codec import Capability, CodecError, PacketReader, Reply, ResponseTracker, Status
from cacheproxy.mysql.state import SessionState


def test_reader_splits_a_stream_byte_by_byte() -> None:
    wire = codec.encode_packet(0, b"\x03SELECT 1") + codec.encode_packet(1, b"\x0e")
    reader = PacketReader()
    got = []
    for byte in wire:
        got += reader.feed(bytes((byte,)))
    assert [(p.seq, p.payload) for p in got] == [(0, b"\x03SELECT 1"), (1, b"\x0e")]
    assert b"".join(p.raw for p in got) == wire


def test_a_packet_of_16mb_or_more_is_split_and_joined() -> None:
    payload = bytes(range(256)) * (codec.MAX_PAYLOAD // 256 + 10)
    wire = codec.encode_packet(3, payload)
    assert wire[:4] == b"\xff\xff\xff\x03"  # a full piece first
    packets = PacketReader().feed(wire)
    assert len(packets) == 1
    assert packets[0].payload == payload and packets[0].seq == 3 and packets[0].last_seq == 4
    assert packets[0].raw == wire


def test_an_oversized_packet_is_refused_before_its_body_arrives() -> None:
    reader = PacketReader(max_payload=1000)
    with pytest.raises(CodecError, match="over the limit"):
        reader.feed(b"\x00\x10\x00\x00")


def test_handshake_masking_keeps_every_other_byte() -> None:
    caps = int(Capability.PROTOCOL_41 | Capability.SSL | Capability.COMPRESS | Capability.DEPRECATE_EOF
               | Capability.PLUGIN_AUTH | Capability.SECURE_CONNECTION | Capability.QUERY_ATTRIBUTES)  # fmt: skip
    payload = codec.build_handshake(42, b"10.11-MariaDB", b"abcdefgh12345678ABCD", caps, 45, 2, b"ed25519")
    masked = codec.mask_handshake(payload, Capability.SSL | Capability.COMPRESS | Capability.QUERY_ATTRIBUTES)
    hs = codec.parse_handshake(masked)
    assert hs.connection_id == 42 and hs.auth_plugin == b"ed25519" and hs.auth_data == b"abcdefgh12345678ABCD"
    assert hs.capabilities == caps & ~(Capability.SSL | Capability.COMPRESS | Capability.QUERY_ATTRIBUTES)
    assert len(masked) == len(payload)
    assert sum(a != b for a, b in zip(masked, payload, strict=True)) <= 3


def test_handshake_response_round_trip() -> None:
    caps = int(Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.CONNECT_WITH_DB
               | Capability.PLUGIN_AUTH)  # fmt: skip
    payload = codec.build_handshake_response(caps, b"app", b"x" * 20, b"shop", b"mysql_native_password")
    response = codec.parse_handshake_response(payload)
    assert (response.user, response.database, response.auth_plugin) == (b"app", b"shop", b"mysql_native_password")
    assert response.auth_response == b"x" * 20
    assert codec.parse_handshake_response(payload[:32]).ssl_request


def _result_set(deprecate: bool, rows: int, status: int, warnings: int = 0) -> list[bytes]:
    packets = [b"\x02", codec.column_payload(b"a"), codec.column_payload(b"b")]
    if not deprecate:
        packets.append(codec.eof_payload(status))
    packets += [codec.text_row_payload((b"1", None))] * rows
    packets.append(codec.ok_payload(status, warnings=warnings, eof=True) if deprecate else
                   codec.eof_payload(status, warnings))  # fmt: skip
    return packets


@pytest.mark.parametrize("deprecate", [False, True])
def test_tracker_finds_the_end_of_a_result_set(deprecate: bool) -> None:
    tracker = ResponseTracker(Reply.GENERIC, deprecate_eof=deprecate)
    packets = _result_set(deprecate, 3, Status.AUTOCOMMIT, warnings=2)
    steps = [tracker.feed(p) for p in packets]
    assert steps == ["more"] * (len(packets) - 1) + ["done"]
    assert (tracker.rows, tracker.result_sets, tracker.warnings, tracker.status) == (3, 1, 2, Status.AUTOCOMMIT)
    assert codec.parse_text_row(codec.text_row_payload((b"1", None)), 2) == (b"1", None)


def test_tracker_follows_more_results_and_stops_at_an_error() -> None:
    tracker = ResponseTracker(Reply.GENERIC, deprecate_eof=False)
    first = _result_set(False, 1, Status.AUTOCOMMIT | Status.MORE_RESULTS_EXISTS)
    for p in first:
        assert tracker.feed(p) == "more"
    assert tracker.feed(codec.err_payload(1146, "42S02", "no such table")) == "done"
    assert tracker.error is not None and tracker.error.code == 1146 and tracker.result_sets == 1


def test_a_row_starting_with_0xfe_is_not_an_eof() -> None:
    long_value = b"x" * (1 << 24)
    row = codec.text_row_payload((long_value,))
    assert row[0] == 0xFE
    assert not codec.is_eof(row, deprecate_eof=False) and not codec.is_eof(row, deprecate_eof=True)


def test_tracker_prepare_ok_with_params_and_columns() -> None:
    prepare_ok = b"\x00" + (7).to_bytes(4, "little") + (1).to_bytes(2, "little") + (2).to_bytes(2, "little") + bytes(3)
    for deprecate in (False, True):
        tracker = ResponseTracker(Reply.PREPARE, deprecate_eof=deprecate)
        packets = [prepare_ok, codec.column_payload(b"?"), codec.column_payload(b"?")]
        packets += [] if deprecate else [codec.eof_payload(2)]
        packets += [codec.column_payload(b"c")] + ([] if deprecate else [codec.eof_payload(2)])
        steps = [tracker.feed(p) for p in packets]
        assert steps[-1] == "done" and set(steps[:-1]) == {"more"}, (deprecate, steps)
        assert tracker.prepared == codec.PrepareOk(7, 1, 2, 0)


def test_tracker_local_infile_and_auth_turns() -> None:
    tracker = ResponseTracker(Reply.GENERIC, deprecate_eof=False)
    assert tracker.feed(b"\xfb/tmp/data.csv") == "client"
    assert tracker.feed(codec.ok_payload(Status.AUTOCOMMIT, affected=3)) == "done"
    auth = ResponseTracker(Reply.AUTH, deprecate_eof=False)
    assert auth.feed(b"\xfeclient_ed25519\x00" + b"n" * 32) == "client"
    assert auth.feed(b"\x01\x03") == "more"  # caching_sha2_password fast auth: an OK follows
    assert auth.feed(codec.ok_payload(Status.AUTOCOMMIT)) == "done"


def test_binary_row_values() -> None:
    types = (0x03, 0xFD, 0x0C)  # LONG, VAR_STRING, DATETIME
    row = b"\x00" + bytes((0b00010000,)) + (5).to_bytes(4, "little") + codec.lenenc_str(b"abc")
    assert codec.parse_binary_row(row, types) == ((5).to_bytes(4, "little"), b"abc", None)


def test_session_state_transactions_and_digest() -> None:
    state = SessionState("app", "shop", 45, int(Capability.PROTOCOL_41))
    before = state.digest()
    state.on_set(b"SET time_zone = '+09:00'")
    assert state.digest() != before
    state.on_status(Status.AUTOCOMMIT | Status.IN_TRANS)
    state.pending.add(("shop", "t"))
    assert state.in_transaction and state.take_pending() == (set(), set())
    state.on_status(Status.AUTOCOMMIT)
    assert state.take_pending() == ({("shop", "t")}, set())
    state.on_status(0)  # autocommit off: every statement is inside a transaction
    assert state.in_transaction


@pytest.mark.parametrize(
    "sql, reason",
    [
        ("SELECT NOW()", "non-deterministic"),
        ("SELECT RAND() FROM t", "non-deterministic"),
        ("SELECT UUID()", "non-deterministic"),
        ("SELECT CONNECTION_ID()", "non-deterministic"),
        ("SELECT LAST_INSERT_ID()", "non-deterministic"),
        ("SELECT FOUND_ROWS()", "non-deterministic"),
        ("SELECT ROW_COUNT()", "non-deterministic"),
        ("SELECT SLEEP(1)", "non-deterministic"),
        ("SELECT GET_LOCK('a', 1)", "non-deterministic"),
        ("SELECT CURRENT_TIMESTAMP", "non-deterministic"),
        ("SELECT my_func(a) FROM t", "stored function"),
        ("SELECT shop.f(1)", "stored function"),
        ("SELECT @v", "variable"),
        ("SELECT @@sql_mode", "variable"),
        ("SELECT * FROM t FOR UPDATE", "locking"),
        ("SELECT * FROM t LOCK IN SHARE MODE", "locking"),
        ("SELECT SQL_NO_CACHE * FROM t", "SQL_NO_CACHE"),
        ("SELECT * FROM information_schema.tables", "system schema"),
        ("SELECT * FROM mysql.user", "system schema"),
        ("SELECT a INTO @x FROM t", "INTO"),
    ],
)
def test_reads_never_cached(sql: str, reason: str) -> None:
    info = analyze_mysql(sql)
    assert not info.cacheable
    assert info.reason is not None and reason in info.reason


def test_writes_ddl_and_session_statements() -> None:
    assert analyze_mysql("SELECT c FROM sbtest1 WHERE id = 7").cacheable
    assert analyze_mysql("SELECT COUNT(*), UPPER(b) FROM t JOIN u USING (id)").reads == {(None, "t"), (None, "u")}
    assert analyze_mysql("REPLACE INTO shop.t VALUES (1)").writes == {("shop", "t")}
    assert analyze_mysql("DELETE FROM t WHERE id = 1").writes == {(None, "t")}
    assert analyze_mysql("LOAD DATA LOCAL INFILE 'f' INTO TABLE t").writes == {(None, "t")}
    assert analyze_mysql("CALL p()").invalidate_all
    assert analyze_mysql("GRANT SELECT ON *.* TO u").invalidate_all
    assert analyze_mysql("DROP TABLE other.t").invalidate_databases == {"other"}
    assert analyze_mysql("CREATE TEMPORARY TABLE tmp (a INT)").temp_created == {"tmp"}
    assert analyze_mysql("USE `shop`").use_database == "shop"
    assert analyze_mysql("SET NAMES utf8mb4").sets
    assert analyze_mysql("ROLLBACK").rollback and not analyze_mysql("ROLLBACK TO SAVEPOINT s").rollback
    multi = analyze_mysql("SET @a = 1; SELECT 1")
    assert multi.statement_count == 2 and multi.sets and multi.kind == Kind.OTHER


def test_stored_function_calls_and_ddl_in_several_statements() -> None:
    assert analyze_mysql("SELECT my_func(a) FROM t").calls_unknown
    assert not analyze_mysql("SELECT NOW()").calls_unknown
    assert analyze_mysql("SELECT 1; DROP TABLE t").invalidate_all
