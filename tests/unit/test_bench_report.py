"""The benchmark's pure parts: percentiles from pgbench logs, summaries, the markdown table and the CSV, the
PgBouncer and Pgpool-II config files, the profile tables. No processes, no sockets, no timing assertions."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from bench.peers import pgbouncer_ini, pgbouncer_userlist, pgpool_conf
from bench.report import (
    CSV_COLUMNS,
    Machine,
    Report,
    Run,
    latencies_from_log,
    percentile,
    render_csv,
    render_markdown,
    summarize,
    top_frames,
    top_lines,
    tps_pivot,
)

MACHINE = Machine(cores=2, cpu_model="Test CPU @ 2GHz", kernel="6.1.0", date="2026-11-26 12:00 UTC")


def _run(target: str, tps: float, mode: str = "simple", section: str = "hot", **extra: object) -> Run:
    fields: dict[str, object] = {"clients": 16, "pg_cpu": 1.0, "proxy_cpu": 0.5, "pgbench_cpu": 0.25}
    fields.update(extra)
    latency_ms = float(fields["clients"]) / tps * 1000  # type: ignore[arg-type]
    return Run(section=section, mode=mode, target=target, tps=tps, latency_ms=latency_ms, **fields)  # type: ignore[arg-type]


# ---- percentiles and pgbench logs --------------------------------------------------------------------------------


def test_percentile_is_nearest_rank_over_observed_values() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100..1, unsorted on purpose
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile([7.5], 99) == 7.5


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)


def test_latencies_from_a_pgbench_log_skip_failed_and_skipped_transactions() -> None:
    log = [
        "0 1 70 0 1764158400 123456",
        "0 2 1250 0 1764158400 124706",
        "0 3 failed 0 1764158400 125000",  # pgbench 15 with --failures-detailed
        "0 4 skipped 0 1764158400 126000 5",  # --latency-limit
        "",
        "0 5 99 0 1764158400 127000 12",  # with --rate: schedule lag in a 7th column
    ]
    assert latencies_from_log(log) == [0.070, 1.25, 0.099]


def test_p50_and_p99_from_a_log_file(tmp_path: Path) -> None:
    # 98 fast transactions and 2 slow ones: p50 is fast, p99 is the first slow one.
    lines = [f"0 {i} {60 + i % 3} 0 1764158400 {i}" for i in range(98)] + ["0 98 900 0 1 1", "0 99 5000 0 1 2"]
    log = tmp_path / "txn.1234"
    log.write_text("\n".join(lines) + "\n")
    with log.open() as handle:
        latencies = latencies_from_log(handle)
    assert len(latencies) == 100
    assert percentile(latencies, 50) == 0.061
    assert percentile(latencies, 99) == 0.9


# ---- summaries ---------------------------------------------------------------------------------------------------


def test_summaries_take_medians_and_the_tps_range_per_cell_in_first_seen_order() -> None:
    runs = [
        _run("direct", 100.0, hit_ratio=None),
        _run("proxy", 300.0, hit_ratio=1.0, proxy_rss=10 * 2**20),
        _run("direct", 120.0),
        _run("proxy", 200.0, hit_ratio=0.5, proxy_rss=30 * 2**20),
        _run("direct", 90.0),
        _run("proxy", 250.0, hit_ratio=None, proxy_rss=20 * 2**20),
    ]
    direct, proxy = summarize(runs)
    assert (direct.target, direct.runs, direct.tps, direct.tps_min, direct.tps_max) == ("direct", 3, 100.0, 90.0, 120.0)
    assert direct.hit_ratio is None and direct.proxy_rss is None
    assert (proxy.tps, proxy.tps_min, proxy.tps_max) == (250.0, 200.0, 300.0)
    assert proxy.hit_ratio == 0.75  # the median of the runs that had one
    assert proxy.proxy_rss == 30 * 2**20  # the largest


def test_runs_of_other_modes_and_sections_are_separate_cells() -> None:
    runs = [_run("direct", 1.0, "simple"), _run("direct", 2.0, "prepared"), _run("direct", 3.0, "simple", "single")]
    assert [(s.section, s.mode, s.tps) for s in summarize(runs)] == [
        ("hot", "simple", 1.0),
        ("hot", "prepared", 2.0),
        ("single", "simple", 3.0),
    ]


# ---- rendering ---------------------------------------------------------------------------------------------------


def _report() -> Report:
    runs = [
        _run("direct", 64_800.0, "simple"),
        _run("cacheproxy hits", 70_000.0, "simple", hit_ratio=1.0, proxy_rss=100 * 2**20),
        _run("direct", 95_500.0, "prepared"),
        _run("direct", 12_000.0, "prepared", "single", clients=1, p50_ms=0.07, p99_ms=0.2),
    ]
    return Report(MACHINE, "pgbench on the same machine", summarize(runs), ["a note"])


def test_markdown_is_headed_by_the_machine_and_has_a_table_per_section() -> None:
    text = render_markdown(_report())
    assert text.startswith("# cacheproxy benchmark, 2026-11-26 12:00 UTC\n")
    assert "Machine: 2026-11-26 12:00 UTC: 2 cores, Test CPU @ 2GHz, kernel 6.1.0" in text
    assert (
        "| simple | cacheproxy hits | 16 | 70,000 (70,000-70,000) | 0.229 | - | - | 1.00 | 0.50 | - | - | 0.25 "
        "| 100.0% | 100 |" in text
    )
    assert "| prepared | direct | 1 | 12,000 (12,000-12,000) | 0.083 | 0.070 | 0.200 |" in text
    assert "## Single client" in text and "## Expensive read" not in text  # no runs, no section
    assert text.rstrip().endswith("- a note")


def test_the_pivot_puts_targets_down_and_modes_across() -> None:
    pivot = tps_pivot(_report().summaries, "hot").splitlines()
    assert pivot[0] == "| target | simple | prepared |"
    assert pivot[2] == "| direct | 64,800 (64,800-64,800) | 95,500 (95,500-95,500) |"
    assert pivot[3] == "| cacheproxy hits | 70,000 (70,000-70,000) | - |"
    assert tps_pivot(_report().summaries, "mix") == ""


def test_csv_has_the_machine_in_comments_then_one_row_per_cell() -> None:
    text = render_csv(_report())
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments[0] == "# machine: " + MACHINE.line()
    rows = list(csv.DictReader(io.StringIO("\n".join(line for line in text.splitlines() if not line.startswith("#")))))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == 4
    hits = rows[1]
    assert (hits["target"], hits["tps_median"], hits["hit_ratio"], hits["proxy_rss_mib"]) == (
        "cacheproxy hits", "70000.0", "1.0000", "100.0",
    )  # fmt: skip
    assert (rows[0]["hit_ratio"], rows[0]["p50_ms"]) == ("", "")
    assert (rows[3]["p50_ms"], rows[3]["p99_ms"]) == ("0.070", "0.200")


# ---- peer configs ------------------------------------------------------------------------------------------------


def _ini_values(text: str) -> dict[str, str]:
    return dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition("=") for line in text.splitlines())
        if value and not key.startswith(("#", "["))
    )


def test_pgbouncer_ini_is_session_mode_on_loopback_with_every_file_in_the_workdir() -> None:
    workdir = Path("/tmp/bench-x")
    text = pgbouncer_ini(workdir, port=6500, pg_port=5999, pool_size=32)
    values = _ini_values(text)
    assert text.index("[databases]") < text.index("[pgbouncer]")
    assert values["*"] == "host=127.0.0.1 port=5999"
    assert values["listen_addr"] == "127.0.0.1" and values["listen_port"] == "6500"
    assert values["pool_mode"] == "session" and values["auth_type"] == "trust"
    assert int(values["default_pool_size"]) >= 16 and int(values["max_client_conn"]) >= 16
    for key in ("unix_socket_dir", "pidfile", "logfile", "auth_file"):
        assert values[key].startswith(str(workdir)), key
    assert pgbouncer_userlist(["postgres", "alice"]) == '"postgres" ""\n"alice" ""\n'


def test_pgpool_conf_caches_in_shmem_with_one_backend_and_no_load_balancing() -> None:
    workdir = Path("/tmp/bench-y")
    values = _ini_values(pgpool_conf(workdir, port=6600, pcp_port=6601, pg_port=5999, children=32))
    assert values["backend_clustering_mode"] == "'raw'"
    assert values["backend_hostname0"] == "'127.0.0.1'" and values["backend_port0"] == "5999"
    assert "backend_hostname1" not in values
    assert values["listen_addresses"] == "'127.0.0.1'" and values["port"] == "6600" and values["pcp_port"] == "6601"
    assert values["memory_cache_enabled"] == "on" and values["memqcache_method"] == "'shmem'"
    assert values["load_balance_mode"] == "off" and values["enable_pool_hba"] == "off"
    assert int(values["num_init_children"]) >= 16
    assert values["health_check_period"] == "0" and values["use_watchdog"] == "off"
    for key in ("socket_dir", "pcp_socket_dir", "wd_ipc_socket_dir", "pid_file_name", "logdir", "memqcache_oiddir"):
        assert values[key].strip("'").startswith(str(workdir)), key


# ---- profiles ----------------------------------------------------------------------------------------------------

COLLAPSED = [
    "main (m.py:1);loop (m.py:9);write (libc.so.6) 60",
    "main (m.py:1);loop (m.py:9);handle (h.py:20);get (c.py:5) 25",
    "main (m.py:1);loop (m.py:9);handle (h.py:21) 10",
    "main (m.py:1);loop (m.py:9);handle (h.py:20);handle (h.py:30) 5",  # recursion counts once in total
    "garbage line",
]


def test_top_frames_rank_by_self_time_and_merge_lines_of_a_function() -> None:
    rows = top_frames(COLLAPSED, 3)
    assert rows == [("write (libc.so.6)", 60.0, 60.0), ("get (c.py)", 25.0, 25.0), ("handle (h.py)", 15.0, 40.0)]


def test_top_lines_keep_line_numbers() -> None:
    assert top_lines(COLLAPSED, 2) == [("write (libc.so.6)", 60.0), ("get (c.py:5)", 25.0)]
    assert top_frames([], 5) == []
