"""The locations job: a locations file (``eventindex.storage.locations``) for every master
TagFile of the matching datasets, so the Reader answers picks and batch lookups from
memory-mapped arrays instead of decoding Parquet row groups.

Plan (driver, from the catalog): the committed master files of an event collection
that have no locations file yet (all of them with ``rebuild``). Transform (executors,
no Spark API): read the master's key, attribute and reference columns and write its
locations file atomically. Main: register every planned file as ``writing``, fan the
files out over the executors, and commit each as it arrives, superseding the master's
previous locations file. Masters added later simply have none until the job runs
again (the Reader reads their map-files meanwhile); a retired master's locations file
is no longer consulted, since the Reader only looks them up for the masters it lists.
A failed job removes what it wrote.
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
from eventindex.query.reader import LOCATION_ATTRIBUTES
from eventindex.records.schema import EVENT_KEY, RecordKind
from eventindex.storage import MapFileReader
from eventindex.storage.locations import LOCATIONS_PART, MASTER_ATTRIBUTE, write_locations
from spark_jobs.fanout import fan_out, forget

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LOCATIONS_SUFFIX = "locations"


@dataclass(frozen=True)
class LocationsTask:
    """One master file, and where its locations file goes."""

    master_id: str
    master_uri: str
    dataset: str
    collection: str
    locations_id: str
    locations_uri: str
    replaces: tuple[str, ...]  # locations files of this master that the new one supersedes


@dataclass(frozen=True)
class LocationsResult:
    task: LocationsTask
    rows: int
    bytes: int
    checksum: str
    key_min: tuple[int, ...]
    key_max: tuple[int, ...]
    seconds: float


@dataclass
class LocationsSummary:
    files: int = 0
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    transform_seconds: float = 0.0
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "rows": self.rows,
            "bytes": self.bytes,
            "bytes_per_row": round(self.bytes / self.rows, 2) if self.rows else 0.0,
            "skipped_already_built": self.skipped,
            "seconds": round(self.seconds, 3),
            "transform_seconds": round(self.transform_seconds, 3),
            "rows_per_second_per_core": (
                round(self.rows / self.transform_seconds) if self.transform_seconds else 0
            ),
        }


def locations_files(catalog: Catalog, dataset: str | None = None) -> dict[str, list[TagFile]]:
    """Committed locations entries by the master file id they describe."""
    found: dict[str, list[TagFile]] = {}
    for entry in catalog.list_tagfiles(dataset=dataset, kinds=[FileKind.INDEX]):
        if entry.part == LOCATIONS_PART and MASTER_ATTRIBUTE in entry.attributes:
            found.setdefault(entry.attributes[MASTER_ATTRIBUTE], []).append(entry)
    return found


def plan_locations(
    catalog: Catalog,
    store_root: str,
    dataset_pattern: str = "*",
    *,
    collection: str | None = None,
    rebuild: bool = False,
) -> tuple[list[LocationsTask], int]:
    """The master files of event datasets to describe (and how many already are)."""
    kinds = {c.name: c.kind for c in catalog.list_collections()}
    datasets = [
        d
        for d in catalog.list_datasets(collection)
        if fnmatch.fnmatchcase(d.name, dataset_pattern)
        and kinds.get(d.collection) is RecordKind.EVENTS
    ]
    if not datasets:
        raise NotFoundError(f"no event dataset matches {dataset_pattern!r}")
    writer = FilesetWriter(catalog, store_root)
    tasks: list[LocationsTask] = []
    skipped = 0
    for dataset in datasets:
        existing = locations_files(catalog, dataset.name)
        for master in catalog.list_tagfiles(dataset=dataset.name, kinds=[FileKind.MASTER]):
            previous = existing.get(master.file_id, [])
            if previous and not rebuild:
                skipped += 1
                continue
            locations_id = new_file_id()
            uri = writer.uri_for(dataset, FileKind.INDEX, locations_id, LOCATIONS_PART)
            tasks.append(
                LocationsTask(
                    master_id=master.file_id,
                    master_uri=master.uri,
                    dataset=dataset.name,
                    collection=dataset.collection,
                    locations_id=locations_id,
                    # Not Parquet: named so that nothing takes it for a map-file.
                    locations_uri=uri.removesuffix(".parquet") + f".{LOCATIONS_SUFFIX}",
                    replaces=tuple(p.file_id for p in previous),
                )
            )
    return tasks, skipped


def locations_file(task: LocationsTask) -> LocationsResult:
    """Executor side: describe one master file in its locations file (written atomically)."""
    start = time.perf_counter()
    with MapFileReader(task.master_uri) as reader:
        table = reader.read([*EVENT_KEY, *LOCATION_ATTRIBUTES, "references"])
    info = write_locations(
        table,
        task.locations_uri,
        LOCATION_ATTRIBUTES,
        metadata={
            "dataset": task.dataset,
            "file_id": task.locations_id,
            MASTER_ATTRIBUTE: task.master_id,
        },
    )
    return LocationsResult(
        task,
        info.rows,
        info.bytes,
        info.checksum,
        info.key_min,
        info.key_max,
        time.perf_counter() - start,
    )


def run_locations(
    catalog: Catalog,
    tasks: Sequence[LocationsTask],
    *,
    spark: SparkSession | None = None,
    progress: Callable[[LocationsResult], None] | None = None,
) -> LocationsSummary:
    """Write every task's locations file (on Spark executors when ``spark`` is given,
    else in this process) and commit each in the catalog as it is written."""
    start = time.perf_counter()
    summary = LocationsSummary()
    if not tasks:
        return summary
    entries = {
        task.locations_id: TagFile(
            file_id=task.locations_id,
            dataset=task.dataset,
            collection=task.collection,
            kind=FileKind.INDEX,
            uri=task.locations_uri,
            part=LOCATIONS_PART,
            state=FileState.WRITING,
            attributes={MASTER_ATTRIBUTE: task.master_id},
        )
        for task in tasks
    }
    catalog.add_tagfiles(list(entries.values()))
    committed: set[str] = set()
    try:
        for result in fan_out(spark, tasks, locations_file):
            entry = catalog.commit_tagfile(
                replace(
                    entries[result.task.locations_id],
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
            summary.files += 1
            summary.rows += result.rows
            summary.bytes += result.bytes
            summary.transform_seconds += result.seconds
            if progress is not None:
                progress(result)
    except BaseException:
        forget(catalog, [e for i, e in entries.items() if i not in committed])
        raise
    summary.seconds = time.perf_counter() - start
    return summary
