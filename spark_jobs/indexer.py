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
from catalog.model import Dataset, TagFile
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
    matching_datasets,
    plan_sidecars,
    run_sidecars,
    sidecar_entry,
    sidecar_files,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Index map-files hold a few thousand bitmap rows: small row groups keep a lookup cheap.
INDEX_WRITE_OPTIONS = WriteOptions(row_group_rows=1024)


@dataclass(frozen=True)
class IndexTask:
    """One master file to index, and where its index goes."""

    master_id: str
    master_uri: str
    master_rows: int
    dataset: str
    index_id: str
    index_uri: str
    replaces: tuple[str, ...]  # index files of this master that the new one supersedes


@dataclass(frozen=True)
class IndexResult(SidecarResult[IndexTask]):
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
) -> tuple[list[IndexTask], int]:
    """The master files to index (and how many already have an index and are skipped)."""
    datasets = matching_datasets(catalog, dataset_pattern, collection)

    def task(
        dataset: Dataset, master: TagFile, index_id: str, uri: str, replaces: tuple[str, ...]
    ) -> IndexTask:
        return IndexTask(
            master_id=master.file_id,
            master_uri=master.uri,
            master_rows=master.rows,
            dataset=dataset.name,
            index_id=index_id,
            index_uri=uri,
            replaces=replaces,
        )

    return plan_sidecars(catalog, store_root, datasets, INDEX_PART, task, rebuild=rebuild)


def index_file(task: IndexTask) -> IndexResult:
    """Executor side: index one master file and write its index map-file (atomically)."""
    start = time.perf_counter()
    with MapFileReader(task.master_uri) as reader:
        table = reader.read(list(INDEX_COLUMNS))
    index = build_trigger_index(table)
    info = write_mapfile(
        index,
        task.index_uri,
        INDEX_KEY,
        INDEX_WRITE_OPTIONS,
        metadata={"dataset": task.dataset, "file_id": task.index_id, "master": task.master_id},
    )
    return IndexResult(
        task=task,
        rows=info.rows,
        bytes=info.bytes,
        checksum=info.checksum,
        key_min=info.key_min,
        key_max=info.key_max,
        seconds=time.perf_counter() - start,
        events=table.num_rows,
    )


def _entry(catalog: Catalog, task: IndexTask) -> TagFile:
    return sidecar_entry(
        file_id=task.index_id,
        dataset=task.dataset,
        collection=catalog.get_dataset(task.dataset).collection,
        uri=task.index_uri,
        part=INDEX_PART,
        master_id=task.master_id,
        attributes={"master_rows": str(task.master_rows)},
    )


def run_index(
    catalog: Catalog,
    tasks: Sequence[IndexTask],
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
        summary.index_bytes += result.bytes
        summary.bitmaps += result.rows

    run_sidecars(
        catalog,
        tasks,
        lambda task: _entry(catalog, task),
        index_file,
        summary,
        add,
        spark=spark,
        progress=progress,
    )
    return summary
