"""E2E fixtures: cacheproxy started as a real subprocess, and client targets (direct / through the proxy).

Every e2e test runs the same client command twice, straight at Postgres and through the proxy, and compares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import CliProxy, Target
from tests.support.pgcluster import PgCluster

_STARTED = pytest.StashKey[list[CliProxy]]()


@pytest.fixture
def start_cli_proxy(pg: PgCluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., CliProxy]]:
    """Start `python -m cacheproxy run` with a generated config, e.g. `start_cli_proxy(shutdown={"timeout": "1s"})`.

    All started proxies get SIGTERM (and only if that fails, SIGKILL by their own PID) at teardown.
    """
    started: list[CliProxy] = []
    request.node.stash[_STARTED] = started

    def start(upstream: str | None = None, *, args: Sequence[str] = (), **sections: Any) -> CliProxy:
        proxy = CliProxy.with_config(tmp_path, upstream or pg.url(), args=args, **sections)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def cli_proxy(start_cli_proxy: Callable[..., CliProxy]) -> CliProxy:
    """A subprocess proxy in front of `pg` with the default e2e config."""
    return start_cli_proxy()


@pytest.fixture(scope="module")
def module_proxy(pg: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliProxy]:
    """One subprocess proxy shared by a module's tests (each test still gets its own database)."""
    with CliProxy.with_config(tmp_path_factory.mktemp("proxy"), pg.url()) as proxy:
        yield proxy


@pytest.fixture
def direct(pg: PgCluster) -> Target:
    return Target("direct", pg, pg.host, pg.port)


@pytest.fixture
def via_proxy(pg: PgCluster, cli_proxy: CliProxy) -> Target:
    return Target.through(pg, cli_proxy)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """Attach the proxy's log to each failed e2e test that started one."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed:
        funcargs = getattr(item, "funcargs", {})
        started: list[CliProxy] = item.stash.get(_STARTED, [])
        proxies = list(started)
        proxies += [v for v in funcargs.values() if isinstance(v, CliProxy) and v not in proxies]
        proxies += [v.proxy for v in funcargs.values() if isinstance(v, Target) and v.proxy and v.proxy not in proxies]
        with contextlib.suppress(Exception):
            for proxy in proxies:
                report.sections.append((f"cacheproxy log ({proxy.port})", proxy.log()[-8000:]))
