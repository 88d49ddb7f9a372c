"""Benchmark suite: cacheproxy against direct PostgreSQL, PgBouncer and Pgpool-II, with pgbench on the same machine.

    python3 -m bench            # the full suite (about 12 minutes on 2 cores)
    python3 -m bench --quick    # a smoke run: 1 round of 2 s runs

It starts a private PostgreSQL (`pgbench -i -s 10`), four cacheproxy processes (cache on with a 1 h TTL, cache off,
and a `lazy` and a `write_through` rule for the read/write mix), PgBouncer (session mode) and Pgpool-II (shmem query
cache on), all on 127.0.0.1, installing the peers from Debian packages if they are missing. Then, interleaving the
targets round by round:

1. hot: pgbench over 10k hot keys of pgbench_accounts, 16 clients, -M simple|extended|prepared, after a warm-up
   (cacheproxy at 100% hits, Pgpool-II serving from its cache); TPS and mean latency.
2. single: the same with one client: p50 and p99 from pgbench's per-transaction log.
3. expensive: an aggregate with a join over pgbench_accounts (>= 5 ms directly): direct against cacheproxy hits.
4. mix: 90% hot reads, 10% UPDATEs of the hot keys, in each mode: TPS and hit ratio with `lazy` and with
   `write_through`, against direct and the cache off.
5. miss: reads over every account (almost all misses) in each mode: direct, PgBouncer, a cache-on proxy that misses,
   the cache off; then one client (p50 of misses), then PostgreSQL's CPU per miss at the same paced rate (pgbench
   -R), since a backend's CPU per query grows as its rate falls (idle wake-ups) and only equal rates compare.
6. connect: psycopg's connect + SELECT 1 + close, one after another, median: direct, PgBouncer, cacheproxy.
The first table of the results states issue 13's targets as ratios of these medians.
Every run records the CPU seconds of PostgreSQL (the postmaster's tree), of the proxy (its process tree) and of
pgbench, and the proxy's RSS. Results go to bench/results/latest.md and latest.csv (quick.* for --quick), headed by
the machine. A benchmark, not a test: nothing here asserts a speed. `--profile DIR` also samples the cacheproxy hit
path with py-spy in each mode (DIR/profile_<mode>.txt, collapsed stacks, and DIR/profile.md with the top frames).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench import peers
from bench.procstat import rss_bytes, tree_cpu
from bench.report import (
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
)
from cacheproxy.demo.pgcluster import PgCluster, free_port
from cacheproxy.demo.proxyprocess import start_proxy_process

MODES = ("simple", "extended", "prepared")
HOT_KEYS = 10_000
HOT_SCRIPT = f"\\set aid random(1, {HOT_KEYS})\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
# Every account: at scale 10, 1M keys, so a run of a few seconds almost never reads one twice.
MISS_SCRIPT = "\\set aid random(1, {accounts})\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
PACED_TPS = 2000  # the rate of the paced-miss runs: well below what either direct or the proxy can do
CONNECTS = 200  # connections per connect measurement (--quick: 50)
WRITE_SCRIPT = (
    f"\\set aid random(1, {HOT_KEYS})\n\\set delta random(-5000, 5000)\n"
    "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n"
)
# 20 distinct ranges of 50k accounts: an index range scan, a join and an aggregate (about 10 ms at scale 10).
EXPENSIVE_KEYS = 20
EXPENSIVE_SCRIPT = (
    f"\\set lo random(0, {EXPENSIVE_KEYS - 1}) * 50000 + 1\n"
    "SELECT b.bid, count(*), sum(a.abalance), avg(a.abalance) FROM pgbench_accounts a "
    "JOIN pgbench_branches b ON b.bid = a.bid WHERE a.aid BETWEEN :lo AND :lo + 49999 GROUP BY b.bid ORDER BY b.bid;\n"
)
MAX_MEMORY = "512MiB"
EXPENSIVE_MIN_MS = 5.0
# Runs end when pgbench's clients leave; the backends then exit and are reaped, adding their CPU time to the
# postmaster's. Waiting this long after a run lets that happen, so it counts for this run and not the next.
SETTLE_SECONDS = 1.0


@dataclass
class Target:
    """Something pgbench connects to, and how to read its CPU, RSS and cache counters."""

    name: str
    port: int
    pid: int | None = None  # the proxy process whose tree's CPU is counted; None for direct
    rss: bool = False  # whether its RSS means something (not for Pgpool-II's forked children and shared memory)
    counters: Callable[[], tuple[int, int] | None] = field(default=lambda: None)  # (hits, lookups)


@dataclass
class Bench:
    """The running suite: settings, the cluster, the scripts and what was measured."""

    args: argparse.Namespace
    cluster: PgCluster
    env: dict[str, str]
    scripts: Path
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    machine = _machine()
    print(f"machine: {machine.line()}", flush=True)
    peers.ensure_installed()
    cluster = PgCluster.start()
    scripts = Path(tempfile.mkdtemp(prefix="cacheproxy-bench-"))
    stoppers: list[Callable[[], None]] = [functools.partial(shutil.rmtree, scripts, ignore_errors=True)]
    try:
        bench = Bench(args, cluster, cluster.env(), scripts)
        machine = _machine(_server_version(cluster))
        print(f"pgbench -i -s {args.scale} ...", flush=True)
        _pgbench(bench.env, ["-i", "-q", "-s", str(args.scale), "-p", str(cluster.port)], check=True)
        _write_scripts(bench.scripts, args.scale)
        targets = _start_targets(bench, stoppers)
        _hot_and_single(bench, targets)
        _expensive(bench, targets["direct"], targets["cacheproxy hits"])
        _mix(bench, targets)
        _misses(bench, targets)
        _connects(bench, targets)
        if args.workers:
            from bench.workers import compare  # (bench.workers builds on this module)

            compare(bench, args.workers, stoppers)
        _memory_notes(bench, targets)
        if args.profile:
            _profile(bench, targets["cacheproxy hits"], Path(args.profile))
        report = Report(machine, _settings(args), summarize(bench.runs), bench.notes)
        _write_results(report, Path(args.out), "quick" if args.quick else "latest")
    finally:
        for stop in reversed(stoppers):
            stop()
        cluster.cleanup()
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 2 s runs, short warm-ups")
    parser.add_argument("--seconds", type=int, default=5, help="length of a 16-client run")
    parser.add_argument("--single-seconds", type=int, default=3, help="length of a single-client run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument(
        "--mix-mode", choices=MODES, default="prepared", help="pgbench -M of the expensive and mix runs"
    )
    parser.add_argument("--out", default="bench/results", help="where latest.md and latest.csv go")
    parser.add_argument("--profile", metavar="DIR", help="also profile the hit path with py-spy into DIR")
    parser.add_argument(
        "--workers", type=int, default=0, metavar="N", help="also compare cacheproxy with 1 and N worker processes"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.single_seconds = 1, 2, 2
    return args


# ---- targets -----------------------------------------------------------------------------------------------------


def _start_targets(bench: Bench, stoppers: list[Callable[[], None]]) -> dict[str, Target]:
    cluster = bench.cluster
    targets = {"direct": Target("direct", cluster.port)}
    proxies = {
        "cacheproxy hits": _proxy_config(cache=True, ttl="1h", strategy=None),
        "cacheproxy off": _proxy_config(cache=False, ttl="1h", strategy=None),
        "cacheproxy misses": _proxy_config(cache=True, ttl="1h", strategy=None),
        "cacheproxy lazy": _proxy_config(cache=True, ttl="60", strategy="lazy"),
        "cacheproxy write_through": _proxy_config(cache=True, ttl="60", strategy="write_through"),
    }
    for name, config_text in proxies.items():
        config = bench.scripts / f"{name.split()[1]}.yaml"
        config.write_text(config_text)
        port, admin = free_port(), free_port()
        proc = start_proxy_process(
            ["--config", str(config), "--upstream", cluster.url(), "--admin-listen", f"127.0.0.1:{admin}",
             "--log-level", "warning"], port)  # fmt: skip
        stoppers.append(functools.partial(_stop_proxy, proc))
        targets[name] = Target(name, port, proc.pid, rss=True, counters=_admin_counters(admin))
    bouncer = peers.start_pgbouncer(free_port(), cluster.port, [PgCluster.SUPERUSER])
    stoppers.append(bouncer.stop)
    targets["pgbouncer"] = Target("pgbouncer", bouncer.port, bouncer.proc.pid, rss=True)
    pool = peers.start_pgpool(free_port(), cluster.port, children=max(32, bench.args.clients * 2))
    stoppers.append(pool.stop)
    env = bench.env
    targets["pgpool cache"] = Target(
        "pgpool cache", pool.port, pool.proc.pid, counters=lambda: _pgpool_counters(env, pool.port)
    )
    return targets


def _proxy_config(*, cache: bool, ttl: str, strategy: str | None) -> str:
    text = f"cache:\n  enabled: {'true' if cache else 'false'}\n  max_memory: {MAX_MEMORY}\n  default_ttl: {ttl}\n"
    # A proxy whose target is idle for a while (the other sections run) keeps its connections and entries.
    text += "invalidation:\n  idle_release: null\n"
    if strategy is not None:
        text += f"rules:\n  - tables: [pgbench_accounts]\n    ttl: {ttl}\n    strategy: {strategy}\n"
    return text


def _stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _admin_counters(admin_port: int) -> Callable[[], tuple[int, int] | None]:
    def read() -> tuple[int, int] | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=10) as response:
            stats = orjson.loads(response.read())
        hits, misses = int(stats["cache"]["hits"]), int(stats["cache"]["misses"])
        return (hits, hits + misses) if hits + misses else None

    return read


def _pgpool_counters(env: dict[str, str], port: int) -> tuple[int, int]:
    return peers.pgpool_cache_counters(env, port)


# ---- sections ----------------------------------------------------------------------------------------------------


def _hot_and_single(bench: Bench, targets: dict[str, Target]) -> None:
    args = bench.args
    hot = [targets[name] for name in ("direct", "pgbouncer", "pgpool cache", "cacheproxy hits", "cacheproxy off")]
    hot_script = ["-f", str(bench.scripts / "hot.sql")]
    for mode in MODES:  # every hot key once in each mode, for cacheproxy and Pgpool-II alike
        for warm in (targets["cacheproxy hits"], targets["pgpool cache"]):
            _warm_up(bench, warm, mode, hot_script, HOT_KEYS)
    for round_no in range(1, args.rounds + 1):
        for mode in MODES:
            for target in hot:
                run = _measure(bench, "hot", target, mode, hot_script, args.clients, args.seconds)
                _show(round_no, run)
    for round_no in range(1, args.rounds + 1):
        for mode in MODES:
            for target in hot:
                run = _measure(bench, "single", target, mode, hot_script, 1, args.single_seconds, per_txn=True)
                _show(round_no, run)
    pgpool = [r.hit_ratio for r in bench.runs if r.target == "pgpool cache" and r.hit_ratio is not None]
    if pgpool:
        bench.notes.append(
            f"Pgpool-II served {min(pgpool):.1%}-{max(pgpool):.1%} of the measured SELECTs from its cache "
            "(SHOW POOL_CACHE over each run: num_cache_hits / (num_cache_hits + num_selects))."
        )


def _expensive(bench: Bench, direct: Target, hits: Target) -> None:
    args, script = bench.args, ["-f", str(bench.scripts / "expensive.sql")]
    out = _pgbench(bench.env, ["-n", "-p", str(direct.port), "-M", args.mix_mode, "-c", "1", "-t", "30", *script])
    direct_ms = _parse_latency(out)
    verdict = "" if direct_ms >= EXPENSIVE_MIN_MS else f" (below the {EXPENSIVE_MIN_MS:g} ms asked for)"
    bench.notes.append(f"The expensive read takes {direct_ms:.2f} ms directly (one client, mean of 30){verdict}.")
    print(f"expensive read, direct, one client: {direct_ms:.2f} ms", flush=True)
    _warm_up(bench, hits, args.mix_mode, script, EXPENSIVE_KEYS)
    for round_no in range(1, args.rounds + 1):
        for target in (direct, hits):
            _show(round_no, _measure(bench, "expensive", target, args.mix_mode, script, args.clients, args.seconds))


def _mix(bench: Bench, targets: dict[str, Target]) -> None:
    args = bench.args
    script = ["-f", f"{bench.scripts / 'hot.sql'}@9", "-f", f"{bench.scripts / 'write.sql'}@1"]
    names = ("direct", "cacheproxy off", "cacheproxy lazy", "cacheproxy write_through")
    mixed = [targets[name] for name in names]
    for mode in MODES:
        for target in mixed[2:]:  # reach the steady state of fills and invalidations before measuring
            _pgbench(bench.env, _run_args(target.port, mode, args.clients, args.seconds, script))
    for round_no in range(1, args.rounds + 1):
        for mode in MODES:
            for target in mixed:
                _show(round_no, _measure(bench, "mix", target, mode, script, args.clients, args.seconds))


def _misses(bench: Bench, targets: dict[str, Target]) -> None:
    """Pass-through where it costs most: every read a miss (the cache on) or relayed (the cache off)."""
    args = bench.args
    script = ["-f", str(bench.scripts / "miss.sql")]
    many = [targets[name] for name in ("direct", "pgbouncer", "cacheproxy misses", "cacheproxy off")]
    for round_no in range(1, args.rounds + 1):
        for mode in MODES:
            for target in many:
                _show(round_no, _measure(bench, "miss", target, mode, script, args.clients, args.seconds))
    single = [targets[name] for name in ("direct", "cacheproxy misses", "cacheproxy off")]
    for round_no in range(1, args.rounds + 1):
        for mode in MODES:
            for target in single:
                run = _measure(bench, "single-miss", target, mode, script, 1, args.single_seconds, per_txn=True)
                _show(round_no, run)
    paced = [targets["direct"], targets["cacheproxy misses"]]
    for round_no in range(1, args.rounds + 1):
        for mode in MODES:
            for target in paced:
                run = _measure(bench, "paced-miss", target, mode, script, args.clients, args.seconds, PACED_TPS)
                _show(round_no, run)
    bench.notes.append(
        f"paced-miss runs are limited to {PACED_TPS} TPS (pgbench -R): PostgreSQL's CPU per query is compared at "
        "one rate, since a backend that idles between queries spends more per query waking up (at 3.5k TPS "
        "direct, 2.5x its CPU per query at 30k TPS)."
    )


def _connects(bench: Bench, targets: dict[str, Target]) -> None:
    """psycopg's connect + SELECT 1 + close, one after another: the median of each batch, targets interleaved."""
    count = 50 if bench.args.quick else CONNECTS
    names = ("direct", "pgbouncer", "cacheproxy hits", "cacheproxy off")
    for round_no in range(1, bench.args.rounds + 1):
        for name in names:
            _show(round_no, _record(bench, _connect_run(bench, targets[name], count)))


def _connect_run(bench: Bench, target: Target, count: int) -> Run:
    import psycopg  # (a test dependency, as the drivers the benchmark starts are)

    pg_before, proxy_before = _pg_cpu(bench.cluster), _proxy_cpu(target)
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(count):
        began = time.perf_counter()
        connection = psycopg.connect(
            host="127.0.0.1", port=target.port, user=PgCluster.SUPERUSER, dbname="postgres", sslmode="disable"
        )
        connection.execute("SELECT 1").fetchone()
        connection.close()
        times.append((time.perf_counter() - began) * 1000)
    elapsed = time.perf_counter() - started
    time.sleep(SETTLE_SECONDS)
    median = percentile(times, 50)
    return Run(
        "connect", "simple", target.name, 1, count / elapsed, median, _pg_cpu(bench.cluster) - pg_before,
        _proxy_cpu(target) - proxy_before, 0.0, median, percentile(times, 99), transactions=count,
    )  # fmt: skip


def _memory_notes(bench: Bench, targets: dict[str, Target]) -> None:
    for name in ("cacheproxy hits", "cacheproxy off"):
        target = targets[name]
        rss = rss_bytes(target.pid) if target.pid else None
        if rss is not None:
            bench.notes.append(f"{name}: RSS {rss / 2**20:.0f} MiB at the end (cache.max_memory {MAX_MEMORY}).")


def _warm_up(bench: Bench, target: Target, mode: str, script: list[str], keys: int) -> None:
    """Send each of `keys` random keys about 12 times over, so that every key is almost surely seen (missing
    one has probability keys * e^-12); --quick settles for 2 s."""
    args = bench.args
    print(f"warm-up: {target.name} {mode}", flush=True)
    if args.quick:
        run = _run_args(target.port, mode, args.clients, 2, script)
    else:
        per_client = -(-keys * 12 // args.clients)
        run = ["-n", "-p", str(target.port), "-M", mode, "-c", str(args.clients), "-j", "2",
               "-t", str(per_client), *script]  # fmt: skip
    _pgbench(bench.env, run, check=True)


# ---- one measured run --------------------------------------------------------------------------------------------


def _measure(
    bench: Bench,
    section: str,
    target: Target,
    mode: str,
    script: list[str],
    clients: int,
    seconds: int,
    rate: int | None = None,
    per_txn: bool = False,
) -> Run:
    counters_before = target.counters()
    pg_before, proxy_before, pgbench_before = _pg_cpu(bench.cluster), _proxy_cpu(target), _children_cpu()
    run_args = _run_args(target.port, mode, clients, seconds, script)
    if rate is not None:
        run_args += ["-R", str(rate)]
    log_dir = Path(tempfile.mkdtemp(dir=bench.scripts)) if per_txn else None
    if log_dir is not None:
        run_args += ["-l", f"--log-prefix={log_dir / 'txn'}"]
    out = _pgbench(bench.env, run_args)
    time.sleep(SETTLE_SECONDS)
    pg_cpu, proxy_cpu = _pg_cpu(bench.cluster) - pg_before, _proxy_cpu(target) - proxy_before
    pgbench_cpu = _children_cpu() - pgbench_before
    counters_after = target.counters()
    transactions = _parse_transactions(out)
    if transactions == 0 and "number of failed transactions: 0" in out:
        # No transaction completed within the run (every client held longer than it, as on a starved machine):
        # recorded as 0 TPS and said, rather than ending the suite.
        print(f"  no transaction completed: {section} {mode} {target.name}", flush=True)
        bench.notes.append(f"{section} {mode} {target.name}: a run completed no transaction (0 TPS recorded).")
        tps, latency = 0.0, float(seconds * 1000)
    else:
        tps, latency = _parse_tps(out), _parse_latency(out)
    p50 = p99 = None
    if log_dir is not None:
        latencies = [ms for log in sorted(log_dir.iterdir()) for ms in latencies_from_log(log.open())]
        if latencies:
            p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        shutil.rmtree(log_dir, ignore_errors=True)
    return _record(bench, Run(
        section, mode, target.name, clients, tps, latency, pg_cpu, proxy_cpu, pgbench_cpu, p50, p99,
        _ratio(counters_before, counters_after), rss_bytes(target.pid) if target.rss and target.pid else None,
        transactions,
    ))  # fmt: skip


def _record(bench: Bench, run: Run) -> Run:
    bench.runs.append(run)
    return run


def _ratio(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if after is None:
        return None
    hits, lookups = after[0] - (before[0] if before else 0), after[1] - (before[1] if before else 0)
    return hits / lookups if lookups > 0 else None


def _run_args(port: int, mode: str, clients: int, seconds: int, script: list[str]) -> list[str]:
    jobs = min(clients, os.cpu_count() or 1)
    return ["-n", "-p", str(port), "-M", mode, "-c", str(clients), "-j", str(jobs), "-T", str(seconds), *script]


def _show(round_no: int, run: Run) -> None:
    extra = f"  p50 {run.p50_ms:.3f} ms p99 {run.p99_ms:.3f} ms" if run.p50_ms is not None and run.p99_ms else ""
    hit = f"  hits {run.hit_ratio:.1%}" if run.hit_ratio is not None else ""
    print(f"  round {round_no} {run.section:<9} {run.mode:<9} {run.target:<25} {run.tps:>9.0f} tps{extra}{hit}",
          flush=True)  # fmt: skip


def _pg_cpu(cluster: PgCluster) -> float:
    return tree_cpu(int((cluster.datadir / "postmaster.pid").read_text().split()[0]))


def _proxy_cpu(target: Target) -> float:
    return tree_cpu(target.pid) if target.pid is not None else 0.0


def _children_cpu() -> float:
    """CPU seconds of every child we have waited for: between two reads, the pgbench run in between."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pgbench(env: dict[str, str], args: list[str], check: bool = False) -> str:
    result = subprocess.run(["pgbench", "-h", "127.0.0.1", *args, "postgres"], env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"pgbench failed: {result.stderr}")
    return result.stdout + result.stderr


def _parse_tps(out: str) -> float:
    tps = re.search(r"tps = ([\d.]+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if not tps or (failed and failed.group(1) != "0"):
        raise SystemExit(f"pgbench run failed:\n{out}")
    return float(tps.group(1))


def _parse_transactions(out: str) -> int:
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    return int(done.group(1)) if done else 0


def _parse_latency(out: str) -> float:
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    if not latency:
        raise SystemExit(f"pgbench printed no latency:\n{out}")
    return float(latency.group(1))


def _write_scripts(scripts: Path, scale: int) -> None:
    (scripts / "hot.sql").write_text(HOT_SCRIPT)
    (scripts / "write.sql").write_text(WRITE_SCRIPT)
    (scripts / "miss.sql").write_text(MISS_SCRIPT.format(accounts=100_000 * scale))
    (scripts / "expensive.sql").write_text(EXPENSIVE_SCRIPT)


# ---- profile -----------------------------------------------------------------------------------------------------


def _profile(bench: Bench, hits: Target, out_dir: Path) -> None:
    """py-spy samples the hit-serving proxy while pgbench runs the hot script, once per mode."""
    py_spy = shutil.which("py-spy")
    if py_spy is None or hits.pid is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = max(bench.args.seconds, 5)
    sections = []
    for mode in MODES:
        raw = out_dir / f"profile_{mode}.txt"
        # Refill first: by now the mix proxies' writes have reached this proxy through the invalidation bus.
        _warm_up(bench, hits, mode, ["-f", str(bench.scripts / "hot.sql")], HOT_KEYS)
        print(f"profiling cacheproxy hits, {mode} ...", flush=True)
        # --native shows the C frames too: how much of the time is the send()/recv() system calls themselves.
        record = ["record", "-p", str(hits.pid), "-d", str(seconds + 1), "-r", "200", "--native", "-f", "raw"]
        spy = subprocess.Popen([py_spy, *record, "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        out = _pgbench(
            bench.env, _run_args(hits.port, mode, bench.args.clients, seconds, ["-f", str(bench.scripts / "hot.sql")])
        )
        spy.wait(timeout=60)
        tps = _parse_tps(out)
        sections.append(f"## {mode} ({tps:,.0f} TPS while sampled)\n\n{_top_table(raw)}\n")
    (out_dir / "profile_top.md").write_text("\n".join(sections))


def _python_leaf(collapsed_line: str) -> bool:
    leaf = collapsed_line.rpartition(" ")[0].rsplit(";", 1)[-1]
    return ".py:" in leaf or leaf.endswith(".py)")


def _top_table(raw: Path) -> str:
    collapsed = raw.read_text().splitlines()
    lines = ["| self % | total % | function |", "|---|---|---|"]
    lines += [f"| {own:.1f} | {total:.1f} | `{frame}` |" for frame, own, total in top_frames(collapsed, 15)]
    # py-spy stops the process at system-call boundaries, so a native profile puts most samples in write();
    # perf, which samples CPU cycles, shows the interpreter's share is larger. The Python-only table
    # (samples whose innermost frame is Python code) shows how the interpreter's time divides.
    python_only = [line for line in collapsed if _python_leaf(line)]
    lines += ["", "Samples whose innermost frame is Python code only:", ""]
    lines += ["| self % | total % | function |", "|---|---|---|"]
    lines += [f"| {own:.1f} | {total:.1f} | `{frame}` |" for frame, own, total in top_frames(python_only, 15)]
    lines += ["", "| self % | line (innermost frame of the samples) |", "|---|---|"]
    lines += [f"| {own:.1f} | `{frame}` |" for frame, own in top_lines(collapsed, 10)]
    return "\n".join(lines)


# ---- machine and results -----------------------------------------------------------------------------------------


def _machine(postgres: str = "") -> Machine:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return Machine(
        cores=os.cpu_count() or 0,
        cpu_model=model or platform.processor() or "unknown CPU",
        kernel=platform.release(),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        python=f"Python {platform.python_version()}",
        postgres=postgres,
    )


def _server_version(cluster: PgCluster) -> str:
    return "PostgreSQL " + cluster.psql("SHOW server_version").strip().split()[0]


def _settings(args: argparse.Namespace) -> str:
    return (
        f"pgbench on the same machine, scale {args.scale}; {args.clients} clients (-j {min(args.clients, 2)}) for "
        f"{args.seconds} s, one client for {args.single_seconds} s; expensive read and mix in -M {args.mix_mode}; "
        f"{args.rounds} round(s), targets interleaved, median (min-max); CPU seconds per run; cacheproxy "
        f"cache.max_memory {MAX_MEMORY}, TTL 1h for hits, 60 s rules for the mix."
    )


def _write_results(report: Report, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    markdown, table = render_markdown(report), render_csv(report)
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.csv").write_text(table)
    print()
    print(markdown)
    print(f"written: {out / (stem + '.md')}, {out / (stem + '.csv')}")


if __name__ == "__main__":
    sys.exit(main())
