"""Reads that run code the SQL does not show as a call, time read from text, and ORM conditions (issue 14, items 2,
3 and 12), through the proxy and compared with PostgreSQL's own answer.

Each case would have been answered wrongly before: a cached result where PostgreSQL runs a function again (attribute
notation, a user operator, cast or aggregate, text cast to a time), or a stale read after a read that wrote (a view
calling a writing function, a SELECT the analyzer cannot parse).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config

_WARM_ATTEMPTS = 40


@pytest.fixture(scope="module")
def cached(pg: PgCluster) -> Iterator[ProxyThread]:
    with ProxyThread.from_mapping(proxy_config(pg.url(dbname="postgres"), cache={"default_ttl": "60s"})) as running:
        yield running


class Harness:
    def __init__(self, pg: PgCluster, dbname: str, proxy: ProxyThread) -> None:
        self.pg, self.dbname, self.proxy = pg, dbname, proxy
        self._open: list[psycopg.Connection[tuple[Any, ...]]] = []

    def connect(self, *, direct: bool = False) -> psycopg.Connection[tuple[Any, ...]]:
        port = None if direct else self.proxy.port
        dsn = self.pg.dsn(user=self.pg.SUPERUSER, dbname=self.dbname, **({"port": port} if port else {}))
        conn = psycopg.connect(dsn, autocommit=True)
        self._open.append(conn)
        return conn

    def close(self) -> None:
        for conn in self._open:
            conn.close()

    @property
    def service(self) -> Any:
        assert self.proxy.app is not None and self.proxy.app.cache is not None
        return self.proxy.app.cache

    def hits(self) -> int:
        return int(self.service.engine.stats().hits)

    def warm(self, conn: psycopg.Connection[tuple[Any, ...]], sql: str) -> list[tuple[Any, ...]]:
        """Read until a read is a hit: the entry is in the cache."""
        first = conn.execute(sql).fetchall()
        for _ in range(_WARM_ATTEMPTS):
            before = self.hits()
            assert conn.execute(sql).fetchall() == first
            if self.hits() > before:
                return first
            time.sleep(0.05)
        pytest.fail(f"{sql!r} was never answered from the cache")


@pytest.fixture
def h(pg: PgCluster, dbname: str, cached: ProxyThread) -> Iterator[Harness]:
    harness = Harness(pg, dbname, cached)
    yield harness
    harness.close()


COUNTER = """
CREATE TABLE counter (n int);
INSERT INTO counter VALUES (0);
CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE AS 'UPDATE counter SET n = n + 1 RETURNING n';
CREATE TABLE t (a int);
INSERT INTO t VALUES (1);
CREATE SEQUENCE s;
"""


def _ready(h: Harness, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """The proxy has this database's catalog and feed: a plain read is cached."""
    h.warm(conn, "SELECT a FROM t ORDER BY a")


def _reads_again(h: Harness, sql: str) -> None:
    """`sql` runs a function each time in PostgreSQL: two reads through the proxy must differ, as they do directly."""
    proxied, direct = h.connect(), h.connect(direct=True)
    _ready(h, proxied)
    d1, d2 = direct.execute(sql).fetchall(), direct.execute(sql).fetchall()
    assert d1 != d2, "this case would prove nothing"
    p1, p2 = proxied.execute(sql).fetchall(), proxied.execute(sql).fetchall()
    p3 = proxied.execute(sql).fetchall()
    assert len({repr(p1), repr(p2), repr(p3)}) == 3, f"{sql!r} was answered from the cache: {p1} {p2} {p3}"


def _read_invalidates(h: Harness, sql: str) -> None:
    """`sql` is a read that writes `counter` (through code it does not name): a cached read of counter is then
    what PostgreSQL returns."""
    proxied, direct = h.connect(), h.connect(direct=True)
    _ready(h, proxied)
    before = h.warm(proxied, "SELECT n FROM counter")
    proxied.execute(sql).fetchall()
    want = direct.execute("SELECT n FROM counter").fetchall()
    assert want != before, "the read did not write: this case would prove nothing"
    assert proxied.execute("SELECT n FROM counter").fetchall() == want


# -- item 2: hidden code -------------------------------------------------------------------------------------------


def test_view_calling_a_writing_function_invalidates(h: Harness) -> None:
    h.pg.psql(COUNTER + "CREATE VIEW v AS SELECT bump() AS n; CREATE VIEW v2 AS SELECT * FROM v;", dbname=h.dbname)
    _read_invalidates(h, "SELECT * FROM v")
    _read_invalidates(h, "SELECT n FROM v2")  # through another view


def test_function_in_attribute_notation_runs_every_time(h: Harness) -> None:
    h.pg.psql(COUNTER + "CREATE FUNCTION f(t) RETURNS bigint LANGUAGE sql VOLATILE AS $$SELECT nextval('s')$$;",
              dbname=h.dbname)  # fmt: skip
    _reads_again(h, "SELECT x.f FROM t x")
    _reads_again(h, "SELECT (x).f FROM t x")


def test_writing_function_in_attribute_notation_invalidates(h: Harness) -> None:
    h.pg.psql(COUNTER + "CREATE FUNCTION g(t) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT bump()';", dbname=h.dbname)
    _read_invalidates(h, "SELECT x.g FROM t x")


def test_user_operator_backed_by_a_volatile_function(h: Harness) -> None:
    h.pg.psql(COUNTER + """
        CREATE FUNCTION plus_seq(int, int) RETURNS bigint LANGUAGE sql VOLATILE AS $$SELECT $1 + $2 + nextval('s')$$;
        CREATE OPERATOR ~~~ (LEFTARG = int, RIGHTARG = int, FUNCTION = plus_seq);
        CREATE FUNCTION plus_bump(int, int) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT $1 + $2 + bump()';
        CREATE OPERATOR @@@ (LEFTARG = int, RIGHTARG = int, FUNCTION = plus_bump);
    """, dbname=h.dbname)  # fmt: skip
    _reads_again(h, "SELECT a ~~~ 1 FROM t")
    _read_invalidates(h, "SELECT a @@@ 1 FROM t")


def test_user_cast_backed_by_a_volatile_function(h: Harness) -> None:
    h.pg.psql(COUNTER + """
        CREATE TYPE tag AS (v int);
        CREATE FUNCTION tag_to_int(tag) RETURNS int LANGUAGE sql VOLATILE AS $$SELECT nextval('s')::int$$;
        CREATE CAST (tag AS int) WITH FUNCTION tag_to_int(tag);
    """, dbname=h.dbname)  # fmt: skip
    _reads_again(h, "SELECT ROW(a)::tag::int FROM t")
    _reads_again(h, "SELECT CAST(ROW(a)::tag AS integer) FROM t")


def test_implicit_user_cast_backed_by_a_volatile_function(h: Harness) -> None:
    h.pg.psql(COUNTER, dbname=h.dbname)
    proxied, direct = h.connect(), h.connect(direct=True)
    _ready(h, proxied)  # then the DDL goes through the proxy, which reads the catalog again after it
    proxied.execute("""
        CREATE TYPE tag AS (v int);
        CREATE FUNCTION tag_to_text(tag) RETURNS text LANGUAGE sql VOLATILE AS $$SELECT nextval('s')::text$$;
        CREATE CAST (tag AS text) WITH FUNCTION tag_to_text(tag) AS IMPLICIT;
    """)
    sql = "SELECT upper(ROW(a)::tag) FROM t"  # upper(text): the cast is implicit, no SQL text shows it
    assert direct.execute(sql).fetchall() != direct.execute(sql).fetchall()
    answers = [proxied.execute(sql).fetchall() for _ in range(3)]
    assert len({repr(a) for a in answers}) == 3, f"answered from the cache: {answers}"


def test_user_aggregate_with_a_volatile_transition_function(h: Harness) -> None:
    h.pg.psql(COUNTER + """
        CREATE FUNCTION vsum_step(bigint, int) RETURNS bigint LANGUAGE sql VOLATILE
          AS $$SELECT $1 + $2 + nextval('s')$$;
        CREATE AGGREGATE vsum(int) (SFUNC = vsum_step, STYPE = bigint, INITCOND = '0');
    """, dbname=h.dbname)  # fmt: skip
    _reads_again(h, "SELECT vsum(a) FROM t")


def test_unparseable_select_counts_as_an_unknown_write(h: Harness) -> None:
    h.pg.psql(COUNTER, dbname=h.dbname)
    # ORDER BY ... USING is PostgreSQL syntax sqlglot does not parse.
    _read_invalidates(h, "SELECT bump() AS x ORDER BY 1 USING <")


# -- item 3: time read from text -----------------------------------------------------------------------------------


def test_text_computed_into_a_time_is_not_cached(h: Harness) -> None:
    h.pg.psql(COUNTER + "CREATE TABLE words (w text); INSERT INTO words VALUES ('now');", dbname=h.dbname)
    _reads_again(h, "SELECT ('n' || 'ow')::timestamptz")
    _reads_again(h, "SELECT CAST(w AS timestamptz) FROM words")
    _reads_again(h, "SELECT words.w::timestamp FROM words")
    _reads_again(h, "SELECT w::time FROM (SELECT w FROM words) sub")


def test_time_columns_cast_to_time_stay_cached(h: Harness) -> None:
    h.pg.psql(COUNTER + "CREATE TABLE ev (at timestamptz); INSERT INTO ev VALUES ('2024-01-02 03:04:05+00');",
              dbname=h.dbname)  # fmt: skip
    proxied, direct = h.connect(), h.connect(direct=True)
    _ready(h, proxied)
    for sql in ("SELECT ev.at::date FROM ev", "SELECT CAST(at AS timestamp) FROM ev WHERE at > $1"):
        if "$1" in sql:
            want = direct.execute(sql.replace("$1", "%s"), ["2000-01-01"]).fetchall()
            assert proxied.execute(sql.replace("$1", "%s"), ["2000-01-01"]).fetchall() == want
            continue
        assert h.warm(proxied, sql) == direct.execute(sql).fetchall()


# -- item 12: parenthesised ORM conditions ------------------------------------------------------------------------


def test_parenthesised_conditions_are_cached_and_invalidate_only_their_table(h: Harness) -> None:
    h.pg.psql(
        COUNTER + "CREATE TABLE users (id int PRIMARY KEY, name text, fullname text, active bool);"
        "INSERT INTO users VALUES (1, 'a', NULL, true), (2, 'b', 'B', false);",
        dbname=h.dbname,
    )
    proxied, direct = h.connect(), h.connect(direct=True)
    _ready(h, proxied)
    read = (
        'SELECT "users"."id", "users"."name" FROM "users" WHERE "users"."id" > 0 AND ("users"."fullname" IS NULL '
        'OR "users"."name" = \'b\') ORDER BY "users"."id"'
    )
    other = h.warm(proxied, "SELECT n FROM counter")
    assert h.warm(proxied, read) == direct.execute(read).fetchall()
    flushes = h.service.database_flushes
    proxied.execute("UPDATE users SET name = 'c' WHERE id > 0 AND (fullname IS NULL OR name = 'b')")
    assert h.service.database_flushes == flushes, "an ORM write invalidated the whole database"
    assert proxied.execute(read).fetchall() == direct.execute(read).fetchall()
    before = h.hits()
    assert proxied.execute("SELECT n FROM counter").fetchall() == other
    assert h.hits() == before + 1, "the unrelated entry was dropped, or the session stopped using the cache"
