"""The README's first command: `cacheproxy demo` runs to completion on this machine and its numbers add up."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_and_serves_hits() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cacheproxy", "demo", "--queries", "600"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mismatches: 0" in result.stdout
    found = re.search(r"600 queries over 500 hot rows, (\d+) reached PostgreSQL", result.stdout)
    assert found, result.stdout
    # Every distinct key misses once at most; repeated keys are hits.
    assert int(found.group(1)) < 600
