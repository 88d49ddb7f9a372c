"""The benchmarks (not shipped in the package): `python3 -m bench` runs the suite (run.py) against PgBouncer and
Pgpool-II (peers.py), measuring with procstat.py and reporting with report.py; `python3 -m bench.snapshot` times a
snapshot of a large cache. Results go to bench/results/."""
