"""On Spark too, a refused or failed partition run leaves nothing behind, and a child
table takes its director's file groups."""

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
from eventindex.errors import NotFoundError, ValidationError
from eventindex.spatial.partition import CHUNKS_PER_FILE_ATTRIBUTE
from tests.spark_session import spark  # noqa: F401  (the shared session fixture)
from tests.spatial.partition_data import dataset_entries, files_under, object_table, read_kind

pytestmark = pytest.mark.spark
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
CHILD: dict[str, Any] = {"director": "sky.Object", "child_key": "source_id"}


def _settings(tmp: Path, chunks_per_file: int = 32) -> Settings:
    # The coarse Spark test grid (6 stripes, 2 sub-stripes, 1 degree of overlap).
    return Settings(
        store=StoreSettings(root=str(tmp / "store")),
        spatial=SpatialSettings(
            num_stripes=6, num_sub_stripes=2, overlap_arcsec=3600.0, chunks_per_file=chunks_per_file
        ),
    )


def _write(table: pa.Table, path: Path) -> str:
    pq.write_table(table, path)
    return str(path)


def _children(objects: pa.Table, n: int) -> pa.Table:
    rng = np.random.default_rng(3)
    return pa.table(
        {
            "source_id": rng.permutation(n).astype(np.int64),
            "object_id": rng.choice(objects["object_id"].to_numpy(), n),
            "flux": rng.normal(1.0, 0.1, n),
        }
    )


def test_spark_refused_runs_register_nothing(spark: Any, tmp_path: Path) -> None:  # noqa: F811
    from spark_jobs.partition import partition_catalog

    settings = _settings(tmp_path)
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    objects = object_table(600)
    dec = objects["dec"].to_numpy().copy()
    dec[9] = -95.0
    bad_dec = objects.set_column(2, "dec", pa.array(dec))
    twice = pa.concat_tables([objects, objects.slice(4, 1)])
    for name, bad in (("bad_dec", bad_dec), ("twice", twice)):
        with pytest.raises(ValidationError):
            partition_catalog(
                settings, catalog, _write(bad, tmp_path / f"{name}.parquet"), "sky", spark=spark
            )
        assert catalog.list_collections() == []
    assert files_under(tmp_path / "store") == []

    source = _write(objects, tmp_path / "objects.parquet")
    assert partition_catalog(settings, catalog, source, "sky", spark=spark).rows == 600
    children = _children(objects, 400)
    ids = children["object_id"].to_numpy().copy()
    ids[11] = 2  # object ids are 7k + 3
    orphans = children.set_column(1, "object_id", pa.array(ids))
    with pytest.raises(ValidationError, match="not in the director table"):
        partition_catalog(
            settings,
            catalog,
            _write(orphans, tmp_path / "orphans.parquet"),
            "sky",
            "Source",
            spark=spark,
            **CHILD,
        )
    with pytest.raises(NotFoundError):
        catalog.get_dataset("sky.Source")
    source = _write(children, tmp_path / "sources.parquet")
    assert partition_catalog(settings, catalog, source, "sky", "Source", spark=spark, **CHILD).rows
    report = verify_catalog(catalog, settings.store.root)
    assert report.ok(strict=True), report.problems


def test_spark_failed_writes_leave_nothing(spark: Any, tmp_path: Path) -> None:  # noqa: F811
    from spark_jobs.partition import partition_catalog

    settings = _settings(tmp_path, chunks_per_file=4)
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    objects = object_table(2000)
    source = _write(objects, tmp_path / "objects.parquet")
    folder = tmp_path / "store" / "sky" / "sky.Object"
    folder.mkdir(parents=True)
    blocker = folder / "overlap"  # overlap files cannot be created; chunk files can
    blocker.write_text("in the way")
    with pytest.raises(Exception, match="cannot create map-file"):
        partition_catalog(settings, catalog, source, "sky", spark=spark)
    assert dataset_entries(catalog, "sky.Object") == []
    assert files_under(tmp_path / "store") == [blocker]
    blocker.unlink()
    assert partition_catalog(settings, catalog, source, "sky", spark=spark).rows == 2000

    # A child table on Spark: its director's 4 chunks per file, whatever the setting says.
    children = _children(objects, 3000)
    sources = _write(children, tmp_path / "sources.parquet")
    child_folder = tmp_path / "store" / "sky" / "sky.Source"
    child_folder.mkdir(parents=True)
    (child_folder / "chunk").write_text("in the way")
    with pytest.raises(Exception, match="cannot create map-file"):
        partition_catalog(settings, catalog, sources, "sky", "Source", spark=spark, **CHILD)
    assert dataset_entries(catalog, "sky.Source") == []
    assert files_under(child_folder) == [child_folder / "chunk"]
    (child_folder / "chunk").unlink()
    settings = _settings(tmp_path, chunks_per_file=32)
    summary = partition_catalog(settings, catalog, sources, "sky", "Source", spark=spark, **CHILD)
    assert summary.rows == 3000
    assert catalog.get_dataset("sky.Source").attributes[CHUNKS_PER_FILE_ATTRIBUTE] == "4"
    object_parts = set(read_kind(catalog, "sky.Object", FileKind.CHUNK))
    source_parts = set(read_kind(catalog, "sky.Source", FileKind.CHUNK))
    assert len(source_parts) > 1 and source_parts <= object_parts
    report = verify_catalog(catalog, settings.store.root)
    assert report.ok(strict=True), report.problems
