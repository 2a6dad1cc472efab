"""The Convertor: record files (CSV, JSON lines) into a map-file dataset, and datasets out
to plain Parquet for other tools.

``convert``: plan (driver) lists the input files, gives each a message id made
from its content checksum (``convert:<checksum>``), skips inputs whose id the
catalog has absorbed already (so converting a folder again adds only new
files, and compaction keeps the ids), and cuts the rest into groups of at most
``target_bytes`` input bytes. Transform (executors): read each input with the
reader the caller passes (the command passes ``producers.readers.read_events``,
the parser ``produce extract`` uses; this package does not import producers),
concatenate and write one sorted map-file. Main: register outputs as
``writing``, commit each with the message ids of its inputs as it arrives. A
bad input stops the job with the reader's error, which names the file, the
line or row and the field; what the job wrote is removed.

``export``: the committed master files of a dataset as one Parquet folder
partitioned by run, for tools that read folders (Spark SQL, DuckDB, pandas).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from catalog.base import Catalog
from catalog.fileset import FilesetWriter, committed_entry, forget_files, referenced_guids
from catalog.model import FileKind, TagFile, new_file_id
from eventindex.errors import NotFoundError, ValidationError
from eventindex.storage import MapFileInfo, MapFileReader, WriteOptions, write_mapfile
from eventindex.storage.filesystem import file_checksum, resolve
from eventindex.storage.merge import merge_tables
from spark_jobs.fanout import fan_out

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

RecordReader = Callable[[Path], pa.Table]
MESSAGE_PREFIX = "convert:"
SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class ConvertTask:
    dataset: str
    key: tuple[str, ...]
    inputs: tuple[str, ...]
    message_ids: tuple[str, ...]
    output_id: str
    output_uri: str
    options: WriteOptions
    read: RecordReader


@dataclass(frozen=True)
class ConvertResult:
    task: ConvertTask
    info: MapFileInfo | None
    guids: tuple[str, ...] = ()
    duplicates: int = 0
    error: str = ""  # the reader's message for a bad input (the job stops on it)


@dataclass
class ConvertSummary:
    dataset: str = ""
    inputs: int = 0
    skipped_already_converted: int = 0
    files: int = 0
    events: int = 0
    duplicated_events: int = 0
    bytes: int = 0
    seconds: float = 0.0
    outputs: list[TagFile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "inputs": self.inputs,
            "skipped_already_converted": self.skipped_already_converted,
            "files": self.files,
            "events": self.events,
            "duplicated_events": self.duplicated_events,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events / self.seconds) if self.seconds else 0,
        }


def input_files(paths: Sequence[str]) -> list[Path]:
    """The files named, folders expanded to their record files (sorted)."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise ValidationError(f"{path}: no such input file or folder")
    if not found:
        raise ValidationError(f"no record files ({', '.join(SUFFIXES)}) in {list(paths)}")
    return found


def plan_conversion(
    catalog: Catalog,
    store_root: str,
    paths: Sequence[str],
    dataset_name: str,
    read: RecordReader,
    options: WriteOptions,
    *,
    target_bytes: int,
) -> tuple[list[ConvertTask], int]:
    """The groups of inputs to convert, and how many inputs were converted before."""
    dataset = catalog.get_dataset(dataset_name)
    key = catalog.get_collection(dataset.collection).key
    files = input_files(paths)
    # Ids stay blake2b, whatever new map-files use: inputs converted before keep their id.
    ids = {str(f): MESSAGE_PREFIX + file_checksum(str(f.resolve()), "blake2b") for f in files}
    done = catalog.absorbed_message_ids(ids.values())
    todo = [f for f in files if ids[str(f)] not in done]
    writer = FilesetWriter(catalog, store_root)
    groups: list[list[Path]] = []
    size = 0
    for path in todo:
        length = path.stat().st_size
        if not groups or size + length > target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += length
    tasks = []
    for group in groups:
        output_id = new_file_id()
        tasks.append(
            ConvertTask(
                dataset=dataset.name,
                key=key,
                inputs=tuple(str(p) for p in group),
                message_ids=tuple(dict.fromkeys(ids[str(p)] for p in group)),
                output_id=output_id,
                output_uri=writer.uri_for(dataset, FileKind.MASTER, output_id),
                options=options,
                read=read,
            )
        )
    return tasks, len(files) - len(todo)


def convert_files(task: ConvertTask) -> ConvertResult:
    """Executor side: read one group of inputs and write it as one sorted map-file."""
    try:
        tables = [task.read(Path(p)) for p in task.inputs]
    except ValidationError as exc:
        return ConvertResult(task, None, error=str(exc))
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return ConvertResult(task, None)
    merged = merge_tables(tables, task.key)
    metadata = {"dataset": task.dataset, "file_id": task.output_id, "kind": "master"}
    info = write_mapfile(merged.table, task.output_uri, task.key, task.options, metadata)
    return ConvertResult(task, info, referenced_guids(merged.table), merged.duplicates)


def run_conversion(
    catalog: Catalog,
    tasks: Sequence[ConvertTask],
    *,
    spark: SparkSession | None = None,
    progress: Callable[[ConvertResult], None] | None = None,
) -> ConvertSummary:
    """Convert every group (on Spark executors when ``spark`` is given, else here) and
    commit each output with the message ids of its inputs."""
    start = time.perf_counter()
    summary = ConvertSummary(
        dataset=tasks[0].dataset if tasks else "", inputs=sum(len(t.inputs) for t in tasks)
    )
    if not tasks:
        return summary
    collection = catalog.get_dataset(tasks[0].dataset).collection
    entries = {
        t.output_id: TagFile(
            file_id=t.output_id,
            dataset=t.dataset,
            collection=collection,
            kind=FileKind.MASTER,
            uri=t.output_uri,
        )
        for t in tasks
    }
    catalog.add_tagfiles(list(entries.values()))
    done: set[str] = set()
    try:
        for result in fan_out(spark, tasks, convert_files):
            if result.error:
                raise ValidationError(result.error)
            task, info = result.task, result.info
            if info is None:  # inputs without a record: nothing to store, nothing to skip
                forget_files(catalog, [entries[task.output_id]])
                done.add(task.output_id)
                continue
            entry = catalog.commit_tagfile(
                committed_entry(
                    entries[task.output_id], info, message_ids=task.message_ids, guids=result.guids
                )
            )
            done.add(task.output_id)
            summary.outputs.append(entry)
            summary.files += 1
            summary.events += info.rows
            summary.bytes += info.bytes
            summary.duplicated_events += result.duplicates
            if progress is not None:
                progress(result)
    except BaseException:
        forget_files(catalog, [e for i, e in entries.items() if i not in done])
        raise
    summary.seconds = time.perf_counter() - start
    return summary


def export_dataset(
    catalog: Catalog,
    dataset_name: str,
    output_dir: str,
    *,
    spark: SparkSession | None = None,
) -> dict[str, Any]:
    """Write the dataset's committed master files as Parquet under ``output_dir``
    (a new folder), partitioned by the first key column (``run_number=<n>/``)."""
    dataset = catalog.get_dataset(dataset_name)
    key = catalog.get_collection(dataset.collection).key
    masters = catalog.list_tagfiles(dataset=dataset.name, kinds=[FileKind.MASTER])
    if not masters:
        raise NotFoundError(f"dataset {dataset.name} has no committed master files")
    filesystem, path = resolve(output_dir)
    if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        raise ValidationError(f"{output_dir}: exists already; name a new folder")
    start = time.perf_counter()
    if spark is not None:
        frame = spark.read.parquet(*[m.uri for m in masters])
        frame.write.partitionBy(key[0]).parquet(output_dir)
    else:
        for master in masters:
            with MapFileReader(master.uri) as reader:
                table = reader.read().replace_schema_metadata(None)
            pads.write_dataset(
                table,
                path,
                filesystem=filesystem,
                format="parquet",
                partitioning=[key[0]],
                partitioning_flavor="hive",
                basename_template=f"{master.file_id}-{{i}}.parquet",
                existing_data_behavior="overwrite_or_ignore",
            )
    return {
        "dataset": dataset.name,
        "files_read": len(masters),
        "events": sum(m.rows for m in masters),
        "output_dir": output_dir,
        "partitioned_by": key[0],
        "seconds": round(time.perf_counter() - start, 3),
    }
