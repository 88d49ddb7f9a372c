"""Runs a cacheproxy App in-process on its own thread and event loop, so sync drivers and subprocesses can use it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from cacheproxy.app import App, new_event_loop
from cacheproxy.config import Config, build_config


class ProxyThread:
    """An App on a background thread. `host`/`port` are where clients connect; `stop()` shuts it down gracefully."""

    def __init__(self, config: Config, load_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.load_config = load_config
        self.app: App | None = None
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cacheproxy-test", daemon=True)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ProxyThread:
        return cls(build_config(dict(data), source="<test>"))

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        assert self.app is not None
        return self.app.port

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the proxy's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> ProxyThread:
        self._thread.start()

        async def start() -> App:
            app = App(self.config, self.load_config)
            await app.start()
            return app

        self.app = self.call(start())
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop.is_closed():
            return  # stopped already (a test may stop it before its fixture does)
        if self.app is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                self.call(self.app.stop(), timeout=timeout + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def proxy_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    """A config mapping for tests: ephemeral listen port, admin HTTP off, short shutdown."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "upstream": upstream_url,
        "admin": {"listen": None},
        "shutdown": {"timeout": "5s"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def through_both_relays() -> Any:
    """A module's `proxy` fixture that runs each of its tests through the caching relay and through the cache-off
    one (proxy/plain_relay.py): `proxy = through_both_relays()` in a test module. (The session's `proxy`, cache on,
    and `cache_off_proxy` are tests/conftest.py's.)"""

    @pytest.fixture(scope="module", params=["cache on", "cache off"])
    def proxy(request: pytest.FixtureRequest, proxy: ProxyThread) -> ProxyThread:
        if request.param == "cache off":
            off: ProxyThread = request.getfixturevalue("cache_off_proxy")
            return off
        return proxy

    return proxy
