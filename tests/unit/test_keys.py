"""Cache keys: everything that can change a result is in the key; nothing that cannot is."""

from __future__ import annotations

import pytest

from cacheproxy.cache.keys import describe_key, execute_key, query_key, state_digest

BASE_STARTUP = {"user": "app", "database": "shop", "application_name": "web-1", "client_encoding": "UTF8"}
BASE_REPORTED = {"TimeZone": "UTC", "DateStyle": "ISO, MDY", "application_name": "web-1", "is_superuser": "off"}


def test_same_state_same_digest_and_neutral_parameters_ignored() -> None:
    a = state_digest(BASE_STARTUP, BASE_REPORTED, [])
    other_app = {**BASE_STARTUP, "application_name": "web-2"}
    assert state_digest(other_app, {**BASE_REPORTED, "application_name": "web-2"}, []) == a
    assert len(a) == 16


@pytest.mark.parametrize(
    ("startup", "reported", "history"),
    [
        ({**BASE_STARTUP, "options": "-c search_path=other"}, BASE_REPORTED, []),
        (BASE_STARTUP, {**BASE_REPORTED, "TimeZone": "Asia/Tokyo"}, []),
        (BASE_STARTUP, {**BASE_REPORTED, "DateStyle": "German, DMY"}, []),
        (BASE_STARTUP, {**BASE_REPORTED, "is_superuser": "on"}, []),
        (BASE_STARTUP, BASE_REPORTED, [b"SET search_path = other"]),
        (BASE_STARTUP, BASE_REPORTED, [b"SET ROLE reader"]),
        (BASE_STARTUP, BASE_REPORTED, [b"SET extra_float_digits = 3"]),
    ],
)
def test_state_that_changes_results_changes_the_digest(
    startup: dict[str, str], reported: dict[str, str], history: list[bytes]
) -> None:
    assert state_digest(startup, reported, history) != state_digest(BASE_STARTUP, BASE_REPORTED, [])


def test_set_order_matters() -> None:
    one = [b"SET search_path = a", b"SET search_path = b"]
    assert state_digest({}, {}, one) != state_digest({}, {}, list(reversed(one)))


def test_startup_and_reported_namespaces_do_not_collide() -> None:
    assert state_digest({"x": "1"}, {}, []) != state_digest({}, {"x": "1"}, [])


def test_keys_separate_protocols_users_databases_parameters_and_limits() -> None:
    state = state_digest(BASE_STARTUP, BASE_REPORTED, [])
    sql = b"SELECT * FROM t WHERE id = $1"
    base = execute_key("shop", "app", state, sql, (23,), b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00", 0)
    variants = [
        execute_key("shop2", "app", state, sql, (23,), b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00", 0),
        execute_key("shop", "admin", state, sql, (23,), b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00", 0),
        execute_key("shop", "app", b"x" * 16, sql, (23,), b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00", 0),
        execute_key("shop", "app", state, sql, (0,), b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00", 0),
        execute_key("shop", "app", state, sql, (23,), b"\x00\x00\x00\x01\x00\x00\x00\x012\x00\x00", 0),  # value
        execute_key("shop", "app", state, sql, (23,), b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x01\x00\x01", 0),
        execute_key("shop", "app", state, sql, (23,), b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00", 1),  # limit
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert query_key("shop", "app", state, sql) != describe_key("shop", "app", state, sql, ())
    assert hash(base) == hash(execute_key("shop", "app", state, sql, (23,), base[6], 0))
