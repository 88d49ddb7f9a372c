"""`cacheproxy advise`: print the advice read from a database's statistics (upstream.py), as text or JSON."""

from __future__ import annotations

import asyncio
import ssl
import sys

import asyncpg
import orjson

from cacheproxy.advice.advisor import Advice
from cacheproxy.advice.upstream import AdviseError, advise_upstream
from cacheproxy.config import UpstreamConfig


def advise_command(url: str | None, *, json_output: bool = False) -> int:
    """Exit status 0 with advice, 1 when the statistics are missing (the message says how to get them), 2 for
    usage and connection errors."""
    if not url:
        print("cacheproxy advise: give the database with --upstream postgres://... (or CACHEPROXY_UPSTREAM)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        upstream = UpstreamConfig.from_url(url)
    except ValueError as exc:
        print(f"cacheproxy advise: --upstream: {exc}", file=sys.stderr)
        return 2
    try:
        advice = asyncio.run(advise_upstream(upstream))
    except AdviseError as exc:
        print(f"cacheproxy advise: {exc}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, ssl.SSLError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"cacheproxy advise: cannot read {upstream.masked_url()}: {exc}", file=sys.stderr)
        return 2
    if json_output:
        sys.stdout.write(orjson.dumps(advice.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_text(advice))
    return 0


def render_text(advice: Advice) -> str:
    """The advice for a terminal: the ranked statements and tables, then the rules to paste."""
    lines = [f"Statements, by upstream time a cache would save ({advice.seconds:.0f} s of statistics):"]
    if not advice.statements:
        lines.append("  (no reads recorded yet)")
    for s in advice.statements[:10]:
        ratio = f", hit ratio {s.hit_ratio:.0%}" if s.hit_ratio is not None else ""
        lines.append(f"  {s.would_save_s:9.3f} s  {s.id}  {s.calls} runs, {s.mean_ms:.3f} ms each{ratio}: "
                     f"{s.text[:90]}")  # fmt: skip
        lines.append(f"{'':15}{s.advice}")
    lines.append("Tables:")
    for t in advice.tables[:10]:
        lines.append(f"  {t.would_save_s:9.3f} s  {t.table}: {t.reads} reads, {t.writes} writes: {t.advice}")
    lines.extend(f"Note: {note}" for note in advice.notes)
    lines.append("Rules to paste into the configuration (cacheproxy check-config accepts them):")
    return "\n".join(lines) + "\n" + advice.yaml()
