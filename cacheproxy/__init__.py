"""cacheproxy: a caching proxy sidecar for PostgreSQL."""

from cacheproxy import mode as _mode

__version__ = "0.1.0"

# Before any other module of the package is imported: whether its hot path runs compiled (cacheproxy/mode.py).
MODE = _mode.activate()
