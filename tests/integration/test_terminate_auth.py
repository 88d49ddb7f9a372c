"""auth.mode terminate against a real PostgreSQL: the proxy authenticates clients itself (SCRAM-SHA-256, md5) from
auth.query or auth.file, logs in upstream with the SCRAM keys the client's exchange yields (pass-through: the proxy
is never given a password for these roles), and errors and ParameterStatus look as PostgreSQL's own do."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pg8000.native
import psycopg
import pytest

from cacheproxy.config import UpstreamConfig
from cacheproxy.proxy.session import Session
from cacheproxy.proxy.upstream_login import LoginResult
from cacheproxy.upstream import open_upstream
from tests.support.pgcluster import PgCluster, quote_ident
from tests.support.proxy import ProxyThread

Start = Callable[..., ProxyThread]


@pytest.fixture
def role(pg: PgCluster) -> Iterator[tuple[str, str]]:
    """A fresh SCRAM role (name, password) that a test may change the password of."""
    name, password = f"r_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex[:6]}"
    pg.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    yield name, password
    if pg.is_running():
        pg.psql(f"DROP OWNED BY {name}; DROP ROLE IF EXISTS {name}")


def _terminating(start_proxy: Start, **auth: object) -> ProxyThread:
    # The proxy's own URL is the superuser's (trusted): no client role's password is in its configuration.
    return start_proxy(auth={"mode": "terminate", **auth})


def _stored_verifier(pg: PgCluster, user: str) -> str:
    return pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'").strip()


async def _asyncpg_error(host: str, port: int, user: str, password: str, dbname: str) -> tuple[str, str, str]:
    try:
        conn = await asyncpg.connect(host=host, port=port, user=user, password=password, database=dbname)
    except asyncpg.PostgresError as exc:
        return type(exc).__name__, exc.sqlstate, str(exc)
    await conn.close()
    raise AssertionError("the login succeeded")


def test_scram_login_with_three_drivers(pg: PgCluster, start_proxy: Start, dbname: str) -> None:
    proxy = _terminating(start_proxy)
    user, password = pg.SCRAM_USER, pg.SCRAM_PASSWORD
    with psycopg.connect(pg.dsn(user=user, password=password, dbname=dbname, port=proxy.port)) as conn:
        assert conn.execute("SELECT current_user, 41 + 1").fetchone() == (user, 42)

    async def with_asyncpg() -> object:
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=user, password=password, database=dbname)
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()

    assert asyncio.run(with_asyncpg()) == user
    native = pg8000.native.Connection(user, host=proxy.host, port=proxy.port, database=dbname, password=password)
    try:
        assert native.run("SELECT current_user") == [[user]]
    finally:
        native.close()


def test_md5_role_gets_an_md5_exchange(pg: PgCluster, start_proxy: Start, dbname: str) -> None:
    proxy = _terminating(start_proxy)
    native = pg8000.native.Connection(
        pg.MD5_USER, host=proxy.host, port=proxy.port, database=dbname, password=pg.MD5_PASSWORD
    )
    try:
        assert native.run("SELECT current_user") == [[pg.MD5_USER]]
    finally:
        native.close()


@pytest.mark.parametrize("user", [PgCluster.SCRAM_USER, PgCluster.MD5_USER, "no_such_role"])
def test_wrong_password_fails_exactly_as_postgres_says(
    pg: PgCluster, start_proxy: Start, dbname: str, user: str
) -> None:
    proxy = _terminating(start_proxy)
    direct = asyncio.run(_asyncpg_error(pg.host, pg.port, user, "wrong", dbname))
    proxied = asyncio.run(_asyncpg_error(proxy.host, proxy.port, user, "wrong", dbname))
    assert proxied == direct
    assert proxied[1] == "28P01"


def test_parameter_status_and_backend_key_look_like_postgres(pg: PgCluster, start_proxy: Start, dbname: str) -> None:
    proxy = _terminating(start_proxy)
    seen = []
    for port in (pg.port, proxy.port):
        with psycopg.connect(pg.dsn(user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD, dbname=dbname, port=port)) as conn:
            names = ("server_version", "server_encoding", "client_encoding", "DateStyle", "TimeZone",
                     "integer_datetimes", "standard_conforming_strings", "is_superuser", "session_authorization",
                     "application_name", "IntervalStyle")  # fmt: skip
            seen.append({name: conn.info.parameter_status(name) for name in names})
            # The backend pid the client is told is the backend's own.
            assert conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    assert seen[0] == seen[1]
    assert seen[1]["session_authorization"] == pg.SCRAM_USER


def test_auth_query_sees_a_changed_password(
    pg: PgCluster, start_proxy: Start, dbname: str, role: tuple[str, str]
) -> None:
    proxy = _terminating(start_proxy)
    name, old = role
    dsn = pg.dsn(user=name, dbname=dbname, port=proxy.port)
    with psycopg.connect(dsn, password=old) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (name,)
    pg.psql(f"ALTER ROLE {name} PASSWORD 'the-new-one'")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn, password=old)
    with psycopg.connect(dsn, password="the-new-one") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (name,)


def test_auth_file_verifiers_and_reread(
    pg: PgCluster, start_proxy: Start, dbname: str, role: tuple[str, str], tmp_path: Path
) -> None:
    """auth.file holds the stored verifiers (copied from pg_authid); the proxy runs no query for listed roles, and
    an edited file applies to the next login."""
    name, password = role
    userlist = tmp_path / "userlist.txt"
    userlist.write_text(
        f'"{name}" "{_stored_verifier(pg, name)}"\n"{pg.MD5_USER}" "{_stored_verifier(pg, pg.MD5_USER)}"\n'
    )
    # An auth.query that cannot run: every login here must come from the file.
    proxy = _terminating(start_proxy, file=str(userlist), query="SELECT no_such_function($1)")
    for user, secret in ((name, password), (pg.MD5_USER, pg.MD5_PASSWORD)):
        with psycopg.connect(pg.dsn(user=user, password=secret, dbname=dbname, port=proxy.port)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)
    # A role missing from the file falls back to the (broken) query: refused with a clear message, not a hang.
    with pytest.raises(psycopg.OperationalError, match=r"auth\.query"):
        psycopg.connect(pg.dsn(user=pg.SCRAM_USER, password=pg.SCRAM_PASSWORD, dbname=dbname, port=proxy.port))
    # The password changes in the database and in the file: the next login uses the new verifier.
    pg.psql(f"ALTER ROLE {name} PASSWORD 'changed-too'")
    userlist.write_text(f'"{name}" "{_stored_verifier(pg, name)}"\n')
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(user=name, password=password, dbname=dbname, port=proxy.port))
    with psycopg.connect(pg.dsn(user=name, password="changed-too", dbname=dbname, port=proxy.port)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pass_through_needs_the_servers_own_verifier(
    pg: PgCluster, start_proxy: Start, dbname: str, role: tuple[str, str], tmp_path: Path
) -> None:
    """A verifier of the right password but another salt authenticates the client, but its keys cannot log in
    upstream: proof that the upstream login uses the client's keys, not a password."""
    from cacheproxy.protocol.verifiers import scram_verifier

    name, password = role
    other = scram_verifier(password)
    import base64

    text = (f"SCRAM-SHA-256${other.iterations}:{base64.b64encode(other.salt).decode()}$"
            f"{base64.b64encode(other.stored_key).decode()}:{base64.b64encode(other.server_key).decode()}")  # fmt: skip
    userlist = tmp_path / "userlist.txt"
    userlist.write_text(f'"{name}" "{text}"\n')
    proxy = _terminating(start_proxy, file=str(userlist))
    with pytest.raises(psycopg.OperationalError, match="SCRAM pass-through failed"):
        psycopg.connect(pg.dsn(user=name, password=password, dbname=dbname, port=proxy.port))


def _sessions(proxy: ProxyThread) -> list[Session]:
    assert proxy.app is not None
    return list(proxy.app.proxy._live)


def test_upstream_login_opens_a_new_connection_as_the_client_later(
    pg: PgCluster, start_proxy: Start, dbname: str, role: tuple[str, str]
) -> None:
    """What a failover re-attach does: a fresh upstream connection for a live session's user, with only what the
    session kept (no password anywhere in the proxy)."""
    proxy = _terminating(start_proxy)
    name, password = role
    pg.psql(f"GRANT ALL ON DATABASE {quote_ident(dbname)} TO {name}")
    with psycopg.connect(pg.dsn(user=name, password=password, dbname=dbname, port=proxy.port)) as conn:
        (session,) = [s for s in _sessions(proxy) if s.user == name]
        login = session.upstream_login
        assert login is not None and login.method == "scram-sha-256"
        assert password not in repr(login)
        cfg = UpstreamConfig.from_url(pg.url(user=name, dbname=dbname))  # no password in it

        async def reattach() -> LoginResult:
            reader, writer = await open_upstream(cfg)
            try:
                return await login.login(reader, writer)
            finally:
                writer.close()

        for _ in range(2):  # as often as needed
            result: LoginResult = proxy.call(reattach())
            assert result.status == b"I"
            assert dict(result.parameters)["session_authorization"] == name
            assert result.backend_key[0] > 0
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_clear_password_in_the_file_logs_in_where_the_server_wants_cleartext(
    pg: PgCluster, start_proxy: Start, dbname: str, tmp_path: Path
) -> None:
    """carol_pw's pg_hba.conf line is `password` (cleartext): SCRAM keys cannot answer it, a clear password in
    auth.file can (the client still authenticates to the proxy by SCRAM)."""
    userlist = tmp_path / "userlist.txt"
    userlist.write_text(f'"{pg.PW_USER}" "{pg.PW_PASSWORD}"\n')
    proxy = _terminating(start_proxy, file=str(userlist))
    dsn = pg.dsn(user=pg.PW_USER, password=pg.PW_PASSWORD, dbname=dbname, port=proxy.port)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (pg.PW_USER,)
    # Without the file, only its SCRAM verifier is known: the upstream login fails, saying why.
    bare = _terminating(start_proxy)
    with pytest.raises(psycopg.OperationalError, match="holds only SCRAM keys"):
        psycopg.connect(pg.dsn(user=pg.PW_USER, password=pg.PW_PASSWORD, dbname=dbname, port=bare.port))
