"""CACHEPROXY EXPLAIN: why a statement would or would not be served from the cache in a session, as rows."""

from __future__ import annotations

from cacheproxy.catalog.model import Catalog
from cacheproxy.policy.classify import Classified
from cacheproxy.policy.verdict import write_scope


def explain_rows(
    classified: Classified,
    *,
    may_read: bool,
    uncertain: str | None,
    blind: str | None,
    database: str,
    catalog: Catalog | None,
) -> list[tuple[str, str]]:
    """`may_read`: the session's per-statement decision (TransactionTracker.may_read); `uncertain`: why the session
    stopped using the cache, if it did; `blind`: why the database's invalidation feed is down, if it is."""
    info, verdict = classified.info, classified.verdict
    servable = may_read and info.statement_count == 1
    reason = verdict.reason
    if verdict.cacheable and not servable:
        reason = "reads a temporary table of this session" if info.statement_count == 1 else "multiple statements"
    if servable and uncertain is not None:
        servable, reason = False, f"this session's settings are unknown: {uncertain}"
    if servable and blind is not None:
        servable, reason = False, f"database {database} is not served: {blind}"
    rows = [
        ("cacheable", "yes" if servable else "no"),
        ("reason", reason or ("outside a transaction block" if servable else "")),
        ("kind", info.kind.value),
        ("reads", ", ".join(sorted(f"{s}.{n}" if s else n for s, n in info.reads))),
        ("depends_on", ", ".join(sorted(verdict.tables))),
        ("row_level", _row_level(classified)),
        ("statement", classified.statement or ""),  # the fingerprint id a statement rule names it by
        ("rule", verdict.rule),
        ("ttl", f"{verdict.ttl:g}s" if verdict.cacheable else ""),
        ("strategy", verdict.strategy if verdict.cacheable else ""),
    ]
    scope = write_scope(info, catalog)
    if not scope.empty:
        what = "the whole database" if scope.everything else ", ".join(sorted(scope.tables))
        if classified.point is not None and not scope.everything:
            what += f" (only the rows of the {classified.point.column} values it names)"
        rows.append(("invalidates", what))
    return rows


def _row_level(classified: Classified) -> str:
    """Which reads of this statement's tables a write of one row leaves in place."""
    point = classified.point
    if classified.verdict.cacheable and point is not None:
        return f"a point read of {point.table} by {point.column}: only writes of that row drop it"
    if classified.point_tables:
        return f"every write to {', '.join(sorted(classified.point_tables))} drops it (not a point read)"
    return ""
