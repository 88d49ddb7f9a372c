"""Shadow verification: a sampled share of cache hits re-run against PostgreSQL and compared with what was served.

replay.py builds the re-run (the hit's role and result-changing settings in a read-only transaction that is rolled
back) and splits its reply, compare.py compares two results, both sans-IO; verifier.py is the background worker,
its rate bound, its connections and its metrics.
"""
