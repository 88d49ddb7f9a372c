"""A private MariaDB server for tests: mariadb-install-db in a temp dir, mariadbd on a free port and its own socket.

The server a machine may run on 3306 is never touched. Runs as root with --user=root when the tests run as root
(mariadbd refuses root otherwise). Users: root (unix socket only, for setup) and `app`/`app` with every privilege
over TCP, which the proxy's catalog reads and the tests use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pymysql

USER = "app"
PASSWORD = "app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MariaDB:
    """One running mariadbd; `connect()` gives a PyMySQL connection to it (direct, not through a proxy)."""

    def __init__(self, root: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.port = port
        self.host = "127.0.0.1"
        self.process = process
        self.socket = str(root / "mysqld.sock")

    @classmethod
    def start(cls, extra: tuple[str, ...] = (), *, binlog: bool = True) -> MariaDB:
        """Start one; `extra` are more mariadbd options (e.g. --ssl-cert=... for a TLS server); `binlog`: with a
        row-based binlog (off: MariaDB's own default)."""
        if shutil.which("mariadbd") is None and not Path("/usr/sbin/mariadbd").exists():
            raise RuntimeError("mariadbd is not installed (Debian: mariadb-server; .ci/setup installs it)")
        root = Path(tempfile.mkdtemp(prefix="cacheproxy-mariadb-"))
        data = root / "data"
        user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--auth-root-authentication-method=socket",
             "--skip-test-db", *user],
            check=True, capture_output=True,
        )  # fmt: skip
        port = free_port()
        log = open(root / "server.log", "wb")  # noqa: SIM115 - the server writes to it while it runs
        process = subprocess.Popen(
            ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={data}", f"--port={port}", "--bind-address=127.0.0.1",
             f"--socket={root / 'mysqld.sock'}", f"--pid-file={root / 'mysqld.pid'}", "--skip-name-resolve",
             "--innodb-buffer-pool-size=64M", "--max-connections=500", "--max-allowed-packet=16M",
             *(["--log-bin=" + str(root / "binlog"), "--binlog-format=ROW"] if binlog else []), "--server-id=1",
             *user, *extra],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        server = cls(root, port, process)
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = pymysql.connect(unix_socket=server.socket, user="root")
                break
            except pymysql.err.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mariadbd did not start:\n" + server.log_tail(40)) from None
                time.sleep(0.2)
        with conn.cursor() as cur:
            cur.execute(f"CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'")
            cur.execute(f"GRANT ALL ON *.* TO '{USER}'@'%' WITH GRANT OPTION")
        conn.close()
        return server

    def url(self, database: str | None = None, scheme: str = "mariadb") -> str:
        return f"{scheme}://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database or ''}"

    def connect(self, database: str | None = None, **kw: object) -> pymysql.connections.Connection:
        args: dict[str, object] = {"host": self.host, "port": self.port, "user": USER, "password": PASSWORD}
        args.update(kw)
        return pymysql.connect(database=database, autocommit=True, **args)

    def root_connect(self) -> pymysql.connections.Connection:
        return pymysql.connect(unix_socket=self.socket, user="root", autocommit=True)

    def create_database(self, name: str) -> None:
        with self.root_connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(Exception), self.root_connect() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")

    def log_tail(self, lines: int) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "server.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
