"""A TCP forwarder that can cut its connections on demand: an upstream that "dies" without a goodbye.

It runs its own event loop on a thread, like ProxyThread, and forwards 127.0.0.1:<port> to a target. It can also
stall the connections it carries (stop forwarding, keep them open): a server or route that hangs without closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class FaultyLink:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faulty-link", daemon=True)
        self._writers: list[asyncio.StreamWriter] = []
        self._flowing: list[asyncio.Event] = []  # one per forwarded connection: cleared while it is stalled
        self._server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> FaultyLink:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]
        flowing = asyncio.Event()
        flowing.set()
        self._flowing.append(flowing)
        await asyncio.gather(
            self._pipe(reader, up_writer, flowing), self._pipe(up_reader, writer, flowing), return_exceptions=True
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
        try:
            while data := await reader.read(65536):
                await flowing.wait()  # a stalled connection holds what it read and reads no more
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # cut (by us or by either end): the other pipe sees its transport closed
        finally:
            writer.close()

    def stall_all(self) -> None:
        """Stop forwarding on every connection open now, in both directions, without closing any of them.

        Connections made afterwards flow normally (so a cancel request can still get through).
        """

        def stall() -> None:
            for flowing in self._flowing:
                flowing.clear()

        self._loop.call_soon_threadsafe(stall)

    def cut_all(self) -> None:
        """Reset every forwarded connection (both sides), as a crashed host or a dropped route would."""

        def cut() -> None:
            for writer in self._writers:
                with contextlib.suppress(Exception):
                    writer.transport.abort()
            self._writers.clear()
            for flowing in self._flowing:
                flowing.set()  # let stalled pipes see their closed transports and end
            self._flowing.clear()

        self._loop.call_soon_threadsafe(cut)

    def stop(self) -> None:
        self.cut_all()
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._cancel_tasks(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @staticmethod
    async def _cancel_tasks() -> None:
        """End the forwarding tasks before the loop stops, so that none is destroyed while pending."""
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
