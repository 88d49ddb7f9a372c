"""The logical replication listener against the private Postgres (wal_level=logical): writes made straight on
the server become on_commit calls naming exactly the committed transactions' tables; the stream survives its
walsender being killed; stop() leaves no slot behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from cacheproxy.config import UpstreamConfig
from cacheproxy.feeds.replication import ReplicationListener
from cacheproxy.protocol.pgoutput import parse_lsn
from tests.support.pgcluster import PgCluster

WAIT = 60.0  # a bound on waiting for the server, not a speed assertion

Commit = tuple[str, frozenset[tuple[str, str]], int]


class Recorder:
    """Collects the listener's callbacks in queues, in order."""

    def __init__(self) -> None:
        self.commits: asyncio.Queue[Commit] = asyncio.Queue()
        self.states: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()

    def on_commit(self, database: str, tables: frozenset[tuple[str, str]], lsn: int) -> None:
        self.commits.put_nowait((database, tables, lsn))

    def on_state(self, database: str, connected: bool, reason: str) -> None:
        self.states.put_nowait((connected, reason))

    async def state(self) -> tuple[bool, str]:
        return await asyncio.wait_for(self.states.get(), WAIT)

    async def commit(self) -> Commit:
        return await asyncio.wait_for(self.commits.get(), WAIT)


async def until(predicate: Callable[[], object]) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), WAIT)


@pytest.fixture
async def db(pg: PgCluster, dbname: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg.url(dbname=dbname))
    await conn.execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text);"
        "CREATE TABLE b (id int PRIMARY KEY, v text);"
        'CREATE SCHEMA "S";'
        'CREATE TABLE "S"."Odd, Name" (id int PRIMARY KEY)'
    )
    yield conn
    await conn.close()


def listener_for(pg: PgCluster, dbname: str, recorder: Recorder, **kwargs: object) -> ReplicationListener:
    settings: dict[str, object] = {
        "publication": "cacheproxy_pub",
        "slot_prefix": "cacheproxy_test",
        "on_commit": recorder.on_commit,
        "on_state": recorder.on_state,
        "status_interval": 0.2,
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
    }
    settings.update(kwargs)
    return ReplicationListener(UpstreamConfig.from_url(pg.url(sslmode="disable")), dbname, **settings)  # type: ignore[arg-type]


async def slots(conn: asyncpg.Connection, dbname: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT slot_name, temporary, active, active_pid, confirmed_flush_lsn::text AS flushed "
        "FROM pg_replication_slots WHERE database = $1",
        dbname,
    )


async def test_committed_writes_become_on_commit_calls(pg: PgCluster, dbname: str, db: asyncpg.Connection) -> None:
    recorder = Recorder()
    listener = listener_for(pg, dbname, recorder)
    await listener.start()
    try:
        assert await recorder.state() == (True, f"streaming from slot {listener.slot_name}")
        await db.execute("INSERT INTO a VALUES (1, 'x'), (2, 'y')")
        async with db.transaction():
            await db.execute("UPDATE a SET v = 'z' WHERE id = 1")
            await db.execute("INSERT INTO b VALUES (1, 'b')")
        with pytest.raises(RuntimeError):
            async with db.transaction():
                await db.execute('INSERT INTO "S"."Odd, Name" VALUES (1)')
                await db.execute("DELETE FROM b")
                raise RuntimeError("roll back")
        await db.execute("DELETE FROM a WHERE id = 2")
        await db.execute("SELECT 1")  # read-only: no transaction in the stream
        await db.execute("TRUNCATE b")
        await db.execute('INSERT INTO "S"."Odd, Name" VALUES (2)')
        last_lsn = parse_lsn(await db.fetchval("SELECT pg_current_wal_insert_lsn()::text"))

        got = [await recorder.commit() for _ in range(5)]
        assert [tables for _, tables, _ in got] == [
            {("public", "a")},
            {("public", "a"), ("public", "b")},
            {("public", "a")},
            {("public", "b")},
            {("S", "Odd, Name")},
        ]
        assert {database for database, _, _ in got} == {dbname}
        lsns = [lsn for _, _, lsn in got]
        assert lsns == sorted(lsns) and lsns[-1] <= last_lsn

        # The applied position reaches the slot, so it retains no WAL it does not need, and idle keepalives bring
        # the lag to zero.
        await until(lambda: listener.applied_lsn >= lsns[-1] and listener.lag_bytes == 0)
        for _ in range(int(WAIT / 0.05)):
            [slot] = await slots(db, dbname)
            if parse_lsn(slot["flushed"]) >= lsns[-1]:
                break
            await asyncio.sleep(0.05)
        assert slot["temporary"] and slot["active"]
        assert parse_lsn(slot["flushed"]) >= lsns[-1]
        assert recorder.commits.empty()
    finally:
        await listener.stop()


async def test_killed_walsender_reconnects(pg: PgCluster, dbname: str, db: asyncpg.Connection) -> None:
    recorder = Recorder()
    listener = listener_for(pg, dbname, recorder)
    await listener.start()
    try:
        assert (await recorder.state())[0] is True
        first_slot = listener.slot_name
        [slot] = await slots(db, dbname)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", slot["active_pid"])

        connected, reason = await recorder.state()
        assert connected is False
        assert "57P01" in reason
        assert not listener.connected
        assert (await recorder.state())[0] is True
        assert listener.connected
        assert listener.slot_name != first_slot

        # The new stream works, and the old temporary slot went with its walsender.
        await db.execute("INSERT INTO b VALUES (7, 'after')")
        assert (await recorder.commit())[1] == {("public", "b")}
        for _ in range(int(WAIT / 0.05)):
            names = [row["slot_name"] for row in await slots(db, dbname)]
            if names == [listener.slot_name]:
                break
            await asyncio.sleep(0.05)
        assert names == [listener.slot_name]
    finally:
        await listener.stop()


@pytest.mark.parametrize("temporary", [True, False])
async def test_stop_leaves_no_slot(pg: PgCluster, dbname: str, db: asyncpg.Connection, temporary: bool) -> None:
    recorder = Recorder()
    listener = listener_for(pg, dbname, recorder, temporary=temporary)
    await listener.start()
    assert (await recorder.state())[0] is True
    [slot] = await slots(db, dbname)
    assert (slot["slot_name"], slot["temporary"]) == (listener.slot_name, temporary)
    await listener.stop()
    assert await recorder.state() == (False, "stopped")
    assert await slots(db, dbname) == []
    assert listener.slot_name is None


async def test_stop_while_the_server_refuses(pg: PgCluster, dbname: str) -> None:
    # Nothing to connect to: stop() still returns, and the state never went up.
    recorder = Recorder()
    listener = ReplicationListener(
        UpstreamConfig.from_url(pg.url(sslmode="disable")),
        "no_such_database",
        publication="p",
        slot_prefix="s",
        on_commit=recorder.on_commit,
        on_state=recorder.on_state,
        backoff_initial=0.05,
        backoff_max=0.1,
    )
    await listener.start()
    await until(lambda: listener.last_error)
    assert "no_such_database" in listener.last_error
    await listener.stop()
    assert recorder.states.empty()


async def test_publication_not_created_while_a_table_lacks_a_replica_identity(
    pg: PgCluster, dbname: str, db: asyncpg.Connection
) -> None:
    await db.execute("CREATE TABLE nopk (v int); INSERT INTO nopk VALUES (1)")
    recorder = Recorder()
    listener = listener_for(pg, dbname, recorder)
    await listener.start()
    try:
        await until(lambda: listener.last_error)
        assert "public.nopk" in listener.last_error
        assert not listener.connected
        # The application's UPDATE still works, since no publication was created.
        await db.execute("UPDATE nopk SET v = 2")
        assert await db.fetchval("SELECT count(*) FROM pg_publication") == 0

        await db.execute("ALTER TABLE nopk REPLICA IDENTITY FULL")
        assert (await recorder.state())[0] is True
        await db.execute("UPDATE nopk SET v = 3")
        assert (await recorder.commit())[1] == {("public", "nopk")}
        assert await db.fetchval("SELECT puballtables FROM pg_publication WHERE pubname = 'cacheproxy_pub'")
    finally:
        await listener.stop()


async def test_failing_on_commit_takes_the_stream_down(pg: PgCluster, dbname: str, db: asyncpg.Connection) -> None:
    recorder = Recorder()
    calls: list[int] = []

    def on_commit(database: str, tables: frozenset[tuple[str, str]], lsn: int) -> None:
        calls.append(lsn)
        if len(calls) == 1:
            raise RuntimeError("cache unavailable")
        recorder.on_commit(database, tables, lsn)

    listener = listener_for(pg, dbname, recorder, on_commit=on_commit)
    await listener.start()
    try:
        assert (await recorder.state())[0] is True
        await db.execute("INSERT INTO a VALUES (1, 'x')")
        assert await recorder.state() == (False, "cache unavailable")
        assert (await recorder.state())[0] is True
        await db.execute("INSERT INTO b VALUES (1, 'x')")
        assert (await recorder.commit())[1] == {("public", "b")}
    finally:
        await listener.stop()
