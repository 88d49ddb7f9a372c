"""Memory of another process, read from /proc (Linux): for tests that bound what a proxy subprocess holds."""

from __future__ import annotations

from pathlib import Path

MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    """The process's resident set size (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no VmRSS for pid {pid}")
