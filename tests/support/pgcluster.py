"""The test suite's private PostgreSQL: the package's throwaway cluster (cacheproxy.demo.pgcluster)."""

from cacheproxy.demo.pgcluster import PgCluster, PgClusterError, quote_ident

__all__ = ["PgCluster", "PgClusterError", "quote_ident"]
