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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from catalog.base import Catalog
from catalog.model import TagFile
from eventindex.query.reader import LOCATION_ATTRIBUTES
from eventindex.records.schema import EVENT_KEY
from eventindex.storage import MapFileReader
from eventindex.storage.locations import LOCATIONS_PART, MASTER_ATTRIBUTE, write_locations
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

# Not Parquet: named so that nothing takes a locations file for a map-file.
LOCATIONS_SUFFIX = ".locations"


@dataclass
class LocationsSummary(SidecarSummary):
    rows: int = 0
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "rows": self.rows,
            "bytes": self.bytes,
            "bytes_per_row": round(self.bytes / self.rows, 2) if self.rows else 0.0,
            "skipped_already_built": self.skipped,
            **self.timings("rows", self.rows),
        }


def locations_files(catalog: Catalog, dataset: str | None = None) -> dict[str, list[TagFile]]:
    """Committed locations entries by the master file id they describe."""
    return sidecar_files(catalog, LOCATIONS_PART, dataset)


def plan_locations(
    catalog: Catalog,
    store_root: str,
    dataset_pattern: str = "*",
    *,
    collection: str | None = None,
    rebuild: bool = False,
) -> tuple[list[SidecarTask], int]:
    """The master files of event datasets to describe (and how many already are)."""
    datasets = matching_datasets(catalog, dataset_pattern, collection, events_only=True)
    return plan_sidecars(
        catalog, store_root, datasets, LOCATIONS_PART, suffix=LOCATIONS_SUFFIX, rebuild=rebuild
    )


def locations_file(task: SidecarTask) -> SidecarResult:
    """Executor side: describe one master file in its locations file (written atomically)."""
    start = time.perf_counter()
    with MapFileReader(task.master_uri) as reader:
        table = reader.read([*EVENT_KEY, *LOCATION_ATTRIBUTES, "references"])
    info = write_locations(
        table,
        task.sidecar_uri,
        LOCATION_ATTRIBUTES,
        metadata={
            "dataset": task.dataset,
            "file_id": task.sidecar_id,
            MASTER_ATTRIBUTE: task.master_id,
        },
    )
    return SidecarResult(task, info, time.perf_counter() - start)


def run_locations(
    catalog: Catalog,
    tasks: Sequence[SidecarTask],
    *,
    spark: SparkSession | None = None,
    progress: Callable[[SidecarResult], None] | None = None,
) -> LocationsSummary:
    """Write every task's locations file (on Spark executors when ``spark`` is given,
    else in this process) and commit each in the catalog as it is written."""
    summary = LocationsSummary()

    def add(_entry: TagFile, result: SidecarResult) -> None:
        summary.rows += result.info.rows
        summary.bytes += result.info.bytes

    run_sidecars(catalog, tasks, locations_file, summary, add, spark=spark, progress=progress)
    return summary
