"""The subprocess proxy's log: one line per connection opened and closed, no secrets, valid JSON with --log-format."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.e2e.helpers import CliProxy, Target
from tests.support.pgcluster import PgCluster

PASSWORDS = {
    PgCluster.SCRAM_USER: PgCluster.SCRAM_PASSWORD,
    PgCluster.MD5_USER: PgCluster.MD5_PASSWORD,
    PgCluster.PW_USER: PgCluster.PW_PASSWORD,  # cleartext on the wire: the proxy sees it as-is
}


def exercise(pg: PgCluster, proxy: CliProxy, dbname: str) -> None:
    """A few sessions: each password user, a wrong password, a query error; then a graceful stop."""
    target = Target.through(pg, proxy)
    for user, password in PASSWORDS.items():
        result = target.psql("-c", "select 1", dbname=dbname, user=user, password=password)
        assert result.returncode == 0, result.stderr
    wrong = target.psql("-c", "select 1", dbname=dbname, user=PgCluster.SCRAM_USER, password="not-" + "the-password")
    assert wrong.returncode == 2
    failing = target.psql("-c", "select 1/0", dbname=dbname)
    assert failing.returncode == 1
    assert proxy.stop() == 0


@pytest.mark.parametrize("level", ["info", "debug"])
def test_log_lines_per_session_and_no_secrets(
    pg: PgCluster, dbname: str, start_cli_proxy: Callable[..., CliProxy], level: str
) -> None:
    # The upstream URL carries the SCRAM password too: the proxy logs that URL, masked.
    upstream = pg.url(PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD)
    proxy = start_cli_proxy(upstream, args=["--log-level", level])
    exercise(pg, proxy, dbname)
    assert f"{PgCluster.SCRAM_USER}:****@" in proxy.wait_for_log("upstream ")
    log = proxy.log()
    for password in PASSWORDS.values():
        assert password not in log
    assert "Traceback" not in log
    sessions = {sid: entry for sid, entry in proxy.sessions().items() if entry["opened"]}
    # 3 logins, 1 wrong password, 1 query error: five client sessions, each opened once and closed once.
    assert len(sessions) == 5, log
    users = sorted(entry["user"] for entry in sessions.values())
    assert users == sorted([*PASSWORDS, PgCluster.SCRAM_USER, PgCluster.SUPERUSER])
    for sid, entry in sessions.items():
        assert entry["opened"] == 1, f"session {sid}: {entry}"
        assert len(entry["closed"]) == 1, f"session {sid}: {entry}"
        assert entry["closed"][0].strip(), f"session {sid} closed without a reason"
    reasons = sorted(entry["closed"][0] for entry in sessions.values())
    assert sum("password authentication failed" in reason for reason in reasons) == 1, reasons
    assert sum(reason == "client sent Terminate" for reason in reasons) == 4, reasons


def test_log_format_json(pg: PgCluster, dbname: str, start_cli_proxy: Callable[..., CliProxy]) -> None:
    proxy = start_cli_proxy(args=["--log-format", "json"])
    exercise(pg, proxy, dbname)
    lines = proxy.log_lines()
    assert lines
    entries = []
    for line in lines:
        entry = json.loads(line)  # every stderr line, not just most of them
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), line
        entries.append(entry)
    messages = [entry["msg"] for entry in entries]
    assert sum(" closed after " in msg for msg in messages) >= 5
    assert any(msg.startswith("listening on ") for msg in messages)
    assert messages[-1] == "shutdown complete"
    for password in PASSWORDS.values():
        assert password not in proxy.log()


def test_log_format_json_from_config(pg: PgCluster, dbname: str, start_cli_proxy: Callable[..., CliProxy]) -> None:
    """logging.format: json in the file works like the flag."""
    proxy = start_cli_proxy(logging={"format": "json", "level": "debug"})
    exercise(pg, proxy, dbname)
    for line in proxy.log_lines():
        assert isinstance(json.loads(line), dict), line
