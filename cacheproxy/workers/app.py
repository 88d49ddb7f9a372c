"""WorkerApp: the application as one worker process runs it (App, with the parts that make N workers one proxy).

What differs from a single process: the cache engine's generations are the host's shared ones (engine.py), the
listener shares the port (server.py), the in-host channel carries invalidations to drop, cancels and reloads
(channel.py), worker 0 alone serves the admin HTTP endpoint, for all (observe.py), and writes the snapshot, which
every worker loads when it starts. Each worker has its own connections upstream, and its own invalidation feeds
(the LISTEN bus, the replication stream when enabled): see the README's "Multiple cores".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from cacheproxy.app import App, new_event_loop
from cacheproxy.config import Config
from cacheproxy.errors import ProxyError
from cacheproxy.snapshot import SnapshotFailed
from cacheproxy.workers.channel import PeerChannel
from cacheproxy.workers.control import Field, WorkerTable
from cacheproxy.workers.engine import Dropped, SharedCacheEngine
from cacheproxy.workers.generations import SharedGenerations
from cacheproxy.workers.observe import WorkersAdminServer
from cacheproxy.workers.server import WorkerProxyServer

log = logging.getLogger("cacheproxy.workers")

_HEARTBEAT = 1.0


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What the supervisor gives a worker: its number, the shared memory and the channel's directory."""

    index: int
    count: int
    directory: str
    generations: mmap.mmap
    slots: int
    table: mmap.mmap
    supervisor: int  # the supervisor's pid: a worker whose parent changes (the supervisor died) stops


class WorkerApp(App):
    """App for worker `context.index` (see the module docstring)."""

    def __init__(self, config: Config, load_config: Callable[[], Config] | None, context: WorkerContext) -> None:
        super().__init__(config, load_config)
        self.context = context
        index, count = context.index, context.count
        self.table = WorkerTable(context.table, count)
        self.channel = PeerChannel(context.directory, index, count, self._on_peer_message, self._on_peer_request)
        self._outbox: list[Dropped] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.engine: SharedCacheEngine | None = None
        if self.cache is not None:
            cache = config.cache
            # (one column more than workers: the supervisor's, see supervisor._reap)
            generations = SharedGenerations(context.generations, slots=context.slots, writers=count + 1, writer=index)
            # cache.max_memory is the host's budget: each worker gets its share.
            self.engine = SharedCacheEngine(
                max_memory=max(cache.max_memory // count, cache.shards),
                max_entry_size=cache.max_entry_size,
                shards=cache.shards,
                generations=generations,
                notify=self._dropped,
            )
            self.cache.use_engine(self.engine)
        self.proxy = WorkerProxyServer(
            config,
            self.cache,
            self._reload_everywhere if load_config is not None else None,
            self.metrics,
            self.snapshot_now if self.cache is not None else None,
            index=index,
            count=count,
            table=self.table,
            channel=self.channel,
        )
        self.proxy.failover = self.hosts
        admin = config.admin.listen
        self.admin = (
            WorkersAdminServer(admin.host, admin.port, gather=self._gather, table=self.table, metrics=self.metrics,
                               ready=self.ready, stats=self.stats, advice=self.advice)
            if admin is not None and index == 0
            else None
        )  # fmt: skip
        if self.admin is not None:  # the status page and /advice show worker 0's own view (README: Multiple cores)
            self.admin.add_routes(self.status.routes())

    @property
    def index(self) -> int:
        return self.context.index

    async def start(self) -> None:
        await self.channel.start()
        await super().start()
        self._publish()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="worker-heartbeat")
        log.info("worker %d of %d ready (pid %d)", self.index, self.context.count, os.getpid())

    async def stop(self, reason: str = "the proxy is shutting down") -> None:
        self._stopping = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await super().stop(reason)
        await self.channel.stop()
        log.info("worker %d stopped", self.index)

    def stats(self) -> dict[str, object]:
        summary = super().stats()
        if self.engine is not None:
            summary["stale_entries_dropped_at_lookup"] = self.engine.stale_hits
        summary["channel_messages_dropped"] = self.channel.dropped
        return summary

    # -- snapshots: worker 0 writes; every worker loads the file when it starts -----------------------------------

    async def snapshot_now(self) -> str:
        """Worker 0 writes; another worker asks it to (CACHEPROXY SNAPSHOT), except at its own shutdown."""
        if self.index == 0:
            return await super().snapshot_now()
        if self._stopping or self.config.snapshot.path is None or not self.channel.send(0, {"k": "snapshot"}):
            raise SnapshotFailed(f"snapshots are written by worker 0 (this is worker {self.index})")
        log.info("worker %d: asked worker 0 to write a snapshot", self.index)
        return "asked worker 0"

    async def _snapshot_forever(self) -> None:
        if self.index == 0:
            await super()._snapshot_forever()

    # -- reload: CACHEPROXY RELOAD on any worker reaches all (SIGHUP reaches all through the supervisor) ---------

    def _reload_everywhere(self) -> str:
        summary = self.reload()
        reached = self.channel.broadcast({"k": "reload", "from": self.index})
        return f"{summary}; sent to {reached} of {self.context.count - 1} other workers"

    # -- the in-host channel ----------------------------------------------------------------------------------

    def _dropped(self, what: Dropped) -> None:
        """An invalidation this worker made: the others drop those entries too (memory only: see engine.py)."""
        if self.context.count < 2:
            return
        if not self._outbox:
            try:
                asyncio.get_running_loop().call_soon(self._send_outbox)
            except RuntimeError:  # no loop (not serving): nothing to tell
                return
        self._outbox.append(what)

    def _send_outbox(self) -> None:
        items, self._outbox = self._outbox, []
        if items:
            self.channel.broadcast({"k": "drop", "items": [list(item) for item in items]})

    def _on_peer_message(self, message: dict[str, Any]) -> None:
        kind = message.get("k")
        if kind == "drop" and self.engine is not None:
            for what, database, names in message["items"]:
                self.engine.drop((str(what), str(database), tuple(str(name) for name in names)))
        elif kind == "cancel":
            assert isinstance(self.proxy, WorkerProxyServer)
            self.proxy.cancel_from_peer(int(message["p"]), int(message["s"]))
        elif kind == "snapshot" and self.index == 0 and not self._stopping:
            task = asyncio.get_running_loop().create_task(self._snapshot_quietly())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "reload":
            log.info("worker %d: reloading the configuration (asked by worker %s)", self.index, message.get("from"))
            with contextlib.suppress(ProxyError):  # logged; the running configuration stays
                self.reload()

    async def _snapshot_quietly(self) -> None:
        with contextlib.suppress(SnapshotFailed):  # logged and counted by snapshot_now
            await self.snapshot_now()

    async def _on_peer_request(self, request: str) -> bytes:
        if request == "metrics":
            return self.metrics.render()[0]
        if request == "stats":
            return orjson.dumps(self.stats())
        return b""

    async def _gather(self, request: str) -> list[bytes]:
        """This worker's answer to `request` and every other worker's that answers."""
        own = await self._on_peer_request(request)
        others = await asyncio.gather(*(self.channel.ask(peer, request) for peer in self.channel.peers))
        return [own, *(answer for answer in others if answer is not None)]

    # -- heartbeat ------------------------------------------------------------------------------------------

    def _publish(self) -> None:
        index = self.index
        if self.engine is not None:
            stats = self.engine.stats()
            self.table.set(index, Field.HITS, stats.hits)
            self.table.set(index, Field.MISSES, stats.misses)
        self.table.set(index, Field.UPDATED_MS, int(time.time() * 1000))

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(_HEARTBEAT)
            self._publish()
            if os.getppid() != self.context.supervisor:
                log.error("worker %d: the supervisor is gone: shutting down", self.index)
                os.kill(os.getpid(), signal.SIGTERM)
                return


def run_worker(config: Config, load_config: Callable[[], Config] | None, context: WorkerContext) -> int:
    """The body of a worker process: serve until SIGTERM, then stop gracefully. The exit status."""

    async def serve() -> None:
        await WorkerApp(config, load_config, context).run()

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(serve())
    except OSError as exc:
        log.error("worker %d cannot start: %s", context.index, exc)
        return 1
    return 0
