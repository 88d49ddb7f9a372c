"""cacheproxy: a caching proxy sidecar for PostgreSQL."""

__version__ = "0.1.0"
