"""Shared fixtures: one private PostgreSQL cluster per test session and a fresh database per test."""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ has no __init__.py, so make `tests.support` importable however pytest is launched
# (`python -m pytest` puts the cwd on sys.path, a bare `pytest` does not).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.support.pgcluster import PgCluster, quote_ident  # noqa: E402
from tests.support.proxy import ProxyThread, proxy_config  # noqa: E402

_PG_LOG_KEY = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def pg(request: pytest.FixtureRequest) -> Iterator[PgCluster]:
    """A private Postgres 15 on 127.0.0.1:<free port>, started once, removed at session end."""
    cluster = PgCluster.start()
    try:
        yield cluster
    finally:
        if request.session.testsfailed:
            # Read before cleanup() deletes it; printed by pytest_terminal_summary below.
            request.config.stash[_PG_LOG_KEY] = cluster.log_tail(80)
        cluster.cleanup()


@pytest.fixture
def dbname(pg: PgCluster) -> Iterator[str]:
    """A fresh database `t_<uuid8>` that every role may use; dropped (forcibly) after the test."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    pg.create_database(name)
    pg.psql(f"GRANT ALL ON DATABASE {quote_ident(name)} TO PUBLIC")
    pg.psql("GRANT ALL ON SCHEMA public TO PUBLIC", dbname=name)
    yield name
    # Hundreds of ~8 MB databases would pile up in /tmp otherwise. Best effort: a test may have
    # stopped the server on purpose.
    if pg.is_running():
        pg.drop_database(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, None]:
    """Attach the server log tail to each failed test that used the cluster."""
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "funcargs", {}).get("pg")
    if report.failed and isinstance(cluster, PgCluster):
        report.sections.append(("postgres log (tail)", cluster.log_tail(50)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    log = config.stash.get(_PG_LOG_KEY, None)
    if log:
        terminalreporter.section("postgres log (tail, session had failures)")
        terminalreporter.write_line(log)


# The proxy recovers from a bug in its own per-request code by relaying upstream ("cache lookup failed", "internal
# error"): the client still gets a right answer, so no assertion would notice. Such a record fails the test instead
# (a compiled-code TypeError hid this way once). Tests that provoke one on purpose are marked allow_internal_errors.
_BUG_MESSAGES = ("cache lookup failed", "internal error")


class _BugRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and any(text in record.getMessage() for text in _BUG_MESSAGES):
            self.records.append(record)


@pytest.fixture(autouse=True)
def _no_internal_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    handler = _BugRecords()
    logger = logging.getLogger("cacheproxy")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.records and request.node.get_closest_marker("allow_internal_errors") is None:
        first = handler.records[0]
        pytest.fail(
            f"the proxy logged {len(handler.records)} internal error(s), first: {first.getMessage()}\n"
            + logging.Formatter().formatException(first.exc_info)  # type: ignore[arg-type]
        )


# --- proxy fixtures (owned by the proxy author) ---


@pytest.fixture(scope="session")
def proxy(pg: PgCluster) -> Iterator[ProxyThread]:
    """One in-process cacheproxy in front of `pg` for the session (tests that need their own use `start_proxy`)."""
    with ProxyThread.from_mapping(proxy_config(pg.url(dbname="postgres"))) as running:
        yield running


@pytest.fixture(scope="session")
def cache_off_proxy(pg: PgCluster) -> Iterator[ProxyThread]:
    """The same with `cache.enabled: false`: sessions relayed by proxy/plain_relay.py, not the caching relay."""
    with ProxyThread.from_mapping(proxy_config(pg.url(dbname="postgres"), cache={"enabled": False})) as running:
        yield running


@pytest.fixture
def start_proxy(pg: PgCluster) -> Iterator[Callable[..., ProxyThread]]:
    """Start a private proxy with config overrides, e.g. `start_proxy(limits={"max_client_connections": 2})`."""
    started: list[ProxyThread] = []

    def start(upstream: str | None = None, **sections: Any) -> ProxyThread:
        running = ProxyThread.from_mapping(proxy_config(upstream or pg.url(dbname="postgres"), **sections))
        started.append(running.start())
        return running

    yield start
    for running in started:
        running.stop()


# --- MySQL / MariaDB fixtures (owned by the MySQL front end, cacheproxy/mysql) ---


@pytest.fixture(scope="session")
def mariadb() -> Iterator[Any]:
    """A private MariaDB on 127.0.0.1:<free port> (never the one on 3306), started once for the session."""
    from tests.support.mariadb import MariaDB

    server = MariaDB.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mydb(mariadb: Any) -> Iterator[str]:
    """A fresh MariaDB database `m_<uuid8>`, dropped after the test."""
    name = f"m_{uuid.uuid4().hex[:8]}"
    mariadb.create_database(name)
    yield name
    mariadb.drop_database(name)
