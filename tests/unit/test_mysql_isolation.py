"""Sans-IO parts of the MySQL front end's transaction handling: isolation levels read from SETs, the session state."""

from __future__ import annotations

import pytest

from cacheproxy.analysis.mysql import _tokens, analyze_mysql, isolation_of_set
from cacheproxy.mysql.codec import Status
from cacheproxy.mysql.state import SessionState


@pytest.mark.parametrize(
    ("sql", "change"),
    [
        ("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", "read-committed"),
        ("set local transaction isolation level repeatable read", "repeatable-read"),
        ("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", "next"),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", "next"),
        ("SET GLOBAL TRANSACTION ISOLATION LEVEL READ COMMITTED", None),
        ("SET tx_isolation = 'READ-COMMITTED'", "read-committed"),
        ("SET @@session.transaction_isolation = 'read-committed', autocommit = 0", "read-committed"),
        ("SET SESSION tx_isolation = 'SERIALIZABLE'", "serializable"),
        ("SET GLOBAL autocommit = 1, tx_isolation = 'READ-COMMITTED'", None),  # GLOBAL holds for both
        ("SET GLOBAL autocommit = 1, SESSION tx_isolation = 'READ-COMMITTED'", "read-committed"),
        ("SET @@tx_isolation = 'READ-COMMITTED'", "unknown"),  # MariaDB and MySQL: the next transaction only
        ("SET tx_isolation = DEFAULT", "unknown"),
        ("SET tx_isolation = @level", "unknown"),
        ("SET sql_mode = CONCAT(@@sql_mode, ',ANSI')", "unknown"),  # a call: maybe a stored function
        ("SET NAMES utf8mb4", None),
        ("SET autocommit = 0", None),
    ],
)
def test_isolation_of_set(sql: str, change: str | None) -> None:
    assert isolation_of_set(_tokens(sql)) == change
    assert analyze_mysql(sql).isolation == change


def test_set_statement_for_is_the_statement_it_runs() -> None:
    write = analyze_mysql("SET STATEMENT max_statement_time = 1 FOR UPDATE shop.items SET a = 1")
    assert write.writes == frozenset({("shop", "items")}) and not write.sets
    read = analyze_mysql("SET STATEMENT sql_mode = '' FOR SELECT a FROM items")
    assert not read.cacheable and not read.sets


def test_session_reads_the_cache_only_in_read_committed_transactions_before_a_write() -> None:
    state = SessionState("app", "shop", 45, 0)
    assert state.reads_cache  # autocommit, no transaction
    state.on_status(Status.AUTOCOMMIT | Status.IN_TRANS)
    assert not state.reads_cache  # the server's default level: unknown
    state.on_status(Status.AUTOCOMMIT)
    state.on_isolation("read-committed")
    state.on_status(Status.AUTOCOMMIT | Status.IN_TRANS)
    assert state.reads_cache
    state.on_write()
    assert not state.reads_cache and "written" in state.why_not_in_transaction()
    state.on_status(Status.AUTOCOMMIT)  # COMMIT
    state.on_isolation("next")  # SET TRANSACTION ...: the next transaction only
    state.on_status(Status.AUTOCOMMIT | Status.IN_TRANS)
    assert not state.reads_cache
    state.on_status(Status.AUTOCOMMIT)
    state.on_status(Status.AUTOCOMMIT | Status.IN_TRANS)
    assert state.reads_cache  # back to the session's level
    state.on_isolation("read-committed")  # set inside a transaction: from the next one
    assert not state.reads_cache
    state.on_status(Status.AUTOCOMMIT | Status.IN_TRANS)
    assert not state.reads_cache
    state.on_status(0)  # the transaction ended; autocommit off: every statement inside a transaction
    assert state.reads_cache
    state.on_write()
    assert not state.reads_cache
    state.on_status(0)  # COMMIT
    assert state.reads_cache
    state.reset()
    state.on_status(Status.IN_TRANS)
    assert not state.reads_cache  # COM_RESET_CONNECTION: the server's default again
