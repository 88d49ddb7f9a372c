"""Answering an extended-protocol batch (up to its Sync or Flush) from the cache, as a function of lookups.

Sans-IO: the caller gives the batch's messages, the session's statements and portals, the ReadyForQuery to end
with, and the lookups (`Lookups`: a result for an Execute, a description for a statement, whether another session is
filling a missing result); it gets the replies, or "forward it" (None), or "wait" (WAIT: another session fills that
very key, and the caller now waits for it before dispatching the batch again). A batch is answered whole or not at
all, so that replies never mix sources. Hits are counted (`Lookups.count`) only once a batch is answered here.

Two entries: `answer_hot` for the batch drivers send for every execution of a prepared or parameterized query
([Parse ""], Bind, [Describe portal], Execute, Sync), read without decoding it fully; `answer_batch` for any other
batch. Both give the same answer for the hot shape.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Literal

from mypy_extensions import mypyc_attr

from cacheproxy.cache.entry import Entry
from cacheproxy.protocol import frontend as fe
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE
from cacheproxy.protocol.statements import (
    LocalPortal,
    Statement,
    StatementRegistry,
    header_length,
    note_described,
    same_shape,
)

_PARSE_BIND_COMPLETE: Final = fe.PARSE_COMPLETE + fe.BIND_COMPLETE


class Wait(Enum):
    """Another session is filling a key the batch needs: the caller waits for it, then dispatches again."""

    WAIT = "wait"


WAIT: Final = Wait.WAIT

# One message of a batch: its type byte and the whole message (header included).
Message = tuple[int, bytes]


# A base class, not a Protocol: compiled with mypyc, a call through a Protocol goes through Python's API (a few
# thousand CPU instructions), one through a base class is a native call. Interpreted subclasses (the offline relay,
# tests) are allowed.
@mypyc_attr(allow_interpreted_subclasses=True)
class Lookups:
    """What the answers are made of: the session's cache lookups (the caller's policy decides what is servable)."""

    def result(self, statement: Statement, arguments: bytes, max_rows: int) -> Entry | None:
        """The cached result (RowDescription first) of executing `statement` bound with `arguments` (a Bind's bytes
        after its two names) up to `max_rows`; None for a miss. Not counted: the batch may yet go upstream."""
        raise NotImplementedError

    def fill_in_flight(self, statement: Statement, arguments: bytes, max_rows: int) -> bool:
        """After a miss: True when another session is filling that result and the caller now waits for it."""
        raise NotImplementedError

    def description(self, statement: Statement) -> bytes | None:
        """The cached Describe reply of `statement` (ParameterDescription, then RowDescription or NoData)."""
        raise NotImplementedError

    def count(self, key: Hashable, entry: Entry | None) -> None:
        """Count a lookup made by `result` once it is served (the tier's own count: no layer between)."""
        raise NotImplementedError


@dataclass(slots=True)
class Answer:
    """A batch answered whole: the replies, and what it did to the session's statements and portals."""

    replies: bytes
    parsed: dict[str, Statement] = field(default_factory=dict)  # statements its Parses created (not upstream yet)
    closed: list[str] = field(default_factory=list)  # statements it closed
    created: list[tuple[str, Statement]] = field(default_factory=list)  # named ones still open: create them upstream
    # Portals it bound before a Flush (they live until the Sync): kept here, bound upstream if something forwarded
    # later uses them.
    local_portals: dict[str, LocalPortal] = field(default_factory=dict)

    def __init__(
        self,
        replies: bytes,
        parsed: dict[str, Statement] | None = None,
        closed: list[str] | None = None,
        created: list[tuple[str, Statement]] | None = None,
        local_portals: dict[str, LocalPortal] | None = None,
    ) -> None:
        self.replies = replies
        self.parsed = {} if parsed is None else parsed
        self.closed = [] if closed is None else closed
        self.created = [] if created is None else created
        self.local_portals = {} if local_portals is None else local_portals


def answer_hot(
    batch: list[Message], statements: dict[str, Statement], ready: bytes, idle: bool, lookup: Lookups
) -> bytes | Wait | Literal[False] | None:
    """The hot batch's replies. False: not this shape (ask `answer_batch`); None: forward it; WAIT: waiting.

    `idle`: no transaction block is open. A Parse of the unnamed statement answered here replaces `statements[""]`."""
    count = len(batch)
    if count < 3 or count > 5 or batch[-1][0] != m.SYNC or batch[-2][0] != m.EXECUTE:
        return False
    first = 0
    statement: Statement | None = None
    if batch[0][0] == m.PARSE:
        parse = batch[0][1]
        if parse[HEADER_SIZE] != 0:
            return False  # a named Parse: "already exists" and friends are the general path's
        end = parse.index(0, HEADER_SIZE + 1)
        params = parse[end + 1 :]
        n_types = int.from_bytes(params[:2], "big")
        types = tuple(int.from_bytes(params[2 + 4 * i : 6 + 4 * i], "big") for i in range(n_types))
        statement = Statement(parse[HEADER_SIZE + 1 : end], types, upstream=False)
        first = 1
    if batch[first][0] != m.BIND or count - first - 3 not in (0, 1):
        return False
    bind = batch[first][1]
    portal_end = bind.index(0, HEADER_SIZE)
    name_end = bind.index(0, portal_end + 1)
    portal = bind[HEADER_SIZE:portal_end]
    execute = batch[-2][1]
    if execute[HEADER_SIZE:-5] != portal:
        return False
    if portal and not idle:
        return None  # a named portal outlives the Sync in a transaction block: it must exist upstream
    describe = batch[first + 1][1] if count - first == 4 else None
    if describe is not None and (batch[first + 1][0] != m.DESCRIBE or describe[HEADER_SIZE + 1 : -1] != portal
                                 or describe[HEADER_SIZE] != ord("P")):  # fmt: skip
        return False
    name = bind[portal_end + 1 : name_end].decode("utf-8", "surrogateescape")
    if statement is None:
        statement = statements.get(name)
        if statement is None or not statement.query:
            return False
    elif name:
        return False  # binds a named statement after an unnamed Parse: general path
    arguments, max_rows = bind[name_end + 1 :], int.from_bytes(execute[-4:], "big", signed=True)
    entry = lookup.result(statement, arguments, max_rows)
    if entry is None:
        return WAIT if lookup.fill_in_flight(statement, arguments, max_rows) else None
    value = entry.value
    if describe is None and not same_shape(statement, value):
        return None  # the client knows another row shape for this statement (DDL since): the server's to say
    body: bytes | memoryview = value if describe is not None else memoryview(value)[header_length(value) :]
    lookup.count(entry.key, entry)  # served: a hit (a miss is counted where the batch goes upstream)
    if first:
        statements[""] = statement
        return b"".join((_PARSE_BIND_COMPLETE, body, ready))
    return b"".join((fe.BIND_COMPLETE, body, ready))


# In a batch answered here: the statement, its Bind, the row limit of its Execute, and its entry once found.
_Portal = tuple[Statement, fe.Bind, int, Entry | None]


def answer_batch(
    batch: list[Message],
    registry: StatementRegistry,
    ready: bytes,
    idle: bool,
    lookup: Lookups,
    *,
    dry_run: bool = False,
) -> Answer | Wait | None:
    """The whole batch's replies from the cache; None when it cannot be (forward it), WAIT to wait and retry.
    `dry_run`: only whether it could be, now (a batch not ended yet: nothing changes, nothing waits or counts)."""
    statements = registry.statements
    served: list[Entry] = []
    parsed: dict[str, Statement] = {}
    portals: dict[str, _Portal] = {
        name: (statement, bind, 0 if rows is None else rows, None)
        for name, (statement, bind, rows) in registry.local_portals.items()
    }
    executed: set[str] = {name for name, (_, _, rows) in registry.local_portals.items() if rows is not None}
    closed: list[str] = []
    closed_portals: set[str] = set()
    described_portals: set[str] = set()
    unproven: dict[str, Statement] = {}
    replies: list[bytes] = []
    statement: Statement | None
    for index, (msg_type, message) in enumerate(batch):
        body = message[HEADER_SIZE:]
        if msg_type == m.PARSE:
            parse = fe.decode_parse(body)
            if parse.statement and (parse.statement in statements or parse.statement in parsed):
                return None  # "already exists" is the server's to say
            registry.check_limit(parse.statement, len(parsed))
            new = Statement(parse.query.encode("utf-8", "surrogateescape"), parse.param_types, upstream=False)
            if lookup.description(new) is None:
                # Only a stored result of this very statement (below) proves it parses for this session.
                unproven[parse.statement] = new
            parsed[parse.statement] = new
            replies.append(fe.PARSE_COMPLETE)
        elif msg_type == m.BIND:
            bind = fe.decode_bind(body)
            if bind.portal and not idle:
                return None  # a named portal outlives the Sync in a transaction block: it must exist upstream
            statement = parsed.get(bind.statement) or statements.get(bind.statement)
            if statement is None or not statement.query:
                return None
            rows = next_execute_rows(batch, index, bind.portal)
            flushed = rows is None and batch[-1][0] == m.FLUSH
            if rows is None and not flushed:
                return None  # a Bind never executed: let the server validate it
            portals[bind.portal] = (statement, bind, rows or 0, None)
            if flushed and _portal_result(portals, bind.portal, lookup) is None:
                return None  # only a stored result for these very arguments proves that the Bind succeeds
            executed.discard(bind.portal)  # a Bind (re)creates the portal
            closed_portals.discard(bind.portal)
            replies.append(fe.BIND_COMPLETE)
        elif msg_type == m.DESCRIBE:
            describe = fe.decode_describe(body)
            if describe.kind == "S":
                statement = parsed.get(describe.name) or statements.get(describe.name)
                if statement is None or not statement.query:
                    return None
                described = lookup.description(statement)
                if described is None:
                    return None
                replies.append(described)
                if not dry_run:
                    note_described(statement, described)
            else:
                found = _portal_result(portals, describe.name, lookup)
                if found is None:
                    return _miss(portals, describe.name, lookup, dry_run)
                value = found.value
                replies.append(value[: header_length(value)])
                described_portals.add(describe.name)
        elif msg_type == m.EXECUTE:
            execute = fe.decode_execute(body)
            if execute.portal in executed or execute.portal in closed_portals:
                return None  # executing a portal again continues it: the server's to answer
            if execute.portal in portals and portals[execute.portal][2] != execute.max_rows:
                return None  # a portal bound in an earlier batch, looked up without a row limit
            found = _portal_result(portals, execute.portal, lookup)
            if found is None:
                return _miss(portals, execute.portal, lookup, dry_run)
            value = found.value
            if execute.portal not in described_portals and not same_shape(portals[execute.portal][0], value):
                return None  # the client decodes these rows with a description the entry does not have
            replies.append(value[header_length(value) :])
            served.append(found)
            executed.add(execute.portal)
            hit_statement = portals[execute.portal][0]
            unproven = {name: st for name, st in unproven.items() if st is not hit_statement}
        elif msg_type == m.CLOSE:
            if any(t not in (m.CLOSE, m.SYNC, m.FLUSH) for t, _ in batch[index + 1 :]):
                return None  # something after it uses what it closes: the server's to answer
            close = fe.decode_close(body)
            # Only what exists here alone is closed here: a statement or portal the server may hold (one it
            # created, or one made by SQL PREPARE or DECLARE that the proxy never saw) must be closed there.
            if close.kind == "S":
                existing = statements.get(close.name)
                if (existing is not None and existing.upstream) or (existing is None and close.name not in parsed):
                    return None
                closed.append(close.name)
            elif close.name not in portals or close.name in closed_portals:
                return None
            else:
                closed_portals.add(close.name)
            replies.append(fe.CLOSE_COMPLETE)
        elif msg_type == m.SYNC:
            replies.append(ready)
    if unproven:
        return None
    if dry_run:
        return Answer(b"".join(replies))
    for entry in served:
        lookup.count(entry.key, entry)  # hits: only now that the batch is answered here
    local_portals: dict[str, LocalPortal] = {}
    if batch[-1][0] == m.FLUSH:  # (a Sync ends the implicit transaction, and its portals)
        for name, (statement, bind, rows, _) in portals.items():
            if name not in closed_portals:
                local_portals[name] = (statement, bind, rows if name in executed else None)
    created = [(n, st) for n, st in parsed.items() if n and not st.upstream and n not in closed]
    return Answer(b"".join(replies), parsed, closed, created, local_portals)


def _portal_result(portals: dict[str, _Portal], name: str, lookup: Lookups) -> Entry | None:
    """The cached result for a portal bound in the batch (not counted: the batch may yet go upstream)."""
    found = portals.get(name)
    if found is None:
        return None
    statement, bind, rows, entry = found
    if entry is not None:
        return entry
    entry = lookup.result(statement, bind.arguments, rows)
    if entry is not None:
        portals[name] = (statement, bind, rows, entry)
    return entry


def _miss(portals: dict[str, _Portal], name: str, lookup: Lookups, dry_run: bool) -> Wait | None:
    """A miss in a batch: wait once if another session is filling that very key, else forward the batch."""
    found = portals.get(name)
    if found is not None and not dry_run:
        statement, bind, rows, _ = found
        if lookup.fill_in_flight(statement, bind.arguments, rows):
            return WAIT
    return None


def next_execute_rows(batch: list[Message], index: int, portal: str) -> int | None:
    """max_rows of the first Execute of `portal` after batch position `index` (None if there is none)."""
    for msg_type, message in batch[index + 1 :]:
        if msg_type == m.EXECUTE:
            execute = fe.decode_execute(message[HEADER_SIZE:])
            if execute.portal == portal:
                return execute.max_rows
        elif msg_type == m.BIND and fe.decode_bind(message[HEADER_SIZE:]).portal == portal:
            return None
    return None
