"""ReplyTracker: which request each upstream reply answers, so the proxy can strip its own and capture results.

The proxy forwards requests upstream and sometimes adds its own (a Parse replayed for a statement it answered
locally, a Describe so that a captured result has its RowDescription). PostgreSQL answers requests strictly in order
(docs, "Extended Query": replies come in the order of the messages, and after an error everything up to Sync is
skipped), so a FIFO of `Pending` requests is enough to attribute every reply. Asynchronous messages (NoticeResponse,
NotificationResponse, ParameterStatus) may arrive at any time and belong to no request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from cacheproxy.errors import ProtocolViolation


class Op(Enum):
    """The request a Pending entry stands for, named by its frontend message."""

    PARSE = "P"
    BIND = "B"
    DESCRIBE_STATEMENT = "DS"
    DESCRIBE_PORTAL = "DP"
    EXECUTE = "E"
    CLOSE = "C"
    SYNC = "S"
    QUERY = "Q"
    FUNCTION_CALL = "F"


class Capture:
    """Collects the wire bytes of one result (RowDescription + DataRows + CommandComplete) up to a size limit."""

    __slots__ = ("context", "failed", "header", "limit", "parts", "size")

    def __init__(self, limit: int, context: object = None) -> None:
        self.limit = limit
        self.context = context  # what the session needs to store it (key, tables, ttl, generations...)
        self.header = b""  # RowDescription (or ParameterDescription + RowDescription for a statement)
        self.parts: list[bytes] = []
        self.size = 0
        self.failed = False

    def add(self, message: bytes, *, header: bool = False) -> None:
        if self.failed:
            return
        self.size += len(message)
        if self.size > self.limit:
            self.fail()  # too big to cache: keep relaying, stop holding bytes
            return
        if header:
            self.header += message
        else:
            self.parts.append(message)

    def fail(self) -> None:
        self.failed = True
        self.parts = []
        self.header = b""

    def value(self) -> bytes:
        return self.header + b"".join(self.parts)


@dataclass(slots=True)
class Pending:
    """One request sent upstream whose replies are still to come."""

    op: Op
    strip: bool = False  # the proxy's own request: its replies are not shown to the client (errors excepted)
    capture: Capture | None = None
    on_done: object = None  # opaque to the tracker: handed back when the request completes
    seen_error: bool = field(default=False)


# Replies that end each request (besides ErrorResponse, which ends the request and skips to Sync).
_ENDS: dict[Op, bytes] = {
    Op.PARSE: b"1",
    Op.BIND: b"2",
    Op.DESCRIBE_STATEMENT: b"Tn",
    Op.DESCRIBE_PORTAL: b"Tn",
    Op.EXECUTE: b"CIs",
    Op.CLOSE: b"3",
    Op.SYNC: b"Z",
    Op.QUERY: b"Z",
    Op.FUNCTION_CALL: b"Z",
}
_ASYNC = frozenset(b"NAS")
_NONE: list[Pending] = []  # shared empty result: the common case allocates nothing
_CAPTURED_HEADERS = frozenset(b"tT")
# PortalSuspended ends a result cut at the Execute's row limit; the key includes the limit, so it replays exactly.
_CAPTURED_BODY = frozenset(b"DCs")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with one upstream message."""

    relay: bool
    done: list[Pending]  # requests completed by this message (in order), with their captures


_RELAY = Outcome(True, _NONE)
_STRIP = Outcome(False, _NONE)


class ReplyTracker:
    """Attributes upstream replies to pending requests (a FIFO).

    It mirrors two server states in which requests get no reply at all (PostgreSQL docs, "Extended Query" and
    "COPY Operations"): after an error in extended protocol, every message up to the next Sync is discarded; and
    during COPY FROM STDIN started by an Execute, Sync and Flush are ignored until CopyDone or CopyFail.
    """

    __slots__ = ("_copy_in", "_pending", "_skipping")

    def __init__(self) -> None:
        self._pending: deque[Pending] = deque()
        self._skipping = False  # the server discards messages until a Sync: new requests get no reply
        self._copy_in = False  # an Execute put the server in copy-in mode: Syncs sent meanwhile are ignored

    def __len__(self) -> int:
        return len(self._pending)

    def expect(self, pending: Pending) -> bool:
        """Queue a request sent upstream. False when the server will not answer it (it discards messages until a
        Sync after an error): the caller completes it at once, as skipped."""
        if self._skipping:
            if pending.op is not Op.SYNC:
                pending.seen_error = True
                if pending.capture is not None:
                    pending.capture.fail()
                return False
            self._skipping = False
        self._pending.append(pending)
        return True

    def client_copy_end(self) -> list[Pending]:
        """The client sent CopyDone or CopyFail. Syncs forwarded during copy-in were ignored by the server: they
        will get no ReadyForQuery. Returns them (completed, with no reply)."""
        if not self._copy_in:
            return []
        self._copy_in = False
        ignored = [p for p in self._pending if p.op is Op.SYNC]
        self._pending = deque(p for p in self._pending if p.op is not Op.SYNC)
        return ignored

    def on_message(self, msg_type: int, region: bytes, start: int, end: int) -> Outcome:
        """Account for one whole upstream message, `region[start:end]` (type byte included).

        The message is sliced out of the region only when a capture keeps it: relayed bytes are never copied here.
        """
        if msg_type in _ASYNC:
            if self._pending and self._pending[0].capture is not None and msg_type != ord("A"):
                # A notice or a parameter change inside a result: a replay could not reproduce it.
                self._pending[0].capture.fail()
            return _RELAY
        if not self._pending:
            if msg_type == ord("E"):
                return _RELAY  # a FATAL the server sends before closing (e.g. pg_terminate_backend)
            raise ProtocolViolation(f"upstream sent {chr(msg_type)!r} with no request pending")
        head = self._pending[0]
        if msg_type == ord("E"):
            return Outcome(True, self._on_error(head))
        if msg_type == ord("G") and head.op is Op.EXECUTE:
            self._copy_in = True
        relay = not head.strip
        capture = head.capture
        if capture is not None and not capture.failed:
            if msg_type in _CAPTURED_HEADERS:
                capture.add(region[start:end], header=True)
            elif msg_type in _CAPTURED_BODY:
                capture.add(region[start:end])
            elif msg_type != ord("Z"):
                capture.fail()  # NoData, EmptyQuery, COPY: not a cacheable result
        if msg_type in _ENDS[head.op] and (head.op is not Op.QUERY or msg_type == ord("Z")):
            self._pending.popleft()
            return Outcome(relay, [head])
        return _RELAY if relay else _STRIP

    def _on_error(self, head: Pending) -> list[Pending]:
        """ErrorResponse: it ends the head request; in extended protocol, every request up to Sync is skipped."""
        self._copy_in = False  # an error ends copy-in mode too
        if head.op in (Op.QUERY, Op.FUNCTION_CALL):
            head.seen_error = True  # ReadyForQuery still follows
            if head.capture is not None:
                head.capture.fail()
            return []
        done: list[Pending] = []
        while self._pending and self._pending[0].op is not Op.SYNC:
            skipped = self._pending.popleft()
            skipped.seen_error = True
            if skipped.capture is not None:
                skipped.capture.fail()
            done.append(skipped)
        if not self._pending:
            self._skipping = True  # no Sync sent yet: what the client sends next is discarded up to one
        return done
