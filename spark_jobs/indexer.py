"""The Indexer: an inverted trigger index for every master TagFile of a dataset.

Plan (driver, from the catalog): the committed master files of the matching
datasets that have no committed trigger index (all of them with ``rebuild``).
Transform (executors, no Spark API): read one master file's run, SMK and mask
columns, build the bitmaps (``eventindex.query.trigger_index``) and write the
index map-file atomically. Main: register every planned index as ``writing``,
fan the files out over the executors, and commit each index as it arrives
(superseding the file's previous index, so a reader sees the old or the new
one, never both, never neither). A failed job removes what it wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from catalog.base import Catalog
from catalog.model import TagFile
from eventindex.query.trigger_index import (
    INDEX_COLUMNS,
    INDEX_KEY,
    INDEX_PART,
    build_trigger_index,
)
from eventindex.storage import MapFileReader, WriteOptions, write_mapfile
from spark_jobs.sidecars import (
    SidecarResult,
    SidecarSummary,
    SidecarTask,
    matching_datasets,
    plan_sidecars,
    run_sidecars,
    sidecar_files,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Index map-files hold a few thousand bitmap rows: small row groups keep a lookup cheap.
INDEX_WRITE_OPTIONS = WriteOptions(row_group_rows=1024)


@dataclass(frozen=True)
class IndexResult(SidecarResult):
    """A written trigger index, and how many events its master holds."""

    events: int


@dataclass
class IndexSummary(SidecarSummary):
    events: int = 0
    index_bytes: int = 0
    bitmaps: int = 0
    indexes: list[TagFile] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "events": self.events,
            "bitmaps": self.bitmaps,
            "index_bytes": self.index_bytes,
            "bytes_per_event": self.index_bytes / self.events if self.events else 0.0,
            "skipped_already_indexed": self.skipped,
            **self.timings("events", self.events),
        }


def trigger_indexes(catalog: Catalog, dataset: str | None = None) -> dict[str, list[TagFile]]:
    """Committed trigger index entries by the master file id they index."""
    return sidecar_files(catalog, INDEX_PART, dataset)


def plan_index(
    catalog: Catalog,
    store_root: str,
    dataset_pattern: str,
    *,
    collection: str | None = None,
    rebuild: bool = False,
) -> tuple[list[SidecarTask], int]:
    """The master files to index (and how many already have an index and are skipped)."""
    datasets = matching_datasets(catalog, dataset_pattern, collection)
    return plan_sidecars(catalog, store_root, datasets, INDEX_PART, rebuild=rebuild)


def index_file(task: SidecarTask) -> IndexResult:
    """Executor side: index one master file and write its index map-file (atomically)."""
    start = time.perf_counter()
    with MapFileReader(task.master_uri) as reader:
        table = reader.read(list(INDEX_COLUMNS))
    index = build_trigger_index(table)
    info = write_mapfile(
        index,
        task.sidecar_uri,
        INDEX_KEY,
        INDEX_WRITE_OPTIONS,
        metadata={"dataset": task.dataset, "file_id": task.sidecar_id, "master": task.master_id},
    )
    return IndexResult(task, info, time.perf_counter() - start, events=table.num_rows)


def _attributes(task: SidecarTask) -> dict[str, str]:
    return {"master_rows": str(task.master_rows)}


def run_index(
    catalog: Catalog,
    tasks: Sequence[SidecarTask],
    *,
    spark: SparkSession | None = None,
    progress: Callable[[IndexResult], None] | None = None,
) -> IndexSummary:
    """Index every task's master file (on Spark executors when ``spark`` is given, else in
    this process) and commit each index in the catalog as it is written."""
    indexes: list[TagFile] = []
    summary = IndexSummary(indexes=indexes)

    def add(entry: TagFile, result: IndexResult) -> None:
        indexes.append(entry)
        summary.events += result.events
        summary.index_bytes += result.info.bytes
        summary.bitmaps += result.info.rows

    run_sidecars(
        catalog,
        tasks,
        index_file,
        summary,
        add,
        attributes=_attributes,
        spark=spark,
        progress=progress,
    )
    return summary
