"""Caching policy: per-table rules (TTL, strategy) and the verdict on whether one query's result may be cached."""
