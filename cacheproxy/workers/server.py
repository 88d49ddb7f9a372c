"""WorkerProxyServer and WorkerAdminConsole: a worker's listener (one of several on the same port) and its console.

The listener binds the listen address with SO_REUSEPORT, as every worker does: the kernel spreads new connections
over the workers' sockets (by a hash of the client's address and port), with no process in between.

Cancel keys: a CancelRequest arrives on a new connection, which the kernel may give to any worker. A worker that
does not own the key sends it to all the others over the in-host channel, and the one that owns it forwards it
upstream. (Rather than putting the worker's number in the key: the secret keeps all its 32 random bits, and
cancels are rare enough that N - 1 datagrams each cost nothing.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from cacheproxy.config import Config
from cacheproxy.observability.metrics import Metrics
from cacheproxy.proxy.admin_console import AdminConsole, _table
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.interfaces import ConsoleSession
from cacheproxy.proxy.server import ProxyServer, _fmt
from cacheproxy.proxy.session import Session
from cacheproxy.upstream import READ_LIMIT
from cacheproxy.workers.control import Field, WorkerTable

if TYPE_CHECKING:
    from cacheproxy.workers.channel import PeerChannel

log = logging.getLogger("cacheproxy.server")


class WorkerProxyServer(ProxyServer):
    """ProxyServer for worker `index` of `count` (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        cache: CacheService | None,
        reload: Callable[[], str] | None,
        metrics: Metrics,
        snapshot: Callable[[], Awaitable[str]] | None,
        *,
        index: int,
        count: int,
        table: WorkerTable,
        channel: PeerChannel,
    ) -> None:
        super().__init__(config, cache, reload, metrics, snapshot=snapshot)
        self.index = index
        self.count = count
        self.table = table
        self.channel = channel
        # Session ids unique across the workers (log lines name sessions by id): worker i numbers i+1, i+1+N, ...
        self._ids = itertools.count(index + 1, count)
        self.admin_console = WorkerAdminConsole(self)
        self._cancels: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        listen = self.config.listen
        self._server = await asyncio.start_server(
            self._on_connect, listen.host, listen.port, limit=READ_LIMIT, reuse_address=True, reuse_port=True
        )
        log.info(
            "worker %d (pid %d) listening on %s",
            self.index,
            os.getpid(),
            ", ".join(_fmt(s.getsockname()) for s in self.sockets),
        )

    def admit(self, session: Session) -> None:
        super().admit(session)
        self.table.set(self.index, Field.CLIENTS, self.client_count)
        self.table.add(self.index, Field.CLIENTS_TOTAL, 1)

    def forget(self, session: Session) -> None:
        super().forget(session)
        self.table.set(self.index, Field.CLIENTS, self.client_count)

    def owns_key(self, process_id: int) -> bool:
        return process_id in self._by_key

    async def forward_cancel(self, process_id: int, secret_key: int) -> None:
        if self.owns_key(process_id):
            await super().forward_cancel(process_id, secret_key)
            return
        reached = self.channel.broadcast({"k": "cancel", "p": process_id, "s": secret_key, "from": self.index})
        log.info("worker %d: cancel request for a session of another worker: passed to %d workers", self.index, reached)

    def cancel_from_peer(self, process_id: int, secret_key: int) -> None:
        """A cancel request another worker received: deliver it if the session is ours, else ignore it."""
        if not self.owns_key(process_id):
            return
        task = asyncio.get_running_loop().create_task(super().forward_cancel(process_id, secret_key))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)


class WorkerAdminConsole(AdminConsole):
    """The admin console of a worker: SHOW STATS says which worker answers; SHOW WORKERS shows them all."""

    def __init__(self, server: WorkerProxyServer) -> None:
        super().__init__(server)
        self._worker = server

    def _dispatch(self, session: ConsoleSession, sql: str, words: list[str], command: str) -> bytes:
        if command == "SHOW WORKERS":
            columns = ["worker", "pid", "restarts", "clients", "clients_total", "hits", "misses", "counted_s_ago"]
            return _table(columns, self._workers(), "SHOW")
        return super()._dispatch(session, sql, words, command)

    def _stats(self) -> list[list[str | None]]:
        worker = self._worker
        rows: list[list[str | None]] = [
            ["worker", str(worker.index)],
            ["worker_pid", str(os.getpid())],
            ["workers", str(worker.count)],
        ]
        # The rest is this worker's own: CACHEPROXY SHOW WORKERS and /metrics give every worker's.
        return rows + super()._stats()

    def _workers(self) -> list[list[str | None]]:
        now_ms = int(time.time() * 1000)
        return [
            [str(row.index), str(row.pid), str(row.restarts), str(row.clients), str(row.clients_total),
             str(row.hits), str(row.misses),
             f"{(now_ms - row.updated_ms) / 1000:.1f}" if row.updated_ms else None]
            for row in self._worker.table.rows()
        ]  # fmt: skip
