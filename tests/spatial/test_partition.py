"""The local partitioner: every row once in its chunk, overlap copies, director, catalog."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from catalog.model import FileKind
from catalog.verify import verify_catalog
from eventindex.errors import AlreadyExistsError, ValidationError
from eventindex.spatial.chunker import Chunker
from eventindex.spatial.partition import Columns, PartitionedWriter, normalize, partition_local
from tests.spatial.partition_data import GRID, OPTIONS, object_table, partition, read_kind


@pytest.mark.parametrize("memory_rows", [10_000_000, 2000], ids=["in-memory", "spilled"])
def test_every_row_lands_in_its_chunk_with_its_overlap(tmp_path: Path, memory_rows: int) -> None:
    table = object_table()
    done = partition(tmp_path, table, memory_rows=memory_rows)
    chunks = read_kind(done.catalog, "sky.Object", FileKind.CHUNK)
    overlaps = read_kind(done.catalog, "sky.Object", FileKind.OVERLAP)
    assert done.summary.rows == table.num_rows
    assert done.summary.chunks == len(chunks)

    expected_chunk, expected_sub = GRID.locate(table["ra"].to_numpy(), table["dec"].to_numpy())
    expected = {
        int(i): (int(c), int(s))
        for i, c, s in zip(table["object_id"].to_numpy(), expected_chunk, expected_sub, strict=True)
    }
    seen: dict[int, tuple[int, int]] = {}
    for part, piece in chunks.items():
        assert set(piece["chunk_id"].to_pylist()) == {int(part)}
        key = list(
            zip(piece["sub_chunk_id"].to_pylist(), piece["object_id"].to_pylist(), strict=True)
        )
        assert key == sorted(key)  # sorted by sub-chunk, then object id
        for sub, oid in key:
            assert oid not in seen
            seen[oid] = (int(part), sub)
        assert piece.column_names == ["object_id", "ra", "dec", "mag", "chunk_id", "sub_chunk_id"]
    assert seen == expected

    copies = GRID.overlap_of(table["ra"].to_numpy(), table["dec"].to_numpy())
    ids = table["object_id"].to_numpy()
    expected_copies = sorted(
        zip(
            copies.chunk_ids.tolist(),
            copies.sub_chunk_ids.tolist(),
            ids[copies.rows].tolist(),
            strict=True,
        )
    )
    got_copies = sorted(
        (int(part), sub, oid)
        for part, piece in overlaps.items()
        for sub, oid in zip(
            piece["sub_chunk_id"].to_pylist(), piece["object_id"].to_pylist(), strict=True
        )
    )
    assert got_copies == expected_copies
    assert done.summary.overlap_rows == len(expected_copies) > 0

    director = pa.concat_tables(read_kind(done.catalog, "sky.Object", FileKind.DIRECTOR).values())
    assert {
        oid: (c, s)
        for oid, c, s in zip(
            director["object_id"].to_pylist(),
            director["chunk_id"].to_pylist(),
            director["sub_chunk_id"].to_pylist(),
            strict=True,
        )
    } == expected
    dataset = done.catalog.get_dataset("sky.Object")
    assert Chunker.from_parameters(dataset.attributes) == GRID
    report = verify_catalog(done.catalog, done.store)
    assert report.ok(strict=True), report.problems


def test_bad_input_is_refused_before_writing(tmp_path: Path) -> None:
    table = object_table(200)
    bad_dec = table.set_column(
        2, "dec", pa.array(np.where(np.arange(200) == 17, 91.0, table["dec"].to_numpy()))
    )
    catalog_dir = tmp_path / "a"
    catalog_dir.mkdir()
    with pytest.raises(ValidationError, match=r"dec must be in \[-90, 90\].*row 17"):
        partition(catalog_dir, bad_dec)
    twice = pa.concat_tables([table, table.slice(0, 1)])
    other = tmp_path / "b"
    other.mkdir()
    with pytest.raises(ValidationError, match="occurs more than once"):
        partition(other, twice)
    nan = table.set_column(
        1, "ra", pa.array(np.where(np.arange(200) == 3, np.nan, table["ra"].to_numpy()))
    )
    third = tmp_path / "c"
    third.mkdir()
    with pytest.raises(ValidationError, match="NaN"):
        partition(third, nan)
    with pytest.raises(ValidationError, match="no object_id column 'oid'"):
        normalize(table, Columns(object_id="oid"))


def test_columns_are_renamed_and_existing_datasets_refused(tmp_path: Path) -> None:
    table = object_table(300).rename_columns(["id", "RA", "DEC", "mag"])
    done = partition(tmp_path, normalize(table, Columns("id", "RA", "DEC")))
    assert done.summary.rows == 300
    with pytest.raises(AlreadyExistsError):
        PartitionedWriter(done.catalog, done.store, "sky", "Object", GRID, OPTIONS)
    with pytest.raises(ValidationError, match="no rows"):
        partition_local(
            [], PartitionedWriter(done.catalog, done.store, "sky", "Empty", GRID, OPTIONS)
        )
