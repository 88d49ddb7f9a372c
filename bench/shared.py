"""Benchmark of the shared tier (cache.shared on Redis / Valkey): four sidecars in front of one PostgreSQL.

    python3 -m bench.shared                   # about 2 minutes
    python3 -m bench.shared --quick           # a smoke run (about 40 s)
    python3 -m bench.shared --fresh-seconds 30 --seconds 10 --keys 10000

It starts a private PostgreSQL (`pgbench -i`), a private redis-server, and cacheproxy processes, all on 127.0.0.1:
1. read-heavy: pgbench on four sidecars at once (`--transactions` reads per client of `--keys` hot accounts,
   -M prepared), without the shared tier, then with it: the queries that reached PostgreSQL (pg_stat_statements),
   and the time the same work took.
2. a fresh sidecar, started after that run, alone for `--fresh-seconds`: its hit rate (1 - queries that reached
   PostgreSQL / transactions), without and with the shared tier (warm from step 1).
3. latency of one read, from one client (psycopg, the same query text): direct to PostgreSQL, through a sidecar on
   a miss of both tiers, on a shared-tier hit (a fresh sidecar's first read), and on an in-process hit.
4. the cross-sidecar staleness window of `consistency: bounded` (the invalidation bus delay): a write through one
   sidecar, then reads through another until they return it; and the same under `strict`, where it must be zero.
Results go to bench/results/shared.md (shared-quick.md for --quick). A benchmark, not a test: nothing here asserts a
speed. On a shared 2-core machine the absolute figures are noisy; the ratios are the point.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from cacheproxy.demo.pgcluster import PgCluster, free_port
from cacheproxy.demo.proxyprocess import start_proxy_process
from tests.support.redisserver import RedisServer

READ = "SELECT abalance FROM pgbench_accounts WHERE aid = "
SIDECARS = 4


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cluster = PgCluster.start()
    workdir = Path(tempfile.mkdtemp(prefix="cacheproxy-bench-shared-"))
    tier = RedisServer(workdir / "redis").start()
    lines: list[str] = []
    try:
        _pgbench(cluster, ["-i", "-q", "-s", str(args.scale)])
        script = workdir / "hot.sql"
        script.write_text(f"\\set aid random(1, {args.keys})\n{READ}:aid;\n")
        lines += _read_heavy(args, cluster, tier, workdir, script)
        lines += _latency(args, cluster, tier, workdir)
        lines += _staleness(args, cluster, tier, workdir)
    finally:
        tier.stop()
        cluster.cleanup()
    header = [
        f"# Shared tier benchmark ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"machine: {platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}; "
        f"{SIDECARS} sidecars x {args.clients} pgbench clients x {args.transactions} reads; {args.keys} hot keys; "
        f"fresh sidecar {args.fresh_seconds:g} s; redis-server {tier.version()}",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    out = Path(args.out) / ("shared-quick.md" if args.quick else "shared.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench.shared", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--transactions", type=int, default=2500, help="reads per pgbench client on four sidecars")
    parser.add_argument("--fresh-seconds", type=float, default=30.0, help="the fresh sidecar's measured start")
    parser.add_argument("--keys", type=int, default=10_000, help="hot accounts read")
    parser.add_argument("--clients", type=int, default=4, help="pgbench clients per sidecar")
    parser.add_argument("--scale", type=int, default=1, help="pgbench -i scale")
    parser.add_argument("--samples", type=int, default=400, help="reads per latency figure")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.transactions, args.fresh_seconds, args.keys, args.samples = 300, 3.0, 2000, 150
    return args


# ---- sidecars ------------------------------------------------------------------------------------------------------


@contextmanager
def _sidecars(
    cluster: PgCluster, workdir: Path, count: int, *, shared: str | None, consistency: str = "bounded"
) -> Iterator[list[int]]:
    """`count` cacheproxy processes (their ports); the shared tier at URL `shared`, or none."""
    config = workdir / f"sidecar-{shared is not None}-{consistency}.yaml"
    text = "cache:\n  max_memory: 256MiB\n  default_ttl: 1h\n"
    if shared is not None:
        # (timeout 1s: on this shared 2-core machine an event loop busy with a burst of misses can delay a 0.1 ms
        # reply past the 250 ms default, and the breaker would take the tier away for a while)
        text += f"  shared:\n    url: {shared}\n    consistency: {consistency}\n    timeout: 1s\n"
    config.write_text(text)
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for _ in range(count):
            port = free_port()
            args = ["--config", str(config), "--upstream", cluster.url(), "--admin-listen", "off",
                    "--log-level", "warning"]  # fmt: skip
            procs.append(start_proxy_process(args, port, timeout=90.0))  # (a loaded machine starts Python slowly)
            ports.append(port)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---- 1 and 2: read-heavy on four sidecars, then a fresh one --------------------------------------------------------


def _read_heavy(
    args: argparse.Namespace, cluster: PgCluster, tier: RedisServer, workdir: Path, script: Path
) -> list[str]:
    rows: list[tuple[str, int, int, float, int, float]] = []
    for label, url in (("in-process only", None), ("with the shared tier", tier.url)):
        with _sidecars(cluster, workdir, SIDECARS, shared=url) as ports:
            _reset(cluster)
            started = time.monotonic()
            runs = _pgbench_all(cluster, ports, script, args.clients, None, args.transactions)  # all four at once
            took = time.monotonic() - started
            served = sum(_transactions(run) for run in runs)
            upstream = _upstream_reads(cluster)
            print(f"{label}: {served} reads served in {took:.1f} s, {upstream} reached PostgreSQL", flush=True)
            with _sidecars(cluster, workdir, 1, shared=url) as (fresh,):
                _reset(cluster)
                (run,) = _pgbench_all(cluster, [fresh], script, args.clients, args.fresh_seconds, None)
                fresh_served = _transactions(run)
                fresh_upstream = _upstream_reads(cluster)
            hit_rate = 1 - fresh_upstream / fresh_served if fresh_served else 0.0
            print(f"{label}: fresh sidecar {fresh_served} reads, hit rate {hit_rate:.1%}", flush=True)
            rows.append((label, served, upstream, took, fresh_served, hit_rate))
    lines = [
        f"## Read-heavy, {SIDECARS} sidecars, then a fresh sidecar for its first {args.fresh_seconds:g} s",
        "",
        "| | reads | reached PostgreSQL | share | took (s) | fresh sidecar: reads | fresh sidecar: hit rate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, served, upstream, took, fresh_served, hit_rate in rows:
        share = upstream / served if served else 0.0
        lines.append(
            f"| {label} | {served} | {upstream} | {share:.1%} | {took:.1f} | {fresh_served} | {hit_rate:.1%} |"
        )
    return [*lines, ""]


def _pgbench_all(
    cluster: PgCluster, ports: list[int], script: Path, clients: int, seconds: float | None, transactions: int | None
) -> list[str]:
    """pgbench on every port at once: for `seconds`, or `transactions` per client."""
    length = ["-T", str(max(1, round(seconds)))] if seconds is not None else ["-t", str(transactions)]
    procs = []
    for port in ports:
        command = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-n", "-M", "prepared", "-c", str(clients),
                   "-j", "1", *length, "-f", str(script), "postgres"]  # fmt: skip
        pipe = subprocess.PIPE
        procs.append(subprocess.Popen(command, env=cluster.env(), stdout=pipe, stderr=pipe, text=True))
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=(seconds or 0) + 600)
        if proc.returncode != 0:
            raise SystemExit(f"pgbench failed: {err}")
        outs.append(out)
    return outs


def _transactions(out: str) -> int:
    for line in out.splitlines():
        if line.startswith("number of transactions actually processed:"):
            return int(line.split(":")[1].split("/")[0])
    raise SystemExit(f"pgbench printed no transaction count:\n{out}")


def _reset(cluster: PgCluster) -> None:
    cluster.psql("SELECT pg_stat_statements_reset()")


def _upstream_reads(cluster: PgCluster) -> int:
    out = cluster.psql(f"SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '{READ}%'")
    return int(out.strip())


def _pgbench(cluster: PgCluster, args: list[str]) -> None:
    result = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(cluster.port), *args, "postgres"],
                            env=cluster.env(), capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"pgbench failed: {result.stderr}")


# ---- 3: latency of one read -----------------------------------------------------------------------------------------


def _latency(args: argparse.Namespace, cluster: PgCluster, tier: RedisServer, workdir: Path) -> list[str]:
    n = args.samples
    first = 50_000  # accounts no earlier step read (the hot ones are 1..keys)
    cold = [f"{READ}{first + i}" for i in range(n)]
    figures: dict[str, list[float]] = {}
    with _connect(cluster, cluster.port) as direct:
        figures["direct to PostgreSQL"] = _timed(direct, cold)
    with _sidecars(cluster, workdir, 1, shared=tier.url) as (warm,), _connect(cluster, warm) as conn:
        figures["miss of both tiers (through a sidecar)"] = _timed(conn, cold)
    with _sidecars(cluster, workdir, 1, shared=tier.url) as (fresh,), _connect(cluster, fresh) as conn:
        figures["shared-tier hit (in-process miss)"] = _timed(conn, cold)
        figures["in-process hit"] = _timed(conn, cold)
    lines = [
        f"## Latency of one read (one client, psycopg, {n} distinct keys each, microseconds)",
        "",
        "| | p50 | mean | p90 |",
        "|---|---:|---:|---:|",
    ]
    for label, values in figures.items():
        ordered = sorted(values)
        p50, p90 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.9)]
        lines.append(f"| {label} | {p50:.0f} | {statistics.fmean(values):.0f} | {p90:.0f} |")
    return [*lines, ""]


def _connect(cluster: PgCluster, port: int) -> psycopg.Connection[tuple[object, ...]]:
    conn: psycopg.Connection[tuple[object, ...]] = psycopg.connect(
        cluster.dsn(port=port), autocommit=True, prepare_threshold=None
    )
    return conn


def _timed(conn: psycopg.Connection[tuple[object, ...]], queries: list[str]) -> list[float]:
    times = []
    for sql in queries:
        started = time.perf_counter()
        conn.execute(sql.encode()).fetchall()
        times.append((time.perf_counter() - started) * 1e6)
    return times


# ---- 4: how stale can bounded be -------------------------------------------------------------------------------------


def _staleness(args: argparse.Namespace, cluster: PgCluster, tier: RedisServer, workdir: Path) -> list[str]:
    lines = [
        "## Cross-sidecar staleness after an acknowledged write (write through sidecar A, then read through B)",
        "",
        "| consistency | writes | stale reads seen | window p50 (ms) | window max (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    rounds = 20 if args.quick else 60
    for consistency in ("bounded", "strict"):
        windows: list[float] = []
        stale_reads = 0
        with (
            _sidecars(cluster, workdir, 2, shared=tier.url, consistency=consistency) as (a, b),
            _connect(cluster, a) as writer,
            _connect(cluster, b) as reader,
        ):
            sql = f"{READ}1"
            for value in range(rounds):
                reader.execute(sql).fetchall()  # cached at B
                writer.execute(f"UPDATE pgbench_accounts SET abalance = {value} WHERE aid = 1")
                acked = time.perf_counter()
                while True:  # until B answers the value written: how long after the ack a read may be stale
                    sent = time.perf_counter()
                    row = reader.execute(sql).fetchone()
                    if row is not None and row[0] == value:
                        break
                    stale_reads += 1
                windows.append((sent - acked) * 1000)
        stale_windows = sorted(windows)
        p50 = stale_windows[len(stale_windows) // 2]
        lines.append(f"| {consistency} | {rounds} | {stale_reads} | {p50:.2f} | {max(stale_windows):.2f} |")
        print(lines[-1], flush=True)
    return [*lines, ""]


def _cpus() -> int:
    return os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())
