"""`python3 -m bench.mysql [--time S] [--threads N] [--rounds R]`: sysbench against MariaDB directly and through
the proxy.

Starts a private MariaDB (tests/support/mariadb.py), prepares sysbench's tables, then runs oltp_point_select,
oltp_read_write, and oltp_read_write at READ COMMITTED (bench/sysbench/oltp_read_write_rc.lua: each connection sets
its level, so the proxy may serve a transaction's reads before its first write) against: the server directly, the
proxy with caching off, the proxy with caching on (a cold run first, not reported). The three targets run in turn,
`--rounds` times; each line is the median of its rounds (transactions/s, queries/s, p95 latency), with the load
average. Wall-clock figures: on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.mariadb import PASSWORD, USER, MariaDB  # noqa: E402
from tests.support.proxy import ProxyThread, proxy_config  # noqa: E402

_TPS = re.compile(r"transactions:\s+\d+\s+\((?P<v>[\d.]+) per sec")
_QPS = re.compile(r"queries:\s+\d+\s+\((?P<v>[\d.]+) per sec")
_P95 = re.compile(r"95th percentile:\s+(?P<v>[\d.]+)")
_RC_SCRIPT = str(Path(__file__).resolve().parent / "sysbench" / "oltp_read_write_rc.lua")
_TESTS = {"oltp_point_select": "oltp_point_select", "oltp_read_write": "oltp_read_write",
          "read_write (RC)": _RC_SCRIPT}  # fmt: skip


def sysbench(test: str, port: int, action: str, threads: int, seconds: int, extra: list[str]) -> str:
    args = ["sysbench", test, "--db-driver=mysql", "--mysql-host=127.0.0.1", f"--mysql-port={port}",
            f"--mysql-user={USER}", f"--mysql-password={PASSWORD}", "--mysql-db=sbtest", "--mysql-ssl=off",
            "--tables=4", "--table-size=10000", f"--threads={threads}", f"--time={seconds}",
            *extra, action]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 300)
    if done.returncode != 0:
        raise RuntimeError(f"sysbench {test} {action} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def _figure(pattern: re.Pattern[str], text: str) -> float:
    match = pattern.search(text)
    return float(match.group("v")) if match else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.mysql")
    parser.add_argument("--time", type=int, default=20, help="seconds per run (default 20)")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--ps-mode", default="auto", choices=["auto", "disable"], help="sysbench --db-ps-mode")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each target, interleaved (default 3)")
    args = parser.parse_args(argv)
    server = MariaDB.start()
    try:
        server.create_database("sbtest")
        sysbench("oltp_read_write", server.port, "prepare", 4, 60, [])
        extra = [f"--db-ps-mode={args.ps_mode}"]
        print(f"{'workload':<18}{'target':<16}{'tps':>10}{'qps':>11}{'p95 ms':>9}  load")
        for name, test in _TESTS.items():
            off = ProxyThread.from_mapping(proxy_config(server.url("sbtest"), cache={"enabled": False})).start()
            on = ProxyThread.from_mapping(proxy_config(server.url("sbtest"), cache={"enabled": True})).start()
            try:
                sysbench(test, on.port, "run", args.threads, args.time, extra)  # cold: fills the cache
                targets = {"direct": server.port, "cache off": off.port, "cache on, warm": on.port}
                runs: dict[str, list[str]] = {target: [] for target in targets}
                loads: list[float] = []
                for _ in range(args.rounds):
                    for target, port in targets.items():
                        runs[target].append(sysbench(test, port, "run", args.threads, args.time, extra))
                        loads.append(os.getloadavg()[0])
            finally:
                off.stop()
                on.stop()
            for target, outs in runs.items():
                tps, qps, p95 = (statistics.median(_figure(p, out) for out in outs) for p in (_TPS, _QPS, _P95))
                print(f"{name:<18}{target:<16}{tps:>10.0f}{qps:>11.0f}{p95:>9.2f}  {min(loads):.1f}-{max(loads):.1f}",
                      flush=True)  # fmt: skip
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
