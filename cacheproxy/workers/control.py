"""WorkerTable: one row of counters per worker in shared memory, for operators (SHOW WORKERS, /metrics).

The supervisor writes a row's pid, restarts and start time when it forks the worker; the worker writes its client
connections (exact: at each open and close) and its cache hits and misses (copied once a second: SHOW WORKERS says
how old). Single writer per field, 8-byte aligned stores: no lock needed (see generations.py).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from enum import IntEnum

WORD = 8


class Field(IntEnum):
    PID = 0
    RESTARTS = 1
    STARTED_MS = 2  # Unix time the worker was forked, in milliseconds
    CLIENTS = 3
    CLIENTS_TOTAL = 4
    HITS = 5
    MISSES = 6
    UPDATED_MS = 7  # Unix time the worker last copied its hits and misses here


FIELDS = len(Field)


@dataclass(frozen=True, slots=True)
class WorkerRow:
    index: int
    pid: int
    restarts: int
    started_ms: int
    clients: int
    clients_total: int
    hits: int
    misses: int
    updated_ms: int


def new_table(workers: int) -> mmap.mmap:
    return mmap.mmap(-1, workers * FIELDS * WORD, flags=mmap.MAP_SHARED)


class WorkerTable:
    """The rows, over a shared buffer of `workers` x FIELDS unsigned 64-bit integers."""

    __slots__ = ("_view", "workers")

    def __init__(self, buffer: mmap.mmap | bytearray, workers: int) -> None:
        self._view = memoryview(buffer).cast("B")[: workers * FIELDS * WORD].cast("Q")
        self.workers = workers

    def set(self, index: int, field: Field, value: int) -> None:
        self._view[index * FIELDS + field] = max(0, value)

    def add(self, index: int, field: Field, delta: int) -> None:
        cell = index * FIELDS + field
        self._view[cell] = max(0, self._view[cell] + delta)

    def get(self, index: int, field: Field) -> int:
        return int(self._view[index * FIELDS + field])

    def row(self, index: int) -> WorkerRow:
        base = index * FIELDS
        return WorkerRow(index, *(int(v) for v in self._view[base : base + FIELDS]))

    def rows(self) -> list[WorkerRow]:
        return [self.row(index) for index in range(self.workers)]
