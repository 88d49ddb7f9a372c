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
from typing import Final

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

    # The reply types that end this request (set below from _ENDS): read as an attribute on the hot path, since
    # hashing an Enum member (a dict lookup keyed by it) runs Python code.
    ends: bytes


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
    quiet: bool = False  # ... nor its errors: a request made for the proxy alone (a write-through refresh)
    capture: Capture | None = None
    copy_from: bool = False  # an Execute of COPY ... FROM STDIN: Syncs sent until CopyDone may be ignored
    during_copy: bool = False  # a Sync sent after a COPY FROM Execute, before the client ended the copy
    # Opaque to the tracker: handed back when the request completes. (`| None` is redundant for mypy, but a bare
    # `object` annotation of a dataclass field breaks mypyc's compiled class at import: KeyError 'object'.)
    on_done: object | None = None
    seen_error: bool = field(default=False)

    def __init__(
        self,
        op: Op,
        strip: bool = False,
        quiet: bool = False,
        capture: Capture | None = None,
        copy_from: bool = False,
        during_copy: bool = False,
        on_done: object | None = None,
        seen_error: bool = False,
    ) -> None:
        self.op = op
        self.strip = strip
        self.quiet = quiet
        self.capture = capture
        self.copy_from = copy_from
        self.during_copy = during_copy
        self.on_done = on_done
        self.seen_error = seen_error


# Replies that end each request (besides ErrorResponse, which ends the request and skips to Sync).
_ENDS: Final[dict[Op, bytes]] = {
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
for _op, _ends in _ENDS.items():
    _op.ends = _ends
_ASYNC: Final = frozenset(b"NAS")
_CYCLE_OPS: Final = frozenset((Op.SYNC, Op.QUERY, Op.FUNCTION_CALL))
_NONE: Final[list[Pending]] = []  # shared empty result: the common case allocates nothing
_CAPTURED_HEADERS: Final = frozenset(b"tT")
# PortalSuspended ends a result cut at the Execute's row limit; the key includes the limit, so it replays exactly.
_CAPTURED_BODY: Final = frozenset(b"DCs")


@dataclass(slots=True, unsafe_hash=True)
class Outcome:
    """What to do with one upstream message."""

    relay: bool
    done: list[Pending]  # requests completed by this message (in order), with their captures

    def __init__(self, relay: bool, done: list[Pending]) -> None:
        self.relay = relay
        self.done = done


_RELAY: Final = Outcome(True, _NONE)
_STRIP: Final = Outcome(False, _NONE)


class ReplyTracker:
    """Attributes upstream replies to pending requests (a FIFO).

    It mirrors two server states in which requests get no reply at all (PostgreSQL docs, "Extended Query" and
    "COPY Operations"): after an error in extended protocol, every message up to the next Sync is discarded; and
    during COPY FROM STDIN started by an Execute, Sync and Flush are ignored. Syncs sent after a COPY FROM Execute
    and before the client's CopyDone/CopyFail are marked: if the server did enter copy-in mode (CopyInResponse),
    they get no reply and are dropped; if the COPY failed before that, they are answered as usual.
    """

    __slots__ = ("_client_copy_ended", "_copy_in", "_copy_open", "_pending", "_skipping", "pending")

    def __init__(self) -> None:
        self._pending: deque[Pending] = deque()
        # The same queue, for callers to test for emptiness without a call (`if tracker.pending:`); replaced only
        # by _drop_copy_syncs, which rebinds both.
        self.pending = self._pending
        self._skipping = False  # the server discards messages until a Sync: new requests get no reply
        self._copy_open = False  # a COPY FROM Execute is queued and the client has not ended the copy
        self._copy_in = False  # the server sent CopyInResponse for it
        self._client_copy_ended = False

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def skipping(self) -> bool:
        return self._skipping

    def quiet_only(self) -> bool:
        """Every request pending is the proxy's own, quiet one (write-through refreshes)."""
        return bool(self._pending) and all(pending.quiet for pending in self._pending)

    def within_batch(self) -> bool:
        """No request pending ends a request cycle (Sync, Query, FunctionCall): every one is an extended-protocol
        message sent since the last Sync."""
        return not any(pending.op in _CYCLE_OPS for pending in self._pending)

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
        if pending.copy_from:
            self._copy_open, self._copy_in, self._client_copy_ended = True, False, False
        elif pending.op is Op.SYNC and self._copy_open and not self._client_copy_ended:
            pending.during_copy = True
        self._pending.append(pending)
        return True

    def client_copy_end(self) -> list[Pending]:
        """The client sent CopyDone or CopyFail: Syncs sent before it, while the server was in copy-in mode, were
        ignored by the server."""
        if self._copy_open:
            self._client_copy_ended = True
            if self._copy_in:
                self._drop_copy_syncs()
        return []

    def _drop_copy_syncs(self) -> None:
        self._pending = self.pending = deque(p for p in self._pending if not p.during_copy)
        self._copy_open = self._copy_in = False

    def _copy_failed_early(self) -> None:
        """The COPY failed before copy-in mode: the Syncs sent meanwhile are ordinary Syncs."""
        for pending in self._pending:
            pending.during_copy = False
        self._copy_open = self._copy_in = False

    def on_message(self, msg_type: int, region: bytes, start: int, end: int) -> Outcome:
        """Account for one whole upstream message, `region[start:end]` (type byte included).

        The message is sliced out of the region only when a capture keeps it: relayed bytes are never copied here.
        """
        if msg_type in _ASYNC:
            head = self._pending[0] if self._pending else None
            if head is not None and head.capture is not None and msg_type != ord("A"):
                # A notice or a parameter change inside a result: a replay could not reproduce it.
                head.capture.fail()
            if head is not None and head.quiet and msg_type == ord("N"):
                return _STRIP  # a notice raised by the proxy's own request (a refresh) is not the client's
            return _RELAY
        if not self._pending:
            if msg_type == ord("E"):
                return _RELAY  # a FATAL the server sends before closing (e.g. pg_terminate_backend)
            raise ProtocolViolation(f"upstream sent {chr(msg_type)!r} with no request pending")
        head = self._pending[0]
        if msg_type == ord("E"):
            return Outcome(not head.quiet, self._on_error(head))
        if msg_type == ord("G") and head.op is Op.EXECUTE and self._copy_open:
            self._copy_in = True
            if self._client_copy_ended:  # the client's CopyDone was already on its way
                self._drop_copy_syncs()
        relay = not head.strip
        capture = head.capture
        if capture is not None and not capture.failed:
            if msg_type in _CAPTURED_HEADERS or (msg_type == ord("n") and head.op is Op.DESCRIBE_STATEMENT):
                # (a statement's NoData is part of its description: ParameterDescription, then NoData)
                capture.add(region[start:end], header=True)
            elif msg_type in _CAPTURED_BODY:
                capture.add(region[start:end])
            elif msg_type != ord("Z"):
                capture.fail()  # NoData, EmptyQuery, COPY: not a cacheable result
        if msg_type in head.op.ends and (head.op is not Op.QUERY or msg_type == ord("Z")):
            self._pending.popleft()
            return Outcome(relay, [head])
        return _RELAY if relay else _STRIP

    def _on_error(self, head: Pending) -> list[Pending]:
        """ErrorResponse: it ends the head request; in extended protocol, every request up to Sync is skipped."""
        if self._copy_open:
            if self._copy_in:
                self._drop_copy_syncs()  # they were read, and ignored, during copy-in
            else:
                self._copy_failed_early()
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
