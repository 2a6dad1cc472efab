"""Running one function per planned task on Spark executors (or in this process).

The jobs that write one file per task (compaction, conversion, extensions,
sidecars) plan on the driver, run a pure function per task on the executors,
and commit in the catalog on the driver: ``committed`` is an output's entry
with what its writer learned, ``forget`` cleans up the outputs of a failed
job. Tasks go out one per partition, a wave of ``defaultParallelism`` at a
time, so results (and progress) arrive as the waves finish while every core
stays busy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol, TypeVar

from catalog.base import Catalog
from catalog.model import FileState, TagFile
from eventindex.errors import EventIndexError
from eventindex.storage import delete_file, exists

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

T = TypeVar("T")
R = TypeVar("R")


def _each(function: Callable[[T], R]) -> Callable[[Iterable[T]], Iterator[R]]:
    def run(tasks: Iterable[T]) -> Iterator[R]:
        for task in tasks:
            yield function(task)

    return run


def fan_out(
    spark: SparkSession | None, tasks: Sequence[T], function: Callable[[T], R]
) -> Iterator[R]:
    """``function(task)`` for every task, in task order: on the executors of ``spark``
    (``function`` must be a module-level function, so workers can import it), or
    here, one after the other, when ``spark`` is ``None``."""
    if spark is None:
        yield from map(function, tasks)
        return
    context = spark.sparkContext
    wave = max(1, int(context.defaultParallelism))
    for start in range(0, len(tasks), wave):
        batch = list(tasks[start : start + wave])
        rdd = context.parallelize(batch, numSlices=len(batch))
        results: list[R] = rdd.mapPartitions(_each(function)).collect()
        yield from results


class WrittenFile(Protocol):
    """What a writer learned about the file it wrote (``MapFileInfo``, ``LocationsInfo``)."""

    @property
    def rows(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def checksum(self) -> str: ...
    @property
    def key_min(self) -> tuple[int, ...]: ...
    @property
    def key_max(self) -> tuple[int, ...]: ...


def committed(
    entry: TagFile,
    info: WrittenFile,
    *,
    supersedes: tuple[str, ...] = (),
    message_ids: tuple[str, ...] = (),
    guids: tuple[str, ...] = (),
) -> TagFile:
    """An output's ``writing`` entry as it is committed now: what its writer learned, and
    the files it supersedes and the message ids and GUIDs it takes over."""
    return replace(
        entry,
        rows=info.rows,
        bytes=info.bytes,
        checksum=info.checksum,
        key_min=info.key_min,
        key_max=info.key_max,
        state=FileState.COMMITTED,
        committed_at=time.time(),
        supersedes=supersedes,
        message_ids=message_ids,
        guids=guids,
    )


def forget(catalog: Catalog, entries: Sequence[TagFile]) -> None:
    """Remove the files and ``writing`` entries of outputs that will not be committed
    (best effort: what a failing catalog keeps, ``catalog verify`` reports)."""
    for entry in entries:
        try:
            # A file committed meanwhile (a backend that commits row by row) stays.
            if catalog.get_tagfile(entry.file_id).state is not FileState.WRITING:
                continue
            if exists(entry.uri):
                delete_file(entry.uri)
            catalog.remove_tagfile(entry.file_id)
        except (EventIndexError, OSError):
            pass
