"""The Spark job partitions a child table as the local path does: by its objects' cells."""

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
from eventindex.config import Settings, SpatialSettings, StoreSettings
from eventindex.errors import ValidationError
from eventindex.query.objects import ObjectCatalogs
from tests.spark_session import spark  # noqa: F401  (the shared session fixture)
from tests.spatial.partition_data import object_table, read_kind

pytestmark = pytest.mark.spark
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def _settings(tmp: Path) -> Settings:
    # The coarse Spark test grid (6 stripes, 2 sub-stripes, 1 degree of overlap).
    return Settings(
        store=StoreSettings(root=str(tmp / "store")),
        spatial=SpatialSettings(num_stripes=6, num_sub_stripes=2, overlap_arcsec=3600.0),
    )


def _children(objects: pa.Table, n: int, seed: int = 2) -> pa.Table:
    """``n`` sources of random objects (some objects have several, most none), ids shuffled."""
    rng = np.random.default_rng(seed)
    parents = rng.choice(objects["object_id"].to_numpy(), n)
    return pa.table(
        {
            "source_id": rng.permutation(n).astype(np.int64) + 1000,
            "object_id": parents,
            "flux": rng.normal(1.0, 0.1, n),
            "band": pa.array(rng.choice(["g", "r", "i"], n)),
        }
    )


def _rows(tables: dict[str, pa.Table]) -> dict[str, list[tuple[Any, ...]]]:
    return {part: sorted(zip(*t.to_pydict().values(), strict=True)) for part, t in tables.items()}


def test_spark_children_match_local(spark: Any, tmp_path: Path) -> None:  # noqa: F811
    from spark_jobs.partition import partition_catalog

    settings = _settings(tmp_path)
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    objects = object_table(2000)
    pq.write_table(objects, tmp_path / "objects.parquet")
    children = _children(objects, 5000)
    pq.write_table(children, tmp_path / "sources.parquet")
    partition_catalog(settings, catalog, str(tmp_path / "objects.parquet"), "sky")

    source = str(tmp_path / "sources.parquet")
    options: dict[str, Any] = {"director": "sky.Object", "child_key": "source_id"}
    local = partition_catalog(settings, catalog, source, "sky", "Source", **options)
    remote = partition_catalog(
        settings, catalog, source, "sky", "SparkSource", spark=spark, **options
    )
    assert remote.rows == local.rows == 5000
    assert remote.chunks == local.chunks > 1
    assert remote.files == local.files
    assert remote.overlap_rows == local.overlap_rows == 0
    spark_files = read_kind(catalog, "sky.SparkSource", FileKind.CHUNK)
    local_files = read_kind(catalog, "sky.Source", FileKind.CHUNK)
    assert _rows(spark_files) == _rows(local_files)
    # Each file in key order: (chunk, sub-chunk, object id, source id), as the local path.
    for part, piece in spark_files.items():
        columns = ("chunk_id", "sub_chunk_id", "object_id", "source_id")
        keys = list(zip(*(piece[c].to_pylist() for c in columns), strict=True))
        assert keys == sorted(keys), part
        assert piece.schema.names == local_files[part].schema.names
    for kind in (FileKind.OVERLAP, FileKind.DIRECTOR):
        assert catalog.list_tagfiles(dataset="sky.SparkSource", kinds=[kind]) == []
    spark_attributes = catalog.get_dataset("sky.SparkSource").attributes
    assert spark_attributes == catalog.get_dataset("sky.Source").attributes
    assert spark_attributes["spatial.director"] == "sky.Object"
    # Every child sits in its object's cell.
    table = ObjectCatalogs(catalog).table("sky.Object")
    try:
        merged = pa.concat_tables(spark_files.values())
        chunk, sub, found = table.locate_many(merged["object_id"].to_numpy())
        assert found.all()
        assert (chunk == merged["chunk_id"].to_numpy()).all()
        assert (sub == merged["sub_chunk_id"].to_numpy()).all()
    finally:
        table.close()
    report = verify_catalog(catalog, settings.store.root)
    assert report.ok(strict=True), report.problems


def test_spark_children_refuse_unknown_objects(spark: Any, tmp_path: Path) -> None:  # noqa: F811
    from spark_jobs.partition import partition_catalog

    settings = _settings(tmp_path)
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    objects = object_table(500)
    pq.write_table(objects, tmp_path / "objects.parquet")
    partition_catalog(settings, catalog, str(tmp_path / "objects.parquet"), "sky")
    children = _children(objects, 300)
    ids = children["object_id"].to_numpy().copy()
    ids[[7, 40, 41]] = [1, 2, 1]  # object ids are 7k + 3: never 1 or 2
    orphans = children.set_column(1, "object_id", pa.array(ids))
    pq.write_table(orphans, tmp_path / "orphans.parquet")
    options: dict[str, Any] = {"director": "sky.Object", "child_key": "source_id", "spark": spark}
    source = str(tmp_path / "orphans.parquet")
    with pytest.raises(
        ValidationError,
        match=r"object_id 1 of a child row is not in the director table \(3 rows point",
    ):
        partition_catalog(settings, catalog, source, "sky", "Source", **options)
    assert "sky.Source" not in {d.name for d in catalog.list_datasets()}  # nothing registered

    bad_key = children.set_column(0, "source_id", pa.array(np.linspace(0.0, 1.0, 300)))
    pq.write_table(bad_key, tmp_path / "bad_key.parquet")
    with pytest.raises(ValidationError, match="child key column 'source_id' has type double"):
        partition_catalog(
            settings, catalog, str(tmp_path / "bad_key.parquet"), "sky", "Other", **options
        )
    reserved = children.append_column("chunk_id", pa.array(np.zeros(300, np.int32)))
    pq.write_table(reserved, tmp_path / "reserved.parquet")
    with pytest.raises(ValidationError, match="reserved for the partitioner"):
        partition_catalog(
            settings, catalog, str(tmp_path / "reserved.parquet"), "sky", "Third", **options
        )
