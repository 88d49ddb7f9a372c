"""AuthSource: where `auth.mode: terminate` finds a role's password verifier: auth.file, else auth.query.

auth.file (PgBouncer's userlist.txt) is read again whenever the file changes (its mtime or size), so an edited file
applies to the next login, with or without a reload. auth.query runs on one control connection of the proxy's own
(as auth.user, default the upstream URL's user), in the upstream URL's database (pg_shadow is a shared catalog),
once per login: a changed password applies to the next login. While the upstream cannot be reached, the verifier
that the last successful query returned for that role is used, so clients can still be authenticated and served
stale results (stale-if-error); a role never seen since the proxy started cannot log in then.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import replace

import asyncpg

from cacheproxy.config import Config
from cacheproxy.errors import CONNECTION_FAILURE, UpstreamError
from cacheproxy.protocol.verifiers import PlainPassword, Verifier, parse_userlist, parse_verifier
from cacheproxy.proxy.offline import LoginMemory
from cacheproxy.upstream import control_connection

log = logging.getLogger("cacheproxy.auth")


class AuthSource:
    """Verifiers for terminating authentication. `config` is read on every call (a reload swaps it)."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._file_stamp: tuple[str, int, int] | None = None
        self._file_users: dict[str, str] = {}
        self._conn: asyncpg.Connection | None = None
        # auth.query prepared once on `_conn` (its text, the statement): then a login costs one round trip (Bind,
        # Execute, Sync) instead of two (an unnamed Parse/Describe first, as asyncpg does without a cache).
        self._statement: tuple[str, asyncpg.prepared_stmt.PreparedStatement] | None = None
        self._lock = asyncio.Lock()
        self._last_known: dict[str, Verifier | None] = {}  # role -> what auth.query last said
        self.logins = LoginMemory()  # what the server sent each login: replayed to offline sessions

    async def verifier(self, user: str) -> Verifier | None:
        """The role's verifier; None when it has none (no such role, or no password): its login must fail."""
        listed = self._from_file(user)
        if listed is not None:
            return listed
        try:
            found = await self._query(user)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, UpstreamError, TimeoutError) as exc:
            if user in self._last_known:
                log.warning("auth.query failed (%s): using the last verifier seen for role %s", exc, user)
                return self._last_known[user]
            raise UpstreamError(
                f"could not look up the password of role {user!r} (auth.query): {exc}", sqlstate=CONNECTION_FAILURE
            ) from exc
        self._last_known[user] = found
        return found

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn, self._statement = self._conn, None, None
            await conn.close(timeout=5)

    # -- auth.file ---------------------------------------------------------------------------------------------

    def _from_file(self, user: str) -> Verifier | None:
        path = self._config().auth.file
        if path is None:
            return None
        try:
            stat = os.stat(path)
            stamp = (path, stat.st_mtime_ns, stat.st_size)
            if stamp != self._file_stamp:
                with open(path, encoding="utf-8") as file:
                    self._file_users = parse_userlist(file.read())
                self._file_stamp = stamp
        except (OSError, ValueError) as exc:
            # Keep what was read last: a file being rewritten must not lock everybody out.
            log.error("auth.file %s could not be read, keeping its previous contents: %s", path, exc)
        text = self._file_users.get(user)
        if text is None:
            return None
        try:
            return parse_verifier(text)
        except ValueError as exc:
            log.error("auth.file %s: the entry of role %s is unusable: %s", path, user, exc)
            return None

    # -- auth.query --------------------------------------------------------------------------------------------

    async def _query(self, user: str) -> Verifier | None:
        auth = self._config().auth
        async with self._lock:
            for attempt in (1, 2):  # a connection that went stale since the last login is replaced once
                conn = await self._connection()
                timeout = self._config().upstream.connect_timeout
                try:
                    if self._statement is None or self._statement[0] != auth.query:
                        self._statement = (auth.query, await conn.prepare(auth.query, timeout=timeout))
                    row = await self._statement[1].fetchrow(user, timeout=timeout)
                    break
                except (OSError, asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError):
                    self._conn = self._statement = None
                    conn.terminate()
                    if attempt == 2:
                        raise
        if row is None or row[1] is None:
            return None
        try:
            return parse_verifier(str(row[1]))
        except ValueError as exc:
            log.error("auth.query returned an unusable verifier for role %s: %s", user, exc)
            return None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._statement = None
        config = self._config()
        upstream = config.upstream
        role = config.auth.user
        if role is not None and role != upstream.user:
            # Another role than the URL's: its password must be in auth.file, in clear (a verifier cannot log in).
            listed = self._from_file(role)
            password = listed.password if isinstance(listed, PlainPassword) else None
            upstream = replace(upstream, user=role, password=password)
        self._conn = await control_connection(upstream, upstream.database or "postgres", "auth")
        return self._conn
