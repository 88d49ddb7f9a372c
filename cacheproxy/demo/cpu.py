"""CPU seconds of a process tree (a postmaster and its backends, the proxy), read from /proc, for the demo."""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree_cpu(pid: int | None) -> float | None:
    """User + system CPU seconds of `pid` and its live descendants (with the children they reaped), or None where
    /proc cannot tell (not Linux, or no such process)."""
    if pid is None or not os.path.isdir("/proc"):
        return None
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()  # the command (field 2) may hold ")"
        except OSError:
            continue
        # proc(5): after the command, fields[1] is the ppid and fields[11..14] utime, stime, cutime, cstime.
        parents[int(name)] = int(fields[1])
        seconds[int(name)] = sum(int(f) for f in fields[11:15]) / _TICKS
    if pid not in seconds:
        return None
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += seconds.get(current, 0.0)
        todo.extend(children.get(current, ()))
    return total
