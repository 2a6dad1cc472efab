"""Object queries against brute force over the partitioned table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from eventindex.errors import NotFoundError
from eventindex.query.objects import DISTANCE_COLUMN, ObjectCatalogs, ObjectTable, cone
from eventindex.spatial.chunker import SpatialError
from eventindex.spatial.regions import Box, Polygon, Region, angular_separation
from tests.spatial.partition_data import Partitioned, object_table, partition


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Partitioned]:
    done = partition(tmp_path_factory.mktemp("objects"), object_table(8000))
    yield done
    done.catalog.close()


@pytest.fixture(scope="module")
def table(partitioned: Partitioned) -> Iterator[ObjectTable]:
    opened = ObjectCatalogs(partitioned.catalog).table("sky")
    yield opened
    opened.close()


def test_get_returns_each_object(partitioned: Partitioned, table: ObjectTable) -> None:
    source = partitioned.table
    for row in np.random.default_rng(0).choice(source.num_rows, 50, replace=False):
        expected = {name: source.column(name)[int(row)].as_py() for name in source.column_names}
        got = table.get(expected["object_id"])
        assert got is not None
        assert {k: got[k] for k in expected} == expected
    assert table.get(1) is None  # ids are 3 mod 7
    assert table.get(-5) is None
    assert table.get(10**12) is None
    assert table.get(int(source["object_id"][0].as_py()), ["mag"]) == {
        "mag": source["mag"][0].as_py()
    }


def _brute(partitioned: Partitioned, region: Region) -> set[int]:
    source = partitioned.table
    inside = region.contains(source["ra"].to_numpy(), source["dec"].to_numpy())
    return set(source["object_id"].to_numpy()[inside].tolist())


@pytest.mark.parametrize(
    "region",
    [
        cone(10.0, 5.0, 1800.0),
        cone(10.0, 5.0, 60.0),
        cone(0.2, 4.0, 3600.0),  # straddles ra = 0
        cone(100.0, 89.0, 7200.0),  # reaches the pole
        Box(355.0, 12.0, 3.0, 6.0),
        Polygon([(8.0, 3.0), (12.0, 3.0), (11.0, 7.0), (9.0, 7.0)]),
    ],
    ids=repr,
)
def test_search_matches_brute_force(
    partitioned: Partitioned, table: ObjectTable, region: Region
) -> None:
    found = table.search(region)
    ids = found["object_id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert set(ids) == _brute(partitioned, region)
    if DISTANCE_COLUMN in found.column_names:
        distance = angular_separation(region.ra, region.dec, found["ra"], found["dec"]) * 3600  # type: ignore[attr-defined]
        assert np.allclose(found[DISTANCE_COLUMN].to_numpy(), distance)


def test_search_reads_only_touched_chunks(table: ObjectTable) -> None:
    plan = table.plan_search(cone(10.0, 5.0, 60.0))
    assert 1 <= len(plan.chunks) <= 2
    for chunk_id in plan.chunks:
        entry = plan.files[chunk_id]
        assert entry is table.chunk_files.file_of(chunk_id)
        assert entry.key_min[0] <= chunk_id <= entry.key_max[0]


def test_search_columns_and_limit(table: ObjectTable) -> None:
    found = table.search(cone(10.0, 5.0, 3600.0), ["mag"], limit=5)
    assert found.num_rows == 5
    assert found.column_names == ["object_id", "ra", "dec", "mag", DISTANCE_COLUMN]
    empty = table.search(cone(200.0, -60.0, 1.0))
    assert empty.num_rows == 0 and "mag" in empty.column_names


def test_bad_queries_are_refused(partitioned: Partitioned) -> None:
    catalogs = ObjectCatalogs(partitioned.catalog)
    with pytest.raises(SpatialError, match="radius"):
        cone(10.0, 5.0, 0.0)
    with pytest.raises(SpatialError, match="ra must be in"):
        cone(360.0, 5.0, 1.0)
    with pytest.raises(NotFoundError, match=r"no object catalog 'nope'.*sky\.Object"):
        catalogs.table("nope")
    assert catalogs.table(None).name == "sky.Object"
    assert catalogs.table("sky.Object").name == "sky.Object"


def test_two_catalogs_need_a_name(tmp_path: Path) -> None:
    done = partition(tmp_path, object_table(200))
    from eventindex.spatial.partition import PartitionedWriter, partition_local
    from tests.spatial.partition_data import GRID, OPTIONS

    partition_local(
        [object_table(100, 2)],
        PartitionedWriter(done.catalog, done.store, "other", "Object", GRID, OPTIONS),
    )
    with pytest.raises(NotFoundError, match="several object catalogs"):
        ObjectCatalogs(done.catalog).table(None)
    assert ObjectCatalogs(done.catalog).table("other").rows == 100


def test_child_rows_follow_their_object(partitioned: Partitioned, table: ObjectTable) -> None:
    from catalog.model import FileKind
    from eventindex.errors import ValidationError
    from eventindex.spatial.partition import PartitionedWriter, parse_part, partition_children
    from tests.spatial.partition_data import GRID, OPTIONS, read_kind

    parents = partitioned.table["object_id"].to_numpy()[:500]
    children = pa.table(
        {
            "source_id": np.arange(1000, dtype=np.int64),
            "object_id": np.repeat(parents, 2),
            "flux": np.linspace(0.0, 1.0, 1000),
        }
    )
    writer = PartitionedWriter(
        partitioned.catalog,
        partitioned.store,
        "sky",
        "Source",
        GRID,
        OPTIONS,
        director="sky.Object",
        child_key="source_id",
    )
    summary = partition_children([children], writer, table.locate_many)
    assert summary.rows == 1000
    files = read_kind(partitioned.catalog, "sky.Source", FileKind.CHUNK)
    for part, piece in files.items():
        first, last = parse_part(part)
        for oid, chunk_id, sub in zip(
            piece["object_id"].to_pylist(),
            piece["chunk_id"].to_pylist(),
            piece["sub_chunk_id"].to_pylist(),
            strict=True,
        ):
            assert table.locate(oid) == (chunk_id, sub) and first <= chunk_id <= last
    assert sorted(pa.concat_tables(files.values())["source_id"].to_pylist()) == list(range(1000))
    orphan = children.set_column(1, "object_id", pa.array(np.full(1000, 1, dtype=np.int64)))
    other = PartitionedWriter(
        partitioned.catalog, partitioned.store, "sky", "Orphans", GRID, OPTIONS,
        director="sky.Object", child_key="source_id",
    )  # fmt: skip
    with pytest.raises(ValidationError, match="object_id 1 of a child row is not in the director"):
        partition_children([orphan], other, table.locate_many)


def test_tables_of_another_file_layout_are_refused(partitioned: Partitioned) -> None:
    from catalog.model import Dataset
    from eventindex.errors import ValidationError
    from tests.spatial.partition_data import GRID

    partitioned.catalog.create_dataset(
        Dataset(name="sky.Old", collection="sky", format="chunked", attributes=GRID.parameters())
    )
    with pytest.raises(ValidationError, match=r"one file per chunk.*partition it again"):
        ObjectCatalogs(partitioned.catalog).table("sky.Old")
