"""Rules that name statements (by fingerprint id, by SQL text, by pg_stat_statements queryid) change the TTL or turn
caching off for that statement only, win over the table's rule, and EXPLAIN says which rule applied. Also
`cacheproxy advise` against the test cluster, and its message when pg_stat_statements is missing."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
import yaml

from cacheproxy.advice.statements import statement_id
from tests.support.cachetest import create_items, new_marker, upstream_calls
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config


def _explain(conn: psycopg.Connection[Any], sql: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in conn.execute(f"CACHEPROXY EXPLAIN {sql}").fetchall()}


def _run(conn: psycopg.Connection[Any], sql: str, times: int = 3) -> None:
    for _ in range(times):
        conn.execute(sql).fetchall()


def test_fingerprint_rules_change_ttl_or_turn_caching_off(pg: PgCluster, dbname: str) -> None:
    create_items(pg, dbname)
    off, longer, other = new_marker(), new_marker(), new_marker()
    off_sql = f"SELECT name AS {off} FROM items WHERE id = 3"
    longer_sql = f"SELECT price AS {longer} FROM items WHERE id = 4"
    other_sql = f"SELECT tags AS {other} FROM items WHERE id = 5"
    rules = [
        {"fingerprints": [statement_id(off_sql)], "strategy": "none"},  # by id, as SHOW ADVICE shows it
        # By SQL text: another literal, and a $1 parameter, name the same statement.
        {"fingerprints": [f"SELECT price AS {longer} FROM items WHERE id = $1"], "ttl": "7m"},
        {"tables": ["items"], "ttl": "30s"},
    ]
    data = proxy_config(pg.url(), admin={"users": ["postgres"]}, rules=rules)
    with (
        ProxyThread.from_mapping(data) as proxy,
        psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn,
    ):
        for sql in (off_sql, longer_sql, other_sql):
            _run(conn, sql)
        assert upstream_calls(pg, off) == 3  # never cached
        assert upstream_calls(pg, longer) == 1
        assert upstream_calls(pg, other) == 1
        explained = _explain(conn, off_sql)
        assert explained["cacheable"] == "no" and explained["statement"] == statement_id(off_sql)
        assert explained["rule"] == f"rules[0] (fingerprint {statement_id(off_sql)})"
        explained = _explain(conn, longer_sql.replace("= 4", "= 9"))
        assert explained["cacheable"] == "yes" and explained["ttl"] == "420s"
        assert explained["rule"].startswith("rules[1] (fingerprint ")
        explained = _explain(conn, other_sql)
        assert explained["ttl"] == "30s" and explained["rule"] == "rules[2] (items)"
        shown = conn.execute("CACHEPROXY SHOW RULES").fetchall()
        assert shown[0][1] == f"fingerprint {statement_id(off_sql)}" and shown[0][3] == "none"
        ages = {row[0]: row for row in conn.execute("CACHEPROXY SHOW CACHES 50").fetchall()}
        assert float(next(r for q, r in ages.items() if longer in q)[5]) > 60  # TTL left: the statement's 7m


def test_a_statement_rule_wins_over_the_tables_none(pg: PgCluster, dbname: str) -> None:
    create_items(pg, dbname)
    marker = new_marker()
    sql = f"SELECT name AS {marker} FROM items WHERE id = 7"
    rules = [{"tables": ["items"], "strategy": "none"}, {"fingerprints": [sql], "ttl": "1m"}]
    data = proxy_config(pg.url(), admin={"users": ["postgres"]}, rules=rules)
    with (
        ProxyThread.from_mapping(data) as proxy,
        psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn,
    ):
        _run(conn, sql)
        _run(conn, f"SELECT id AS {marker}_b FROM items WHERE id = 7")
        assert upstream_calls(pg, marker + "_b") == 3  # the table's none
        # (the marker is in both statements) the statement's own rule: cached
        assert upstream_calls(pg, marker) - upstream_calls(pg, marker + "_b") == 1
        assert _explain(conn, sql)["rule"].startswith("rules[1] (fingerprint")


def test_queryid_rules_resolve_through_pg_stat_statements(pg: PgCluster, dbname: str) -> None:
    create_items(pg, dbname)
    marker = new_marker()
    sql = f"SELECT name AS {marker} FROM items WHERE id = 11"
    pg.psql(sql, dbname=dbname)  # so that pg_stat_statements knows it
    queryid = int(pg.psql(f"SELECT queryid FROM pg_stat_statements WHERE query LIKE '%{marker}%'").strip())
    data = proxy_config(pg.url(), admin={"users": ["postgres"]}, rules=[{"queryids": [queryid], "strategy": "none"}])
    with (
        ProxyThread.from_mapping(data) as proxy,
        psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn,
    ):
        _run(conn, sql.replace("= 11", "= 12"))  # another literal: the same queryid
        _run(conn, f"SELECT price AS {marker}_b FROM items WHERE id = 12")
        assert upstream_calls(pg, marker) - upstream_calls(pg, marker + "_b") == 1 + 3
        assert upstream_calls(pg, marker + "_b") == 1
        explained = _explain(conn, sql)
        assert explained["cacheable"] == "no" and explained["rule"] == f"rules[0] (queryid {queryid})"


def test_statement_rules_pass_check_config(tmp_path: Any) -> None:
    path = tmp_path / "rules.yaml"
    rules = [{"fingerprints": ["0123456789abcdef", "SELECT 1"], "ttl": "5m"}, {"queryids": [-42], "strategy": "none"}]
    path.write_text(yaml.safe_dump({"upstream": "postgres://u@127.0.0.1:1/db", "rules": rules}))
    result = subprocess.run([sys.executable, "-m", "cacheproxy", "check-config", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)["rules"]
    assert shown[0]["fingerprints"] == ["0123456789abcdef", "SELECT 1"] and shown[1]["queryids"] == [-42]
    path.write_text(yaml.safe_dump({"upstream": "postgres://u@h/db", "rules": [{"tables": ["t"], "queryids": [1]}]}))
    result = subprocess.run([sys.executable, "-m", "cacheproxy", "check-config", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2 and "not both" in result.stderr


def _advise(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cacheproxy", "advise", *args], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def test_advise_reads_pg_stat_statements(pg: PgCluster, dbname: str, tmp_path: Any) -> None:
    create_items(pg, dbname)
    pg.psql(
        "CREATE TABLE hits (id int PRIMARY KEY, n int); INSERT INTO hits SELECT g, 0 FROM generate_series(1, 100) g;"
        + "".join(f"SELECT name FROM items WHERE id = {i % 50 + 1};" for i in range(120))
        + "".join(f"UPDATE hits SET n = n + 1 WHERE id = {i};SELECT n FROM hits WHERE id = {i};" for i in range(40)),
        dbname=dbname,
    )
    result = _advise("--upstream", pg.url(dbname=dbname))
    assert result.returncode == 0, result.stderr
    assert "Rules to paste" in result.stdout
    rules_yaml = result.stdout.split("cacheproxy check-config accepts them):\n", 1)[1]
    rules = yaml.safe_load(rules_yaml)["rules"]
    assert {"tables": ["hits"], "strategy": "none"} in rules  # as often written as read
    assert any(r.get("tables") == ["items"] and r["ttl"] == "10m" for r in rules)  # hot, never written
    path = tmp_path / "advised.yaml"
    path.write_text(f"upstream: {pg.url()}\n{rules_yaml}")
    checked = subprocess.run([sys.executable, "-m", "cacheproxy", "check-config", "--config", str(path)],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_advise_says_when_pg_stat_statements_is_missing(pg: PgCluster) -> None:
    name = f"bare_{new_marker()}"
    pg.psql(f"CREATE DATABASE {name} TEMPLATE template0")  # template1 has the extension; template0 does not
    try:
        result = _advise("--upstream", pg.url(dbname=name))
        assert result.returncode == 1
        assert "pg_stat_statements is not installed in database" in result.stderr
        assert "shared_preload_libraries" in result.stderr and "CREATE EXTENSION" in result.stderr
    finally:
        pg.drop_database(name)
