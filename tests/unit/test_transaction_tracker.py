"""TransactionTracker without sockets: table-driven sequences of what the relay sends and what the server answers,
and what each transaction's end means (like h11's state tests)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import pytest

from cacheproxy.analysis import analyze
from cacheproxy.cache.keys import query_key
from cacheproxy.catalog.model import Catalog, Relation
from cacheproxy.config import Rule
from cacheproxy.errors import ProtocolViolation
from cacheproxy.policy.classify import Classified, classify
from cacheproxy.policy.rules import RuleSet
from cacheproxy.policy.verdict import WriteScope
from cacheproxy.protocol.messages import TxStatus
from cacheproxy.proxy.requests import Fill
from cacheproxy.proxy.transaction import TransactionTracker, TxEnd

CATALOG = dataclasses.replace(
    Catalog.build(
        "db",
        1,
        [Relation("public", name, "r", has_triggers=False) for name in ("items", "prices", "ledger", "stock")],
        [],
        [],
        [],
    ),
)
RULES = RuleSet(
    (Rule(("prices",), in_transaction="always"), Rule(("ledger",), in_transaction="never")), default_ttl=60.0
)
ITEMS = WriteScope(frozenset({"items"}), False, "UPDATE items")

# Steps: ("send", sql) a statement went upstream with nothing else pending; ("send_busy", sql) the same while
# other requests were pending; ("done", sql) a SET/RESET/DISCARD completed; ("wrote", scope); ("error",);
# ("ready", status byte); ("probe", level) the server answered the isolation probe. `run` returns the TxEnd of
# every ReadyForQuery that ended a transaction.
Step = tuple[object, ...]


def run(tracker: TransactionTracker, steps: Sequence[Step]) -> list[TxEnd]:
    ends: list[TxEnd] = []
    for step in steps:
        match step:
            case ("send", str(sql)):
                tracker.on_statement(analyze(sql), idle=tracker.status is TxStatus.IDLE, catalog=CATALOG)
            case ("send_busy", str(sql)):
                tracker.on_statement(analyze(sql), idle=False, catalog=CATALOG)
            case ("done", str(sql)):
                info = analyze(sql)
                discards = info.session is not None and info.session.op == "discard_all"
                tracker.state_changed(sql.encode(), discards_all=discards)
            case ("wrote", WriteScope() as scope):
                tracker.wrote(scope)
            case ("error",):
                tracker.on_error()
            case ("probe", level):
                assert tracker.probe_wanted
                tracker.probe_answered(tracker.probe_sent(), level if isinstance(level, str) else None)
            case ("ready", bytes(status)):
                end = tracker.on_ready(status)
                if end is not None:
                    ends.append(end)
            case _:
                raise AssertionError(f"unknown step {step}")
    return ends


# (steps, status after, committed/chained of each end, writes of the last end, reads_cache after)
# fmt: off
TRANSACTIONS = [
    pytest.param([("send", "SELECT 1"), ("ready", b"I")], TxStatus.IDLE, [(True, False)], (), False, id="autocommit"),
    pytest.param(
        [("send", "UPDATE items SET a = 1"), ("wrote", ITEMS), ("ready", b"I")],
        TxStatus.IDLE, [(True, False)], (ITEMS,), False, id="autocommit-write",
    ),
    pytest.param(
        [("send", "BEGIN"), ("ready", b"T"), ("wrote", ITEMS), ("ready", b"T"), ("send", "COMMIT"), ("ready", b"I")],
        TxStatus.IDLE, [(True, False)], (ITEMS,), False, id="begin-write-commit",
    ),
    pytest.param(
        [("send", "BEGIN"), ("ready", b"T"), ("wrote", ITEMS), ("ready", b"T"), ("send", "ROLLBACK"),
         ("ready", b"I")],
        TxStatus.IDLE, [(False, False)], (ITEMS,), False, id="rollback-still-invalidates",
    ),
    pytest.param(
        [("send", "BEGIN"), ("ready", b"T"), ("wrote", ITEMS), ("error",), ("ready", b"E"), ("send", "COMMIT"),
         ("ready", b"I")],
        TxStatus.IDLE, [(False, False)], (ITEMS,), False, id="commit-of-a-failed-block-is-a-rollback",
    ),
    pytest.param(
        [("send", "BEGIN ISOLATION LEVEL READ COMMITTED"), ("ready", b"T"), ("wrote", ITEMS),
         ("send", "COMMIT AND CHAIN"), ("ready", b"T")],
        TxStatus.IN_BLOCK, [(True, True)], (ITEMS,), True, id="commit-and-chain",
    ),
    pytest.param(
        [("send", "UPDATE items SET a = 1"), ("wrote", ITEMS), ("error",), ("ready", b"I")],
        TxStatus.IDLE, [(False, False)], (ITEMS,), False, id="failed-autocommit",
    ),
    pytest.param(
        [("send", "BEGIN ISOLATION LEVEL READ COMMITTED"), ("ready", b"T")],
        TxStatus.IN_BLOCK, [], (), True, id="read-committed-block-reads",
    ),
    pytest.param([("send", "BEGIN"), ("ready", b"T")], TxStatus.IN_BLOCK, [], (), False, id="no-level-named-asks"),
    pytest.param(
        [("send", "BEGIN"), ("ready", b"T"), ("probe", "read committed")],
        TxStatus.IN_BLOCK, [], (), True, id="probe-says-read-committed",
    ),
    pytest.param(
        [("send", "BEGIN"), ("ready", b"T"), ("probe", "repeatable read")],
        TxStatus.IN_BLOCK, [], (), False, id="probe-says-repeatable-read",
    ),
    pytest.param(
        [("send", "BEGIN"), ("ready", b"T"), ("probe", None)],
        TxStatus.IN_BLOCK, [], (), False, id="probe-unanswered",
    ),
    pytest.param(
        [("send", "BEGIN ISOLATION LEVEL REPEATABLE READ"), ("ready", b"T")],
        TxStatus.IN_BLOCK, [], (), False, id="repeatable-read-does-not",
    ),
    pytest.param(
        [("send", "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY, DEFERRABLE"), ("ready", b"T")],
        TxStatus.IN_BLOCK, [], (), False, id="serializable-does-not",
    ),
    pytest.param(
        [("send", "BEGIN ISOLATION LEVEL READ COMMITTED"), ("ready", b"T"), ("send", "SET LOCAL work_mem = '1MB'"),
         ("ready", b"T")],
        TxStatus.IN_BLOCK, [], (), False, id="set-local-stops-reading",
    ),
]
# fmt: on


@pytest.mark.parametrize(("steps", "status", "ends", "writes", "reads_cache"), TRANSACTIONS)
def test_transactions(
    steps: list[Step],
    status: TxStatus,
    ends: list[tuple[bool, bool]],
    writes: tuple[WriteScope, ...],
    reads_cache: bool,
) -> None:
    tracker = TransactionTracker()
    got = run(tracker, steps)
    assert tracker.status is status
    assert [(end.committed, end.chained) for end in got] == ends
    if got:
        assert got[-1].writes == writes
    assert tracker.reads_cache is reads_cache
    assert tracker.writes == []  # every write was handed to the end that invalidates it again
    assert tracker.uncertain is None


# (steps, set_history after, settings_changed of the last end, uncertain after)
# fmt: off
SETTINGS = [
    pytest.param(
        [("send", "SET search_path = a"), ("done", "SET search_path = a"), ("ready", b"I")],
        [b"SET search_path = a"], True, False, id="set-applies-at-ready",
    ),
    pytest.param(
        [("send", "SET search_path = a"), ("done", "SET search_path = a"), ("error",), ("ready", b"I")],
        [], False, False, id="error-before-ready-rolls-it-back",
    ),
    pytest.param(
        [("send", "SET search_path = a"), ("done", "SET search_path = a"), ("ready", b"I"), ("send", "DISCARD ALL"),
         ("done", "DISCARD ALL"), ("ready", b"I")],
        [], True, False, id="discard-all-clears",
    ),
    pytest.param(
        [("send", "BEGIN"), ("ready", b"T"), ("send", "SET search_path = a")],
        [], None, True, id="set-in-a-block-is-unknowable",
    ),
    pytest.param([("send_busy", "SET search_path = a")], [], None, True, id="set-in-a-pipeline-is-unknowable"),
    pytest.param(
        [("send", "SET search_path = a"), ("done", "SET search_path = a"), ("ready", b"T")],
        [], None, True, id="set-that-ran-in-a-block",
    ),
    pytest.param([("send", "DO $$ BEGIN END $$")], [], None, True, id="unknown-effects"),
    pytest.param([("send", "SELECT set_config('search_path', 'a', false)")], [], None, True, id="set-config"),
]
# fmt: on


@pytest.mark.parametrize(("steps", "history", "changed", "uncertain"), SETTINGS)
def test_settings(steps: list[Step], history: list[bytes], changed: bool | None, uncertain: bool) -> None:
    tracker = TransactionTracker()
    got = run(tracker, steps)
    assert tracker.set_history == history
    if changed is not None:
        assert got[-1].settings_changed is changed
    assert (tracker.uncertain is not None) is uncertain


def test_discard_all_forgets_temp_tables_and_statements() -> None:
    tracker = TransactionTracker()
    run(tracker, [("send", "CREATE TEMP TABLE items (a int)"), ("ready", b"I")])
    assert tracker.temp_tables == {"items"}
    ends = run(tracker, [("send", "DISCARD ALL"), ("done", "DISCARD ALL"), ("ready", b"I")])
    assert tracker.temp_tables == set()
    assert ends[-1].discarded


def _fill() -> Fill:
    return Fill(query_key("db", "u", b"", b"SELECT 1"), frozenset(), (0,), 60.0, "SELECT 1", "", leader=False)


@pytest.mark.parametrize(
    ("finish", "wrote_after_reading", "stored"),
    [("COMMIT", False, 2), ("COMMIT", True, 2), ("ROLLBACK", False, 2), ("ROLLBACK", True, 1)],
)
def test_results_read_in_a_block_are_stored_at_commit_and_at_rollback_if_read_before_a_write(
    finish: str, wrote_after_reading: bool, stored: int
) -> None:
    tracker = TransactionTracker()
    run(tracker, [("send", "BEGIN"), ("ready", b"T")])
    tracker.read_in_block(_fill(), b"rows")
    if wrote_after_reading:
        tracker.about_to_write()
    tracker.read_in_block(_fill(), b"rows")  # (after the write, if any: it may show the uncommitted write)
    ends = run(tracker, [("send", finish), ("ready", b"I")])
    assert len(ends[-1].fills) == stored


def test_stop_caching_keeps_the_first_reason_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    tracker = TransactionTracker(7)
    with caplog.at_level(logging.INFO, logger="cacheproxy.caching"):
        tracker.stop_caching("first")
        tracker.stop_caching("second")
    assert tracker.uncertain == "first"
    assert [r.getMessage() for r in caplog.records] == ["session 7 stops using the cache: first"]


def test_a_status_the_protocol_does_not_have_is_refused() -> None:
    with pytest.raises(ProtocolViolation):
        TransactionTracker().on_ready(b"X")


def _classified(sql: str) -> Classified:
    return classify(sql.encode(), analyze(sql), CATALOG, RULES)


# (steps, read, may it be read from the cache then)
# fmt: off
READS = [
    pytest.param([], "SELECT * FROM items", True, id="autocommit"),
    pytest.param([("send", "BEGIN"), ("ready", b"T")], "SELECT * FROM items", True, id="block-before-a-write"),
    pytest.param(
        [("send", "BEGIN"), ("ready", b"T"), ("wrote", ITEMS)], "SELECT * FROM stock", False, id="until-write"
    ),
    pytest.param(
        [("send", "BEGIN"), ("ready", b"T"), ("wrote", ITEMS)], "SELECT * FROM prices", True, id="always-other-table"
    ),
    pytest.param(
        [("send", "BEGIN"), ("ready", b"T"), ("wrote", WriteScope(frozenset({"prices"}), False))],
        "SELECT * FROM prices", False, id="always-but-not-what-it-wrote",
    ),
    pytest.param([("send", "BEGIN"), ("ready", b"T")], "SELECT * FROM ledger", False, id="never"),
    pytest.param(
        [("send", "CREATE TEMP TABLE items (a int)"), ("ready", b"I")], "SELECT * FROM items", False, id="temp-shadow"
    ),
    pytest.param([], "UPDATE items SET a = 1", False, id="a-write"),
]
# fmt: on


@pytest.mark.parametrize(("steps", "sql", "allowed"), READS)
def test_may_read(steps: list[Step], sql: str, allowed: bool) -> None:
    tracker = TransactionTracker()
    run(tracker, steps)
    assert tracker.may_read(_classified(sql)) is allowed
