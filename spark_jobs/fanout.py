"""Running one function per planned task on Spark executors (or in this process).

The jobs that write one file per task (compaction, conversion, extensions,
sidecars) plan on the driver, run a pure function per task on the executors,
and commit in the catalog on the driver (``catalog.fileset.committed_entry``
is an output's entry with what its writer learned, ``forget_files`` cleans
up the outputs of a failed job). Tasks go out one per partition, a wave of
``defaultParallelism`` at a time, so results (and progress) arrive as the
waves finish while every core stays busy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

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
