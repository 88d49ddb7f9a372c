"""Answering an extended batch from the cache, as a function of lookups: no sockets, no cache, no session."""

from __future__ import annotations

from collections.abc import Hashable
from struct import pack

import pytest

from cacheproxy.cache.entry import Entry
from cacheproxy.protocol import frontend as fe
from cacheproxy.protocol import messages as m
from cacheproxy.protocol.framing import encode
from cacheproxy.protocol.statements import Statement, StatementRegistry
from cacheproxy.proxy.local_answers import WAIT, Answer, Lookups, answer_batch, answer_hot

QUERY = "SELECT a FROM t WHERE id = $1"
HEADER = m.row_description(["a"])
ROWS = m.data_row(["1"]) + m.command_complete("SELECT 1")
RESULT = HEADER + ROWS
DESCRIPTION = encode(b"t", pack("!HI", 1, 23)) + HEADER  # ParameterDescription (int4), RowDescription
READY = m.ready_for_query(b"I")


def parse(name: str, query: str = QUERY) -> tuple[int, bytes]:
    return m.PARSE, encode(b"P", name.encode() + b"\x00" + query.encode() + b"\x00" + pack("!H", 0))


def bind(statement: str = "", portal: str = "", value: bytes = b"7") -> tuple[int, bytes]:
    arguments = pack("!HHi", 0, 1, len(value)) + value + pack("!H", 0)
    return m.BIND, encode(b"B", portal.encode() + b"\x00" + statement.encode() + b"\x00" + arguments)


def arguments(value: bytes = b"7") -> bytes:
    return pack("!HHi", 0, 1, len(value)) + value + pack("!H", 0)


def describe(kind: str, name: str = "") -> tuple[int, bytes]:
    return m.DESCRIBE, fe.encode_describe(kind, name)


def execute(portal: str = "", max_rows: int = 0) -> tuple[int, bytes]:
    return m.EXECUTE, encode(b"E", portal.encode() + b"\x00" + pack("!i", max_rows))


def close_statement(name: str) -> tuple[int, bytes]:
    return m.CLOSE, encode(b"C", b"S" + name.encode() + b"\x00")


SYNC = (m.SYNC, encode(b"S"))


class FakeLookups(Lookups):
    """The cache as a dict of results by Bind arguments; `filling`: arguments another session is filling."""

    def __init__(self, *, results: dict[bytes, bytes] | None = None, described: bool = True) -> None:
        stored = results if results is not None else {arguments(): RESULT}
        self.results = {
            args: Entry(args, value, tables=frozenset(), created_at=0.0, expires_at=60.0)
            for args, value in stored.items()
        }
        self.described = described
        self.filling: set[bytes] = set()
        self.counted: list[Hashable] = []

    def result(self, statement: Statement, args: bytes, max_rows: int) -> Entry | None:
        return self.results.get(args) if statement.query == QUERY.encode() else None

    def fill_in_flight(self, statement: Statement, args: bytes, max_rows: int) -> bool:
        return args in self.filling

    def description(self, statement: Statement) -> bytes | None:
        return DESCRIPTION if self.described and statement.query == QUERY.encode() else None

    def count(self, key: Hashable, entry: Entry | None) -> None:
        self.counted.append(key)


def test_hot_batch_hit_is_parse_bind_complete_the_result_and_ready() -> None:
    statements: dict[str, Statement] = {}
    replies = answer_hot([parse(""), bind(), describe("P"), execute(), SYNC], statements, READY, True, FakeLookups())
    assert replies == fe.PARSE_COMPLETE + fe.BIND_COMPLETE + RESULT + READY
    assert statements[""].query == QUERY.encode() and not statements[""].upstream


def test_hot_batch_without_describe_is_not_answered_for_a_statement_never_described() -> None:
    # The client decodes the rows with a description it was given: with none, the server's to answer.
    assert answer_hot([parse(""), bind(), execute(), SYNC], {}, READY, True, FakeLookups()) is None


@pytest.mark.parametrize(
    ("lookups", "expected"),
    [
        pytest.param(FakeLookups(results={}), None, id="miss"),
        pytest.param(FakeLookups(results={arguments(b"8"): RESULT}), None, id="other-arguments"),
    ],
)
def test_hot_batch_miss_changes_nothing(lookups: FakeLookups, expected: None) -> None:
    statements: dict[str, Statement] = {}
    batch = [parse(""), bind(), describe("P"), execute(), SYNC]
    assert answer_hot(batch, statements, READY, True, lookups) is expected
    assert statements == {}


def test_hot_batch_waits_for_another_sessions_fill() -> None:
    lookups = FakeLookups(results={})
    lookups.filling.add(arguments())
    assert answer_hot([parse(""), bind(), describe("P"), execute(), SYNC], {}, READY, True, lookups) is WAIT


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param([parse("named"), bind("named"), execute(), SYNC], id="named-parse"),
        pytest.param([bind(), execute("other"), SYNC], id="execute-of-another-portal"),
        pytest.param([parse(""), bind(), execute()], id="no-sync"),
        pytest.param([parse(""), describe("S"), bind(), execute(), SYNC], id="describe-statement"),
    ],
)
def test_other_shapes_go_to_the_general_path(batch: list[tuple[int, bytes]]) -> None:
    assert answer_hot(batch, {}, READY, True, FakeLookups()) is False


def test_bind_of_a_prepared_statement_needs_the_shape_the_client_was_given() -> None:
    prepared = Statement(QUERY.encode(), (), upstream=True)
    statements = {"s": prepared}
    assert answer_hot([bind("s"), execute(), SYNC], statements, READY, True, FakeLookups()) is None  # never described
    prepared.description = HEADER
    assert (
        answer_hot([bind("s"), execute(), SYNC], statements, READY, True, FakeLookups())
        == fe.BIND_COMPLETE + ROWS + READY
    )


def test_general_path_gives_the_hot_answer_for_the_hot_shape() -> None:
    batch = [parse(""), bind(), describe("P"), execute(), SYNC]
    answer = answer_batch(batch, StatementRegistry(10), READY, True, FakeLookups())
    assert isinstance(answer, Answer)
    assert answer.replies == answer_hot(batch, {}, READY, True, FakeLookups())


def test_prepare_describe_execute_of_a_named_statement() -> None:
    registry = StatementRegistry(10)
    batch = [parse("s1"), describe("S", "s1"), bind("s1"), execute(), SYNC]
    answer = answer_batch(batch, registry, READY, True, FakeLookups())
    assert isinstance(answer, Answer)
    assert answer.replies == fe.PARSE_COMPLETE + DESCRIPTION + fe.BIND_COMPLETE + ROWS + READY
    assert [name for name, _ in answer.created] == ["s1"]  # to be created upstream, quietly
    assert answer.parsed["s1"].description == HEADER
    assert registry.statements == {}  # the caller applies the answer


@pytest.mark.parametrize(
    ("batch", "statements", "lookups"),
    [
        pytest.param([parse("s1"), SYNC], {}, FakeLookups(described=False), id="unproven-parse"),
        pytest.param(
            [parse("s1"), SYNC], {"s1": Statement(b"SELECT 1", (), upstream=True)}, FakeLookups(), id="already-exists"
        ),
        pytest.param([parse(""), bind(), execute(), execute(), SYNC], {}, FakeLookups(), id="execute-again-continues"),
        pytest.param([parse(""), bind(), SYNC], {}, FakeLookups(), id="bind-never-executed"),
        pytest.param(
            [close_statement("s1"), SYNC],
            {"s1": Statement(QUERY.encode(), (), upstream=True)},
            FakeLookups(),
            id="close-of-a-statement-upstream",
        ),
        pytest.param([close_statement("s1"), parse(""), SYNC], {}, FakeLookups(), id="close-before-use"),
    ],
)
def test_batches_the_server_must_answer(
    batch: list[tuple[int, bytes]], statements: dict[str, Statement], lookups: FakeLookups
) -> None:
    registry = StatementRegistry(10)
    registry.statements.update(statements)
    assert answer_batch(batch, registry, READY, True, lookups) is None


def test_close_of_a_local_statement_is_answered() -> None:
    registry = StatementRegistry(10)
    registry.statements["s1"] = Statement(QUERY.encode(), (), upstream=False)
    answer = answer_batch([close_statement("s1"), SYNC], registry, READY, True, FakeLookups())
    assert isinstance(answer, Answer)
    assert answer.replies == fe.CLOSE_COMPLETE + READY and answer.closed == ["s1"]


def test_general_path_waits_for_a_fill_in_flight() -> None:
    lookups = FakeLookups(results={})
    lookups.filling.add(arguments())
    assert answer_batch([parse("s1"), bind("s1"), execute(), SYNC], StatementRegistry(10), READY, True, lookups) is WAIT


def test_hits_are_counted_only_when_the_batch_is_answered_here() -> None:
    lookups = FakeLookups()
    answer_hot([parse(""), bind(), describe("P"), execute(), SYNC], {}, READY, True, lookups)
    assert lookups.counted == [arguments()]
    no_description = FakeLookups(described=False)  # the Parse is proven by the statement's own stored result
    batch = [parse("s1"), bind("s1"), describe("P"), execute(), SYNC]
    assert answer_batch(batch, StatementRegistry(10), READY, True, no_description)
    assert no_description.counted == [arguments()]
    missing = FakeLookups(results={})
    assert answer_batch([parse(""), bind(), execute(), SYNC], StatementRegistry(10), READY, True, missing) is None
    assert missing.counted == []


def test_a_named_portal_in_a_transaction_block_must_exist_upstream() -> None:
    batch = [bind("", "p"), execute("p"), SYNC]
    statements = {"": Statement(QUERY.encode(), (), upstream=True, description=HEADER)}
    assert answer_hot(batch, statements, READY, False, FakeLookups()) is None
    registry = StatementRegistry(10)
    registry.statements.update(statements)
    assert (
        answer_batch([parse("s1"), bind("s1", "p"), execute("p"), SYNC], registry, READY, False, FakeLookups()) is None
    )


def test_a_bind_before_a_flush_keeps_its_portal_here_until_the_sync() -> None:
    registry = StatementRegistry(10)
    registry.statements["s1"] = Statement(QUERY.encode(), (), upstream=True, description=HEADER)
    flush = (m.FLUSH, encode(b"H"))
    answer = answer_batch([bind("s1", "p"), flush], registry, READY, True, FakeLookups())
    assert isinstance(answer, Answer) and answer.replies == fe.BIND_COMPLETE
    assert list(answer.local_portals) == ["p"] and answer.local_portals["p"][2] is None  # bound, not executed
    registry.local_portals = answer.local_portals
    answer = answer_batch([execute("p"), SYNC], registry, READY, True, FakeLookups())
    assert isinstance(answer, Answer) and answer.replies == ROWS + READY and answer.local_portals == {}


def test_a_dry_run_changes_nothing_and_counts_nothing() -> None:
    lookups = FakeLookups()
    statement = Statement(QUERY.encode(), (), upstream=True, description=HEADER)
    registry = StatementRegistry(10)
    registry.statements["s1"] = statement
    answer = answer_batch([describe("S", "s1"), bind("s1"), execute()], registry, READY, True, lookups, dry_run=True)
    assert isinstance(answer, Answer) and answer.replies == DESCRIPTION + fe.BIND_COMPLETE + ROWS
    assert statement.inferred == () and lookups.counted == []  # the Describe was not taken in
