"""The Spark crossmatch job finds the pairs the in-process crossmatch finds."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from catalog.sqlite import SQLiteCatalog
from eventindex.errors import ValidationError
from eventindex.query.crossmatch import MatchMode, MatchSpec
from eventindex.spatial.partition import PartitionedWriter, partition_local
from tests.query.test_objects_crossmatch import brute, catalogs
from tests.spark_session import spark  # noqa: F401  (the shared session fixture)
from tests.spatial.partition_data import OPTIONS, SPARK_GRID

pytestmark = pytest.mark.spark
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def test_spark_crossmatch_matches_brute_force(spark: Any, tmp_path: Path) -> None:  # noqa: F811
    from spark_jobs.crossmatch import run_crossmatch

    catalog = SQLiteCatalog(str(tmp_path / "c.sqlite"))
    left, right = catalogs(800, 9)
    partition_local(
        [left], PartitionedWriter(catalog, str(tmp_path / "s"), "l", "O", SPARK_GRID, OPTIONS)
    )
    partition_local(
        [right], PartitionedWriter(catalog, str(tmp_path / "s"), "r", "O", SPARK_GRID, OPTIONS)
    )
    spec = MatchSpec(900.0, MatchMode.ALL)
    summary = run_crossmatch(catalog, "l", "r", spec, str(tmp_path / "out"), spark=spark)
    pairs = pq.read_table(tmp_path / "out")
    found = set(zip(pairs["left_id"].to_pylist(), pairs["right_id"].to_pylist(), strict=True))
    assert summary.pairs == pairs.num_rows == len(found)
    assert found == brute(left, right, 900.0, False)
    local = run_crossmatch(catalog, "l", "r", spec, str(tmp_path / "local"))
    assert local.pairs == summary.pairs
    with pytest.raises(ValidationError, match="exists already"):
        run_crossmatch(catalog, "l", "r", spec, str(tmp_path / "out"), spark=spark)
    with pytest.raises(ValidationError, match="exceeds the overlap"):
        run_crossmatch(catalog, "l", "r", MatchSpec(3601.0), str(tmp_path / "x"), spark=spark)
