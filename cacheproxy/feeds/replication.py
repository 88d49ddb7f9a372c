"""Follows one database's logical replication stream and reports the tables each committed transaction changed.

This is how writes that bypass every proxy (migrations, cron jobs, other services, trigger side effects) reach
the cache: `ReplicationListener` calls ``on_commit(database, tables, lsn)`` for every committed transaction that
changed a published table. It knows nothing of the cache; the cache service wires it in.

What the upstream must provide:

- ``wal_level = logical`` (a server restart), and ``max_replication_slots`` / ``max_wal_senders`` with room for one
  slot and one walsender per proxy instance per database followed.
- The upstream URL's user needs the REPLICATION attribute (or superuser): ``ALTER ROLE app REPLICATION``; and
  pg_hba.conf must let it connect to the database (a logical replication connection matches the database name,
  not the ``replication`` keyword). Dropping a slot on stop needs the same attribute.
- A publication ``FOR ALL TABLES`` (name from config). It is created when missing, which needs a superuser; or a
  DBA creates it once: ``CREATE PUBLICATION cacheproxy FOR ALL TABLES``. Beware: while a publication that
  publishes UPDATE and DELETE includes a table, PostgreSQL refuses UPDATE and DELETE on that table unless it has a
  replica identity (a primary key, ``REPLICA IDENTITY USING INDEX`` or ``FULL``). This affects every application
  on the database, so the listener will not create the publication while such tables exist: it reports them (the
  stream stays down, so nothing of the database is served from cache) until they are fixed or the publication is
  created by hand. Tables created later without a primary key are the operator's responsibility.
- Not seen by the stream: DDL, REFRESH MATERIALIZED VIEW, unlogged and temporary tables, large objects.

The slot's lifecycle. The slot is TEMPORARY by default: PostgreSQL drops it when the replication connection ends,
however it ends (stop, crash, network loss, pg_terminate_backend), so a proxy that dies can never leave a slot
that retains WAL without bound. The price: changes committed while the stream is down are not replayed, since the
next connection creates a new slot at the current WAL position. The listener reports that gap through
``on_state(database, False, reason)``; the cache must stop serving the database's entries until
``on_state(database, True, ...)`` and then drop them all, since it cannot know what it missed. A permanent slot
(``temporary=False``) replays the gap instead, but a proxy that dies without `stop()` leaves it behind, retaining
WAL until someone drops it (or ``max_slot_wal_keep_size`` invalidates it); `stop()` drops it.
While streaming, the applied position is acknowledged after each transaction's ``on_commit`` returned, and idle
keepalives are acknowledged too, so the slot holds back no WAL it does not need.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable

import asyncpg

from cacheproxy.config import UpstreamConfig
from cacheproxy.errors import DUPLICATE_OBJECT, UpstreamError
from cacheproxy.feeds.raw_client import COPY_DATA, COPY_DONE, RawConnection, connect_raw
from cacheproxy.protocol.framing import encode, split_messages
from cacheproxy.protocol.messages import ERROR_RESPONSE, decode_error_fields
from cacheproxy.protocol.pgoutput import (
    CommittedTransaction,
    Keepalive,
    PgOutputDecoder,
    format_lsn,
    standby_status_update,
)
from cacheproxy.upstream import control_connection

log = logging.getLogger("cacheproxy.replication")

OnCommit = Callable[[str, frozenset[tuple[str, str]], int], Awaitable[None] | None]
OnState = Callable[[str, bool, str], None]

_MAX_SLOT_NAME = 63  # NAMEDATALEN - 1
_STOP_TIMEOUT = 10.0
# Creating a logical slot waits for every transaction running when it started to end, prepared ones included (a
# prepared transaction left behind blocks it for good): after this long, say why the database is not served.
SLOT_STALL = 5.0
_PREPARED = "SELECT count(*), min(prepared)::text FROM pg_prepared_xacts"

# Ordinary permanent tables whose UPDATE/DELETE a FOR ALL TABLES publication would make fail (no replica identity).
_NO_REPLICA_IDENTITY = """
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence = 'p'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'
  AND (c.relreplident = 'n'
       OR (c.relreplident = 'd' AND NOT EXISTS (
             SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
ORDER BY 1 LIMIT 20
"""


class ReplicationSetupError(Exception):
    """The database is not ready for the stream (publication, privileges); the message says what to fix."""


def slot_name(prefix: str, instance_id: str, database: str) -> str:
    """A slot name for this proxy instance and database: slot names are cluster-wide and allow only [a-z0-9_].

    >>> slot_name("cacheproxy", "a1b2c3", "shop")
    'cacheproxy_a1b2c3_c67504ea'
    """
    digest = hashlib.blake2b(database.encode(), digest_size=4).hexdigest()
    suffix = f"_{_sanitize(instance_id)}_{digest}"
    return _sanitize(prefix)[: _MAX_SLOT_NAME - len(suffix)] + suffix


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", text.lower())


class ReplicationListener:
    """The logical replication stream of one database, kept up with reconnects and backoff.

    `connected` says whether the stream is up; `lag_bytes` is the server's WAL end minus the applied position (from
    the stream's keepalives); `last_error` is why it last went down. Callbacks: ``on_commit`` (sync or async; the
    position is acknowledged after it returns, and if it raises the stream is restarted) and ``on_state``, called
    on every up/down transition (the stream starts down).
    """

    def __init__(
        self,
        cfg: UpstreamConfig,
        database: str,
        *,
        publication: str,
        slot_prefix: str,
        on_commit: OnCommit,
        on_state: OnState | None = None,
        instance_id: str | None = None,
        temporary: bool = True,
        status_interval: float = 10.0,
        receive_timeout: float | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.cfg = cfg
        self.database = database
        self.publication = publication
        self.temporary = temporary
        self.instance_id = instance_id or secrets.token_hex(4)
        self._slot_base = slot_name(slot_prefix, self.instance_id, database)
        self._on_commit = on_commit
        self._on_state = on_state
        self._status_interval = status_interval
        # The server answers each status update at once (they ask for a reply): silence this long means it is gone.
        self._receive_timeout = receive_timeout if receive_timeout is not None else max(3 * status_interval, 30.0)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self.connected = False
        self.last_error = ""
        self.stalled: str | None = None  # why creating the slot is taking long (see SLOT_STALL), while it does
        self.slot_name: str | None = None
        self.applied_lsn = 0
        self._server_wal_end = 0
        self._attempt = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: RawConnection | None = None
        self._streaming = False
        self._stopping = False
        self._last_received = 0.0
        self._abort_reason: str | None = None

    @property
    def lag_bytes(self) -> int:
        return max(0, self._server_wal_end - self.applied_lsn)

    # -- lifetime -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start following the stream in the background (returns at once; `on_state` tells when it is up)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"replication-{self.database}")

    async def stop(self) -> None:
        """End the stream and drop the slot (temporary or not), so that nothing is left on the server."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        conn = self._conn
        if conn is not None and self._streaming and not conn.closed:
            # CopyDone ends the stream cleanly; the run loop then drops the slot on the same connection.
            with contextlib.suppress(OSError, RuntimeError):
                conn.writer.write(encode(b"c"))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=_STOP_TIMEOUT)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self.slot_name is not None:
            await self._drop_slot_fallback(self.slot_name)
        self._set_state(False, "stopped")

    # -- the reconnect loop -----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._backoff_initial
        while not self._stopping:
            try:
                await self._stream_once()
                reason = "the server ended the replication stream"
            # The loop must outlive any failure (server, network, privileges, a bad message, a failing on_commit):
            # each is a reason for the stream to be down, reported and retried.
            except Exception as exc:
                reason = self._abort_reason or _describe(exc)
            self._abort_reason = None
            if self._stopping:
                return
            was_up = self.connected
            self.last_error = reason
            self._set_state(False, reason)
            if not was_up:
                log.warning("replication stream of database %r not started: %s", self.database, reason)
            backoff = self._backoff_initial if was_up else min(backoff * 2, self._backoff_max)
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))

    async def _stream_once(self) -> None:
        await self._ensure_publication()
        conn = await connect_raw(self.cfg, self.database, purpose="replication", replication=True)
        self._conn = conn
        try:
            slot = await self._create_slot(conn)
            decoder = PgOutputDecoder()
            await conn.start_copy_both(_query(self._start_command(slot)))
            self._streaming = True
            self._last_received = time.monotonic()
            self._set_state(True, f"streaming from slot {slot}")
            feedback = asyncio.create_task(self._feedback_loop(conn))
            try:
                await self._consume(conn, decoder)
            finally:
                self._streaming = False
                feedback.cancel()
            await self._finish_stream(conn, slot)
        finally:
            self._conn = None
            conn.close()
            await conn.wait_closed()

    # -- setup --------------------------------------------------------------------------------------------------------

    async def _ensure_publication(self) -> None:
        control = await control_connection(self.cfg, self.database, "replication-setup")
        try:
            row = await control.fetchrow(
                "SELECT puballtables, pubupdate AND pubdelete AND pubinsert AND pubtruncate AS everything "
                "FROM pg_publication WHERE pubname = $1",
                self.publication,
            )
            if row is not None:
                if not (row["puballtables"] and row["everything"]):
                    log.warning(
                        "publication %r of database %r is not FOR ALL TABLES publishing every change: writes it "
                        "does not publish are not invalidated",
                        self.publication,
                        self.database,
                    )
                return
            blocking = [name for (name,) in await control.fetch(_NO_REPLICA_IDENTITY)]
            if blocking:
                raise ReplicationSetupError(
                    f"not creating publication {self.publication!r}: UPDATE and DELETE would then fail on tables "
                    f"without a replica identity: {', '.join(blocking)} (add primary keys or REPLICA IDENTITY FULL, "
                    "or create the publication yourself)"
                )
            with contextlib.suppress(asyncpg.DuplicateObjectError):  # another proxy created it meanwhile
                await control.execute(f"CREATE PUBLICATION {_quote_ident(self.publication)} FOR ALL TABLES")
            log.info("created publication %r FOR ALL TABLES in database %r", self.publication, self.database)
        finally:
            await control.close()

    async def _create_slot(self, conn: RawConnection) -> str:
        if self.temporary:
            # A new name per connection: the previous temporary slot may outlive our side of a dead connection
            # until its walsender notices.
            self._attempt += 1
            slot = f"{self._slot_base[: _MAX_SLOT_NAME - 8]}_{self._attempt}"
            command = f'CREATE_REPLICATION_SLOT "{slot}" TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT'
        else:
            slot = self._slot_base
            command = f'CREATE_REPLICATION_SLOT "{slot}" LOGICAL pgoutput NOEXPORT_SNAPSHOT'
        request = asyncio.ensure_future(conn.request(_query(command)))
        try:
            done, _ = await asyncio.wait({request}, timeout=SLOT_STALL)
            if not done:
                await self._report_stall(slot)
            reply = await request
        finally:
            request.cancel()
            self.stalled = None
        error = _error_of(reply)
        if error is not None and not (error.get("C") == DUPLICATE_OBJECT and not self.temporary):
            raise UpstreamError(
                f"could not create replication slot {slot!r}: {error.get('M', '')}", sqlstate=error.get("C", "")
            )
        self.slot_name = slot
        log.info("replication slot %r ready in database %r (temporary: %s)", slot, self.database, self.temporary)
        return slot

    async def _report_stall(self, slot: str) -> None:
        """Creating the slot waits on running transactions: log why (prepared ones never end by themselves) and show
        it in the feed's state (hence /readyz and the blind database's reason)."""
        try:
            control = await control_connection(self.cfg, self.database, "replication-setup")
            try:
                count, oldest = await control.fetchrow(_PREPARED)
            finally:
                await control.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            count, oldest = None, None
        why = f"creating replication slot {slot!r} has waited over {SLOT_STALL:g}s for running transactions to end"
        if count:
            why += (f"; {count} prepared transaction(s) in the cluster (pg_prepared_xacts, oldest prepared {oldest})"
                    " block it until COMMIT PREPARED or ROLLBACK PREPARED")  # fmt: skip
        self.stalled = why
        log.warning("database %r is not served: %s", self.database, why)
        if self._on_state is not None:
            self._on_state(self.database, False, why)

    def _start_command(self, slot: str) -> str:
        publications = _quote_ident(self.publication).replace("'", "''")
        return f"START_REPLICATION SLOT \"{slot}\" LOGICAL 0/0 (proto_version '1', publication_names '{publications}')"

    # -- streaming ----------------------------------------------------------------------------------------------------

    async def _consume(self, conn: RawConnection, decoder: PgOutputDecoder) -> None:
        """Apply the stream until the server's CopyDone."""
        while True:
            msg_type, body = await conn.next_message()
            self._last_received = time.monotonic()
            if msg_type == COPY_DATA:
                for event in decoder.feed(body):
                    if isinstance(event, CommittedTransaction):
                        await self._apply(event)
                    else:
                        await self._on_keepalive(conn, event, decoder.in_transaction)
                self._server_wal_end = max(self._server_wal_end, decoder.wal_end)
            elif msg_type == COPY_DONE:
                return
            elif msg_type == ERROR_RESPONSE:
                fields = decode_error_fields(body)
                raise UpstreamError(fields.get("M", "replication error"), sqlstate=fields.get("C", ""))
            # NoticeResponse and ParameterStatus need nothing.

    async def _apply(self, txn: CommittedTransaction) -> None:
        if txn.tables:
            result = self._on_commit(self.database, txn.tables, txn.end_lsn)
            if inspect.isawaitable(result):
                await result
        self.applied_lsn = max(self.applied_lsn, txn.end_lsn)

    async def _on_keepalive(self, conn: RawConnection, keepalive: Keepalive, in_transaction: bool) -> None:
        if not in_transaction:
            # Everything before the server's sent position has been decoded and applied: acknowledging it lets the
            # slot release WAL written by other databases or by tables outside the publication.
            self.applied_lsn = max(self.applied_lsn, keepalive.wal_end)
        if keepalive.reply_requested:
            await self._send_status(conn)

    async def _feedback_loop(self, conn: RawConnection) -> None:
        """Acknowledge the applied position regularly, and detect a server that went silent."""
        while True:
            await asyncio.sleep(self._status_interval)
            silent = time.monotonic() - self._last_received
            if silent > self._receive_timeout:
                self._abort(conn, f"no message from the server for {silent:.0f}s")
                return
            try:
                await self._send_status(conn, reply_requested=True)
            except UpstreamError as exc:
                self._abort(conn, f"could not send a status update: {exc.message}")
                return

    def _abort(self, conn: RawConnection, reason: str) -> None:
        # Closing the connection makes the reader fail; the reconnect loop reports this reason rather than EOF.
        self._abort_reason = reason
        conn.close()

    async def _send_status(self, conn: RawConnection, *, reply_requested: bool = False) -> None:
        await conn.send_copy_data(standby_status_update(self.applied_lsn, time.time(), reply_requested=reply_requested))

    async def _finish_stream(self, conn: RawConnection, slot: str) -> None:
        """After the server's CopyDone: answer it if the server ended the stream, wait for ReadyForQuery, and when
        stopping, drop the slot on this same connection (the slot is released once streaming ends)."""
        if not self._stopping:
            conn.writer.write(encode(b"c"))
        while True:
            msg_type, body = await conn.next_message()
            if msg_type == ERROR_RESPONSE:
                fields = decode_error_fields(body)
                raise UpstreamError(fields.get("M", "replication error"), sqlstate=fields.get("C", ""))
            if msg_type == ord("Z"):
                break
        if self._stopping:
            error = _error_of(await conn.request(_query(f'DROP_REPLICATION_SLOT "{slot}"')))
            if error is not None:
                raise UpstreamError(f"could not drop replication slot {slot!r}: {error.get('M', '')}")
            log.info("dropped replication slot %r of database %r", slot, self.database)
            self.slot_name = None

    async def _drop_slot_fallback(self, slot: str) -> None:
        """When the clean path failed: drop the slot once its walsender is gone (a temporary slot goes by itself,
        but waiting for that keeps `stop()`'s promise). Best effort, bounded."""
        deadline = time.monotonic() + _STOP_TIMEOUT
        try:
            control = await control_connection(self.cfg, self.database, "replication-setup")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("replication slot %r may remain: cannot connect to drop it: %s", slot, exc)
            return
        try:
            while time.monotonic() < deadline:
                active = await control.fetchval("SELECT active FROM pg_replication_slots WHERE slot_name = $1", slot)
                if active is None:
                    self.slot_name = None
                    return
                if not active:
                    with contextlib.suppress(asyncpg.UndefinedObjectError, asyncpg.ObjectInUseError):
                        await control.execute("SELECT pg_drop_replication_slot($1)", slot)
                    continue
                await asyncio.sleep(0.05)
            log.warning("replication slot %r is still in use after %.0fs; not dropped", slot, _STOP_TIMEOUT)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("replication slot %r may remain: %s", slot, exc)
        finally:
            await control.close()

    def _set_state(self, connected: bool, reason: str) -> None:
        """The one place the up/down state changes: logged, and reported to `on_state`."""
        if connected == self.connected:
            return
        self.connected = connected
        log.log(
            logging.INFO if connected else logging.WARNING,
            "replication stream of database %r %s: %s (applied %s)",
            self.database,
            "up" if connected else "down",
            reason,
            format_lsn(self.applied_lsn),
        )
        if self._on_state is not None:
            try:
                self._on_state(self.database, connected, reason)
            except Exception:
                log.exception("replication on_state callback failed")


def _query(sql: str) -> bytes:
    return encode(b"Q", sql.encode() + b"\x00")


def _error_of(reply: bytes) -> dict[str, str] | None:
    for msg_type, body in split_messages(reply):
        if msg_type == ERROR_RESPONSE:
            return decode_error_fields(body)
    return None


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UpstreamError):
        return f"{exc.message} ({exc.sqlstate})" if exc.sqlstate else exc.message
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc) or type(exc).__name__
    return f"{text} ({sqlstate})" if sqlstate else text
