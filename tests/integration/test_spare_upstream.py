"""Spare upstream connections (proxy/spare_upstream.py): a session logs in on a connection opened ahead of it, in
both auth modes; a spare that died or hangs while it waited is replaced without the client noticing; a spare is not
used past its age or after the upstream address changed; `limits.spare_upstream_connections: 0` opens none."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from cacheproxy.config import build_config
from cacheproxy.proxy.spare_upstream import MAX_AGE, REPLENISH_DELAY, SpareUpstream
from cacheproxy.upstream import choose_address
from tests.support.faulty import FaultyLink
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config

Start = Callable[..., ProxyThread]


@pytest.fixture
def faulty(pg: PgCluster) -> Iterator[FaultyLink]:
    link = FaultyLink(pg.host, pg.port).start()
    yield link
    link.stop()


def _spares(proxy: ProxyThread) -> SpareUpstream:
    assert proxy.app is not None
    spares: SpareUpstream = proxy.app.proxy.spares  # type: ignore[union-attr]
    return spares


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _opened(spares: SpareUpstream, count: int) -> Callable[[], bool]:
    return lambda: spares.opened == count


async def _spares_opened(spares: SpareUpstream, count: int) -> None:
    """(On the loop that opens them: `_wait_for` polls from another thread.)"""
    deadline = time.monotonic() + 10
    while spares.opened < count:
        assert time.monotonic() < deadline, "no spare opened"
        await asyncio.sleep(0.005)


def _login(pg: PgCluster, proxy: ProxyThread, dbname: str) -> tuple[object, ...] | None:
    user, password = pg.SCRAM_USER, pg.SCRAM_PASSWORD
    with psycopg.connect(pg.dsn(user=user, password=password, dbname=dbname, port=proxy.port)) as conn:
        return conn.execute("SELECT current_user, current_database(), 41 + 1").fetchone()


def _auth_file(pg: PgCluster, tmp_path: Path) -> str:
    """A userlist with the SCRAM role's stored verifier: terminate mode then needs no auth.query connection (which
    the faulty link would cut or stall too)."""
    verifier = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{pg.SCRAM_USER}'").strip()
    path = tmp_path / "userlist.txt"
    path.write_text(f'"{pg.SCRAM_USER}" "{verifier}"\n')
    return str(path)


@pytest.mark.parametrize("mode", ["relay", "terminate"])
def test_the_next_session_logs_in_on_a_spare(
    pg: PgCluster, start_proxy: Start, dbname: str, mode: str, tmp_path: Path
) -> None:
    auth = {"mode": mode, "file": _auth_file(pg, tmp_path) if mode == "terminate" else None}
    proxy = start_proxy(auth=auth, cache={"enabled": False})
    spares = _spares(proxy)
    assert _login(pg, proxy, dbname) == (pg.SCRAM_USER, dbname, 42)
    _wait_for(lambda: spares.opened == 1, "a spare")
    for round_no in range(1, 4):
        assert _login(pg, proxy, dbname) == (pg.SCRAM_USER, dbname, 42)
        assert spares.taken == round_no
        _wait_for(_opened(spares, round_no + 1), "the next spare")
    # A login the server refuses still reaches the client as the server's own error.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(user=pg.SCRAM_USER, password="wrong", dbname=dbname, port=proxy.port)).close()


def test_no_spares_when_turned_off(pg: PgCluster, start_proxy: Start, dbname: str) -> None:
    proxy = start_proxy(limits={"spare_upstream_connections": 0}, cache={"enabled": False})
    for _ in range(3):
        assert _login(pg, proxy, dbname) == (pg.SCRAM_USER, dbname, 42)
    time.sleep(0.2)
    assert (_spares(proxy).opened, _spares(proxy).taken) == (0, 0)


@pytest.mark.parametrize("fault", ["cut", "stall"])
@pytest.mark.parametrize("mode", ["relay", "terminate"])
def test_a_dead_spare_is_replaced_before_the_client_notices(
    pg: PgCluster, faulty: FaultyLink, start_proxy: Start, dbname: str, mode: str, fault: str, tmp_path: Path
) -> None:
    """The spare's connection is reset (a server that closed it: authentication_timeout, a restart) or its route
    hangs (no bytes, no close) while it waits: the next login still succeeds, on a new connection."""
    auth = {"mode": mode, "file": _auth_file(pg, tmp_path) if mode == "terminate" else None}
    proxy = start_proxy(upstream=pg.url(port=faulty.port), auth=auth, cache={"enabled": False}, failover={"wait": 0})
    spares = _spares(proxy)
    assert _login(pg, proxy, dbname) == (pg.SCRAM_USER, dbname, 42)
    _wait_for(lambda: spares.opened == 1, "a spare")
    if fault == "cut":
        faulty.cut_all()
    else:
        faulty.stall_all()
    assert _login(pg, proxy, dbname) == (pg.SCRAM_USER, dbname, 42)
    if fault == "stall":
        assert spares.taken == 1  # (a reset spare may be seen dead before it is taken; a hung one cannot)
    assert _login(pg, proxy, dbname) == (pg.SCRAM_USER, dbname, 42)


async def test_a_spare_is_not_used_when_too_old_or_for_another_address(pg: PgCluster, faulty: FaultyLink) -> None:
    config = build_config(proxy_config(pg.url()), source="<test>")
    now = [0.0]
    spares = SpareUpstream(lambda: config, clock=lambda: now[0])

    async def connect() -> bool:
        _, writer, spare = await spares.connect()
        writer.close()
        return spare

    try:
        assert not await connect()  # the first connection: nothing was opened ahead yet
        await _spares_opened(spares, 1)
        assert await connect()
        await _spares_opened(spares, 2)
        now[0] += MAX_AGE  # (its expiry timer runs on the loop's own clock: the age check at take time suffices)
        assert not await connect()
        await _spares_opened(spares, 3)
        choose_address(config.upstream, (pg.host, faulty.port))  # a failover chose another server
        try:
            assert not await connect()
        finally:
            choose_address(config.upstream, (config.upstream.host, config.upstream.port))
    finally:
        await spares.close()
    assert spares.taken == 1


async def test_the_replacement_of_a_taken_spare_is_opened_once(pg: PgCluster) -> None:
    """A taken spare's replacement is opened after REPLENISH_DELAY (not during the taker's login); a client that comes
    sooner finds none, opens its own connection and starts the replacement then, which the timer does not repeat."""
    config = build_config(proxy_config(pg.url()), source="<test>")
    spares = SpareUpstream(lambda: config)
    writers: list[asyncio.StreamWriter] = []

    async def connect() -> bool:
        _, writer, spare = await spares.connect()
        writers.append(writer)
        return spare

    try:
        assert not await connect()
        await _spares_opened(spares, 1)
        assert await connect()  # takes it: the replacement is due later, not started during this login
        assert spares.opening == 0
        assert not await connect()  # before the timer: its own connection, and the replacement starts now
        assert spares.opening == 1
        await _spares_opened(spares, 2)
        await asyncio.sleep(REPLENISH_DELAY * 5)
        assert (spares.opened, spares.opening) == (2, 0)  # one replacement, not one more when the timer was due
        assert await connect()
        assert spares.opening == 0
        await _spares_opened(spares, 3)  # a spare taken with no client after it: the timer opens its replacement
    finally:
        for writer in writers:
            writer.close()
        await spares.close()
    assert spares.taken == 2
