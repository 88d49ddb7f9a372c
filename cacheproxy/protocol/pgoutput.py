"""Decoder of the logical replication stream (pgoutput, proto_version 1) down to "which tables did each committed
transaction touch", and the encoder of the Standby Status Update (sans-IO).

The stream is the CopyBoth phase of ``START_REPLICATION SLOT s LOGICAL ... (proto_version '1', publication_names
...)``: each CopyData body is an XLogData ('w', wrapping one pgoutput message) or a primary keepalive ('k')
(PostgreSQL docs, "Streaming Replication Protocol" and "Logical Replication Message Formats"). Only what
invalidation needs is decoded: Relation messages (relation id -> schema and name) and the relation ids of
Insert/Update/Delete/Truncate; tuple data is never parsed. Logical decoding sends a transaction only once it has
committed, so a rolled-back transaction never appears.

Time is an argument (`now`, Unix seconds), never read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from struct import Struct

from cacheproxy.errors import ProtocolViolation

_INT8 = Struct("!B")
_INT32 = Struct("!I")
_INT64 = Struct("!Q")
_XLOG_DATA = Struct("!QQQ")  # start of the WAL data, server's current WAL end, send time
_KEEPALIVE = Struct("!QQB")  # server's WAL end, send time, reply requested
_COMMIT = Struct("!BQQQ")  # flags, commit LSN, end LSN, commit time
_BEGIN = Struct("!QQI")  # final LSN, commit time, xid
_STATUS_UPDATE = Struct("!cQQQQB")

# PostgreSQL timestamps count microseconds from 2000-01-01 00:00 UTC.
_PG_EPOCH_UNIX = 946_684_800


@dataclass(frozen=True, slots=True)
class CommittedTransaction:
    """One committed transaction: the tables it changed (never empty of meaning: possibly empty when it changed
    only tables outside the publication) and the LSN just past its commit record, which is what to acknowledge."""

    xid: int
    tables: frozenset[tuple[str, str]]
    commit_lsn: int
    end_lsn: int


@dataclass(frozen=True, slots=True)
class Keepalive:
    """The server's WAL end, and whether it wants a status update now (it will time the connection out otherwise)."""

    wal_end: int
    reply_requested: bool


ReplicationEvent = CommittedTransaction | Keepalive


class PgOutputDecoder:
    """Feed it the body of every CopyData message of the stream, in order; it returns the events they complete.

    `wal_end` is the server's latest WAL end position (from XLogData and keepalives). A change to a relation whose
    Relation message was never received is a protocol violation: the stream must be restarted (the server resends
    Relation messages on a new stream), never guessed at.
    """

    def __init__(self) -> None:
        self._relations: dict[int, tuple[str, str]] = {}
        self._xid: int | None = None
        self._tables: set[tuple[str, str]] = set()
        self.wal_end = 0

    @property
    def in_transaction(self) -> bool:
        return self._xid is not None

    def feed(self, copy_data: bytes) -> list[ReplicationEvent]:
        if not copy_data:
            raise ProtocolViolation("empty CopyData in the replication stream")
        kind = copy_data[0]
        if kind == ord("w"):
            if len(copy_data) < 1 + _XLOG_DATA.size + 1:
                raise ProtocolViolation("truncated XLogData message")
            _, wal_end, _ = _XLOG_DATA.unpack_from(copy_data, 1)
            self.wal_end = max(self.wal_end, wal_end)
            event = self._on_pgoutput(memoryview(copy_data)[1 + _XLOG_DATA.size :])
            return [event] if event is not None else []
        if kind == ord("k"):
            if len(copy_data) < 1 + _KEEPALIVE.size:
                raise ProtocolViolation("truncated primary keepalive message")
            wal_end, _, reply = _KEEPALIVE.unpack_from(copy_data, 1)
            self.wal_end = max(self.wal_end, wal_end)
            return [Keepalive(wal_end, bool(reply))]
        raise ProtocolViolation(f"unexpected message {chr(kind)!r} in the replication stream")

    def _on_pgoutput(self, msg: memoryview) -> CommittedTransaction | None:
        tag = chr(msg[0])
        if tag == "B":
            self._need(msg, 1 + _BEGIN.size, "Begin")
            self._xid = _BEGIN.unpack_from(msg, 1)[2]
            self._tables = set()
        elif tag in "IUD":
            self._need(msg, 5, tag)
            self._touch(_INT32.unpack_from(msg, 1)[0])
        elif tag == "T":
            self._on_truncate(msg)
        elif tag == "R":
            self._on_relation(msg)
        elif tag == "C":
            return self._on_commit(msg)
        elif tag not in "OYM":
            # 'O' origin, 'Y' type, 'M' logical message carry nothing about tables; anything else (the streaming
            # messages of proto_version 2+) was not asked for.
            raise ProtocolViolation(f"unexpected pgoutput message {tag!r}")
        return None

    def _on_relation(self, msg: memoryview) -> None:
        self._need(msg, 5, "Relation")
        relid = _INT32.unpack_from(msg, 1)[0]
        schema, pos = _cstring(msg, 5)
        name, _ = _cstring(msg, pos)
        # pgoutput sends an empty namespace for pg_catalog.
        self._relations[relid] = (schema or "pg_catalog", name)

    def _on_truncate(self, msg: memoryview) -> None:
        self._need(msg, 6, "Truncate")
        count = _INT32.unpack_from(msg, 1)[0]
        self._need(msg, 6 + 4 * count, "Truncate")
        for i in range(count):
            self._touch(_INT32.unpack_from(msg, 6 + 4 * i)[0])

    def _on_commit(self, msg: memoryview) -> CommittedTransaction:
        self._need(msg, 1 + _COMMIT.size, "Commit")
        if self._xid is None:
            raise ProtocolViolation("pgoutput Commit without Begin")
        _, commit_lsn, end_lsn, _ = _COMMIT.unpack_from(msg, 1)
        done = CommittedTransaction(self._xid, frozenset(self._tables), commit_lsn, end_lsn)
        self._xid = None
        self._tables = set()
        return done

    def _touch(self, relid: int) -> None:
        if self._xid is None:
            raise ProtocolViolation("pgoutput change outside a transaction")
        table = self._relations.get(relid)
        if table is None:
            raise ProtocolViolation(f"pgoutput change to relation {relid} whose Relation message was not received")
        self._tables.add(table)

    @staticmethod
    def _need(msg: memoryview, size: int, what: str) -> None:
        if len(msg) < size:
            raise ProtocolViolation(f"truncated pgoutput {what} message")


def _cstring(msg: memoryview, pos: int) -> tuple[str, int]:
    end = bytes(msg[pos:]).find(b"\x00")
    if end < 0:
        raise ProtocolViolation("pgoutput string without terminator")
    return bytes(msg[pos : pos + end]).decode("utf-8", "replace"), pos + end + 1


def standby_status_update(applied_lsn: int, now: float, *, reply_requested: bool = False) -> bytes:
    """The body of a Standby Status Update ('r') CopyData: written, flushed and applied are all `applied_lsn` (what
    this client has acted upon; the slot may release WAL before it), `now` as PostgreSQL's clock.

    >>> standby_status_update(0x16B3748, 946684801.0).hex()
    '7200000000016b374800000000016b374800000000016b374800000000000f424000'
    """
    clock = int((now - _PG_EPOCH_UNIX) * 1_000_000)
    return _STATUS_UPDATE.pack(b"r", applied_lsn, applied_lsn, applied_lsn, clock, int(reply_requested))


def format_lsn(lsn: int) -> str:
    """An LSN the way PostgreSQL prints it.

    >>> format_lsn(0x16B3748)
    '0/16B3748'
    """
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """An LSN from PostgreSQL's text form.

    >>> parse_lsn("1/2A")
    4294967338
    """
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)
