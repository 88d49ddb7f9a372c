"""The `cacheproxy` command line: run, check-config, demo, advise, snapshot inspect."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable

from cacheproxy import __version__
from cacheproxy.config import Config, ConfigError, load_config, render_config
from cacheproxy.observability import logs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheproxy", description="A caching proxy sidecar for PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"cacheproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the proxy"),
        ("check-config", "validate the configuration and print it with secrets masked"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", "-c", help="YAML configuration file")
        sub.add_argument("--listen", help='client listen address, "host:port" (overrides the file)')
        sub.add_argument("--upstream", help="upstream postgres:// URL (overrides the file and CACHEPROXY_UPSTREAM)")
        sub.add_argument("--admin-listen", help='admin HTTP address, "host:port" or "off"')
        sub.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
        sub.add_argument("--log-format", choices=["text", "json"])
    demo = commands.add_parser("demo", help="start a throwaway PostgreSQL and the proxy, run a short workload")
    demo.add_argument("--queries", type=int, default=2000, help="queries per target (default 2000)")
    demo.add_argument("--config", "-c", help="YAML configuration for the proxy (rules, cache)")
    advise = commands.add_parser(
        "advise", help="suggest caching rules from the database's pg_stat_statements, before deploying the proxy"
    )
    advise.add_argument("--upstream", help="the database as a postgres:// URL (default: CACHEPROXY_UPSTREAM)")
    advise.add_argument("--json", action="store_true", help="print the advice as JSON (as GET /advice does)")
    snapshot = commands.add_parser("snapshot", help="snapshot files").add_subparsers(dest="action", required=True)
    inspect = snapshot.add_parser("inspect", help="show a snapshot's header, entries per table, sizes and validity")
    inspect.add_argument("path", help="the snapshot file")
    return parser


def _load(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        env=os.environ,
        listen=args.listen,
        upstream=args.upstream,
        admin_listen=args.admin_listen,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from cacheproxy.demo.run import run_demo

        return run_demo(args.queries, args.config)
    if args.command == "snapshot":
        return _inspect_snapshot(args.path)
    if args.command == "advise":
        from cacheproxy.advice.cli import advise_command

        return advise_command(args.upstream or os.environ.get("CACHEPROXY_UPSTREAM"), json_output=args.json)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"cacheproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        sys.stdout.write(render_config(config))
        return 0
    logs.configure(config.logging.level, config.logging.format)
    return _run(config, lambda: _load(args))


def _inspect_snapshot(path: str) -> int:
    """Exit status 0 for a whole, valid file, 1 for a damaged one, 2 when it cannot be read at all."""
    from cacheproxy.snapshot.report import inspect_snapshot

    try:
        valid, report = inspect_snapshot(path)
    except OSError as exc:
        print(f"cacheproxy: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(report)
    return 0 if valid else 1


def _run(config: Config, load_config: Callable[[], Config]) -> int:
    workers = config.server.worker_count(os.cpu_count())
    if workers > 1:
        from cacheproxy.workers.supervisor import run_supervisor

        return run_supervisor(config, load_config, workers)
    from cacheproxy.app import App, new_event_loop

    async def serve() -> None:
        await App(config, load_config).run()

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(serve())
    except OSError as exc:
        logging.getLogger("cacheproxy").error("cannot start: %s", exc)
        return 1
    return 0
