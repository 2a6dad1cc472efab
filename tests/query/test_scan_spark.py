"""The scan worker's Spark executor: walk steps as Spark jobs give the local answers,
queries still join between steps, a failing query still leaves the others alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from eventindex.config import QuerySettings
from eventindex.query.registry import QueryRegistry, QueryState
from eventindex.query.scan import ScanWorker, SharedScan, evaluate_unit
from eventindex.query.sql import compile_query
from eventindex.query.tables import resolve_table
from spark_jobs.session import python_for_workers
from tests.query.scan_tables import QueryStores, build_query_stores, run_everywhere
from tests.query.test_scan import EVENTS, QUERIES
from tests.spark_session import spark

python_for_workers()

__all__ = ["spark"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryStores]:
    built = build_query_stores(tmp_path_factory.mktemp("scan-spark"))
    try:
        yield built
    finally:
        built.events.close()


def test_one_unit_evaluates_every_query_and_reports_failures(stores: QueryStores) -> None:
    table = resolve_table(stores.catalog, EVENTS)
    queries = [(f"q{n}", sql) for n, sql in enumerate(QUERIES)]
    queries += [("big", f"SELECT event_number FROM {EVENTS}"), ("bad", "SELECT nope FROM x")]
    outcome = evaluate_unit(table, 1, queries, 100)
    assert outcome.unit == 1
    assert set(outcome.partials) == {f"q{n}" for n in range(len(QUERIES))}
    assert outcome.errors["big"][1] == "too_many_rows"
    assert outcome.errors["bad"][1] in ("unknown_column", "unsupported", "syntax")


@pytest.mark.spark
def test_spark_steps_answer_as_the_local_walk(stores: QueryStores, spark: Any) -> None:
    from spark_jobs.shared_scan import SparkScanEvaluator

    table = resolve_table(stores.catalog, EVENTS)
    units = len(table.units)
    assert units >= 4
    plans = [compile_query(stores.catalog, sql, max_result_rows=500)[1] for sql in QUERIES]
    too_big = compile_query(
        stores.catalog, f"SELECT event_number FROM {EVENTS}", max_result_rows=500
    )[1]
    walk = SharedScan(table, max_queries=8, max_rows=500, evaluator=SparkScanEvaluator(spark, 3))
    walk.join("q0", plans[0])
    walk.join("big", too_big)
    finished = {d.query_id: d for d in walk.step().finished}
    # Joining after the first job: the walk is three units on.
    late = [walk.join(f"q{n}", plan) for n, plan in enumerate(plans) if n]
    assert {rider.joined_at for rider in late} == {3 % units}
    while not walk.idle:
        finished.update({d.query_id: d for d in walk.step().finished})
    assert finished["big"].error is not None and finished["big"].error_code == "too_many_rows"
    for number, sql in enumerate(QUERIES):
        done = finished[f"q{number}"]
        assert done.error is None and done.result is not None, done.error
        assert done.units_done == units
        assert done.result.equals(run_everywhere(stores, sql, 500))
    assert finished["q1"].units_shared == units  # every unit it read, it read with others


@pytest.mark.spark
def test_the_worker_runs_walks_on_spark(stores: QueryStores, spark: Any, tmp_path: Path) -> None:
    from spark_jobs.shared_scan import SparkScanEvaluator

    config = QuerySettings.model_validate(
        {
            "registry": str(tmp_path / "queries.sqlite"),
            "results_dir": str(tmp_path / "results"),
            "poll_seconds": 0.01,
            "executor": "spark",
        }
    )
    with QueryRegistry(config.registry) as registry:
        ids = [registry.submit(sql, EVENTS, "tester").id for sql in QUERIES[:2]]
        evaluator = SparkScanEvaluator(spark, config.spark_units_per_step)
        worker = ScanWorker(stores.catalog, registry, config, name="spark", evaluator=evaluator)
        worker.run(threading.Event(), until_idle=True)
        for query_id, sql in zip(ids, QUERIES, strict=False):
            record = registry.get(query_id)
            assert record.state is QueryState.DONE, record.error
            assert pq.read_table(record.result_path or "").equals(run_everywhere(stores, sql))
