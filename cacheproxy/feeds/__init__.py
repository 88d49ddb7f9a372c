"""The feeds that keep the cache honest, apart from the request path: the catalog loader, the invalidation bus
(LISTEN/NOTIFY between proxies, catalog poll), the logical replication stream, and their raw-protocol client."""
