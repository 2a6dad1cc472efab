"""Shared scans on Spark: the scan worker's walk, one Spark job per step.

Plan (driver, ``SharedScan``): which of the next ``units_per_step`` units each
query riding the walk still needs. Transform (``eventindex.query.scan.
evaluate_unit``, pure and tested without Spark): a task reads its unit once,
with the union of the columns its queries use, and evaluates every one of them
on it, returning each query's partial result (or its error). Main (here): one
task per unit, the partials collected to the driver, where each query's
accumulator absorbs them in walk order. The plans are the same as the local
worker's (each task compiles the queries' SQL against the same table), so both
executors give the same answers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from eventindex.errors import EventIndexError
from eventindex.query.scan import UnitOutcome, evaluate_unit
from eventindex.query.tables import ScanTable

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def _evaluate(
    table: ScanTable, max_rows: int, item: tuple[int, list[tuple[str, str]]]
) -> UnitOutcome:
    unit, queries = item
    return evaluate_unit(table, unit, queries, max_rows)


class SparkScanEvaluator:
    """Evaluates walk steps as Spark jobs (a ``ScanEvaluator`` for ``SharedScan``)."""

    def __init__(self, spark: SparkSession, units_per_step: int) -> None:
        if units_per_step < 1:
            raise ValueError("units_per_step must be at least 1")
        self.spark = spark
        self._units_per_step = units_per_step

    @property
    def units_per_step(self) -> int:
        return self._units_per_step

    def evaluate(
        self,
        table: ScanTable,
        work: Sequence[tuple[int, Sequence[tuple[str, str]]]],
        max_rows: int,
    ) -> list[UnitOutcome]:
        """One task per unit of ``work``; ``EventIndexError`` if the job fails."""
        from py4j.protocol import Py4JError  # type: ignore[import-untyped]
        from pyspark.errors import PySparkException

        items = [(unit, list(queries)) for unit, queries in work]
        if not items:
            return []
        context = self.spark.sparkContext
        context.setJobDescription(f"shared scan of {table.name}: {len(items)} units")
        try:
            rdd = context.parallelize(items, numSlices=len(items))
            outcomes: list[UnitOutcome] = rdd.map(
                functools.partial(_evaluate, table, max_rows)
            ).collect()
        except (Py4JError, PySparkException) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EventIndexError(f"the Spark job of the walk failed: {first}") from exc
        return outcomes
