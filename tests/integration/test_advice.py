"""The rule advisor through a real proxy: a synthetic workload (a read-mostly lookup table, a write-heavy table, a slow
aggregate) is ranked as expected by CACHEPROXY SHOW ADVICE and GET /advice, and its rules are accepted by
`cacheproxy check-config` and do what they say."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import yaml

from cacheproxy.config import build_config
from cacheproxy.policy.rules import RuleSet
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread, proxy_config

SLOW = "SELECT s.region, count(*), sum(s.amount * p.weight) FROM sales s JOIN products p ON p.id = s.product GROUP BY 1"


def _setup(pg: PgCluster, dbname: str) -> None:
    pg.psql(
        "CREATE TABLE lookup (id int PRIMARY KEY, name text);"
        "INSERT INTO lookup SELECT g, 'name ' || g FROM generate_series(1, 50) g;"
        "CREATE TABLE events (id serial PRIMARY KEY, kind text);"
        "CREATE TABLE products (id int PRIMARY KEY, weight numeric);"
        "INSERT INTO products SELECT g, g % 7 + 1 FROM generate_series(1, 1000) g;"
        "CREATE TABLE sales (region int, product int, amount numeric);"
        "INSERT INTO sales SELECT g % 10, g % 1000 + 1, g % 97 FROM generate_series(1, 200000) g;"
        "ANALYZE",
        dbname=dbname,
    )


def _workload(conn: psycopg.Connection[Any]) -> None:
    for i in range(200):
        conn.execute(f"SELECT name FROM lookup WHERE id = {i % 10 + 1}").fetchall()
    conn.execute("UPDATE lookup SET name = 'renamed' WHERE id = 40")
    for i in range(30):
        conn.execute("SELECT count(*) FROM events WHERE kind = 'a'").fetchall()
        conn.execute(f"INSERT INTO events (kind) VALUES ('{'ab'[i % 2]}')")
    for _ in range(8):
        conn.execute(SLOW).fetchall()


def test_advice_ranks_a_synthetic_workload(pg: PgCluster, dbname: str, tmp_path: Path) -> None:
    _setup(pg, dbname)
    data = proxy_config(pg.url(), admin={"users": ["postgres"], "listen": "127.0.0.1:0"})
    with ProxyThread.from_mapping(data) as proxy:
        with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
            _workload(conn)
            rows = conn.execute("CACHEPROXY SHOW ADVICE").fetchall()
        assert proxy.app is not None and proxy.app.admin is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.app.admin.port}/advice", timeout=10) as reply:
            advice = json.loads(reply.read())

    statements = [s for s in advice["statements"] if s["database"] == dbname]
    # The slow aggregate saved the most (7 hits of tens of ms), then the lookup's point reads (190 cheap hits).
    assert "sales" in statements[0]["text"] and statements[0]["hits"] >= 5, statements
    assert statements[0]["would_save_s"] > 0 and "slow" in statements[0]["advice"]
    lookup = next(s for s in statements if s["tables"] == ["lookup"])
    assert lookup["hits"] >= 180 and lookup["calls"] == 200
    tables = {t["table"]: t for t in advice["tables"] if t["database"] == dbname}
    assert [t["table"] for t in advice["tables"] if t["database"] == dbname][:2] in (
        ["products", "sales"],
        ["sales", "products"],
    )
    assert tables["events"]["write_heavy"] and tables["events"]["strategy"] == "none"
    assert tables["events"]["writes"] == 30 and tables["events"]["reads"] == 30
    assert tables["lookup"]["strategy"] == "write_through" and tables["lookup"]["writes"] == 1
    assert not tables["lookup"]["write_heavy"]

    # The console shows the same ranking, and the rules as YAML in its last row.
    assert rows[0][0] == "statement" and "sales" in rows[0][1]
    assert rows[-1][0] == "rules" and rows[-1][-1] == advice["rules_yaml"]

    # The YAML is accepted by check-config, and says what the advice says.
    rules_yaml = advice["rules_yaml"]
    config_file = tmp_path / "advised.yaml"
    config_file.write_text(f"upstream: {pg.url()}\n{rules_yaml}")
    checked = subprocess.run(
        [sys.executable, "-m", "cacheproxy", "check-config", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    config = build_config(yaml.safe_load(config_file.read_text()))
    ruleset = RuleSet(config.rules, config.cache.default_ttl)
    assert not ruleset.decide([("public", "events")]).cacheable
    assert ruleset.decide([("public", "lookup")]).strategy == "write_through"
    slow = ruleset.decide([("public", "sales"), ("public", "products")], statements[0]["id"])
    assert slow.cacheable and slow.ttl == 300 and "fingerprint" in slow.rule


def test_reset_advice_starts_afresh(pg: PgCluster, dbname: str) -> None:
    _setup(pg, dbname)
    data = proxy_config(pg.url(), admin={"users": ["postgres"]})
    with (
        ProxyThread.from_mapping(data) as proxy,
        psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn,
    ):
        conn.execute("SELECT name FROM lookup WHERE id = 1").fetchall()
        before = [r for r in conn.execute("CACHEPROXY SHOW ADVICE").fetchall() if r[0] == "statement"]
        assert any("lookup" in r[1] for r in before)
        assert conn.execute("CACHEPROXY RESET ADVICE").statusmessage == "RESET ADVICE"
        after = [r for r in conn.execute("CACHEPROXY SHOW ADVICE").fetchall() if r[0] == "statement"]
        assert not any("lookup" in r[1] for r in after)
