"""The mypyc-compiled hot path against the same code in pure Python (README: "Compiled hot path").

    python3 -m bench.compiled [--quick] [--rounds N] [--seconds S]    # results: bench/results/compiled.md

Two proxies of each kind run side by side, one started with CACHEPROXY_PURE=1 (cacheproxy/mode.py: the .py files)
and one without (the compiled build; if there is none, both are pure and the comparison says so). Sections, targets
interleaved round by round as in bench/run.py: "hot", all hits over the 10k hot keys after a warm-up; "miss", reads
over every account (almost all misses, the cache on); "off", the same reads with the cache off (pass-through). In the
three modes, 16 clients; the proxy's CPU per transaction is in the table.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    _server_version,
    _settings,
    _show,
    _stop_proxy,
    _warm_up,
    _write_results,
    _write_scripts,
)
from cacheproxy import MODE
from cacheproxy.demo.pgcluster import PgCluster, free_port
from cacheproxy.demo.proxyprocess import start_proxy_process
from cacheproxy.mode import PURE_ENV


@contextmanager
def _pure(on: bool) -> Iterator[None]:
    """CACHEPROXY_PURE=1 in the environment a proxy process is started with, or unset."""
    before = os.environ.pop(PURE_ENV, None)
    if on:
        os.environ[PURE_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(PURE_ENV, None)
        if before is not None:
            os.environ[PURE_ENV] = before


def _start(bench: Bench, name: str, config_text: str, pure: bool, stoppers: list[Callable[[], None]]) -> Target:
    config = bench.scripts / f"{name.replace(' ', '_')}.yaml"
    config.write_text(config_text)
    port, admin = free_port(), free_port()
    with _pure(pure):
        proc = start_proxy_process(
            ["--config", str(config), "--upstream", bench.cluster.url(), "--admin-listen", f"127.0.0.1:{admin}",
             "--log-level", "warning"], port)  # fmt: skip
    stoppers.append(functools.partial(_stop_proxy, proc))
    return Target(name, port, proc.pid, rss=True, counters=_admin_counters(admin))


def compare(bench: Bench, stoppers: list[Callable[[], None]]) -> None:
    args = bench.args
    on = _proxy_config(cache=True, ttl="1h", strategy=None)
    off = _proxy_config(cache=False, ttl="1h", strategy=None)
    hits = [_start(bench, f"{kind} hits", on, kind == "pure", stoppers) for kind in ("compiled", "pure")]
    misses = [_start(bench, f"{kind} misses", on, kind == "pure", stoppers) for kind in ("compiled", "pure")]
    relays = [_start(bench, f"{kind} off", off, kind == "pure", stoppers) for kind in ("compiled", "pure")]
    hot_script, miss_script = ["-f", str(bench.scripts / "hot.sql")], ["-f", str(bench.scripts / "miss.sql")]
    for mode in MODES:
        for target in hits:
            _warm_up(bench, target, mode, hot_script, HOT_KEYS)
    for round_no in range(1, args.rounds + 1):
        for mode in MODES:
            for target in hits:
                _show(round_no, _measure(bench, "hot", target, mode, hot_script, args.clients, args.seconds))
            for target in misses:
                _show(round_no, _measure(bench, "miss", target, mode, miss_script, args.clients, args.seconds))
            for target in relays:
                _show(round_no, _measure(bench, "off", target, mode, miss_script, args.clients, args.seconds))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cluster = PgCluster.start()
    scripts = Path(tempfile.mkdtemp(prefix="cacheproxy-bench-compiled-"))
    stoppers: list[Callable[[], None]] = [functools.partial(shutil.rmtree, scripts, ignore_errors=True)]
    try:
        bench = Bench(args, cluster, cluster.env(), scripts)
        machine = _machine(_server_version(cluster))
        print(f"machine: {machine.line()}; {MODE.describe()}", flush=True)
        _pgbench(bench.env, ["-i", "-q", "-s", str(args.scale), "-p", str(cluster.port)], check=True)
        _write_scripts(scripts, args.scale)
        compare(bench, stoppers)
        notes = [
            f"'compiled' proxies: {MODE.describe()}; 'pure' proxies: the same code with {PURE_ENV}=1. "
            f"Load average at the end: {' / '.join(f'{load:.1f}' for load in os.getloadavg())}."
        ]
        report = Report(machine, _settings(args), summarize(bench.runs), notes)
        _write_results(report, Path(args.out), "compiled-quick" if args.quick else "compiled")
    finally:
        for stop in reversed(stoppers):
            stop()
        cluster.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
