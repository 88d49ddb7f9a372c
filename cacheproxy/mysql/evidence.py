"""Snapshot evidence for the MySQL front end: which server it is, and what its binlog says changed since.

MySQL and MariaDB keep no per-table write counters that survive a restart (PostgreSQL's evidence), so the proof is
the binlog, which logs every committed write in order:

- The server's identity: MySQL's @@server_uuid; MariaDB has none, so (@@server_id, @@hostname, @@port, @@datadir)
  stand in for it (a different MariaDB with the same four, e.g. a restored copy of the data directory, is not told
  apart: its binlog position would have to match too, below).
- With `invalidation.binlog: on`, the snapshot records the position up to which the feed's invalidations had been
  applied when the entries were copied. At load the binlog is read from there to its end: the entries of every
  table written since (with their FK cascade children and the tables of views over them, from the catalog read
  now) and of every database that saw DDL are dropped, all of them when an event's effects are unknown, and the
  feed then continues from where that reading stopped, so no write falls in between. Positions are transaction
  boundaries (cacheproxy/mysql/binlog.py: BinlogCursor). A purged binlog proves nothing: cold start.
- Without it, the snapshot records the server's current binlog position (MariaDB: @@gtid_binlog_pos; MySQL: SHOW
  MASTER STATUS's file and offset), read before the entries are copied. An entry is loaded only if the position is
  the same at load: any logged write since, to any table, drops every entry (reading the binlog would need
  REPLICATION SLAVE, which only the binlog mode asks for).
- Without a binlog (log_bin off, MariaDB's default) nothing can show that a table did not change while the proxy
  was down (InnoDB's UPDATE_TIME is in memory only and has a one-second resolution): no snapshot is written and
  none is loaded; the restart is cold.

What it cannot see: writes made with sql_log_bin=0 (a session with SUPER/BINLOG ADMIN can skip the binlog), as the
binlog feed cannot either; and, without the binlog mode, writes that bypassed the proxy while it ran are bounded by
TTL as before (the snapshot does not fix that). Without the binlog mode, a write through another sidecar committed
just before the position is read, whose bus message had not arrived yet when the entries were copied, is before the
recorded position: its stale entry can be loaded, and then lives to its TTL (the message that would have dropped it
went to the proxy before the restart).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pymysql

from cacheproxy.cache.entry import WHOLE_DATABASE
from cacheproxy.config import UpstreamConfig
from cacheproxy.mysql.binlog import current_position, replay
from cacheproxy.mysql.tls import check_driver_tls, pymysql_ssl
from cacheproxy.snapshot.evidence import Cluster
from cacheproxy.snapshot.format import Header

TableId = tuple[str, str]
Expand = Callable[[Iterable[TableId]], Awaitable[tuple[set[TableId], set[str]]]]


class NoEvidence(Exception):
    """Nothing here can prove a snapshot valid (no binlog, or the feed is not up)."""


class MySQLEvidence:
    """The `cacheproxy.snapshot.store.Evidence` of a MySQL/MariaDB upstream.

    `applied`: with invalidation.binlog, the feed's applied position (None while it is not up); `expand`: written
    tables -> the tables and databases their writes reach (cacheproxy.mysql.server.MySQLServer.expand_written).
    """

    errors: tuple[type[BaseException], ...] = (OSError, pymysql.MySQLError, TimeoutError, ssl.SSLError, NoEvidence,
                                               RuntimeError)  # fmt: skip

    def __init__(self, upstream: UpstreamConfig, applied: Callable[[], str | None] | None,
                 expand: Expand) -> None:  # fmt: skip
        self.upstream = upstream
        self._applied = applied
        self._expand = expand
        self.resume_at: str | None = None  # after a load that read the binlog: where the feed continues

    @property
    def binlog_mode(self) -> bool:
        return self._applied is not None

    async def read_cluster(self) -> Cluster:
        """The server's identity, and the position the entries are valid at (for a write) or the server's current
        one (for a load, where `unchanged` does the comparing)."""
        identity, current = await asyncio.to_thread(self._server)
        if current is None:
            raise NoEvidence("the server has no binlog (log_bin is off): nothing could show at load that the cached "
                             "results are still valid, so the MySQL cache is not snapshotted")  # fmt: skip
        position = current
        if self._applied is not None:
            position = self._applied() or current  # the feed is not up at load time: the current one is shown
        return Cluster(identity, position)

    def valid_at(self) -> str:
        """For a write in the binlog mode: the feed's applied position (NoEvidence while it is not up)."""
        position = self._applied() if self._applied is not None else None
        if position is None:
            raise NoEvidence("the binlog feed is not up: the cache's validity has no position")
        return position

    async def read_database(self, database: str) -> dict[str, object]:
        """{"oid": 0, "tables": {every table and view of `database`: ""}}: what the entries may depend on."""
        if self._applied is not None:
            self.valid_at()  # refuse before the entries are copied, not after
        names = await asyncio.to_thread(self._tables, database)
        return {"oid": 0, "tables": dict.fromkeys([*names, WHOLE_DATABASE], "")}

    async def unchanged(self, header: Header, followed: set[str] | None) -> dict[TableId, bool]:
        then = header.wal_lsn
        if not then:
            raise NoEvidence("the snapshot holds no binlog position")
        if self._applied is None:
            _, now = await asyncio.to_thread(self._server)
            same = now == then
            return {(db, name): same for db, name in _listed(header)}
        (tables, databases, everything), self.resume_at = await asyncio.to_thread(replay, self.upstream, then)
        if everything:
            return dict.fromkeys(_listed(header), False)
        reached, more = await self._expand(tables)
        databases |= more
        return {(db, name): (db, name) not in reached and db not in databases for db, name in _listed(header)}

    # -- reading the server (on a thread) ---------------------------------------------------------------------

    def _server(self) -> tuple[str, str | None]:
        with _connect(self.upstream) as conn, conn.cursor() as cur:
            cur.execute("SELECT @@log_bin, @@version")
            log_bin, version = cur.fetchone()
            identity = _identity(cur)
            if not int(log_bin):
                return identity, None
            return identity, current_position(cur, "mariadb" in str(version).lower())

    def _tables(self, database: str) -> list[str]:
        with _connect(self.upstream) as conn, conn.cursor() as cur:
            cur.execute("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (database,))
            return [str(row[0]).lower() for row in cur.fetchall()]


def server_identity(upstream: UpstreamConfig) -> str:
    """The server's identity (blocking: run it on a thread): "mysql:<server_uuid>", or on MariaDB, which has none,
    "mariadb:<server_id>:<hostname>:<port>:<datadir>"."""
    with _connect(upstream) as conn, conn.cursor() as cur:
        return _identity(cur)


def _identity(cur: Any) -> str:
    try:
        cur.execute("SELECT @@server_uuid")
        return f"mysql:{cur.fetchone()[0]}"
    except pymysql.MySQLError:  # MariaDB
        cur.execute("SELECT @@server_id, @@hostname, @@port, @@datadir")
        server_id, host, port, datadir = cur.fetchone()
        return f"mariadb:{server_id}:{host}:{port}:{datadir}"


def _connect(upstream: UpstreamConfig) -> Any:
    conn = pymysql.connect(host=upstream.host, port=upstream.port, user=upstream.user or "root",
                           password=upstream.password or "", connect_timeout=int(upstream.connect_timeout) or 1,
                           autocommit=True, **pymysql_ssl(upstream))  # fmt: skip
    check_driver_tls(upstream, conn.server_capabilities)
    return conn


def _listed(header: Header) -> list[TableId]:
    out: list[TableId] = []
    for database, then in header.databases.items():
        tables = then.get("tables") if isinstance(then, dict) else None
        if isinstance(tables, dict):
            out += [(database, str(name)) for name in tables]
    return out
