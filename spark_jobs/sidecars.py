"""Jobs that write one sidecar file per master file (trigger indexes, locations files).

A sidecar is an ``INDEX`` entry of a given part whose ``master`` attribute names the
master file it describes. Plan (driver): the committed masters of the chosen datasets
that lack a sidecar of that part (all of them with ``rebuild``). Main: register every
planned sidecar as ``writing``, fan the tasks out over the executors, and commit each
sidecar as it arrives, superseding the master's previous one, so a reader sees the old
or the new one, never both, never neither. A failed job removes what it wrote.
"""

from __future__ import annotations

import fnmatch
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from catalog.base import Catalog
from catalog.fileset import FilesetWriter, WrittenFile, committed_entry, forget_files
from catalog.model import Dataset, FileKind, FileState, TagFile, new_file_id
from eventindex.errors import NotFoundError
from eventindex.records.schema import RecordKind
from eventindex.storage.locations import MASTER_ATTRIBUTE
from spark_jobs.fanout import fan_out

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class SidecarTask:
    """One master file, and where its sidecar of ``part`` goes."""

    master_id: str
    master_uri: str
    master_rows: int
    dataset: str
    collection: str
    part: str
    sidecar_id: str
    sidecar_uri: str
    replaces: tuple[str, ...]  # sidecars of this master and part that the new one supersedes

    @classmethod
    def of(
        cls,
        master: TagFile,
        part: str,
        sidecar_id: str,
        sidecar_uri: str,
        replaces: tuple[str, ...] = (),
    ) -> SidecarTask:
        """The task that writes ``master``'s sidecar of ``part`` at ``sidecar_uri``."""
        return cls(
            master_id=master.file_id,
            master_uri=master.uri,
            master_rows=master.rows,
            dataset=master.dataset,
            collection=master.collection,
            part=part,
            sidecar_id=sidecar_id,
            sidecar_uri=sidecar_uri,
            replaces=replaces,
        )


@dataclass(frozen=True)
class SidecarResult:
    """What an executor reports for a written sidecar (the jobs add their own figures)."""

    task: SidecarTask
    info: WrittenFile
    seconds: float


R = TypeVar("R", bound=SidecarResult)


@dataclass
class SidecarSummary(ABC):
    """What every sidecar job reports; the jobs add their own figures."""

    files: int = 0
    seconds: float = 0.0
    transform_seconds: float = 0.0
    skipped: int = 0

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The figures to show: the job's own, then ``timings``."""

    def timings(self, unit: str, count: int) -> dict[str, Any]:
        """The wall and transform times, and ``count`` (of ``unit``) per transform second."""
        return {
            "seconds": round(self.seconds, 3),
            "transform_seconds": round(self.transform_seconds, 3),
            f"{unit}_per_second_per_core": (
                round(count / self.transform_seconds) if self.transform_seconds else 0
            ),
        }


def matching_datasets(
    catalog: Catalog, pattern: str, collection: str | None, *, events_only: bool = False
) -> list[Dataset]:
    """The datasets whose name matches the glob ``pattern`` (of event collections only,
    with ``events_only``); none is an error."""
    kinds = {c.name: c.kind for c in catalog.list_collections()} if events_only else {}
    datasets = [
        d
        for d in catalog.list_datasets(collection)
        if fnmatch.fnmatchcase(d.name, pattern)
        and (not events_only or kinds.get(d.collection) is RecordKind.EVENTS)
    ]
    if not datasets:
        what = "event dataset" if events_only else "dataset"
        raise NotFoundError(f"no {what} matches {pattern!r}")
    return datasets


def sidecar_files(
    catalog: Catalog, part: str, dataset: str | None = None
) -> dict[str, list[TagFile]]:
    """Committed sidecar entries of ``part`` by the master file id they describe."""
    found: dict[str, list[TagFile]] = {}
    for entry in catalog.list_tagfiles(dataset=dataset, kinds=[FileKind.INDEX]):
        if entry.part == part and MASTER_ATTRIBUTE in entry.attributes:
            found.setdefault(entry.attributes[MASTER_ATTRIBUTE], []).append(entry)
    return found


def plan_sidecars(
    catalog: Catalog,
    store_root: str,
    datasets: Iterable[Dataset],
    part: str,
    *,
    suffix: str = ".parquet",
    rebuild: bool = False,
) -> tuple[list[SidecarTask], int]:
    """A task for every master of ``datasets`` that needs a sidecar of ``part`` (a file
    named ``<part>.<id><suffix>``), and how many were skipped as already having one."""
    writer = FilesetWriter(catalog, store_root)
    tasks: list[SidecarTask] = []
    skipped = 0
    for dataset in datasets:
        existing = sidecar_files(catalog, part, dataset.name)
        for master in catalog.list_tagfiles(dataset=dataset.name, kinds=[FileKind.MASTER]):
            previous = existing.get(master.file_id, [])
            if previous and not rebuild:
                skipped += 1
                continue
            sidecar_id = new_file_id()
            uri = writer.uri_for(dataset, FileKind.INDEX, sidecar_id, part)
            uri = uri.removesuffix(".parquet") + suffix
            replaces = tuple(p.file_id for p in previous)
            tasks.append(SidecarTask.of(master, part, sidecar_id, uri, replaces))
    return tasks, skipped


def _writing_entry(task: SidecarTask, attributes: Mapping[str, str]) -> TagFile:
    return TagFile(
        file_id=task.sidecar_id,
        dataset=task.dataset,
        collection=task.collection,
        kind=FileKind.INDEX,
        uri=task.sidecar_uri,
        part=task.part,
        state=FileState.WRITING,
        attributes={MASTER_ATTRIBUTE: task.master_id, **attributes},
    )


def run_sidecars(
    catalog: Catalog,
    tasks: Sequence[SidecarTask],
    write: Callable[[SidecarTask], R],
    summary: SidecarSummary,
    add: Callable[[TagFile, R], None],
    *,
    attributes: Callable[[SidecarTask], Mapping[str, str]] = lambda _task: {},
    spark: SparkSession | None = None,
    progress: Callable[[R], None] | None = None,
) -> None:
    """Register every task's sidecar (its catalog entry with ``attributes(task)``), run
    ``write`` per task (on the executors of ``spark``, else here; a module-level
    function) and commit each sidecar as it arrives, counting it in ``summary`` (the
    job's own figures through ``add``). On failure, the sidecars not committed yet are
    removed."""
    start = time.perf_counter()
    if not tasks:
        return
    entries = [_writing_entry(task, attributes(task)) for task in tasks]
    catalog.add_tagfiles(entries)
    done: set[str] = set()
    try:
        # fan_out yields the results in task order.
        for task, pending, result in zip(tasks, entries, fan_out(spark, tasks, write), strict=True):
            written = catalog.commit_tagfile(
                committed_entry(pending, result.info, supersedes=task.replaces)
            )
            done.add(written.file_id)
            summary.files += 1
            summary.transform_seconds += result.seconds
            add(written, result)
            if progress is not None:
                progress(result)
    except BaseException:
        forget_files(catalog, [e for e in entries if e.file_id not in done])
        raise
    summary.seconds = time.perf_counter() - start
