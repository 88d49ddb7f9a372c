"""`cacheproxy run` with a mariadb:// upstream, used by the `mariadb` command line client (auth switch to ed25519)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.helpers import CliProxy
from tests.support.mariadb import PASSWORD, USER, MariaDB

pytestmark = pytest.mark.skipif(shutil.which("mariadb") is None, reason="the mariadb client is not installed")


def mariadb_cli(port: int, user: str, password: str, database: str, sql: str) -> subprocess.CompletedProcess[str]:
    args = ["mariadb", "-h127.0.0.1", f"-P{port}", f"-u{user}", f"-p{password}", "--ssl=0", "-N", "-B", database]
    return subprocess.run([*args, "-e", sql], capture_output=True, text=True, timeout=60)


def test_mariadb_url_runs_the_mysql_front_end(tmp_path: Path, mariadb: MariaDB, mydb: str) -> None:
    with mariadb.root_connect() as root, root.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM information_schema.PLUGINS WHERE PLUGIN_NAME = 'ed25519'")
        if not cur.fetchone()[0]:
            cur.execute("INSTALL SONAME 'auth_ed25519'")
        cur.execute("CREATE USER IF NOT EXISTS 'edward'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('s3cret')")
        cur.execute(f"GRANT ALL ON `{mydb}`.* TO 'edward'@'%'")
    with mariadb.connect(mydb) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(10))")
        cur.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
    with CliProxy.with_config(tmp_path, mariadb.url(mydb)) as proxy:
        sql = "SELECT v FROM t ORDER BY id"
        direct = mariadb_cli(mariadb.port, USER, PASSWORD, mydb, sql)
        through = mariadb_cli(proxy.port, USER, PASSWORD, mydb, sql)
        assert through.returncode == 0, through.stderr + proxy.log()
        assert through.stdout == direct.stdout == "one\ntwo\n"
        # ed25519: the server greets with mysql_native_password, then switches the client to client_ed25519.
        ed = mariadb_cli(proxy.port, "edward", "s3cret", mydb, "SELECT CURRENT_USER(), v FROM t WHERE id = 2")
        assert ed.returncode == 0, ed.stderr
        assert ed.stdout == "edward@%\ttwo\n"
        wrong = mariadb_cli(proxy.port, "edward", "nope", mydb, "SELECT 1")
        assert wrong.returncode != 0 and "Access denied" in wrong.stderr  # the server's own error
        assert mariadb_cli(proxy.port, USER, PASSWORD, mydb, "SELECT 1").stdout == "1\n"  # the proxy survives


def test_check_config_accepts_mysql_urls(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text('upstream: "mysql://app:hush@db.internal/shop"\n')
    done = subprocess.run(
        ["python3", "-m", "cacheproxy", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert "mysql://app:****@db.internal/shop" in done.stdout and "hush" not in done.stdout
