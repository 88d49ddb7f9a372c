"""The README's first command: `cacheproxy demo` runs to completion on this machine and what it shows adds up: the
expensive query reaches PostgreSQL once through the proxy with the same rows, the write is seen by the next read,
the lookups hit, and the advice it prints is a rules block that the configuration accepts and that names the demo's
expensive statement, its write-heavy table and its hot lookup table."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import yaml

from cacheproxy.advice.statements import statement_id
from cacheproxy.config import build_config
from cacheproxy.demo.run import _EXPENSIVE, _RUNS


def test_demo_runs_and_shows_what_a_cache_is_for() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cacheproxy", "demo", "--queries", "600"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr

    # 1. The expensive query: every direct run reaches PostgreSQL; through the proxy, only the misses do.
    direct = re.search(rf"direct\s+{_RUNS}\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+|n/a)", out)
    assert direct, out
    assert int(direct.group(3)) == _RUNS
    found = re.search(rf"through the proxy: (\d+) of {_RUNS} runs reached PostgreSQL", out)
    assert found, out
    assert 1 <= int(found.group(1)) < _RUNS // 2
    assert "rows identical to direct: yes (8 rows)" in out
    # 2. The write: the next read is fresh, and differs from before.
    assert "fresh (same as direct): yes" in out
    revenue = re.search(r"c3 revenue ([\d.]+) -> ([\d.]+)", out)
    assert revenue and float(revenue.group(2)) == 2 * float(revenue.group(1))
    # 3. Lookups: every distinct key misses once at most; repeated keys are hits.
    assert "mismatches: 0" in out
    lookups = re.search(r"600 queries over 100 hot products, (\d+) reached PostgreSQL", out)
    assert lookups and int(lookups.group(1)) < 600, out

    # 5. The advice: a rules block, accepted by the configuration, naming what the workload calls for.
    block = out.split("(`cacheproxy check-config` accepts them):\n", 1)[1].split("\n\n", 1)[0]
    rules = yaml.safe_load(textwrap.dedent(block))["rules"]
    build_config({"upstream": "postgres://u@127.0.0.1/db", "rules": rules})
    assert {"fingerprints": [statement_id(_EXPENSIVE)], "ttl": "5m", "strategy": "lazy"} in rules
    assert {"tables": ["events"], "strategy": "none"} in rules
    assert {"tables": ["products"], "ttl": "10m", "strategy": "write_through"} in rules
