"""The benchmark's peers, PgBouncer and Pgpool-II: installing them, their config files, starting and stopping them.

Each runs in the foreground as a child of the benchmark (so its PID is ours to stop), as the `postgres` OS user
when we are root (PgBouncer refuses root), with every file it writes (config, pid file, sockets, logs) in its own
temp dir, listening on 127.0.0.1 on a free port. The config texts are pure functions, checked by the unit tests.
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
from dataclasses import dataclass
from pathlib import Path

from cacheproxy.demo.pgcluster import free_port

_SERVER_USER = "postgres"
_PACKAGES = {"pgbouncer": "pgbouncer", "pgpool": "pgpool2"}


@dataclass
class PeerProcess:
    """A started peer: its process, where it listens, and its temp dir (removed by `stop`)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log: Path

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT (both peers: a fast shutdown that closes their server connections), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError as exc:
            return f"(no log: {exc})"


def ensure_installed() -> None:
    """Install the Debian packages of the peers whose binary is missing (`apt-get update` first if needed)."""
    missing = [package for binary, package in _PACKAGES.items() if _binary(binary) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {', '.join(missing)}: run `apt-get install -y {' '.join(missing)}` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *missing]
    print(f"installing {' '.join(missing)} ...", flush=True)
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"apt-get install {' '.join(missing)} failed:\n{result.stderr}")


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )


# ---- config files (pure) -----------------------------------------------------------------------------------------


def pgbouncer_ini(workdir: Path, port: int, pg_port: int, pool_size: int) -> str:
    """pgbouncer.ini for session pooling in front of the private cluster (PgBouncer 1.18 keys).

    auth_type trust still looks the user up in auth_file, hence userlist.txt.
    """
    return f"""\
[databases]
* = host=127.0.0.1 port={pg_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {workdir}
pidfile = {workdir}/pgbouncer.pid
logfile = {workdir}/pgbouncer.log
auth_type = trust
auth_file = {workdir}/userlist.txt
pool_mode = session
max_client_conn = {max(100, pool_size * 4)}
default_pool_size = {pool_size}
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
"""


def pgbouncer_userlist(users: list[str]) -> str:
    """auth_file lines: `"user" ""` (no password: trust does not check it)."""
    return "".join(f'"{user}" ""\n' for user in users)


def pgpool_conf(workdir: Path, port: int, pcp_port: int, pg_port: int, children: int) -> str:
    """pgpool.conf (Pgpool-II 4.3 keys): one backend, raw mode, no load balancing, the shmem query cache on.

    `raw` clustering mode means no replication and no streaming-replication checks; health checks are off so the
    only traffic is the benchmark's. Every path is in `workdir`, so nothing touches /var/run or /var/log.
    `memqcache_expire = 0` keeps entries until a write Pgpool sees invalidates them, as cacheproxy's 1 h TTL does.
    """
    return f"""\
backend_clustering_mode = 'raw'
listen_addresses = '127.0.0.1'
port = {port}
socket_dir = '{workdir}'
pcp_listen_addresses = '127.0.0.1'
pcp_port = {pcp_port}
pcp_socket_dir = '{workdir}'
wd_ipc_socket_dir = '{workdir}'
backend_hostname0 = '127.0.0.1'
backend_port0 = {pg_port}
backend_weight0 = 1
backend_flag0 = 'DISALLOW_TO_FAILOVER'
enable_pool_hba = off
pool_passwd = ''
num_init_children = {children}
max_pool = 1
reserved_connections = 0
pid_file_name = '{workdir}/pgpool.pid'
logdir = '{workdir}'
log_destination = 'stderr'
logging_collector = off
log_min_messages = warning
load_balance_mode = off
connection_cache = on
health_check_period = 0
sr_check_period = 0
failover_on_backend_error = off
use_watchdog = off
memory_cache_enabled = on
memqcache_method = 'shmem'
memqcache_total_size = 256MB
memqcache_max_num_cache = 1000000
memqcache_expire = 0
memqcache_auto_cache_invalidation = on
memqcache_maxcache = 400kB
memqcache_cache_block_size = 1MB
memqcache_oiddir = '{workdir}/oiddir'
"""


# ---- processes ---------------------------------------------------------------------------------------------------


def start_pgbouncer(port: int, pg_port: int, users: list[str], pool_size: int = 32) -> PeerProcess:
    workdir = _workdir("pgbouncer")
    ini = workdir / "pgbouncer.ini"
    _write(ini, pgbouncer_ini(workdir, port, pg_port, pool_size))
    _write(workdir / "userlist.txt", pgbouncer_userlist(users))
    log = workdir / "pgbouncer.log"
    peer = PeerProcess("pgbouncer", _spawn([_require("pgbouncer"), str(ini)], workdir), port, workdir, log)
    _wait_listening(peer)
    return peer


def start_pgpool(port: int, pg_port: int, children: int = 32) -> PeerProcess:
    workdir = _workdir("pgpool")
    (workdir / "oiddir").mkdir()
    _chown(workdir / "oiddir")
    conf, pcp, hba = workdir / "pgpool.conf", workdir / "pcp.conf", workdir / "pool_hba.conf"
    _write(conf, pgpool_conf(workdir, port, free_port(), pg_port, children))
    _write(pcp, "")
    _write(hba, "host all all 127.0.0.1/32 trust\n")
    log = workdir / "pgpool.log"
    # -n: stay in the foreground (its PID is ours); -D: ignore any pgpool_status left from a previous run.
    cmd = [_require("pgpool"), "-n", "-D", "-f", str(conf), "-F", str(pcp), "-a", str(hba)]
    peer = PeerProcess("pgpool", _spawn(cmd, workdir, stderr_to=log), port, workdir, log)
    _wait_listening(peer)
    return peer


def _workdir(name: str) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix=f"cacheproxy-bench-{name}-"))
    workdir.chmod(0o755)
    _chown(workdir)
    return workdir


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    _chown(path)


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, _SERVER_USER, _SERVER_USER)


def _require(binary: str) -> str:
    found = _binary(binary)
    if found is None:
        raise SystemExit(f"{binary} not found (apt-get install -y {_PACKAGES[binary]})")
    return found


def _spawn(cmd: list[str], workdir: Path, stderr_to: Path | None = None) -> subprocess.Popen[bytes]:
    as_root = os.geteuid() == 0
    with open(stderr_to if stderr_to else os.devnull, "ab") as err:
        return subprocess.Popen(
            cmd,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            user=_SERVER_USER if as_root else None,
            group=_SERVER_USER if as_root else None,
            extra_groups=[] if as_root else None,
        )


def _wait_listening(peer: PeerProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if peer.proc.poll() is not None:
            tail = peer.log_tail()
            peer.stop()
            raise SystemExit(f"{peer.name} exited with status {peer.proc.returncode} at start:\n{tail}")
        try:
            socket.create_connection(("127.0.0.1", peer.port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    tail = peer.log_tail()
    peer.stop()
    raise SystemExit(f"{peer.name} did not listen on {peer.port} within {timeout:g} s:\n{tail}")


def pgpool_cache_counters(env: dict[str, str], port: int) -> tuple[int, int]:
    """(cache hits, cacheable SELECTs) from Pgpool-II's `SHOW POOL_CACHE`, to check that it serves from its cache."""
    out = subprocess.run(
        ["psql", "-X", "-A", "-F", "|", "-h", "127.0.0.1", "-p", str(port), "-c", "SHOW POOL_CACHE", "postgres"],
        env=env, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) < 2:
        raise SystemExit(f"SHOW POOL_CACHE failed: {out.stderr.strip()}")
    row = dict(zip(lines[0].split("|"), lines[1].split("|"), strict=False))
    # num_selects counts the SELECTs that were not served from the cache (the page of SHOW POOL_CACHE:
    # cache_hit_ratio = num_cache_hits / (num_cache_hits + num_selects)).
    hits = int(row["num_cache_hits"])
    return hits, hits + int(row["num_selects"])
