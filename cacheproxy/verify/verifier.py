"""The shadow verifier: takes sampled hits off the hit path, re-runs them on its own upstream connections, counts and
logs what it finds, and asks the cache service to bypass a statement found wrong.

The hit path pays one attribute read when verification is off (`rate` is 0.0), and one random number when it is
on; a sampled hit calls `offer`, which copies the session's state into a small record and appends it to a bounded
queue (full: dropped and counted), within the `verify.per_second` budget (a token bucket: over it, dropped and
counted). One background task takes the records in turn, so checks never pile up on the database.

Telling a stale cache from a racing write. A check takes the generations of the entry's tables (cache/engine.py:
they change with every invalidation of a table, whether by a write through this proxy, the bus or the replication
feed) after making sure the entry is still the live one, then re-runs the statement, then takes them again. A
different answer is counted as a mismatch only if the generations are still unchanged `verify.settle` seconds after
the re-run: a write that committed meanwhile, and that the proxy acknowledged (invalidated) within that time,
explains the difference ("raced", not counted). A write the proxy never hears of leaves them unchanged: that is
exactly the stale entry verification is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from cacheproxy.analysis.fingerprint import fingerprint
from cacheproxy.analysis.ordering import ordering
from cacheproxy.cache.entry import WHOLE_DATABASE, Entry, base_table
from cacheproxy.cache.keys import ExecuteKey, QueryKey
from cacheproxy.cache.tier import CacheTier
from cacheproxy.config import UpstreamConfig, VerifyConfig
from cacheproxy.feeds.raw_client import RawConnection, connect_raw
from cacheproxy.verify.compare import Verdict, cached_rows, compare, data_rows
from cacheproxy.verify.replay import SessionState, read_reply, rerun

log = logging.getLogger("cacheproxy.verify")

OUTCOMES = ("match", "mismatch", "raced", "reordered", "skipped", "error")
DROP_REASONS = ("queue_full", "rate")
_IDLE_CLOSE = 10.0  # seconds without a check after which the verifier's connections are closed
_TIMEOUT = 10.0  # seconds a re-run may take (statement_timeout, and the wait for its reply)
_MAX_TABLES = 100  # distinct table labels of the mismatch counter; the rest count as "_other"
_MAX_BYPASSED = 10_000


class SessionSettings(Protocol):
    """What `offer` reads of a session (proxy/transaction.py's TransactionTracker has it)."""

    @property
    def startup(self) -> Mapping[str, str]: ...
    @property
    def parameters(self) -> Mapping[str, str]: ...
    @property
    def set_history(self) -> list[bytes]: ...


@dataclass(frozen=True, slots=True)
class Sample:
    """A sampled hit, waiting for its check: its entry's key and creation time (not the entry: the queue must not
    keep evicted results alive), and its session's state."""

    key: Hashable
    created_at: float
    state: SessionState


class TokenBucket:
    """At most `rate` takes a second on average, `rate` at once after a quiet second. Sans-IO: `now` is given.

    >>> bucket = TokenBucket(2.0, now=0.0)
    >>> [bucket.take(0.0), bucket.take(0.0), bucket.take(0.0), bucket.take(0.5)]
    [True, True, False, True]
    """

    __slots__ = ("_stamp", "_tokens", "rate")

    def __init__(self, rate: float, *, now: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._stamp = now

    def take(self, now: float) -> bool:
        self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Verifier:
    """Shadow verification of one proxy's cache hits (see the module docstring)."""

    def __init__(
        self,
        config: VerifyConfig,
        upstream: UpstreamConfig,
        tier: CacheTier,
        *,
        bypass: Callable[[str, str, Entry], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.rate = config.sample  # read on the hit path: 0.0 when off
        self._upstream = upstream
        self._tier = tier
        self._bypass = bypass
        self._clock = clock
        self._bucket = TokenBucket(config.per_second, now=clock())
        self._queue: deque[Sample] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connections: dict[str, RawConnection] = {}
        self.checks = dict.fromkeys(OUTCOMES, 0)
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.mismatches: dict[str, int] = {}  # table -> count
        self.settling = 0  # checks waiting out `settle` after a different answer (tests watch it)
        self._checking = False
        self._logged: set[tuple[str, str]] = set()  # (database, fingerprint) whose mismatch was logged
        self._errors_logged: set[str] = set()
        self.last_mismatch: dict[str, object] | None = None  # for the status page

    def use_tier(self, tier: CacheTier) -> None:
        """Check entries of `tier` instead (a worker's engine replaces the service's before it starts)."""
        self._tier = tier

    # -- the hit path --------------------------------------------------------------------------------------------

    def sampled(self) -> bool:
        """Draw for one hit (callers test `rate` first, inline, so that a disabled verifier costs no call)."""
        return random.random() < self.rate

    def offer(self, entry: Entry, session: SessionSettings) -> None:
        """A sampled hit: queue its check unless the queue is full or the rate budget spent (both counted)."""
        if len(self._queue) >= self.config.queue:
            self.dropped["queue_full"] += 1
            return
        if not self._bucket.take(self._clock()):
            self.dropped["rate"] += 1
            return
        state = SessionState(
            tuple(session.startup.items()), tuple(session.parameters.items()), tuple(session.set_history)
        )
        self._queue.append(Sample(entry.key, entry.created_at, state))
        self._wake.set()

    def counting(
        self, count: Callable[[object, Entry | None], None], session: SessionSettings
    ) -> Callable[[object, Entry | None], None]:
        """`count` (the tier's: a lookup's outcome) that also samples the hits it counts: the extended-protocol hit
        path's hook, installed only while verification is on (so that it costs nothing otherwise)."""

        def count_and_sample(key: object, entry: Entry | None) -> None:
            count(key, entry)
            if entry is not None and self.rate and random.random() < self.rate:
                self.offer(entry, session)

        return count_and_sample

    # -- configuration and lifetime -------------------------------------------------------------------------------

    def apply_config(self, config: VerifyConfig) -> None:
        self.config = config
        self.rate = config.sample
        self._bucket.rate = config.per_second

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="verify")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_all()

    def connected(self, database: str) -> bool:
        return database in self._connections

    async def release(self, database: str) -> None:
        """Close the connection to `database` (the cache service releases its connections to it)."""
        conn = self._connections.pop(database, None)
        if conn is not None:
            conn.close()
            await conn.wait_closed()

    async def _close_all(self) -> None:
        for database in list(self._connections):
            await self.release(database)

    # -- the worker -----------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                try:
                    async with asyncio.timeout(_IDLE_CLOSE):
                        await self._wake.wait()
                except TimeoutError:
                    await self._close_all()  # idle: do not hold connections (a DROP DATABASE elsewhere needs that)
                    continue
            sample = self._queue.popleft()
            self._checking = True
            try:
                outcome = await self._check(sample)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or a lost connection must not stop verification
                outcome = "error"
                self._note_error(sample.key, f"{type(exc).__name__}: {exc}")
            finally:
                self._checking = False
            self.checks[outcome] += 1

    def idle(self) -> bool:
        """No sampled hit is waiting or being checked."""
        return not self._queue and not self._checking

    async def _check(self, sample: Sample) -> str:
        key = sample.key
        if not isinstance(key, QueryKey | ExecuteKey):
            return "skipped"
        text = key.sql.decode("utf-8", "replace")
        order = ordering(text)
        if not order.ordered and (order.limited or (isinstance(key, ExecuteKey) and key.max_rows > 0)):
            return "skipped"  # which rows come back is up to the plan: nothing to compare with
        entry = self._tier.get(key, self._clock(), count_miss=False, count_hit=False)
        if entry is None or entry.created_at != sample.created_at:
            return "skipped"  # invalidated, expired or replaced since the hit: nothing served is left to check
        tables = entry.tables
        before = self._tier.generations(tables)
        plan = rerun(key, sample.state, int(_TIMEOUT * 1000))
        conn = await self._connection(key.database)
        async with asyncio.timeout(_TIMEOUT + 1):
            data = await conn.request(plan.payload)
        reply = read_reply(data, plan)
        if reply.error is not None:
            self._note_error(key, reply.error)
            return "error"
        verdict = compare(cached_rows(entry.value), data_rows(reply.statement), ordered=order.ordered)
        if verdict is Verdict.MATCH:
            return "match"
        if verdict is Verdict.REORDERED:
            return "reordered"
        if self._tier.generations(tables) != before:
            return "raced"
        self.settling += 1
        try:
            await asyncio.sleep(self.config.settle)
        finally:
            self.settling -= 1
        if self._tier.generations(tables) != before:
            return "raced"  # a write's invalidation arrived after the re-run: it explains the difference
        self._mismatch(key, text, entry, len(cached_rows(entry.value)), len(data_rows(reply.statement)))
        return "mismatch"

    async def _connection(self, database: str) -> RawConnection:
        conn = self._connections.get(database)
        if conn is None or conn.closed:
            conn = await connect_raw(self._upstream, database, purpose="verify")
            self._connections[database] = conn
        return conn

    def _mismatch(self, key: QueryKey | ExecuteKey, text: str, entry: Entry, cached: int, fresh: int) -> None:
        names = sorted({base_table(name) for db, name in entry.tables if name != WHOLE_DATABASE})
        for table in names or ["_none"]:
            label = table if table in self.mismatches or len(self.mismatches) < _MAX_TABLES else "_other"
            self.mismatches[label] = self.mismatches.get(label, 0) + 1
        statement = fingerprint(text)
        age = self._clock() - entry.created_at
        self.last_mismatch = {"database": key.database, "fingerprint": statement[:500], "tables": names,
                              "age_seconds": round(age, 3), "at": time.time()}  # fmt: skip
        if (key.database, statement) not in self._logged and len(self._logged) < _MAX_BYPASSED:
            self._logged.add((key.database, statement))
            log.warning(
                "verify: the cache served a result PostgreSQL no longer gives (database %r, tables %s, entry age "
                "%.1fs, %d cached rows vs %d now%s): %s",
                key.database, ", ".join(names) or "-", age, cached, fresh,
                "; bypassing the statement until a reload" if self.config.on_mismatch == "bypass" else "",
                statement[:500],
            )  # fmt: skip
        if self.config.on_mismatch == "bypass":
            self._bypass(key.database, statement, entry)

    def _note_error(self, key: Hashable, why: str) -> None:
        database = getattr(key, "database", "?")
        if database not in self._errors_logged:  # once per database: a setting that cannot be reproduced repeats
            self._errors_logged.add(database)
            log.warning("verify: a check in database %r could not run: %s", database, why)
        else:
            log.debug("verify: a check in database %r could not run: %s", database, why)

    # -- for operators --------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, object]:
        return {
            "sample": self.rate,
            "on_mismatch": self.config.on_mismatch,
            "checks": dict(self.checks),
            "dropped": dict(self.dropped),
            "mismatches": dict(self.mismatches),
            "queued": len(self._queue),
            "last_mismatch": self.last_mismatch,
        }

    def collect(self) -> Iterator[Metric]:
        """The verifier's metric families (a prometheus_client collector: `registry.register(verifier)`)."""
        checks = CounterMetricFamily("cacheproxy_verify_checks", "Shadow verification checks, by outcome.",
                                     labels=["outcome"])  # fmt: skip
        for outcome, count in self.checks.items():
            checks.add_metric([outcome], count)
        yield checks
        mismatches = CounterMetricFamily(
            "cacheproxy_verify_mismatches", "Cached results PostgreSQL no longer gives, by table.", labels=["table"]
        )
        for table, count in self.mismatches.items():
            mismatches.add_metric([table], count)
        yield mismatches
        dropped = CounterMetricFamily("cacheproxy_verify_dropped", "Sampled hits not checked, by reason.",
                                      labels=["reason"])  # fmt: skip
        for reason, count in self.dropped.items():
            dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily("cacheproxy_verify_queued", "Sampled hits waiting for their check.",
                                value=len(self._queue))  # fmt: skip


def bypass_reason(statement: str) -> str:
    return f"shadow verification found a cached result of this statement wrong (until a reload): {statement[:200]}"
