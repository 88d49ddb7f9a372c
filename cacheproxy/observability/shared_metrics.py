"""The shared tier's Prometheus metrics (cacheproxy_shared_*), read from its counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from cacheproxy.cache.shared_tier import LATENCY_BUCKETS, SharedTier


class SharedCollector:
    """Registered in the proxy's registry when the shared tier is configured (no cost otherwise)."""

    def __init__(self, tier: SharedTier) -> None:
        self._tier = tier

    def collect(self) -> Iterator[Metric]:
        c = self._tier.counters
        for name, value, doc in (
            ("cacheproxy_shared_hits", c.hits, "Lookups answered by the shared tier (in-process misses it had)"),
            ("cacheproxy_shared_misses", c.misses, "Shared-tier lookups that found no current entry"),
            ("cacheproxy_shared_stale", c.stale, "Shared-tier misses on an entry filled under older generations"),
            ("cacheproxy_shared_validated", c.validated, "strict: in-process hits the shared generations confirmed"),
            ("cacheproxy_shared_errors", c.errors, "Shared-tier calls that failed or timed out"),
            ("cacheproxy_shared_fills", c.fills, "Results stored in the shared tier"),
            ("cacheproxy_shared_bumps", c.bumps, "Generation bumps sent (one per committed write transaction)"),
            ("cacheproxy_shared_breaker_opened", c.breaker_opened, "Times the shared tier's circuit breaker opened"),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        available = int(self._tier.in_use)
        yield GaugeMetricFamily("cacheproxy_shared_available", "1 when the shared tier is in use", value=available)
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), c.latency_counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        family = HistogramMetricFamily(
            "cacheproxy_shared_call_seconds", "Latency of shared-tier calls (a lookup's MGET, a fill, a bump)"
        )
        family.add_metric([], buckets, c.latency_sum)
        yield family
