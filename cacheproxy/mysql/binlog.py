"""The binlog feed (`invalidation.binlog: on`): follows the server's row-based binlog as a replica and invalidates.

It sees every committed write, also those that bypass every proxy (a migration, a cron job, another service). The
server writes a transaction to its binlog when it commits, so a row event means committed rows: its table is
invalidated at once; a query event (DDL, or a statement-based write) drops what its analysis says. The reading is
python-mysql-replication's (a blocking PyMySQL client), run on a thread that hands each invalidation to the event
loop. While the feed is not connected the proxy serves nothing from the cache: it could not see writes. It starts at
the server's current position (on MariaDB its GTID state: python-mysql-replication's MariaDB dump ignores a file and
offset and would replay the whole binlog), or where a snapshot load's reading of the binlog stopped (evidence.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from cacheproxy.analysis.model import Kind
from cacheproxy.analysis.mysql import analyze_mysql
from cacheproxy.config import UpstreamConfig
from cacheproxy.mysql.tls import check_driver_tls, pymysql_ssl

log = logging.getLogger("cacheproxy.mysql.binlog")

TableId = tuple[str, str]
# (tables, databases, everything): what one binlog event invalidates.
Invalidation = tuple[set[TableId], set[str], bool]
_RETRY = 1.0
_TX_QUERIES = frozenset(("begin", "commit", "rollback", "xa start", "xa end", "xa prepare", "xa commit"))


def query_effects(schema: str, query: str) -> Invalidation:
    """What a binlog query event invalidates (DDL: its databases; a statement-based write: its tables).

    >>> query_effects("shop", "BEGIN")
    (set(), set(), False)
    >>> query_effects("shop", "UPDATE t SET a = 1")
    ({('shop', 't')}, set(), False)
    >>> query_effects("shop", "ALTER TABLE t ADD COLUMN b INT")
    (set(), {'shop'}, False)
    """
    if query.strip().lower().rstrip(";") in _TX_QUERIES:
        return set(), set(), False
    info = analyze_mysql(query)
    if info.invalidate_all:
        return set(), set(), True
    if info.kind == Kind.DDL or info.invalidate_databases:
        return set(), {schema.lower(), *info.invalidate_databases} - {""}, False
    tables = {((db or schema).lower(), name) for db, name in info.writes}
    return tables, set(), False


class BinlogCursor:
    """Where a reader is in the binlog, and the last transaction boundary it passed: the position from which
    reading again re-reads every event of a transaction not wholly read yet.

    Positions are text: "gtid:<@@gtid_binlog_pos>" on MariaDB, whose binlog dump is started from a GTID state
    (python-mysql-replication's MariaDB dump ignores a file and offset: it would start at the first binlog), and
    "file:<name>:<offset>" on MySQL. A boundary is the end of a transaction (its XID event or COMMIT) or of a
    statement logged on its own (DDL).
    """

    def __init__(self, start: str) -> None:
        self.safe = start
        self._gtids: dict[str, str] = {}  # MariaDB: domain -> last GTID seen
        self._file = ""
        self._offset = 0
        if start.startswith("gtid:"):
            for gtid in filter(None, start[5:].split(",")):
                self._gtids[gtid.split("-", 1)[0]] = gtid
        else:
            name, _, offset = start[5:].rpartition(":")
            self._file, self._offset = name, int(offset)

    @property
    def gtid(self) -> bool:
        return self.safe.startswith("gtid:")

    def dump_args(self) -> dict[str, Any]:
        """BinLogStreamReader's arguments to start at `safe`."""
        if self.gtid:
            return {"auto_position": self.safe[5:]}
        return {"log_file": self._file, "log_pos": self._offset, "resume_stream": True}

    def on_event(self, event: Any) -> bool:
        """Follow one event; True when it ended a transaction (`safe` moved)."""
        from pymysqlreplication.event import MariadbGtidEvent, QueryEvent, RotateEvent, XidEvent

        if isinstance(event, RotateEvent):
            self._file, self._offset = str(event.next_binlog), int(event.position)
            return False
        if isinstance(event, MariadbGtidEvent):
            self._gtids[str(event.domain_id)] = str(event.gtid)
            return False
        self._offset = int(event.packet.log_pos) or self._offset
        boundary = isinstance(event, XidEvent) or (
            isinstance(event, QueryEvent) and str(event.query).strip().lower() != "begin"
            and not _in_transaction_query(str(event.query))
        )  # fmt: skip
        if boundary:
            self.safe = ("gtid:" + ",".join(self._gtids[d] for d in sorted(self._gtids)) if self.gtid
                         else f"file:{self._file}:{self._offset}")  # fmt: skip
        return boundary


def _in_transaction_query(query: str) -> bool:
    """A statement-based write inside BEGIN ... COMMIT (not a boundary); DDL and COMMIT are."""
    text = query.strip().lower()
    return text.startswith(("insert", "update", "delete", "replace", "savepoint", "xa ")) or text == "rollback to"


def current_position(cur: Any, is_mariadb: bool) -> str | None:
    """The server's current binlog position (None: no binlog), read with a PyMySQL cursor."""
    cur.execute("SHOW MASTER STATUS")
    row = cur.fetchone()
    if row is None:
        return None
    if is_mariadb:
        cur.execute("SELECT @@global.gtid_binlog_pos")
        return "gtid:" + str(cur.fetchone()[0] or "")
    return f"file:{row[0]}:{int(row[1])}"


class BinlogFeed:
    """A replica connection reading the binlog on its own thread; `on_invalidate` runs on the event loop."""

    def __init__(self, upstream: UpstreamConfig, on_invalidate: Callable[[Invalidation], None],
                 on_state: Callable[[bool, str], None]) -> None:  # fmt: skip
        self._upstream = upstream
        self._on_invalidate = on_invalidate
        self._on_state = on_state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: Any = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # The position up to which every invalidation has been applied on the event loop (None while down): the
        # cache is valid as of there, which is what a snapshot records.
        self.applied: str | None = None
        # Where the next connection starts instead of the server's current position: set once, by a snapshot load
        # that replayed the binlog up to there.
        self.start_at: str | None = None
        self.server_uuid: str | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="cacheproxy-binlog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        stream = self._stream
        if stream is not None:
            # Closing a socket does not wake a thread blocked reading it; shutting it down does.
            sock = getattr(getattr(stream, "_stream_connection", None), "_sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                stream.close()
        if self._thread is not None:
            self._thread.join(5.0)

    def _post(self, call: Callable[[], None]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(call)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._follow()
            except Exception as exc:
                if self._stopping.is_set():
                    return
                log.warning("binlog feed lost, the cache is not served until it is back: %s", exc)
                self._post(partial(self._state, False, str(exc), None))
            self._stopping.wait(_RETRY)

    def _state(self, ok: bool, why: str, position: str | None) -> None:
        """On the event loop: the feed is up from `position` (or down: nothing is applied any more)."""
        self.applied = position if ok else None
        self._on_state(ok, why)

    def _apply(self, effects: Invalidation | None, position: str) -> None:
        """On the event loop: apply one event's invalidation, then record how far the cache is valid."""
        if effects is not None:
            self._on_invalidate(effects)
        if self.applied is not None:
            self.applied = position

    def _follow(self) -> None:
        import pymysql
        from pymysqlreplication import BinLogStreamReader

        settings: dict[str, Any] = {"host": self._upstream.host, "port": self._upstream.port,
                                    "user": self._upstream.user or "root", "password": self._upstream.password or "",
                                    **pymysql_ssl(self._upstream)}  # fmt: skip
        with pymysql.connect(**settings) as conn, conn.cursor() as cur:
            check_driver_tls(self._upstream, conn.server_capabilities)
            cur.execute("SELECT @@global.binlog_format, @@global.server_id, @@version")
            binlog_format, server_id, version = cur.fetchone()
            is_mariadb = "mariadb" in str(version).lower()
            position = current_position(cur, is_mariadb)
            if position is None:
                raise RuntimeError("the server has no binlog (log_bin is off)")
            with contextlib.suppress(Exception):
                cur.execute("SELECT @@server_uuid")
                self.server_uuid = str(cur.fetchone()[0])
        if str(binlog_format).upper() != "ROW":
            log.warning("binlog_format is %s, not ROW: statement events are analysed, which may miss effects",
                        binlog_format)  # fmt: skip
        cursor = BinlogCursor(self.start_at or position)
        self.start_at = None  # a later reconnection starts afresh: the cache is flushed when the feed is lost
        self._stream = BinLogStreamReader(
            connection_settings=settings, server_id=_replica_id(int(server_id)), blocking=True,
            is_mariadb=is_mariadb, only_events=_events(), **cursor.dump_args(),
        )  # fmt: skip
        self._post(partial(self._state, True, "", cursor.safe))
        log.info("binlog feed following from %s", cursor.safe)
        for event in self._stream:
            if self._stopping.is_set():
                return
            effects = event_effects(event)
            boundary = cursor.on_event(event)
            if effects[0] or effects[1] or effects[2]:
                self._post(partial(self._apply, effects, cursor.safe))
            elif boundary:
                self._post(partial(self._apply, None, cursor.safe))
        raise RuntimeError("the binlog stream ended")


def _events() -> list[type]:
    from pymysqlreplication.event import MariadbGtidEvent, QueryEvent, RotateEvent, XidEvent
    from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

    return [WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent, QueryEvent, RotateEvent, XidEvent, MariadbGtidEvent]


def event_effects(event: Any) -> Invalidation:
    """What one binlog event (of `_events()`) invalidates."""
    from pymysqlreplication.event import QueryEvent
    from pymysqlreplication.row_event import RowsEvent

    if isinstance(event, QueryEvent):
        schema = event.schema.decode() if isinstance(event.schema, bytes) else str(event.schema or "")
        return query_effects(schema, str(event.query))
    if isinstance(event, RowsEvent):
        return {(str(event.schema).lower(), str(event.table).lower())}, set(), False
    return set(), set(), False


def replay(upstream: UpstreamConfig, start: str) -> tuple[Invalidation, str]:
    """Read the binlog from `start` to its end (blocking: run it on a thread): what the events since then
    invalidate, and the boundary to continue from. Raises when the binlog from `start` is gone (purged) or
    unreadable: what happened since is then unknown."""
    import pymysql
    from pymysqlreplication import BinLogStreamReader

    settings: dict[str, Any] = {"host": upstream.host, "port": upstream.port, "user": upstream.user or "root",
                                "password": upstream.password or "", **pymysql_ssl(upstream)}  # fmt: skip
    cursor = BinlogCursor(start)
    with pymysql.connect(**settings) as conn, conn.cursor() as cur:
        check_driver_tls(upstream, conn.server_capabilities)
        cur.execute("SELECT @@global.server_id, @@version")
        server_id, version = cur.fetchone()
        if not cursor.gtid:
            cur.execute("SHOW BINARY LOGS")
            if cursor.dump_args()["log_file"] not in {str(row[0]) for row in cur.fetchall()}:
                raise RuntimeError(f"the binlog of {start} is no longer on the server (purged)")
    tables: set[TableId] = set()
    databases: set[str] = set()
    everything = False
    stream = BinLogStreamReader(
        connection_settings=settings, server_id=_replica_id(int(server_id)), blocking=False,
        is_mariadb="mariadb" in str(version).lower(), only_events=_events(), **cursor.dump_args(),
    )  # fmt: skip
    try:
        for event in stream:
            more_tables, more_databases, all_ = event_effects(event)
            cursor.on_event(event)
            tables |= more_tables
            databases |= more_databases
            everything = everything or all_
    finally:
        stream.close()
    return (tables, databases, everything), cursor.safe


def _replica_id(primary: int) -> int:
    """A replica server id unlikely to collide with real replicas (each proxy process its own)."""
    return 1_000_000_000 + (os.getpid() * 7919 + primary) % 1_000_000_000
