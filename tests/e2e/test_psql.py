"""psql through the subprocess proxy: every run compared with the same command straight against Postgres."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.helpers import CliProxy, Target, normalise
from tests.support.pgcluster import PgCluster


@pytest.fixture
def via_proxy(pg: PgCluster, module_proxy: CliProxy) -> Target:
    """psql tests share one proxy process: each run is a new client connection anyway."""
    return Target.through(pg, module_proxy)


# Tests that leave nothing behind use this one instead of a fresh database each (saves ~0.4 s per test).
SHARED_DB = "postgres"


def assert_same(direct: subprocess.CompletedProcess[str], proxied: subprocess.CompletedProcess[str]) -> None:
    assert (proxied.returncode, normalise(proxied.stdout), normalise(proxied.stderr)) == (
        direct.returncode,
        normalise(direct.stdout),
        normalise(direct.stderr),
    )


QUERIES = {
    "types": (
        "select g, g * 2 as double, md5(g::text), nullif(g % 3, 0) as maybe_null, 'ünïcödé ' || g as text,"
        " (g * 1.5)::numeric(10, 2) as num, ('\\x' || lpad(to_hex(g), 4, '0'))::bytea as raw,"
        " json_build_object('g', g, 'arr', array[g, g + 1]) as js"
        " from generate_series(1, 50) g"
    ),
    # ~2 MB of rows: many DataRow messages, split across reads on both sides.
    "large": "select g, repeat(md5(g::text), 8) from generate_series(1, 8000) g",
    "empty": "select 1 where false",
    "ddl_tag": "create temp table x (a int)",
}


@pytest.mark.parametrize("name", list(QUERIES))
def test_psql_c_query(direct: Target, via_proxy: Target, name: str) -> None:
    sql = QUERIES[name]
    for fmt in ((), ("-A", "-F", "|")):
        results = [t.psql(*fmt, "-c", sql, dbname=SHARED_DB) for t in (direct, via_proxy)]
        assert results[0].returncode == 0, results[0].stderr
        assert_same(*results)


@pytest.mark.parametrize(
    "sql",
    [
        "select 1; select 2",
        "select 1 as a; select 'x' as b, 2 as c; select 3",
        "select 1; select 1/0; select 3",  # one simple Query: the error ends the string
        "create temp table m (a int); insert into m values (1), (2); select * from m",
    ],
)
def test_psql_c_several_statements(direct: Target, via_proxy: Target, sql: str) -> None:
    result = via_proxy.psql("-c", sql, dbname=SHARED_DB)
    assert_same(direct.psql("-c", sql, dbname=SHARED_DB), result)


SCRIPT = r"""
CREATE TABLE t (id int PRIMARY KEY, name text, amount numeric);
INSERT INTO t VALUES (1, 'one', 1.5), (2, 'two', NULL);
INSERT INTO t SELECT g, 'gen ' || g, g * 0.25 FROM generate_series(10, 20) g;
\copy t FROM 'in.csv' csv
SELECT count(*), sum(amount) FROM t;
SELECT 1/0;
INSERT INTO t VALUES (1, 'dup', 0);
SELECT nosuchcol
  FROM t;
\copy t FROM 'bad.csv' csv
DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$;
\set VERBOSITY verbose
SELECT 'x'::int;
\set VERBOSITY default
\copy (SELECT * FROM t ORDER BY id) TO 'out.csv' csv
BEGIN;
UPDATE t SET amount = 0 WHERE id = 1;
SELECT 1/0;
SELECT 1;
ROLLBACK;
SELECT * FROM t ORDER BY id;
\copy (SELECT id, name FROM t WHERE id > 100 ORDER BY id) TO 'out2.csv' csv header
DROP TABLE t;
SELECT 'done' AS status;
"""
IN_CSV = "".join(f'{i},"csv row {i}, with comma",{i}.125\n' for i in range(100, 600))
BAD_CSV = "700,ok,1\n701,ok,2\n1,duplicate key,3\n"


def _script_dir(root: Path) -> Path:
    root.mkdir()
    (root / "script.sql").write_text(SCRIPT)
    (root / "in.csv").write_text(IN_CSV)
    (root / "bad.csv").write_text(BAD_CSV)
    return root


def test_psql_f_script(direct: Target, via_proxy: Target, dbname: str, tmp_path: Path) -> None:
    """A multi-statement script with \\copy both ways, NOTICEs and errors in the middle (ON_ERROR_STOP=0)."""
    outputs = {}
    for target in (direct, via_proxy):
        where = _script_dir(tmp_path / target.name)
        # The script drops its table at the end, so both runs start from the same database state.
        outputs[target.name] = target.psql("-a", "-v", "ON_ERROR_STOP=0", "-f", "script.sql", dbname=dbname, cwd=where)
    proxied, plain = outputs["proxy"], outputs["direct"]
    assert plain.returncode == 0, plain.stderr
    assert "division by zero" in plain.stderr and "duplicate key" in plain.stderr  # the script did hit its errors
    assert "COPY 500" in plain.stdout and "done" in plain.stdout
    assert_same(plain, proxied)
    for name in ("out.csv", "out2.csv"):
        produced = (tmp_path / "proxy" / name).read_text()
        assert produced == (tmp_path / "direct" / name).read_text()
        assert produced
    assert (tmp_path / "proxy" / "out.csv").read_text().count("\n") == 2 + 11 + 500


def test_psql_f_on_error_stop(direct: Target, via_proxy: Target, dbname: str, tmp_path: Path) -> None:
    """ON_ERROR_STOP=1: psql stops at the first error with exit code 3, the same through the proxy."""
    results = []
    for target in (direct, via_proxy):
        where = _script_dir(tmp_path / target.name)
        results.append(target.psql("-v", "ON_ERROR_STOP=1", "-f", "script.sql", dbname=dbname, cwd=where))
        target.pg.psql("DROP TABLE IF EXISTS t", dbname=dbname)
    assert results[0].returncode == 3
    assert_same(*results)


PASSWORDS = {
    PgCluster.SCRAM_USER: PgCluster.SCRAM_PASSWORD,
    PgCluster.MD5_USER: PgCluster.MD5_PASSWORD,
    PgCluster.PW_USER: PgCluster.PW_PASSWORD,
}


@pytest.mark.parametrize("user", list(PASSWORDS))
def test_psql_password_auth(direct: Target, via_proxy: Target, dbname: str, user: str) -> None:
    """SCRAM (alice), md5 and cleartext password auth with PGPASSWORD: same result as direct."""
    sql = f"select current_user, session_user, current_database() = '{dbname}'"
    results = [t.psql("-A", "-c", sql, dbname=dbname, user=user, password=PASSWORDS[user]) for t in (direct, via_proxy)]
    assert results[0].returncode == 0, results[0].stderr
    assert f"{user}|{user}|t" in results[1].stdout
    assert_same(*results)


@pytest.mark.parametrize("user", list(PASSWORDS))
def test_psql_wrong_password(direct: Target, via_proxy: Target, user: str) -> None:
    """A wrong password: psql exits 2 with the same error text (only the port differs)."""
    results = [
        t.psql("-c", "select 1", dbname=SHARED_DB, user=user, password="wrong-password") for t in (direct, via_proxy)
    ]
    assert results[0].returncode == 2
    assert f'password authentication failed for user "{user}"' in results[1].stderr
    assert_same(*results)


def test_psql_no_password(direct: Target, via_proxy: Target) -> None:
    """No password at all (-w): libpq gives up the same way through the proxy."""
    user = PgCluster.SCRAM_USER
    results = [t.psql("-w", "-c", "select 1", dbname=SHARED_DB, user=user) for t in (direct, via_proxy)]
    assert results[0].returncode == 2
    assert_same(*results)


def test_psql_unknown_database(direct: Target, via_proxy: Target) -> None:
    results = [t.psql("-c", "select 1", dbname="no_such_db_e2e") for t in (direct, via_proxy)]
    assert results[0].returncode == 2
    assert 'database "no_such_db_e2e" does not exist' in results[1].stderr
    assert_same(*results)
