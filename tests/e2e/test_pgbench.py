"""pgbench through the subprocess proxy: init, select-only and TPC-B-like runs in all three query modes.

pgbench's numbers cannot equal a direct run's, so the comparison with Postgres is on the data it leaves: table
counts and balances read straight from Postgres and through the proxy must agree, and the TPC-B invariant (every
balance change is logged in pgbench_history) must hold, which it cannot if the relay dropped or duplicated work.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.helpers import CliProxy, Target, run
from tests.support.pgcluster import PgCluster

MODES = ("simple", "extended", "prepared")
# 6 runs x 2 s keeps the whole module near 15 s.
RUN_ARGS = ("-c", "4", "-j", "2", "-T", "2", "-n")  # -n: no vacuum before the run (init already did it)


@dataclass
class Bench:
    db: str
    direct: Target
    proxied: Target
    init: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def bench(pg: PgCluster, module_proxy: CliProxy) -> Iterator[Bench]:
    """A database initialised with `pgbench -i -s 1` through the proxy, shared by this module's runs."""
    db = f"bench_{uuid.uuid4().hex[:8]}"
    pg.create_database(db)
    proxied = Target.through(pg, module_proxy)
    init = run(["pgbench", "-i", "-s", "1", "-q", db], proxied.env(dbname=db))
    try:
        yield Bench(db, Target("direct", pg, pg.host, pg.port), proxied, init)
    finally:
        if pg.is_running():
            pg.drop_database(db)


def pgbench(target: Target, db: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run(["pgbench", *RUN_ARGS, *args, db], target.env(dbname=db))


def field(output: str, pattern: str) -> str:
    match = re.search(pattern, output, re.MULTILINE)
    assert match, f"{pattern!r} not in pgbench output:\n{output}"
    return match[1]


def check_run(result: subprocess.CompletedProcess[str], label: str) -> None:
    assert result.returncode == 0, f"pgbench exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert field(result.stdout, r"^number of failed transactions: (\d+)") == "0", result.stdout
    processed = int(field(result.stdout, r"^number of transactions actually processed: (\d+)"))
    assert processed >= 1, result.stdout
    tps = field(result.stdout, r"^tps = ([\d.]+)")
    print(f"pgbench {label}: {processed} transactions, tps = {tps}")


def query(target: Target, db: str, sql: str) -> str:
    result = target.psql("-A", "-t", "-c", sql, dbname=db)
    assert result.returncode == 0, result.stderr
    return result.stdout


SUMS = (
    "select (select sum(abalance) from pgbench_accounts), (select sum(delta) from pgbench_history),"
    " (select sum(tbalance) from pgbench_tellers), (select sum(bbalance) from pgbench_branches),"
    " (select count(*) from pgbench_history)"
)


def test_pgbench_init(bench: Bench) -> None:
    assert bench.init.returncode == 0, bench.init.stderr
    counts = (
        "select (select count(*) from pgbench_accounts), (select count(*) from pgbench_tellers),"
        " (select count(*) from pgbench_branches), (select count(*) from pgbench_history)"
    )
    through_proxy = query(bench.proxied, bench.db, counts)
    assert through_proxy == "100000|10|1|0\n"
    assert through_proxy == query(bench.direct, bench.db, counts)
    # The primary keys (created by -i through the proxy) are there.
    index_sql = "select count(*) from pg_indexes where tablename like 'pgbench_%' and indexname like '%_pkey'"
    assert query(bench.direct, bench.db, index_sql) == "3\n"


@pytest.mark.parametrize("mode", MODES)
def test_pgbench_select_only(bench: Bench, mode: str) -> None:
    check_run(pgbench(bench.proxied, bench.db, "-S", "-M", mode), f"-S -M {mode}")


@pytest.mark.parametrize("mode", MODES)
def test_pgbench_tpcb(bench: Bench, mode: str) -> None:
    check_run(pgbench(bench.proxied, bench.db, "-M", mode), f"tpcb-like -M {mode}")
    sums = query(bench.direct, bench.db, SUMS)
    assert sums == query(bench.proxied, bench.db, SUMS)
    accounts, history, tellers, branches, rows = sums.strip().split("|")
    assert int(rows) > 0
    # Each transaction adds the same delta to one account, teller and branch and logs it once in the history.
    assert accounts == history == tellers == branches, sums
