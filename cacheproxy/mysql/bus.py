"""The invalidation bus across MySQL sidecars: Redis pub/sub on the shared tier's server (cache.shared.url).

MySQL and MariaDB have no LISTEN/NOTIFY, and nothing of the server's own carries a message to other clients without
polling (GET_LOCK and a table would both be polled). So with `cache.shared.url` set, every sidecar publishes what
its clients' writes invalidated (the tables already expanded through FK cascades, views and triggers, the databases
of DDL, or everything) on one Redis channel per MySQL server, and applies what the others publish. Redis Cluster
broadcasts PUBLISH to every node, so one connection to the URL's node serves there too.

Never fail open: until the subscription is confirmed, and from the moment it is lost, the bus reports itself down
(`on_state`): the front end then serves nothing from its cache, stores nothing, and drops what it holds (it may have
missed a message). Invalidations that could not be published stay queued, in order, and go out once Redis answers.

Consistency is bounded, not strict: a message is published right after the write's invalidation on its own sidecar
(as the answer goes to the client), and another sidecar applies it when it arrives, normally within a millisecond or
two; a read through that sidecar in between may still be answered from its cache. Without Redis and without
`invalidation.binlog`, writes through another sidecar are seen only when entries expire (TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("cacheproxy.mysql.bus")

CHANNEL_PREFIX = "cacheproxy:mysql:invalidate:"
_RETRY = 0.5  # seconds between attempts to subscribe or publish again
_HEALTH_CHECK = 5  # seconds of silence after which the subscriber's connection is checked with a PING
TableId = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Message:
    """One invalidation: tables (expanded already), databases whose entries go, databases whose catalog changed
    (DDL), or everything."""

    tables: frozenset[TableId] = frozenset()
    databases: frozenset[str] = frozenset()
    ddl: frozenset[str] = frozenset()
    everything: bool = False

    def encode(self, origin: str) -> bytes:
        """
        >>> Message.decode(Message(frozenset({("d", "t")}), ddl=frozenset({"x"})).encode("me"))
        ('me', Message(tables=frozenset({('d', 't')}), databases=frozenset(), ddl=frozenset({'x'}), everything=False))
        """
        return orjson.dumps({"v": 1, "o": origin, "t": sorted(self.tables), "d": sorted(self.databases),
                             "x": sorted(self.ddl), "a": self.everything})  # fmt: skip

    @staticmethod
    def decode(data: bytes) -> tuple[str, Message]:
        """(origin, message); one that cannot be read means everything: a sidecar must not guess what it missed.

        >>> Message.decode(b"garbage")
        ('', Message(tables=frozenset(), databases=frozenset(), ddl=frozenset(), everything=True))
        """
        try:
            body = orjson.loads(data)
            if not isinstance(body, dict) or body.get("v") != 1:
                raise ValueError("unknown message version")
            tables = frozenset((str(db), str(name)) for db, name in body["t"])
            return str(body["o"]), Message(tables, frozenset(map(str, body["d"])), frozenset(map(str, body["x"])),
                                           bool(body["a"]))  # fmt: skip
        except (ValueError, TypeError, KeyError, orjson.JSONDecodeError):
            log.warning("invalidation bus: unreadable message %r: invalidating everything", data[:200])
            return "", Message(everything=True)


class RedisBus:
    """Publishes this sidecar's invalidations on `channel` and hands the others' to `on_message`."""

    def __init__(self, url: str, scope: Callable[[], Awaitable[str]], on_message: Callable[[Message], None],
                 on_state: Callable[[bool, str], None], timeout: float) -> None:  # fmt: skip
        self.url = url
        self._scope = scope  # which MySQL server: the channel's name (read once, retried until it is known)
        self._channel: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.origin = secrets.token_hex(8)  # this sidecar's own messages come back to it: they are skipped
        self._on_message = on_message
        self._on_state = on_state
        self._timeout = timeout
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: Any = None
        self._subscriber: Any = None
        self.up = False

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self._client = aioredis.from_url(self.url, socket_timeout=self._timeout,
                                         socket_connect_timeout=self._timeout)  # fmt: skip
        # The subscriber waits for messages as long as the channel is quiet: no read timeout, but a PING every few
        # seconds of silence, so that a connection lost without a reset is noticed.
        self._subscriber = aioredis.from_url(self.url, socket_connect_timeout=self._timeout,
                                             health_check_interval=_HEALTH_CHECK)  # fmt: skip
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen(), name="mysql-bus-listen"),
                       loop.create_task(self._send(), name="mysql-bus-send")]  # fmt: skip

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in (self._client, self._subscriber):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def publish(self, message: Message) -> None:
        self._queue.put_nowait(message)

    def _state(self, up: bool, why: str) -> None:
        if up != self.up:
            self.up = up
            self._on_state(up, why)

    async def _resolve(self) -> str:
        while not self._channel.done():
            try:
                self._channel.set_result(CHANNEL_PREFIX + await self._scope())
            except Exception as exc:  # the server is not reachable yet: the bus stays down meanwhile
                log.warning("invalidation bus: cannot read the MySQL server's identity (%s); retrying", exc)
                await asyncio.sleep(_RETRY)
        return self._channel.result()

    async def _listen(self) -> None:
        channel = await self._resolve()
        while True:
            pubsub = self._subscriber.pubsub()
            try:
                await pubsub.subscribe(channel)
                while True:
                    # A quiet channel is not a lost one: None after a second of silence (a lost connection raises).
                    message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._state(True, "")
                        log.info("invalidation bus: subscribed to %s", channel)
                    elif message["type"] == "message":
                        origin, decoded = Message.decode(message["data"])
                        if origin != self.origin:
                            self._on_message(decoded)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone, or a reply the client did not expect: subscribe again
                self._state(False, f"the invalidation bus is down: {exc}")
                log.warning("invalidation bus lost (%s): nothing is served from the cache until it is back", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(_RETRY)

    async def _send(self) -> None:
        channel = await asyncio.shield(self._channel)
        while True:
            message = await self._queue.get()
            data = message.encode(self.origin)
            while True:
                try:
                    await self._client.publish(channel, data)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # kept, in order, until Redis answers again
                    log.warning("invalidation bus: publishing failed (%s); retrying", exc)
                    await asyncio.sleep(_RETRY)
