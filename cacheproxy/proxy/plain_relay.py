"""PlainStreams: what a session with the cache off reads of the bytes it relays (sans-IO, compiled with the hot path).

With the cache off a session forwards bytes as they arrive and reads only what it must know. Of the client's
stream: request cycles (Query, Sync and FunctionCall are each answered by one ReadyForQuery), whether an
extended-protocol batch is open (forwarded messages not yet followed by a Sync), Terminate, and message types that
do not exist (refused). Of the server's: ReadyForQuery (the transaction status, `TransactionTracker.on_ready`),
ParameterStatus (the session's parameters) and FATAL or PANIC errors (the server told the client why it closes).

Its own module, rather than loops in session.py (asyncio glue, interpreted), so that the per-message work of the
pass-through relay runs compiled: `python3 -m bench.cost` counts it as the `pass` kind.
"""

from __future__ import annotations

from typing import Final

from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE, Frame, Framer
from cacheproxy.proxy.transaction import TransactionTracker

# PostgreSQL's own message-size ceiling (1 GB for a field, plus headers): server messages are trusted up to it.
MAX_BACKEND_MESSAGE: Final = (1 << 30) + (1 << 20)
FATAL_SEVERITIES: Final = frozenset(("FATAL", "PANIC"))
# Frontend messages that end a request cycle; each one gets exactly one ReadyForQuery.
CYCLE_ENDS: Final = frozenset((m.QUERY, m.SYNC, m.FUNCTION_CALL))
_COPY_FROM_CLIENT: Final = frozenset((m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL))


class PlainStreams:
    """Both directions of one cache-off session: framers, and the counts the session's `idle` is made of."""

    def __init__(self, max_message_size: int, transaction: TransactionTracker, parameters: dict[str, str]) -> None:
        self.client_framer = Framer(max_message_size)
        self.upstream_framer = Framer(MAX_BACKEND_MESSAGE)
        self._transaction = transaction
        self._parameters = parameters  # (the session's dict: updated in place)
        self.in_flight = 0  # request cycles forwarded and not yet answered by ReadyForQuery
        self.open_batch = False  # extended-protocol messages forwarded since the last Sync
        self.terminated = False  # the client sent Terminate
        self.fatal = False  # the server sent a FATAL or PANIC error

    def count_client(self, frames: list[Frame]) -> int:
        """Account for client messages about to be forwarded; -1, or the type of one that does not exist (the
        session ends: nothing of these is forwarded)."""
        for msg_type, _, _ in frames:
            if msg_type in CYCLE_ENDS:
                self.in_flight += 1
                self.open_batch = False
            elif msg_type == m.TERMINATE:
                self.terminated = True
            elif msg_type not in m.FRONTEND_TYPES:
                return msg_type
            elif msg_type not in _COPY_FROM_CLIENT:
                self.open_batch = True
        return -1

    def from_upstream(self, data: bytes) -> bytes:
        """Server bytes in; the bytes of the whole messages among them out (to relay), read on the way."""
        region, frames = self.upstream_framer.feed(data)
        for msg_type, start, end in frames:
            if msg_type == m.READY_FOR_QUERY:
                if self.in_flight:
                    self.in_flight -= 1
                self._transaction.on_ready(region[start + HEADER_SIZE : start + HEADER_SIZE + 1])
            elif msg_type == m.PARAMETER_STATUS:
                name, value = m.decode_parameter_status(region[start + HEADER_SIZE : end])
                self._parameters[name] = value
            elif msg_type == m.ERROR_RESPONSE:
                severity = m.decode_error_fields(region[start + HEADER_SIZE : end]).get("V", "")
                self.fatal = self.fatal or severity in FATAL_SEVERITIES
        return region
