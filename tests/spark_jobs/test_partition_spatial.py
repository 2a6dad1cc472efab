"""The Spark partitioning job writes what the local transform writes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog.model import FileKind
from catalog.sqlite import SQLiteCatalog
from catalog.verify import verify_catalog
from eventindex.errors import ValidationError
from eventindex.spatial.partition import PartitionedWriter
from tests.spark_session import spark  # noqa: F401  (the shared session fixture)
from tests.spatial.partition_data import OPTIONS, SPARK_GRID, object_table, partition, read_kind

pytestmark = pytest.mark.spark
# Spark's Python workers must run this interpreter (set before the shared session starts).
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def _rows(tables: dict[str, pa.Table]) -> dict[str, list[tuple[Any, ...]]]:
    return {part: sorted(zip(*t.to_pydict().values(), strict=True)) for part, t in tables.items()}


def test_spark_partition_matches_local(spark: Any, tmp_path: Path) -> None:  # noqa: F811
    from spark_jobs.partition import read_input, run_partition

    table = object_table(3000)
    source = tmp_path / "objects.parquet"
    pq.write_table(table, source)
    (tmp_path / "local").mkdir()
    local = partition(tmp_path / "local", table, grid=SPARK_GRID)

    catalog = SQLiteCatalog(str(tmp_path / "spark.sqlite"))
    writer = PartitionedWriter(
        catalog, str(tmp_path / "spark-store"), "sky", "Object", SPARK_GRID, OPTIONS
    )
    summary = run_partition(spark, read_input(spark, str(source)), writer, director_partitions=2)
    assert summary.rows == 3000
    assert summary.overlap_rows == local.summary.overlap_rows
    for kind in (FileKind.CHUNK, FileKind.OVERLAP):
        assert _rows(read_kind(catalog, "sky.Object", kind)) == _rows(
            read_kind(local.catalog, "sky.Object", kind)
        )
    directors = read_kind(catalog, "sky.Object", FileKind.DIRECTOR)
    # Range-partitioned: one file per non-empty partition, with disjoint id ranges.
    assert 1 <= len(directors) <= 2
    merged = pa.concat_tables(directors.values()).sort_by("object_id")
    local_director = pa.concat_tables(
        read_kind(local.catalog, "sky.Object", FileKind.DIRECTOR).values()
    )
    assert merged.to_pydict() == local_director.sort_by("object_id").to_pydict()
    report = verify_catalog(catalog, str(tmp_path / "spark-store"))
    assert report.ok(strict=True), report.problems


def test_spark_partition_refuses_bad_input(spark: Any, tmp_path: Path) -> None:  # noqa: F811
    from spark_jobs.partition import read_input, run_partition

    table = object_table(100)
    bad = table.set_column(
        1, "ra", pa.array(np.where(np.arange(100) == 5, 360.0, table["ra"].to_numpy()))
    )
    source = tmp_path / "bad.parquet"
    pq.write_table(bad, source)
    catalog = SQLiteCatalog(str(tmp_path / "c.sqlite"))
    writer = PartitionedWriter(
        catalog, str(tmp_path / "store"), "sky", "Object", SPARK_GRID, OPTIONS
    )
    with pytest.raises(ValidationError, match=r"ra must be in \[0, 360\)"):
        run_partition(spark, read_input(spark, str(source)), writer)
    assert catalog.list_datasets() == []  # a refused run registers nothing
