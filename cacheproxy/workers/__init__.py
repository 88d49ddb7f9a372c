"""Several worker processes serving one listen address, with one cache and invalidation (see supervisor.py)."""
