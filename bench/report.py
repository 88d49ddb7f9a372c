"""The benchmark's pure parts: runs and their summaries, percentiles from pgbench logs, the machine, the markdown
table and the CSV. No processes, no sockets, no clocks, so the unit tests can check them byte for byte."""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Machine:
    """What the numbers were measured on; heads every table and CSV."""

    cores: int
    cpu_model: str
    kernel: str
    date: str
    python: str = ""
    postgres: str = ""

    def line(self) -> str:
        extra = "".join(f", {part}" for part in (self.python, self.postgres) if part)
        return f"{self.date}: {self.cores} cores, {self.cpu_model}, kernel {self.kernel}{extra}"


@dataclass(frozen=True, slots=True)
class Run:
    """One pgbench run against one target. CPU seconds are deltas over the run; None where not measured."""

    section: str  # hot, single, expensive, mix
    mode: str  # pgbench -M
    target: str
    clients: int
    tps: float
    latency_ms: float
    pg_cpu: float
    proxy_cpu: float
    pgbench_cpu: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    hit_ratio: float | None = None
    proxy_rss: int | None = None  # bytes, after the run
    transactions: int = 0  # pgbench's count of completed transactions (for CPU per transaction)


@dataclass(frozen=True, slots=True)
class Summary:
    """The runs of one (section, mode, target) cell: medians, and the TPS range."""

    section: str
    mode: str
    target: str
    clients: int
    runs: int
    tps: float
    tps_min: float
    tps_max: float
    latency_ms: float
    pg_cpu: float
    proxy_cpu: float
    pgbench_cpu: float
    p50_ms: float | None
    p99_ms: float | None
    hit_ratio: float | None
    proxy_rss: int | None  # the largest seen
    pg_us_per_txn: float | None = None  # PostgreSQL's CPU per transaction (median over runs), µs
    proxy_us_per_txn: float | None = None


@dataclass(slots=True)
class Report:
    """Everything the suite measured, plus the notes printed under the tables."""

    machine: Machine
    settings: str
    summaries: list[Summary]
    notes: list[str] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of `values`: a value that was actually observed.

    >>> percentile([4.0, 1.0, 3.0, 2.0], 50), percentile([4.0, 1.0, 3.0, 2.0], 99)
    (2.0, 4.0)
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latencies_from_log(lines: Iterable[str]) -> list[float]:
    """Per-transaction latencies in ms from a pgbench `--log` file (no aggregation).

    Each line is `client_id transaction_no time script_no time_epoch time_us [schedule_lag]`, `time` in
    microseconds, or the words `failed`/`skipped` for a transaction that did not complete (PostgreSQL 15's pgbench
    documentation, "Per-Transaction Logging"); those are not latencies and are left out.
    """
    result: list[float] = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2].isdigit():
            result.append(int(fields[2]) / 1000.0)
    return result


def summarize(runs: Sequence[Run]) -> list[Summary]:
    """One Summary per (section, mode, target), in the order the cells first appear in `runs`."""
    cells: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        cells.setdefault((run.section, run.mode, run.target), []).append(run)
    return [_summary(group) for group in cells.values()]


def _summary(group: list[Run]) -> Summary:
    first = group[0]
    tps = [r.tps for r in group]
    rss = [r.proxy_rss for r in group if r.proxy_rss is not None]
    return Summary(
        section=first.section,
        mode=first.mode,
        target=first.target,
        clients=first.clients,
        runs=len(group),
        tps=statistics.median(tps),
        tps_min=min(tps),
        tps_max=max(tps),
        latency_ms=statistics.median(r.latency_ms for r in group),
        pg_cpu=statistics.median(r.pg_cpu for r in group),
        proxy_cpu=statistics.median(r.proxy_cpu for r in group),
        pgbench_cpu=statistics.median(r.pgbench_cpu for r in group),
        p50_ms=_median_of(r.p50_ms for r in group),
        p99_ms=_median_of(r.p99_ms for r in group),
        hit_ratio=_median_of(r.hit_ratio for r in group),
        proxy_rss=max(rss) if rss else None,
        pg_us_per_txn=_median_of(r.pg_cpu / r.transactions * 1e6 if r.transactions else None for r in group),
        proxy_us_per_txn=_median_of(r.proxy_cpu / r.transactions * 1e6 if r.transactions else None for r in group),
    )


def _median_of(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# ---- rendering ---------------------------------------------------------------------------------------------------

SECTION_TITLES = {
    "hot": "Hot reads: pgbench -S over 10k hot keys (`\\set aid random(1, 10000)`)",
    "single": "Single client (-c 1): per-transaction latency from pgbench --log",
    "expensive": "Expensive read: an aggregate with a join over pgbench_accounts",
    "mix": "90/10 read/write mix on the hot keys (reads as above; writes UPDATE pgbench_accounts)",
    "workers-hot": "Hot reads with 1 and with N worker processes (server.workers)",
    "workers-mix": "90/10 mix with 1 and with N worker processes (server.workers, lazy rule)",
    "miss": "Misses: reads over all of pgbench_accounts (`random(1, 100000 * scale)`), almost every one a miss",
    "single-miss": "Single client (-c 1), misses: per-transaction latency from pgbench --log",
    "paced-miss": "PostgreSQL CPU per miss at the same paced rate (pgbench -R): direct against through the proxy",
    "connect": "Connect: psycopg connect + SELECT 1 + close, one after another (TPS = connections/s, ms = median)",
}

CSV_COLUMNS = (
    "section", "mode", "target", "clients", "runs", "tps_median", "tps_min", "tps_max", "latency_ms",
    "p50_ms", "p99_ms", "pg_cpu_s", "proxy_cpu_s", "pgbench_cpu_s", "hit_ratio", "proxy_rss_mib",
)  # fmt: skip


def render_markdown(report: Report) -> str:
    """The full results: one table per section, the machine and the settings on top, the notes at the bottom."""
    out = [f"# cacheproxy benchmark, {report.machine.date}", "", f"Machine: {report.machine.line()}", ""]
    out += [report.settings, ""]
    targets = targets_table(report.summaries)
    if targets:
        out += ["## Targets of issue 13 (ratios of medians)", "", targets, ""]
    pivot = tps_pivot(report.summaries, "hot")
    if pivot:
        out += ["## TPS by mode (hot reads, median)", "", pivot, ""]
    for section, title in SECTION_TITLES.items():
        rows = [s for s in report.summaries if s.section == section]
        if rows:
            out += [f"## {title}", "", _section_table(rows), ""]
    if report.notes:
        out += ["## Notes", "", *[f"- {note}" for note in report.notes], ""]
    return "\n".join(out)


def tps_pivot(summaries: Sequence[Summary], section: str) -> str:
    """Targets down, modes across: median TPS (min-max). Empty when the section has no rows."""
    rows = [s for s in summaries if s.section == section]
    modes = list(dict.fromkeys(s.mode for s in rows))
    targets = list(dict.fromkeys(s.target for s in rows))
    if not rows:
        return ""
    cell = {(s.target, s.mode): s for s in rows}
    lines = ["| target | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for target in targets:
        values = [_tps_range(cell[target, mode]) if (target, mode) in cell else "-" for mode in modes]
        lines.append(f"| {target} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _section_table(rows: Sequence[Summary]) -> str:
    header = "| mode | target | clients | TPS median (min-max) | mean ms | p50 ms | p99 ms | PG CPU s | proxy CPU s "
    header += "| PG µs/txn | proxy µs/txn | pgbench CPU s | hit ratio | proxy RSS MiB |"
    lines = [header, "|---" * 14 + "|"]
    for s in rows:
        lines.append(
            f"| {s.mode} | {s.target} | {s.clients} | {_tps_range(s)} | {s.latency_ms:.3f} | {_ms(s.p50_ms)} "
            f"| {_ms(s.p99_ms)} | {s.pg_cpu:.2f} | {s.proxy_cpu:.2f} | {_num(s.pg_us_per_txn, 1) or '-'} "
            f"| {_num(s.proxy_us_per_txn, 1) or '-'} | {s.pgbench_cpu:.2f} | {_ratio(s.hit_ratio)} "
            f"| {_mib(s.proxy_rss)} |"
        )
    return "\n".join(lines)


# (section, target, baseline, what is compared, the target): one row per mode where both cells were measured.
_TARGETS: tuple[tuple[str, str, str, str, str], ...] = (
    ("hot", "cacheproxy hits", "direct", "tps", "1. all-hit reads >= 1.0x direct"),
    ("mix", "cacheproxy lazy", "direct", "tps", "2. 90/10 mix >= 1.0x direct"),
    ("mix", "cacheproxy lazy", "cacheproxy off", "tps", "2. 90/10 mix >= 1.0x cache off"),
    ("hot", "cacheproxy off", "pgbouncer", "tps", "3. pass-through (cache off) >= 1.0x PgBouncer"),
    ("miss", "cacheproxy misses", "pgbouncer", "tps", "3. every miss >= 1.0x PgBouncer"),
    ("single", "cacheproxy hits", "direct", "p50", "4. single-client p50 of hits <= direct"),
    ("single-miss", "cacheproxy misses", "direct", "p50", "4. single-client p50 of misses <= direct + 30 µs"),
    ("paced-miss", "cacheproxy misses", "direct", "pg", "5. PostgreSQL CPU per miss <= direct (same rate)"),
    ("connect", "cacheproxy off", "direct", "ms", "6. connect <= direct + 0.5 ms (cache off)"),
    ("connect", "cacheproxy hits", "direct", "ms", "6. connect <= direct + 0.5 ms (cache on)"),
)


def targets_table(summaries: Sequence[Summary]) -> str:
    """The issue's targets, one row per target and mode: the figure, its baseline and the ratio (or difference).
    Empty when nothing it compares was measured."""
    cell = {(s.section, s.target, s.mode): s for s in summaries}
    modes = list(dict.fromkeys(s.mode for s in summaries))
    lines = ["| target | mode | proxy | baseline | ratio / difference | hit ratio |", "|---" * 6 + "|"]
    for section, target, baseline, what, title in _TARGETS:
        for mode in modes:
            ours, theirs = cell.get((section, target, mode)), cell.get((section, baseline, mode))
            if ours is None or theirs is None:
                continue
            lines.append(f"| {title} | {mode} | {_compare(ours, theirs, what)} | {_ratio(ours.hit_ratio)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _compare(ours: Summary, theirs: Summary, what: str) -> str:
    if what == "tps":
        ratio = f"{ours.tps / theirs.tps:.2f}x" if theirs.tps else "-"
        return f"{ours.tps:,.0f} TPS | {theirs.tps:,.0f} TPS | {ratio}"
    if what == "pg" and ours.pg_us_per_txn is not None and theirs.pg_us_per_txn is not None:
        return (f"{ours.pg_us_per_txn:.1f} µs | {theirs.pg_us_per_txn:.1f} µs "
                f"| {ours.pg_us_per_txn / theirs.pg_us_per_txn:.2f}x")  # fmt: skip
    if what == "p50" and ours.p50_ms is not None and theirs.p50_ms is not None:
        return f"{ours.p50_ms:.3f} ms | {theirs.p50_ms:.3f} ms | {(ours.p50_ms - theirs.p50_ms) * 1000:+.0f} µs"
    return f"{ours.latency_ms:.2f} ms | {theirs.latency_ms:.2f} ms | {ours.latency_ms - theirs.latency_ms:+.2f} ms"


def render_csv(report: Report) -> str:
    """One row per (section, mode, target), under `#` comment lines naming the machine and the settings."""
    buffer = io.StringIO()
    buffer.write(f"# machine: {report.machine.line()}\n")
    for line in report.settings.splitlines():
        buffer.write(f"# {line}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in report.summaries:
        writer.writerow(
            [
                s.section, s.mode, s.target, s.clients, s.runs, f"{s.tps:.1f}", f"{s.tps_min:.1f}",
                f"{s.tps_max:.1f}", f"{s.latency_ms:.3f}", _num(s.p50_ms, 3), _num(s.p99_ms, 3),
                f"{s.pg_cpu:.2f}", f"{s.proxy_cpu:.2f}", f"{s.pgbench_cpu:.2f}", _num(s.hit_ratio, 4),
                _num(s.proxy_rss / 2**20 if s.proxy_rss is not None else None, 1),
            ]
        )  # fmt: skip
    return buffer.getvalue()


def _tps_range(s: Summary) -> str:
    return f"{s.tps:,.0f} ({s.tps_min:,.0f}-{s.tps_max:,.0f})"


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _ratio(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "-"


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.0f}" if value is not None else "-"


def _num(value: float | None, digits: int) -> str:
    return f"{value:.{digits}f}" if value is not None else ""


# ---- profiles ----------------------------------------------------------------------------------------------------

_LINE_NO = re.compile(r":\d+\)$")


def top_frames(collapsed: Iterable[str], n: int) -> list[tuple[str, float, float]]:
    """The n frames with the most self time in py-spy's raw (collapsed stack) output, as (frame, self %, total %).

    Each line is `outer;...;inner COUNT`. Self time is where a sample's innermost frame is; total time counts a
    frame once per sample it appears in (recursion does not count twice). Line numbers are dropped, so that a
    function is one row.

    >>> top_frames(["main (a.py:1);f (a.py:5) 3", "main (a.py:1);g (a.py:9);f (a.py:6) 1"], 2)
    [('f (a.py)', 100.0, 100.0), ('main (a.py)', 0.0, 100.0)]
    """
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in collapsed:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE_NO.sub(")", frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    if not samples:
        return []
    ranked = sorted(total, key=lambda frame: (-own.get(frame, 0), -total[frame], frame))[:n]
    return [(frame, 100.0 * own.get(frame, 0) / samples, 100.0 * total[frame] / samples) for frame in ranked]


def top_lines(collapsed: Iterable[str], n: int) -> list[tuple[str, float]]:
    """The n innermost frames, line numbers kept, with their share of the samples: where the time is spent.

    >>> top_lines(["main (a.py:1);f (a.py:5) 3", "main (a.py:1);f (a.py:6) 1"], 1)
    [('f (a.py:5)', 75.0)]
    """
    own: dict[str, int] = {}
    samples = 0
    for line in collapsed:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if stack and count_text.isdigit():
            samples += int(count_text)
            leaf = stack.rsplit(";", 1)[-1]
            own[leaf] = own.get(leaf, 0) + int(count_text)
    ranked = sorted(own.items(), key=lambda item: (-item[1], item[0]))[:n]
    return [(frame, 100.0 * count / samples) for frame, count in ranked]
