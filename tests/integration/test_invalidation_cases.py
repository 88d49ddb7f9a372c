"""Invalidation, case by case (issue 4, "Cases"), through one proxy: a read is cached (a later read of it is proven
a hit by the engine's counters), a write goes through the same proxy, and the next read, in the reading session and
in the writing one, must be what PostgreSQL itself returns now.

Most cases are rows of CASES: a schema, the reads to cache, and writes that must change every one of them (checked
against a direct connection, so that a case whose write changes nothing fails instead of proving nothing). Every row
runs in the simple protocol; one row per kind of statement also runs in the extended protocol (psycopg's unnamed
Parse/Bind/Describe/Execute/Sync, the batch the proxy answers from the cache), which reaches the same write_scope by
another path of the relay. The cases with their own shape (roles, search paths, transactions, COPY, a driver's
prepared statements after DDL) follow the table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config

MODES = ("simple", "extended")
_WARM_ATTEMPTS = 40  # reads before giving up on a hit (each may first wait up to 2 s for the catalog and the feed)
SIMPLE = pytest.mark.parametrize("h", ["simple"], indirect=True)
EXTENDED = pytest.mark.parametrize("h", ["extended"], indirect=True)
Outcome = tuple[tuple[str, ...], list[tuple[Any, ...]]] | str  # (columns, rows), or the SQLSTATE of an error


@pytest.fixture(scope="module")
def cached(pg: PgCluster) -> Iterator[ProxyThread]:
    """One proxy with the cache on for the module: every test has its own database, hence its own entries."""
    with ProxyThread.from_mapping(proxy_config(pg.url(dbname="postgres"), cache={"default_ttl": "60s"})) as running:
        yield running


@dataclass
class Client:
    """A psycopg session (autocommit) that reads and writes in one protocol."""

    conn: psycopg.Connection[tuple[Any, ...]]
    extended: bool

    def read(self, sql: str) -> Outcome:
        try:
            # Binary results make psycopg use the extended protocol even without parameters (unnamed statement);
            # text results without parameters go as a simple Query.
            cur = self.conn.execute(sql, prepare=False, binary=self.extended)
        except psycopg.Error as exc:
            return exc.sqlstate or "?"
        return tuple(d.name for d in cur.description or ()), cur.fetchall()

    def run(self, sql: str) -> None:
        self.conn.execute(sql, prepare=False, binary=self.extended)


@dataclass
class Harness:
    pg: PgCluster
    dbname: str
    proxy: ProxyThread
    mode: str = "simple"
    _open: list[psycopg.Connection[tuple[Any, ...]]] = field(default_factory=list)

    def client(self, *, user: str | None = None, password: str | None = None, options: str = "") -> Client:
        """A session through the proxy (`options`: the startup packet's, e.g. "-csearch_path=s1")."""
        dsn = self.pg.dsn(user=user or self.pg.SUPERUSER, password=password, dbname=self.dbname, port=self.proxy.port)
        conn = psycopg.connect(dsn + (f" options={options}" if options else ""), autocommit=True)
        self._open.append(conn)
        return Client(conn, self.mode == "extended")

    def direct(self, *, user: str | None = None, password: str | None = None) -> Client:
        """A session straight to PostgreSQL: the reference."""
        dsn = self.pg.dsn(user=user or self.pg.SUPERUSER, password=password, dbname=self.dbname)
        conn = psycopg.connect(dsn, autocommit=True)
        self._open.append(conn)
        return Client(conn, self.mode == "extended")

    def close(self) -> None:
        for conn in self._open:
            conn.close()

    @property
    def service(self) -> Any:
        assert self.proxy.app is not None and self.proxy.app.cache is not None
        return self.proxy.app.cache

    def hits(self) -> int:
        return int(self.service.engine.stats().hits)

    def warm(self, client: Client, sql: str) -> Outcome:
        """Read until a read is answered from the cache (normally the second), every time with the same result.

        The first reads of a database may find it not served yet: its catalog is loading, or its invalidation feed
        (the LISTEN connection of the bus) is connecting, each in the background and slow on a loaded machine."""
        first = client.read(sql)
        assert not isinstance(first, str), f"{sql!r} failed: {first}"
        for _ in range(_WARM_ATTEMPTS):
            before = self.hits()
            assert client.read(sql) == first
            if self.hits() > before:
                return first
            time.sleep(0.05)
        pytest.fail(f"{sql!r} was never answered from the cache")


@pytest.fixture(params=MODES)
def h(request: pytest.FixtureRequest, pg: PgCluster, dbname: str, cached: ProxyThread) -> Iterator[Harness]:
    harness = Harness(pg, dbname, cached, request.param)
    yield harness
    harness.close()


def _write_changes_reads(h: Harness, setup: str, reads: list[str], writes: list[str]) -> None:
    """The heart of every case: cache `reads` in one session, run `writes` in another, read fresh in both."""
    h.pg.psql(setup, dbname=h.dbname)
    reader, writer, direct = h.client(), h.client(), h.direct()
    before = [h.warm(reader, sql) for sql in reads]
    for sql in writes:
        writer.run(sql)
    want = [direct.read(sql) for sql in reads]
    for sql, old, new in zip(reads, before, want, strict=True):
        assert new != old, f"the write does not change {sql!r}: this case would prove nothing"
    assert [reader.read(sql) for sql in reads] == want, "another session read a stale entry"
    assert [writer.read(sql) for sql in reads] == want, "the writing session read a stale entry"


@dataclass(frozen=True)
class Case:
    id: str
    setup: str
    reads: list[str]
    writes: list[str]
    # Every case runs in the simple protocol. The extended one takes the same path through write_scope for every
    # statement of a kind, so one case per kind of statement runs there too (the database per test is the cost).
    extended: bool = False


ITEMS = "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20) g;"  # noqa: E501
PARTITIONS = """
CREATE TABLE measures (id int, region text, v int) PARTITION BY LIST (region);
CREATE TABLE measures_eu PARTITION OF measures FOR VALUES IN ('eu') PARTITION BY RANGE (id);
CREATE TABLE measures_eu_low PARTITION OF measures_eu FOR VALUES FROM (0) TO (100);
CREATE TABLE measures_eu_high PARTITION OF measures_eu FOR VALUES FROM (100) TO (1000);
CREATE TABLE measures_us PARTITION OF measures FOR VALUES IN ('us');
INSERT INTO measures VALUES (1, 'eu', 1), (150, 'eu', 2), (2, 'us', 4);
"""
INHERITANCE = """
CREATE TABLE cities (name text, pop int);
CREATE TABLE capitals (state text) INHERITS (cities);
INSERT INTO cities VALUES ('a', 1); INSERT INTO capitals VALUES ('b', 10, 'x');
"""
FK = """
CREATE TABLE parent (id int PRIMARY KEY);
INSERT INTO parent SELECT generate_series(1, 3);
CREATE TABLE child (id int PRIMARY KEY, pid int DEFAULT 2 REFERENCES parent ON {action});
INSERT INTO child VALUES (10, 1), (11, 1), (12, 3);
"""
FK_READ = "SELECT count(*), count(pid), sum(pid) FROM child"
AUDIT = """
CREATE TABLE audit_log (what text);
CREATE FUNCTION log_it() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO audit_log VALUES (TG_TABLE_NAME || ' ' || TG_OP); RETURN NULL; END$$;
"""
AUDIT_READ = "SELECT count(*) FROM audit_log"

CASES = [
    Case(
        "write through an updatable view",
        ITEMS + "CREATE VIEW v AS SELECT id, name FROM items WHERE id < 10;",
        ["SELECT name FROM items WHERE id = 1"],
        ["UPDATE v SET name = 'via view' WHERE id = 1"],
    ),
    Case(
        "partition leaf -> parent and ancestors",
        PARTITIONS,
        ["SELECT sum(v) FROM measures", "SELECT sum(v) FROM measures_eu", "SELECT sum(v) FROM measures_eu_low"],
        ["UPDATE measures_eu_low SET v = v + 100"],
        extended=True,
    ),
    Case(
        "partitioned parent -> partitions",
        PARTITIONS,
        ["SELECT sum(v) FROM measures_us", "SELECT sum(v) FROM measures_eu_high"],
        ["UPDATE measures SET v = v * 3"],
    ),
    Case(
        "row moved between partitions",
        PARTITIONS,
        ["SELECT count(*) FROM measures_us", "SELECT count(*) FROM measures_eu_low"],
        ["UPDATE measures SET region = 'us' WHERE id = 1"],
    ),
    Case(
        "inheritance child -> parent",
        INHERITANCE,
        ["SELECT sum(pop) FROM cities", "SELECT sum(pop) FROM capitals"],
        ["INSERT INTO capitals VALUES ('c', 100, 'y')"],
    ),
    Case(
        "inheritance parent -> child",
        INHERITANCE,
        ["SELECT sum(pop) FROM capitals", "SELECT sum(pop) FROM ONLY cities"],
        ["UPDATE cities SET pop = pop + 1"],
    ),
    Case(
        "fk on delete cascade (and a grandchild)",
        FK.format(action="DELETE CASCADE")
        + "CREATE TABLE grandchild (cid int REFERENCES child ON DELETE CASCADE); INSERT INTO grandchild VALUES (10);",
        [FK_READ, "SELECT count(*) FROM grandchild"],
        ["DELETE FROM parent WHERE id = 1"],
    ),
    Case("fk on delete set null", FK.format(action="DELETE SET NULL"), [FK_READ], ["DELETE FROM parent WHERE id = 1"]),
    Case(
        "fk on delete set default",
        FK.format(action="DELETE SET DEFAULT"),
        [FK_READ],
        ["DELETE FROM parent WHERE id = 1"],
    ),
    Case(
        "fk on update cascade",
        FK.format(action="UPDATE CASCADE"),
        [FK_READ],
        ["UPDATE parent SET id = 100 WHERE id = 1"],
    ),
    Case(
        "fk to a partition, write through the parent",
        """
         CREATE TABLE orders (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE orders_a PARTITION OF orders FOR VALUES FROM (0) TO (100);
         CREATE TABLE orders_b PARTITION OF orders FOR VALUES FROM (100) TO (200);
         INSERT INTO orders VALUES (1), (150);
         CREATE TABLE lines (oid int REFERENCES orders ON DELETE CASCADE); INSERT INTO lines VALUES (1), (150);
         CREATE TABLE tags (oid int REFERENCES orders_b ON DELETE CASCADE); INSERT INTO tags VALUES (150);""",
        ["SELECT count(*) FROM lines", "SELECT count(*) FROM tags"],
        ["DELETE FROM orders WHERE id = 150"],
    ),
    Case(
        "trigger on the written table",
        ITEMS + AUDIT + "CREATE TRIGGER t AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION log_it();",
        [AUDIT_READ],
        ["UPDATE items SET name = 'x' WHERE id = 1"],
    ),
    Case(
        "trigger on a cascade target",
        FK.format(action="DELETE CASCADE")
        + AUDIT
        + "CREATE TRIGGER t AFTER DELETE ON child FOR EACH ROW EXECUTE FUNCTION log_it();",
        [AUDIT_READ],
        ["DELETE FROM parent WHERE id = 1"],
        extended=True,
    ),
    Case(
        "trigger on a partition only, insert through the parent",
        PARTITIONS + AUDIT + "CREATE TRIGGER t AFTER INSERT ON measures_us FOR EACH ROW EXECUTE FUNCTION log_it();",
        [AUDIT_READ],
        ["INSERT INTO measures VALUES (3, 'us', 1)"],
    ),
    Case(
        "rule",
        ITEMS + "CREATE TABLE audit_log (what text);"
        "CREATE RULE r AS ON UPDATE TO items DO ALSO INSERT INTO audit_log VALUES ('updated');",
        [AUDIT_READ],
        ["UPDATE items SET name = 'x' WHERE id = 1"],
    ),
    Case(
        "column default calling a function that writes",
        """
         CREATE TABLE audit_log (what text);
         CREATE FUNCTION next_ticket() RETURNS int LANGUAGE plpgsql AS
           $$BEGIN INSERT INTO audit_log VALUES ('ticket'); RETURN (SELECT count(*) FROM audit_log); END$$;
         CREATE TABLE tickets (id int DEFAULT next_ticket(), note text);""",
        [AUDIT_READ],
        ["INSERT INTO tickets (note) VALUES ('x')"],
    ),
    Case(
        "check constraint calling a function that writes",
        """
        CREATE TABLE audit_log (what text);
        CREATE FUNCTION checked(v int) RETURNS bool LANGUAGE plpgsql AS
          $$BEGIN INSERT INTO audit_log VALUES ('checked'); RETURN v > 0; END$$;
        CREATE TABLE positive (v int CHECK (checked(v)));""",
        [AUDIT_READ],
        ["INSERT INTO positive VALUES (1)"],
    ),
    Case(
        "domain default calling a function that writes",
        """
        CREATE TABLE audit_log (what text);
        CREATE FUNCTION next_ticket() RETURNS int LANGUAGE plpgsql AS
          $$BEGIN INSERT INTO audit_log VALUES ('ticket'); RETURN (SELECT count(*) FROM audit_log); END$$;
        CREATE DOMAIN ticket AS int DEFAULT next_ticket();
        CREATE TABLE tickets (id ticket, note text);""",
        [AUDIT_READ],
        ["INSERT INTO tickets (note) VALUES ('x')"],
    ),
    Case("truncate", ITEMS, ["SELECT count(*) FROM items"], ["TRUNCATE items"]),
    Case(
        "truncate cascade",
        FK.format(action="DELETE CASCADE"),
        [FK_READ, "SELECT count(*) FROM parent"],
        ["TRUNCATE parent CASCADE"],
    ),
    Case(
        "alter table add column",
        ITEMS,
        ["SELECT * FROM items WHERE id = 1"],
        ["ALTER TABLE items ADD COLUMN extra int DEFAULT 7"],
        extended=True,
    ),
    Case(
        "drop and create the same name",
        ITEMS,
        ["SELECT * FROM items WHERE id = 1"],
        [
            "DROP TABLE items",
            "CREATE TABLE items (id int, label text, n int)",
            "INSERT INTO items VALUES (1, 'new', 5)",
        ],
    ),
    Case(
        "drop and create in one transaction",
        ITEMS,
        ["SELECT * FROM items WHERE id = 1"],
        [
            "BEGIN",
            "DROP TABLE items",
            "CREATE TABLE items (id int, other text)",
            "INSERT INTO items VALUES (1, 'again')",
            "COMMIT",
        ],
    ),
    Case(
        "quoted identifiers",
        """
         CREATE TABLE "Mixed Case" ("Val" int); INSERT INTO "Mixed Case" VALUES (1);
         CREATE TABLE mixed_case ("Val" int); INSERT INTO mixed_case VALUES (1);
         CREATE SCHEMA "My Schema"; CREATE TABLE "My Schema"."T" (v int); INSERT INTO "My Schema"."T" VALUES (1);""",
        ['SELECT "Val" FROM "Mixed Case"', 'SELECT "Val" FROM MIXED_CASE', 'SELECT v FROM "My Schema"."T"'],
        ['UPDATE "Mixed Case" SET "Val" = 2', 'UPDATE Mixed_Case SET "Val" = 3', 'UPDATE "My Schema"."T" SET v = 4'],
    ),
    Case(
        "a name longer than 63 bytes, truncated by the server",
        f"CREATE TABLE {'n' * 63} (v int); INSERT INTO {'n' * 63} VALUES (1);",
        [f"SELECT v FROM {'n' * 63}"],
        [f"UPDATE {'n' * 70} SET v = 2"],
    ),
    Case(
        "a unicode-escaped name",
        "CREATE TABLE data (v int); INSERT INTO data VALUES (1);",
        ["SELECT v FROM data"],
        ['UPDATE U&"d\\0061ta" SET v = 2', "UPDATE U&\"d!0061ta\" UESCAPE '!' SET v = v + 1"],
    ),
    Case(
        "data-modifying CTE",
        ITEMS + "CREATE TABLE archive (id int, name text);",
        ["SELECT count(*) FROM items", "SELECT count(*) FROM archive"],
        ["WITH moved AS (DELETE FROM items WHERE id <= 5 RETURNING *) INSERT INTO archive SELECT * FROM moved"],
    ),
    Case(
        "data-modifying CTE read by a SELECT",
        ITEMS,
        ["SELECT name FROM items WHERE id = 2"],
        ["WITH u AS (UPDATE items SET name = 'cte' WHERE id = 2 RETURNING id) SELECT count(*) FROM u"],
        extended=True,
    ),
    Case(
        "merge",
        ITEMS + "CREATE TABLE incoming (id int, name text); INSERT INTO incoming VALUES (1, 'm'), (99, 'n');",
        ["SELECT name FROM items WHERE id = 1", "SELECT count(*) FROM items"],
        [
            "MERGE INTO items i USING incoming s ON i.id = s.id WHEN MATCHED THEN UPDATE SET name = s.name "
            "WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.name)"
        ],
        extended=True,
    ),
    Case(
        "insert on conflict do update",
        ITEMS,
        ["SELECT name FROM items WHERE id = 3"],
        ["INSERT INTO items VALUES (3, 'upserted') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name"],
    ),
    Case(
        "do block",
        ITEMS,
        ["SELECT name FROM items WHERE id = 4"],
        ["DO $$BEGIN UPDATE items SET name = 'from do' WHERE id = 4; END$$"],
        extended=True,
    ),
    Case(
        "call a procedure",
        ITEMS + "CREATE PROCEDURE rename(n text) LANGUAGE sql AS $$UPDATE items SET name = n WHERE id = 5$$;",
        ["SELECT name FROM items WHERE id = 5"],
        ["CALL rename('from call')"],
    ),
    Case(
        "select of a volatile function that writes",
        ITEMS + "CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS "
        "$$UPDATE items SET name = name || '+' WHERE id = 6 RETURNING id$$;",
        ["SELECT name FROM items WHERE id = 6"],
        ["SELECT bump()"],
        extended=True,
    ),
    Case(
        "set-returning function that writes, in FROM",
        ITEMS + "CREATE FUNCTION wipe() RETURNS SETOF int "
        "LANGUAGE sql AS $$DELETE FROM items WHERE id = 7 RETURNING id$$;",
        ["SELECT count(*) FROM items"],
        ["SELECT * FROM wipe()"],
    ),
    Case(
        "explicit transaction, committed",
        ITEMS,
        ["SELECT name FROM items WHERE id = 8"],
        ["BEGIN", "UPDATE items SET name = 'in tx' WHERE id = 8", "COMMIT"],
        extended=True,
    ),
    Case(
        "savepoint rolled back, the rest committed",
        ITEMS,
        ["SELECT name FROM items WHERE id = 9"],
        [
            "BEGIN",
            "UPDATE items SET name = 'kept' WHERE id = 9",
            "SAVEPOINT s",
            "DELETE FROM items",
            "ROLLBACK TO s",
            "COMMIT",
        ],
    ),
]


RUNS = [(mode, case) for case in CASES for mode in MODES if mode == "simple" or case.extended]


@pytest.mark.parametrize(("h", "case"), RUNS, indirect=["h"], ids=[f"{m}-{c.id.replace(' ', '_')}" for m, c in RUNS])
def test_a_write_invalidates_what_it_changes(h: Harness, case: Case) -> None:
    _write_changes_reads(h, case.setup, case.reads, case.writes)


# --- cases with their own shape ----------------------------------------------------------------------------------


@SIMPLE
def test_views_are_not_cached_and_follow_their_base_tables(h: Harness) -> None:
    h.pg.psql(ITEMS + "CREATE VIEW v AS SELECT id, name FROM items WHERE id < 10;", dbname=h.dbname)
    reader, writer, direct = h.client(), h.client(), h.direct()
    view = "SELECT name FROM v WHERE id = 1"
    assert reader.read(view) == direct.read(view)
    before = h.hits()
    assert reader.read(view) == direct.read(view)
    assert h.hits() == before  # a view may call anything: never cached (README, "Never cached")
    writer.run("UPDATE items SET name = 'changed' WHERE id = 1")
    assert reader.read(view) == direct.read(view) == (("name",), [("changed",)])


def test_a_materialized_view_changes_only_on_refresh(h: Harness) -> None:
    h.pg.psql(ITEMS + "CREATE MATERIALIZED VIEW mv AS SELECT id, name FROM items;", dbname=h.dbname)
    reader, writer, direct = h.client(), h.client(), h.direct()
    read = "SELECT name FROM mv WHERE id = 1"
    old = h.warm(reader, read)
    writer.run("UPDATE items SET name = 'changed' WHERE id = 1")
    # PostgreSQL still answers the old content, and the entry is still valid: a base table write is no reason to
    # drop it (the family of a table never includes the materialized views built on it).
    before = h.hits()
    assert reader.read(read) == direct.read(read) == old
    assert h.hits() > before
    writer.run("REFRESH MATERIALIZED VIEW mv")
    assert reader.read(read) == direct.read(read) == (("name",), [("changed",)])


@SIMPLE
def test_revoke_and_grant_change_what_a_role_may_read(h: Harness) -> None:
    pg = h.pg
    h.pg.psql(ITEMS + "GRANT SELECT ON items TO alice;", dbname=h.dbname)
    alice = h.client(user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD)
    owner = h.client()
    read = "SELECT name FROM items WHERE id = 1"
    h.warm(alice, read)
    owner.run("REVOKE SELECT ON items FROM alice")
    assert alice.read(read) == "42501"  # permission denied: not the cached rows
    owner.run("GRANT SELECT ON items TO alice")
    assert alice.read(read) == (("name",), [("item 1",)])


def test_row_level_security_enabled_and_altered(h: Harness) -> None:
    pg = h.pg
    h.pg.psql(ITEMS + "GRANT SELECT ON items TO alice;", dbname=h.dbname)
    alice = h.client(user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD)
    alice_direct = h.direct(user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD)
    owner = h.client()
    read = "SELECT count(*) FROM items"
    assert h.warm(alice, read) == (("count",), [(20,)])
    owner.run("CREATE POLICY few ON items FOR SELECT TO alice USING (id <= 3)")
    owner.run("ALTER TABLE items ENABLE ROW LEVEL SECURITY")
    assert alice.read(read) == alice_direct.read(read) == (("count",), [(3,)])
    owner.run("ALTER POLICY few ON items USING (id <= 5)")
    assert alice.read(read) == alice_direct.read(read) == (("count",), [(5,)])
    owner.run("ALTER TABLE items DISABLE ROW LEVEL SECURITY")
    assert alice.read(read) == alice_direct.read(read) == (("count",), [(20,)])


def test_the_same_name_in_two_schemas_and_search_paths(h: Harness) -> None:
    h.pg.psql(
        "CREATE SCHEMA s1; CREATE SCHEMA s2;"
        "CREATE TABLE s1.t (v text); INSERT INTO s1.t VALUES ('s1');"
        "CREATE TABLE s2.t (v text); INSERT INTO s2.t VALUES ('s2');",
        dbname=h.dbname,
    )
    on_s1 = h.client(options="-csearch_path=s1")  # a search path from the startup packet
    on_s2 = h.client()
    on_s2.run("SET search_path = s2")  # and one set in the session
    writer = h.client()
    read, qualified = "SELECT v FROM t", "SELECT v FROM s1.t"
    assert h.warm(on_s1, read) == (("v",), [("s1",)])
    assert h.warm(on_s1, qualified) == (("v",), [("s1",)])
    assert h.warm(on_s2, read) == (("v",), [("s2",)])
    writer.run("UPDATE s1.t SET v = 's1 new'")  # qualified write: the search-path read of t must follow
    assert on_s1.read(read) == on_s1.read(qualified) == (("v",), [("s1 new",)])
    assert on_s2.read(read) == (("v",), [("s2",)])
    h.warm(on_s1, qualified)
    writer.run("SET search_path = s1")
    writer.run("UPDATE t SET v = 's1 newer'")  # unqualified write, resolved through the writer's search path
    assert on_s1.read(qualified) == on_s1.read(read) == (("v",), [("s1 newer",)])
    assert on_s2.read(read) == (("v",), [("s2",)])


@SIMPLE
def test_copy_from_stdin(h: Harness) -> None:
    h.pg.psql(ITEMS, dbname=h.dbname)
    reader, writer = h.client(), h.client()
    read = "SELECT count(*) FROM items"
    h.warm(reader, read)
    with writer.conn.cursor().copy("COPY items (id, name) FROM STDIN") as copy:
        for i in range(100, 110):
            copy.write_row((i, f"copied {i}"))
    assert reader.read(read) == writer.read(read) == (("count",), [(30,)])


@SIMPLE
def test_copy_to_of_a_statement_that_writes(h: Harness) -> None:
    h.pg.psql(ITEMS, dbname=h.dbname)
    reader, writer = h.client(), h.client()
    read = "SELECT count(*) FROM items"
    h.warm(reader, read)
    with writer.conn.cursor().copy("COPY (DELETE FROM items WHERE id <= 5 RETURNING id) TO STDOUT") as copy:
        assert sorted(int(row[0]) for row in copy.rows()) == [1, 2, 3, 4, 5]
    assert reader.read(read) == writer.read(read) == (("count",), [(15,)])


@SIMPLE
def test_several_statements_in_one_query(h: Harness) -> None:
    h.pg.psql(ITEMS + "CREATE TABLE other (v int); INSERT INTO other VALUES (1);", dbname=h.dbname)
    reader, writer = h.client(), h.client()
    h.warm(reader, "SELECT count(*) FROM items")
    h.warm(reader, "SELECT sum(v) FROM other")
    writer.run("SELECT 1; DELETE FROM items WHERE id = 1; UPDATE other SET v = 2")
    assert reader.read("SELECT count(*) FROM items") == (("count",), [(19,)])
    assert reader.read("SELECT sum(v) FROM other") == (("sum",), [(2,)])


@SIMPLE
def test_rolled_back_writes_leave_the_committed_value(h: Harness) -> None:
    h.pg.psql(ITEMS, dbname=h.dbname)
    reader, writer, direct = h.client(), h.client(), h.direct()
    read = "SELECT name FROM items WHERE id = 1"
    old = h.warm(reader, read)
    writer.run("BEGIN")
    writer.run("UPDATE items SET name = 'never' WHERE id = 1")
    assert writer.read(read) == (("name",), [("never",)])  # its own uncommitted write, inside the transaction
    assert h.warm(reader, read) == old  # others see (and may cache) the committed value meanwhile
    writer.run("ROLLBACK")
    assert reader.read(read) == writer.read(read) == direct.read(read) == old


def test_read_your_writes_after_a_fill_during_the_transaction(h: Harness) -> None:
    h.pg.psql(ITEMS, dbname=h.dbname)
    reader, writer = h.client(), h.client()
    read = "SELECT name FROM items WHERE id = 2"
    for commit in ("COMMIT", "END"):
        writer.run("BEGIN")
        writer.run(f"UPDATE items SET name = 'by {commit}' WHERE id = 2")
        h.warm(reader, read)  # another session caches the old committed value while the write is open
        writer.run(commit)
        # The writer never reads an older value than its committed write, nor does anyone after the commit.
        assert writer.read(read) == reader.read(read) == (("name",), [(f"by {commit}",)])


def test_a_pipelined_write_then_read(h: Harness) -> None:
    h.pg.psql(ITEMS, dbname=h.dbname)
    reader, writer = h.client(), h.client()
    read = "SELECT name FROM items WHERE id = %s"
    assert reader.conn.execute(read, (3,)).fetchall() == [("item 3",)]
    assert reader.conn.execute(read, (3,)).fetchall() == [("item 3",)]
    with writer.conn.pipeline():
        writer.conn.execute("UPDATE items SET name = 'piped' WHERE id = %s", (3,))
        inside = writer.conn.execute(read, (3,))
    assert inside.fetchall() == [("piped",)]
    assert reader.conn.execute(read, (3,)).fetchall() == [("piped",)]


@SIMPLE
def test_unknown_effects_invalidate_the_database_and_are_counted(h: Harness) -> None:
    h.pg.psql(ITEMS + "CREATE TABLE other (v int); INSERT INTO other VALUES (1);", dbname=h.dbname)
    reader, writer = h.client(), h.client()
    h.warm(reader, "SELECT count(*) FROM other")  # a table the DO block does not touch
    flushes = h.service.database_flushes
    writer.run("DO $$BEGIN PERFORM 1; END$$")
    assert h.service.database_flushes == flushes + 1
    before = h.hits()
    reader.read("SELECT count(*) FROM other")
    assert h.hits() == before  # dropped with the rest of the database


# --- prepared statements of a driver (asyncpg) after DDL ---------------------------------------------------------


ADD_COLUMN = ["ALTER TABLE items ADD COLUMN extra int DEFAULT 7"]
DROP_CREATE = ["DROP TABLE items", "CREATE TABLE items (id int, label text)", "INSERT INTO items VALUES (1, 'new')"]


def _asyncpg_after_ddl(
    h: Harness, ddl: list[str], sessions: int = 1, readers: tuple[int, ...] = (0,)
) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """`sessions` asyncpg sessions read SELECT * twice each (asyncpg prepares it, and keeps the statement and its
    row description; the first session's Parse and Describe go upstream, a later one's are answered from the
    cache), then the first runs `ddl` through the proxy, and the `readers` read again, in that order. Returns their
    rows (in `readers` order) and PostgreSQL's."""
    h.pg.psql(ITEMS, dbname=h.dbname)
    read = "SELECT * FROM items WHERE id = 1"

    async def run() -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
        url = h.pg.url(dbname=h.dbname, port=h.proxy.port)
        conns = [await asyncpg.connect(url) for _ in range(sessions)]
        try:
            for conn in conns:
                for _ in range(2):
                    await conn.fetch(read)
            for sql in ddl:
                await conns[0].execute(sql)
            got = [[dict(r) for r in await conns[index].fetch(read)] for index in readers]
        finally:
            for conn in conns:
                await conn.close()
        direct = await asyncpg.connect(h.pg.url(dbname=h.dbname))
        try:
            return got, [dict(r) for r in await direct.fetch(read)]
        finally:
            await direct.close()

    return asyncio.run(run())


@EXTENDED
@pytest.mark.parametrize(
    ("ddl", "row"),
    [(ADD_COLUMN, {"id": 1, "name": "item 1", "extra": 7}), (DROP_CREATE, {"id": 1, "label": "new"})],
    ids=["add_column", "drop_create"],
)
def test_a_prepared_select_star_after_ddl(h: Harness, ddl: list[str], row: dict[str, Any]) -> None:
    got, want = _asyncpg_after_ddl(h, ddl)
    assert want == [row]
    assert got == [want]


@EXTENDED
def test_a_statement_prepared_from_the_cache_then_ddl(h: Harness) -> None:
    got, want = _asyncpg_after_ddl(h, ADD_COLUMN, sessions=2, readers=(1,))
    assert got == [want]


@EXTENDED
def test_an_old_statement_is_not_answered_with_a_new_shape(h: Harness) -> None:
    got, want = _asyncpg_after_ddl(h, ADD_COLUMN, sessions=2, readers=(0, 1))
    assert got == [want, want]
