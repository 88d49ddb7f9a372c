"""Hostile client byte streams: captured driver traffic, intact or randomly mutated, sent on one connection."""

from __future__ import annotations

import random
import socket

from cacheproxy.protocol.framing import encode
from cacheproxy.protocol.startup import encode_startup
from tests.support.rawpg import SYNC, bind, describe_portal, execute, parse, query

# What a driver sends: a startup packet, then simple and extended queries.
CAPTURED = [
    query("SELECT 1"),
    parse("s1", "SELECT $1::int + 1", (23,)) + bind("", "s1", (b"41",)) + describe_portal() + execute() + SYNC,
    query("SELECT name FROM pg_class LIMIT 3"),
    encode(b"X"),
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.3 and buf:  # flip a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif choice < 0.5:  # insert garbage
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif choice < 0.7 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif choice < 0.85:  # a huge or negative length at a message boundary
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = rng.choice([b"Q\xff\xff\xff\xff", b"B\x00\x00\x00\x00", b"P\x7f\xff\xff\xff"])
        else:  # an unknown message type
            buf += encode(bytes([rng.choice(b"@^~zA")]), rng.randbytes(rng.randint(0, 8)))
    return bytes(buf)


STARTUP = encode_startup({"user": "postgres", "database": "postgres"})


def hostile_round(rng: random.Random, port: int, round_no: int, read_timeout: float = 0.05) -> None:
    """One connection: a captured client stream, intact (every third round) or mutated, with or without its startup
    mutated too; whatever comes back is read until the proxy closes or goes quiet."""
    stream = STARTUP + b"".join(rng.sample(CAPTURED, k=rng.randint(1, len(CAPTURED))))
    if round_no % 3:
        stream = mutate(rng, stream) if round_no % 3 == 1 else STARTUP + mutate(rng, stream[len(STARTUP) :])
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(stream)
        sock.settimeout(read_timeout)
        try:
            while sock.recv(65536):
                pass
        except (TimeoutError, OSError):
            pass
