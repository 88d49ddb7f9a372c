"""PeerChannel: the in-host channel between the worker processes (unix sockets in the supervisor's runtime directory).

Two kinds of traffic:

- one-way messages (a datagram each, JSON): invalidations to drop from memory, cancel requests to deliver, reloads.
  Datagrams, because nothing on the request path may wait for another worker: a send that would block (the peer's
  queue is full) or finds no peer (it is restarting) is dropped and counted. None of these is needed for
  correctness of the cache (the shared generations are); a dropped cancel is as lost as one PostgreSQL drops.
- requests with an answer (a stream connection each): the admin HTTP server of worker 0 asks the others for their
  metrics and stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

log = logging.getLogger("cacheproxy.workers")

_MAX_DATAGRAM = 200_000
_ASK_TIMEOUT = 2.0
_MAX_ANSWER = 64 << 20


def datagram_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"w{index}.dgram")


def stream_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"w{index}.ctl")


class PeerChannel:
    """Worker `index` of `count`'s end of the channel."""

    def __init__(
        self,
        directory: str,
        index: int,
        count: int,
        on_message: Callable[[dict[str, Any]], None],
        on_request: Callable[[str], Awaitable[bytes]],
    ) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        self._on_message = on_message
        self._on_request = on_request
        self._socket: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped = 0  # messages that could not be sent (peer busy or gone)

    @property
    def peers(self) -> list[int]:
        return [index for index in range(self.count) if index != self.index]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        path = datagram_path(self.directory, self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous process
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        self._socket = sock
        loop.add_reader(sock.fileno(), self._readable)
        control = stream_path(self.directory, self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        self._server = await asyncio.start_unix_server(self._serve, control)

    async def stop(self) -> None:
        if self._socket is not None and self._loop is not None:
            self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # -- one-way messages ---------------------------------------------------------------------------------------

    def send(self, peer: int, message: dict[str, Any]) -> bool:
        """Send `message` to worker `peer` without waiting; False (counted in `dropped`) when it could not go."""
        if self._socket is None:
            return False
        data = orjson.dumps(message)
        if len(data) > _MAX_DATAGRAM:
            self.dropped += 1
            return False
        try:
            self._socket.sendto(data, datagram_path(self.directory, peer))
        except OSError as exc:  # BlockingIOError (queue full), FileNotFoundError / ConnectionRefusedError (gone)
            self.dropped += 1
            log.debug("worker %d: message to worker %d dropped: %r", self.index, peer, exc)
            return False
        return True

    def broadcast(self, message: dict[str, Any]) -> int:
        """Send to every other worker; how many it reached."""
        return sum(self.send(peer, message) for peer in self.peers)

    def _readable(self) -> None:
        sock = self._socket
        while sock is not None:
            try:
                data = sock.recv(_MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.exception("worker %d: channel receive failed", self.index)
                return
            try:
                message = orjson.loads(data)
                if not isinstance(message, dict):
                    raise ValueError("not an object")
                self._on_message(message)
            except Exception:  # one bad message must not stop the channel
                log.exception("worker %d: channel message not applied", self.index)

    # -- requests with an answer ----------------------------------------------------------------------------------

    async def ask(self, peer: int, request: str) -> bytes | None:
        """Worker `peer`'s answer to `request`, or None when it does not answer (restarting, busy past 2 s)."""
        try:
            async with asyncio.timeout(_ASK_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(stream_path(self.directory, peer))
                try:
                    writer.write(request.encode() + b"\n")
                    await writer.drain()
                    return await reader.read(_MAX_ANSWER)
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            log.debug("worker %d: worker %d did not answer %r: %r", self.index, peer, request, exc)
            return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            answer = await self._on_request(line.decode("ascii", "replace").strip())
            writer.write(answer)
            await writer.drain()
        except Exception:
            log.exception("worker %d: channel request failed", self.index)
        finally:
            writer.close()
