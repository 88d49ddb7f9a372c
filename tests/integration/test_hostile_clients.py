"""Random and mutated client byte streams against a running proxy: no crash, no leaked session, others unaffected."""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable

import psycopg
import pytest

from cacheproxy.protocol.framing import encode
from cacheproxy.protocol.startup import encode_startup
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread
from tests.support.rawpg import SYNC, bind, describe_portal, execute, parse, query

# What a driver sends: a startup packet, then simple and extended queries.
_CAPTURED = [
    query("SELECT 1"),
    parse("s1", "SELECT $1::int + 1", (23,)) + bind("", "s1", (b"41",)) + describe_portal() + execute() + SYNC,
    query("SELECT name FROM pg_class LIMIT 3"),
    encode(b"X"),
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.3 and data:  # flip a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.5:  # insert garbage
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif choice < 0.7 and data:  # truncate
            del data[rng.randrange(len(data)) :]
        elif choice < 0.85:  # a huge or negative length at a message boundary
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = rng.choice([b"Q\xff\xff\xff\xff", b"B\x00\x00\x00\x00", b"P\x7f\xff\xff\xff"])
        else:  # an unknown message type
            data += encode(bytes([rng.choice(b"@^~zA")]), rng.randbytes(rng.randint(0, 8)))
    return bytes(data)


@pytest.mark.timeout(180)
def test_mutated_streams_leave_the_proxy_serving(
    pg: PgCluster, start_proxy: Callable[..., ProxyThread], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = start_proxy(limits={"max_message_size": "1MiB", "startup_timeout": "2s"})
    rng = random.Random(20261126)
    startup = encode_startup({"user": "postgres", "database": "postgres"})
    with caplog.at_level(logging.ERROR, logger="cacheproxy"):
        for round_no in range(150):
            stream = startup + b"".join(rng.sample(_CAPTURED, k=rng.randint(1, len(_CAPTURED))))
            if round_no % 3:
                stream = _mutate(rng, stream) if round_no % 3 == 1 else startup + _mutate(rng, stream[len(startup) :])
            with socket.create_connection((proxy.host, proxy.port), timeout=2) as sock:
                sock.sendall(stream)
                sock.settimeout(0.05)
                try:
                    while sock.recv(65536):
                        pass
                except (TimeoutError, OSError):
                    pass
    internal = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert internal == []
    with psycopg.connect(pg.dsn(port=proxy.port)) as conn:  # the proxy still serves
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    assert proxy.app is not None
    deadline = time.monotonic() + 10
    while proxy.app.proxy.client_count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.app.proxy.client_count == 0  # every hostile session ended
