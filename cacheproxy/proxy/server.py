"""The listener: accepts clients, owns the live sessions, their cancel keys, admission limits and shutdown."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable

from cacheproxy.config import Config
from cacheproxy.errors import CANNOT_CONNECT_NOW, OBJECT_NOT_IN_PREREQUISITE_STATE, TOO_MANY_CONNECTIONS, ProxyError
from cacheproxy.observability.metrics import Metrics
from cacheproxy.proxy.admin_console import AdminConsole
from cacheproxy.proxy.auth_source import AuthSource
from cacheproxy.proxy.cache_service import CacheService
from cacheproxy.proxy.session import Session
from cacheproxy.proxy.spare_upstream import SpareUpstream
from cacheproxy.upstream import READ_LIMIT, send_cancel
from cacheproxy.upstream_hosts import UpstreamHosts

log = logging.getLogger("cacheproxy.server")

_CANCEL_GRACE = 2.0  # after cancelling at the shutdown timeout, how long sessions get to report the cancellation


class ProxyServer:
    """Accepts client connections and runs one `Session` per connection.

    It is the one owner of the session table (admission, cancel keys) and of the shutdown order: stop accepting,
    close idle sessions, let busy ones finish up to a timeout, then abort the rest.
    """

    def __init__(
        self,
        config: Config,
        cache: CacheService | None = None,
        reload: Callable[[], str] | None = None,
        metrics: Metrics | None = None,
        snapshot: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.metrics = metrics if metrics is not None else (cache.metrics if cache is not None else Metrics())
        self._reload = reload
        self.snapshot = snapshot  # App.snapshot_now, for CACHEPROXY SNAPSHOT
        self.failover: UpstreamHosts | None = None  # set by App: sessions re-attach through it (proxy/reattach.py)
        self.admin_console = AdminConsole(self)
        self.tls_context = server_tls_context(config)
        self.auth = AuthSource(lambda: self.config)  # verifiers for auth.mode terminate
        self.spares = SpareUpstream(lambda: self.config)  # upstream connections opened ahead of new clients
        self._server: asyncio.Server | None = None
        self._ids = itertools.count(1)
        self._live: dict[Session, asyncio.Task[None]] = {}  # every connection's session, admitted or not
        self._admitted: set[Session] = set()
        self._by_key: dict[int, Session] = {}
        self._shutting_down: str | None = None

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if self._server else []

    @property
    def port(self) -> int:
        """The bound port (useful when the configured port is 0)."""
        return int(self.sockets[0].getsockname()[1])

    @property
    def accepting(self) -> bool:
        return self._server is not None and self._server.is_serving() and not self._shutting_down

    @property
    def client_count(self) -> int:
        return len(self._admitted)

    async def start(self) -> None:
        listen = self.config.listen
        self._server = await asyncio.start_server(
            self._on_connect, listen.host, listen.port, limit=READ_LIMIT, reuse_address=True
        )
        log.info("listening on %s", ", ".join(_fmt(s.getsockname()) for s in self.sockets))

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer, next(self._ids))
        task = asyncio.current_task()
        assert task is not None
        self._live[session] = task
        try:
            await session.run()
        finally:
            del self._live[session]

    def reload(self) -> str:
        """Reload the configuration (CACHEPROXY RELOAD, SIGHUP): what changed, or a ProxyError saying why not."""
        if self._reload is None:
            raise ProxyError(
                OBJECT_NOT_IN_PREREQUISITE_STATE,
                "reload is not available: the proxy was not started from a configuration",
            )
        return self._reload()

    # -- the session table -----------------------------------------------------------------------------------

    def admit(self, session: Session) -> None:
        """Count a session that sent its StartupMessage against `limits.max_client_connections`."""
        if self._shutting_down:
            self.metrics.client_refused("shutting_down")
            raise ProxyError(CANNOT_CONNECT_NOW, "the proxy is shutting down")
        limit = self.config.limits.max_client_connections
        if len(self._admitted) >= limit:
            log.warning("refusing client %s: %d client connections already (limit)", session.peer, limit)
            self.metrics.client_refused("too_many_connections")
            raise ProxyError(TOO_MANY_CONNECTIONS, "sorry, too many clients already")
        self._admitted.add(session)
        self.metrics.client_opened()

    def issue_key(self, session: Session, upstream_pid: int) -> tuple[int, int]:
        """The (process id, secret) for the client's BackendKeyData; cancels are looked up by it.

        The process id is the upstream backend's own, so that what the client sees (pg_backend_pid(), the pid in
        notifications, asyncpg's get_server_pid()) agrees; in session mode each live session has a distinct one.
        The secret is ours: the upstream's never leaves the proxy.
        """
        pid = upstream_pid
        while pid in self._by_key or pid <= 0:  # only if two upstream servers ever share a pid
            pid = secrets.randbelow(0x7FFFFFFF - 1) + 1
        self._by_key[pid] = session
        return pid, secrets.randbits(32)

    def forget(self, session: Session) -> None:
        if session in self._admitted:
            self._admitted.discard(session)
            self.metrics.client_closed()
        if self._by_key.get(session.process_id) is session:
            del self._by_key[session.process_id]

    async def forward_cancel(self, process_id: int, secret_key: int) -> None:
        """Map a client's CancelRequest (our key) to the upstream backend's key, and deliver it."""
        session = self._by_key.get(process_id)
        # Compare secrets in constant time; an unknown or wrong key is ignored silently, as PostgreSQL does.
        if session is None or not hmac.compare_digest(
            session.secret_key.to_bytes(4, "big"), secret_key.to_bytes(4, "big")
        ):
            log.info("ignoring cancel request with an unknown key")
            return
        if session.upstream_key is None:
            log.info("session %d: cancel request ignored: upstream gave no key", session.id)
            return
        log.info("session %d: forwarding cancel request", session.id)
        await send_cancel(self.config.upstream, *session.upstream_key)

    # -- shutdown --------------------------------------------------------------------------------------------

    async def shutdown(self, timeout: float, reason: str = "the proxy is shutting down") -> None:
        """Stop accepting, close idle sessions, wait up to `timeout` for busy ones, then abort what is left."""
        self._shutting_down = reason
        if self._server is not None:
            self._server.close()
        await self.spares.close()
        log.info("shutdown: %d sessions open, waiting up to %gs for busy ones", len(self._live), timeout)
        for session in list(self._live):
            session.request_close(reason)
        if self._live:
            _, pending = await asyncio.wait(list(self._live.values()), timeout=timeout)
            if pending:
                # Closing the sockets alone would leave each backend running its query (and holding its locks)
                # until it next writes: cancel those queries first, as PostgreSQL's own fast shutdown does.
                busy = [s for s in self._live if s.upstream_key is not None and not s.idle]
                log.warning("shutdown: cancelling queries of %d sessions still busy after %gs", len(busy), timeout)
                await asyncio.gather(
                    *(send_cancel(self.config.upstream, *s.upstream_key) for s in busy if s.upstream_key),
                    return_exceptions=True,
                )
                _, pending = await asyncio.wait(pending, timeout=_CANCEL_GRACE)
            if pending:
                log.warning("shutdown: aborting %d sessions still open", len(pending))
                for session in list(self._live):
                    session.abort(reason)
                _, pending = await asyncio.wait(pending, timeout=5.0)
                for task in pending:
                    task.cancel()
        await self.auth.close()
        if self._server is not None:
            await self._server.wait_closed()
        log.info("shutdown complete")


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context offered to clients, or None when tls.mode is disable."""
    tls = config.tls
    if tls.mode == "disable" or tls.cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    return context


def _fmt(sockname: tuple[object, ...]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
