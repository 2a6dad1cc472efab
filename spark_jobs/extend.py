"""The Extender: columns computed elsewhere added to a dataset as vertical parts.

Input: a table keyed like the collection (``run_number``, ``event_number`` for
events) with the new columns, as a Parquet file or folder or a CSV file.
Output: for every live master file of the dataset, one extension file (kind
``extension``, ``part`` = the extension's name, attribute ``master``) with the
master's keys in the master's row order and the new columns, null for master
rows the input has no row for. Pickers then return the columns with the event
(``eventindex.query.extensions``).

Plan (driver): the dataset's live master files, the part's current files
(a new run of the same part replaces them), and a check of the input's schema
(key columns present and integer, new columns clashing with neither the event
record nor another part of the dataset). Keys before anything is written: a
key held twice in the input, or a key that no master file holds, is an error
that names a few of them (a Spark job on Spark, NumPy here with ``--local``).
Transform (executors): read one master's keys and the input rows of its key
range, align them (``eventindex.storage.merge.align_extension``), write the
file. Each task reads only the input's rows in its master's key range, a
range read when the input is sorted by key (Parquet statistics prune the
rest). Main: every output registered as ``writing`` first, and all of them
committed in ONE catalog step at the end (each superseding the part's previous
file of its master), so the dataset gains the columns everywhere at once.
"""

from __future__ import annotations

import functools
import operator
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from catalog.base import Catalog
from catalog.fileset import FilesetWriter, committed_entry, forget_files
from catalog.model import FileKind, TagFile, new_file_id
from eventindex.errors import NotFoundError, ValidationError
from eventindex.query.extensions import MASTER_ATTRIBUTE
from eventindex.records.schema import EVENT_SCHEMA, OBJECT_SCHEMA
from eventindex.storage import MapFileInfo, MapFileReader, WriteOptions, write_mapfile
from eventindex.storage.filesystem import resolve
from eventindex.storage.merge import (
    SAMPLE_KEYS,
    align_extension,
    cast_keys,
    duplicate_extension_keys,
    encoded_keys,
)
from spark_jobs.fanout import fan_out

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

COLUMNS_ATTRIBUTE = "columns"  # the part's columns, comma-separated (for clash checks)
PART_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
FORMATS = ("parquet", "csv")


@dataclass(frozen=True)
class ExtensionSource:
    """Where the new columns come from: a Parquet file or folder, or a CSV file."""

    uri: str
    format: str
    key: tuple[str, ...]
    columns: tuple[str, ...]


def open_source(
    uri: str, key: Sequence[str], *, fmt: str | None = None, columns: Sequence[str] | None = None
) -> ExtensionSource:
    """Check the input's schema: key columns present and integer, columns known and not
    clashing with the record; ``ValidationError`` naming the file and column otherwise."""
    chosen = fmt or ("csv" if uri.lower().endswith(".csv") else "parquet")
    if chosen not in FORMATS:
        raise ValidationError(f"{uri}: unknown extension format {chosen!r} (known: {FORMATS})")
    try:
        schema = _dataset(uri, chosen).schema
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValidationError(f"{uri}: cannot read as {chosen}: {exc}") from None
    for name in key:
        if name not in schema.names:
            raise ValidationError(f"{uri}: key column {name!r} is missing (has {schema.names})")
        if not pa.types.is_integer(schema.field(name).type):
            raise ValidationError(
                f"{uri}: key column {name!r} must hold integers, not {schema.field(name).type}"
            )
    wanted = list(columns) if columns else [n for n in schema.names if n not in key]
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise ValidationError(f"{uri}: no column {unknown[0]!r} (has {schema.names})")
    if not wanted:
        raise ValidationError(f"{uri}: no columns besides the key {list(key)}")
    record = set(EVENT_SCHEMA.names) | set(OBJECT_SCHEMA.names)
    clash = [c for c in wanted if c in record or c in key]
    if clash:
        raise ValidationError(f"{uri}: column {clash[0]!r} is a field of the record already")
    return ExtensionSource(uri, chosen, tuple(key), tuple(wanted))


def _dataset(uri: str, fmt: str) -> pads.Dataset:
    filesystem, path = resolve(uri)
    return pads.dataset(path, format=fmt, filesystem=filesystem)


def _at_least(names: Sequence[str], values: Sequence[int]) -> pads.Expression:
    """Rows whose key is >= ``values`` (lexicographic over the key columns)."""
    column, value = pads.field(names[0]), values[0]
    if len(names) == 1:
        return column >= value
    return (column > value) | ((column == value) & _at_least(names[1:], values[1:]))


def _at_most(names: Sequence[str], values: Sequence[int]) -> pads.Expression:
    column, value = pads.field(names[0]), values[0]
    if len(names) == 1:
        return column <= value
    return (column < value) | ((column == value) & _at_most(names[1:], values[1:]))


def read_source(
    source: ExtensionSource,
    key_types: Sequence[pa.DataType],
    key_range: tuple[Sequence[int], Sequence[int]] | None = None,
) -> pa.Table:
    """The input's key and extension columns (of one key range), keys cast to the
    master's types."""
    where = None
    if key_range is not None:
        where = functools.reduce(
            operator.and_,
            [_at_least(source.key, key_range[0]), _at_most(source.key, key_range[1])],
        )
    try:
        table = _dataset(source.uri, source.format).to_table(
            columns=[*source.key, *source.columns], filter=where
        )
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValidationError(f"{source.uri}: {exc}") from None
    try:
        return cast_keys(table, source.key, key_types)
    except ValidationError as exc:
        raise ValidationError(f"{source.uri}: {exc}") from None


@dataclass(frozen=True)
class ExtendTask:
    dataset: str
    part: str
    source: ExtensionSource
    key_types: tuple[pa.DataType, ...]
    master_id: str
    master_uri: str
    master_rows: int
    output_id: str
    output_uri: str
    replaces: tuple[str, ...]  # this part's previous file of the master
    options: WriteOptions


@dataclass(frozen=True)
class ExtendResult:
    task: ExtendTask
    info: MapFileInfo
    missing: int  # master rows the input has no values for
    seconds: float


@dataclass
class ExtendSummary:
    dataset: str = ""
    part: str = ""
    columns: tuple[str, ...] = ()
    files: int = 0
    events: int = 0
    events_without_values: int = 0
    replaced_files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    extensions: list[TagFile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "part": self.part,
            "columns": list(self.columns),
            "files": self.files,
            "events": self.events,
            "events_without_values": self.events_without_values,
            "replaced_files": self.replaced_files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
        }


def _parts_of(catalog: Catalog, dataset: str) -> list[TagFile]:
    masters = {e.file_id for e in catalog.list_tagfiles(dataset=dataset, kinds=[FileKind.MASTER])}
    return [
        e
        for e in catalog.list_tagfiles(dataset=dataset, kinds=[FileKind.EXTENSION])
        if e.attributes.get(MASTER_ATTRIBUTE) in masters
    ]


def plan_extension(
    catalog: Catalog,
    store_root: str,
    dataset_name: str,
    part: str,
    source: ExtensionSource,
    options: WriteOptions,
) -> list[ExtendTask]:
    """One task per live master file of the dataset."""
    if PART_NAME.match(part) is None:
        raise ValidationError(
            f"extension name {part!r}: a letter, then letters, digits or '_' (at most 64)"
        )
    dataset = catalog.get_dataset(dataset_name)
    collection = catalog.get_collection(dataset.collection)
    if tuple(collection.key) != source.key:
        raise ValidationError(
            f"{source.uri}: keyed by {list(source.key)}, dataset {dataset.name} by "
            f"{list(collection.key)}"
        )
    masters = catalog.list_tagfiles(dataset=dataset.name, kinds=[FileKind.MASTER])
    if not masters:
        raise NotFoundError(f"dataset {dataset.name} has no committed master files to extend")
    current = _parts_of(catalog, dataset.name)
    for entry in current:
        if entry.part == part:
            continue
        taken = set(entry.attributes.get(COLUMNS_ATTRIBUTE, "").split(","))
        clash = sorted(taken & set(source.columns))
        if clash:
            raise ValidationError(
                f"column {clash[0]!r} is already in extension {entry.part!r} of {dataset.name}"
            )
    previous: dict[str, list[str]] = {}
    for entry in current:
        if entry.part == part:
            previous.setdefault(entry.attributes[MASTER_ATTRIBUTE], []).append(entry.file_id)
    with MapFileReader(masters[0].uri) as reader:
        key_types = tuple(reader.schema.field(k).type for k in source.key)
    writer = FilesetWriter(catalog, store_root)
    tasks = []
    for master in masters:
        output_id = new_file_id()
        tasks.append(
            ExtendTask(
                dataset=dataset.name,
                part=part,
                source=source,
                key_types=key_types,
                master_id=master.file_id,
                master_uri=master.uri,
                master_rows=master.rows,
                output_id=output_id,
                output_uri=writer.uri_for(dataset, FileKind.EXTENSION, output_id, part),
                replaces=tuple(previous.get(master.file_id, ())),
                options=options,
            )
        )
    return tasks


# -- key checks, before anything is written ------------------------------------------
def _key_error(source: ExtensionSource, dataset: str, count: int, sample: list[Any]) -> None:
    raise ValidationError(
        f"{source.uri}: {count} key(s) are in no master file of dataset {dataset}, "
        f"e.g. {sample}: extend the dataset that holds those events"
    )


def check_keys(tasks: Sequence[ExtendTask]) -> None:
    """In this process: every input key once, and every one in some master file."""
    if not tasks:
        return
    source, first = tasks[0].source, tasks[0]
    keys = read_source(source, first.key_types).select(list(source.key))
    repeated = duplicate_extension_keys(keys, source.key)
    if repeated:
        raise ValidationError(f"{source.uri}: keys given more than once, e.g. {repeated}")
    held = []
    for task in tasks:
        with MapFileReader(task.master_uri) as reader:
            held.append(encoded_keys(reader.read(list(source.key)), source.key))
    unmatched = ~np.isin(encoded_keys(keys, source.key), np.concatenate(held))
    if unmatched.any():
        rows = np.flatnonzero(unmatched)[:SAMPLE_KEYS]
        sample = [tuple(r.values()) for r in keys.take(pa.array(rows)).to_pylist()]
        _key_error(source, first.dataset, int(unmatched.sum()), sample)


def _spark_frame(spark: SparkSession, source: ExtensionSource) -> DataFrame:
    if source.format == "csv":
        return spark.read.option("header", True).option("inferSchema", True).csv(source.uri)
    return spark.read.parquet(source.uri)


def check_keys_spark(spark: SparkSession, tasks: Sequence[ExtendTask]) -> None:
    """``check_keys`` as a Spark job, for inputs too large for one process."""
    if not tasks:
        return
    from pyspark.sql import functions as sf

    source = tasks[0].source
    key = list(source.key)
    wide = "decimal(20,0)"  # holds uint64 event numbers and int64 ids alike
    keys = _spark_frame(spark, source).select(*[sf.col(k).cast(wide).alias(k) for k in key])
    repeated = keys.groupBy(*key).count().where(sf.col("count") > 1).limit(SAMPLE_KEYS).collect()
    if repeated:
        sample = [tuple(int(r[k]) for k in key) for r in repeated]
        raise ValidationError(f"{source.uri}: keys given more than once, e.g. {sample}")
    masters = spark.read.parquet(*[t.master_uri for t in tasks]).select(
        *[sf.col(k).cast(wide).alias(k) for k in key]
    )
    unmatched = keys.join(masters.distinct(), on=key, how="left_anti")
    sample_rows = unmatched.limit(SAMPLE_KEYS).collect()
    if sample_rows:
        sample = [tuple(int(r[k]) for k in key) for r in sample_rows]
        _key_error(source, tasks[0].dataset, unmatched.count(), sample)


# -- the transform ------------------------------------------------------------------
def extend_file(task: ExtendTask) -> ExtendResult:
    """Executor side: one master file's extension file, written atomically."""
    start = time.perf_counter()
    key = list(task.source.key)
    with MapFileReader(task.master_uri) as reader:
        master_keys = reader.read(key)
    key_range = (
        [int(v) for v in master_keys.slice(0, 1).to_pylist()[0].values()],
        [int(v) for v in master_keys.slice(master_keys.num_rows - 1).to_pylist()[0].values()],
    )
    rows = read_source(task.source, task.key_types, key_range)
    aligned = align_extension(master_keys, rows, key)
    info = write_mapfile(
        aligned.table,
        task.output_uri,
        key,
        task.options,
        {"dataset": task.dataset, "file_id": task.output_id, "master": task.master_id},
    )
    return ExtendResult(task, info, aligned.missing, time.perf_counter() - start)


def run_extension(
    catalog: Catalog,
    tasks: Sequence[ExtendTask],
    *,
    spark: SparkSession | None = None,
    progress: Callable[[ExtendResult], None] | None = None,
) -> ExtendSummary:
    """Check the keys, write every extension file, and commit them all in one step."""
    start = time.perf_counter()
    summary = ExtendSummary()
    if not tasks:
        return summary
    summary.dataset, summary.part = tasks[0].dataset, tasks[0].part
    summary.columns = tasks[0].source.columns
    if spark is not None:
        check_keys_spark(spark, tasks)
    else:
        check_keys(tasks)
    collection = catalog.get_dataset(summary.dataset).collection
    entries = {
        task.output_id: TagFile(
            file_id=task.output_id,
            dataset=task.dataset,
            collection=collection,
            kind=FileKind.EXTENSION,
            uri=task.output_uri,
            part=task.part,
            attributes={
                MASTER_ATTRIBUTE: task.master_id,
                COLUMNS_ATTRIBUTE: ",".join(task.source.columns),
            },
        )
        for task in tasks
    }
    catalog.add_tagfiles(list(entries.values()))
    try:
        commits = []
        for result in fan_out(spark, tasks, extend_file):
            info = result.info
            pending = entries[result.task.output_id]
            commits.append(committed_entry(pending, info, supersedes=result.task.replaces))
            summary.events += info.rows
            summary.bytes += info.bytes
            summary.events_without_values += result.missing
            summary.replaced_files += len(result.task.replaces)
            if progress is not None:
                progress(result)
        summary.extensions = catalog.commit_tagfiles(commits)
    except BaseException:
        forget_files(catalog, list(entries.values()))
        raise
    summary.files = len(summary.extensions)
    summary.seconds = time.perf_counter() - start
    return summary
