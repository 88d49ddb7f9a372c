"""CPU seconds and resident memory of process trees, read from /proc (Linux), for the benchmark."""

from __future__ import annotations

import os
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and of all its live descendants, including their reaped children.

    A process that exited and was waited for has its time added to its parent's cutime/cstime, so summing
    utime + stime + cutime + cstime over the live tree counts everything once. A PostgreSQL backend that has
    exited but is not reaped yet is not counted anywhere: callers let the postmaster reap before reading.
    """
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for child, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            total += stats[current][1]
        todo.extend(children.get(current, ()))
    return total


def rss_bytes(pid: int) -> int | None:
    """VmRSS of one process, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _all_stats() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime + stime + cutime + cstime in seconds) for every process we can read."""
    result: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                # The command name (field 2) may contain spaces and parentheses: split after the last ")".
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # proc(5): fields[0] is state (field 3), so ppid is fields[1], utime..cstime are fields[11..14].
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        result[int(entry.name)] = (int(fields[1]), ticks / _CLK_TCK)
    return result
