"""CatalogLoader.fresh: the dict the request path reads instead of calling `get` (no database needed)."""

from __future__ import annotations

from cacheproxy.catalog.model import Catalog, Relation
from cacheproxy.config import build_config
from cacheproxy.feeds.catalog_loader import CatalogLoader


def _loader() -> CatalogLoader:
    config = build_config({"listen": "127.0.0.1:0", "upstream": "postgresql://u@127.0.0.1:1/db"})
    return CatalogLoader(config.upstream)


def test_fresh_is_what_get_answers_through_install_and_ddl() -> None:
    loader = _loader()
    catalog = Catalog.build("db", 1, [Relation("public", "t", "r", False)], [], [], [])
    assert loader.get("db") is None and "db" not in loader.fresh
    loader.install("db", catalog)
    assert loader.get("db") is catalog and loader.fresh == {"db": catalog}
    loader.mark_stale("db")  # DDL went through: nothing decides with the old catalog until a reload
    assert loader.get("db") is None and "db" not in loader.fresh
    assert loader.last_known("db") is catalog  # (invalidation still uses it)
    newer = Catalog.build("db", 2, [Relation("public", "t", "r", False)], [], [], [])
    loader.install("db", newer)
    assert loader.get("db") is newer and loader.fresh == {"db": newer}
