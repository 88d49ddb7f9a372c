"""Link: the asyncio Protocol that takes over a transport once a session is authenticated.

Streams (StreamReader/StreamWriter) are convenient for the few round trips of startup and authentication, but
each read there costs a future and a task wake-up. The relay is the hot path, so there the session swaps each
transport's protocol for a Link: bytes arrive by direct callback and leave by `transport.write`, with no
coroutine in between. Backpressure is explicit: when one side's write buffer fills, the other side stops reading.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Link(asyncio.Protocol):
    """Forwards one transport's events to its session; pauses the peer's reading while our writes back up."""

    __slots__ = ("_on_closed", "_on_data", "on_drained", "pause_self", "peer", "transport")

    def __init__(self, on_data: Callable[[bytes], None], on_closed: Callable[[Exception | None], None]) -> None:
        self._on_data = on_data
        self._on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None  # the transport whose reading we pause
        # Also stop reading our own side while our writes back up: a client that sends requests without reading
        # the answers (which the cache writes directly) must not make the proxy buffer them without bound.
        self.pause_self = False
        # Called when our write buffer has drained below the low-water mark: work held back because the peer was
        # not reading (cache hits the session answers itself) can go on.
        self.on_drained: Callable[[], None] | None = None

    @classmethod
    def take_over(
        cls,
        transport: asyncio.Transport,
        on_data: Callable[[bytes], None],
        on_closed: Callable[[Exception | None], None],
    ) -> Link:
        link = cls(on_data, on_closed)
        link.transport = transport
        transport.set_protocol(link)
        return link

    def detach(self) -> None:
        """The session gave this transport up (it lost it, and re-attaches elsewhere): its events go nowhere now."""
        self._on_data = _ignore
        self._on_closed = _ignore
        self.peer = None
        self.on_drained = None

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def eof_received(self) -> bool:
        self._on_closed(None)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_closed(exc)

    def pause_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.pause_reading()
        if self.pause_self and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()
        if self.pause_self and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        if self.on_drained is not None:
            self.on_drained()


def _ignore(_: object) -> None:
    return None
