"""SpareUpstream: upstream connections opened ahead of the clients that will use them.

A new session's upstream connection costs a TCP connect, the sslmode negotiation (a round trip even when the server
answers "no TLS", a handshake when it says yes) and the postmaster's fork of a backend, all before the client's
StartupMessage can be sent. A spare has all of that done already: the session sends the StartupMessage on it at once,
and a replacement is opened in the background shortly after (`REPLENISH_DELAY`).

A spare is a connection on which nothing was sent but the sslmode negotiation, so the server keeps no state for it
but a forked backend waiting for a startup packet; closing an unused one is silent on the server's side (PostgreSQL
logs nothing for a connection that sent nothing: `ProcessStartupPacket`). The server gives such a connection
`authentication_timeout` (60 s by default) to send its startup packet, so a spare older than `MAX_AGE` is closed and
not used. Spares are kept only while clients keep coming (one connected within `DEMAND_WINDOW`), so an idle proxy
holds no backend. A spare is used only for the address and settings it was opened for: after a failover or a reload
that changes the upstream, the old one is closed. A spare the server closed in the meantime is detected by the
session (nothing reached the client yet) and replaced by a fresh connection (`Session._upstream_first_message`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cacheproxy.config import Config, UpstreamConfig
from cacheproxy.errors import UpstreamError
from cacheproxy.upstream import open_upstream, upstream_address

log = logging.getLogger("cacheproxy.upstream")

# Well within PostgreSQL's default authentication_timeout (60 s), which starts at the fork: a client that takes a
# spare still has most of it to authenticate.
MAX_AGE = 20.0
# Spares are replaced while a client took or asked for one this recently; after that the proxy holds none.
DEMAND_WINDOW = 60.0
# The replacement of a spare just taken is opened this long after, not at once: the postmaster's fork of a backend and
# the sslmode round trip would compete for the CPU with the login and first query of the session that took the spare
# (on a 2-core host, psycopg's connect + SELECT 1 + close through the caching proxy took 0.3 ms longer with the
# replacement opened at once: README, "Connects"). Short enough that it is ready for a client coming a few ms later;
# a client that finds no spare starts the replacement at once (and opens its own connection, as without spares).
REPLENISH_DELAY = 0.003

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(slots=True)
class _Spare:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    key: tuple[UpstreamConfig, tuple[str, int]]
    opened_at: float

    def usable(self, key: tuple[UpstreamConfig, tuple[str, int]], now: float) -> bool:
        return (
            key == self.key
            and now - self.opened_at < MAX_AGE
            and not self.writer.transport.is_closing()
            and not self.reader.at_eof()
            and self.reader.exception() is None
        )


class SpareUpstream:
    """Keeps `limits.spare_upstream_connections` connections to the upstream open ahead of demand (0: none).

    `config` is read on every call (a reload swaps it).
    """

    def __init__(self, config: Callable[[], Config], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._spares: list[_Spare] = []
        self._opening = 0
        self._last_demand = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None  # the replacement due after REPLENISH_DELAY
        self._closed = False
        self.taken = 0  # sessions that got a spare (tests and the benchmark read these)
        self.opened = 0  # spares opened

    @property
    def opening(self) -> int:
        """Spares being opened now (a replacement due on the timer is not counted until it starts)."""
        return self._opening

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """An upstream connection for a new session: a spare when one is ready (True), else a new one (False).

        Either way, spares are replenished in the background. Raises UpstreamError as `open_upstream` does.
        """
        cfg = self._config().upstream
        key = (cfg, upstream_address(cfg))
        now = self._clock()
        self._last_demand = now
        found: _Spare | None = None
        while self._spares:
            spare = self._spares.pop(0)
            if spare.usable(key, now):
                found = spare
                break
            spare.writer.close()
        if found is not None:
            self.taken += 1
            if self._timer is None and not self._closed:
                self._timer = asyncio.get_running_loop().call_later(REPLENISH_DELAY, self._replenish)
            return found.reader, found.writer, True
        self._replenish()
        reader, writer = await open_upstream(cfg)
        return reader, writer, False

    def _replenish(self) -> None:
        self._cancel_timer()  # (whether it fired or a client came first: either way, the replacement starts now)
        if self._closed:
            return
        for _ in range(self._config().limits.spare_upstream_connections - len(self._spares) - self._opening):
            self._opening += 1
            task = asyncio.get_running_loop().create_task(self._open_one(), name="spare-upstream")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open_one(self) -> None:
        try:
            cfg = self._config().upstream
            key = (cfg, upstream_address(cfg))
            try:
                reader, writer = await open_upstream(cfg)
            except (UpstreamError, OSError) as exc:
                # Not retried here: the next session connects by itself and reports the error to its client.
                log.debug("spare upstream connection not opened: %s", exc)
                return
            spare = _Spare(reader, writer, key, self._clock())
            if self._closed:
                writer.close()
                return
            self._spares.append(spare)
            self.opened += 1
            asyncio.get_running_loop().call_later(MAX_AGE, self._expire, spare)
        finally:
            self._opening -= 1

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, spare: _Spare) -> None:
        """A spare reached MAX_AGE unused: close it, and open another while clients keep coming."""
        if spare not in self._spares:
            return  # taken (or dropped) meanwhile
        self._spares.remove(spare)
        spare.writer.close()
        if self._clock() - self._last_demand < DEMAND_WINDOW:
            self._replenish()

    async def close(self) -> None:
        """Close the spares and stop opening new ones (shutdown)."""
        self._closed = True
        self._cancel_timer()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for spare in self._spares:
            spare.writer.close()
        self._spares.clear()
