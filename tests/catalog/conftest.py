"""One catalog fixture over every backend, as pyiceberg's behaviour suite does it.

Backends: SQLite in memory, SQLite in a file, HBase against ``happybase_mock``,
and HBase against a real Thrift server when ``EVENTINDEX_TEST_HBASE=host:port``
is set. Each HBase test gets its own table prefix, and its tables are dropped
afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from catalog import Catalog, Collection, Dataset, HBaseCatalog, SQLiteCatalog
from eventindex.records.schema import RecordKind

HBASE_ENV = "EVENTINDEX_TEST_HBASE"
HBASE_SKIP_REASON = "set EVENTINDEX_TEST_HBASE=host:port to run against a real HBase"

EVENTS = "data15_13TeV.physics_Main"
AOD = "data15_13TeV.00284484.physics_Main.merge.AOD.r7562_p2521"
DAOD = "data15_13TeV.00284484.physics_Main.merge.DAOD.r7562_p2521_p2667"
OBJECTS = "gaia_dr3"
GAIA = "gaia_dr3.gaia_source"


@dataclass
class Backend:
    """How to open a catalog on one test's storage; ``opened`` are closed at teardown."""

    name: str
    factory: Callable[[], Catalog]
    persistent: bool
    opened: list[Catalog] = field(default_factory=list)

    def open(self) -> Catalog:
        catalog = self.factory()
        self.opened.append(catalog)
        return catalog


def hbase_address() -> tuple[str, int] | None:
    value = os.environ.get(HBASE_ENV)
    if not value:
        return None
    host, _, port = value.rpartition(":")
    return host or "localhost", int(port)


def _unique_prefix() -> str:
    return f"eitest_{uuid.uuid4().hex[:10]}_"


@pytest.fixture(
    params=[
        "sqlite-memory",
        "sqlite-file",
        "hbase-mock",
        pytest.param(
            "hbase-real",
            marks=pytest.mark.skipif(hbase_address() is None, reason=HBASE_SKIP_REASON),
        ),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name: str = request.param
    drop: Callable[[], None] | None = None
    if name == "sqlite-memory":
        backend = Backend(name, lambda: SQLiteCatalog(":memory:"), persistent=False)
    elif name == "sqlite-file":
        path = str(tmp_path / "var" / "catalog.sqlite")
        backend = Backend(name, lambda: SQLiteCatalog(path), persistent=True)
    elif name == "hbase-mock":
        connection = mock_connection()
        prefix = _unique_prefix()

        def open_mock() -> Catalog:
            return HBaseCatalog(connection, table_prefix=prefix)

        def drop_mock() -> None:
            HBaseCatalog(connection, table_prefix=prefix).drop_tables()

        backend, drop = Backend(name, open_mock, persistent=True), drop_mock
    else:
        address = hbase_address()
        assert address is not None
        host, port = address
        prefix = _unique_prefix()

        def open_real() -> Catalog:
            return HBaseCatalog.connect(host, port, table_prefix=prefix)

        def drop_real() -> None:
            HBaseCatalog.connect(host, port, table_prefix=prefix).drop_tables()

        backend, drop = Backend(name, open_real, persistent=True), drop_real
    try:
        yield backend
    finally:
        for catalog in backend.opened:
            catalog.close()
        if drop is not None:
            drop()


def mock_connection() -> Any:
    """The happybase_mock connection: a process-wide singleton, so table
    prefixes are what keep tests apart."""
    import happybase_mock

    return happybase_mock.Connection()


@pytest.fixture
def catalog(backend: Backend) -> Catalog:
    return backend.open()


@pytest.fixture
def populated(catalog: Catalog) -> Catalog:
    return populate(catalog)


@pytest.fixture
def mock_hbase() -> Iterator[HBaseCatalog]:
    """A populated HBase catalog on happybase_mock, for the HBase-only tests."""
    catalog = HBaseCatalog(mock_connection(), table_prefix=_unique_prefix())
    try:
        populate(catalog)
        yield catalog
    finally:
        catalog.drop_tables()


def populate(catalog: Catalog) -> Catalog:
    """Two collections (events and objects) with datasets to register TagFiles in."""
    catalog.create_collection(Collection(EVENTS, RecordKind.EVENTS, "2015 13 TeV physics"))
    catalog.create_collection(Collection(OBJECTS, RecordKind.OBJECTS))
    catalog.create_dataset(Dataset(AOD, EVENTS, format="AOD", processing_tag="r7562_p2521"))
    catalog.create_dataset(
        Dataset(DAOD, EVENTS, format="DAOD", processing_tag="r7562_p2521_p2667", upstream=AOD)
    )
    catalog.create_dataset(Dataset(GAIA, OBJECTS, format="parquet"))
    return catalog
