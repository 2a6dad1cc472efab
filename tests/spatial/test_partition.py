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
from eventindex.spatial.partition import (
    LAYOUT,
    LAYOUT_ATTRIBUTE,
    Columns,
    FileGroups,
    PartitionedWriter,
    normalize,
    parse_part,
    partition_local,
)
from tests.spatial.partition_data import GRID, OPTIONS, object_table, partition, read_kind


def _rows_of(files: dict[str, pa.Table]) -> list[tuple[int, int, int]]:
    """(chunk, sub-chunk, object id) of every row; each file checked on the way: sorted
    by that key, its chunks inside its part's run, and that run one file group."""
    groups = FileGroups(GRID)
    found = []
    for part, piece in files.items():
        first, last = parse_part(part)
        key = list(
            zip(
                piece["chunk_id"].to_pylist(),
                piece["sub_chunk_id"].to_pylist(),
                piece["object_id"].to_pylist(),
                strict=True,
            )
        )
        assert key == sorted(key)  # sorted by chunk, sub-chunk, then object id
        chunk_ids = np.array([c for c, _, _ in key])
        assert first <= chunk_ids.min() and chunk_ids.max() <= last
        index = groups.index_of(chunk_ids)
        assert set(index.tolist()) == {int(index[0])} and groups.part(int(index[0])) == part
        assert piece.column_names == ["object_id", "ra", "dec", "mag", "chunk_id", "sub_chunk_id"]
        found += key
    return found


@pytest.mark.parametrize(
    "memory_rows,sort_ids",
    [(10_000_000, False), (2000, False), (10_000_000, True), (2000, True)],
    ids=["in-memory", "spilled", "in-memory-id-ordered", "spilled-id-ordered"],
)
def test_every_row_lands_in_its_chunk_with_its_overlap(
    tmp_path: Path, memory_rows: int, sort_ids: bool
) -> None:
    table = object_table()
    if sort_ids:  # input in id order takes the packed-key sort
        table = table.sort_by("object_id")
    done = partition(tmp_path, table, memory_rows=memory_rows)
    chunks = read_kind(done.catalog, "sky.Object", FileKind.CHUNK)
    overlaps = read_kind(done.catalog, "sky.Object", FileKind.OVERLAP)
    assert done.summary.rows == table.num_rows
    assert len(chunks) < done.summary.chunks  # files hold runs of chunks

    expected_chunk, expected_sub = GRID.locate(table["ra"].to_numpy(), table["dec"].to_numpy())
    expected = {
        int(i): (int(c), int(s))
        for i, c, s in zip(table["object_id"].to_numpy(), expected_chunk, expected_sub, strict=True)
    }
    seen: dict[int, tuple[int, int]] = {}
    for chunk, sub, oid in _rows_of(chunks):
        assert oid not in seen
        seen[oid] = (chunk, sub)
    assert seen == expected
    assert done.summary.chunks == len({c for c, _ in seen.values()})

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
    assert sorted(_rows_of(overlaps)) == expected_copies
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
    assert dataset.attributes[LAYOUT_ATTRIBUTE] == LAYOUT
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


@pytest.mark.parametrize("chunks_per_file", [1, 3, 32, 10_000])
@pytest.mark.parametrize("grid", [GRID, Chunker()], ids=["small", "qserv"])
def test_file_groups_cut_each_stripe_into_runs_of_whole_chunks(
    grid: Chunker, chunks_per_file: int
) -> None:
    groups = FileGroups(grid, chunks_per_file)
    chunks = grid.all_chunks()
    index = groups.index_of(chunks)
    # Every chunk in exactly one group, groups in chunk order and inside one stripe.
    assert np.all(np.diff(index) >= 0) and set(index.tolist()) == set(range(len(groups)))
    assert np.array_equal(
        groups.first_chunks, chunks[np.searchsorted(index, np.arange(len(groups)))]
    )
    stripes = chunks // (2 * grid.num_stripes)
    for i in range(len(groups)):
        members = chunks[index == i]
        assert parse_part(groups.part(i)) == (members[0], members[-1])
        assert len(members) <= chunks_per_file and len(set(stripes[index == i])) == 1
    # As few groups per stripe as the limit allows, of lengths differing by one at most.
    for stripe, count in enumerate(grid.chunks_per_stripe):
        sizes = np.bincount(index[stripes == stripe])
        sizes = sizes[sizes > 0]
        assert len(sizes) == -(-count // chunks_per_file) and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("part", ["12", "a-b", "3-", "-4", ""])
def test_bad_parts_are_refused(part: str) -> None:
    with pytest.raises(ValidationError, match="not 'first-last'"):
        parse_part(part)
