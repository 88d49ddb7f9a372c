"""The small interfaces the relay and the admin console depend on (typing.Protocol), instead of Session and
ProxyServer: imports then point one way (server -> session -> caching relay; server -> admin console)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

from cacheproxy.config import Config
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.listens import Listens
from cacheproxy.proxy.transaction import TransactionTracker


class RelayHost(Protocol):
    """What the caching relay needs of its session: who it is, its transaction state, and flow control."""

    @property
    def id(self) -> int: ...

    @property
    def database(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def startup_parameters(self) -> Mapping[str, str]: ...

    @property
    def parameters(self) -> Mapping[str, str]:
        """The values the server reported by ParameterStatus."""
        ...

    @property
    def transaction(self) -> TransactionTracker: ...

    @property
    def listens(self) -> Listens:
        """The session's LISTEN/UNLISTEN statements (for a re-attach after a failover)."""
        ...

    def note_parameter(self, body: bytes) -> None: ...

    def note_error(self, body: bytes) -> None: ...

    def admin_command(self, sql: bytes) -> bytes:
        """Run a CACHEPROXY command; its replies without ReadyForQuery."""
        ...

    def client_backlogged(self) -> bool: ...

    def pause_client(self) -> None: ...

    def resume_client(self) -> None: ...

    def spawn(self, coro: Coroutine[object, object, None]) -> None: ...

    def run_guarded(self, fn: Callable[[], None]) -> None: ...


class ConsoleSession(Protocol):
    """What the admin console needs of the session a command came from."""

    @property
    def peer(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def database(self) -> str: ...

    def explain(self, sql: bytes) -> list[tuple[str, str]]: ...

    def acknowledge_after(self, task: asyncio.Task[Any]) -> None:
        """Hold the command's reply until `task` (a shared-tier generation bump) is done."""


class ConsoleServer(Protocol):
    """What the admin console needs of the proxy: its configuration, cache, clients, reload and snapshots."""

    @property
    def config(self) -> Config: ...

    @property
    def cache(self) -> CacheService | None: ...

    @property
    def client_count(self) -> int: ...

    @property
    def snapshot(self) -> Callable[[], Awaitable[str]] | None: ...

    def reload(self) -> str: ...
