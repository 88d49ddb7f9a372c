"""The advice as the admin side shows it: plain dicts (GET /advice, a status page) and rows (CACHEPROXY SHOW ADVICE)."""

from __future__ import annotations

from cacheproxy.advice.advisor import Advice, advise
from cacheproxy.advice.workload import Workload

CONSOLE_COLUMNS = ["kind", "name", "database", "reads", "writes", "hit_ratio", "mean_ms", "upstream_s", "saved_s",
                   "would_save_s", "advice"]  # fmt: skip


def current_advice(workload: Workload, now: float) -> dict[str, object]:
    """The advice for what `workload` recorded up to `now` (the proxy's monotonic clock), as JSON-able dicts."""
    return advise(workload.observed(now)).as_dict()


def console_rows(advice: Advice) -> list[list[str | None]]:
    """Statements, then tables, ranked; then one row whose `advice` is the suggested rules as YAML."""
    rows: list[list[str | None]] = []
    for s in advice.statements:
        rows.append(["statement", f"{s.id} {s.text[:200]}", s.database, str(s.calls), None, _ratio(s.hit_ratio),
                     f"{s.mean_ms:.3f}", f"{s.upstream_s:.3f}", f"{s.saved_s:.3f}", f"{s.would_save_s:.3f}",
                     s.advice])  # fmt: skip
    for t in advice.tables:
        rows.append(["table", t.table, t.database, str(t.reads), str(t.writes), _ratio(t.hit_ratio), None,
                     f"{t.upstream_s:.3f}", f"{t.saved_s:.3f}", f"{t.would_save_s:.3f}", t.advice])  # fmt: skip
    for note in advice.notes:
        rows.append(["note", None, None, None, None, None, None, None, None, None, note])
    rows.append(["rules", f"over {advice.seconds:.0f} s", None, None, None, None, None, None, None, None,
                 advice.yaml()])  # fmt: skip
    return rows


def _ratio(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"
