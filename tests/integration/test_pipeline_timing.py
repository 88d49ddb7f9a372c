"""When a session's requests arrive relative to the proxy's own start-up for their database (its invalidation feed
coming up) and relative to each other (a pipeline written message group by message group): the results are
PostgreSQL's, and what the cache can answer is answered from it, whatever the timing.

The invalidation feed (bus.py) is up only once its first catalog digest is read. A session's first cacheable
request waits for it (bounded), so that its result is stored: a request that arrived while the digest query was
still running used to go upstream at once, unstored, and the next execution was a second miss.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable

import psycopg
import pytest

from tests.support.cachetest import create_items, new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import FLUSH, SYNC, Message, RawConn, bind, describe_portal, execute, parse

# Read by the feed's catalog digest, and by nothing a client's query, the proxy's catalog load or a connection
# needs: an exclusive lock on it holds the digest query, and only it.
_DIGEST_ONLY_CATALOG = "pg_catalog.pg_default_acl"


@pytest.fixture
def cached(start_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return start_proxy(cache={"default_ttl": "60s"})


def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


def _replied(conn: RawConn) -> bool:
    return bool(select.select([conn.sock], [], [], 0)[0])


def _batch(sql: str, arg: bytes) -> bytes:
    return parse("", sql) + bind(params=(arg,)) + describe_portal() + execute() + SYNC


def _direct(pg: PgCluster, dbname: str, data: bytes) -> list[Message]:
    with RawConn(pg.host, pg.port) as conn:
        conn.startup("postgres", dbname)
        conn.send(data)
        return conn.recv_until("Z")


def test_first_request_waits_for_the_feed_while_it_reads_its_first_catalog_digest(
    pg: PgCluster, dbname: str, cached: ProxyThread
) -> None:
    create_items(pg, dbname)
    marker = new_marker()
    batch = _batch(f"SELECT id AS {marker}, name, price FROM items WHERE id = $1", b"7")
    assert cached.app is not None and cached.app.cache is not None
    service = cached.app.cache
    with (
        psycopg.connect(pg.dsn(dbname=dbname)) as locker,
        psycopg.connect(pg.dsn(dbname=dbname), autocommit=True) as observer,
        RawConn(cached.host, cached.port) as via,
    ):
        locker.execute(f"LOCK TABLE {_DIGEST_ONLY_CATALOG} IN ACCESS EXCLUSIVE MODE")
        via.startup("postgres", dbname)  # the session's start has the proxy load the catalog and start the feed

        def feed_in_digest() -> bool:
            row = observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'cacheproxy-bus'"
                " AND wait_event_type = 'Lock'",
                (dbname,),
            ).fetchone()
            return row is not None and row[0] == 1

        _until(feed_in_digest, "the feed's catalog digest blocked by the lock")
        _until(lambda: service.catalogs.get(dbname) is not None, "the catalog loaded")
        assert dbname in service.blind  # the feed is not up: nothing may be stored yet

        via.send(batch)
        [session] = cached.app.proxy._live
        relay = session._caching
        assert relay is not None
        # Either the proxy relays the batch unstored and the reply comes (the bug), or the session waits for the feed.
        _until(lambda: relay._waiting or _replied(via), "the batch relayed or waiting")
        locker.commit()  # the digest completes: the feed is up
        first = via.recv_until("Z")
        via.send(batch)
        second = via.recv_until("Z")
    want = _direct(pg, dbname, batch)
    assert first == want and second == want
    assert upstream_calls(pg, marker) == 1 + 1  # one miss through the proxy (then stored: a hit), one direct


@pytest.mark.parametrize("per_message", [False, True], ids=["each-bind-describe-execute", "each-message"])
def test_a_pipeline_written_piece_by_piece_gives_postgresql_answers(
    pg: PgCluster, dbname: str, cached: ProxyThread, per_message: bool
) -> None:
    """Six Bind/Describe/Execute of a prepared statement, a Sync and a Flush, written with pauses between pieces
    (so that the proxy likely reads each on its own and finds it is all the client has sent)."""
    create_items(pg, dbname)
    marker = new_marker()
    sql = f"SELECT id AS {marker}, name, price FROM items WHERE id = $1"
    prepare = parse("s1", sql) + SYNC
    one = bind("", "s1", (b"5",)) + describe_portal() + execute() + SYNC
    groups = [[bind("", "s1", (b"5",)), describe_portal(), execute()] for _ in range(6)] + [[SYNC], [FLUSH]]
    # psycopg's pipeline writes one group per execute(); a client may as well write message by message.
    pieces = [m for g in groups for m in g] if per_message else [b"".join(g) for g in groups]
    assert cached.app is not None and cached.app.cache is not None
    service = cached.app.cache

    def run(conn: RawConn) -> list[list[Message]]:
        got = [conn.recv_until("Z")]  # the Parse's
        conn.send(one)
        got.append(conn.recv_until("Z"))
        for piece in pieces:
            conn.send(piece)
            time.sleep(0.02)
        got.append(conn.recv_until("Z"))
        return got

    with RawConn(pg.host, pg.port) as direct:
        direct.startup("postgres", dbname)
        direct.send(prepare)
        want = run(direct)
    with RawConn(cached.host, cached.port) as via:
        via.startup("postgres", dbname)
        _until(lambda: dbname not in service.blind, "the invalidation feed up")
        via.send(prepare)
        got = run(via)
    assert got == want
    if not per_message:  # whole groups: each is answerable from the cache, so the batch is held to its Sync
        assert upstream_calls(pg, marker) == 7 + 1  # directly: 7; through the proxy: the first execution only
