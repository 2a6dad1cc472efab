"""A refused or failed partition run leaves nothing behind (no dataset, no entry, no
file: committed, half-written or spilled), so the same run can be made again; and a
child table always takes its director's grid and file groups."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog.model import FileKind
from catalog.sqlite import SQLiteCatalog
from catalog.verify import verify_catalog
from eventindex.config import Settings, SpatialSettings, StoreSettings
from eventindex.errors import AlreadyExistsError, NotFoundError, StorageError, ValidationError
from eventindex.query.objects import ObjectCatalogs
from eventindex.spatial import partition as partition_module
from eventindex.spatial.chunker import Chunker
from eventindex.spatial.partition import (
    CHUNKS_PER_FILE_ATTRIBUTE,
    PartitionedWriter,
    parse_part,
    partition_local,
)
from eventindex.storage import MapFileWriter
from spark_jobs.partition import partition_catalog
from tests.spatial.partition_data import (
    GRID,
    OPTIONS,
    dataset_entries,
    files_under,
    object_table,
    read_kind,
)

CHILD: dict[str, Any] = {"director": "sky.Object", "child_key": "source_id"}


def _settings(tmp: Path, chunks_per_file: int = 32) -> Settings:
    # GRID's parameters: 12 stripes, 3 sub-stripes, half a degree of overlap.
    return Settings(
        store=StoreSettings(root=str(tmp / "store")),
        spatial=SpatialSettings(
            num_stripes=12,
            num_sub_stripes=3,
            overlap_arcsec=1800.0,
            row_group_rows=512,
            chunks_per_file=chunks_per_file,
        ),
    )


def _children(objects: pa.Table, n: int, seed: int = 2) -> pa.Table:
    """``n`` sources of random objects, ids shuffled."""
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "source_id": rng.permutation(n).astype(np.int64) + 1000,
            "object_id": rng.choice(objects["object_id"].to_numpy(), n),
            "flux": rng.normal(1.0, 0.1, n),
        }
    )


def _write(table: pa.Table, path: Path) -> str:
    pq.write_table(table, path)
    return str(path)


def _assert_unregistered(catalog: SQLiteCatalog, dataset: str) -> None:
    with pytest.raises(NotFoundError):
        catalog.get_dataset(dataset)


def _assert_clean(catalog: SQLiteCatalog, store: Path) -> None:
    report = verify_catalog(catalog, str(store))
    assert report.ok(strict=True), report.problems


def _with_row(table: pa.Table, column: str, row: int, value: float) -> pa.Table:
    values = table[column].to_numpy().copy()
    values[row] = value
    return table.set_column(table.column_names.index(column), column, pa.array(values))


@pytest.mark.parametrize("defect", ["bad_dec", "duplicate_ids", "empty"])
def test_refused_object_runs_register_nothing(tmp_path: Path, defect: str) -> None:
    settings = _settings(tmp_path)
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    table = object_table(400)
    bad = {
        "bad_dec": _with_row(table, "dec", 17, 91.0),
        "duplicate_ids": pa.concat_tables([table, table.slice(5, 1)]),
        "empty": table.slice(0, 0),
    }[defect]
    with pytest.raises(ValidationError):
        partition_catalog(settings, catalog, _write(bad, tmp_path / "bad.parquet"), "sky")
    assert catalog.list_collections() == []
    _assert_unregistered(catalog, "sky.Object")
    assert files_under(tmp_path / "store") == []
    # The same run with good input now succeeds.
    summary = partition_catalog(settings, catalog, _write(table, tmp_path / "ok.parquet"), "sky")
    assert summary.rows == 400
    _assert_clean(catalog, tmp_path / "store")


def test_bad_input_mid_stream_leaves_no_dataset_and_no_spill(tmp_path: Path) -> None:
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    store, spill = tmp_path / "store", tmp_path / "spill"
    spill.mkdir()
    table = object_table(3000)

    def batches(last: pa.Table) -> Iterator[pa.Table]:
        yield table.slice(0, 1000)
        yield table.slice(1000, 1000)  # past memory_rows: buckets spill
        yield last

    bad = _with_row(table.slice(2000), "ra", 3, 400.0)
    writer = PartitionedWriter(catalog, str(store), "sky", "Object", GRID, OPTIONS)
    with pytest.raises(ValidationError, match="ra must be in"):
        partition_local(
            batches(bad), writer, memory_rows=500, spill_buckets=4, spill_dir=str(spill)
        )
    assert list(spill.iterdir()) == []
    _assert_unregistered(catalog, "sky.Object")
    assert files_under(store) == []
    writer = PartitionedWriter(catalog, str(store), "sky", "Object", GRID, OPTIONS)
    summary = partition_local(
        batches(table.slice(2000)), writer, memory_rows=500, spill_buckets=4, spill_dir=str(spill)
    )
    assert summary.rows == 3000 and list(spill.iterdir()) == []
    _assert_clean(catalog, store)


@pytest.fixture
def director(tmp_path: Path) -> tuple[Settings, SQLiteCatalog, pa.Table]:
    """``sky.Object`` partitioned at 8 chunks per file."""
    settings = _settings(tmp_path, chunks_per_file=8)
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    objects = object_table(3000)
    partition_catalog(settings, catalog, _write(objects, tmp_path / "objects.parquet"), "sky")
    assert catalog.get_dataset("sky.Object").attributes[CHUNKS_PER_FILE_ATTRIBUTE] == "8"
    return settings, catalog, objects


@pytest.mark.parametrize("defect", ["unknown_objects", "no_child_key", "empty"])
def test_refused_child_runs_register_nothing(
    tmp_path: Path, director: tuple[Settings, SQLiteCatalog, pa.Table], defect: str
) -> None:
    settings, catalog, objects = director
    children = _children(objects, 900)
    bad = {
        "unknown_objects": _with_row(children, "object_id", 4, 1),  # ids are 7k + 3
        "no_child_key": children.drop_columns(["source_id"]),
        "empty": children.slice(0, 0),
    }[defect]
    source = _write(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValidationError):
        partition_catalog(settings, catalog, source, "sky", "Source", **CHILD)
    _assert_unregistered(catalog, "sky.Source")
    assert files_under(tmp_path / "store" / "sky" / "sky.Source") == []
    source = _write(children, tmp_path / "ok.parquet")
    assert partition_catalog(settings, catalog, source, "sky", "Source", **CHILD).rows == 900
    _assert_clean(catalog, tmp_path / "store")


def test_child_tables_take_their_directors_file_groups(
    tmp_path: Path, director: tuple[Settings, SQLiteCatalog, pa.Table]
) -> None:
    _, catalog, objects = director
    children = _children(objects, 5000)
    # The child run's own setting differs: its director's grouping wins.
    settings = _settings(tmp_path, chunks_per_file=3)
    source = _write(children, tmp_path / "sources.parquet")
    summary = partition_catalog(settings, catalog, source, "sky", "Source", **CHILD)
    assert summary.rows == 5000
    assert catalog.get_dataset("sky.Source").attributes[CHUNKS_PER_FILE_ATTRIBUTE] == "8"
    object_files = read_kind(catalog, "sky.Object", FileKind.CHUNK)
    source_files = read_kind(catalog, "sky.Source", FileKind.CHUNK)
    assert len(source_files) > 1 and set(source_files) <= set(object_files)

    # A join file group by file group: each child file against the director's chunk file
    # that the query layer finds for its first chunk finds every child's object.
    tables = ObjectCatalogs(catalog)
    sources, objects_table = tables.table("sky.Source"), tables.table("sky.Object")
    try:
        pairs = []
        for entry in sources.chunk_files:
            home = objects_table.chunk_files.file_of(parse_part(entry.part)[0])
            assert home is not None and home.part == entry.part
            cells = ["object_id", "chunk_id", "sub_chunk_id"]
            joined = source_files[entry.part].join(
                object_files[home.part].select([*cells, "mag"]), keys=cells, join_type="inner"
            )
            pairs.append(joined.select(["source_id", "object_id"]))
    finally:
        tables.close()
    found = pa.concat_tables(pairs).sort_by("source_id")
    assert (
        found.to_pydict()
        == children.select(["source_id", "object_id"]).sort_by("source_id").to_pydict()
    )


def test_child_writers_refuse_another_grid_or_grouping(
    tmp_path: Path, director: tuple[Settings, SQLiteCatalog, pa.Table]
) -> None:
    _, catalog, _ = director
    store = str(tmp_path / "store")
    with pytest.raises(ValidationError, match="chunks per file"):
        PartitionedWriter(
            catalog, store, "sky", "Source", GRID, OPTIONS, chunks_per_file=3, **CHILD
        )
    with pytest.raises(ValidationError, match="grid"):
        PartitionedWriter(catalog, store, "sky", "Source", Chunker(12, 2, 0.5), OPTIONS, **CHILD)
    with pytest.raises(NotFoundError):
        PartitionedWriter(
            catalog, store, "sky", "Source", GRID, OPTIONS, director="sky.Nothing", child_key="x"
        )
    writer = PartitionedWriter(catalog, store, "sky", "Source", GRID, OPTIONS, **CHILD)
    assert writer.groups.chunks_per_file == 8
    _assert_unregistered(catalog, "sky.Source")


class _FailingWriters:
    """Patches the partitioner's map-file writer: the first write of a chunk (or, with
    ``fails="director"``, a director) file raises once its temporary file is open;
    with ``slow``, every other write waits first."""

    def __init__(self, fails: str, slow: float = 0.0) -> None:
        self.fails = fails
        self.slow = slow
        self.failed = False
        self.lock = threading.Lock()

    def writer_class(self) -> type[MapFileWriter]:
        failing = self

        class Writer(MapFileWriter):
            def write(self, table: pa.Table) -> None:
                if (self.key == ["object_id"]) == (failing.fails == "director"):
                    with failing.lock:
                        first, failing.failed = not failing.failed, True
                    if first:
                        raise StorageError(f"{self.uri}: disk full")
                time.sleep(failing.slow)
                super().write(table)

        return Writer


@pytest.mark.parametrize("where", ["overlap_folder", "chunk_write", "racing_writes", "director"])
def test_failed_object_writes_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    settings = _settings(tmp_path)
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    source = _write(object_table(3000), tmp_path / "objects.parquet")
    folder = tmp_path / "store" / "sky" / "sky.Object"
    blocker = folder / "overlap"
    if where == "overlap_folder":  # overlap files cannot be created, chunk files can
        folder.mkdir(parents=True)
        blocker.write_text("in the way")
    else:
        failing = {
            "chunk_write": _FailingWriters("chunk"),
            "racing_writes": _FailingWriters("chunk", slow=0.3),
            "director": _FailingWriters("director"),
        }[where]
        monkeypatch.setattr(partition_module, "MapFileWriter", failing.writer_class())
    with pytest.raises(StorageError):
        partition_catalog(settings, catalog, source, "sky")
    assert dataset_entries(catalog, "sky.Object") == []
    assert [p for p in files_under(tmp_path / "store") if p != blocker] == []
    if where == "overlap_folder":
        blocker.unlink()
    monkeypatch.undo()
    store = str(tmp_path / "store")
    with pytest.raises(AlreadyExistsError):  # an empty dataset of another grid stays refused
        PartitionedWriter(catalog, store, "sky", "Object", Chunker(6, 2, 1.0), OPTIONS)
    # The same run again: what the failed one left (an empty dataset at most) is no obstacle.
    assert partition_catalog(settings, catalog, source, "sky").rows == 3000
    with pytest.raises(AlreadyExistsError):  # refused before the input is even opened
        partition_catalog(settings, catalog, str(tmp_path / "missing.parquet"), "sky")
    _assert_clean(catalog, tmp_path / "store")


def test_failed_child_writes_leave_nothing(
    tmp_path: Path, director: tuple[Settings, SQLiteCatalog, pa.Table]
) -> None:
    settings, catalog, objects = director
    source = _write(_children(objects, 2000), tmp_path / "sources.parquet")
    folder = tmp_path / "store" / "sky" / "sky.Source"
    folder.mkdir(parents=True)
    (folder / "chunk").write_text("in the way")
    with pytest.raises(StorageError):
        partition_catalog(settings, catalog, source, "sky", "Source", **CHILD)
    assert dataset_entries(catalog, "sky.Source") == []
    assert files_under(folder) == [folder / "chunk"]
    (folder / "chunk").unlink()
    assert partition_catalog(settings, catalog, source, "sky", "Source", **CHILD).rows == 2000
    _assert_clean(catalog, tmp_path / "store")
