"""A driver's own test suite (psycopg's) run directly and through cacheproxy: wall time and failures, file by file.

    python3 -m bench.driver_suite --psycopg PATH [--rounds 1] [--files tests/test_cursor.py ...] [--all]

PATH is a checkout of https://github.com/psycopg/psycopg (any directory holding its `tests/`), best at the tag of
the installed psycopg (`git clone --branch 3.3.x ...`); psycopg's tests also need `anyio` (its `test` extra), and
`--site DIR` adds a directory (e.g. one made by `pip install --target DIR anyio`) to their PYTHONPATH. Nothing in
cacheproxy's own test suite needs this.

It starts a private PostgreSQL and two cacheproxy processes (cache on, the default configuration; and cache off),
then runs each test file against direct PostgreSQL and each proxy in turn (PSYCOPG_TEST_DSN), interleaved file by
file and round by round so that the machine's load falls on all three alike, with psycopg's `slow` tests left out
unless `--all` (leak checks that loop over gc.collect(): CPU-bound in the client). Results: the total wall time of
each target, its ratio to direct, per-file times, and every test that fails through a proxy but not directly (a
fidelity bug). bench/results/driver_suite.md gets the tables.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from bench.run import _machine, _stop_proxy
from cacheproxy.demo.pgcluster import PgCluster, free_port
from cacheproxy.demo.proxyprocess import start_proxy_process

# Connections, cursors, COPY, prepared statements, transactions, pipelines, notifications, errors, server-side
# cursors, two-phase commit: what a driver's suite exercises in short sessions and many small queries.
DEFAULT_FILES = (
    "tests/test_connection.py",
    "tests/test_connection_async.py",
    "tests/test_cursor.py",
    "tests/test_cursor_async.py",
    "tests/test_cursor_common.py",
    "tests/test_copy.py",
    "tests/test_copy_async.py",
    "tests/test_prepared.py",
    "tests/test_transaction.py",
    "tests/test_pipeline.py",
    "tests/test_notify.py",
    "tests/test_errors.py",
    "tests/test_concurrency.py",
    "tests/test_cursor_server.py",
    "tests/test_sql.py",
    "tests/test_tpc.py",
)
TARGETS = ("direct", "cacheproxy", "cacheproxy off")
RESULTS = Path(__file__).parent / "results" / "driver_suite.md"


@dataclass
class FileRun:
    seconds: float
    failed: set[str] = field(default_factory=set)
    passed: int = 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    root = Path(args.psycopg).resolve()
    if not (root / "tests" / "conftest.py").is_file():
        raise SystemExit(f"{root} holds no psycopg tests/ (clone https://github.com/psycopg/psycopg)")
    print(f"machine: {_machine().line()}", flush=True)
    cluster = PgCluster.start()
    work = Path(tempfile.mkdtemp(prefix="cacheproxy-driver-suite-"))
    procs = []
    try:
        ports = {"direct": cluster.port}
        for name, cache in (("cacheproxy", True), ("cacheproxy off", False)):
            config = work / f"{'on' if cache else 'off'}.yaml"
            config.write_text(f"cache:\n  enabled: {'true' if cache else 'false'}\n")
            port = free_port()
            options = ["--config", str(config), "--upstream", cluster.url(), "--admin-listen", "off",
                       "--log-level", "warning"]  # fmt: skip
            procs.append(start_proxy_process(options, port))
            ports[name] = port
        runs: dict[str, dict[str, list[FileRun]]] = {t: {f: [] for f in args.files} for t in TARGETS}
        for round_no in range(1, args.rounds + 1):
            for path in args.files:
                for target in TARGETS:
                    run = _run_file(args, root, work, path, cluster.dsn(port=ports[target]))
                    runs[target][path].append(run)
                    print(f"round {round_no} {target:15s} {path:40s} {run.seconds:7.1f} s "
                          f"{run.passed} passed, {len(run.failed)} failed", flush=True)  # fmt: skip
                    for name in sorted(run.failed):
                        print(f"    failed: {name}", flush=True)
    finally:
        for proc in procs:
            _stop_proxy(proc)
        cluster.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    text = _render(args, runs)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench.driver_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--psycopg", required=True, help="a checkout of psycopg's repository (its tests/ is used)")
    parser.add_argument("--site", help="a directory added to the tests' PYTHONPATH (where anyio is installed)")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="test files, relative to --psycopg")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--all", action="store_true", help="include the tests psycopg marks slow")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not write {RESULTS.name}")
    return parser.parse_args(argv)


def _run_file(args: argparse.Namespace, root: Path, work: Path, path: str, dsn: str) -> FileRun:
    report = work / "junit.xml"
    env = {**os.environ, "PSYCOPG_TEST_DSN": dsn}
    if args.site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.site, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-o", f"cache_dir={work / 'pytest-cache'}",
           f"--junitxml={report}", path]  # fmt: skip
    if not args.all:
        cmd += ["-m", "not slow"]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    seconds = time.perf_counter() - started
    run = FileRun(seconds)
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                run.failed.add(name)
            elif case.find("skipped") is None:
                run.passed += 1
        report.unlink()
    return run


def _render(args: argparse.Namespace, runs: dict[str, dict[str, list[FileRun]]]) -> str:
    def total(target: str) -> float:
        return sum(min(r.seconds for r in rs) for rs in runs[target].values())

    direct = total("direct")
    lines = [
        f"# psycopg's test suite, direct and through cacheproxy ({datetime.date.today()})",
        "",
        f"Machine: {_machine().line()}. {len(args.files)} files, {args.rounds} round(s), interleaved file by file"
        f"{'' if args.all else ', psycopg `slow` tests left out'}; per file the fastest round.",
        "",
        "| target | wall s | ratio to direct | passed | failed |",
        "|---|---|---|---|---|",
    ]
    for target in TARGETS:
        passed = sum(rs[-1].passed for rs in runs[target].values())
        failed = sum(len(rs[-1].failed) for rs in runs[target].values())
        lines.append(f"| {target} | {total(target):.1f} | {total(target) / direct:.2f}x | {passed} | {failed} |")
    lines += ["", "| file | " + " | ".join(TARGETS) + " |", "|---|" + "---|" * len(TARGETS)]
    for path in args.files:
        cells = [f"{min(r.seconds for r in runs[t][path]):.1f} s" for t in TARGETS]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    lines += ["", "Failing through a proxy but not directly (last round):", ""]
    only = [
        f"- {target}: {name}"
        for target in TARGETS[1:]
        for path in args.files
        for name in sorted(runs[target][path][-1].failed - runs["direct"][path][-1].failed)
    ]
    lines += only or ["- none"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
