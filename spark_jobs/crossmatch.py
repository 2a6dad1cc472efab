"""The crossmatch job: every chunk of two catalogs partitioned alike, a task per file group.

Plan (driver): open both tables from the catalog, refuse a radius above the
right table's overlap or different grids, and list the tasks (a left chunk
file and the right files of the same run of chunks) from metadata alone.
Transform (executors, no Spark API): ``eventindex.query.crossmatch.match_task``
per task. Main: the pairs are
written as Parquet under the output folder (Spark's writer on a cluster; one
file in this process with ``--local``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.base import Catalog
from eventindex.errors import ValidationError
from eventindex.query.crossmatch import (
    MATCH_SCHEMA,
    ChunkTask,
    MatchSpec,
    check_match,
    match_task,
    plan_chunks,
)
from eventindex.query.objects import ObjectCatalogs

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass
class CrossmatchSummary:
    left: str
    right: str
    radius_arcsec: float
    mode: str
    tasks: int = 0  # file groups matched (each a run of chunks)
    pairs: int = 0
    output: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "seconds": round(self.seconds, 3)}


def match_partition(batches: Iterator[pa.RecordBatch], spec: MatchSpec) -> Iterator[pa.RecordBatch]:
    """The executor side: each row of a batch is one task."""
    for batch in batches:
        for task in batch.to_pylist():
            pairs = match_task(
                ChunkTask(task["first"], task["last"], task["left_uri"], tuple(task["right_uris"])),
                spec,
            )
            yield from pairs.to_batches()


def run_crossmatch(
    catalog: Catalog,
    left_name: str,
    right_name: str,
    spec: MatchSpec,
    output: str,
    *,
    spark: SparkSession | None = None,
) -> CrossmatchSummary:
    """Match every chunk and write the pairs under ``output`` (which must not exist)."""
    started = time.perf_counter()
    if Path(output).exists():
        raise ValidationError(f"output {output!r} exists already; name a new folder")
    tables = ObjectCatalogs(catalog)
    left, right = tables.table(left_name), tables.table(right_name)
    check_match(left, right, spec)
    tasks = plan_chunks(left, right)
    summary = CrossmatchSummary(left.name, right.name, spec.radius_arcsec, spec.mode.value)
    summary.tasks, summary.output = len(tasks), output
    if spark is None:
        pieces = [match_task(task, spec) for task in tasks]
        pairs = pa.concat_tables([MATCH_SCHEMA.empty_table(), *pieces])
        Path(output).mkdir(parents=True)
        pq.write_table(pairs, str(Path(output) / "part-00000.parquet"))
        summary.pairs = pairs.num_rows
    else:
        from pyspark.sql.pandas.types import from_arrow_schema

        rows = [
            {
                "first": t.first,
                "last": t.last,
                "left_uri": t.left_uri,
                "right_uris": list(t.right_uris),
            }
            for t in tasks
        ]
        frame = spark.createDataFrame(
            rows, "first long, last long, left_uri string, right_uris array<string>"
        )
        slices = max(1, min(len(rows), spark.sparkContext.defaultParallelism * 4))
        pairs_frame = frame.repartition(slices).mapInArrow(
            lambda batches: match_partition(batches, spec), from_arrow_schema(MATCH_SCHEMA)
        )
        pairs_frame.write.parquet(output)
        summary.pairs = spark.read.parquet(output).count()
    summary.seconds = time.perf_counter() - started
    return summary
