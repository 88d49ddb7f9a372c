"""A minimal blocking PostgreSQL client built on cacheproxy's own codec, for tests that need exact bytes on the wire.

Real drivers hide what the protocol tests must see (an ErrorResponse's fields during startup, BackendKeyData, a
message no driver would send), so these tests speak the protocol directly.
"""

from __future__ import annotations

import socket
from struct import pack

from cacheproxy.protocol.framing import Framer, encode
from cacheproxy.protocol.messages import decode_error_fields
from cacheproxy.protocol.startup import encode_cancel, encode_startup

Message = tuple[str, bytes]


class RawConn:
    """One TCP connection; `recv_until` returns decoded (type, body) messages."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._framer = Framer(1 << 30)
        self._pending: list[Message] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_message(self) -> Message | None:
        """The next message, or None when the server closed the connection."""
        while not self._pending:
            data = self.sock.recv(65536)
            if not data:
                return None
            region, frames = self._framer.feed(data)
            self._pending += [(chr(t), bytes(region[s + 5 : e])) for t, s, e in frames]
        return self._pending.pop(0)

    def recv_until(self, last: str = "Z") -> list[Message]:
        """Messages up to and including the first of type `last` (or up to the connection's end)."""
        got: list[Message] = []
        while (msg := self.recv_message()) is not None:
            got.append(msg)
            if msg[0] == last:
                break
        return got

    def startup(self, user: str, database: str = "postgres", **params: str) -> list[Message]:
        """StartupMessage for a trust-authenticated user; the messages up to the first ReadyForQuery."""
        self.send(encode_startup({"user": user, "database": database, **params}))
        return self.recv_until("Z")

    def query(self, sql: str) -> list[Message]:
        self.send(encode(b"Q", sql.encode() + b"\x00"))
        return self.recv_until("Z")


def error_fields(messages: list[Message]) -> dict[str, str]:
    """The fields of the first ErrorResponse among `messages` ({} if there is none)."""
    for msg_type, body in messages:
        if msg_type == "E":
            return decode_error_fields(body)
    return {}


def data_rows(messages: list[Message]) -> list[list[bytes | None]]:
    """Decode DataRow messages (text format) into lists of column values."""
    rows = []
    for msg_type, body in messages:
        if msg_type != "D":
            continue
        count = int.from_bytes(body[:2], "big")
        pos, row = 2, []
        for _ in range(count):
            length = int.from_bytes(body[pos : pos + 4], "big", signed=True)
            pos += 4
            if length < 0:
                row.append(None)
            else:
                row.append(body[pos : pos + length])
                pos += length
        rows.append(row)
    return rows


def backend_key(messages: list[Message]) -> tuple[int, int]:
    for msg_type, body in messages:
        if msg_type == "K":
            pid, secret = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big")
            return pid, secret
    raise AssertionError("no BackendKeyData")


def send_cancel(host: str, port: int, pid: int, secret: int) -> None:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(encode_cancel(pid, secret))
        sock.recv(1)  # the server closes once it has read the request


def function_call(oid: int, *int4_args: int) -> bytes:
    """A FunctionCall ('F') with binary int4 arguments and a binary result (PG docs, "FunctionCall")."""
    body = pack("!IHH", oid, 1, 1) + pack("!H", len(int4_args))
    for arg in int4_args:
        body += pack("!ii", 4, arg)
    body += pack("!H", 1)
    return encode(b"F", body)


# -- extended-protocol message builders for tests that script exact batches ----------------------------------


def parse(name: str, query: str, types: tuple[int, ...] = ()) -> bytes:
    body = name.encode() + b"\x00" + query.encode() + b"\x00" + pack("!H", len(types))
    return encode(b"P", body + b"".join(pack("!I", t) for t in types))


def bind(portal: str = "", statement: str = "", params: tuple[bytes, ...] = ()) -> bytes:
    body = portal.encode() + b"\x00" + statement.encode() + b"\x00" + pack("!HH", 0, len(params))
    for param in params:
        body += pack("!i", len(param)) + param
    return encode(b"B", body + pack("!H", 0))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return encode(b"E", portal.encode() + b"\x00" + pack("!i", max_rows))


def describe_portal(name: str = "") -> bytes:
    return encode(b"D", b"P" + name.encode() + b"\x00")


SYNC = encode(b"S")
FLUSH = encode(b"H")


def query(sql: str) -> bytes:
    return encode(b"Q", sql.encode() + b"\x00")


def shape(messages: list[Message]) -> list[str]:
    """Message types, with DataRow values and error codes spelled out, for comparing replies."""
    out = []
    for msg_type, body in messages:
        if msg_type == "D":
            out.append("D" + ",".join("NULL" if v is None else v.decode() for v in data_rows([(msg_type, body)])[0]))
        elif msg_type == "E":
            out.append("E" + error_fields([(msg_type, body)]).get("C", ""))
        elif msg_type in "CZ":
            out.append(msg_type + body.rstrip(b"\x00").decode())
        else:
            out.append(msg_type)
    return out
