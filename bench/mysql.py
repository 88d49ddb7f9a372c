"""`python3 -m bench.mysql [--time S] [--threads N]`: sysbench against MariaDB directly and through the proxy.

Starts a private MariaDB (tests/support/mariadb.py), prepares sysbench's tables, then runs oltp_point_select and
oltp_read_write against: the server directly, the proxy with caching off, the proxy with caching on (a cold run,
then a warm one on the same proxy). Prints one line per run (transactions/s, queries/s, p95 latency). Wall-clock
figures: on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import re
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
    args = parser.parse_args(argv)
    server = MariaDB.start()
    try:
        server.create_database("sbtest")
        sysbench("oltp_read_write", server.port, "prepare", 4, 60, [])
        extra = [f"--db-ps-mode={args.ps_mode}"]
        print(f"{'workload':<18}{'target':<16}{'tps':>10}{'qps':>11}{'p95 ms':>9}")
        for test in ("oltp_point_select", "oltp_read_write"):
            outs = [("direct", sysbench(test, server.port, "run", args.threads, args.time, extra))]
            for cache in (False, True):
                config = proxy_config(server.url("sbtest"), cache={"enabled": cache})
                with ProxyThread.from_mapping(config) as proxy:
                    runs = ["cache on, cold", "cache on, warm"] if cache else ["cache off"]
                    outs += [(name, sysbench(test, proxy.port, "run", args.threads, args.time, extra)) for name in runs]
            for name, out in outs:
                print(f"{test:<18}{name:<16}{_figure(_TPS, out):>10.0f}{_figure(_QPS, out):>11.0f}"
                      f"{_figure(_P95, out):>9.2f}", flush=True)  # fmt: skip
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
