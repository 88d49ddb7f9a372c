"""The live status page: the admin listener's `/` (static HTML and the vendored uPlot chart library, package data
under observability/static/) and `/status.json`, which the page polls every second.

`/status.json` holds the totals now and, for the charts, per-second series of the last five minutes: a sampler reads
the counters once a second into a ring buffer (`Series`, sans-IO: it is given the counters and the time), so a page
opened late still shows the recent past. Feed health comes from hooks (`add_feed`): the invalidation bus, the
replication stream and the catalog poll are registered by the app; a shared tier, or anything else with a state worth
showing, registers its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from importlib import resources
from itertools import pairwise
from typing import TYPE_CHECKING

import orjson

from cacheproxy.analysis.fingerprint import fingerprint
from cacheproxy.cache.entry import Entry
from cacheproxy.observability.metrics import QUERY_OUTCOMES, Metrics

if TYPE_CHECKING:
    from cacheproxy.proxy.cache_service import CacheService

HISTORY = 300  # samples kept (one a second: five minutes)
TOP = 10
# The top statements come from a walk of the entries (it copies every shard's list): with more entries than this, at
# most one walk every _TOP_EVERY seconds.
_TOP_WALK_FREE = 10_000
_TOP_EVERY = 5.0
_FINGERPRINT_MEMO = 50_000
_STATIC = {
    "/": ("status.html", "text/html; charset=utf-8"),
    "/static/uplot.min.js": ("uplot.min.js", "text/javascript; charset=utf-8"),
    "/static/uplot.min.css": ("uplot.min.css", "text/css; charset=utf-8"),
    "/static/uplot.LICENSE": ("uplot.LICENSE", "text/plain; charset=utf-8"),
}
# Counters sampled for the series: the cumulative ones become per-second rates, the gauges stay as they are.
RATES = (*QUERY_OUTCOMES, "evictions", "expirations", "invalidations")
GAUGES = ("bytes", "max_bytes", "entries", "hit_ratio")

Route = Callable[[], Awaitable[tuple[int, bytes, str]]]


class Series:
    """A ring buffer of counter samples turned into per-second series. Sans-IO: `add` is given the time.

    >>> series = Series(("hit",), ("bytes",), history=3)
    >>> series.add(0.0, {"hit": 0, "bytes": 5}); series.add(2.0, {"hit": 10, "bytes": 7})
    >>> series.export()
    {'t': [2.0], 'hit': [5.0], 'bytes': [7]}
    """

    def __init__(self, rates: tuple[str, ...], gauges: tuple[str, ...], *, history: int = HISTORY) -> None:
        self._rates = rates
        self._gauges = gauges
        self._samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=history + 1)

    def add(self, now: float, counters: dict[str, float]) -> None:
        self._samples.append((now, counters))

    def export(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"t": []}
        for name in (*self._rates, *self._gauges):
            out[name] = []
        for (t0, before), (t1, after) in pairwise(self._samples):
            dt = t1 - t0
            if dt <= 0:
                continue
            out["t"].append(t1)
            for name in self._rates:
                out[name].append(max(0.0, (after.get(name, 0) - before.get(name, 0)) / dt))
            for name in self._gauges:
                out[name].append(after.get(name, 0))
        return out


class StatusPage:
    """The routes of the status page, and the sampler behind its charts."""

    def __init__(self, metrics: Metrics, service: CacheService | None, *, clock: Callable[[], float] = time.time):
        self._metrics = metrics
        self._service = service
        self._clock = clock
        self.series = Series(RATES, GAUGES)
        self._feeds: dict[str, Callable[[], object]] = {}
        self._top: tuple[float, list[dict[str, object]]] = (0.0, [])
        self._fingerprints: dict[str, str] = {}  # statement text -> its fingerprint (bounded: _FINGERPRINT_MEMO)
        self._task: asyncio.Task[None] | None = None
        if service is not None:
            self.add_feed("invalidation", service.feed_health)
            self.add_feed("catalog", self._catalog_health)
            self.add_feed("verify", service.verifier.summary)
            if service.shared is not None:
                self.add_feed("shared tier", service.shared.stats)

    def add_feed(self, name: str, state: Callable[[], object]) -> None:
        """Show `state()` (JSON-able) under feeds.`name` of /status.json and on the page (a shared tier's hook)."""
        self._feeds[name] = state

    def routes(self) -> dict[str, Route]:
        routes: dict[str, Route] = {path: self._static(*spec) for path, spec in _STATIC.items()}
        routes["/status.json"] = self._json_route
        return routes

    # -- sampling ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._sample_forever(), name="status-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sample()

    def sample(self) -> None:
        stats = self._metrics.cache_stats()
        counters: dict[str, float] = dict.fromkeys(QUERY_OUTCOMES, 0)
        for outcomes in self._queries().values():
            for outcome, count in outcomes.items():
                counters[outcome] = counters.get(outcome, 0) + count
        lookups = stats.hits + stats.misses
        counters.update(
            evictions=stats.evictions, expirations=stats.expirations, invalidations=stats.invalidations,
            bytes=stats.bytes, max_bytes=stats.max_bytes, entries=stats.entries,
            hit_ratio=stats.hits / lookups if lookups else 0.0,
        )  # fmt: skip
        self.series.add(self._clock(), counters)

    def _queries(self) -> dict[str, dict[str, int]]:
        queries = self._metrics.snapshot()["queries"]
        assert isinstance(queries, dict)
        return queries

    # -- /status.json --------------------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        m = self._metrics
        summary = m.snapshot()
        counts = m.status_counts()
        stats = m.cache_stats()
        durations = counts["durations"]
        assert isinstance(durations, dict)
        miss_count, miss_seconds = durations.get("miss", (0, 0.0))
        mean_miss = miss_seconds / miss_count if miss_count else None
        tables = counts["tables"]
        assert isinstance(tables, dict)
        top_tables = heapq.nlargest(TOP, tables.items(), key=lambda item: item[1][0] + item[1][1])
        return {
            "now": self._clock(),
            "version": summary["version"],
            "uptime_seconds": summary["uptime_seconds"],
            "hit_ratio": summary["hit_ratio"],
            "cache": asdict(stats),
            "queries": summary["queries"],
            # A hit saves what the same read costs upstream: the mean miss (request to reply, through the proxy).
            "time_saved_seconds": stats.hits * mean_miss if mean_miss is not None else 0.0,
            "mean_miss_ms": mean_miss * 1000 if mean_miss is not None else None,
            "memory": {"bytes": stats.bytes, "max_bytes": stats.max_bytes, "entries": stats.entries},
            "top_statements": self._top_statements(),
            "top_tables": [{"table": t, "hits": c[0], "misses": c[1]} for t, c in top_tables],
            "invalidations": {
                "entries_removed": stats.invalidations,
                "whole_database": summary["database_invalidations"],
                "bus": summary["invalidation_bus"],
            },
            "connections": summary["connections"],
            "feeds": {name: _safe(state) for name, state in self._feeds.items()},
            "series": self.series.export(),
        }

    def _top_statements(self) -> list[dict[str, object]]:
        """The cached statements served most (hits of their live entries), recomputed at most every few seconds."""
        if self._service is None:
            return []
        now = time.monotonic()
        engine = self._service.engine
        if len(engine) > _TOP_WALK_FREE and now - self._top[0] < _TOP_EVERY:
            return self._top[1]
        groups: dict[str, list[int]] = {}
        for entry in engine.entries():
            cell = groups.setdefault(self._statement(entry), [0, 0, 0])
            cell[0] += entry.hits
            cell[1] += 1
            cell[2] += entry.size
        top = heapq.nlargest(TOP, groups.items(), key=lambda item: item[1][0])
        rows: list[dict[str, object]] = [
            {"statement": text, "hits": hits, "entries": entries, "bytes": size} for text, (hits, entries, size) in top
        ]
        self._top = (now, rows)
        return rows

    def _statement(self, entry: Entry) -> str:
        """The entry's statement as its fingerprint: literals are values the page must not show (it has no login),
        and the variants of one statement add up."""
        text = entry.query
        if not text:
            sql = getattr(entry.key, "sql", None)
            text = sql.decode("utf-8", "replace") if isinstance(sql, bytes) else ""
        found = self._fingerprints.get(text)
        if found is None:
            if len(self._fingerprints) >= _FINGERPRINT_MEMO:
                self._fingerprints.clear()
            found = self._fingerprints[text] = fingerprint(text)[:300]
        return found

    def _catalog_health(self) -> dict[str, object]:
        assert self._service is not None
        summary = self._metrics.snapshot()
        poll = self._service.config.invalidation.catalog_poll
        return {
            "loads": summary["catalog_loads"],
            "poll": f"every {poll:g}s on the bus connection" if poll and self._service.bus is not None else "off",
            "replication_lag_bytes": self._metrics.status_counts()["replication_lag"],
        }

    # -- routes --------------------------------------------------------------------------------------------------

    async def _json_route(self) -> tuple[int, bytes, str]:
        return 200, orjson.dumps(self.status()), "application/json"

    def _static(self, name: str, content_type: str) -> Route:
        body = resources.files("cacheproxy.observability").joinpath("static", name).read_bytes()

        async def route() -> tuple[int, bytes, str]:
            return 200, body, content_type

        return route


def _safe(state: Callable[[], object]) -> object:
    """A hook's state, or what went wrong reading it (one broken hook must not take the page down)."""
    try:
        return state()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
