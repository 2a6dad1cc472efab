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

import fnmatch
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from catalog.base import Catalog
from catalog.fileset import FilesetWriter
from catalog.model import FileKind, FileState, TagFile, new_file_id
from eventindex.errors import NotFoundError
from eventindex.query.trigger_index import (
    INDEX_COLUMNS,
    INDEX_KEY,
    INDEX_PART,
    MASTER_ATTRIBUTE,
    build_trigger_index,
)
from eventindex.storage import MapFileReader, WriteOptions, write_mapfile
from spark_jobs.fanout import fan_out, forget

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
class IndexResult:
    task: IndexTask
    rows: int
    bytes: int
    checksum: str
    key_min: tuple[int, ...]
    key_max: tuple[int, ...]
    events: int
    seconds: float


@dataclass
class IndexSummary:
    files: int = 0
    events: int = 0
    index_bytes: int = 0
    bitmaps: int = 0
    seconds: float = 0.0
    transform_seconds: float = 0.0
    skipped: int = 0
    indexes: list[TagFile] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "events": self.events,
            "bitmaps": self.bitmaps,
            "index_bytes": self.index_bytes,
            "bytes_per_event": self.index_bytes / self.events if self.events else 0.0,
            "skipped_already_indexed": self.skipped,
            "seconds": round(self.seconds, 3),
            "transform_seconds": round(self.transform_seconds, 3),
            "events_per_second_per_core": (
                round(self.events / self.transform_seconds) if self.transform_seconds else 0
            ),
        }


def trigger_indexes(catalog: Catalog, dataset: str | None = None) -> dict[str, list[TagFile]]:
    """Committed trigger index entries by the master file id they index."""
    found: dict[str, list[TagFile]] = {}
    for entry in catalog.list_tagfiles(dataset=dataset, kinds=[FileKind.INDEX]):
        if entry.part == INDEX_PART and MASTER_ATTRIBUTE in entry.attributes:
            found.setdefault(entry.attributes[MASTER_ATTRIBUTE], []).append(entry)
    return found


def plan_index(
    catalog: Catalog,
    store_root: str,
    dataset_pattern: str,
    *,
    collection: str | None = None,
    rebuild: bool = False,
) -> tuple[list[IndexTask], int]:
    """The master files to index (and how many already have an index and are skipped)."""
    datasets = [
        d for d in catalog.list_datasets(collection) if fnmatch.fnmatchcase(d.name, dataset_pattern)
    ]
    if not datasets:
        raise NotFoundError(f"no dataset matches {dataset_pattern!r}")
    writer = FilesetWriter(catalog, store_root)
    tasks: list[IndexTask] = []
    skipped = 0
    for dataset in datasets:
        existing = trigger_indexes(catalog, dataset.name)
        for master in catalog.list_tagfiles(dataset=dataset.name, kinds=[FileKind.MASTER]):
            previous = existing.get(master.file_id, [])
            if previous and not rebuild:
                skipped += 1
                continue
            index_id = new_file_id()
            tasks.append(
                IndexTask(
                    master_id=master.file_id,
                    master_uri=master.uri,
                    master_rows=master.rows,
                    dataset=dataset.name,
                    index_id=index_id,
                    index_uri=writer.uri_for(dataset, FileKind.INDEX, index_id, INDEX_PART),
                    replaces=tuple(p.file_id for p in previous),
                )
            )
    return tasks, skipped


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
        task,
        info.rows,
        info.bytes,
        info.checksum,
        info.key_min,
        info.key_max,
        table.num_rows,
        time.perf_counter() - start,
    )


def _entry(catalog: Catalog, task: IndexTask) -> TagFile:
    dataset = catalog.get_dataset(task.dataset)
    return TagFile(
        file_id=task.index_id,
        dataset=task.dataset,
        collection=dataset.collection,
        kind=FileKind.INDEX,
        uri=task.index_uri,
        part=INDEX_PART,
        state=FileState.WRITING,
        attributes={MASTER_ATTRIBUTE: task.master_id, "master_rows": str(task.master_rows)},
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
    start = time.perf_counter()
    summary = IndexSummary(indexes=[])
    if not tasks:
        return summary
    entries = {task.index_id: _entry(catalog, task) for task in tasks}
    catalog.add_tagfiles(list(entries.values()))
    committed: set[str] = set()
    try:
        for result in fan_out(spark, tasks, index_file):
            entry = catalog.commit_tagfile(
                replace(
                    entries[result.task.index_id],
                    rows=result.rows,
                    bytes=result.bytes,
                    checksum=result.checksum,
                    key_min=result.key_min,
                    key_max=result.key_max,
                    state=FileState.COMMITTED,
                    committed_at=time.time(),
                    supersedes=result.task.replaces,
                )
            )
            committed.add(entry.file_id)
            assert summary.indexes is not None
            summary.indexes.append(entry)
            summary.files += 1
            summary.events += result.events
            summary.index_bytes += result.bytes
            summary.bitmaps += result.rows
            summary.transform_seconds += result.seconds
            if progress is not None:
                progress(result)
    except BaseException:
        forget(catalog, [e for i, e in entries.items() if i not in committed])
        raise
    summary.seconds = time.perf_counter() - start
    return summary
