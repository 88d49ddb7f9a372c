"""cacheproxy with 1 and with N worker processes (server.workers), against direct PostgreSQL, pgbench on the machine.

    python3 -m bench.workers [--quick] [--workers N]     # this comparison alone (bench/results/workers.md)
    python3 -m bench --workers N                         # the full suite, with this comparison as two more sections

Sections: "workers-hot", all-hit reads over the 10k hot keys in the three modes after a warm-up of every worker;
"workers-mix", the 90/10 read/UPDATE mix with a `lazy` rule. Targets are interleaved round by round, as in
bench/run.py; the proxy's CPU is its whole process tree (the supervisor and its workers).
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.report import Report, summarize
from bench.run import (
    HOT_KEYS,
    MODES,
    Bench,
    Target,
    _admin_counters,
    _machine,
    _measure,
    _parse_args,
    _pgbench,
    _proxy_config,
    _run_args,
    _server_version,
    _settings,
    _show,
    _stop_proxy,
    _warm_up,
    _write_results,
    _write_scripts,
)
from cacheproxy.demo.pgcluster import PgCluster, free_port
from cacheproxy.demo.proxyprocess import start_proxy_process


def _start(bench: Bench, name: str, config_text: str, stoppers: list[Callable[[], None]]) -> Target:
    config = bench.scripts / f"{name.replace(' ', '_')}.yaml"
    config.write_text(config_text)
    port, admin = free_port(), free_port()
    proc = start_proxy_process(
        ["--config", str(config), "--upstream", bench.cluster.url(), "--admin-listen", f"127.0.0.1:{admin}",
         "--log-level", "warning"], port)  # fmt: skip
    stoppers.append(functools.partial(_stop_proxy, proc))
    return Target(name, port, proc.pid, rss=False, counters=_admin_counters(admin))


def compare(bench: Bench, count: int, stoppers: list[Callable[[], None]]) -> None:
    """The two sections, for 1 and `count` workers."""
    args = bench.args
    direct = Target("direct", bench.cluster.port)
    workers = f"\nserver:\n  workers: {count}\n"
    hits_text = _proxy_config(cache=True, ttl="1h", strategy=None)
    lazy_text = _proxy_config(cache=True, ttl="60", strategy="lazy")
    hits = [
        _start(bench, "cacheproxy 1 worker", hits_text, stoppers),
        _start(bench, f"cacheproxy {count} workers", hits_text + workers, stoppers),
    ]
    lazy = [
        _start(bench, "cacheproxy lazy 1 worker", lazy_text, stoppers),
        _start(bench, f"cacheproxy lazy {count} workers", lazy_text + workers, stoppers),
    ]
    hot_script = ["-f", str(bench.scripts / "hot.sql")]
    for mode in MODES:
        for target in hits:
            _warm_up(bench, target, mode, hot_script, HOT_KEYS)
    for round_no in range(1, args.rounds + 1):
        for mode in MODES:
            for target in (direct, *hits):
                _show(round_no, _measure(bench, "workers-hot", target, mode, hot_script, args.clients, args.seconds))
    mix = ["-f", f"{bench.scripts / 'hot.sql'}@9", "-f", f"{bench.scripts / 'write.sql'}@1"]
    for target in lazy:  # every worker sees every key, then the steady state of fills and invalidations is reached
        _warm_up(bench, target, args.mix_mode, hot_script, HOT_KEYS)
        _pgbench(bench.env, _run_args(target.port, args.mix_mode, args.clients, args.seconds, mix))
    for round_no in range(1, args.rounds + 1):
        for target in (direct, *lazy):
            _show(round_no, _measure(bench, "workers-mix", target, args.mix_mode, mix, args.clients, args.seconds))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    count = args.workers or 2
    cluster = PgCluster.start()
    scripts = Path(tempfile.mkdtemp(prefix="cacheproxy-bench-workers-"))
    stoppers: list[Callable[[], None]] = [functools.partial(shutil.rmtree, scripts, ignore_errors=True)]
    try:
        bench = Bench(args, cluster, cluster.env(), scripts)
        machine = _machine(_server_version(cluster))
        print(f"machine: {machine.line()}", flush=True)
        _pgbench(bench.env, ["-i", "-q", "-s", str(args.scale), "-p", str(cluster.port)], check=True)
        _write_scripts(scripts, args.scale)
        compare(bench, count, stoppers)
        notes = [
            f"1 worker against {count} workers (server.workers) on {machine.cores} cores shared with PostgreSQL and "
            "pgbench; each worker caches in its own memory, so every worker was warmed (its hit ratio is shown)."
        ]
        report = Report(machine, _settings(args), summarize(bench.runs), notes)
        _write_results(report, Path(args.out), "workers-quick" if args.quick else "workers")
    finally:
        for stop in reversed(stoppers):
            stop()
        cluster.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
