"""Memory of another process, read from /proc (Linux): for tests that bound what a proxy subprocess holds."""

from __future__ import annotations

from bench import procstat

MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    """The process's resident set size (VmRSS), in bytes; the process must be alive."""
    rss = procstat.rss_bytes(pid)
    if rss is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return rss
