"""CacheService: a write to a table with triggers invalidates the whole database; that is said once, not per write."""

from __future__ import annotations

import logging

import pytest

from cacheproxy.config import build_config
from cacheproxy.policy.verdict import WriteScope
from cacheproxy.proxy.cache_service import CacheService


def test_trigger_invalidations_are_logged_once_per_table(caplog: pytest.LogCaptureFixture) -> None:
    service = CacheService(build_config({"upstream": "postgres://u@127.0.0.1/db", "invalidation": {"bus": False}}))
    scope = WriteScope(frozenset(), True, "audited has triggers or rules", code="triggers")
    other = WriteScope(frozenset(), True, "ledger has triggers or rules", code="triggers")
    with caplog.at_level(logging.INFO, logger="cacheproxy.cache"):
        for _ in range(3):
            service.invalidate("app", scope)
            service.invalidate("app", scope, counted=False)  # (the same write, before and at commit: not counted)
        service.invalidate("app", other)
    lines = [r.getMessage() for r in caplog.records if "cannot know" in r.getMessage()]
    assert lines == [
        "database 'app': audited has triggers or rules, whose effects the proxy cannot know: its writes invalidate "
        "the whole database",
        "database 'app': ledger has triggers or rules, whose effects the proxy cannot know: its writes invalidate "
        "the whole database",
    ]
    assert service.database_flushes == 4
