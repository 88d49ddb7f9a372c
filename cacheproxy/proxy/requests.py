"""What the relay remembers of each request it sends upstream, handed back by the ReplyTracker when the request
completes: a result to store (Fill), a forwarded statement's effects (Request), a Parse or Describe to account for,
the proxy's own isolation probe, a write-through refresh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cacheproxy.advice.workload import StatementStats
from cacheproxy.analysis.model import Kind
from cacheproxy.cache.entry import TableId
from cacheproxy.cache.keys import CacheKey, ExecuteKey
from cacheproxy.policy.classify import Classified
from cacheproxy.policy.verdict import WriteScope
from cacheproxy.protocol.statements import Statement

KIND_LABELS: Final = {
    Kind.READ: "read",
    Kind.WRITE: "write",
    Kind.DDL: "ddl",
    Kind.TRANSACTION: "tx",
    Kind.SESSION: "session",
    Kind.OTHER: "other",
}


@dataclass(slots=True)
class Fill:
    """What storing a captured result needs: its key, its dependencies, and the generations taken at send time."""

    key: CacheKey
    tables: frozenset[TableId]
    generations: tuple[int, ...]
    ttl: float
    query: str
    rule: str
    leader: bool  # this session registered the single-flight entry for the key
    deferred: bool = False  # read inside a transaction block: stored only if that transaction commits
    stale_for: float = 0.0  # the rule's stale_if_error window
    # The shared tier's generations read before the query went upstream (cache/shared_tier.py `Stamp`), if any.
    shared: object | None = None  # (`| None`: see replies.Pending.on_done)

    def __init__(
        self,
        key: CacheKey,
        tables: frozenset[TableId],
        generations: tuple[int, ...],
        ttl: float,
        query: str,
        rule: str,
        leader: bool,
        deferred: bool = False,
        stale_for: float = 0.0,
        shared: object | None = None,
    ) -> None:
        self.key = key
        self.tables = tables
        self.generations = generations
        self.ttl = ttl
        self.query = query
        self.rule = rule
        self.leader = leader
        self.deferred = deferred
        self.stale_for = stale_for
        self.shared = shared


@dataclass(slots=True)
class Request:
    """A forwarded query or Execute, for what happens when it completes: invalidation, session state, metrics and
    the slow-query log."""

    scope: WriteScope | None
    kind: str
    outcome: str  # "miss" (its result will be stored) or "bypass"
    started: float
    sql: bytes
    changes_state: bool = False  # a SET/RESET/DISCARD to record if it succeeds
    discards_all: bool = False  # ... and it is DISCARD ALL
    stats: StatementStats | None = None  # its statement's advisor counters (advice/workload.py)

    def __init__(
        self,
        scope: WriteScope | None,
        kind: str,
        outcome: str,
        started: float,
        sql: bytes,
        changes_state: bool = False,
        discards_all: bool = False,
        stats: StatementStats | None = None,
    ) -> None:
        self.scope = scope
        self.kind = kind
        self.outcome = outcome
        self.started = started
        self.sql = sql
        self.changes_state = changes_state
        self.discards_all = discards_all
        self.stats = stats


@dataclass(slots=True)
class Missed:
    """The lookup of an Execute that the cache did not answer, made for the batch being answered: what forwarding
    the same batch upstream would compute again (InFlight.forward_hot_miss)."""

    statement: Statement
    arguments: bytes
    max_rows: int
    key: ExecuteKey | None  # None: not a read this session may read from the cache (a write...)
    classified: Classified

    def __init__(
        self, statement: Statement, arguments: bytes, max_rows: int, key: ExecuteKey | None, classified: Classified
    ) -> None:
        self.statement = statement
        self.arguments = arguments
        self.max_rows = max_rows
        self.key = key
        self.classified = classified


@dataclass(slots=True)
class ParseDone:
    """A Parse sent upstream: if the server refuses or skips it, the statement does not exist there."""

    name: str
    statement: Statement
    replay: bool = False

    def __init__(self, name: str, statement: Statement, replay: bool = False) -> None:
        self.name = name
        self.statement = statement
        self.replay = replay


@dataclass(slots=True)
class Described:
    """A Describe of a statement sent upstream: its reply tells the client the statement's RowDescription."""

    statement: Statement

    def __init__(self, statement: Statement) -> None:
        self.statement = statement


class IsolationProbe:
    """The proxy's own question, after a BEGIN that named no isolation level: which level the transaction has."""

    __slots__ = ()


@dataclass(slots=True)
class Refresh:
    """A write-through refresh this session sent for another result: counted when it completes."""

    def __init__(self) -> None:
        pass
