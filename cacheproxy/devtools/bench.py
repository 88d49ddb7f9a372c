"""Benchmark: pgbench against direct PostgreSQL, cacheproxy with its cache off, and cacheproxy at 100% hits.

    python -m cacheproxy.devtools.bench [--seconds 5] [--rounds 3] [--clients 16] [--scale 10]

It starts a private PostgreSQL (`pgbench -i`), two proxies as subprocesses (cache on, cache off), warms the cache,
then runs `pgbench -S`-style reads over a hot set of 10k keys in each protocol mode, interleaving the targets round
by round. It prints medians (min-max) of TPS and mean latency, and the CPU seconds PostgreSQL and the proxy spent in
each run, read from /proc. A benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cacheproxy.devtools.pgcluster import PgCluster, free_port
from cacheproxy.devtools.proxyprocess import start_proxy_process

_HOT_SCRIPT = "\\set aid random(1, 10000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
_MODES = ("simple", "extended", "prepared")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    target: str
    mode: str
    tps: float
    latency_ms: float
    pg_cpu: float
    proxy_cpu: float


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--scale", type=int, default=10)
    args = parser.parse_args(argv)
    print(_machine(), flush=True)
    cluster = PgCluster.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env = cluster.env()
        print(f"pgbench -i -s {args.scale} ...", flush=True)
        _pgbench(env, ["-i", "-q", "-s", str(args.scale), "-p", str(cluster.port)], check=True)
        script = Path(tempfile.mkdtemp()) / "hot.sql"
        script.write_text(_HOT_SCRIPT)
        cached_port, plain_port = free_port(), free_port()
        cached = _start_proxy(cluster, cached_port, cache=True)
        plain = _start_proxy(cluster, plain_port, cache=False)
        procs += [cached, plain]
        targets = {
            "direct": (cluster.port, None),
            "proxy, cache off": (plain_port, plain),
            "proxy, hits": (cached_port, cached),
        }
        for mode in _MODES:  # warm-up: fill the 10k hot keys of each mode
            _bench(env, cached_port, mode, script, args.clients, max(3, args.seconds))
        runs: list[Run] = []
        for round_no in range(1, args.rounds + 1):
            for mode in _MODES:
                for name, (port, proc) in targets.items():
                    pg_before, proxy_before = _pg_cpu(cluster), _proc_cpu(proc)
                    tps, latency = _bench(env, port, mode, script, args.clients, args.seconds)
                    # Backends exit when their clients leave and are then reaped, adding their CPU time to the
                    # postmaster's: let that happen now, so that it counts for this run and not the next.
                    time.sleep(1.0)
                    runs.append(
                        Run(name, mode, tps, latency, _pg_cpu(cluster) - pg_before, _proc_cpu(proc) - proxy_before)
                    )
                    print(f"  round {round_no} {mode:<9} {name:<17} {tps:>10.0f} tps", flush=True)
        single = [(name, _bench(env, port, "prepared", script, 1, args.seconds)) for name, (port, _) in targets.items()]
        _report(runs, single, args)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        cluster.cleanup()
    return 0


def _machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"machine: {os.cpu_count()} cores, {model or platform.processor()}, {platform.platform()}"


def _start_proxy(cluster: PgCluster, port: int, *, cache: bool) -> subprocess.Popen[bytes]:
    config = Path(tempfile.mkdtemp()) / "bench.yaml"
    config.write_text(f"cache:\n  enabled: {'true' if cache else 'false'}\n  max_memory: 512MiB\n")
    args = ["--config", str(config), "--upstream", cluster.url(), "--admin-listen", "off", "--log-level", "warning"]
    return start_proxy_process(args, port)


def _pgbench(env: dict[str, str], args: list[str], check: bool = False) -> str:
    result = subprocess.run(["pgbench", "-h", "127.0.0.1", *args, "postgres"], env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"pgbench failed: {result.stderr}")
    return result.stdout + result.stderr


def _bench(env: dict[str, str], port: int, mode: str, script: Path, clients: int, seconds: int) -> tuple[float, float]:
    jobs = min(clients, 2)
    out = _pgbench(env, ["-n", "-p", str(port), "-M", mode, "-c", str(clients), "-j", str(jobs), "-T", str(seconds),
                         "-f", str(script)])  # fmt: skip
    tps = re.search(r"tps = ([\d.]+)", out)
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if not tps or not latency or (failed and failed.group(1) != "0"):
        raise SystemExit(f"pgbench run failed:\n{out}")
    return float(tps.group(1)), float(latency.group(1))


def _proc_cpu(proc: subprocess.Popen[bytes] | None) -> float:
    return _cpu_of(proc.pid) if proc is not None else 0.0


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / _CLK_TCK  # incl. reaped children


def _pg_cpu(cluster: PgCluster) -> float:
    """CPU seconds of the postmaster and every live backend (children's time is added as they exit)."""
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    total = _cpu_of(postmaster)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == postmaster:
                total += (int(stat[11]) + int(stat[12])) / _CLK_TCK
    return total


def _report(runs: list[Run], single: list[tuple[str, tuple[float, float]]], args: argparse.Namespace) -> None:
    print()
    print(f"pgbench, hot set of 10k keys, {args.clients} clients, {args.seconds}s x {args.rounds} rounds "
          f"(median, min-max); CPU seconds per run")  # fmt: skip
    print("| mode | target | TPS | latency ms | PostgreSQL CPU s | proxy CPU s |")
    print("|---|---|---|---|---|---|")
    for mode in _MODES:
        for target in ("direct", "proxy, cache off", "proxy, hits"):
            sel = [r for r in runs if r.mode == mode and r.target == target]
            tps = [r.tps for r in sel]
            latency = statistics.median(r.latency_ms for r in sel)
            pg_cpu = statistics.median(r.pg_cpu for r in sel)
            proxy_cpu = statistics.median(r.proxy_cpu for r in sel)
            print(
                f"| {mode} | {target} | {statistics.median(tps):,.0f} ({min(tps):,.0f}-{max(tps):,.0f}) "
                f"| {latency:.3f} | {pg_cpu:.2f} | {proxy_cpu:.2f} |"
            )
    print()
    print("single client, -M prepared: mean latency ms")
    for name, (one_tps, one_latency) in single:
        print(f"  {name:<17} {one_latency:.3f} ms ({one_tps:,.0f} tps)")


if __name__ == "__main__":
    sys.exit(main())
