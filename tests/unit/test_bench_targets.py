"""The benchmark's table of issue 13's targets (bench/report.py): which cells it compares and how it states them."""

from __future__ import annotations

from bench.report import Machine, Report, Run, render_markdown, summarize, targets_table


def _run(section: str, target: str, mode: str, tps: float, **extra: object) -> Run:
    fields: dict[str, object] = {"clients": 16, "pg_cpu": 2.0, "proxy_cpu": 1.0, "pgbench_cpu": 0.5}
    fields.update(extra)
    return Run(section=section, mode=mode, target=target, tps=tps, latency_ms=1.0, **fields)  # type: ignore[arg-type]


def test_throughput_targets_are_ratios_per_mode() -> None:
    runs = [
        _run("hot", "direct", "simple", 40_000.0),
        _run("hot", "cacheproxy hits", "simple", 60_000.0, hit_ratio=1.0),
        _run("hot", "direct", "prepared", 50_000.0),
        _run("hot", "cacheproxy hits", "prepared", 40_000.0, hit_ratio=1.0),
        _run("hot", "pgbouncer", "prepared", 20_000.0),
        _run("hot", "cacheproxy off", "prepared", 25_000.0),
    ]
    lines = targets_table(summarize(runs)).splitlines()
    assert "| 1. all-hit reads >= 1.0x direct | simple | 60,000 TPS | 40,000 TPS | 1.50x | 100.0% |" in lines
    assert "| 1. all-hit reads >= 1.0x direct | prepared | 40,000 TPS | 50,000 TPS | 0.80x | 100.0% |" in lines
    assert "| 3. pass-through (cache off) >= 1.0x PgBouncer | prepared | 25,000 TPS | 20,000 TPS | 1.25x | - |" in lines
    assert not any("mix" in line for line in lines)  # not measured: no row


def test_cpu_per_transaction_latency_and_connect_targets() -> None:
    runs = [
        _run("paced-miss", "direct", "prepared", 2_000.0, pg_cpu=0.5, transactions=10_000),
        _run("paced-miss", "cacheproxy misses", "prepared", 2_000.0, pg_cpu=0.6, transactions=10_000),
        _run("single-miss", "direct", "simple", 5_000.0, clients=1, p50_ms=0.100),
        _run("single-miss", "cacheproxy misses", "simple", 4_000.0, clients=1, p50_ms=0.145),
        _run("connect", "direct", "simple", 200.0, clients=1),
        Run("connect", "simple", "cacheproxy off", 1, 150.0, 1.3, 0.0, 0.0, 0.0),
    ]
    text = targets_table(summarize(runs))
    assert "| 5. PostgreSQL CPU per miss <= direct (same rate) | prepared | 60.0 µs | 50.0 µs | 1.20x | - |" in text
    assert "| simple | 0.145 ms | 0.100 ms | +45 µs | - |" in text
    assert "| 6. connect <= direct + 0.5 ms (cache off) | simple | 1.30 ms | 1.00 ms | +0.30 ms | - |" in text


def test_the_markdown_starts_with_the_targets_when_there_are_any() -> None:
    machine = Machine(cores=2, cpu_model="Test CPU", kernel="6.1", date="2026-12-05 12:00 UTC")
    runs = [_run("hot", "direct", "simple", 1000.0), _run("hot", "cacheproxy hits", "simple", 2000.0)]
    text = render_markdown(Report(machine, "settings", summarize(runs)))
    assert text.index("## Targets of issue 13") < text.index("## TPS by mode")
    only_direct = render_markdown(Report(machine, "settings", summarize(runs[:1])))
    assert "## Targets" not in only_direct
