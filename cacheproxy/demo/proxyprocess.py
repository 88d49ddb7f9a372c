"""Start the `cacheproxy` command as a subprocess and wait until it listens (for the demo and the benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def start_proxy_process(args: list[str], port: int, timeout: float = 15.0) -> subprocess.Popen[bytes]:
    """`python -m cacheproxy run ARGS`, returned once 127.0.0.1:`port` accepts connections."""
    cmd = [sys.executable, "-m", "cacheproxy", "run", "--listen", f"127.0.0.1:{port}", *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cacheproxy exited with status {proc.returncode} at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"cacheproxy did not start listening within {timeout:g} s")
