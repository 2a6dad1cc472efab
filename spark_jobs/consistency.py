"""``eventindex check``: consistency of a collection's datasets, as a Spark job.

Plan (driver, from the catalog): the collection's datasets and their committed
master files in the run range; files missing from the store are set aside and
reported, never read. Datasets that can hold the same event (their run ranges
overlap, or one is upstream of the other) form a cluster, and each dataset gets
a slot in its cluster, so which datasets hold an event is a bit mask.

Transform (pure, on DataFrames): the key columns of every file (each file read
as its own scan, so its dataset's cluster and slot are constants, not a per-row
lookup) are aggregated once by ``(cluster, run, event)`` into the row count and
the slot mask (``presence``), and those into the number of events per
``(cluster, run, mask, duplicated)`` (``patterns``): a few rows per run, from
which every count follows on the driver: events per dataset and run, upstream
events missing downstream (not asked of skims, which keep a fraction by
design), downstream events absent upstream (asked of every dataset), and keys
held more than once in some dataset. That is one scan and one shuffle of the
key columns. Only when it finds a problem does a second pass list the first
``MAX_LISTED`` events of each problem (``problem_events``) and the duplicated
events with the files holding each copy (``duplicate_copies``).

Main: run the transform, build the report, and store one report file per
dataset (``eventindex.query.consistency``), superseding the previous one.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from catalog.base import Catalog
from catalog.fileset import FilesetWriter, committed_entry
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
    from pyspark.sql import Column, DataFrame, SparkSession

# Slots per mask word: a cluster of more datasets takes several words.
WORD_BITS = 64
# Spark reads uint64 as decimal(20, 0): the key is carried as the signed long of the
# same 64 bits (exact, and cheap to hash), and turned back on the driver.
_TWO_64 = 2**64
# Rows per partition of the one shuffle: a few million keys fit a task's hash map.
ROWS_PER_PARTITION = 4_000_000
KEY_SCHEMA = "run_number long, event_number decimal(20,0)"


@dataclass
class CheckPlan:
    collection: str
    run_min: int
    run_max: int
    datasets: list[Dataset]
    files: list[TagFile]  # present in the store: read
    missing: list[TagFile]  # committed in the catalog but not in the store: reported
    # dataset name -> (cluster, slot): datasets that can share an event share a cluster.
    slots: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = assign_slots(self.datasets, self.files + self.missing)

    @property
    def dataset_ids(self) -> dict[str, int]:
        return {d.name: i for i, d in enumerate(self.datasets)}

    @property
    def words(self) -> int:
        """Mask words per event: enough for the largest cluster."""
        largest = max((slot for _, slot in self.slots.values()), default=0) + 1
        return (largest + WORD_BITS - 1) // WORD_BITS

    def pairs(self) -> list[tuple[Dataset, Dataset]]:
        """(upstream, downstream) pairs of checked datasets."""
        by_name = {d.name: d for d in self.datasets}
        return [
            (by_name[d.upstream], d)
            for d in self.datasets
            if d.upstream is not None and d.upstream in by_name
        ]


def is_skim(dataset: Dataset) -> bool:
    """A derivation keeps a fraction of its upstream events by design."""
    return "keep_fraction" in dataset.attributes or dataset.format.upper().startswith("DAOD")


def assign_slots(datasets: list[Dataset], files: list[TagFile]) -> dict[str, tuple[int, int]]:
    """(cluster, slot) of each dataset: datasets whose run ranges overlap, and datasets
    linked upstream-downstream, share a cluster; slots number a cluster's datasets."""
    names = [d.name for d in datasets]
    parent = {name: name for name in names}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def join(a: str, b: str) -> None:
        parent[root(a)] = root(b)

    spans: dict[str, tuple[int, int]] = {}
    for f in files:
        if f.dataset in parent and f.key_min and f.key_max:
            low, high = spans.get(f.dataset, (f.key_min[0], f.key_max[0]))
            spans[f.dataset] = (min(low, f.key_min[0]), max(high, f.key_max[0]))
    reach: tuple[int, str] | None = None  # (last run, dataset) of the current overlap run
    for name, (low, high) in sorted(spans.items(), key=lambda item: item[1]):
        if reach is not None and low <= reach[0]:
            join(name, reach[1])
            reach = (max(reach[0], high), reach[1])
        else:
            reach = (high, name)
    for d in datasets:
        if d.upstream is not None and d.upstream in parent:
            join(d.name, d.upstream)
    clusters: dict[str, int] = {}
    sizes: dict[int, int] = defaultdict(int)
    slots: dict[str, tuple[int, int]] = {}
    for name in names:
        cluster = clusters.setdefault(root(name), len(clusters))
        slots[name] = (cluster, sizes[cluster])
        sizes[cluster] += 1
    return slots


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


# -- the transform -------------------------------------------------------------


def _mask_names(words: int) -> list[str]:
    return [f"mask{w}" for w in range(words)]


def _bit(slot: int) -> Column:
    """The one-bit long of a slot within its mask word."""
    from pyspark.sql import functions as sf

    return sf.shiftleft(sf.lit(1).cast("long"), slot % WORD_BITS)


def has_slot(slot: int) -> Column:
    """Is the dataset of ``slot`` among those holding the event (of a presence row)?"""
    from pyspark.sql import functions as sf

    held: Column = sf.col(f"mask{slot // WORD_BITS}").bitwiseAND(_bit(slot)) != 0
    return held


def presence(events: DataFrame, words: int, partitions: int | None = None) -> DataFrame:
    """One row per (cluster, run_number, event_number) of ``events`` (which has those and
    ``slot``): ``rows``, how many records hold the key, and ``mask0..``, which slots do.

    With ``partitions``, rows are hash-partitioned by key into that many first: a file
    holds each key once, so combining before the shuffle would only cost time.
    """
    from pyspark.sql import functions as sf

    key = ["cluster", "run_number", "event_number"]
    if partitions is not None:
        events = events.repartition(partitions, *key)

    word = sf.floor(sf.col("slot") / WORD_BITS) if words > 1 else None
    bit = sf.expr(f"shiftleft(1L, slot % {WORD_BITS})")
    masks = [
        sf.bit_or(bit if word is None else sf.when(word == w, bit).otherwise(0)).alias(name)
        for w, name in enumerate(_mask_names(words))
    ]
    return events.groupBy(*key).agg(sf.count(sf.lit(1)).alias("rows"), *masks)


def duplicated(words: int) -> Column:
    """A key held twice in one dataset: more records than datasets holding it."""
    from pyspark.sql import functions as sf

    held: Column = sf.lit(0)
    for name in _mask_names(words):
        held = held + sf.bit_count(sf.col(name))
    more: Column = sf.col("rows") > held
    return more


def patterns(present: DataFrame, words: int) -> DataFrame:
    """Events per (cluster, run_number, mask0.., duplicated): every count the report needs."""
    from pyspark.sql import functions as sf

    return present.groupBy(
        "cluster", "run_number", *_mask_names(words), duplicated(words).alias("duplicated")
    ).agg(sf.count(sf.lit(1)).alias("events"))


@dataclass(frozen=True)
class Pair:
    """An (upstream, downstream) pair as dataset ids, in one cluster."""

    upstream: int
    downstream: int
    cluster: int
    upstream_slot: int
    downstream_slot: int
    skim: bool


MISSING_HERE = "missing_from_this"
NOT_UPSTREAM = "missing_upstream"


def problem_events(present: DataFrame, words: int, pairs: list[Pair]) -> DataFrame:
    """(dataset, problem, run_number, event_number) of every upstream event missing from a
    non-skim downstream dataset (``MISSING_HERE``) and every downstream event absent
    upstream (``NOT_UPSTREAM``); ``dataset`` is the downstream dataset's id."""
    from pyspark.sql import functions as sf

    found = []
    for pair in pairs:
        in_cluster = sf.col("cluster") == pair.cluster
        up, down = has_slot(pair.upstream_slot), has_slot(pair.downstream_slot)
        if not pair.skim:
            found.append((pair.downstream, MISSING_HERE, in_cluster & up & ~down))
        found.append((pair.downstream, NOT_UPSTREAM, in_cluster & down & ~up))
    if not found:
        return present.sparkSession.createDataFrame(
            [], "dataset int, problem string, run_number long, event_number long"
        )
    tags = sf.array(
        *[
            sf.when(condition, sf.struct(sf.lit(d).alias("dataset"), sf.lit(p).alias("problem")))
            for d, p, condition in found
        ]
    )
    return (
        present.select("run_number", "event_number", sf.explode(tags).alias("tag"))
        .where(sf.col("tag").isNotNull())
        .select("tag.dataset", "tag.problem", "run_number", "event_number")
    )


def duplicate_copies(events: DataFrame, keys: DataFrame) -> DataFrame:
    """(dataset, run_number, event_number, copies, files) of every key of ``keys`` held
    more than once in one dataset, with the ids of the files holding the copies."""
    from pyspark.sql import functions as sf

    return (
        events.join(keys, ["cluster", "run_number", "event_number"], "left_semi")
        .groupBy("dataset", "run_number", "event_number")
        .agg(
            sf.count(sf.lit(1)).alias("copies"),
            sf.sort_array(sf.collect_set("file")).alias("files"),
        )
        .where(sf.col("copies") > 1)
    )


def first_in_key_order(frame: DataFrame, by: list[str], count: int) -> DataFrame:
    """The first ``count`` rows of each ``by`` group in unsigned (run, event) order."""
    from pyspark.sql import Window
    from pyspark.sql import functions as sf

    order = Window.partitionBy(*by).orderBy(
        "run_number", sf.col("event_number") < 0, "event_number"
    )
    return frame.withColumn("_n", sf.row_number().over(order)).where(sf.col("_n") <= count)


def events_frame(spark: SparkSession, plan: CheckPlan) -> DataFrame:
    """(cluster, slot, dataset, file, run_number, event_number) of every row in the plan's
    run range; each file is its own scan, so the ids are constants of it."""
    from functools import reduce

    from pyspark.sql import functions as sf

    ids = plan.dataset_ids
    event = sf.col("event_number")
    # A plain cast for every event number below 2**63 (all in practice); decimal
    # arithmetic only for the rest, whose cast fails.
    signed = sf.coalesce(
        event.try_cast("long"),
        (event - sf.lit(Decimal(_TWO_64))).cast("long"),
    )
    scans = []
    for index, entry in enumerate(plan.files):
        cluster, slot = plan.slots[entry.dataset]
        scans.append(
            spark.read.schema(KEY_SCHEMA)
            .parquet(entry.uri)
            .where(sf.col("run_number").between(plan.run_min, plan.run_max))
            .select(
                sf.lit(cluster).alias("cluster"),
                sf.lit(slot).alias("slot"),
                sf.lit(ids[entry.dataset]).alias("dataset"),
                sf.lit(index).alias("file"),
                "run_number",
                signed.alias("event_number"),
            )
        )
    return reduce(lambda a, b: a.unionAll(b), scans)


def _unsigned(event: int) -> int:
    return event + _TWO_64 if event < 0 else event


# -- main ------------------------------------------------------------------------


@dataclass
class _Listed:
    events: int = 0
    listed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"events": self.events, "listed": self.listed}


@dataclass
class _Counts:
    """What the check found, per dataset id."""

    rows: dict[int, dict[int, int]] = field(default_factory=dict)  # dataset -> run -> rows
    duplicates: dict[int, _Listed] = field(default_factory=dict)
    problems: dict[str, dict[int, _Listed]] = field(
        default_factory=lambda: {MISSING_HERE: {}, NOT_UPSTREAM: {}}
    )


def _pairs(plan: CheckPlan) -> list[Pair]:
    ids = plan.dataset_ids
    pairs = []
    for upstream, downstream in plan.pairs():
        cluster, up_slot = plan.slots[upstream.name]
        _, down_slot = plan.slots[downstream.name]
        pairs.append(
            Pair(
                ids[upstream.name],
                ids[downstream.name],
                cluster,
                up_slot,
                down_slot,
                is_skim(downstream),
            )
        )
    return pairs


def _count(spark: SparkSession, plan: CheckPlan) -> _Counts:
    """Job 1 (always): the pattern counts; job 2 (only on problems): the listings."""
    from pyspark.sql import functions as sf

    ids = plan.dataset_ids
    at = {plan.slots[d.name]: ids[d.name] for d in plan.datasets}
    pairs = _pairs(plan)
    words = plan.words
    events = events_frame(spark, plan)
    rows = sum(f.rows for f in plan.files)
    parallelism = spark.sparkContext.defaultParallelism
    partitions = max(parallelism, -(-rows // ROWS_PER_PARTITION))
    present = presence(events, words, partitions)
    found = _Counts()
    any_duplicated = False
    for row in patterns(present, words).collect():
        cluster, run, n = int(row["cluster"]), int(row["run_number"]), int(row["events"])
        mask = 0
        for w, name in enumerate(_mask_names(words)):
            mask |= (int(row[name]) % _TWO_64) << (w * WORD_BITS)
        any_duplicated = any_duplicated or bool(row["duplicated"])
        slot = 0
        while mask >> slot:
            if mask >> slot & 1:
                runs = found.rows.setdefault(at[(cluster, slot)], {})
                runs[run] = runs.get(run, 0) + n
            slot += 1
        for pair in pairs:
            if pair.cluster != cluster:
                continue
            up, down = mask >> pair.upstream_slot & 1, mask >> pair.downstream_slot & 1
            if up and not down and not pair.skim:
                found.problems[MISSING_HERE].setdefault(pair.downstream, _Listed()).events += n
            if down and not up:
                found.problems[NOT_UPSTREAM].setdefault(pair.downstream, _Listed()).events += n
    if any(found.problems.values()):
        listed = first_in_key_order(
            problem_events(present, words, pairs), ["dataset", "problem"], MAX_LISTED
        )
        for row in listed.orderBy("dataset", "problem", "_n").collect():
            found.problems[row["problem"]][int(row["dataset"])].listed.append(
                {
                    "run_number": int(row["run_number"]),
                    "event_number": _unsigned(int(row["event_number"])),
                }
            )
    if any_duplicated:
        keys = present.where(duplicated(words)).select("cluster", "run_number", "event_number")
        copies = duplicate_copies(events, keys).persist()
        try:
            extra = copies.groupBy("dataset", "run_number").agg(
                sf.count(sf.lit(1)).alias("events"), sf.sum(sf.col("copies") - 1).alias("extra")
            )
            for row in extra.collect():
                dataset, run = int(row["dataset"]), int(row["run_number"])
                found.duplicates.setdefault(dataset, _Listed()).events += int(row["events"])
                found.rows[dataset][run] += int(row["extra"])
            for row in (
                first_in_key_order(copies, ["dataset"], MAX_LISTED)
                .orderBy("dataset", "_n")
                .collect()
            ):
                found.duplicates[int(row["dataset"])].listed.append(
                    {
                        "run_number": int(row["run_number"]),
                        "event_number": _unsigned(int(row["event_number"])),
                        "copies": int(row["copies"]),
                        "files": [plan.files[i].file_id for i in row["files"]],
                    }
                )
        finally:
            copies.unpersist()
    return found


def run_check(spark: SparkSession, plan: CheckPlan) -> dict[str, Any]:
    """Run the transform over a plan and build the collection report."""
    start = time.perf_counter()
    ids = plan.dataset_ids
    found = _count(spark, plan) if plan.files else _Counts()
    missing_down = found.problems[MISSING_HERE]
    missing_up = found.problems[NOT_UPSTREAM]
    report_datasets: dict[str, Any] = {}
    problems = 0
    for dataset in plan.datasets:
        index = ids[dataset.name]
        runs = found.rows.get(index, {})
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
            "duplicates": found.duplicates.get(index, _Listed()).to_dict(),
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
        stored.append(catalog.commit_tagfile(committed_entry(entry, info, supersedes=previous)))
    return stored
