"""The binlog feed (`invalidation.binlog: on`): follows the server's row-based binlog as a replica and invalidates.

It sees every committed write, also those that bypass every proxy (a migration, a cron job, another service). The
server writes a transaction to its binlog when it commits, so a row event means committed rows: its table is
invalidated at once; a query event (DDL, or a statement-based write) drops what its analysis says. The reading is
python-mysql-replication's (a blocking PyMySQL client), run on a thread that hands each invalidation to the event
loop. While the feed is not connected the proxy serves nothing from the cache: it could not see writes.
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
        self.position: tuple[str, int] | None = None  # the last (binlog file, position) read
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
                self._post(partial(self._on_state, False, str(exc)))
            self._stopping.wait(_RETRY)

    def _follow(self) -> None:
        import pymysql
        from pymysqlreplication import BinLogStreamReader
        from pymysqlreplication.event import QueryEvent, RotateEvent
        from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

        settings: dict[str, Any] = {
            "host": self._upstream.host,
            "port": self._upstream.port,
            "user": self._upstream.user or "root",
            "password": self._upstream.password or "",
        }
        settings.update(pymysql_ssl(self._upstream))
        with pymysql.connect(**settings) as conn, conn.cursor() as cur:  # fmt: skip
            check_driver_tls(self._upstream, conn.server_capabilities)
            cur.execute("SHOW MASTER STATUS")
            row = cur.fetchone()
            if row is None:
                raise RuntimeError("the server has no binlog (log_bin is off)")
            cur.execute("SELECT @@global.binlog_format, @@global.server_id")
            binlog_format, server_id = cur.fetchone()
            cur.execute("SELECT @@version")
            is_mariadb = "mariadb" in str(cur.fetchone()[0]).lower()
            with contextlib.suppress(Exception):
                cur.execute("SELECT @@server_uuid")
                self.server_uuid = str(cur.fetchone()[0])
        if str(binlog_format).upper() != "ROW":
            log.warning("binlog_format is %s, not ROW: statement events are analysed, which may miss effects",
                        binlog_format)  # fmt: skip
        log_file, log_pos = str(row[0]), int(row[1])
        self._stream = BinLogStreamReader(
            connection_settings=settings, server_id=_replica_id(int(server_id)), blocking=True, resume_stream=True,
            log_file=log_file, log_pos=log_pos, is_mariadb=is_mariadb,
            only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent, QueryEvent, RotateEvent],
        )  # fmt: skip
        self.position = (log_file, log_pos)
        self._post(partial(self._on_state, True, ""))
        log.info("binlog feed following %s:%d", log_file, log_pos)
        for event in self._stream:
            if self._stopping.is_set():
                return
            if isinstance(event, RotateEvent):
                self.position = (event.next_binlog, event.position)
                continue
            if isinstance(event, QueryEvent):
                schema = event.schema.decode() if isinstance(event.schema, bytes) else str(event.schema or "")
                effects = query_effects(schema, str(event.query))
            else:
                effects = ({(str(event.schema).lower(), str(event.table).lower())}, set(), False)
            if self.position is not None:
                self.position = (self.position[0], int(event.packet.log_pos))
            if effects[0] or effects[1] or effects[2]:
                self._post(partial(self._on_invalidate, effects))
        raise RuntimeError("the binlog stream ended")


def _replica_id(primary: int) -> int:
    """A replica server id unlikely to collide with real replicas (each proxy process its own)."""
    return 1_000_000_000 + (os.getpid() * 7919 + primary) % 1_000_000_000
