"""cache.shared: the shared tier's configuration keys (defaults, checks, and a password never rendered)."""

from __future__ import annotations

import pytest

from cacheproxy.config import ConfigError, build_config, render_config

MINIMAL = {"upstream": "postgres://127.0.0.1/postgres"}


def test_off_by_default() -> None:
    shared = build_config(MINIMAL).cache.shared
    assert shared.url is None and shared.consistency == "bounded" and not shared.cluster


def test_keys_are_read() -> None:
    config = build_config(
        {**MINIMAL, "cache": {"shared": {"url": "rediss://cp:pw@cache:6380/0", "cluster": True,
                                         "consistency": "strict", "timeout": "100ms", "lock_wait": 0}}}
    )  # fmt: skip
    shared = config.cache.shared
    assert shared.url == "rediss://cp:pw@cache:6380/0" and shared.cluster and shared.consistency == "strict"
    assert shared.timeout == 0.1 and shared.lock_wait == 0


def test_the_password_is_not_rendered() -> None:
    config = build_config({**MINIMAL, "cache": {"shared": {"url": "redis://cp:hunter2@cache:6379/0"}}})
    rendered = render_config(config)
    assert "hunter2" not in rendered and "redis://cp:***@cache:6379/0" in rendered


@pytest.mark.parametrize(
    ("shared", "key"),
    [
        ({"url": "memcached://cache:11211"}, "cache.shared.url"),
        ({"consistency": "eventual"}, "cache.shared.consistency"),
        ({"timeout": "0s"}, "cache.shared.timeout"),
    ],
)
def test_bad_values_name_their_key(shared: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({**MINIMAL, "cache": {"shared": shared}}, source="conf.yaml")
    assert key in str(info.value)
