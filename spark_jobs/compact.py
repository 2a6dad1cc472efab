"""The Appender's compaction: many small TagFiles of a dataset into large sorted map-files.

Plan (driver, from the catalog): per dataset, the committed master files with
fewer rows than ``small_file_rows``, in key order, cut into groups of at most
``target_rows`` rows and ``target_bytes`` bytes; a group of two or more files
is one task. Each input's extension files (vertical parts) and trigger index
travel with it.

Transform (executors, no Spark API): read the group's files, merge them in key
order (``eventindex.storage.merge``: stable, every row kept, so a duplicated
event keeps every copy and the summary reports it), write one map-file, and
the group's extension parts reordered the same way, one file per part.

Main: register every output as ``writing`` first, fan the tasks out, and commit
each group's outputs in ONE catalog step (``commit_tagfiles``): the extension
files, then the master that supersedes the inputs, their extension files and
their trigger indexes. Readers see the old files or the new one, never both,
never neither; the message ids and GUIDs of the inputs stay with the catalog
(the new file inherits them). A failed job removes what it wrote; a crash
leaves ``writing`` entries and their files, which ``catalog verify`` reports.
Trigger indexes of the new files are built right after (``--no-index`` skips
that; queries then index a file on the fly until ``spark index`` runs).

Two compactions of one dataset at once: the catalog refuses a commit that
supersedes a file already retired (``SupersededError``), so the later job drops
that output and reports it under ``skipped_inputs_changed``.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from catalog.base import Catalog
from catalog.fileset import FilesetWriter, committed_entry, forget_files
from catalog.model import Dataset, FileKind, FileState, TagFile, new_file_id
from catalog.rules import SupersededError
from eventindex.config import CompactionSettings
from eventindex.errors import NotFoundError
from eventindex.query.trigger_index import INDEX_PART
from eventindex.storage import MapFileInfo, MapFileReader, WriteOptions, write_mapfile
from eventindex.storage.merge import merge_tables, reorder_like
from spark_jobs.fanout import fan_out
from spark_jobs.indexer import run_index, trigger_indexes
from spark_jobs.sidecars import SidecarTask

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

MASTER = "master"  # attribute of an extension entry: the master file it extends
COMPACTED_FROM = "compacted_from"


@dataclass(frozen=True)
class CompactInput:
    """One small master file and what travels with it."""

    file_id: str
    uri: str
    rows: int
    bytes: int
    extensions: tuple[tuple[str, str, str], ...]  # (part, file id, uri)
    indexes: tuple[str, ...]  # trigger index file ids of this master


@dataclass(frozen=True)
class CompactTask:
    dataset: str
    key: tuple[str, ...]
    inputs: tuple[CompactInput, ...]
    output_id: str
    output_uri: str
    parts: tuple[tuple[str, str, str], ...]  # (part, output file id, output uri)
    index_id: str  # the trigger index of the output, built if the inputs had one
    index_uri: str
    options: WriteOptions

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.inputs)


@dataclass(frozen=True)
class CompactResult:
    task: CompactTask
    master: MapFileInfo
    parts: dict[str, MapFileInfo]
    duplicates: int
    duplicate_keys: list[tuple[int, ...]]
    seconds: float


@dataclass
class CompactSummary:
    datasets: int = 0
    files_in: int = 0
    files_out: int = 0
    events: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    extension_files: int = 0
    duplicates: int = 0
    duplicate_keys: dict[str, list[list[int]]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    reindexed: int = 0
    seconds: float = 0.0
    transform_seconds: float = 0.0
    outputs: list[TagFile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "datasets": self.datasets,
            "files_in": self.files_in,
            "files_out": self.files_out,
            "events": self.events,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "extension_files": self.extension_files,
            "duplicated_events": self.duplicates,
            "duplicate_keys": self.duplicate_keys,
            "skipped_inputs_changed": self.conflicts,
            "indexes_built": self.reindexed,
            "seconds": round(self.seconds, 3),
            "transform_seconds": round(self.transform_seconds, 3),
            "events_per_second": round(self.events / self.seconds) if self.seconds else 0,
        }


def _groups(files: Sequence[TagFile], settings: CompactionSettings) -> list[list[TagFile]]:
    """Small files in key order, cut where a group would pass a target."""
    groups: list[list[TagFile]] = []
    current: list[TagFile] = []
    rows = size = 0
    for entry in sorted(files, key=lambda e: (e.key_min, e.key_max, e.file_id)):
        if current and (
            rows + entry.rows > settings.target_rows or size + entry.bytes > settings.target_bytes
        ):
            groups.append(current)
            current, rows, size = [], 0, 0
        current.append(entry)
        rows += entry.rows
        size += entry.bytes
    if current:
        groups.append(current)
    return [g for g in groups if len(g) > 1]


def _extensions(catalog: Catalog, dataset: str) -> dict[str, list[TagFile]]:
    """Committed extension files of a dataset by the master file they extend."""
    found: dict[str, list[TagFile]] = {}
    for entry in catalog.list_tagfiles(dataset=dataset, kinds=[FileKind.EXTENSION]):
        if MASTER in entry.attributes:
            found.setdefault(entry.attributes[MASTER], []).append(entry)
    return found


def plan_compaction(
    catalog: Catalog,
    store_root: str,
    dataset_pattern: str,
    settings: CompactionSettings,
    options: WriteOptions,
    *,
    collection: str | None = None,
    run_range: tuple[int, int] | None = None,
) -> list[CompactTask]:
    """The groups of small master files to merge, dataset by dataset.

    With ``run_range``, only files whose runs lie wholly inside it are taken
    (compact the runs whose data taking is over, leave the open ones alone).
    """
    datasets = [
        d for d in catalog.list_datasets(collection) if fnmatch.fnmatchcase(d.name, dataset_pattern)
    ]
    if not datasets:
        raise NotFoundError(f"no dataset matches {dataset_pattern!r}")
    writer = FilesetWriter(catalog, store_root)
    tasks: list[CompactTask] = []
    for dataset in datasets:
        key = catalog.get_collection(dataset.collection).key
        small = [
            f
            for f in catalog.list_tagfiles(dataset=dataset.name, kinds=[FileKind.MASTER])
            if f.rows < settings.small_file_rows
            and f.key_min
            and (run_range is None or run_range[0] <= f.key_min[0] <= f.key_max[0] <= run_range[1])
        ]
        groups = _groups(small, settings)
        if not groups:
            continue
        extensions = _extensions(catalog, dataset.name)
        indexes = trigger_indexes(catalog, dataset.name)
        for group in groups:
            tasks.append(_task(writer, dataset, key, group, extensions, indexes, options))
    return tasks


def _task(
    writer: FilesetWriter,
    dataset: Dataset,
    key: tuple[str, ...],
    group: Sequence[TagFile],
    extensions: dict[str, list[TagFile]],
    indexes: dict[str, list[TagFile]],
    options: WriteOptions,
) -> CompactTask:
    inputs = tuple(
        CompactInput(
            file_id=f.file_id,
            uri=f.uri,
            rows=f.rows,
            bytes=f.bytes,
            extensions=tuple(
                (e.part, e.file_id, e.uri)
                for e in sorted(extensions.get(f.file_id, []), key=lambda e: e.part)
            ),
            indexes=tuple(i.file_id for i in indexes.get(f.file_id, [])),
        )
        for f in group
    )
    output_id = new_file_id()
    index_id = new_file_id()
    part_names = sorted({part for i in inputs for part, _, _ in i.extensions})
    parts = []
    for part in part_names:
        part_id = new_file_id()
        parts.append((part, part_id, writer.uri_for(dataset, FileKind.EXTENSION, part_id, part)))
    return CompactTask(
        dataset=dataset.name,
        key=key,
        inputs=inputs,
        output_id=output_id,
        output_uri=writer.uri_for(dataset, FileKind.MASTER, output_id),
        parts=tuple(parts),
        index_id=index_id,
        index_uri=writer.uri_for(dataset, FileKind.INDEX, index_id, INDEX_PART),
        options=options,
    )


def _read(uri: str) -> pa.Table:
    with MapFileReader(uri) as reader:
        return reader.read()


def _part_tables(task: CompactTask, part: str, masters: Sequence[pa.Table]) -> list[pa.Table]:
    """Every input's table of one extension part, row-aligned with its master; an input
    without the part gets nulls (its events simply have no values yet)."""
    found: dict[int, pa.Table] = {}
    for number, item in enumerate(task.inputs):
        for name, _, uri in item.extensions:
            if name == part:
                table = _read(uri)
                if table.num_rows != masters[number].num_rows:
                    raise ValueError(
                        f"extension {part!r} of {item.file_id} has {table.num_rows} rows, "
                        f"its master {masters[number].num_rows}"
                    )
                found[number] = table
    schema = next(iter(found.values())).schema.remove_metadata()
    tables = []
    for number, master in enumerate(masters):
        table = found.get(number)
        if table is None:
            columns = [
                master.column(f.name) if f.name in task.key else pa.nulls(master.num_rows, f.type)
                for f in schema
            ]
            table = pa.Table.from_arrays(columns, schema=schema)
        tables.append(table.cast(schema))
    return tables


def compact_files(task: CompactTask) -> CompactResult:
    """Executor side: merge one group's files and write the outputs (each atomically)."""
    start = time.perf_counter()
    masters = [_read(item.uri) for item in task.inputs]
    merged = merge_tables(masters, task.key)
    metadata = {
        "dataset": task.dataset,
        "file_id": task.output_id,
        "kind": FileKind.MASTER.value,
        COMPACTED_FROM: str(len(task.inputs)),
    }
    info = write_mapfile(merged.table, task.output_uri, task.key, task.options, metadata)
    order, duplicates, duplicate_keys = merged.order, merged.duplicates, merged.duplicate_keys
    del merged  # the merged rows are written: free them before the parts are read
    parts: dict[str, MapFileInfo] = {}
    for part, part_id, uri in task.parts:
        table = reorder_like(_part_tables(task, part, masters), order)
        parts[part] = write_mapfile(
            table,
            uri,
            task.key,
            task.options,
            {"dataset": task.dataset, "file_id": part_id, "master": task.output_id},
        )
    return CompactResult(
        task,
        info,
        parts,
        duplicates,
        duplicate_keys,
        time.perf_counter() - start,
    )


def _entries(catalog: Catalog, task: CompactTask) -> list[TagFile]:
    """The ``writing`` entries of a task's outputs: extension parts first, then the master."""
    collection = catalog.get_dataset(task.dataset).collection
    entries = [
        TagFile(
            file_id=part_id,
            dataset=task.dataset,
            collection=collection,
            kind=FileKind.EXTENSION,
            uri=uri,
            part=part,
            attributes={MASTER: task.output_id},
        )
        for part, part_id, uri in task.parts
    ]
    entries.append(
        TagFile(
            file_id=task.output_id,
            dataset=task.dataset,
            collection=collection,
            kind=FileKind.MASTER,
            uri=task.output_uri,
            attributes={COMPACTED_FROM: str(len(task.inputs))},
        )
    )
    return entries


def _inputs_live(catalog: Catalog, task: CompactTask) -> bool:
    return all(
        catalog.get_tagfile(item.file_id).state is FileState.COMMITTED for item in task.inputs
    )


def run_compaction(
    catalog: Catalog,
    tasks: Sequence[CompactTask],
    *,
    spark: SparkSession | None = None,
    index: bool = True,
    progress: Callable[[CompactResult], None] | None = None,
) -> CompactSummary:
    """Run every task (on Spark executors when ``spark`` is given, else here) and commit
    each group's outputs in one catalog step as they arrive."""
    start = time.perf_counter()
    summary = CompactSummary(datasets=len({t.dataset for t in tasks}))
    if not tasks:
        return summary
    entries = {task.output_id: _entries(catalog, task) for task in tasks}
    catalog.add_tagfiles([e for group in entries.values() for e in group])
    done: set[str] = set()
    reindex: list[SidecarTask] = []
    try:
        for result in fan_out(spark, tasks, compact_files):
            task = result.task
            pending = entries[task.output_id]
            if not _inputs_live(catalog, task):
                # Another job compacted (or retired) an input meanwhile: drop this output.
                forget_files(catalog, pending)
                done.add(task.output_id)
                summary.conflicts.append(task.output_id)
                continue
            old_parts = tuple(f for i in task.inputs for _, f, _ in i.extensions)
            old_indexes = tuple(f for i in task.inputs for f in i.indexes)
            superseded = tuple(i.file_id for i in task.inputs) + old_parts + old_indexes
            commits = [committed_entry(e, result.parts[e.part]) for e in pending[:-1]]
            commits.append(committed_entry(pending[-1], result.master, supersedes=superseded))
            try:
                written = catalog.commit_tagfiles(commits)
            except SupersededError:
                # Another job committed over an input since the check above.
                forget_files(catalog, pending)
                done.add(task.output_id)
                summary.conflicts.append(task.output_id)
                continue
            done.add(task.output_id)
            master = written[-1]
            summary.outputs.append(master)
            summary.files_in += len(task.inputs)
            summary.files_out += 1
            summary.extension_files += len(task.parts)
            summary.events += result.master.rows
            summary.bytes_in += sum(i.bytes for i in task.inputs)
            summary.bytes_out += result.master.bytes
            summary.duplicates += result.duplicates
            if result.duplicate_keys:
                summary.duplicate_keys.setdefault(task.dataset, []).extend(
                    list(k) for k in result.duplicate_keys
                )
            summary.transform_seconds += result.seconds
            if index and old_indexes:
                reindex.append(SidecarTask.of(master, INDEX_PART, task.index_id, task.index_uri))
            if progress is not None:
                progress(result)
    except BaseException:
        forget_files(catalog, [e for i, group in entries.items() if i not in done for e in group])
        raise
    if reindex:
        summary.reindexed = run_index(catalog, reindex, spark=spark).files
    summary.seconds = time.perf_counter() - start
    return summary
