"""What a MySQL session and the admin commands need of the front end (`MySQLServer`), so that imports point one way."""

from __future__ import annotations

import ssl
from collections.abc import Hashable, Iterable
from typing import Protocol

from cacheproxy.analysis.mysql import MyInfo
from cacheproxy.cache.engine import CacheEngine
from cacheproxy.config import Config
from cacheproxy.mysql.state import SessionState
from cacheproxy.observability.metrics import Metrics
from cacheproxy.policy.rules import Decision

TableId = tuple[str, str]
Plan = tuple[Hashable, frozenset[TableId], Decision]
# What `FrontEnd.plan` says when the statement's dependencies are not known yet (compared by identity).
PLAN_PENDING = "the dependencies of the statement are not known yet"


class FrontEnd(Protocol):
    """The shared parts of the MySQL front end: its cache, analysis, decisions and invalidations."""

    metrics: Metrics
    engine: CacheEngine | None
    max_packet: int
    tls_context: ssl.SSLContext | None  # offered to clients (tls.mode not disable)

    @property
    def config(self) -> Config: ...

    @property
    def client_count(self) -> int: ...

    def analyze(self, sql: bytes) -> MyInfo: ...

    def plan(
        self, state: SessionState, info: MyInfo, *, execute: bytes | None = None, sql: bytes = b""
    ) -> Plan | str | None: ...

    async def cache_plan(
        self, state: SessionState, info: MyInfo, *, execute: bytes | None = None, sql: bytes = b""
    ) -> Plan | str | None: ...

    def note_writes(self, state: SessionState, writes: frozenset[tuple[str | None, str]]) -> None: ...

    def invalidate(self, tables: Iterable[TableId], databases: Iterable[str]) -> None: ...

    def invalidate_databases(self, databases: Iterable[str], reason: str) -> None: ...

    def invalidate_all(self, reason: str) -> None: ...
