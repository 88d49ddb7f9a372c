"""Snapshots against a real PostgreSQL: a restart keeps the cache warm, never serving what changed while down."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psycopg

from cacheproxy.cache.entry import WHOLE_DATABASE, Entry, base_table
from cacheproxy.snapshot.format import Header, decode_snapshot, encode_snapshot
from tests.support.cachetest import new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config

# psql's backend flushes its statistics before answering (rather than up to ~10 s later, or at exit, after psql
# has returned), so the proxy reads them as of this write.
_FLUSH = "SELECT pg_stat_force_next_flush();"


def _create_hot_cold_brief(pg: PgCluster, dbname: str) -> None:
    pg.psql(
        "CREATE TABLE hot (id int PRIMARY KEY, v text); CREATE TABLE cold (id int PRIMARY KEY, v text);"
        "CREATE TABLE brief (id int PRIMARY KEY, v text);"
        "INSERT INTO hot SELECT g, 'h' || g FROM generate_series(1, 50) g;"
        "INSERT INTO cold SELECT g, 'c' || g FROM generate_series(1, 50) g;"
        "INSERT INTO brief SELECT g, 'b' || g FROM generate_series(1, 50) g;"
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;" + _FLUSH,
        dbname=dbname,
    )


def _state(proxy: ProxyThread) -> dict[Any, tuple[bytes, frozenset[tuple[str, str]], str, str | None, float]]:
    assert proxy.app is not None and proxy.app.cache is not None
    return {e.key: (e.value, e.tables, e.query, e.rule, e.expires_at) for e in proxy.app.cache.engine.entries()}


def _read_all(pg: PgCluster, dbname: str, port: int, queries: list[str]) -> list[list[Any]]:
    with psycopg.connect(pg.dsn(dbname=dbname, port=port), autocommit=True) as conn:
        rows = [conn.execute(q).fetchall() for q in queries]
        rows += [conn.execute(q.replace("WHERE id", "WHERE %s = 1 AND id"), (1,)).fetchall() for q in queries]
    return rows


def _proxy(pg: PgCluster, path: Path, **sections: Any) -> ProxyThread:
    """A proxy (use it in `with`, which stops it gracefully, writing the snapshot) with snapshots at `path`."""
    config = proxy_config(pg.url(dbname="postgres"), snapshot={"path": str(path)}, cache={"default_ttl": "120s"})
    return ProxyThread.from_mapping({**config, **sections})


def test_round_trip_every_entry_identical_and_served_without_upstream(
    pg: PgCluster, dbname: str, tmp_path: Path
) -> None:
    _create_hot_cold_brief(pg, dbname)
    path = tmp_path / "cache.snap"
    marker = new_marker()
    queries = [f"SELECT id AS {marker}, v FROM hot WHERE id <= {n} ORDER BY id" for n in range(1, 30)]
    with _proxy(pg, path) as first:
        want = _read_all(pg, dbname, first.port, queries)  # simple and extended protocol entries
        before = _state(first)
    assert len(before) >= 2 * len(queries)
    assert path.exists()  # written by the graceful stop
    calls = upstream_calls(pg, marker)

    with _proxy(pg, path) as second:
        after = _state(second)
        assert after.keys() == before.keys()
        for key, (value, tables, query, rule, expires_at) in before.items():
            assert after[key][:4] == (value, tables, query, rule)
            assert abs(after[key][4] - expires_at) < 0.01  # same process: one monotonic clock
        assert _read_all(pg, dbname, second.port, queries) == want
    assert upstream_calls(pg, marker) == calls  # every read a hit


def test_expired_and_changed_tables_are_not_served_after_a_restart(pg: PgCluster, dbname: str, tmp_path: Path) -> None:
    _create_hot_cold_brief(pg, dbname)
    path = tmp_path / "cache.snap"
    marker = new_marker()
    queries = {t: f"SELECT id AS {marker}{t}, v FROM {t} WHERE id = 7" for t in ("hot", "cold", "brief")}
    rules = [{"tables": ["brief"], "ttl": "2s"}]
    with (
        _proxy(pg, path, rules=rules) as first,
        psycopg.connect(pg.dsn(dbname=dbname, port=first.port), autocommit=True) as conn,
    ):
        for sql in queries.values():
            conn.execute(sql).fetchall()
    pg.psql("UPDATE hot SET v = 'changed while down' WHERE id = 7;" + _FLUSH, dbname=dbname)
    time.sleep(2.2)  # brief's entry expires
    calls = {t: upstream_calls(pg, marker + t) for t in queries}

    with _proxy(pg, path, rules=rules) as second:
        # (point reads also depend on their row: "cold\x007", which belongs to cold; every entry on its database)
        tables = {base_table(table[1]) for value in _state(second).values() for table in value[1]}
        assert tables - {base_table(WHOLE_DATABASE)} == {"cold"}
        with psycopg.connect(pg.dsn(dbname=dbname, port=second.port), autocommit=True) as conn:
            assert conn.execute(queries["hot"]).fetchall() == [(7, "changed while down")]
            assert conn.execute(queries["cold"]).fetchall() == [(7, "c7")]
            assert conn.execute(queries["brief"]).fetchall() == [(7, "b7")]
    assert upstream_calls(pg, marker + "hot") == calls["hot"] + 1
    assert upstream_calls(pg, marker + "cold") == calls["cold"]  # served from the snapshot
    assert upstream_calls(pg, marker + "brief") == calls["brief"] + 1


def test_truncate_while_down_drops_the_table(pg: PgCluster, dbname: str, tmp_path: Path) -> None:
    _create_hot_cold_brief(pg, dbname)
    path = tmp_path / "cache.snap"
    with (
        _proxy(pg, path) as first,
        psycopg.connect(pg.dsn(dbname=dbname, port=first.port), autocommit=True) as conn,
    ):
        assert conn.execute("SELECT count(*) FROM cold").fetchone() == (50,)
    pg.psql("TRUNCATE cold;" + _FLUSH, dbname=dbname)
    with (
        _proxy(pg, path) as second,
        psycopg.connect(pg.dsn(dbname=dbname, port=second.port), autocommit=True) as conn,
    ):
        assert conn.execute("SELECT count(*) FROM cold").fetchone() == (0,)


def test_a_snapshot_of_another_cluster_is_refused_and_kept_aside(pg: PgCluster, dbname: str, tmp_path: Path) -> None:
    _create_hot_cold_brief(pg, dbname)
    path = tmp_path / "cache.snap"
    with _proxy(pg, path) as first:
        _read_all(pg, dbname, first.port, ["SELECT v FROM cold WHERE id = 1"])
    header, records, _ = decode_snapshot(path.read_bytes())
    assert records
    foreign = Header(**{**_fields(header), "system_identifier": "1234567890"})
    entries = [
        Entry(r.key, r.value, tables=r.tables, created_at=0.0, expires_at=r.expires_at, query=r.query, rule=r.rule)
        for r in records
    ]
    path.write_bytes(encode_snapshot(foreign, entries, 0.0))
    with _proxy(pg, path) as second:
        assert _state(second) == {}
        assert not path.exists()
        assert [p for p in os.listdir(tmp_path) if p.startswith("cache.snap.bad-")]


def test_admin_snapshot_command_writes_a_snapshot(pg: PgCluster, dbname: str, tmp_path: Path) -> None:
    _create_hot_cold_brief(pg, dbname)
    path = tmp_path / "cache.snap"
    with _proxy(pg, path, admin={"listen": None, "users": ["postgres"]}) as proxy:
        with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
            conn.execute("SELECT v FROM cold WHERE id = 1").fetchall()
            cursor = conn.execute("CACHEPROXY SNAPSHOT")
            assert cursor.statusmessage == "SNAPSHOT started"
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        _, records, _ = decode_snapshot(path.read_bytes())
        assert len(records) == 1
        # The file is renamed into place before the writer returns and records its metrics: poll for them too.
        written = b"cacheproxy_snapshot_entries_written_total 1.0"
        body, _ = proxy.app.metrics.render()  # type: ignore[union-attr]
        while written not in body and time.monotonic() < deadline:
            time.sleep(0.05)
            body, _ = proxy.app.metrics.render()  # type: ignore[union-attr]
        assert written in body


def test_periodic_snapshots(pg: PgCluster, dbname: str, tmp_path: Path) -> None:
    _create_hot_cold_brief(pg, dbname)
    path = tmp_path / "cache.snap"
    with _proxy(pg, path, snapshot={"path": str(path), "interval": "200ms"}) as proxy:
        _read_all(pg, dbname, proxy.port, ["SELECT v FROM cold WHERE id = 2"])
        deadline = time.monotonic() + 10
        records: list[Any] = []
        while len(records) < 2 and time.monotonic() < deadline:  # the simple and the extended protocol's entry
            time.sleep(0.1)
            if path.exists():
                records = decode_snapshot(path.read_bytes())[1]
        assert len(records) >= 2


def _fields(header: Header) -> dict[str, Any]:
    return {name: getattr(header, name) for name in Header.__dataclass_fields__}
