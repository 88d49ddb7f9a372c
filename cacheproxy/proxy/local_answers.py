"""Answering an extended-protocol batch (up to its Sync or Flush) from the cache, as a function of lookups.

Sans-IO: the caller gives the batch's messages, the session's statements, the ReadyForQuery to end with, and the
lookups (`Lookups`: a result for an Execute, a description for a statement); it gets the replies, or "forward it"
(None), or "wait" (WAIT: a lookup found another session filling that very key, and the caller now waits for it
before dispatching the batch again). A batch is answered whole or not at all, so that replies never mix sources.

Two entries: `answer_hot` for the batch drivers send for every execution of a prepared or parameterized query
([Parse ""], Bind, [Describe portal], Execute, Sync), read without decoding it fully; `answer_batch` for any other
batch. Both give the same answer for the hot shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol

from cacheproxy.protocol import frontend as fe
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import HEADER_SIZE
from cacheproxy.protocol.statements import Statement, StatementRegistry, header_length, note_described, same_shape

_PARSE_BIND_COMPLETE = fe.PARSE_COMPLETE + fe.BIND_COMPLETE


class Wait(Enum):
    """A lookup found another session filling the key: the caller waits for it, then dispatches again."""

    WAIT = "wait"


WAIT = Wait.WAIT

# One message of a batch: its type byte and the whole message (header included).
Message = tuple[int, bytes]


class Lookups(Protocol):
    """What the answers are made of: the session's cache lookups (the caller's policy decides what is servable)."""

    def result(self, statement: Statement, arguments: bytes, max_rows: int) -> bytes | Wait | None:
        """The cached result (RowDescription first) of executing `statement` bound with `arguments` (a Bind's bytes
        after its two names) up to `max_rows`; None for a miss."""
        ...

    def description(self, statement: Statement) -> bytes | None:
        """The cached Describe reply of `statement` (ParameterDescription, then RowDescription or NoData)."""
        ...


@dataclass(slots=True)
class Answer:
    """A batch answered whole: the replies, and what it did to the session's statements."""

    replies: bytes
    parsed: dict[str, Statement]  # statements its Parses created (not upstream yet)
    closed: list[str]  # statements it closed
    created: list[tuple[str, Statement]]  # named statements created and still open: to create upstream quietly


def answer_hot(
    batch: list[Message], statements: dict[str, Statement], ready: bytes, lookup: Lookups
) -> bytes | Wait | Literal[False] | None:
    """The hot batch's replies. False: not this shape (ask `answer_batch`); None: a miss; WAIT: waiting.

    A Parse of the unnamed statement answered here replaces `statements[""]`."""
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
    value = lookup.result(statement, bind[name_end + 1 :], int.from_bytes(execute[-4:], "big", signed=True))
    if value is None or value is WAIT:
        return value
    if describe is None and not same_shape(statement, value):
        return None  # the client knows another row shape for this statement (DDL since): the server's to say
    body: bytes | memoryview = value if describe is not None else memoryview(value)[header_length(value) :]
    if first:
        statements[""] = statement
        return b"".join((_PARSE_BIND_COMPLETE, body, ready))
    return b"".join((fe.BIND_COMPLETE, body, ready))


# In a batch answered here: the statement, its Bind, the row limit of its Execute, and the result once found.
_LocalPortal = tuple[Statement, fe.Bind, int, bytes | None]


def answer_batch(
    batch: list[Message], registry: StatementRegistry, ready: bytes, lookup: Lookups
) -> Answer | Wait | None:
    """The whole batch's replies from the cache; None when it cannot be (forward it), WAIT to wait and retry."""
    statements = registry.statements
    parsed: dict[str, Statement] = {}
    portals: dict[str, _LocalPortal] = {}
    closed: list[str] = []
    executed: set[str] = set()
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
            statement = parsed.get(bind.statement) or statements.get(bind.statement)
            if statement is None or not statement.query:
                return None
            rows = next_execute_rows(batch, index, bind.portal)
            if rows is None:
                return None  # a Bind never executed: let the server validate it
            portals[bind.portal] = (statement, bind, rows, None)
            executed.discard(bind.portal)  # a Bind (re)creates the portal
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
                note_described(statement, described)
            else:
                value = _portal_result(portals, describe.name, lookup)
                if value is None or value is WAIT:
                    return value
                replies.append(value[: header_length(value)])
                described_portals.add(describe.name)
        elif msg_type == m.EXECUTE:
            execute = fe.decode_execute(body)
            if execute.portal in executed:
                return None  # executing a portal again continues it: the server's to answer
            value = _portal_result(portals, execute.portal, lookup)
            if value is None or value is WAIT:
                return value
            if execute.portal not in described_portals and not same_shape(portals[execute.portal][0], value):
                return None  # the client decodes these rows with a description the entry does not have
            replies.append(value[header_length(value) :])
            executed.add(execute.portal)
            hit_statement = portals[execute.portal][0]
            unproven = {name: st for name, st in unproven.items() if st is not hit_statement}
        elif msg_type == m.CLOSE:
            if any(t not in (m.CLOSE, m.SYNC, m.FLUSH) for t, _ in batch[index + 1 :]):
                return None  # something after it uses what it closes: the server's to answer
            close = fe.decode_close(body)
            if close.kind == "S":
                existing = statements.get(close.name)
                if existing is not None and existing.upstream:
                    return None  # the server must close it too
                closed.append(close.name)
            replies.append(fe.CLOSE_COMPLETE)
        elif msg_type == m.SYNC:
            replies.append(ready)
    if unproven:
        return None
    created = [(n, st) for n, st in parsed.items() if n and not st.upstream and n not in closed]
    return Answer(b"".join(replies), parsed, closed, created)


def _portal_result(portals: dict[str, _LocalPortal], name: str, lookup: Lookups) -> bytes | Wait | None:
    found = portals.get(name)
    if found is None:
        return None
    statement, bind, rows, known = found
    if known is not None:
        return known
    value = lookup.result(statement, bind.arguments, rows)
    if isinstance(value, bytes):
        portals[name] = (statement, bind, rows, value)
    return value


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
