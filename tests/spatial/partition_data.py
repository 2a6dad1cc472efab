"""A small object table and a partitioned copy of it, shared by the spatial tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from catalog.model import FileKind, TagFile
from catalog.sqlite import SQLiteCatalog
from eventindex.errors import NotFoundError
from eventindex.spatial.chunker import Chunker
from eventindex.spatial.partition import PartitionedWriter, PartitionSummary, partition_local
from eventindex.storage import MapFileReader, WriteOptions

# A coarse grid keeps the file count small; the overlap is wide so that many rows have copies.
GRID = Chunker(12, 3, 0.5)
# Coarser still for Spark tests: each chunk is a task group, and groups cost time there.
SPARK_GRID = Chunker(6, 2, 1.0)
OPTIONS = WriteOptions(row_group_rows=512)


def object_table(n: int = 6000, seed: int = 1) -> pa.Table:
    """Objects over the whole sky plus a dense clump and both poles, ids shuffled."""
    rng = np.random.default_rng(seed)
    spread = n // 2
    ra = np.concatenate(
        [
            rng.uniform(0.0, 360.0, spread),
            rng.normal(10.0, 1.0, n - spread - 2) % 360.0,
            [0.0, 180.0],
        ]
    )
    dec = np.concatenate(
        [
            np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, spread))),
            rng.normal(5.0, 1.0, n - spread - 2),
            [90.0, -90.0],
        ]
    )
    ids = rng.permutation(n).astype(np.int64) * 7 + 3
    return pa.table(
        {"object_id": ids, "ra": ra, "dec": dec, "mag": rng.normal(20.0, 1.0, n).astype(np.float32)}
    )


@dataclass
class Partitioned:
    catalog: SQLiteCatalog
    store: str
    table: pa.Table
    summary: PartitionSummary


def partition(
    tmp: Path,
    table: pa.Table,
    name: str = "sky",
    *,
    memory_rows: int = 10_000_000,
    grid: Chunker = GRID,
) -> Partitioned:
    catalog = SQLiteCatalog(str(tmp / "catalog.sqlite"))
    store = str(tmp / "store")
    writer = PartitionedWriter(catalog, store, name, "Object", grid, OPTIONS)
    halves = [table.slice(0, table.num_rows // 2), table.slice(table.num_rows // 2)]
    summary = partition_local(halves, writer, memory_rows=memory_rows, spill_buckets=4)
    return Partitioned(catalog, store, table, summary)


def read_kind(catalog: SQLiteCatalog, dataset: str, kind: FileKind) -> dict[str, pa.Table]:
    """Every file of a kind, by part (chunk id), read whole."""
    found = {}
    for entry in catalog.list_tagfiles(dataset=dataset, kinds=[kind]):
        with MapFileReader(entry.uri) as reader:
            found[entry.part or entry.file_id] = reader.read()
    return found


def dataset_entries(catalog: SQLiteCatalog, dataset: str) -> list[TagFile]:
    """Every entry of ``dataset`` in any state; none when there is no such dataset."""
    try:
        return catalog.list_tagfiles(dataset=dataset, states=None)
    except NotFoundError:
        return []


def files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, hidden (temporary) ones included."""
    return sorted(p for p in folder.rglob("*") if p.is_file())
