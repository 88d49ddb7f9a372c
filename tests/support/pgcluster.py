"""The test suite's private PostgreSQL: the package's throwaway cluster (cacheproxy.devtools.pgcluster)."""

from cacheproxy.devtools.pgcluster import PgCluster, PgClusterError, quote_ident

__all__ = ["PgCluster", "PgClusterError", "quote_ident"]
