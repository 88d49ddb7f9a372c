"""Prints the SQLAlchemy part of orm_corpus.yaml: SQLAlchemy 2 Core/ORM statements compiled for postgresql+asyncpg.

Run `python3 tests/unit/data/orm_corpus_sqlalchemy.py` after a SQLAlchemy upgrade and compare its output with the
"sqlalchemy" cases of orm_corpus.yaml (one statement a line, whitespace runs collapsed).
"""

import re

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    aliased,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "user_account"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(30))
    fullname: Mapped[str | None]
    created: Mapped[sa.DateTime] = mapped_column(sa.DateTime(timezone=True))
    data = mapped_column(JSONB)
    tags = mapped_column(ARRAY(sa.String))
    addresses = relationship("Address", back_populates="user")


class Address(Base):
    __tablename__ = "address"
    id: Mapped[int] = mapped_column(primary_key=True)
    email_address: Mapped[str]
    user_id = mapped_column(sa.ForeignKey("user_account.id"))
    user = relationship("User", back_populates="addresses")


dialect = postgresql.asyncpg.dialect(paramstyle="numeric_dollar")


def c(stmt):
    return str(stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})).replace("\n", " ")


def main() -> None:
    U, A = User, Address
    qs = [
        sa.select(U).where(U.name == "x"),
        sa.select(U).where(U.name == "spongebob", sa.or_(U.fullname == "a", U.fullname.is_(None))),
        sa.select(U).where(sa.and_(U.id > 1, sa.or_(U.name == "a", U.name == "b"))),
        sa.select(U).where(sa.not_(sa.and_(U.id > 1, U.name == "b"))),
        sa.select(U).where(U.id.in_([1, 2, 3])),
        sa.select(U).where(U.id.not_in([1, 2, 3])),
        sa.select(U).where(U.id == sa.any_(sa.bindparam("ids", type_=ARRAY(sa.Integer)))),
        sa.select(U).order_by(U.id).limit(10).offset(20),
        sa.select(U).where(sa.exists().where(A.user_id == U.id)),
        sa.select(U).where(~sa.exists().where(A.user_id == U.id)),
        sa.select(U).where(U.addresses.any(A.email_address.like("%@x"))),
        sa.select(sa.func.coalesce(U.fullname, U.name)),
        sa.select(sa.cast(U.id, sa.String)),
        sa.select(U).where(U.name.ilike("%a%")),
        sa.select(U).where(U.id.between(1, 5)),
        sa.select(U).where(U.fullname.is_distinct_from(U.name)),
        sa.select(U).where(U.fullname.is_not_distinct_from(None)),
        sa.select(sa.case((U.id > 5, "big"), else_="small")),
        sa.select(U.id, sa.func.row_number().over(partition_by=U.name, order_by=U.id)),
        sa.select(U.id, sa.func.rank().over(order_by=U.id.desc())),
        sa.select(sa.func.lower(U.name)).where(sa.func.lower(U.name) == "x"),
        sa.select(U).where(U.data["a"].astext == "b"),
        sa.select(U).where(U.data.contains({"a": 1})),
        sa.select(U).where(U.data.has_key("a")),
        sa.select(U).where(U.tags.contains(["a"])),
        sa.select(U).where(U.tags.any("a")),
        sa.select(sa.func.count()).select_from(U),
        sa.select(sa.func.count(U.id), U.name).group_by(U.name).having(sa.func.count(U.id) > 1),
        sa.select(U, A)
        .join(A, U.id == A.user_id)
        .where(sa.or_(A.email_address.startswith("a"), A.email_address.endswith("b"))),
        sa.select(U).outerjoin(A).where(A.id.is_(None)),
        sa.select(U).where(U.name.contains("x")),
        sa.select(U).where(U.name.regexp_match("^a")),
        sa.select(U.id).union(sa.select(A.user_id)),
        sa.select(U).where(U.id.in_(sa.select(A.user_id).where(A.email_address == "x"))),
        sa.select(sa.func.max(U.id), sa.func.min(U.id), sa.func.sum(U.id), sa.func.avg(U.id)),
        sa.select(sa.func.string_agg(U.name, ",")),
        sa.select(sa.func.array_agg(U.name)),
        sa.select(sa.func.json_agg(U.name)),
        sa.select(U).where(sa.func.length(U.name) > 3),
        sa.select(U).where(sa.tuple_(U.id, U.name).in_([(1, "a"), (2, "b")])),
        sa.select(U).where(U.created > sa.bindparam("since", type_=sa.DateTime(timezone=True))),
        sa.select(sa.func.date_trunc("day", U.created)).distinct(),
        sa.select(U).distinct(U.name).order_by(U.name, U.id),
        sa.select(U).where(U.name.in_(sa.bindparam("names", value=["a", "b"], expanding=True))),
        sa.select(U).with_for_update(),
        sa.select(sa.literal_column("1")).where(sa.and_(sa.true(), sa.or_(U.id == 1, U.id == 2))).select_from(U),
        sa.select(U).where(sa.or_(sa.and_(U.id == 1, U.name == "a"), sa.and_(U.id == 2, U.name == "b"))),
        sa.select(sa.func.upper(U.name).label("u")).order_by(sa.text("u")),
        sa.select(sa.func.extract("year", U.created)),
        sa.select(U).where(U.name.collate("C") == "a"),
        sa.select(sa.func.nullif(U.name, "")),
        sa.select(sa.func.greatest(U.id, 3), sa.func.least(U.id, 3)),
        sa.select(sa.func.abs(U.id), sa.func.round(sa.cast(U.id, sa.Numeric), 2)),
        sa.select(sa.func.substr(U.name, 1, 2), sa.func.concat(U.name, "x"), sa.func.replace(U.name, "a", "b")),
        sa.select(sa.func.jsonb_build_object("a", U.id)),
        sa.select(U).where(U.data["k"].as_integer() > 1),
        sa.select(U).where(U.data[("a", "b")].astext == "c"),
        sa.select(U.name + "x"),
        sa.select(sa.func.trim(U.name)),
        sa.select(U).where(U.name.notilike("a%")),
    ]
    dml = [
        sa.insert(U).values(name="a", fullname="b"),
        sa.insert(U).values(name="a").returning(U.id),
        pg_insert(U).values(id=1, name="a").on_conflict_do_nothing(),
        pg_insert(U).values(id=1, name="a").on_conflict_do_update(index_elements=[U.id], set_={"name": "b"}),
        pg_insert(U)
        .values(id=1, name="a")
        .on_conflict_do_update(
            index_elements=[U.id], set_={"name": pg_insert(U).excluded.name}, where=sa.or_(U.name == "a", U.name == "b")
        ),
        sa.update(U).where(U.id == 1).values(name="b"),
        sa.update(U).where(sa.and_(U.id > 1, sa.or_(U.name == "a", U.name.is_(None)))).values(name="b"),
        sa.update(U).where(U.id.in_([1, 2])).values(fullname=sa.func.coalesce(U.fullname, "") + "x").returning(U.id),
        sa.update(U).where(U.id == A.user_id).where(A.email_address == "x").values(name="z"),
        sa.delete(U).where(U.id == 1),
        sa.delete(U).where(sa.or_(U.id == 1, sa.and_(U.name == "a", U.fullname.is_(None)))),
        sa.delete(A).where(A.user_id.in_(sa.select(U.id).where(U.name == "x"))),
        sa.delete(A).where(sa.exists().where(U.id == A.user_id)).returning(A.id),
        sa.update(U).values(created=sa.func.now()),
    ]
    for q in qs + dml:
        print(re.sub(" +", " ", c(q)))
    # ORM-level
    stmt = sa.select(U).options(selectinload(U.addresses))
    print(re.sub(" +", " ", c(stmt)))
    stmt = sa.select(U).options(joinedload(U.addresses)).where(U.name == "x")
    print(re.sub(" +", " ", c(stmt)))
    ua = aliased(U)
    print(re.sub(" +", " ", c(sa.select(U, ua).join(ua, ua.id == U.id).where(sa.or_(ua.name == "a", U.name == "b")))))
    print(re.sub(" +", " ", c(sa.select(A).where(A.user.has(U.name == "x")))))
    sub = sa.select(A.user_id, sa.func.count(A.id).label("n")).group_by(A.user_id).subquery()
    print(re.sub(" +", " ", c(sa.select(U.name, sub.c.n).join(sub, sub.c.user_id == U.id))))
    cte = sa.select(A.user_id).where(A.email_address.like("%x")).cte("c")
    print(re.sub(" +", " ", c(sa.select(U).where(U.id.in_(sa.select(cte.c.user_id))))))


if __name__ == "__main__":
    main()
