"""Tools for trying cacheproxy out and testing it: a throwaway local PostgreSQL (used by `cacheproxy demo`)."""
