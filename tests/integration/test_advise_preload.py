"""`cacheproxy advise` against a server where pg_stat_statements is installed but not in shared_preload_libraries
(its own cluster: the session's must keep the extension loaded)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.pgcluster import PgCluster


def test_advise_says_when_pg_stat_statements_is_not_preloaded() -> None:
    cluster = PgCluster.start()
    try:
        cluster.psql("ALTER SYSTEM SET shared_preload_libraries = 'plpgsql'")
        cluster.restart()
        result = subprocess.run([sys.executable, "-m", "cacheproxy", "advise", "--upstream", cluster.url()],
                                capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        assert "is installed in database 'postgres' but not loaded" in result.stderr
        assert "shared_preload_libraries" in result.stderr and "restart PostgreSQL" in result.stderr
    finally:
        cluster.cleanup()
