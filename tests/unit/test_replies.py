"""ReplyTracker: attributing upstream replies to requests, stripping the proxy's own, capturing results."""

from __future__ import annotations

from cacheproxy.errors import ProtocolViolation
from cacheproxy.protocol.framing import Framer, encode
from cacheproxy.protocol.replies import Capture, Op, Pending, ReplyTracker

T = encode(b"T", b"\x00\x01a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00")
D1 = encode(b"D", b"\x00\x01\x00\x00\x00\x011")
D2 = encode(b"D", b"\x00\x01\x00\x00\x00\x012")
C = encode(b"C", b"SELECT 2\x00")
Z = encode(b"Z", b"I")
ERR = encode(b"E", b"SERROR\x00C42601\x00Msyntax error\x00\x00")
NOTICE = encode(b"N", b"SNOTICE\x00Mhello\x00\x00")


def feed(tracker: ReplyTracker, stream: bytes) -> tuple[bytes, list[Pending]]:
    """Run a reply stream through the tracker; return what the client would see and what completed."""
    region, frames = Framer(1 << 20).feed(stream)
    shown, done = b"", []
    for msg_type, start, end in frames:
        outcome = tracker.on_message(msg_type, region, start, end)
        if outcome.relay:
            shown += region[start:end]
        done += outcome.done
    return shown, done


def test_simple_query_is_captured_whole() -> None:
    tracker = ReplyTracker()
    capture = Capture(1 << 20)
    tracker.expect(Pending(Op.QUERY, capture=capture))
    shown, done = feed(tracker, T + D1 + D2 + C + Z)
    assert shown == T + D1 + D2 + C + Z
    assert [p.op for p in done] == [Op.QUERY]
    assert capture.value() == T + D1 + D2 + C
    assert not capture.failed and not len(tracker)


def test_injected_requests_are_stripped_but_captured() -> None:
    tracker = ReplyTracker()
    capture = Capture(1 << 20)
    tracker.expect(Pending(Op.PARSE, strip=True))  # replayed statement
    tracker.expect(Pending(Op.BIND))
    tracker.expect(Pending(Op.DESCRIBE_PORTAL, strip=True, capture=capture))  # added for the RowDescription
    tracker.expect(Pending(Op.EXECUTE, capture=capture))
    tracker.expect(Pending(Op.SYNC))
    shown, done = feed(tracker, encode(b"1") + encode(b"2") + T + D1 + C + Z)
    assert shown == encode(b"2") + D1 + C + Z
    assert [p.op for p in done] == [Op.PARSE, Op.BIND, Op.DESCRIBE_PORTAL, Op.EXECUTE, Op.SYNC]
    assert capture.value() == T + D1 + C


def test_error_skips_to_sync_and_fails_captures() -> None:
    tracker = ReplyTracker()
    capture = Capture(1 << 20)
    tracker.expect(Pending(Op.PARSE))
    tracker.expect(Pending(Op.BIND))
    tracker.expect(Pending(Op.EXECUTE, capture=capture))
    tracker.expect(Pending(Op.SYNC))
    tracker.expect(Pending(Op.QUERY))
    shown, done = feed(tracker, ERR + Z + T + D1 + C + Z)
    assert shown == ERR + Z + T + D1 + C + Z
    assert [(p.op, p.seen_error) for p in done] == [
        (Op.PARSE, True),
        (Op.BIND, True),
        (Op.EXECUTE, True),
        (Op.SYNC, False),
        (Op.QUERY, False),
    ]
    assert capture.failed


def test_error_in_simple_query_waits_for_ready_for_query() -> None:
    tracker = ReplyTracker()
    capture = Capture(1 << 20)
    tracker.expect(Pending(Op.QUERY, capture=capture))
    shown, done = feed(tracker, T + D1 + ERR + Z)
    assert shown == T + D1 + ERR + Z
    assert done[0].seen_error and capture.failed


def test_notice_inside_a_result_prevents_caching_but_is_relayed() -> None:
    tracker = ReplyTracker()
    capture = Capture(1 << 20)
    tracker.expect(Pending(Op.QUERY, capture=capture))
    shown, _ = feed(tracker, T + NOTICE + D1 + C + Z)
    assert NOTICE in shown
    assert capture.failed


def test_capture_stops_past_its_limit_and_frees_what_it_held() -> None:
    tracker = ReplyTracker()
    capture = Capture(len(T) + len(D1))
    tracker.expect(Pending(Op.QUERY, capture=capture))
    shown, _ = feed(tracker, T + D1 + D2 + C + Z)
    assert shown == T + D1 + D2 + C + Z
    assert capture.failed and capture.parts == [] and capture.header == b""


def test_describe_statement_and_empty_query() -> None:
    tracker = ReplyTracker()
    capture = Capture(1 << 20)
    tracker.expect(Pending(Op.DESCRIBE_STATEMENT, capture=capture))
    tracker.expect(Pending(Op.EXECUTE, capture=Capture(1 << 20)))
    tracker.expect(Pending(Op.SYNC))
    param_desc = encode(b"t", b"\x00\x01\x00\x00\x00\x17")
    _shown, done = feed(tracker, param_desc + T + encode(b"I") + Z)
    assert capture.value() == param_desc + T
    execute = done[1]
    assert execute.op is Op.EXECUTE and execute.capture is not None and execute.capture.failed


def test_reply_with_nothing_pending_is_a_protocol_violation() -> None:
    tracker = ReplyTracker()
    try:
        feed(tracker, Z)
    except ProtocolViolation as exc:
        assert "no request pending" in exc.message
    else:
        raise AssertionError("expected ProtocolViolation")


def test_async_messages_belong_to_no_request() -> None:
    tracker = ReplyTracker()
    shown, done = feed(tracker, encode(b"A", b"\x00\x00\x00\x01ch\x00p\x00") + encode(b"S", b"TimeZone\x00UTC\x00"))
    assert done == [] and len(shown) > 0


def test_unsolicited_fatal_error_is_relayed() -> None:
    fatal = encode(b"E", b"SFATAL\x00VFATAL\x00C57P01\x00Mterminating connection\x00\x00")
    shown, done = feed(ReplyTracker(), fatal)
    assert shown == fatal and done == []


def test_result_cut_by_a_row_limit_is_captured_with_its_portal_suspended() -> None:
    tracker = ReplyTracker()
    capture = Capture(1 << 20)
    tracker.expect(Pending(Op.DESCRIBE_PORTAL, strip=True, capture=capture))
    tracker.expect(Pending(Op.EXECUTE, capture=capture))
    tracker.expect(Pending(Op.SYNC))
    suspended = encode(b"s")
    shown, _ = feed(tracker, T + D1 + suspended + Z)
    assert shown == D1 + suspended + Z
    assert capture.value() == T + D1 + suspended


def test_requests_after_an_error_without_sync_get_no_reply() -> None:
    tracker = ReplyTracker()
    tracker.expect(Pending(Op.PARSE))
    tracker.expect(Pending(Op.BIND))
    tracker.expect(Pending(Op.EXECUTE))
    shown, done = feed(tracker, ERR)  # the client had sent Flush, not Sync
    assert shown == ERR and [p.op for p in done] == [Op.PARSE, Op.BIND, Op.EXECUTE]
    capture = Capture(1 << 20)
    assert tracker.expect(Pending(Op.BIND)) is False  # discarded by the server
    assert tracker.expect(Pending(Op.EXECUTE, capture=capture)) is False
    assert capture.failed
    assert tracker.expect(Pending(Op.SYNC)) is True
    tracker.expect(Pending(Op.QUERY))
    shown, done = feed(tracker, Z + T + D1 + C + Z)
    assert [p.op for p in done] == [Op.SYNC, Op.QUERY] and not len(tracker)


def test_syncs_sent_during_extended_copy_in_are_ignored() -> None:
    tracker = ReplyTracker()
    for op in (Op.PARSE, Op.BIND, Op.EXECUTE, Op.SYNC):
        tracker.expect(Pending(op, copy_from=op is Op.EXECUTE))
    copy_in = encode(b"G", b"\x00\x00\x01\x00\x00")
    _, done = feed(tracker, encode(b"1") + encode(b"2") + copy_in)
    assert [p.op for p in done] == [Op.PARSE, Op.BIND] and len(tracker) == 2
    tracker.client_copy_end()  # CopyDone: the Sync sent with the batch was ignored by the server
    assert len(tracker) == 1  # only the Execute is left
    tracker.expect(Pending(Op.SYNC))  # the one the client sends after CopyDone
    _shown, done = feed(tracker, encode(b"C", b"COPY 1\x00") + Z)
    assert [p.op for p in done] == [Op.EXECUTE, Op.SYNC] and not len(tracker)


COPY_IN = encode(b"G", b"\x00\x00\x01\x00\x00")


def _copy_batch(tracker: ReplyTracker) -> None:
    for op in (Op.PARSE, Op.BIND, Op.EXECUTE, Op.SYNC):
        tracker.expect(Pending(op, copy_from=op is Op.EXECUTE))


def test_a_bad_row_during_extended_copy_in_leaves_one_ready_for_query() -> None:
    tracker = ReplyTracker()
    _copy_batch(tracker)
    feed(tracker, encode(b"1") + encode(b"2") + COPY_IN)
    _, done = feed(tracker, ERR)  # a bad CopyData row: the batch's Sync had been ignored during copy-in
    assert [p.op for p in done] == [Op.EXECUTE] and not len(tracker)
    tracker.client_copy_end()
    tracker.expect(Pending(Op.SYNC))  # the client's own Sync after CopyDone
    _, done = feed(tracker, Z)
    assert [p.op for p in done] == [Op.SYNC] and not len(tracker)


def test_copy_end_pipelined_before_copy_in_response() -> None:
    tracker = ReplyTracker()
    _copy_batch(tracker)
    tracker.client_copy_end()  # P B E S d c S all sent at once
    tracker.expect(Pending(Op.SYNC))
    _, done = feed(tracker, encode(b"1") + encode(b"2") + COPY_IN + encode(b"C", b"COPY 1\x00") + Z)
    assert [p.op for p in done] == [Op.PARSE, Op.BIND, Op.EXECUTE, Op.SYNC] and not len(tracker)


def test_copy_failing_before_copy_in_keeps_its_sync() -> None:
    tracker = ReplyTracker()
    _copy_batch(tracker)
    _, done = feed(tracker, encode(b"1") + encode(b"2") + ERR + Z)  # e.g. the table does not exist
    assert [p.op for p in done] == [Op.PARSE, Op.BIND, Op.EXECUTE, Op.SYNC] and not len(tracker)


def test_a_notice_of_a_quiet_request_is_not_relayed() -> None:
    tracker = ReplyTracker()
    tracker.expect(Pending(Op.QUERY, strip=True, quiet=True))
    notice = b"N\x00\x00\x00\x05\x00"
    assert tracker.on_message(ord("N"), notice, 0, len(notice)).relay is False
    tracker.expect(Pending(Op.QUERY))
    ready = b"Z\x00\x00\x00\x05I"
    assert tracker.on_message(ord("Z"), ready, 0, len(ready)).relay is False  # the quiet query's end
    assert tracker.on_message(ord("N"), notice, 0, len(notice)).relay is True  # the client's own request now
