"""InvalidationBus: invalidations shared between proxies through PostgreSQL's own LISTEN/NOTIFY.

The normal deployment is one proxy per app instance, and each proxy sees only its own app's writes. So every proxy
publishes what its clients' committed writes invalidated, and applies what the others publish. NOTIFY is scoped to
one database, so the bus keeps one control connection (asyncpg, as the upstream URL's user) per database the proxy
serves: it LISTENs on the channel and sends the proxy's own notifications. A proxy receives its own notifications
too; they are recognised by the sending backend's pid, which is this connection's.

Never fail open: a proxy that is not listening cannot know what it misses. Until a database's connection LISTENs,
and from the moment it is lost, the database is reported down (`on_state`): the cache service then neither serves
nor stores its entries, and drops them. Invalidations that could not be published stay queued and go out once
the connection is back.

The same connection also watches for changes made straight on the database that no write notification carries:
GRANT/REVOKE, row-level security and policies, DDL, role memberships and attributes, role and database settings.
Every `catalog_poll` seconds it reads a digest of those catalog rows (their xmin changes with every such change);
when the digest moves, the database's entries are all dropped and its catalog read again.

What is published is deliberately coarse, table names as the cache keys them (a write to any schema's `t`
invalidates every cached `t`), so that it never depends on the reader's catalog. Payloads over NOTIFY's limit
become "everything in this database".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import orjson

from cacheproxy.config import UpstreamConfig
from cacheproxy.upstream import control_connection

log = logging.getLogger("cacheproxy.bus")

# NOTIFY payloads must be shorter than 8000 bytes (docs, NOTIFY); a longer invalidation names no tables.
_MAX_PAYLOAD = 7900
# How often an idle connection is checked (a dead peer is otherwise only noticed when TCP gives up).
_HEARTBEAT = 5.0
_RETRY_MIN, _RETRY_MAX = 0.1, 5.0
_VERSION = 1
# Each NOTIFY is a transaction of its own on the server, and wakes every listening backend of the database (one per
# proxy): under a stream of committed writes, notifications go out at most this often per database, each carrying
# all the invalidations queued meanwhile. Idle, the first one goes at once; busy, another proxy learns of a write at
# most this much later than it would otherwise (its delivery was already asynchronous: a round trip at least).
_MIN_PUBLISH_GAP = 0.005
# A digest of the catalog rows whose change can change what a cached result may be served to, or its shape: each
# row's xmin moves when it is updated (GRANT/REVOKE rewrite relacl/attacl; ALTER TABLE, CREATE POLICY, ALTER ROLE
# ... likewise; so does TRUNCATE, which gives the table a new file). System schemas and temporary tables (sessions
# create them all the time) are left out; pg_roles' columns stand in for pg_authid, which only superusers read.
_RELATION_DIGEST = """
  (SELECT string_agg(c.oid::text || ':' || c.xmin::text, ',' ORDER BY c.oid) FROM pg_class c
    WHERE c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace,
                                 'pg_toast'::regnamespace) AND c.relpersistence <> 't'),
  (SELECT string_agg(a.attrelid::text || '.' || a.attnum::text || ':' || a.xmin::text, ','
          ORDER BY a.attrelid, a.attnum) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    WHERE c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
      AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND c.relpersistence <> 't'),
  (SELECT string_agg(p.oid::text || ':' || p.xmin::text, ',' ORDER BY p.oid) FROM pg_policy p),
  (SELECT string_agg(n.oid::text || ':' || n.xmin::text, ',' ORDER BY n.oid) FROM pg_namespace n
    WHERE n.oid NOT IN (SELECT oid FROM temp_ns)),
  (SELECT string_agg(m.roleid::text || '>' || m.member::text, ',' ORDER BY m.roleid, m.member) FROM pg_auth_members m),
  (SELECT string_agg(r.oid::text || ':' || r.rolsuper::text || r.rolinherit::text || r.rolbypassrls::text, ','
          ORDER BY r.oid) FROM pg_roles r),
  (SELECT string_agg(s.xmin::text, ',' ORDER BY s.setdatabase, s.setrole) FROM pg_db_role_setting s)"""
# Catalogs whose rows decide what a statement computes or whether its caller may run it, with or without a table:
# function bodies, volatility and EXECUTE grants (pg_proc), types, enum labels and their order, domain CHECKs
# (pg_constraint), casts, operators, extensions, triggers and rules (a write's reach), column defaults, languages,
# default privileges, collations, event triggers, text search configurations and foreign servers (not user mappings:
# pg_user_mapping is readable by superusers only, and the proxy may log in as any role).
# pg_catalog's own rows are included: a REVOKE on a built-in function, or an extension's objects, change them too.
# These are big (pg_proc has some 3,300 rows), so each is summed as hashes rather than spelled out: ~0.6 ms for
# pg_proc instead of ~2 ms (a change that left count and sum as they were would need a 32-bit hash collision).
# Rows of temporary objects (a temp table's row type, constraints, triggers) are left out, as above.
_HASHED = (
    ("pg_proc", "pronamespace NOT IN (SELECT oid FROM temp_ns)"),
    ("pg_type", "typnamespace NOT IN (SELECT oid FROM temp_ns)"),
    ("pg_enum", ""),
    ("pg_constraint", "connamespace NOT IN (SELECT oid FROM temp_ns)"),
    ("pg_cast", ""),
    ("pg_operator", ""),
    ("pg_extension", ""),
    ("pg_trigger", "tgrelid NOT IN (SELECT oid FROM temp_rel)"),
    ("pg_rewrite", "ev_class NOT IN (SELECT oid FROM temp_rel)"),
    ("pg_attrdef", "adrelid NOT IN (SELECT oid FROM temp_rel)"),
    ("pg_language", ""),
    ("pg_default_acl", ""),
    ("pg_collation", "collnamespace NOT IN (SELECT oid FROM temp_ns)"),
    ("pg_event_trigger", ""),
    ("pg_ts_config", ""),
    ("pg_foreign_server", ""),
)
_HASHED_SQL = ",\n".join(
    f"  (SELECT count(*)::text || '/' || coalesce(sum(hashint8(oid::int8 * 4294967296 + xmin::text::int8)), 0)::text"
    f" FROM {table}{' WHERE ' + where if where else ''})"
    for table, where in _HASHED
)
CATALOG_DIGEST = f"""
WITH temp_ns AS (
  SELECT oid FROM pg_namespace WHERE nspname LIKE 'pg\\_temp\\_%' OR nspname LIKE 'pg\\_toast\\_temp\\_%'
), temp_rel AS (
  SELECT oid FROM pg_class WHERE relpersistence = 't'
)
SELECT md5(concat_ws('|',{_RELATION_DIGEST},
{_HASHED_SQL}
))
"""


@dataclass(frozen=True, slots=True)
class Invalidation:
    """What one or more committed writes made stale in a database."""

    tables: frozenset[str] = frozenset()
    everything: bool = False
    ddl: bool = False  # the schema changed: read the catalog again
    settings: bool = False  # ALTER ROLE/DATABASE ... SET: sessions opened from now on start with other settings

    def merge(self, other: Invalidation) -> Invalidation:
        everything = self.everything or other.everything
        return Invalidation(
            frozenset() if everything else self.tables | other.tables,
            everything,
            self.ddl or other.ddl,
            self.settings or other.settings,
        )

    def encode(self) -> str:
        """The NOTIFY payload.

        >>> Invalidation(frozenset({"b", "a"})).encode()
        '{"v":1,"t":["a","b"]}'
        >>> Invalidation.decode(Invalidation(everything=True, ddl=True).encode())
        Invalidation(tables=frozenset(), everything=True, ddl=True, settings=False)
        """
        body: dict[str, object] = {"v": _VERSION, "t": sorted(self.tables)}
        if self.everything:
            body = {"v": _VERSION, "all": True}
        if self.ddl:
            body["ddl"] = True
        if self.settings:
            body["set"] = True
        payload = orjson.dumps(body).decode()
        if len(payload.encode()) > _MAX_PAYLOAD:
            return Invalidation(everything=True, ddl=self.ddl, settings=self.settings).encode()
        return payload

    @staticmethod
    def decode(payload: str) -> Invalidation:
        """Read a payload. One that cannot be read (another version, garbage) means "everything": a proxy must not
        keep entries because it failed to understand which ones to drop."""
        try:
            body = orjson.loads(payload)
            tables = body.get("t", [])
            if body.get("v") != _VERSION or not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
                raise ValueError("unknown payload")
            return Invalidation(frozenset(tables), bool(body.get("all")), bool(body.get("ddl")), bool(body.get("set")))
        except (ValueError, AttributeError, orjson.JSONDecodeError):
            log.warning("invalidation bus: unreadable message %r: invalidating the whole database", payload[:200])
            return Invalidation(everything=True)


class InvalidationBus:
    """One LISTEN/NOTIFY connection per watched database; see the module docstring."""

    def __init__(
        self,
        upstream: UpstreamConfig,
        channel: str,
        *,
        on_message: Callable[[str, Invalidation], None],
        on_state: Callable[[str, bool, str], None],
        on_published: Callable[[], None] | None = None,
        catalog_poll: float | None = 1.0,
    ) -> None:
        self._upstream = upstream
        self._channel = channel
        self._on_message = on_message
        self._on_state = on_state
        self._on_published = on_published
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._outbox: dict[str, Invalidation] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._listening: set[str] = set()
        self._catalog_poll = catalog_poll
        self._digests: dict[str, str] = {}  # database -> the catalog digest last read (kept across reconnects)

    def watching(self, database: str) -> bool:
        """A connection to `database` is open or being (re)opened."""
        return database in self._tasks

    def listening(self, database: str) -> bool:
        return database in self._listening

    def watch(self, database: str) -> asyncio.Future[None] | None:
        """Start listening for `database` if not yet; the future to wait on until it listens, or None if it does."""
        if database in self._listening:
            return None
        if database not in self._tasks:
            loop = asyncio.get_running_loop()
            self._ready[database] = loop.create_future()
            self._wake[database] = asyncio.Event()
            self._tasks[database] = loop.create_task(self._run(database), name=f"bus-{database}")
        return self._ready.get(database)

    def publish(self, database: str, invalidation: Invalidation) -> None:
        """Queue `invalidation` for the other proxies; merged with what is still queued (one NOTIFY for both)."""
        queued = self._outbox.get(database)
        self._outbox[database] = invalidation if queued is None else queued.merge(invalidation)
        wake = self._wake.get(database)
        if wake is not None:
            wake.set()

    async def unwatch(self, database: str) -> None:
        """Close `database`'s connection (it has no client sessions, or is being dropped), publishing what is still
        queued for it first, briefly. Its digest is forgotten: a later `watch` starts afresh."""
        task = self._tasks.get(database)
        if task is None:
            return
        if database in self._outbox and database in self._listening:
            self._wake[database].set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    while database in self._outbox and database in self._listening:
                        await asyncio.sleep(0.01)
        if self._tasks.get(database) is not task:
            return  # forgotten (the database was dropped) or watched again meanwhile
        del self._tasks[database]
        self._listening.discard(database)
        self._wake.pop(database, None)
        self._digests.pop(database, None)
        ready = self._ready.pop(database, None)
        if ready is not None and not ready.done():
            ready.set_result(None)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        """Stop every connection. What is still queued is published first, briefly."""
        for database, wake in self._wake.items():
            if database in self._outbox:
                wake.set()
        if self._outbox:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    while self._outbox and any(db in self._listening for db in self._outbox):
                        await asyncio.sleep(0.01)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    # -- one database -----------------------------------------------------------------------------------------

    async def _run(self, database: str) -> None:
        delay = _RETRY_MIN
        logged = False
        while True:
            try:
                await self._connect_and_serve(database)
            except asyncpg.InvalidCatalogNameError:
                # The database was dropped: stop; a session that connects to a new one of that name starts again.
                self._forget(database, "the database does not exist")
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ssl.SSLError) as exc:
                reason = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
                if database in self._listening:  # it was up: log the loss, and retry soon
                    delay, logged = _RETRY_MIN, False
                if not logged:
                    log.warning(
                        "invalidation bus for database %r is down (%s): its cached results are not served until it"
                        " is back", database, reason,
                    )  # fmt: skip
                    logged = True
                self._down(database, reason)
            except Exception:  # a bug must not leave the database served without its feed, nor end the retries
                log.exception("invalidation bus for database %r failed", database)
                self._down(database, "internal error")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    def _down(self, database: str, reason: str) -> None:
        self._listening.discard(database)
        self._on_state(database, False, reason)
        ready = self._ready.get(database)
        if ready is not None and not ready.done():
            ready.set_result(None)  # sessions waiting for it go on, without the cache
            self._ready[database] = asyncio.get_running_loop().create_future()

    async def _connect_and_serve(self, database: str) -> None:
        connection = await control_connection(self._upstream, database, "bus")
        try:
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def closed(_connection: object) -> None:
                if not lost.done():
                    lost.set_result(None)

            own_pid = connection.get_server_pid()

            def received(_connection: object, pid: int, _channel: str, payload: str) -> None:
                if pid != own_pid:
                    self._on_message(database, Invalidation.decode(payload))

            connection.add_termination_listener(closed)
            await connection.add_listener(self._channel, received)
            await self._check_catalog(database, connection)
            # Listening only now, with the database reported up: until then `watch` hands out the future to wait
            # on, so that a session's first query waits for the feed instead of being relayed blind (not stored).
            self._listening.add(database)
            self._on_state(database, True, "listening")
            ready = self._ready.get(database)
            if ready is not None and not ready.done():
                ready.set_result(None)
            await self._serve(database, connection, lost)
        finally:
            if not connection.is_closed():
                connection.terminate()

    async def _serve(self, database: str, connection: asyncpg.Connection, lost: asyncio.Future[None]) -> None:
        """Publish what is queued, check the connection when idle; return (by raising) only when it is lost."""
        wake = self._wake[database]
        period = min(_HEARTBEAT, self._catalog_poll or _HEARTBEAT)
        loop = asyncio.get_running_loop()
        due = loop.time() + period
        last_sent = -_MIN_PUBLISH_GAP
        while True:
            if loop.time() >= due:
                # On a deadline, not only when idle: a steady stream of publishes must not starve the poll.
                await self._check_catalog(database, connection)  # (also tells that the connection is alive)
                due = loop.time() + period
            waiter: asyncio.Future[object] = asyncio.ensure_future(wake.wait())
            watched: set[asyncio.Future[object]] = {waiter, lost}  # type: ignore[arg-type]
            try:
                await asyncio.wait(watched, timeout=max(0.0, due - loop.time()), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if lost.done():
                raise ConnectionResetError("the LISTEN connection was closed")
            if not wake.is_set():
                continue
            gap = last_sent + _MIN_PUBLISH_GAP - loop.time()
            if gap > 0:
                await asyncio.sleep(gap)  # (what is published meanwhile merges into this one)
            wake.clear()
            invalidation = self._outbox.pop(database, None)
            if invalidation is None:
                continue
            try:
                await connection.execute("SELECT pg_notify($1, $2)", self._channel, invalidation.encode())
            except BaseException:
                self.publish(database, invalidation)  # not sent: send it once the connection is back
                raise
            last_sent = loop.time()
            if self._on_published is not None:
                self._on_published()

    async def _check_catalog(self, database: str, connection: asyncpg.Connection) -> None:
        """Read the catalog digest; when it moved since last read, everything of the database may be stale."""
        if not self._catalog_poll:
            await asyncio.wait_for(connection.fetchval("SELECT 1"), _HEARTBEAT)
            return
        digest = await asyncio.wait_for(connection.fetchval(CATALOG_DIGEST), _HEARTBEAT)
        previous = self._digests.get(database)
        self._digests[database] = digest
        if previous is not None and previous != digest:
            log.info("catalog of database %r changed outside the proxy: its cached results are dropped", database)
            self._on_message(database, Invalidation(everything=True, ddl=True, settings=True))

    def _forget(self, database: str, reason: str) -> None:
        self._listening.discard(database)
        self._tasks.pop(database, None)
        self._wake.pop(database, None)
        self._outbox.pop(database, None)
        ready = self._ready.pop(database, None)
        if ready is not None and not ready.done():
            ready.set_result(None)
        self._on_state(database, False, reason)
