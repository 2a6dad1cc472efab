"""``eventindex check``: consistency of a collection's datasets, as a Spark job.

Plan (driver, from the catalog): the collection's datasets and their committed
master files in the run range; files missing from the store are set aside and
reported, never read. Transform (pure, on DataFrames; ``check_frames``): from
``(dataset, file, run, event)`` rows and the ``(upstream, downstream, skim)``
pairs of datasets, the event count per dataset and run, the events that occur
more than once in a dataset (with the files that hold each copy), the upstream
events missing downstream (not asked of skims, which keep a fraction by
design), and the downstream events absent upstream (asked of every dataset).
Main: run the transform, build the report, and store one report file per
dataset (``eventindex.query.consistency``), superseding the previous one.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from catalog.base import Catalog
from catalog.fileset import FilesetWriter
from catalog.model import Dataset, FileKind, FileState, TagFile, new_file_id
from eventindex.query.consistency import (
    MAX_LISTED,
    REPORT_METADATA,
    REPORT_PART,
    report_entries,
)
from eventindex.query.triggers import RUN_NUMBER_MAX
from eventindex.storage import WriteOptions, exists, write_mapfile

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


@dataclass
class CheckPlan:
    collection: str
    run_min: int
    run_max: int
    datasets: list[Dataset]
    files: list[TagFile]  # present in the store: read
    missing: list[TagFile]  # committed in the catalog but not in the store: reported

    @property
    def dataset_ids(self) -> dict[str, int]:
        return {d.name: i for i, d in enumerate(self.datasets)}


def is_skim(dataset: Dataset) -> bool:
    """A derivation keeps a fraction of its upstream events by design."""
    return "keep_fraction" in dataset.attributes or dataset.format.upper().startswith("DAOD")


def plan_check(
    catalog: Catalog, collection: str, run_min: int | None = None, run_max: int | None = None
) -> CheckPlan:
    """The datasets and files of a collection to check (``NotFoundError`` if unknown)."""
    catalog.get_collection(collection)
    low = 0 if run_min is None else run_min
    high = RUN_NUMBER_MAX if run_max is None else run_max
    if low > high:
        raise ValueError(f"run range {low}-{high}: the first run is above the last")
    files = catalog.list_tagfiles(
        collection=collection, kinds=[FileKind.MASTER], first_key_range=(low, high)
    )
    names = {f.dataset for f in files}
    datasets = [d for d in catalog.list_datasets(collection) if d.name in names]
    present = [f for f in files if exists(f.uri)]
    missing = [f for f in files if not exists(f.uri)]
    return CheckPlan(collection, low, high, datasets, present, missing)


@dataclass
class CheckFrames:
    counts: DataFrame  # dataset, run_number, events
    duplicates: DataFrame  # dataset, run_number, event_number, copies, files
    missing_downstream: DataFrame  # dataset (downstream), run_number, event_number
    missing_upstream: DataFrame  # dataset (downstream), run_number, event_number


def check_frames(events: DataFrame, pairs: DataFrame) -> CheckFrames:
    """The pure transform: ``events`` has dataset, file, run_number, event_number (dataset
    and file as integer ids); ``pairs`` has upstream, downstream (ids) and skim."""
    from pyspark.sql import functions as sf

    key = ["run_number", "event_number"]
    counts = events.groupBy("dataset", "run_number").agg(sf.count(sf.lit(1)).alias("events"))
    duplicates = (
        events.groupBy("dataset", *key)
        .agg(
            sf.count(sf.lit(1)).alias("copies"),
            sf.sort_array(sf.collect_set("file")).alias("files"),
        )
        .where(sf.col("copies") > 1)
    )
    present = events.select("dataset", *key).distinct()
    upstream_events = present.join(
        pairs.select(sf.col("upstream").alias("dataset"), "downstream", "skim"), "dataset"
    )
    missing_downstream = (
        upstream_events.where(~sf.col("skim"))
        .select(sf.col("downstream").alias("dataset"), *key)
        .join(present, ["dataset", *key], "left_anti")
    )
    downstream_events = present.join(
        pairs.select("upstream", sf.col("downstream").alias("dataset")), "dataset"
    )
    missing_upstream = downstream_events.join(
        present.select(sf.col("dataset").alias("upstream"), *key), ["upstream", *key], "left_anti"
    ).select("dataset", *key)
    return CheckFrames(counts, duplicates, missing_downstream, missing_upstream)


def _local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def events_frame(spark: SparkSession, plan: CheckPlan) -> tuple[DataFrame, DataFrame]:
    """(events, pairs) DataFrames of a plan, dataset and file as integer ids."""
    from pyspark.sql import functions as sf

    ids = plan.dataset_ids
    files = spark.createDataFrame(
        [
            (posixpath.normpath(_local_path(f.uri)), ids[f.dataset], i)
            for i, f in enumerate(plan.files)
        ],
        "path string, dataset int, file int",
    )
    rows = (
        spark.read.parquet(*[f.uri for f in plan.files])
        .select("run_number", "event_number")
        .where(sf.col("run_number").between(plan.run_min, plan.run_max))
        .withColumn("path", sf.regexp_replace(sf.input_file_name(), "^file:(//)?", ""))
    )
    events = rows.join(sf.broadcast(files), "path").select(
        "dataset", "file", "run_number", "event_number"
    )
    pairs = spark.createDataFrame(
        [
            (ids[d.upstream], ids[d.name], is_skim(d))
            for d in plan.datasets
            if d.upstream is not None and d.upstream in ids
        ],
        "upstream int, downstream int, skim boolean",
    )
    return events, pairs


@dataclass
class _Listed:
    events: int = 0
    listed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"events": self.events, "listed": self.listed}


def _listed(frame: DataFrame, plan: CheckPlan, files: bool = False) -> dict[int, _Listed]:
    """Per dataset id: how many rows, and the first ``MAX_LISTED`` of them in key order."""
    from pyspark.sql import functions as sf

    found: dict[int, _Listed] = {}
    for row in frame.groupBy("dataset").agg(sf.count(sf.lit(1)).alias("n")).collect():
        found[int(row["dataset"])] = _Listed(int(row["n"]))
    for dataset_id, listed in found.items():
        first = (
            frame.where(sf.col("dataset") == dataset_id)
            .orderBy("run_number", "event_number")
            .limit(MAX_LISTED)
            .collect()
        )
        for row in first:
            item: dict[str, Any] = {
                "run_number": int(row["run_number"]),
                "event_number": int(row["event_number"]),
            }
            if files:
                item["copies"] = int(row["copies"])
                item["files"] = [plan.files[i].file_id for i in row["files"]]
            listed.listed.append(item)
    return found


def run_check(spark: SparkSession, plan: CheckPlan) -> dict[str, Any]:
    """Run the transform over a plan and build the collection report."""
    start = time.perf_counter()
    ids = plan.dataset_ids
    per_run: dict[int, dict[int, int]] = {}
    duplicates: dict[int, _Listed] = {}
    missing_down: dict[int, _Listed] = {}
    missing_up: dict[int, _Listed] = {}
    if plan.files:
        events, pairs = events_frame(spark, plan)
        frames = check_frames(events, pairs)
        for row in frames.counts.collect():
            runs = per_run.setdefault(int(row["dataset"]), {})
            runs[int(row["run_number"])] = int(row["events"])
        duplicates = _listed(frames.duplicates, plan, files=True)
        missing_down = _listed(frames.missing_downstream, plan)
        missing_up = _listed(frames.missing_upstream, plan)
    report_datasets: dict[str, Any] = {}
    problems = 0
    for dataset in plan.datasets:
        index = ids[dataset.name]
        runs = per_run.get(index, {})
        entry: dict[str, Any] = {
            "dataset": dataset.name,
            "format": dataset.format,
            "processing_tag": dataset.processing_tag,
            "upstream": dataset.upstream if dataset.upstream in ids else None,
            "skim": is_skim(dataset),
            "events": sum(runs.values()),
            "files": sum(f.dataset == dataset.name for f in plan.files),
            "runs": {str(run): n for run, n in sorted(runs.items())},
            "missing_files": [f.uri for f in plan.missing if f.dataset == dataset.name],
            "duplicates": duplicates.get(index, _Listed()).to_dict(),
        }
        if entry["upstream"] is not None:
            if not entry["skim"]:
                entry["missing_from_this"] = missing_down.get(index, _Listed()).to_dict()
            entry["missing_upstream"] = missing_up.get(index, _Listed()).to_dict()
        problems += (
            len(entry["missing_files"])
            + entry["duplicates"]["events"]
            + entry.get("missing_from_this", {}).get("events", 0)
            + entry.get("missing_upstream", {}).get("events", 0)
        )
        report_datasets[dataset.name] = entry
    return {
        "collection": plan.collection,
        "run_min": plan.run_min,
        "run_max": plan.run_max,
        "checked_at": time.time(),
        "seconds": time.perf_counter() - start,
        "events": sum(d["events"] for d in report_datasets.values()),
        "files": len(plan.files) + len(plan.missing),
        "missing_files": len(plan.missing),
        "problems": problems,
        "datasets": report_datasets,
    }


REPORT_SCHEMA = pa.schema(
    [pa.field("run_number", pa.uint32(), nullable=False), pa.field("events", pa.uint64())]
)


def store_reports(
    catalog: Catalog, store_root: str, report: dict[str, Any], plan: CheckPlan
) -> list[TagFile]:
    """One report file per checked dataset, each superseding that dataset's previous one."""
    writer = FilesetWriter(catalog, store_root)
    stored = []
    shared = {k: v for k, v in report.items() if k != "datasets"}
    for dataset in plan.datasets:
        entry_report = {**shared, **report["datasets"][dataset.name]}
        runs = {int(r): n for r, n in entry_report["runs"].items()} or {plan.run_min: 0}
        table = pa.table(
            {
                "run_number": pa.array(list(runs), pa.uint32()),
                "events": pa.array(list(runs.values()), pa.uint64()),
            },
            schema=REPORT_SCHEMA,
        )
        previous = tuple(e.file_id for e in report_entries(catalog, dataset.name))
        file_id = new_file_id()
        entry = TagFile(
            file_id=file_id,
            dataset=dataset.name,
            collection=dataset.collection,
            kind=FileKind.INDEX,
            uri=writer.uri_for(dataset, FileKind.INDEX, file_id, REPORT_PART),
            part=REPORT_PART,
            state=FileState.WRITING,
        )
        catalog.add_tagfile(entry)
        info = write_mapfile(
            table,
            entry.uri,
            ("run_number",),
            WriteOptions(row_group_rows=4096),
            metadata={REPORT_METADATA: json.dumps(entry_report, sort_keys=True)},
        )
        stored.append(
            catalog.commit_tagfile(
                replace(
                    entry,
                    rows=info.rows,
                    bytes=info.bytes,
                    checksum=info.checksum,
                    key_min=info.key_min,
                    key_max=info.key_max,
                    state=FileState.COMMITTED,
                    committed_at=time.time(),
                    supersedes=previous,
                )
            )
        )
    return stored
