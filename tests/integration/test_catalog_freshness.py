"""Results that depend on the catalog rather than on a table's rows (issue 14, items 1 and 5): function bodies,
EXECUTE privileges, enum label order, domain CHECKs, type OIDs in a Describe, triggers added by hidden DDL.

Each case caches a read (proven a hit by the engine's counters), changes the catalog through the proxy or straight
on the database (seen by the catalog poll, `invalidation.catalog_poll`), and then a new session through the proxy
must get what PostgreSQL itself answers now.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.support.cachetest import eventually
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config

Outcome = list[tuple[Any, ...]] | str  # rows, or the SQLSTATE of an error
_WARM_ATTEMPTS = 40
ALICE = (PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD)


@pytest.fixture(scope="module")
def cached(pg: PgCluster) -> Iterator[ProxyThread]:
    with ProxyThread.from_mapping(proxy_config(pg.url(dbname="postgres"), cache={"default_ttl": "120s"})) as running:
        yield running


def _hits(proxy: ProxyThread) -> int:
    assert proxy.app is not None and proxy.app.cache is not None
    return int(proxy.app.cache.engine.stats().hits)


@dataclass
class Reader:
    pg: PgCluster
    dbname: str
    port: int | None  # None: straight to PostgreSQL
    user: tuple[str, str] | None = None
    extended: bool = False

    def read(self, sql: str) -> Outcome:
        """`sql` on a new connection (a new session: nothing of the writer's session state applies)."""
        user, password = self.user if self.user is not None else (self.pg.SUPERUSER, None)
        dsn = self.pg.dsn(user=user, password=password, dbname=self.dbname, port=self.port)
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                return conn.execute(sql, prepare=False, binary=self.extended).fetchall()
            except psycopg.Error as exc:
                return exc.sqlstate or "?"


def warm(proxy: ProxyThread, reader: Reader, sql: str) -> Outcome:
    """Read until a read is answered from the cache, every time with the same result."""
    first = reader.read(sql)
    assert not isinstance(first, str), f"{sql!r} failed: {first}"
    for _ in range(_WARM_ATTEMPTS):
        before = _hits(proxy)
        assert reader.read(sql) == first
        if _hits(proxy) > before:
            return first
        time.sleep(0.05)
    pytest.fail(f"{sql!r} was never answered from the cache")


def _change(pg: PgCluster, dbname: str, proxy: ProxyThread, where: str, sql: str) -> None:
    if where == "direct":
        pg.psql(sql, dbname=dbname)
        return
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
        conn.execute(sql)


@dataclass(frozen=True)
class Case:
    id: str
    setup: str
    read: str
    change: str
    user: tuple[str, str] | None = None


CASES = [
    Case(
        "function body replaced",
        "CREATE FUNCTION f() RETURNS int IMMUTABLE LANGUAGE sql AS 'select 1'",
        "SELECT f()",
        "CREATE OR REPLACE FUNCTION f() RETURNS int IMMUTABLE LANGUAGE sql AS 'select 2'",
    ),
    Case(
        "REVOKE EXECUTE on a function",
        f"CREATE FUNCTION secret_fn(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'select $1 * 2';"
        f"REVOKE EXECUTE ON FUNCTION secret_fn(int) FROM PUBLIC;"
        f"GRANT EXECUTE ON FUNCTION secret_fn(int) TO {ALICE[0]}",
        "SELECT secret_fn(1)",
        f"REVOKE EXECUTE ON FUNCTION secret_fn(int) FROM {ALICE[0]}",
        user=ALICE,
    ),
    Case(
        "enum recreated with its labels reordered",
        "CREATE TYPE mood AS ENUM ('sad', 'ok')",
        "SELECT 'ok'::mood > 'sad'::mood",
        "DROP TYPE mood; CREATE TYPE mood AS ENUM ('ok', 'sad')",
    ),
    Case(
        "domain given a CHECK",
        "CREATE DOMAIN small_int AS int",
        "SELECT CAST(50 AS small_int)",
        "ALTER DOMAIN small_int ADD CONSTRAINT small CHECK (VALUE < 10)",
    ),
]


@pytest.mark.parametrize("where", ["proxy", "direct"])
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
def test_catalog_change_reaches_results_that_read_no_table(
    pg: PgCluster, dbname: str, cached: ProxyThread, case: Case, where: str, extended: bool
) -> None:
    pg.psql(case.setup, dbname=dbname)
    through = Reader(pg, dbname, cached.port, case.user, extended)
    direct = Reader(pg, dbname, None, case.user, extended)
    before = warm(cached, through, case.read)
    _change(pg, dbname, cached, where, case.change)
    want = direct.read(case.read)
    assert want != before, "the change does not change the read: this case would prove nothing"
    if where == "proxy":
        assert through.read(case.read) == want
    else:
        assert eventually(lambda: through.read(case.read) == want), f"still {through.read(case.read)}, not {want}"


def _describe_cached(proxy: ProxyThread, sql: bytes) -> bool:
    """The proxy holds a Describe of `sql` (answered locally from then on; a served Describe is not counted as a
    hit, since hits count the executions the server was spared)."""
    assert proxy.app is not None and proxy.app.cache is not None
    return any(entry.key[0] == "d" and entry.key[4] == sql for entry in proxy.app.cache.engine.entries())


def _describe(pg: PgCluster, dbname: str, port: int | None) -> tuple[int, ...] | str:
    """asyncpg's prepare (Parse + Describe + Sync) of `SELECT $1::hstore` on a new connection: the parameter's and
    the column's type OIDs, or the error (asyncpg fails to resolve an OID that no longer exists)."""

    async def run() -> tuple[int, ...] | str:
        conn = await asyncpg.connect(pg.url(dbname=dbname, port=port))
        try:
            statement = await conn.prepare("SELECT $1::hstore AS h")
            return (*(t.oid for t in statement.get_parameters()), *(a.type.oid for a in statement.get_attributes()))
        except (asyncpg.PostgresError, asyncpg.InternalClientError) as exc:
            return f"{exc.__class__.__name__}: {exc}"
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.mark.parametrize("where", ["proxy", "direct"])
def test_describe_after_extension_recreated_gives_the_new_type_oid(
    pg: PgCluster, dbname: str, cached: ProxyThread, where: str
) -> None:
    pg.psql("CREATE EXTENSION hstore", dbname=dbname)
    first = _describe(pg, dbname, cached.port)
    for _ in range(_WARM_ATTEMPTS):
        assert _describe(pg, dbname, cached.port) == first
        if _describe_cached(cached, b"SELECT $1::hstore AS h"):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the Describe was never stored in the cache")
    _change(pg, dbname, cached, where, "DROP EXTENSION hstore; CREATE EXTENSION hstore")
    want = _describe(pg, dbname, None)
    assert want != first, "the OIDs did not change: this case would prove nothing"
    if where == "proxy":
        assert _describe(pg, dbname, cached.port) == want
    else:
        assert eventually(lambda: _describe(pg, dbname, cached.port) == want)


# --- DDL the analyzer cannot see (item 5): in a DO block, in a function, committed by COMMIT PREPARED ----------

TRIGGER_SETUP = """
CREATE TABLE src (id int);
CREATE TABLE audit (what text);
CREATE FUNCTION log_it() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO audit VALUES (TG_OP); RETURN NULL; END$$;
CREATE FUNCTION add_trigger() RETURNS void VOLATILE LANGUAGE plpgsql AS
  $$BEGIN CREATE TRIGGER audit_src AFTER INSERT ON src FOR EACH ROW EXECUTE FUNCTION log_it(); END$$;
"""
CREATE_TRIGGER = "CREATE TRIGGER audit_src AFTER INSERT ON src FOR EACH ROW EXECUTE FUNCTION log_it()"
HIDDEN_DDL = {
    "DO block": [f"DO $$BEGIN {CREATE_TRIGGER}; END$$"],
    "function call": ["SELECT add_trigger()"],
    "COMMIT PREPARED": ["BEGIN", CREATE_TRIGGER, "PREPARE TRANSACTION 'tx14'", "COMMIT PREPARED 'tx14'"],
}


@pytest.fixture(scope="module")
def unpolled(pg: PgCluster) -> Iterator[ProxyThread]:
    """No catalog poll: what the proxy knows of the catalog comes only from what goes through it."""
    config = proxy_config(pg.url(dbname="postgres"), cache={"default_ttl": "120s"}, invalidation={"catalog_poll": None})
    with ProxyThread.from_mapping(config) as running:
        yield running


@pytest.mark.parametrize("how", list(HIDDEN_DDL))
def test_trigger_created_by_hidden_ddl_is_known_to_later_writes(
    pg: PgCluster, dbname: str, unpolled: ProxyThread, how: str
) -> None:
    pg.psql(TRIGGER_SETUP, dbname=dbname)
    through = Reader(pg, dbname, unpolled.port)
    direct = Reader(pg, dbname, None)
    assert unpolled.app is not None and unpolled.app.cache is not None
    catalogs = unpolled.app.cache.catalogs
    with psycopg.connect(pg.dsn(dbname=dbname, port=unpolled.port), autocommit=True) as writer:
        writer.execute("SELECT 1")
        assert eventually(lambda: catalogs.get(dbname) is not None)
        loaded = catalogs.get(dbname).version
        for sql in HIDDEN_DDL[how]:
            writer.execute(sql)
        # A call of a function that may write reloads the catalog in the background: wait for that load.
        assert eventually(lambda: (catalogs.get(dbname) or catalogs.last_known(dbname)).version > loaded)
        before = warm(unpolled, through, "SELECT count(*) FROM audit")
        writer.execute("INSERT INTO src VALUES (1)")  # the new trigger writes to audit
    want = direct.read("SELECT count(*) FROM audit")
    assert want != before, "the trigger did not fire: this case would prove nothing"
    assert through.read("SELECT count(*) FROM audit") == want
