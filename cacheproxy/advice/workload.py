"""What the proxy saw of its workload, for the advisor: per statement (database, fingerprint id) how often it ran,
hit, missed or bypassed the cache and how long PostgreSQL took; per table how often it was written.

Cheap by construction: a statement's counters are one object, found when its text is classified (the classification
memo's miss path) and held by the classification, so a hit adds one to an attribute of an object it already holds;
misses and bypasses add their upstream time when they complete. Both tables are bounded: past the bound, statements
share one overflow counter and tables are not counted (the advice says so)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MAX_STATEMENTS: Final = 2000
MAX_TABLES: Final = 2000
OVERFLOW: Final = "_other"


class StatementStats:
    """One statement's counters (mutable, shared by every classification of its fingerprint) and what it is."""

    __slots__ = (
        "bypasses",
        "cacheable",
        "database",
        "hits",
        "id",
        "kind",
        "misses",
        "reason",
        "rule",
        "strategy",
        "tables",
        "text",
        "timed",
        "ttl",
        "upstream_seconds",
    )  # fmt: skip

    def __init__(self, database: str, statement_id: str, text: str, kind: str) -> None:
        self.database = database
        self.id = statement_id
        self.text = text
        self.kind = kind  # read, write, ddl, tx, session, other
        self.tables: tuple[str, ...] = ()
        self.cacheable = False
        self.reason: str | None = None
        self.rule = ""
        self.ttl = 0.0
        self.strategy = "lazy"
        self.hits = 0
        self.misses = 0
        self.bypasses = 0
        self.upstream_seconds = 0.0  # over the misses and bypasses that completed
        self.timed = 0

    def completed(self, outcome: str, seconds: float) -> None:
        """A miss or bypass came back from upstream after `seconds`."""
        if outcome == "miss":
            self.misses += 1
        else:
            self.bypasses += 1
        self.upstream_seconds += seconds
        self.timed += 1


@dataclass(slots=True, unsafe_hash=True)
class StatementSample:
    """A copy of one statement's counters at one moment: the advisor's input."""

    database: str
    id: str
    text: str
    kind: str
    tables: tuple[str, ...]
    cacheable: bool
    reason: str | None
    rule: str
    ttl: float
    strategy: str
    hits: int
    misses: int
    bypasses: int
    upstream_seconds: float
    timed: int = 0

    def __init__(
        self,
        database: str,
        id: str,
        text: str,
        kind: str,
        tables: tuple[str, ...],
        cacheable: bool,
        reason: str | None,
        rule: str,
        ttl: float,
        strategy: str,
        hits: int,
        misses: int,
        bypasses: int,
        upstream_seconds: float,
        timed: int = 0,
    ) -> None:
        self.database = database
        self.id = id
        self.text = text
        self.kind = kind
        self.tables = tables
        self.cacheable = cacheable
        self.reason = reason
        self.rule = rule
        self.ttl = ttl
        self.strategy = strategy
        self.hits = hits
        self.misses = misses
        self.bypasses = bypasses
        self.upstream_seconds = upstream_seconds
        self.timed = timed

    @property
    def calls(self) -> int:
        return self.hits + self.misses + self.bypasses

    @property
    def mean_seconds(self) -> float:
        """PostgreSQL's mean time for one run of it (0 when no run came back yet)."""
        return self.upstream_seconds / self.timed if self.timed else 0.0


@dataclass(slots=True, unsafe_hash=True)
class Observed:
    """The workload over `seconds`: statements, and writes per (database, table) (a write statement that completed,
    or an invalidation from another proxy or the replication stream), and writes of unknown reach per database."""

    seconds: float
    statements: tuple[StatementSample, ...]
    table_writes: dict[tuple[str, str], int]
    database_writes: dict[str, int]
    overflow: bool = False  # some statements or tables were not told apart (the bounds)

    def __init__(
        self,
        seconds: float,
        statements: tuple[StatementSample, ...],
        table_writes: dict[tuple[str, str], int],
        database_writes: dict[str, int],
        overflow: bool = False,
    ) -> None:
        self.seconds = seconds
        self.statements = statements
        self.table_writes = table_writes
        self.database_writes = database_writes
        self.overflow = overflow


class Workload:
    """The recorder (see the module docstring). `now` comes from the caller's clock."""

    def __init__(self, now: float) -> None:
        self._started = now
        self._statements: dict[tuple[str, str], StatementStats] = {}
        self._overflow = StatementStats("", OVERFLOW, "(statements past the advisor's bound)", "other")
        self._table_writes: dict[tuple[str, str], int] = {}
        self._database_writes: dict[str, int] = {}
        self._tables_overflowed = False

    def statement(self, database: str, statement_id: str, text: str, kind: str) -> StatementStats:
        """The counters of a statement (made on first sight; past MAX_STATEMENTS, the shared overflow ones)."""
        key = (database, statement_id)
        found = self._statements.get(key)
        if found is not None:
            return found
        if len(self._statements) >= MAX_STATEMENTS:
            return self._overflow
        found = self._statements[key] = StatementStats(database, statement_id, text[:1000], kind)
        return found

    def written(self, database: str, tables: set[str]) -> None:
        """A write completed (or was announced by another proxy) that invalidates `tables` of `database`."""
        counts = self._table_writes
        for table in tables:
            key = (database, table)
            if key in counts:
                counts[key] += 1
            elif len(counts) < MAX_TABLES:
                counts[key] = 1
            else:
                self._tables_overflowed = True

    def database_written(self, database: str) -> None:
        """A write whose reach is unknown (DDL, DO, a function that may write): the whole database invalidated."""
        self._database_writes[database] = self._database_writes.get(database, 0) + 1

    def reset(self, now: float) -> None:
        self.__init__(now)  # type: ignore[misc]

    def observed(self, now: float) -> Observed:
        everything = [*self._statements.values()]
        if self._overflow.hits or self._overflow.timed:
            everything.append(self._overflow)
        samples = tuple(
            StatementSample(s.database, s.id, s.text, s.kind, s.tables, s.cacheable, s.reason, s.rule, s.ttl,
                            s.strategy, s.hits, s.misses, s.bypasses, s.upstream_seconds, s.timed)
            for s in everything
        )  # fmt: skip
        overflow = self._tables_overflowed or len(everything) > len(self._statements)
        return Observed(max(0.0, now - self._started), samples, dict(self._table_writes), dict(self._database_writes),
                        overflow)  # fmt: skip
