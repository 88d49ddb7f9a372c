"""The `cacheproxy` command line as a subprocess: check-config, configuration errors, environment and flag overrides."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e.helpers import REPO_ROOT, CliProxy, Target, free_port, proxy_env, run
from tests.support.pgcluster import PgCluster

SECRET = "s3cret-Pa55word"


def cacheproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "cacheproxy", *args], proxy_env(env), cwd=REPO_ROOT, timeout=30)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_check_config_masks_password(tmp_path: Path) -> None:
    config = write(
        tmp_path / "good.yaml",
        f'listen: "127.0.0.1:7432"\nupstream: "postgres://alice:{SECRET}@db.example:5433/app?sslmode=disable"\n'
        "admin: {listen: off}\ncache: {max_memory: 64MiB, max_entry_size: 512KiB}\n",
    )
    result = cacheproxy("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "****" in result.stdout
    printed = yaml.safe_load(result.stdout)
    assert printed["listen"] == "127.0.0.1:7432"
    assert printed["upstream"].startswith("postgres://alice:****@db.example:5433/app")
    assert printed["admin"]["listen"] is None
    assert printed["cache"]["max_memory"] == "64MiB"


def test_check_config_masks_password_from_env(tmp_path: Path) -> None:
    """No --config at all: the upstream comes from CACHEPROXY_UPSTREAM and is masked the same way."""
    result = cacheproxy("check-config", env={"CACHEPROXY_UPSTREAM": f"postgresql://bob:{SECRET}@h/db"})
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "bob:****@h" in result.stdout


def test_check_config_example_file() -> None:
    """The shipped example configuration is valid."""
    result = cacheproxy("check-config", "--config", str(REPO_ROOT / "configs" / "cacheproxy.yaml"))
    assert result.returncode == 0, result.stderr


BAD_CONFIGS = {
    # name: (file text or None for a missing file, text the one error line must contain)
    "unknown_key": ('upstream: "postgres://u@h/d"\nlimits:\n  max_clients: 5\n', "limits.max_clients"),
    "unknown_top_key": ('upstream: "postgres://u@h/d"\nlisten_on: ":1"\n', "listen_on"),
    "bad_size": ('upstream: "postgres://u@h/d"\ncache:\n  max_memory: 12 potatoes\n', "cache.max_memory"),
    "bad_url": ('upstream: "mysqlx://u@h/d"\n', "upstream"),
    "bad_url_port": ('upstream: "postgres://u@h:99999/d"\n', "upstream"),
    "bad_duration": ('upstream: "postgres://u@h/d"\nshutdown: {timeout: soon}\n', "shutdown.timeout"),
    "missing_file": (None, "file not found"),
    "yaml_syntax": ('upstream: "postgres://u@h/d"\nlimits: [1, 2\n', "YAML"),
}


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config(tmp_path: Path, case: str, command: str) -> None:
    text, needle = BAD_CONFIGS[case]
    path = tmp_path / f"{case}.yaml"
    if text is not None:
        path.write_text(text)
    result = cacheproxy(command, "--config", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]
    assert needle in lines[0]
    assert result.stdout == ""


def test_bad_upstream_url_password_not_echoed(tmp_path: Path) -> None:
    """An invalid upstream URL that carries a password: the error line must not print the password."""
    path = write(tmp_path / "c.yaml", f'upstream: "postgres://u:{SECRET}@h:notaport/d"\n')
    result = cacheproxy("check-config", "--config", str(path))
    assert result.returncode == 2
    assert SECRET not in result.stderr + result.stdout


def test_run_from_environment_only(pg: PgCluster, tmp_path: Path) -> None:
    """`run` with no config file: upstream, listen and admin address all from CACHEPROXY_* variables."""
    port = free_port()
    env = {
        "CACHEPROXY_UPSTREAM": pg.url(),
        "CACHEPROXY_LISTEN": f"127.0.0.1:{port}",
        "CACHEPROXY_ADMIN_LISTEN": "off",
    }
    with CliProxy(tmp_path, env=env, port=port) as proxy:
        sql = "select 'via env', current_user"
        direct = Target("direct", pg, pg.host, pg.port).psql("-A", "-c", sql, dbname="postgres")
        proxied = Target.through(pg, proxy).psql("-A", "-c", sql, dbname="postgres")
        assert proxied.returncode == 0, proxied.stderr + proxy.log()
        assert proxied.stdout == direct.stdout
    assert proxy.process is not None and proxy.process.returncode == 0


def test_upstream_flag_overrides_environment(pg: PgCluster, tmp_path: Path) -> None:
    """--upstream beats CACHEPROXY_UPSTREAM (which points at a closed port here), and --listen beats the file."""
    dead = pg.url(port=free_port())
    port = free_port()
    file_listen = f"127.0.0.1:{free_port()}"
    config = write(tmp_path / "c.yaml", f'listen: "{file_listen}"\nupstream: "{dead}"\nadmin: {{listen: off}}\n')
    args = ["--upstream", pg.url(), "--listen", f"127.0.0.1:{port}"]
    with CliProxy(tmp_path, args=["--config", str(config), *args], env={"CACHEPROXY_UPSTREAM": dead}, port=port) as p:
        result = Target.through(pg, p).psql("-A", "-t", "-c", "select 'flag wins'", dbname="postgres")
        assert (result.returncode, result.stdout) == (0, "flag wins\n"), result.stderr + p.log()
        assert f":{pg.port}/" in p.wait_for_log("upstream ")


def test_environment_overrides_file(pg: PgCluster, tmp_path: Path) -> None:
    """CACHEPROXY_UPSTREAM beats the file's upstream."""
    dead = pg.url(port=free_port())
    port = free_port()
    config = write(tmp_path / "c.yaml", f'listen: "127.0.0.1:{port}"\nupstream: "{dead}"\nadmin: {{listen: off}}\n')
    with CliProxy(tmp_path, args=["--config", str(config)], env={"CACHEPROXY_UPSTREAM": pg.url()}, port=port) as p:
        result = Target.through(pg, p).psql("-A", "-t", "-c", "select 'env wins'", dbname="postgres")
        assert (result.returncode, result.stdout) == (0, "env wins\n"), result.stderr + p.log()


def test_unreachable_upstream_reaches_client(pg: PgCluster, tmp_path: Path) -> None:
    """Upstream down: the proxy still starts, and psql gets an error (exit 2) rather than a hang."""
    port = free_port()
    env = {"CACHEPROXY_UPSTREAM": pg.url(port=free_port()), "CACHEPROXY_LISTEN": f"127.0.0.1:{port}"}
    with CliProxy(tmp_path, args=["--admin-listen", "off"], env=env, port=port) as proxy:
        result = Target.through(pg, proxy).psql("-c", "select 1", dbname="postgres")
        assert result.returncode == 2, result.stdout
        assert "error" in result.stderr.lower()


def test_version() -> None:
    result = cacheproxy("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("cacheproxy ")


def _run_on_busy_port(*extra: str) -> subprocess.CompletedProcess[str]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--upstream", "postgres://u@127.0.0.1:1/d", "--listen", f"127.0.0.1:{port}", "--admin-listen", "off"]
        return cacheproxy("run", *args, *extra)


def test_run_port_in_use() -> None:
    """The listen port is taken: exit 1 with a one-line reason, no traceback."""
    result = _run_on_busy_port()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot start" in result.stderr and "address already in use" in result.stderr


def test_run_port_in_use_json() -> None:
    result = _run_on_busy_port("--log-format", "json")
    assert result.returncode == 1
    for line in result.stderr.splitlines():
        assert isinstance(json.loads(line), dict), line
