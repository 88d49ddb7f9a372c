"""Server-side TLS over an open asyncio stream, starting from bytes that stream has already read.

Why not `StreamWriter.start_tls` (which the PostgreSQL front end uses): a PostgreSQL client waits for the server's
'S' before its TLS ClientHello, but a MySQL client sends its SSLRequest packet and its ClientHello back to back (MySQL
"Protocol::SSLRequest": the server sends nothing in between). Both usually arrive in one read, and bytes the stream
has already read cannot be handed to `start_tls`. Here the TLS engine is an `ssl.SSLObject` over memory BIOs (what
asyncio's own SSL transport does), fed with those bytes first, then with whatever the stream reads.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol

_CHUNK = 256 * 1024


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class TLSStream:
    """Reads and writes plaintext over a TLS session carried by a plain (reader, writer); it is both the reader and
    the writer of a session's `Stream` once TLS has started."""

    def __init__(self, reader: ByteReader, writer: ByteWriter, context: ssl.SSLContext, received: bytes) -> None:
        self._reader, self._writer = reader, writer
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._incoming.write(received)

    @property
    def version(self) -> str | None:
        return self._tls.version()

    async def handshake(self) -> None:
        """Run the TLS handshake; raises ssl.SSLError, or ConnectionError if the peer goes away."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not await self._receive():
                    raise ConnectionError("the client closed the connection during the TLS handshake") from None
        self._flush()

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes of plaintext (b"" at the end of the stream), at least one unless at the end."""
        size = _CHUNK if n < 0 else n
        while True:
            try:
                data = self._tls.read(size)
                while len(data) < size and self._tls.pending():  # more of what is decrypted already: one return
                    data += self._tls.read(size - len(data))
                self._flush()  # TLS 1.3 may answer a key update
                return data
            except ssl.SSLWantReadError:
                self._flush()
                if not await self._receive():
                    return b""
            except ssl.SSLZeroReturnError:  # the client's close_notify
                return b""

    async def _receive(self) -> bool:
        data = await self._reader.read(_CHUNK)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    def write(self, data: bytes) -> None:
        self._tls.write(data)
        self._flush()

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self._writer.write(pending)

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


async def start(reader: ByteReader, writer: ByteWriter, context: ssl.SSLContext, received: bytes,
                timeout: float) -> TLSStream:  # fmt: skip
    """TLS as the server over (reader, writer), `received` being the first bytes of the client's TLS handshake."""
    stream = TLSStream(reader, writer, context, received)
    await asyncio.wait_for(stream.handshake(), timeout)
    return stream
