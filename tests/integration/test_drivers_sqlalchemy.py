"""SQLAlchemy 2 ORM through the proxy, with the psycopg and the asyncpg dialects.

The ORM writes through the proxy; every query is also run through an engine connected directly, and the final
table contents read both ways must be equal (and equal to what the test expects).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    ARRAY,
    DateTime,
    Engine,
    ForeignKey,
    LargeBinary,
    Numeric,
    Select,
    String,
    Text,
    create_engine,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload
from sqlalchemy.pool import NullPool

try:  # SQLAlchemy's asyncio extension needs greenlet, which only the sqlalchemy[asyncio] extra installs.
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

    HAVE_ASYNCIO = True
except ImportError:
    HAVE_ASYNCIO = False

from tests.support.compare import BIG_BYTES, assert_same_rows
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread

USER, PASSWORD = PgCluster.SCRAM_USER, PgCluster.SCRAM_PASSWORD


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    born: Mapped[dt.date | None]
    rating: Mapped[Decimal] = mapped_column(Numeric(4, 2))
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    profile: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    key: Mapped[uuid.UUID]
    active: Mapped[bool] = mapped_column(default=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    books: Mapped[list[Book]] = relationship(back_populates="author", cascade="all, delete-orphan", order_by="Book.id")


class Book(Base):
    __tablename__ = "books"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    title: Mapped[str] = mapped_column(Text)
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    published: Mapped[dt.date | None]
    cover: Mapped[bytes | None] = mapped_column(LargeBinary)
    author: Mapped[Author] = relationship(back_populates="books")


AUTHORS = [
    # name, born, rating, tags, profile, active, [(title, price, published)]
    ("Ada Lövelace", dt.date(1815, 12, 10), "4.90", ["math", "ü"], {"langs": ["en"], "n": 1}, True, 3),
    ("Émile Zola", dt.date(1840, 4, 2), "4.10", ["novel"], {}, True, 2),
    ("紫式部", None, "4.75", [], {"era": "Heian", "emoji": "🌸"}, True, 1),
    ("Nobody", None, "1.00", ["x"], {"deleted": True}, False, 0),
    ("Zed O'Brien", dt.date(1970, 1, 1), "3.33", ["quote'd", 'dq"'], {"nested": {"a": [1, None]}}, True, 4),
]


def make_authors() -> list[Author]:
    authors = []
    for n, (name, born, rating, tags, profile, active, book_count) in enumerate(AUTHORS, start=1):
        author = Author(
            name=name,
            born=born,
            rating=Decimal(rating),
            tags=tags,
            profile=profile,
            key=uuid.UUID(int=n),
            active=active,
        )
        author.books = [
            Book(
                title=f"{name}: volume {i} ✓",
                price=Decimal(f"{n * 10 + i}.{i}9"),
                published=dt.date(2000 + n, i, 1) if i % 2 else None,
                # One cover of 5 MB: a big INSERT parameter and a big result value.
                cover=BIG_BYTES if (n, i) == (1, 1) else bytes([n, i]) * i,
            )
            for i in range(1, book_count + 1)
        ]
        authors.append(author)
    return authors


def table_state(engine: Engine) -> list[list[Any]]:
    with engine.connect() as conn:
        return [
            list(conn.execute(text("SELECT * FROM authors ORDER BY id"))),
            list(conn.execute(text("SELECT * FROM books ORDER BY id"))),
        ]


@pytest.fixture
def engines(pg: PgCluster, proxy: ProxyThread, dbname: str) -> Iterator[tuple[Engine, Engine]]:
    """(direct, proxied) engines for postgresql+psycopg."""
    direct = create_engine(pg.url(USER, PASSWORD, dbname, scheme="postgresql+psycopg"), poolclass=NullPool)
    proxied = create_engine(
        pg.url(USER, PASSWORD, dbname, host=proxy.host, port=proxy.port, scheme="postgresql+psycopg"),
        pool_size=2,
    )
    yield direct, proxied
    proxied.dispose()
    direct.dispose()


def test_orm_crud_with_psycopg_matches_direct(engines: tuple[Engine, Engine]):
    direct, proxied = engines
    Base.metadata.create_all(proxied)
    with Session(proxied) as session:
        session.add_all(make_authors())
        session.commit()

    def both(query: Select[Any], what: str) -> list[Any]:
        with Session(direct) as s_direct, Session(proxied) as s_proxied:
            rows_direct = s_direct.execute(query).all()
            assert_same_rows(rows_direct, s_proxied.execute(query).all(), what)
            return rows_direct

    top = both(
        select(Author.id, Author.name, Author.rating, Author.tags, Author.profile)
        .where(Author.active, Author.rating >= Decimal("4.00"))
        .order_by(Author.rating.desc())
        .limit(2),
        "filter/order/limit",
    )
    assert [row.name for row in top] == ["Ada Lövelace", "紫式部"]
    per_author = both(
        select(Author.name, func.count(Book.id), func.sum(Book.price), func.max(func.length(Book.cover)))
        .join(Author.books)
        .group_by(Author.name)
        .order_by(Author.name),
        "join/group by",
    )
    assert [(name, count) for name, count, _, _ in per_author] == [
        ("Ada Lövelace", 3),
        ("Zed O'Brien", 4),
        ("Émile Zola", 2),
        ("紫式部", 1),
    ]
    assert per_author[0][3] == len(BIG_BYTES)
    both(select(Author.name).where(~Author.books.any()).order_by(Author.id), "no books")
    both(select(Book.title, Book.cover).where(Book.cover.is_not(None)).order_by(Book.id), "covers, 5 MB included")
    both(select(Author).where(Author.name == "missing"), "empty result")

    with Session(proxied) as session:
        # Relationship loading: lazy (a second query on access) and selectinload (IN query).
        ada = session.scalars(select(Author).where(Author.name.startswith("Ada"))).one()
        assert [book.title for book in ada.books] == [f"Ada Lövelace: volume {i} ✓" for i in (1, 2, 3)]
        assert ada.books[0].cover == BIG_BYTES
        loaded = session.scalars(select(Author).options(selectinload(Author.books)).order_by(Author.id)).all()
        assert [len(author.books) for author in loaded] == [3, 2, 1, 0, 4]
        # Update: an attribute on a loaded object, and a bulk UPDATE.
        ada.rating = Decimal("5.00")
        ada.profile = {**ada.profile, "updated": "✓"}
        session.execute(update(Book).where(Book.price < 30).values(price=Book.price * 2))
        # Delete: an object with its books (cascade), and a bulk DELETE.
        session.delete(session.scalars(select(Author).where(Author.name == "Émile Zola")).one())
        session.execute(delete(Author).where(Author.active.is_(False)))
        session.commit()

    with Session(proxied) as session:  # a rolled-back change leaves no trace
        session.add(Author(name="Ghost", rating=Decimal("2.00"), key=uuid.uuid4()))
        session.flush()
        session.rollback()

    state_direct, state_proxied = table_state(direct), table_state(proxied)
    for what, rows_direct, rows_proxied in zip(("authors", "books"), state_direct, state_proxied, strict=True):
        assert_same_rows(rows_direct, rows_proxied, what)
    authors, books = state_direct
    assert [row.name for row in authors] == ["Ada Lövelace", "紫式部", "Zed O'Brien"]
    assert authors[0].rating == Decimal("5.00") and authors[0].profile["updated"] == "✓"
    assert sorted(book.price for book in books if book.author_id == 1) == [
        Decimal("22.38"),
        Decimal("24.58"),
        Decimal("26.78"),
    ]
    assert len(books) == 3 + 1 + 4


@pytest.fixture
async def async_engines(
    pg: PgCluster, proxy: ProxyThread, dbname: str
) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    direct = create_async_engine(pg.url(USER, PASSWORD, dbname, scheme="postgresql+asyncpg"), poolclass=NullPool)
    proxied = create_async_engine(
        pg.url(USER, PASSWORD, dbname, host=proxy.host, port=proxy.port, scheme="postgresql+asyncpg"),
        poolclass=NullPool,
    )
    yield direct, proxied
    await proxied.dispose()
    await direct.dispose()


@pytest.mark.skipif(not HAVE_ASYNCIO, reason="greenlet missing: install sqlalchemy[asyncio]")
async def test_async_orm_round_trip_with_asyncpg(async_engines: tuple[AsyncEngine, AsyncEngine]):
    direct, proxied = async_engines
    async with proxied.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(proxied, expire_on_commit=False) as session:
        session.add_all(make_authors())
        await session.commit()
        zola = (await session.scalars(select(Author).where(Author.name == "Émile Zola"))).one()
        zola.tags = [*zola.tags, "naturalism"]
        await session.execute(update(Book).where(Book.author_id == zola.id).values(published=dt.date(1885, 3, 1)))
        await session.commit()

    query = (
        select(Author.name, Author.tags, Book.title, Book.price, Book.published)
        .join(Book, Book.author_id == Author.id)
        .where(Author.active)
        .order_by(Author.name, Book.id)
    )
    results: list[list[Any]] = []
    for engine in (direct, proxied):
        async with AsyncSession(engine) as session:
            results.append(list((await session.execute(query)).all()))
            loaded = (await session.scalars(select(Author).options(selectinload(Author.books)))).all()
            results.append(sorted((a.name, [b.title for b in a.books]) for a in loaded))
    rows_direct, loaded_direct, rows_proxied, loaded_proxied = results
    assert assert_same_rows(rows_direct, rows_proxied, "async join") == 10
    assert loaded_proxied == loaded_direct and len(loaded_direct) == 5
    zola_rows = [row for row in rows_proxied if row.name == "Émile Zola"]
    assert [row.published for row in zola_rows] == [dt.date(1885, 3, 1)] * 2
    assert zola_rows[0].tags == ["novel", "naturalism"]
