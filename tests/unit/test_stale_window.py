"""Stale-if-error in the cache (no sockets): entries kept past expiry for their window but never returned by `get`,
`get_stale` within the window only, sweeps and lost feeds honouring it, the rules' shortest window, the metric."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cacheproxy.cache.engine import CacheEngine
from cacheproxy.config import Rule
from cacheproxy.observability.metrics import Metrics
from cacheproxy.policy.rules import RuleSet

DB = "app"
ITEMS = frozenset({(DB, "items"), (DB, "\x00")})


def _engine() -> CacheEngine:
    return CacheEngine(max_memory=1 << 20, max_entry_size=1 << 16, shards=4)


def test_get_never_serves_a_stale_entry_but_get_stale_does_within_the_window() -> None:
    engine = _engine()
    assert engine.put("k", b"v", tables=ITEMS, ttl=10, now=0, stale_for=30)
    assert engine.get("k", 5) is not None and engine.get_stale("k", 5) is not None
    assert engine.get("k", 10) is None  # expired: a miss in normal operation...
    entry = engine.get_stale("k", 10)  # ...kept, for stale-if-error
    assert entry is not None and entry.value == b"v"
    assert engine.get_stale("k", 39.9) is not None
    assert engine.get_stale("k", 40) is None
    assert engine.get("k", 40) is None
    assert len(engine) == 0  # past its window, the get above dropped it


def test_without_a_window_expired_means_gone() -> None:
    engine = _engine()
    engine.put("k", b"v", tables=ITEMS, ttl=10, now=0)
    assert engine.get_stale("k", 10) is None
    assert engine.get("k", 10) is None
    assert len(engine) == 0


def test_sweep_keeps_entries_within_their_window() -> None:
    engine = _engine()
    engine.put("stale", b"v", tables=ITEMS, ttl=1, now=0, stale_for=100)
    engine.put("plain", b"v", tables=ITEMS, ttl=1, now=0)
    assert engine.sweep(50, max_checks=100) == 1
    assert engine.get_stale("stale", 50) is not None and engine.get_stale("plain", 50) is None
    assert engine.sweep(101, max_checks=100) == 1
    assert len(engine) == 0


def test_a_lost_feed_expires_stale_entries_and_drops_the_rest() -> None:
    engine = _engine()
    engine.put("stale", b"v", tables=ITEMS, ttl=60, now=0, stale_for=30)
    engine.put("plain", b"v", tables=ITEMS, ttl=60, now=0)
    engine.put("other", b"v", tables=frozenset({("other", "t")}), ttl=60, now=0, stale_for=30)
    generations = engine.generations(ITEMS)
    assert engine.expire_database(DB, now=5) == 1
    assert engine.get("plain", 6) is None and engine.get_stale("plain", 6) is None
    assert engine.get("stale", 6) is None  # expired at 5: never served normally again
    assert engine.get_stale("stale", 34) is not None  # ... but within 30 s of the loss
    assert engine.get_stale("stale", 35) is None
    assert engine.get("other", 6) is not None  # another database is untouched
    # A fill sent before the loss is refused.
    assert not engine.put("late", b"v", tables=ITEMS, ttl=60, now=6, generations=generations)
    for shard in range(engine.shard_count):
        engine._shards[shard].check_invariants()


def test_an_already_expired_entry_keeps_its_own_window() -> None:
    engine = _engine()
    engine.put("stale", b"v", tables=ITEMS, ttl=1, now=0, stale_for=10)
    engine.expire_database(DB, now=5)
    # It expired at 1, so its window ends at 11: the loss at 5 does not extend it to 15.
    assert engine.get_stale("stale", 10.9) is not None
    assert engine.get_stale("stale", 11) is None


def test_rules_take_the_shortest_window_and_none_wins() -> None:
    rules = RuleSet(
        (
            Rule(("items",), stale_if_error=60.0),
            Rule(("prices",), stale_if_error=10.0),
            Rule(("audit",)),
        ),
        default_ttl=30.0,
    )
    assert rules.decide([("public", "items")]).stale_if_error == 60.0
    assert rules.decide([("public", "items"), ("public", "prices")]).stale_if_error == 10.0
    assert rules.decide([("public", "items"), ("public", "audit")]).stale_if_error == 0.0
    assert rules.decide([("public", "orders")]).stale_if_error == 0.0  # no rule: off by default
    assert rules.decide([]).stale_if_error == 0.0


def test_stale_served_metric() -> None:
    metrics = Metrics()
    metrics.stale_served()
    metrics.stale_served()
    body, _ = metrics.render()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert values["cacheproxy_stale_served_total"] == 2
