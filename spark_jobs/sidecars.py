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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from catalog.base import Catalog
from catalog.fileset import FilesetWriter
from catalog.model import Dataset, FileKind, FileState, TagFile, new_file_id
from eventindex.errors import NotFoundError
from eventindex.records.schema import RecordKind
from eventindex.storage.locations import MASTER_ATTRIBUTE
from spark_jobs.fanout import fan_out, forget

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


class SidecarTask(Protocol):
    """A planned sidecar, naming the sidecars of its master that it supersedes."""

    @property
    def replaces(self) -> tuple[str, ...]: ...


T = TypeVar("T", bound=SidecarTask)


@dataclass(frozen=True)
class SidecarResult(Generic[T]):
    """What an executor reports for a written sidecar (the jobs add their own figures)."""

    task: T
    rows: int
    bytes: int
    checksum: str
    key_min: tuple[int, ...]
    key_max: tuple[int, ...]
    seconds: float


R = TypeVar("R", bound=SidecarResult[Any])


@dataclass
class SidecarSummary:
    """What every sidecar job reports; the jobs add their own figures."""

    files: int = 0
    seconds: float = 0.0
    transform_seconds: float = 0.0
    skipped: int = 0

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
    task: Callable[[Dataset, TagFile, str, str, tuple[str, ...]], T],
    *,
    rebuild: bool = False,
) -> tuple[list[T], int]:
    """``task(dataset, master, sidecar_id, sidecar_uri, replaces)`` for every master of
    ``datasets`` that needs a sidecar, and how many were skipped as already having one."""
    writer = FilesetWriter(catalog, store_root)
    tasks: list[T] = []
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
            tasks.append(task(dataset, master, sidecar_id, uri, tuple(p.file_id for p in previous)))
    return tasks, skipped


def sidecar_entry(
    *,
    file_id: str,
    dataset: str,
    collection: str,
    uri: str,
    part: str,
    master_id: str,
    attributes: Mapping[str, str] | None = None,
) -> TagFile:
    """The ``writing`` catalog entry of a planned sidecar."""
    return TagFile(
        file_id=file_id,
        dataset=dataset,
        collection=collection,
        kind=FileKind.INDEX,
        uri=uri,
        part=part,
        state=FileState.WRITING,
        attributes={MASTER_ATTRIBUTE: master_id, **(attributes or {})},
    )


def run_sidecars(
    catalog: Catalog,
    tasks: Sequence[T],
    entry: Callable[[T], TagFile],
    write: Callable[[T], R],
    summary: SidecarSummary,
    add: Callable[[TagFile, R], None],
    *,
    spark: SparkSession | None = None,
    progress: Callable[[R], None] | None = None,
) -> None:
    """Register every task's sidecar, run ``write`` per task (on the executors of
    ``spark``, else here; a module-level function) and commit each sidecar as it arrives,
    counting it in ``summary`` (the job's own figures through ``add``). On failure, the
    sidecars not committed yet are removed."""
    start = time.perf_counter()
    if not tasks:
        return
    entries = [entry(task) for task in tasks]
    catalog.add_tagfiles(entries)
    done: set[str] = set()
    try:
        # fan_out yields the results in task order.
        for task, pending, result in zip(tasks, entries, fan_out(spark, tasks, write), strict=True):
            written = catalog.commit_tagfile(
                replace(
                    pending,
                    rows=result.rows,
                    bytes=result.bytes,
                    checksum=result.checksum,
                    key_min=result.key_min,
                    key_max=result.key_max,
                    state=FileState.COMMITTED,
                    committed_at=time.time(),
                    supersedes=task.replaces,
                )
            )
            done.add(written.file_id)
            summary.files += 1
            summary.transform_seconds += result.seconds
            add(written, result)
            if progress is not None:
                progress(result)
    except BaseException:
        forget(catalog, [e for e in entries if e.file_id not in done])
        raise
    summary.seconds = time.perf_counter() - start
