"""The invalidation bus's messages (sans-IO): what a proxy publishes, and what it makes of what it receives."""

from __future__ import annotations

import pytest

from cacheproxy.feeds.bus import Invalidation


def test_round_trip_and_merge() -> None:
    first = Invalidation(frozenset({"orders"}))
    second = Invalidation(frozenset({"items", "orders"}), ddl=True)
    merged = first.merge(second)
    assert merged == Invalidation(frozenset({"orders", "items"}), ddl=True)
    assert Invalidation.decode(merged.encode()) == merged
    assert first.merge(Invalidation(everything=True)) == Invalidation(everything=True)
    assert Invalidation.decode(Invalidation(settings=True).encode()) == Invalidation(settings=True)


def test_a_payload_over_notifys_limit_names_everything() -> None:
    many = Invalidation(frozenset(f"table_{i:05d}" for i in range(2000)), ddl=True)
    payload = many.encode()
    assert len(payload.encode()) < 8000
    assert Invalidation.decode(payload) == Invalidation(everything=True, ddl=True)


@pytest.mark.parametrize(
    "payload", ["", "not json", "[1, 2]", '{"v": 2, "t": ["a"]}', '{"v": 1, "t": "a"}', '{"v": 1, "t": [1]}']
)
def test_an_unreadable_message_invalidates_everything(payload: str) -> None:
    # Never keep entries because a message could not be understood (another version, garbage).
    assert Invalidation.decode(payload) == Invalidation(everything=True)
