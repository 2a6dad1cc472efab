"""Tables for the query-language and scan tests: generated events and chunked objects.

``object_catalog`` writes a small object catalog as CHUNK files (part = chunk id),
the way a spatially partitioned table is registered: six chunks, each one band of
right ascension, so a small cone touches one or two of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from catalog import Collection, Dataset, FileKind, SQLiteCatalog
from catalog.fileset import FilesetWriter
from eventindex.query.sql import compile_query
from eventindex.query.tables import resolve_table
from eventindex.records.schema import RecordKind, object_schema_with
from eventindex.storage import WriteOptions
from tests.generated_store import GeneratedStore

OBJECT_COLLECTION = "sky_sim"
OBJECT_DATASET = "sky_sim.v1"
OBJECT_ROWS = 6000
CHUNKS = 6
OBJECT_SCHEMA = object_schema_with({"mag_g": pa.float32(), "band": pa.string()})


def object_rows(seed: int = 7) -> pa.Table:
    """Objects spread over the whole sky (uniform on the sphere), ids 1..OBJECT_ROWS."""
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0.0, 360.0, OBJECT_ROWS)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, OBJECT_ROWS)))
    return pa.table(
        {
            "object_id": pa.array(np.arange(1, OBJECT_ROWS + 1), pa.int64()),
            "ra": ra,
            "dec": dec,
            "mag_g": pa.array(rng.uniform(14.0, 24.0, OBJECT_ROWS).astype(np.float32)),
            "band": pa.array(rng.choice(["g", "r", "i"], OBJECT_ROWS)),
        },
        schema=OBJECT_SCHEMA,
    )


def object_catalog(catalog: SQLiteCatalog, root: Path) -> pa.Table:
    """Register the object catalog as chunk files; returns every row written."""
    catalog.create_collection(Collection(OBJECT_COLLECTION, RecordKind.OBJECTS))
    dataset = Dataset(name=OBJECT_DATASET, collection=OBJECT_COLLECTION)
    catalog.create_dataset(dataset)
    writer = FilesetWriter(catalog, str(root), WriteOptions(row_group_rows=1024))
    rows = object_rows()
    chunk = (rows.column("ra").to_numpy() // (360.0 / CHUNKS)).astype(np.int64)
    for chunk_id in range(CHUNKS):
        part = rows.filter(pa.array(chunk == chunk_id))
        writer.write(part, dataset, kind=FileKind.CHUNK, part=str(chunk_id))
    return rows


@dataclass
class QueryStores:
    """A generated event store plus the chunked object catalog, in one catalog."""

    events: GeneratedStore
    objects: pa.Table

    @property
    def catalog(self) -> SQLiteCatalog:
        return self.events.catalog

    def unit_uris(self, table: str) -> list[str]:
        return [u.uri for u in resolve_table(self.catalog, table).units]


def build_query_stores(directory: Path) -> QueryStores:
    events = GeneratedStore.create(directory)
    objects = object_catalog(events.catalog, events.root)
    return QueryStores(events, objects)


def run_everywhere(stores: QueryStores, sql: str, max_rows: int = 100_000) -> pa.Table:
    """A query evaluated unit by unit over its whole table (no scan scheduling)."""
    table, plan = compile_query(stores.catalog, sql, max_result_rows=max_rows)
    accumulator = plan.accumulator(max_rows)
    for unit in table.units:
        accumulator.add(table.read_unit(unit, plan.columns))
    return accumulator.result()
