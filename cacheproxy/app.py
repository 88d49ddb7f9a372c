"""The application: builds the parts from one Config, starts them, and owns the one shutdown order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from cacheproxy.config import Config
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.server import ProxyServer

log = logging.getLogger("cacheproxy.app")


class App:
    """cacheproxy as a whole: today the proxy listener; later issues add the cache, admin HTTP and snapshots."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.cache = CacheService(config) if config.cache.enabled else None
        self.proxy = ProxyServer(config, self.cache)
        self._stopped = asyncio.Event()

    @property
    def port(self) -> int:
        return self.proxy.port

    async def start(self) -> None:
        log.info("upstream %s", self.config.upstream.masked_url())
        if self.cache is not None:
            self.cache.start()
        await self.proxy.start()

    async def stop(self, reason: str = "the proxy is shutting down") -> None:
        """Stop accepting, let in-flight work finish up to `shutdown.timeout`, then close everything."""
        await self.proxy.shutdown(self.config.shutdown.timeout, reason)
        if self.cache is not None:
            await self.cache.stop()
        self._stopped.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop gracefully (the CLI's `run`)."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, sig, stop_requested)
        try:
            await stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
        await self.stop()


def _on_signal(sig: signal.Signals, stop_requested: asyncio.Event) -> None:
    log.info("received %s: shutting down", sig.name)
    stop_requested.set()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (it is a dependency on Linux), else the standard loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
