"""The rule advisor, pure: an observed workload in, advice out (statements and tables ranked by the upstream time a
cache saves or would save, tables written too often to cache, and rules as YAML ready to paste). No I/O, no clock.

How it judges (the constants below):
- A statement's upstream time is what PostgreSQL spent on its runs that reached it; its mean is per run. A hit saves
  one mean run. For a read the cache serves now, what it would save is what it saved (its hits); for one a rule keeps
  out of the cache (or, before deployment, any read the analysis finds cacheable), its runs times the share a cache
  could answer: each write to one of its tables forces at least one more miss, so `1 - writes / runs` at best. A read
  the proxy cannot cache (a volatile function...) saves nothing.
- A table is written too often when it saw at least WRITE_HEAVY_MIN writes and WRITE_HEAVY_RATIO writes per read:
  its results are dropped before they are read again, and each miss still pays a capture and a store: `none`.
- A hot table (HOT_READS reads or more) written at most RARE_WRITES per read is a lookup table: `write_through`
  (a write re-runs what it dropped, so readers keep hitting) with a long TTL; never written, a long TTL alone.
- A statement whose results are almost never read twice (REUSE_MIN runs, hit ratio under REUSE_RATIO) is named by a
  statement rule with `none`; a slow one (SLOW_SECONDS a run) over tables that are not written too often gets a
  statement rule with a long TTL. The TTL only bounds how stale a result may be after a write no proxy saw (with
  `invalidation.replication` on, none): writes through the proxies drop results at once whatever the TTL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from cacheproxy.advice.workload import OVERFLOW, Observed, StatementSample

WRITE_HEAVY_MIN = 5
WRITE_HEAVY_RATIO = 0.2
HOT_READS = 50
RARE_WRITES = 0.01
REUSE_MIN = 50
REUSE_RATIO = 0.1
SLOW_SECONDS = 0.010
LONG_TTL = "10m"
SLOW_TTL = "5m"
MIN_READS = 10  # fewer reads than this: nothing to say about a table
TOP = 20  # statements and tables shown


@dataclass(frozen=True, slots=True)
class StatementAdvice:
    database: str
    id: str
    text: str
    tables: tuple[str, ...]
    calls: int
    hits: int
    misses: int
    bypasses: int
    hit_ratio: float | None
    mean_ms: float
    upstream_s: float
    saved_s: float
    would_save_s: float
    cacheable: bool
    rule: str
    advice: str


@dataclass(frozen=True, slots=True)
class TableAdvice:
    database: str
    table: str
    reads: int
    writes: int
    hits: int
    misses: int
    hit_ratio: float | None
    upstream_s: float
    saved_s: float
    would_save_s: float
    write_heavy: bool
    strategy: str | None  # the suggested strategy; None: the default is fine
    ttl: str | None
    advice: str


@dataclass(frozen=True, slots=True)
class SuggestedRule:
    why: str
    tables: tuple[str, ...] = ()
    fingerprints: tuple[str, ...] = ()
    ttl: str | None = None
    strategy: str = "lazy"

    def as_dict(self) -> dict[str, object]:
        shown: dict[str, object] = {"tables": list(self.tables)} if self.tables else {
            "fingerprints": list(self.fingerprints)}  # fmt: skip
        if self.ttl is not None:
            shown["ttl"] = self.ttl
        shown["strategy"] = self.strategy
        return shown


@dataclass(frozen=True, slots=True)
class Advice:
    seconds: float
    statements: tuple[StatementAdvice, ...]
    tables: tuple[TableAdvice, ...]
    rules: tuple[SuggestedRule, ...]
    notes: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        """Plain, JSON-able data (GET /advice, the status page)."""
        return {
            "seconds": round(self.seconds, 3),
            "statements": [asdict(s) for s in self.statements],
            "tables": [asdict(t) for t in self.tables],
            "rules": [{**r.as_dict(), "why": r.why} for r in self.rules],
            "rules_yaml": self.yaml(),
            "notes": list(self.notes),
        }

    def yaml(self) -> str:
        """The suggested rules as a `rules:` block to paste into the configuration (comments say why)."""
        if not self.rules:
            return "rules: []  # nothing to suggest yet: the defaults suit what was seen\n"
        lines = ["rules:"]
        for rule in self.rules:
            lines.append(f"  # {_one_line(rule.why)}")
            if rule.tables:
                lines.append(f"  - tables: [{', '.join(json.dumps(t) for t in rule.tables)}]")
            else:
                lines.append(f"  - fingerprints: [{', '.join(json.dumps(f) for f in rule.fingerprints)}]")
            if rule.ttl is not None:
                lines.append(f"    ttl: {rule.ttl}")
            lines.append(f"    strategy: {rule.strategy}")
        return "\n".join(lines) + "\n"


def advise(observed: Observed) -> Advice:
    """Rank what `observed` saw and suggest rules (see the module docstring)."""
    reads = [s for s in observed.statements if s.kind == "read" and s.calls and s.id != OVERFLOW]
    tables = _tables(reads, observed)
    heavy = {(t.database, t.table) for t in tables if t.write_heavy}
    writes = observed.table_writes
    ranked = sorted((_statement(s, writes, heavy) for s in reads), key=lambda a: (-a.would_save_s, -a.calls, a.id))
    notes: list[str] = []
    if observed.overflow:
        notes.append("some statements or tables were past the advisor's bounds and are counted together")
    for database, count in sorted(observed.database_writes.items()):
        notes.append(f"database {database}: {count} writes of unknown reach (DDL, DO, functions that may write) "
                     "dropped all its cached results")  # fmt: skip
    rules = _statement_rules(ranked) + _table_rules(tables)
    return Advice(observed.seconds, tuple(ranked[:TOP]), tuple(tables[:TOP]), tuple(rules), tuple(notes))


def _statement(s: StatementSample, writes: dict[tuple[str, str], int], heavy: set[tuple[str, str]]) -> StatementAdvice:
    mean = s.mean_seconds
    lookups = s.hits + s.misses
    ratio = s.hits / lookups if lookups else None
    saved = s.hits * mean
    would = _would_save(s, writes)
    if s.cacheable and not lookups:
        advice = "cacheable" + (f", slow ({mean * 1000:.1f} ms a run): worth a longer TTL" if mean >= SLOW_SECONDS
                                else "")  # fmt: skip
    elif s.cacheable:
        advice = "cached"
        if any((s.database, t) in heavy for t in s.tables):
            advice = "cached, but its tables are written too often to keep results"
        elif lookups >= REUSE_MIN and (ratio or 0.0) < REUSE_RATIO:
            advice = "results almost never reused: strategy none for this statement"
        elif mean >= SLOW_SECONDS:
            advice = f"slow ({mean * 1000:.1f} ms a run): worth a longer TTL"
    elif _kept_out_by_rule(s):
        advice = f"not cached by {s.rule}"
    else:
        advice = f"cannot be cached: {s.reason}" if s.reason else "cannot be cached"
    return StatementAdvice(s.database, s.id, s.text, s.tables, s.calls, s.hits, s.misses, s.bypasses,
                           _round(ratio), round(mean * 1000, 3), round(s.upstream_seconds, 6), round(saved, 6),
                           round(would, 6), s.cacheable, s.rule, advice)  # fmt: skip


def _kept_out_by_rule(s: StatementSample) -> bool:
    return s.reason is not None and s.reason.startswith("rule says strategy none")


def _would_save(s: StatementSample, writes: dict[tuple[str, str], int]) -> float:
    """Upstream seconds a cache saves (cached now: its hits) or would save (kept out by a rule) on `s`."""
    if s.cacheable and s.hits + s.misses:
        return s.hits * s.mean_seconds
    if s.cacheable or _kept_out_by_rule(s):  # (not looked up: never in the cache's reach, or before deployment)
        written = sum(writes.get((s.database, t), 0) for t in s.tables)
        return s.bypasses * s.mean_seconds * max(0.0, 1.0 - written / s.calls)
    return 0.0


def _tables(reads: list[StatementSample], observed: Observed) -> list[TableAdvice]:
    totals: dict[tuple[str, str], list[float]] = {}  # reads, hits, misses, upstream, saved, would save
    for s in reads:
        mean = s.mean_seconds
        would = _would_save(s, observed.table_writes)
        for table in s.tables:
            row = totals.setdefault((s.database, table), [0, 0, 0, 0.0, 0.0, 0.0])
            row[0] += s.calls
            row[1] += s.hits
            row[2] += s.misses
            row[3] += s.upstream_seconds
            row[4] += s.hits * mean
            row[5] += would
    out = [_table(database, table, row, observed.table_writes.get((database, table), 0))
           for (database, table), row in totals.items()]  # fmt: skip
    return sorted(out, key=lambda t: (-t.would_save_s, -t.reads, t.table))


def _table(database: str, table: str, row: list[float], writes: int) -> TableAdvice:
    reads, hits, misses = int(row[0]), int(row[1]), int(row[2])
    lookups = hits + misses
    ratio = hits / lookups if lookups else None
    heavy = writes >= WRITE_HEAVY_MIN and writes >= WRITE_HEAVY_RATIO * reads
    strategy: str | None = None
    ttl: str | None = None
    if heavy:
        strategy = "none"
        shown = f", hit ratio {ratio:.0%}" if ratio is not None else ""
        advice = (
            f"written too often: {_n(writes, 'write')} for {_n(reads, 'read')}{shown}; each write drops its results"
        )
    elif lookups >= REUSE_MIN and (ratio or 0.0) < REUSE_RATIO:
        advice = f"its results are rarely reused (hit ratio {ratio or 0.0:.0%}): see its statements"
    elif reads >= HOT_READS and 0 < writes <= RARE_WRITES * reads:
        strategy, ttl = "write_through", LONG_TTL
        advice = f"hot and rarely written ({_n(writes, 'write')} for {_n(reads, 'read')}): write-through keeps it warm"
    elif reads >= HOT_READS and writes == 0:
        strategy, ttl = "lazy", LONG_TTL
        advice = f"hot and not written while observed ({_n(reads, 'read')}): a longer TTL"
    elif reads < MIN_READS:
        advice = "too few reads to say"
    else:
        advice = "the default suits it"
    return TableAdvice(database, table, reads, writes, hits, misses, _round(ratio), round(row[3], 6),
                       round(row[4], 6), round(row[5], 6), heavy, strategy, ttl, advice)  # fmt: skip


def _statement_rules(ranked: list[StatementAdvice]) -> list[SuggestedRule]:
    rules: list[SuggestedRule] = []
    seen: set[str] = set()
    for s in ranked:
        if s.id in seen or not s.cacheable:
            continue
        if s.advice.startswith("results almost never reused"):
            why = f"{_short(s.text)}: {s.hits} hits in {s.hits + s.misses} lookups, results almost never reused"
            rules.append(SuggestedRule(why, fingerprints=(s.id,), strategy="none"))
        elif "slow (" in s.advice:
            why = f"{_short(s.text)}: {s.mean_ms:.1f} ms a run, {s.calls} runs, {s.saved_s:.3f} s saved"
            rules.append(SuggestedRule(why, fingerprints=(s.id,), ttl=SLOW_TTL))
        else:
            continue
        seen.add(s.id)
    return rules


def _table_rules(tables: Iterable[TableAdvice]) -> list[SuggestedRule]:
    """One rule per table name (a name is matched in every schema and database: the first advice for it counts),
    the tables written too often first (`none` should not be shadowed), then write-through, then long TTLs."""
    order = {"none": 0, "write_through": 1, "lazy": 2}
    chosen: dict[str, TableAdvice] = {}
    for t in tables:
        if t.strategy is not None and t.table not in chosen:
            chosen[t.table] = t
    rules = [
        SuggestedRule(f"{t.table}: {t.advice}", tables=(_pattern(t.table),), ttl=t.ttl, strategy=t.strategy or "lazy")
        for t in chosen.values()
    ]
    return sorted(rules, key=lambda r: order.get(r.strategy, 3))


def _pattern(table: str) -> str:
    """A rule pattern naming exactly `table` (unquoted names fold to lower case: quote the others)."""
    if table == table.lower() and all(c.isalnum() or c in "_$" for c in table):
        return table
    return '"' + table.replace('"', '""') + '"'


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
