"""E2E helpers: cacheproxy as a real subprocess (`python -m cacheproxy run`), client targets, output normalising."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.support.pgcluster import PgCluster

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 10.0  # seconds for the proxy to accept TCP
STOP_TIMEOUT = 15.0  # seconds for SIGTERM to end it before we give up and SIGKILL
CLIENT_TIMEOUT = 60.0

# "session 3: client 127.0.0.1:5555 user=alice database=db application_name=psql"
OPENED_RE = re.compile(r"session (\d+): client (\S+) user=(\S*) database=")
# "session 3: closed after 0.012s (client 127.0.0.1:5555 user=alice): client sent Terminate"
CLOSED_RE = re.compile(r"session (\d+): closed after [\d.]+s \(client (\S+) user=(\S*)\): (.*)$")


class CliProxy:
    """One `python -m cacheproxy run` process; stderr (the log) goes to a file so tests can read it afterwards."""

    def __init__(
        self,
        workdir: Path,
        *,
        args: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port()
        self.workdir = workdir
        self.log_path = workdir / f"cacheproxy-{self.port}.log"
        self.config_path: Path | None = None
        cmd = [sys.executable, "-m", "cacheproxy", "run"]
        if config is not None:
            self.config_path = workdir / f"cacheproxy-{self.port}.yaml"
            self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
            cmd += ["--config", str(self.config_path)]
        self.cmd = [*cmd, *args]
        self.env = proxy_env(env)
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def with_config(cls, workdir: Path, upstream: str, *, args: Sequence[str] = (), **sections: Any) -> CliProxy:
        """A proxy with a generated YAML: listen on a free port, admin off, shutdown.timeout 5s, then `sections`."""
        port = free_port()
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{port}",
            "upstream": upstream,
            "admin": {"listen": "off"},
            "shutdown": {"timeout": "5s"},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return cls(workdir, args=args, config=config, port=port)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> CliProxy:
        # stdout goes to the same file: `run` prints nothing there, so every line in the file is a log line.
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO_ROOT
            )
        try:
            self._wait_accepting()
        except BaseException:
            self.stop()  # a context manager's __exit__ does not run when __enter__ fails
            raise
        return self

    def _wait_accepting(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"cacheproxy exited with {self.process.returncode} at startup:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"cacheproxy did not accept TCP on {self.port} within {START_TIMEOUT:g}s:\n{self.log()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown) to the process we started, if it is still running."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait; SIGKILL our own PID only if it outlives `timeout`. Returns the exit code."""
        if self.process is None:
            return None
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            if self.alive():
                self.process.kill()
            return self.process.wait(5)

    def __enter__(self) -> CliProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the log ---------------------------------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log().splitlines()

    def wait_for_log(self, needle: str, timeout: float = 5.0) -> str:
        """The first log line containing `needle`, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines():
                if needle in line:
                    return line
            if time.monotonic() > deadline:
                pytest.fail(f"no log line with {needle!r} within {timeout:g}s:\n{self.log()}")
            time.sleep(0.05)

    def sessions(self) -> dict[int, dict[str, Any]]:
        """Per session id: the opened line (user) and every closed line with its reason, parsed from the log."""
        sessions: dict[int, dict[str, Any]] = {}
        for line in self.log_lines():
            if opened := OPENED_RE.search(line):
                entry = sessions.setdefault(int(opened[1]), {"opened": 0, "closed": []})
                entry["opened"] += 1
                entry["user"] = opened[3]
            elif closed := CLOSED_RE.search(line):
                entry = sessions.setdefault(int(closed[1]), {"opened": 0, "closed": []})
                entry["closed"].append(closed[4])
        return sessions


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the proxy binds it right after; a lost race fails the start loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def proxy_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The proxy's environment: no CACHEPROXY_* or PG* leaking in from the machine, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEPROXY_", "PG"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO_ROOT), env.get("PYTHONPATH"))))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run(
    cmd: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None, timeout: float = CLIENT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd),
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


_PORT_RE = re.compile(r"\bport \d+\b")


def normalise(text: str) -> str:
    """Only what must differ between direct and proxied runs: the port number in libpq's messages."""
    return _PORT_RE.sub("port <port>", text)


class Target:
    """Where a client connects: Postgres itself or the proxy in front of it, with the same users and databases."""

    def __init__(self, name: str, pg: PgCluster, host: str, port: int, proxy: CliProxy | None = None) -> None:
        self.name = name
        self.pg = pg
        self.host = host
        self.port = port
        self.proxy = proxy

    def env(
        self, user: str = PgCluster.SUPERUSER, password: str | None = None, dbname: str = "postgres"
    ) -> dict[str, str]:
        env = self.pg.env(user, password, dbname)
        env.update(PGHOST=self.host, PGPORT=str(self.port))
        return env

    def url(self, user: str = PgCluster.SUPERUSER, password: str | None = None, dbname: str = "postgres") -> str:
        return self.pg.url(user, password, dbname, host=self.host, port=self.port)

    def psql(self, *args: str, dbname: str, cwd: Path | None = None, **env: Any) -> subprocess.CompletedProcess[str]:
        """`psql -X <args>`: no psqlrc, so both runs see the same settings."""
        return run(["psql", "-X", *args], self.env(dbname=dbname, **env), cwd=cwd)

    def __repr__(self) -> str:
        return f"<{self.name} {self.host}:{self.port}>"

    @classmethod
    def through(cls, pg: PgCluster, proxy: CliProxy) -> Target:
        return cls("proxy", pg, proxy.host, proxy.port, proxy)


def wait_active(pg: PgCluster, dbname: str, query: str, timeout: float = 5.0) -> None:
    """Wait until Postgres itself shows `query` running in `dbname` (so a signal or cancel lands mid-query)."""
    sql = "select count(*) from pg_stat_activity where datname = %s and state = 'active' and query = %s"
    deadline = time.monotonic() + timeout
    with psycopg.connect(pg.url(), autocommit=True) as admin:
        while True:
            row = admin.execute(sql, (dbname, query)).fetchone()
            if row and row[0]:
                return
            assert time.monotonic() < deadline, f"{query!r} never became active"
            time.sleep(0.02)
