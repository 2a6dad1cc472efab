"""FilesetWriter: a TagFile is written atomically and registered complete, or not at all.

These run against every catalog backend (the ``populated`` fixture of conftest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from catalog import Catalog, Dataset, FileKind, FileState
from catalog.fileset import FilesetWriter, absolute_uri, referenced_guids
from eventindex import storage
from eventindex.errors import CatalogError, StorageError
from eventindex.generator import GeneratorSpec, generate_run
from eventindex.storage import MapFileReader, WriteOptions, file_checksum
from tests.catalog.conftest import AOD, EVENTS

SPEC = GeneratorSpec(runs=1, events_per_run=2500)
OPTIONS = WriteOptions(row_group_rows=1024)


@pytest.fixture(scope="module")
def aod_table() -> pa.Table:
    """The generator's table for the conftest's AOD dataset, shuffled (the writer sorts)."""
    table = generate_run(SPEC, SPEC.first_run)[AOD]
    order = np.random.default_rng(5).permutation(table.num_rows)
    return table.take(pa.array(order))


@pytest.fixture
def dataset(populated: Catalog) -> Dataset:
    return populated.get_dataset(AOD)


@pytest.fixture
def writer(populated: Catalog, tmp_path: Path) -> FilesetWriter:
    return FilesetWriter(populated, str(tmp_path / "store"), OPTIONS)


def store_files(tmp_path: Path) -> list[str]:
    """Every file under the store, hidden temporary ones included."""
    return sorted(str(p) for p in (tmp_path / "store").rglob("*") if p.is_file())


def test_write_registers_a_committed_tagfile_matching_the_file(
    populated: Catalog,
    writer: FilesetWriter,
    dataset: Dataset,
    aod_table: pa.Table,
    tmp_path: Path,
) -> None:
    entry = writer.write(aod_table, dataset, message_ids=["m-1", "m-2"])

    assert entry.state is FileState.COMMITTED
    assert entry.committed_at is not None
    assert populated.get_tagfile(entry.file_id) == entry
    assert populated.list_tagfiles(dataset=AOD) == [entry]
    assert (entry.dataset, entry.collection, entry.kind) == (AOD, EVENTS, FileKind.MASTER)
    assert entry.uri == f"{writer.root}/{EVENTS}/{AOD}/master/{entry.file_id}.parquet"

    path = Path(entry.uri)
    assert entry.bytes == path.stat().st_size
    assert entry.checksum == file_checksum(entry.uri)
    assert entry.rows == aod_table.num_rows
    keys = sorted(
        zip(aod_table["run_number"].to_pylist(), aod_table["event_number"].to_pylist(), strict=True)
    )
    assert entry.key_min == keys[0]
    assert entry.key_max == keys[-1]
    references = pc.list_flatten(aod_table["references"]).combine_chunks()
    guids = sorted(set(references.field("guid").to_pylist()))
    assert entry.guids == tuple(guids)
    assert {r["format"] for r in references.to_pylist()} == {"RAW", "AOD"}
    assert entry.message_ids == ("m-1", "m-2")

    assert populated.absorbed_message_ids(["m-1", "m-3"]) == {"m-1"}
    assert [f.file_id for f in populated.files_with_guid(guids[0])] == [entry.file_id]
    with MapFileReader(entry.uri) as reader:
        assert reader.num_rows == entry.rows
        assert (reader.key_min, reader.key_max) == (entry.key_min, entry.key_max)
        assert reader.metadata["file_id"] == entry.file_id
        assert reader.metadata["dataset"] == AOD
        first = reader.get(keys[0], ["event_number"])
        assert first == {"event_number": keys[0][1]}
    assert store_files(tmp_path) == [entry.uri]


def test_parts_and_attributes(
    populated: Catalog, writer: FilesetWriter, dataset: Dataset, aod_table: pa.Table
) -> None:
    master = writer.write(aod_table, dataset)
    extension = writer.write(
        aod_table.select(["run_number", "event_number", "bcid"]),
        dataset,
        kind=FileKind.EXTENSION,
        part="bcid",
        attributes={"master": master.file_id},
    )
    assert extension.uri.endswith(f"/{AOD}/extension/bcid.{extension.file_id}.parquet")
    assert extension.part == "bcid"
    assert extension.attributes == {"master": master.file_id}
    assert extension.guids == ()  # no references column
    assert (extension.rows, extension.key_min, extension.key_max) == (
        master.rows,
        master.key_min,
        master.key_max,
    )


def test_supersedes_retires_the_old_files(
    populated: Catalog, writer: FilesetWriter, dataset: Dataset, aod_table: pa.Table
) -> None:
    half = aod_table.num_rows // 2
    first = writer.write(aod_table.slice(0, half), dataset)
    second = writer.write(aod_table.slice(half), dataset)
    merged = writer.write(aod_table, dataset, supersedes=[first.file_id, second.file_id])
    assert merged.supersedes == (first.file_id, second.file_id)
    assert populated.list_tagfiles(dataset=AOD) == [merged]


def test_failure_after_the_rename_leaves_no_entry_and_no_file(
    populated: Catalog,
    writer: FilesetWriter,
    dataset: Dataset,
    aod_table: pa.Table,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """write_mapfile put the file in place, then failed (say at the directory fsync)."""
    import catalog.fileset

    def write_then_fail(*args: Any, **kwargs: Any) -> Any:
        storage.write_mapfile(*args, **kwargs)
        assert len(store_files(tmp_path)) == 1
        raise OSError("disk went away after the rename")

    monkeypatch.setattr(catalog.fileset, "write_mapfile", write_then_fail)
    with pytest.raises(OSError, match="went away"):
        writer.write(aod_table, dataset)
    assert populated.list_tagfiles(dataset=AOD, states=None) == []
    assert store_files(tmp_path) == []


def test_failure_while_writing_parquet_leaves_no_entry_and_no_file(
    populated: Catalog,
    writer: FilesetWriter,
    dataset: Dataset,
    aod_table: pa.Table,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Parquet writer fails halfway: a temporary file existed, and a 'writing' entry."""
    seen: list[str] = []

    def fail(self: pq.ParquetWriter, table: pa.Table, **kwargs: Any) -> None:
        seen.extend(store_files(tmp_path))
        seen.extend(f.state.value for f in populated.list_tagfiles(dataset=AOD, states=None))
        raise KeyboardInterrupt

    monkeypatch.setattr(pq.ParquetWriter, "write_table", fail)
    with pytest.raises(KeyboardInterrupt):
        writer.write(aod_table, dataset)
    assert len(seen) == 2 and seen[0].endswith(".tmp") and seen[1] == "writing"
    assert populated.list_tagfiles(dataset=AOD, states=None) == []
    assert store_files(tmp_path) == []


def test_failed_commit_leaves_no_entry_and_no_file(
    populated: Catalog,
    writer: FilesetWriter,
    dataset: Dataset,
    aod_table: pa.Table,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_args: Any) -> Any:
        raise CatalogError("catalog refused the commit")

    monkeypatch.setattr(populated, "commit_tagfile", refuse)
    with pytest.raises(CatalogError):
        writer.write(aod_table, dataset)
    assert populated.list_tagfiles(dataset=AOD, states=None) == []
    assert store_files(tmp_path) == []


def test_empty_table_is_refused_and_forgotten(
    populated: Catalog, writer: FilesetWriter, dataset: Dataset, aod_table: pa.Table
) -> None:
    with pytest.raises(StorageError, match="empty"):
        writer.write(aod_table.slice(0, 0), dataset)
    assert populated.list_tagfiles(dataset=AOD, states=None) == []


def test_relative_store_root_gives_absolute_uris(
    populated: Catalog,
    dataset: Dataset,
    aod_table: pa.Table,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    writer = FilesetWriter(populated, "../var/./store/", OPTIONS)
    entry = writer.write(aod_table, dataset)
    expected_root = str(tmp_path / "var" / "store")
    assert writer.root == expected_root
    assert entry.uri.startswith(expected_root + "/")
    assert Path(entry.uri).is_absolute()
    monkeypatch.chdir("/")
    with MapFileReader(populated.get_tagfile(entry.file_id).uri) as reader:
        assert reader.num_rows == aod_table.num_rows


def test_absolute_uri_keeps_uris_with_a_scheme() -> None:
    assert absolute_uri("hdfs://namenode:8020/ei") == "hdfs://namenode:8020/ei"
    assert absolute_uri("file:///data/ei") == "file:///data/ei"
    assert absolute_uri("/data/x/../ei/") == "/data/ei"


def test_referenced_guids_of_a_table_without_references(aod_table: pa.Table) -> None:
    assert referenced_guids(aod_table.select(["run_number", "event_number"])) == ()
    assert referenced_guids(aod_table.slice(0, 0)) == ()
