"""The catalog: which collections, datasets and TagFiles exist, and where.

``load_catalog(settings)`` opens the backend named by ``settings.type`` through
the ``CATALOG_LOADERS`` table, as pyiceberg does its catalogs. Backends with
optional drivers import them inside their loader, so importing this package
never needs happybase.
"""

from __future__ import annotations

from collections.abc import Callable

from catalog.base import Catalog
from catalog.hbase import HBaseCatalog
from catalog.model import Collection, Dataset, FileKind, FileState, Key, TagFile, new_file_id
from catalog.rules import SupersededError
from catalog.sqlite import SQLiteCatalog
from eventindex.config import CatalogSettings
from eventindex.errors import ConfigError

CatalogLoader = Callable[[CatalogSettings], Catalog]


def _load_sqlite(settings: CatalogSettings) -> Catalog:
    return SQLiteCatalog(settings.path)


def _load_hbase(settings: CatalogSettings) -> Catalog:
    # from_settings imports happybase; a missing driver raises MissingExtraError there.
    return HBaseCatalog.from_settings(settings.hbase)


CATALOG_LOADERS: dict[str, CatalogLoader] = {
    "sqlite": _load_sqlite,
    "hbase": _load_hbase,
}


def load_catalog(settings: CatalogSettings) -> Catalog:
    """Open the catalog backend that ``settings.type`` names."""
    try:
        loader = CATALOG_LOADERS[settings.type]
    except KeyError:
        known = ", ".join(sorted(CATALOG_LOADERS))
        raise ConfigError(
            f"catalog.type: unknown catalog type {settings.type!r} (known: {known})"
        ) from None
    return loader(settings)


__all__ = [
    "CATALOG_LOADERS",
    "Catalog",
    "CatalogLoader",
    "Collection",
    "Dataset",
    "FileKind",
    "FileState",
    "HBaseCatalog",
    "Key",
    "SQLiteCatalog",
    "SupersededError",
    "TagFile",
    "load_catalog",
    "new_file_id",
]
