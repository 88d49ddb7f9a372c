"""The pgoutput stream decoder and the Standby Status Update encoder, on hand-built byte streams (layouts from the
PostgreSQL docs, "Streaming Replication Protocol" and "Logical Replication Message Formats")."""

from __future__ import annotations

from struct import pack, unpack

import pytest

from cacheproxy.errors import ProtocolViolation
from cacheproxy.protocol.pgoutput import (
    CommittedTransaction,
    Keepalive,
    PgOutputDecoder,
    format_lsn,
    parse_lsn,
    standby_status_update,
)

TS = 784_000_000_000_000  # a PostgreSQL timestamp (microseconds since 2000-01-01)


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def xlog(message: bytes, start: int = 0x1000, wal_end: int = 0x2000) -> bytes:
    """XLogData: 'w', start of the WAL data, server's WAL end, send time, then one pgoutput message."""
    return b"w" + pack("!QQQ", start, wal_end, TS) + message


def keepalive(wal_end: int, reply: bool) -> bytes:
    return b"k" + pack("!QQB", wal_end, TS, int(reply))


def begin(xid: int, final_lsn: int = 0x1800) -> bytes:
    return b"B" + pack("!QQI", final_lsn, TS, xid)


def commit(commit_lsn: int, end_lsn: int) -> bytes:
    return b"C" + pack("!BQQQ", 0, commit_lsn, end_lsn, TS)


def relation(relid: int, schema: str, name: str, columns: tuple[str, ...] = ("id", "v")) -> bytes:
    body = pack("!I", relid) + cstr(schema) + cstr(name) + b"d" + pack("!H", len(columns))
    for i, column in enumerate(columns):
        body += pack("!B", int(i == 0)) + cstr(column) + pack("!Ii", 23, -1)
    return b"R" + body


def tuple_data(*values: bytes | None) -> bytes:
    body = pack("!H", len(values))
    for value in values:
        body += b"n" if value is None else b"t" + pack("!I", len(value)) + value
    return body


def insert(relid: int) -> bytes:
    return b"I" + pack("!I", relid) + b"N" + tuple_data(b"1", b"x")


def update(relid: int) -> bytes:
    return b"U" + pack("!I", relid) + b"K" + tuple_data(b"1", None) + b"N" + tuple_data(b"1", b"y")


def delete(relid: int) -> bytes:
    return b"D" + pack("!I", relid) + b"O" + tuple_data(b"1", b"y")


def truncate(*relids: int) -> bytes:
    return b"T" + pack("!IB", len(relids), 1) + b"".join(pack("!I", r) for r in relids)


def feed_all(decoder: PgOutputDecoder, *messages: bytes) -> list[object]:
    events: list[object] = []
    for message in messages:
        events += decoder.feed(message)
    return events


def test_one_transaction_names_every_table_it_changed() -> None:
    decoder = PgOutputDecoder()
    events = feed_all(
        decoder,
        xlog(begin(741)),
        xlog(relation(16384, "public", "a")),
        xlog(insert(16384)),
        xlog(relation(16390, "Sales", "Order Lines")),
        xlog(update(16390)),
        xlog(delete(16384)),
    )
    assert events == []
    assert decoder.in_transaction
    assert decoder.feed(xlog(commit(0x1800, 0x1830), wal_end=0x3000)) == [
        CommittedTransaction(741, frozenset({("public", "a"), ("Sales", "Order Lines")}), 0x1800, 0x1830)
    ]
    assert not decoder.in_transaction
    assert decoder.wal_end == 0x3000


def test_relations_are_remembered_across_transactions_and_redefined() -> None:
    decoder = PgOutputDecoder()
    feed_all(decoder, xlog(begin(1)), xlog(relation(5, "public", "a")), xlog(insert(5)), xlog(commit(10, 20)))
    # A later transaction may use relation 5 without a new Relation message...
    [second] = feed_all(decoder, xlog(begin(2)), xlog(delete(5)), xlog(commit(30, 40)))
    assert second == CommittedTransaction(2, frozenset({("public", "a")}), 30, 40)
    # ... and after ALTER TABLE ... RENAME the server sends it again with the new name.
    [third] = feed_all(decoder, xlog(begin(3)), xlog(relation(5, "public", "b")), xlog(insert(5)), xlog(commit(50, 60)))
    assert third.tables == {("public", "b")}


def test_truncate_names_every_relation() -> None:
    decoder = PgOutputDecoder()
    [txn] = feed_all(
        decoder,
        xlog(begin(9)),
        xlog(relation(1, "public", "parent")),
        xlog(relation(2, "public", "child")),
        xlog(truncate(1, 2)),
        xlog(commit(100, 200)),
    )
    assert txn.tables == {("public", "parent"), ("public", "child")}


def test_pg_catalog_is_sent_as_an_empty_namespace() -> None:
    decoder = PgOutputDecoder()
    [txn] = feed_all(decoder, xlog(begin(1)), xlog(relation(7, "", "t")), xlog(insert(7)), xlog(commit(1, 2)))
    assert txn.tables == {("pg_catalog", "t")}


def test_origin_type_and_logical_messages_are_ignored() -> None:
    decoder = PgOutputDecoder()
    [txn] = feed_all(
        decoder,
        xlog(begin(4)),
        xlog(b"O" + pack("!Q", 0x10) + cstr("other_node")),
        xlog(b"Y" + pack("!I", 90000) + cstr("public") + cstr("mood")),
        xlog(b"M" + pack("!BQ", 1, 0x20) + cstr("prefix") + pack("!I", 3) + b"abc"),
        xlog(commit(5, 6)),
    )
    assert txn == CommittedTransaction(4, frozenset(), 5, 6)


def test_keepalive() -> None:
    decoder = PgOutputDecoder()
    assert decoder.feed(keepalive(0x5000, True)) == [Keepalive(0x5000, True)]
    assert decoder.feed(keepalive(0x4000, False)) == [Keepalive(0x4000, False)]
    assert decoder.wal_end == 0x5000  # never moves back


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([xlog(begin(1)), xlog(insert(99))], "relation 99 whose Relation message"),
        ([xlog(relation(1, "public", "a")), xlog(insert(1))], "outside a transaction"),
        ([xlog(commit(1, 2))], "Commit without Begin"),
        ([xlog(begin(1)), xlog(b"S" + pack("!IB", 1, 1))], "unexpected pgoutput message 'S'"),
        ([b"x123"], "unexpected message 'x'"),
        ([b""], "empty CopyData"),
        ([b"w" + b"\x00" * 10], "truncated XLogData"),
        ([b"k" + b"\x00" * 8], "truncated primary keepalive"),
        ([xlog(begin(1)[:5])], "truncated pgoutput Begin"),
        ([xlog(begin(1)), xlog(b"I\x00\x00")], "truncated pgoutput I"),
        ([xlog(begin(1)), xlog(b"T" + pack("!IB", 3, 0) + pack("!I", 1))], "truncated pgoutput Truncate"),
        ([xlog(b"R" + pack("!I", 1) + b"public")], "without terminator"),
        ([xlog(begin(1)), xlog(commit(1, 2)[:10])], "truncated pgoutput Commit"),
    ],
)
def test_malformed_streams_are_protocol_violations(messages: list[bytes], error: str) -> None:
    decoder = PgOutputDecoder()
    with pytest.raises(ProtocolViolation, match=error):
        feed_all(decoder, *messages)


def test_standby_status_update_layout() -> None:
    body = standby_status_update(0x1_0000_2A00, now=946_684_800 + 1.5, reply_requested=True)
    kind, written, flushed, applied, clock, reply = unpack("!cQQQQB", body)
    assert (kind, written, flushed, applied) == (b"r", 0x1_0000_2A00, 0x1_0000_2A00, 0x1_0000_2A00)
    assert clock == 1_500_000  # microseconds since 2000-01-01 UTC
    assert reply == 1
    assert standby_status_update(0, now=946_684_800)[-1] == 0


def test_lsn_text_form_round_trips() -> None:
    for lsn in (0, 0x16B3748, 0x1_0000_002A, 0xFFFF_FFFF_FFFF_FFFF):
        assert parse_lsn(format_lsn(lsn)) == lsn
    assert format_lsn(0x1_0000_002A) == "1/2A"
