"""Write-through refresh: which results a session's committed writes removed it runs again, and the requests that
do it on the session's own connection (`strategy: write_through` rules).

The session is idle then (ReadyForQuery 'I', nothing pending), so each refresh runs with exactly the role and
settings its key was taken under: only entries keyed by this very state are refreshed (others refill on their next
miss). The replies are the proxy's own, errors included (quiet requests); the client's next request simply queues
behind them. Sans-IO: the relay sends what `refresh_requests` returns.
"""

from __future__ import annotations

from cacheproxy.cache.entry import Entry
from cacheproxy.cache.keys import ExecuteKey, QueryKey
from cacheproxy.protocol import frontend as fe
from cacheproxy.protocol.framing import encode
from cacheproxy.protocol.replies import Capture, Op, Pending
from cacheproxy.proxy.requests import Refresh

_SYNC = b"S\x00\x00\x00\x04"


def candidates(stale: list[Entry], database: str, user: str, state: bytes) -> list[Entry]:
    """The removed entries this session can refresh (query and execute results keyed by its database, user and
    state digest), hottest first."""
    mine: dict[QueryKey | ExecuteKey, Entry] = {}
    for entry in stale:
        key = entry.key
        if (
            isinstance(key, QueryKey | ExecuteKey)
            and key.database == database
            and key.user == user
            and key.state == state
        ):
            mine[key] = entry
    return sorted(mine.values(), key=lambda e: e.hits, reverse=True)


def refresh_requests(key: QueryKey | ExecuteKey, capture: Capture) -> tuple[list[bytes], list[Pending]]:
    """The messages that run `key`'s statement again, and the quiet requests to track for them: a simple Query, or
    Parse/Bind/Describe/Execute/Sync of the unnamed statement and portal (the caller marks the client's unnamed
    statement as no longer upstream)."""
    if isinstance(key, QueryKey):
        return [encode(b"Q", key.sql + b"\x00")], [
            Pending(Op.QUERY, strip=True, quiet=True, capture=capture, on_done=Refresh())
        ]
    messages = [
        fe.encode_parse("", key.sql.decode("utf-8", "surrogateescape"), key.param_types),
        encode(b"B", b"\x00\x00" + key.arguments),  # the unnamed portal, of the unnamed statement
        fe.encode_describe("P", ""),
        encode(b"E", b"\x00" + key.max_rows.to_bytes(4, "big", signed=True)),
        _SYNC,
    ]
    requests = [
        Pending(Op.PARSE, strip=True, quiet=True),
        Pending(Op.BIND, strip=True, quiet=True),
        Pending(Op.DESCRIBE_PORTAL, strip=True, quiet=True, capture=capture),
        Pending(Op.EXECUTE, strip=True, quiet=True, capture=capture, on_done=Refresh()),
        Pending(Op.SYNC, strip=True, quiet=True),
    ]
    return messages, requests
