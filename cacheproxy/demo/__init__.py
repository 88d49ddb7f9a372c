"""`cacheproxy demo`: the workload (run.py), the throwaway local PostgreSQL it starts (pgcluster.py, which the test
suite and the benchmarks in bench/ reuse) and the proxy as a subprocess (proxyprocess.py)."""
