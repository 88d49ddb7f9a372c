"""The rule advisor (issue 17): what the proxy saw per statement and table (workload.py), the pure ranking of it into
advice and rules (advisor.py), and the same advice before deployment from pg_stat_statements (upstream.py)."""
