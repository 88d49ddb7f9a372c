"""What the operator sees of N workers: /metrics and /stats summed over the workers, plus per-worker rows.

Worker 0 serves the admin HTTP endpoint; at each scrape it asks every other worker for its own metrics over the
in-host channel and adds them up sample by sample (counters, gauges and histogram buckets all sum; `_created`
timestamps and the uptime take the earliest / largest; `cacheproxy_info` stays 1). A worker that does not answer
(it is restarting) is left out, and `cacheproxy_workers_reporting` says how many did. A restarted worker's counters
start again from zero, so a sum may go down: Prometheus' rate() treats that as a counter reset.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

from cacheproxy.observability.admin_http import AdminServer
from cacheproxy.observability.metrics import CONTENT_TYPE
from cacheproxy.workers.control import WorkerTable

_KEEP_ONE = frozenset({"cacheproxy_info"})
_LARGEST = frozenset({"cacheproxy_uptime_seconds", "cacheproxy_snapshot_last_success_timestamp_seconds"})


def merge_metrics(texts: Iterable[str]) -> str:
    """Sum Prometheus text expositions (format 0.0.4, as every worker writes the same families in the same order)
    line by line: comment lines are kept from where they first appear, a sample line's value is added up over the
    workers under its exact name and labels."""
    order: list[str] = []  # comment lines and sample keys, first-seen order
    seen: set[str] = set()
    values: dict[str, float] = {}
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                if line not in seen:
                    seen.add(line)
                    order.append(line)
                continue
            key, _, raw = line.rpartition(" ")
            value = float(raw)
            name = key.partition("{")[0]
            if key not in values:
                values[key] = value
                order.append(key)
            elif name in _KEEP_ONE:
                pass
            elif name in _LARGEST:
                values[key] = max(values[key], value)
            elif name.endswith("_created"):
                values[key] = min(values[key], value)
            else:
                values[key] += value
    lines = [item if item in seen else f"{item} {_number(values[item])}" for item in order]
    return "\n".join(lines) + "\n"


def worker_families(table: WorkerTable, reporting: int) -> str:
    """Per-worker gauges from the shared worker table, in the text format."""
    rows = table.rows()
    lines = [
        "# HELP cacheproxy_workers Worker processes configured (server.workers).",
        "# TYPE cacheproxy_workers gauge",
        f"cacheproxy_workers {table.workers}",
        "# HELP cacheproxy_workers_reporting Workers whose metrics are in this scrape's sums.",
        "# TYPE cacheproxy_workers_reporting gauge",
        f"cacheproxy_workers_reporting {reporting}",
        "# HELP cacheproxy_worker_restarts_total Times the supervisor restarted a worker that died.",
        "# TYPE cacheproxy_worker_restarts_total counter",
        *(f'cacheproxy_worker_restarts_total{{worker="{row.index}"}} {row.restarts}' for row in rows),
        "# HELP cacheproxy_worker_client_connections Client connections open now, per worker.",
        "# TYPE cacheproxy_worker_client_connections gauge",
        *(f'cacheproxy_worker_client_connections{{worker="{row.index}"}} {row.clients}' for row in rows),
    ]
    return "\n".join(lines) + "\n"


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum /stats summaries: numbers add up, lists are joined (unique, sorted), other values are the first's."""
    merged = _merge(parts)
    assert isinstance(merged, dict)
    cache = merged.get("cache")
    if isinstance(cache, dict):
        lookups = cache.get("hits", 0) + cache.get("misses", 0)
        merged["hit_ratio"] = cache.get("hits", 0) / lookups if lookups else None
    if parts:
        merged["uptime_seconds"] = max(part.get("uptime_seconds", 0) for part in parts)
    return merged


def _merge(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, bool) or first is None or isinstance(first, str):
        return first
    if isinstance(first, int | float):
        return sum(value for value in values if isinstance(value, int | float) and not isinstance(value, bool))
    if isinstance(first, list):
        return sorted({item for value in values if isinstance(value, list) for item in value if isinstance(item, str)})
    if isinstance(first, dict):
        keys: dict[str, None] = {}
        for value in values:
            if isinstance(value, dict):
                keys.update(dict.fromkeys(value))
        return {
            key: _merge([value[key] for value in values if isinstance(value, dict) and key in value]) for key in keys
        }
    return first


class WorkersAdminServer(AdminServer):
    """The admin HTTP server of worker 0: /metrics and /stats for all the workers."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        gather: Callable[[str], Awaitable[list[bytes]]],
        table: WorkerTable,
        **kwargs: Any,
    ) -> None:
        super().__init__(host, port, **kwargs)
        self._gather = gather
        self._table = table

    async def _metrics_route(self) -> tuple[int, bytes, str]:
        answers = await self._gather("metrics")
        texts = [answer.decode("utf-8", "replace") for answer in answers]
        body = merge_metrics(texts) + worker_families(self._table, len(texts))
        return 200, body.encode(), CONTENT_TYPE

    async def _stats_route(self) -> tuple[int, bytes, str]:
        answers = await self._gather("stats")
        merged = merge_stats([orjson.loads(answer) for answer in answers])
        merged["workers"] = [
            {"worker": row.index, "pid": row.pid, "restarts": row.restarts, "clients": row.clients}
            for row in self._table.rows()
        ]
        merged["workers_reporting"] = len(answers)
        return 200, orjson.dumps(merged), "application/json"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1 << 53:
        return str(int(value))
    return repr(value)
