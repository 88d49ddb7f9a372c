"""Secrets stay secret: no password (the upstream URL's, or a client's SCRAM, md5 or cleartext one, right or wrong)
appears in the proxy's log at debug level, in the admin /stats and /metrics, in `check-config` output, or in the
errors clients get when the server refuses them.

The proxy runs as a subprocess (`python -m cacheproxy run`) so that its whole log is what the process wrote.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.e2e.helpers import REPO_ROOT, CliProxy, free_port, proxy_env
from tests.support.pgcluster import PgCluster

UPSTREAM_USER, UPSTREAM_PASSWORD = PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD
CLIENTS = [
    (PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD),  # SCRAM-SHA-256
    (PgCluster.MD5_USER, PgCluster.MD5_PASSWORD),  # md5
    (PgCluster.PW_USER, PgCluster.PW_PASSWORD),  # cleartext password
]
WRONG_UPSTREAM_PASSWORD = "Upstream-Wr0ng-Pass"


def _wrong(user: str) -> str:
    return f"{user}-Wr0ng-Pass"


def secrets() -> list[str]:
    """Every password of the test, and bob's md5 inner hash (what an md5 client sends is derived from it)."""
    found = [password for _, password in CLIENTS] + [_wrong(user) for user, _ in CLIENTS] + [WRONG_UPSTREAM_PASSWORD]
    found.append(hashlib.md5((PgCluster.MD5_PASSWORD + PgCluster.MD5_USER).encode()).hexdigest())
    return found


def assert_no_secret(where: str, text: str) -> None:
    leaked = [secret for secret in secrets() if secret in text]
    assert not leaked, f"{where} shows {leaked}:\n{text[-3000:]}"


@pytest.fixture
def start_secret_proxy(pg: PgCluster, tmp_path: Path) -> Iterator[Callable[..., CliProxy]]:
    started: list[CliProxy] = []

    def start(upstream_password: str, **overrides: Any) -> CliProxy:
        sections: dict[str, Any] = {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "logging": {"level": "debug"}}
        proxy = CliProxy.with_config(tmp_path, pg.url(UPSTREAM_USER, upstream_password), **{**sections, **overrides})
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


def _admin_get(proxy: CliProxy, path: str) -> str:
    assert proxy.config_path is not None
    admin = yaml.safe_load(proxy.config_path.read_text())["admin"]["listen"]
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as response:
        return str(response.read().decode())


def test_passwords_never_in_logs_stats_or_client_errors(
    pg: PgCluster, dbname: str, start_secret_proxy: Callable[..., CliProxy]
) -> None:
    pg.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1); GRANT SELECT ON t TO PUBLIC", dbname=dbname)
    proxy = start_secret_proxy(UPSTREAM_PASSWORD)
    for user, password in CLIENTS:
        with psycopg.connect(pg.dsn(user, password, dbname, port=proxy.port), autocommit=True) as conn:
            for _ in range(2):  # a miss (the catalog is read as the upstream URL's user), then a hit
                assert conn.execute("SELECT id FROM t").fetchall() == [(1,)]
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(pg.dsn(user, _wrong(user), dbname, port=proxy.port)).close()
        assert "authentication failed" in str(refused.value)
        assert_no_secret(f"the error {user} got", str(refused.value))
    stats = _admin_get(proxy, "/stats")
    assert f"{UPSTREAM_USER}:****@" in stats  # the URL is shown, masked
    assert_no_secret("/stats", stats)
    metrics = _admin_get(proxy, "/metrics")
    assert "cacheproxy_cache_hits" in metrics
    assert_no_secret("/metrics", metrics)
    proxy.stop()
    log = proxy.log()
    assert " DEBUG " in log and "user=bob_md5" in log  # debug lines were written, and the sessions logged
    assert_no_secret("the proxy's log", log)


def test_upstream_refusing_the_proxys_own_password_is_logged_without_it(
    pg: PgCluster, dbname: str, start_secret_proxy: Callable[..., CliProxy]
) -> None:
    """The catalog is read with the upstream URL's credentials: when the server refuses them, the log says so."""
    pg.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", dbname=dbname)
    proxy = start_secret_proxy(WRONG_UPSTREAM_PASSWORD)
    with psycopg.connect(pg.dsn(dbname=dbname, port=proxy.port), autocommit=True) as conn:
        assert conn.execute("SELECT id FROM t").fetchall() == [(1,)]
    proxy.wait_for_log("could not be read")
    stats = _admin_get(proxy, "/stats")
    assert_no_secret("/stats", stats)
    proxy.stop()
    log = proxy.log()
    assert "password authentication failed" in log or "InvalidPassword" in log, log[-3000:]
    assert_no_secret("the proxy's log", log)


def _check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cacheproxy", "check-config", *args],
        env=proxy_env(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_masks_the_upstream_password(pg: PgCluster, tmp_path: Path) -> None:
    url = pg.url(UPSTREAM_USER, UPSTREAM_PASSWORD)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"upstream": url, "logging": {"level": "debug"}}))
    runs = {
        "file": _check_config("--config", str(config)),
        "flag": _check_config("--upstream", url, "--log-level", "debug"),
        "env": _check_config(env={"CACHEPROXY_UPSTREAM": url}),
        "${VAR}": _check_config("--config", str(_with_var(tmp_path)), env={"PGPASS_X": UPSTREAM_PASSWORD}),
    }
    for how, run in runs.items():
        assert run.returncode == 0, run.stderr
        assert f"{UPSTREAM_USER}:****@" in run.stdout, (how, run.stdout)
        assert_no_secret(f"check-config ({how})", run.stdout + run.stderr)
    # A configuration error next to the URL must not quote the URL either.
    bad = _check_config("--upstream", f"postgres://{UPSTREAM_USER}:{UPSTREAM_PASSWORD}@127.0.0.1:notaport/db")
    assert bad.returncode == 2
    assert "upstream" in bad.stderr
    assert_no_secret("check-config's error", bad.stdout + bad.stderr)


def _with_var(tmp_path: Path) -> Path:
    path = tmp_path / "var.yaml"
    path.write_text(f"upstream: postgres://{UPSTREAM_USER}:${{PGPASS_X}}@127.0.0.1:5999/postgres\n")
    return path


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_slow_query_log_does_not_show_a_password_set_by_sql(
    pg: PgCluster, start_secret_proxy: Callable[..., CliProxy], log_format: str
) -> None:
    """A client that sets a password in SQL (ALTER ROLE ... PASSWORD) through a proxy that logs slow queries."""
    logging = {"level": "debug", "slow_query": "0s", "format": log_format}
    proxy = start_secret_proxy(UPSTREAM_PASSWORD, logging=logging)
    user, password = CLIENTS[2]
    with psycopg.connect(pg.dsn(port=proxy.port), autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {user} PASSWORD '{password}'")  # unchanged: the same password again
        conn.execute("SELECT 1")
    proxy.wait_for_log("slow query")
    proxy.stop()
    log = proxy.log()
    assert f"ALTER ROLE {user} PASSWORD '****'" in log  # the statement is still logged, its password masked
    assert_no_secret("the proxy's log", log)
