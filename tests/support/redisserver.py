"""A private redis-server for the shared-tier tests: on a free port, in a temp dir, started and killed by PID (the
one a machine may run on 6379 is never touched)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """redis-server with `extra` config lines; `url` for clients; `kill()` / `start()` to fault it."""

    def __init__(self, directory: Path | None = None, extra: tuple[str, ...] = (), *, tls: bool = False) -> None:
        self.binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (.ci/setup installs it)")
        self.dir = directory or Path(tempfile.mkdtemp(prefix="cp-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        lines = [
            f"dir {self.dir}",
            "bind 127.0.0.1",
            "save ''",
            "appendonly no",
            "protected-mode no",
            "maxmemory 64mb",
            f"cluster-config-file {self.dir / 'nodes.conf'}",
            "maxmemory-policy allkeys-lru",
            f"logfile {self.dir / 'redis.log'}",
        ]
        lines.append(f"port 0\ntls-port {self.port}" if self.tls else f"port {self.port}")
        return "\n".join([*lines, *self.extra]) + "\n"

    def start(self) -> RedisServer:
        conf = self.dir / "redis.conf"
        conf.write_text(self._config())
        assert self.binary is not None
        self.process = subprocess.Popen([self.binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: {self.log_tail()}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL (its data is lost: nothing is saved), by PID."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        path = self.dir / "redis.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    def version(self) -> str:
        assert self.binary is not None
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        return next((part[2:] for part in out.split() if part.startswith("v=")), out.strip())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)


class RedisCluster:
    """A Redis Cluster of `masters` redis-servers (no replicas), made with `redis-cli --cluster create`."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes = [
            # (the bus port is given: the default, port + 10000, may be taken or above 65535)
            RedisServer(
                directory / f"node{i}",
                ("cluster-enabled yes", "cluster-node-timeout 2000", f"cluster-port {free_port()}"),
            )
            for i in range(masters)
        ]

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        client = redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)
        deadline = time.monotonic() + 20
        while client.cluster_info().get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become ok")
            time.sleep(0.1)
        client.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @property
    def url(self) -> str:
        return self.nodes[0].url
