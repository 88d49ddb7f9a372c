"""A private, throwaway PostgreSQL cluster: initdb, start/stop/restart, roles, cleanup (demo, tests, benchmarks).

Plain synchronous code with no pytest dependency, so e2e scripts and benchmarks can use it too.
The cluster listens on 127.0.0.1 only, on a free port, never on the machine's own 5432.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, urlencode

_SERVER_USER = "postgres"  # Postgres refuses to run as root; as root we drop to this OS user.
_START_ATTEMPTS = 3  # another process may grab the free port between our probe and the bind
_CMD_TIMEOUT = 60.0

# pg_hba.conf, replaced whole. The per-user lines give the tests one role per auth method;
# the first matching line wins (https://www.postgresql.org/docs/15/auth-pg-hba-conf.html).
_PG_HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all bob_md5 127.0.0.1/32 md5
host all carol_pw 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 trust
"""


class PgClusterError(RuntimeError):
    """A cluster command failed; the message carries its stderr and/or the server log tail."""


class PgCluster:
    """One initdb'd data directory and the postmaster serving it.

    Create with `PgCluster.start()`; always `cleanup()` (an atexit hook does it if you forget).
    """

    SUPERUSER = "postgres"  # trust over the socket and over 127.0.0.1
    SCRAM_USER = "alice"
    SCRAM_PASSWORD = "alice-secret"
    MD5_USER = "bob_md5"
    MD5_PASSWORD = "bob-secret"
    PW_USER = "carol_pw"  # `password` (cleartext) auth method
    PW_PASSWORD = "carol-secret"

    host = "127.0.0.1"

    def __init__(self, base_dir: Path, port: int, bindir: Path) -> None:
        """Use `start()`; this only records paths and does no I/O."""
        self.base_dir = base_dir
        self.datadir = base_dir / "data"
        self.socket_dir = base_dir
        self.logfile = base_dir / "postgres.log"
        self.port = port
        self.bindir = bindir
        self._postmaster_pid: int | None = None
        atexit.register(self._atexit)

    # ---- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def start(cls, base_dir: Path | None = None) -> PgCluster:
        """initdb a new cluster in a fresh temp dir (under `base_dir` if given), start it, add roles."""
        root = Path(tempfile.mkdtemp(prefix="cacheproxy-pg-", dir=base_dir))
        # 0755 so clients running as any OS user can reach the socket; the data dir itself stays 0700.
        root.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(root, _SERVER_USER, _SERVER_USER)
        cluster = cls(root, port=0, bindir=_find_bindir())
        try:
            cluster._initdb()
            cluster._start_on_free_port()
            cluster._create_roles()
        except BaseException:
            cluster.cleanup()
            raise
        return cluster

    def start_replica(self) -> PgCluster:
        """A streaming replica of this running cluster: pg_basebackup -R (standby.signal, primary_conninfo) into a
        fresh temp dir, started on its own free port. Always `cleanup()` it too."""
        root = Path(tempfile.mkdtemp(prefix="cacheproxy-pg-replica-", dir=self.base_dir.parent))
        root.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(root, _SERVER_USER, _SERVER_USER)
        replica = type(self)(root, port=0, bindir=self.bindir)
        try:
            proc = replica._run_as_server(
                [
                    replica._bin("pg_basebackup"),
                    *("-h", self.host, "-p", str(self.port), "-U", self.SUPERUSER),
                    *("-D", str(replica.datadir), "-R", "-X", "stream", "--no-sync", "-c", "fast"),
                ]
            )
            if proc.returncode != 0:
                raise PgClusterError(f"pg_basebackup failed: {proc.stderr.strip()}")
            replica._start_on_free_port()  # (rewrites the copied settings: its own port and socket directory)
        except BaseException:
            replica.cleanup()
            raise
        return replica

    def promote(self) -> None:
        """pg_ctl promote, waiting until the server accepts writes."""
        proc = self._run_as_server([self._bin("pg_ctl"), "-w", "-t", "30", "-D", str(self.datadir), "promote"])
        if proc.returncode != 0:
            raise PgClusterError(f"pg_ctl promote failed: {proc.stderr.strip()}\n{self.log_tail(20)}")

    def start_server(self) -> None:
        """Start the (stopped) server again, same data directory and same port."""
        log_offset = self._log_size()
        proc = self._run_as_server(
            [self._bin("pg_ctl"), "-w", "-t", "30", "-D", str(self.datadir), "-l", str(self.logfile), "start"]
        )
        if proc.returncode != 0:
            log = self._log_since(log_offset)
            raise PgClusterError(f"pg_ctl start failed (port {self.port}): {proc.stderr.strip()}\n{log}")
        self._postmaster_pid = self._read_postmaster_pid()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, keeping the data. mode: smart | fast | immediate. No-op if not running."""
        if not self.is_running():
            return
        proc = self._run_as_server([self._bin("pg_ctl"), "-w", "-t", "30", "-D", str(self.datadir), "-m", mode, "stop"])
        if proc.returncode != 0 and self.is_running():
            raise PgClusterError(f"pg_ctl stop -m {mode} failed: {proc.stderr.strip()}")
        self._postmaster_pid = None

    def restart(self, mode: str = "fast") -> None:
        """Stop then start on the same port and data: the upstream goes away and comes back."""
        self.stop(mode)
        self.start_server()

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (its backends are its children), or None when it is not running."""
        return self._read_postmaster_pid()

    def is_running(self) -> bool:
        """Whether the postmaster we started is alive."""
        pid = self._read_postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def cleanup(self) -> None:
        """Stop the server (immediately) and delete the whole temp dir. Safe to call twice."""
        try:
            if self.is_running():
                try:
                    self.stop("immediate")
                except (PgClusterError, subprocess.TimeoutExpired):
                    self._kill_postmaster()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            atexit.unregister(self._atexit)

    # ---- connection strings ----------------------------------------------------------------------

    def url(
        self,
        user: str = SUPERUSER,
        password: str | None = None,
        dbname: str = "postgres",
        *,
        host: str | None = None,
        port: int | None = None,
        scheme: str = "postgresql",
        **params: str | int,
    ) -> str:
        """A libpq URL; host/port default to this cluster (override to point at a proxy).

        >>> PgCluster(Path("/x"), 5999, Path("/b")).url("alice", "p@ss/word", sslmode="disable")
        'postgresql://alice:p%40ss%2Fword@127.0.0.1:5999/postgres?sslmode=disable'
        """
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        # quote, not urlencode's default quote_plus: libpq does not decode "+" as a space.
        query = "?" + urlencode(params, quote_via=quote) if params else ""
        where = f"{host or self.host}:{port or self.port}"
        return f"{scheme}://{auth}@{where}/{quote(dbname, safe='')}{query}"

    def dsn(
        self,
        user: str = SUPERUSER,
        password: str | None = None,
        dbname: str = "postgres",
        *,
        host: str | None = None,
        port: int | None = None,
        **params: str | int,
    ) -> str:
        """A libpq keyword/value string ("host=... port=... user=...").

        >>> PgCluster(Path("/x"), 5999, Path("/b")).dsn("alice", "it's secret")
        "host=127.0.0.1 port=5999 user=alice dbname=postgres password='it\\\\'s secret'"
        """
        fields: dict[str, str | int] = {
            "host": host or self.host,
            "port": port or self.port,
            "user": user,
            "dbname": dbname,
        }
        if password is not None:
            fields["password"] = password
        fields.update(params)
        return " ".join(f"{key}={_conninfo_value(str(value))}" for key, value in fields.items())

    def env(self, user: str = SUPERUSER, password: str | None = None, dbname: str = "postgres") -> dict[str, str]:
        """Environment for psql/pgbench subprocesses aimed at this cluster over TCP.

        Inherited PG* variables are dropped so nothing leaks in from the machine's own Postgres.
        """
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=user, PGDATABASE=dbname)
        env["PGCONNECT_TIMEOUT"] = "10"
        if password is not None:
            env["PGPASSWORD"] = password
        return env

    # ---- admin helpers ---------------------------------------------------------------------------

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the Unix socket; return unaligned, tuples-only stdout.

        The SQL goes in on stdin, so each statement runs on its own (CREATE DATABASE works).
        """
        cmd = [
            self._bin("psql"),
            *("-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"),
            *("-h", str(self.socket_dir), "-p", str(self.port), "-U", self.SUPERUSER, "-d", dbname),
        ]
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        proc = subprocess.run(
            cmd, input=sql, capture_output=True, text=True, env=env, timeout=_CMD_TIMEOUT, check=False
        )
        if proc.returncode != 0:
            raise PgClusterError(f"psql -d {dbname} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def create_database(self, name: str, owner: str = SUPERUSER) -> str:
        """CREATE DATABASE name OWNER owner (from template1, so pg_stat_statements is in it)."""
        self.psql(f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(owner)}")
        return name

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS, terminating any sessions still connected to it."""
        self.psql(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")

    def log_tail(self, n: int = 50) -> str:
        """The last n lines of the server log, for failure reports."""
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no server log: {exc})"
        return "\n".join(lines[-n:])

    # ---- internals -------------------------------------------------------------------------------

    def _initdb(self) -> None:
        proc = self._run_as_server(
            [
                self._bin("initdb"),
                *("-D", str(self.datadir), "-A", "trust", "-U", self.SUPERUSER),
                *("--no-sync", "-E", "UTF8", "--locale=C"),
            ]
        )
        if proc.returncode != 0:
            raise PgClusterError(f"initdb failed: {proc.stderr.strip()}\n{proc.stdout.strip()}")
        (self.datadir / "pg_hba.conf").write_text(_PG_HBA)
        with (self.datadir / "postgresql.conf").open("a") as conf:
            # Our settings live in one included file, rewritten when a start retries on a new port.
            conf.write("\ninclude 'cacheproxy_test.conf'\n")

    def _write_settings(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "wal_level": "logical",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            # Durability is pointless for a throwaway cluster and costs seconds per run.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "max_prepared_transactions": "10",
            "shared_preload_libraries": "'pg_stat_statements'",
            "pg_stat_statements.track": "all",
            "log_min_messages": "warning",
            "logging_collector": "off",
            "log_checkpoints": "off",
        }
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        path = self.datadir / "cacheproxy_test.conf"
        path.write_text(text)
        if os.geteuid() == 0:
            shutil.chown(path, _SERVER_USER, _SERVER_USER)

    def enable_ssl(self, cert_pem: Path, key_pem: Path) -> None:
        """Serve TLS with this certificate (copied into the data dir, owned by the server user) and restart."""
        for src, name in ((cert_pem, "server.crt"), (key_pem, "server.key")):
            dest = self.datadir / name
            shutil.copyfile(src, dest)
            dest.chmod(0o600)
            if os.geteuid() == 0:
                shutil.chown(dest, _SERVER_USER, _SERVER_USER)
        with (self.datadir / "cacheproxy_test.conf").open("a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        self.restart()

    def _start_on_free_port(self) -> None:
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = free_port()
            self._write_settings()
            log_offset = self._log_size()
            try:
                self.start_server()
                return
            except PgClusterError:
                lost_race = "could not bind" in self._log_since(log_offset)
                if not lost_race or attempt == _START_ATTEMPTS:
                    raise

    def _create_roles(self) -> None:
        self.psql(
            f"CREATE ROLE {self.SCRAM_USER} LOGIN CREATEDB PASSWORD '{self.SCRAM_PASSWORD}';\n"
            # md5 must be chosen when the password is set: the stored hash decides what md5 auth can check.
            "SET password_encryption = 'md5';\n"
            f"CREATE ROLE {self.MD5_USER} LOGIN CREATEDB PASSWORD '{self.MD5_PASSWORD}';\n"
            "RESET password_encryption;\n"
            f"CREATE ROLE {self.PW_USER} LOGIN CREATEDB PASSWORD '{self.PW_PASSWORD}';\n"
            "CREATE EXTENSION pg_stat_statements;\n"
        )
        # In template1 too, so every CREATE DATABASE inherits it.
        self.psql("CREATE EXTENSION pg_stat_statements;", dbname="template1")

    def _run_as_server(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        """Run a server-side binary (initdb, pg_ctl) as the postgres OS user when we are root."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("PG", "LC_"))}
        env["LC_ALL"] = "C"
        as_root = os.geteuid() == 0
        # stdin/stdout of the backgrounded postmaster go to the -l logfile, so capturing cannot hang.
        return subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            cwd=self.base_dir,
            timeout=_CMD_TIMEOUT,
            check=False,
            user=_SERVER_USER if as_root else None,
            group=_SERVER_USER if as_root else None,
            extra_groups=[] if as_root else None,
        )

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _read_postmaster_pid(self) -> int | None:
        try:
            first_line = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first_line)
        except (OSError, ValueError):
            return None

    def _kill_postmaster(self) -> None:
        """SIGQUIT (immediate shutdown) our own postmaster only, by the pid we recorded at start."""
        pid = self._read_postmaster_pid()
        if pid is None or pid != self._postmaster_pid:
            return
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 5
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _atexit(self) -> None:
        """Last resort at interpreter exit: no postmaster of ours may outlive the test run."""
        self._kill_postmaster()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def _log_size(self) -> int:
        try:
            return self.logfile.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.logfile.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (double quotes, inner quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def _conninfo_value(value: str) -> str:
    # libpq keyword/value syntax: quote empty values or ones with spaces; escape ' and \
    # (https://www.postgresql.org/docs/15/libpq-connect.html#LIBPQ-CONNSTRING).
    if value and not any(ch in value for ch in " '\\\t\n"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _find_bindir() -> Path:
    """PostgreSQL's bindir from pg_config (PATH), else the Debian default for 15."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if out.returncode == 0 and (candidate / "initdb").exists():
            return candidate
    return Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
