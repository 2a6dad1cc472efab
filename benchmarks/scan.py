"""Shared scans: K concurrent full-table queries in one walk, against K separate passes.

The table is every RAW dataset of the shared generated store
(``benchmarks.common.ensure_event_store()``: 50 runs of 2 million events, so
100 million rows in 50 map-files), named by the pattern
``data15_13TeV.*.daq.RAW``. The queries are full scans with different filters
and aggregates over the numeric event columns (no key restriction, so none can
skip a unit).

Figures, all from the same run, after one warm-up pass over the columns used:

* ``shared_s``: wall time of K = 1, 4, 16 queries submitted together to a query
  registry and answered by the scan worker (one walk, each unit decoded once),
  the median of ``--repeat`` interleaved runs; ``ratio_4_to_1`` and
  ``ratio_16_to_1`` divide by K = 1 (goal: 16 in <= 2x one).
* ``independent_s``: the same K queries run by the worker one after the other,
  each with its own walk (no sharing); ``ratio_independent_16_to_1``.
* ``spark_s``: the same K queries by Spark SQL over the same Parquet files, one
  after the other (local master, driver memory 4g); ``ratio_spark_16_to_1``.
* ``pick_idle_ms`` / ``pick_during_scan_ms``: an event pick written as SQL
  (``run_number = R AND event_number = E`` on the whole collection, answered
  directly from the key index: compile + read), warm (every file opened once
  before), on an otherwise idle worker and while another process, set up as the
  scan worker is (``[queries] worker_nice``, default 10 nicer), walks the table
  with 16 queries; ``ratio_pick_busy_to_idle`` (goal: <= 2).

Every shared answer is checked equal to the independent one (``results_agree``).
``--parts`` runs only some of the figures (``independent,shared``, ``picks``,
``spark``), so that a long measurement can be split into shorter runs; the
Spark ratios then divide by Spark's own K = 1 (``spark_ratio_base``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit, ensure_event_store, percentiles_ms
from catalog import Catalog, SQLiteCatalog
from eventindex.config import QuerySettings, SparkSettings
from eventindex.query.registry import QueryRegistry, QueryState
from eventindex.query.scan import ScanWorker, SharedScan, background_worker, run_direct
from eventindex.query.sql import compile_query
from eventindex.query.tables import ScanTable, resolve_table

RAW_TABLE = "data15_13TeV.*.daq.RAW"
COLLECTION = "data15_13TeV.physics_Main"
MAX_ROWS = 1_000_000


def scan_queries(table: str, count: int) -> list[str]:
    """``count`` different full-scan queries: different filters and aggregates over one
    family of scan columns (run_number, lumi_block, bcid, mc_event_weight), as
    queries sharing a scan do. Query 0, the K = 1 baseline, reads all four."""
    t = f'"{table}"'
    templates = [
        "SELECT run_number, COUNT(*) AS n, AVG(mc_event_weight) AS w FROM {t} "
        "WHERE lumi_block > {c} AND bcid < {b} GROUP BY run_number ORDER BY run_number",
        "SELECT COUNT(*) AS n FROM {t} WHERE bcid BETWEEN {a} AND {b}",
        "SELECT MIN(mc_event_weight) AS lo, MAX(mc_event_weight) AS hi FROM {t} "
        "WHERE bcid IN ({a}, {b}, 7) OR lumi_block = {c}",
        "SELECT bcid, COUNT(*) AS n FROM {t} WHERE lumi_block < {c} GROUP BY bcid "
        "ORDER BY n DESC, bcid LIMIT 10",
        "SELECT SUM(lumi_block) AS s, COUNT(*) AS n FROM {t} WHERE mc_event_weight > {w}",
        "SELECT lumi_block, MAX(bcid) AS m FROM {t} WHERE bcid > {a} GROUP BY lumi_block "
        "ORDER BY lumi_block LIMIT 50",
        "SELECT run_number, SUM(bcid) AS s FROM {t} WHERE NOT (lumi_block BETWEEN {c} AND "
        "{d}) GROUP BY run_number ORDER BY run_number",
        "SELECT run_number, lumi_block, bcid FROM {t} WHERE bcid = {a} AND lumi_block = {c} "
        "ORDER BY run_number, lumi_block LIMIT 100",
    ]
    queries = []
    for number in range(count):
        template = templates[number % len(templates)]
        a = 100 + 37 * number
        c = 20 + 13 * number
        queries.append(template.format(t=t, a=a, b=a + 900, c=c, d=c + 40, w=0.5 + 0.03 * number))
    return queries


def _walk(table: ScanTable, plans: list[Any], max_queries: int) -> tuple[float, list[Any], int]:
    """One walk with every plan seated; (seconds, results in plan order, units read)."""
    started = time.perf_counter()
    walk = SharedScan(table, max_queries=max_queries, max_rows=MAX_ROWS)
    for number, plan in enumerate(plans):
        walk.join(str(number), plan)
    results: dict[str, Any] = {}
    while not walk.idle:
        for done in walk.step().finished:
            if done.error is not None:
                raise RuntimeError(f"query {done.query_id} failed: {done.error}")
            results[done.query_id] = done.result
    return (
        time.perf_counter() - started,
        [results[str(i)] for i in range(len(plans))],
        (walk.units_read),
    )


def _shared_through_registry(
    catalog: Catalog, queries: list[str], folder: Path
) -> tuple[float, list[Any], dict[str, Any]]:
    """K queries submitted together and run by the scan worker, as in production."""
    settings = QuerySettings(
        registry=str(folder / "queries.sqlite"),
        results_dir=str(folder / "results"),
        max_result_rows=MAX_ROWS,
        poll_seconds=0.01,
    )
    import pyarrow.parquet as pq

    with QueryRegistry(settings.registry) as registry:
        started = time.perf_counter()
        ids = [registry.submit(sql, RAW_TABLE, "bench").id for sql in queries]
        worker = ScanWorker(catalog, registry, settings, name="bench")
        worker.run(threading.Event(), until_idle=True)
        seconds = time.perf_counter() - started
        records = [registry.get(i) for i in ids]
        failed = [r for r in records if r.state is not QueryState.DONE]
        if failed:
            raise RuntimeError(f"query failed: {failed[0].error}")
        results = [pq.read_table(r.result_path or "") for r in records]
        shared = {
            "units_shared_per_query": [r.units_shared for r in records],
            "units_total": records[0].units_total,
        }
    return seconds, results, shared


def _spark_times(uris: list[str], queries: list[str], ks: list[int]) -> dict[str, float]:
    from spark_jobs.session import spark_session

    spark = spark_session(
        SparkSettings(
            master="local[*]",
            app_name="eventindex-bench-scan",
            conf={
                "spark.driver.memory": "4g",
                "spark.ui.enabled": "false",
                "spark.sql.shuffle.partitions": "4",
            },
        )
    )
    try:
        spark.read.parquet(*uris).createOrReplaceTempView("raw")
        spark_sql = [q.replace(f'"{RAW_TABLE}"', "raw") for q in queries]
        spark.sql(spark_sql[0]).collect()  # JIT, file listing and metadata warm-up
        times: dict[str, float] = {}
        for k in ks:
            started = time.perf_counter()
            for sql in spark_sql[:k]:
                spark.sql(sql).collect()
            times[str(k)] = round(time.perf_counter() - started, 2)
        return times
    finally:
        spark.stop()


def _pick_keys(table: ScanTable, count: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    keys = []
    for index in rng.choice(len(table.units), count):
        unit = table.units[int(index)]
        data = table.read_unit(unit, ["run_number", "event_number"]).slice(
            int(rng.integers(0, max(1, unit.rows - 1))), 1
        )
        keys.append((data["run_number"][0].as_py(), data["event_number"][0].as_py()))
    return keys


def _pick_latencies(catalog: Catalog, keys: list[tuple[int, int]]) -> list[float]:
    seconds = []
    for run, event in keys:
        sql = (
            f"SELECT dataset, lumi_block, timestamp FROM {COLLECTION} "
            f"WHERE run_number = {run} AND event_number = {event}"
        )
        started = time.perf_counter()
        table, plan = compile_query(catalog, sql, max_result_rows=MAX_ROWS)
        answer = run_direct(table, plan, MAX_ROWS)
        seconds.append(time.perf_counter() - started)
        if answer.num_rows == 0:
            raise RuntimeError(f"pick {run}/{event} found nothing")
    return seconds


def _background_walks(catalog_path: str, queries: list[str], stop: Any, ready: Any) -> None:
    """Keep a 16-query shared walk going until ``stop`` (another process, set up as the
    scan worker sets itself up: ``worker_nice`` nicer, ``worker_threads`` decoding)."""
    background_worker(QuerySettings())
    with SQLiteCatalog(catalog_path) as catalog:
        table = resolve_table(catalog, RAW_TABLE)
        plans = [compile_query(catalog, q, max_result_rows=MAX_ROWS)[1] for q in queries]
        walk = SharedScan(table, max_queries=len(plans), max_rows=MAX_ROWS)
        number = 0
        while not stop.is_set():
            for plan in plans:
                if walk.full:
                    break
                walk.join(str(number), plan)
                number += 1
            walk.step()
            ready.set()


PARTS = ("independent", "shared", "picks", "spark")


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="eventindex bench scan", description=__doc__)
    parser.add_argument("--ks", default="1,4,16", help="Concurrent query counts.")
    parser.add_argument("--no-spark", action="store_true", help="Skip the Spark SQL baseline.")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="Which figures, comma-separated (to split a long run): " + ", ".join(PARTS),
    )
    parser.add_argument("--picks", type=int, default=40, help="Picks timed idle and busy.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="Shared runs per K (median).")
    args = parser.parse_args(argv)
    ks = sorted({int(k) for k in args.ks.split(",")})
    if 1 not in ks:
        ks = [1, *ks]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")
    if args.no_spark:
        parts.discard("spark")
    _root, catalog_path = ensure_event_store()
    queries = scan_queries(RAW_TABLE, max(ks))
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {"table": RAW_TABLE, "parts": sorted(parts), "queries": queries}
    with SQLiteCatalog(catalog_path) as catalog, tempfile.TemporaryDirectory() as tmp:
        table = resolve_table(catalog, RAW_TABLE)
        plans = [compile_query(catalog, q, max_result_rows=MAX_ROWS)[1] for q in queries]
        result.update(rows=table.rows, units=len(table.units))
        columns = sorted({c for p in plans for c in p.columns})
        started = time.perf_counter()
        for unit in table.units:  # warm-up: the page cache holds the columns for everyone
            table.read_unit(unit, columns)
        result["warmup_pass_s"] = round(time.perf_counter() - started, 2)

        one: float | None = None
        alone_results: list[Any] = []
        independent: dict[str, float] = {}
        if "independent" in parts:
            for number, plan in enumerate(plans):
                seconds, answers, _ = _walk(table, [plan], 1)
                alone_results.extend(answers)
                for k in ks:
                    if number < k:
                        independent[str(k)] = independent.get(str(k), 0.0) + seconds
            result["independent_s"] = {k: round(v, 2) for k, v in independent.items()}
        if "shared" in parts:
            one = _shared_figures(catalog, queries, ks, args.repeat, Path(tmp), result)
            if alone_results:
                result["results_agree"] = all(
                    a.equals(b) for a, b in zip(result.pop("_answers"), alone_results, strict=False)
                )
            result.pop("_answers", None)
        base = one if one is not None else independent.get("1")
        for k in ks[1:]:
            if independent and base:
                result[f"ratio_independent_{k}_to_1"] = round(independent[str(k)] / base, 2)
            if independent and "shared_s" in result:
                result[f"speedup_shared_vs_independent_{k}"] = round(
                    independent[str(k)] / result["shared_s"][str(k)], 2
                )
        if "picks" in parts:
            _pick_figures(catalog, catalog_path, table, queries, args, result)
        if "spark" in parts:
            spark = _spark_times([u.uri for u in table.units], queries, ks)
            result["spark_s"] = spark
            # Against the shared walk's K = 1 when measured in this run, else Spark's own.
            result["spark_ratio_base"] = "shared_1" if one is not None else "spark_1"
            for k in ks[1:]:
                result[f"ratio_spark_{k}_to_1"] = round(spark[str(k)] / (one or spark["1"]), 2)
            if one is not None:
                result["spark_1_to_shared_1"] = round(spark["1"] / one, 2)
    if "ratio_16_to_1" in result:
        result["goal_16_within_2x_one"] = result["ratio_16_to_1"] <= 2.0
    if "ratio_pick_busy_to_idle" in result:
        result["goal_pick_within_2x_idle"] = result["ratio_pick_busy_to_idle"] <= 2.0
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def _shared_figures(
    catalog: Catalog,
    queries: list[str],
    ks: list[int],
    repeat: int,
    folder: Path,
    result: dict[str, Any],
) -> float:
    """K = 1, 4, 16 queries through the registry and the worker; the K = 1 time."""
    runs: dict[str, list[float]] = {str(k): [] for k in ks}
    sharing: dict[str, Any] = {}
    answers: list[Any] = []
    # Interleaved repeats, median kept: the machine is shared and noisy.
    for number in range(repeat):
        for k in ks:
            seconds, found, info = _shared_through_registry(
                catalog, queries[:k], folder / f"k{k}-{number}"
            )
            runs[str(k)].append(seconds)
            sharing[str(k)] = info
            if k == max(ks):
                answers = found
    shared = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    result["shared_runs_s"] = {k: [round(x, 2) for x in v] for k, v in runs.items()}
    result["shared_s"] = shared
    result["sharing"] = sharing
    result["_answers"] = answers
    one = shared["1"]
    for k in ks[1:]:
        result[f"ratio_{k}_to_1"] = round(shared[str(k)] / one, 2)
    return one


def _pick_figures(
    catalog: Catalog,
    catalog_path: str,
    table: ScanTable,
    queries: list[str],
    args: argparse.Namespace,
    result: dict[str, Any],
) -> None:
    """Interactive picks: idle, then while another process walks with 16 queries."""
    keys = _pick_keys(table, args.picks, args.seed)
    _pick_latencies(catalog, keys)  # open every file once, warm the key index
    idle = percentiles_ms(_pick_latencies(catalog, keys))
    context = multiprocessing.get_context("spawn")
    stop, ready = context.Event(), context.Event()
    background = context.Process(
        target=_background_walks, args=(catalog_path, queries, stop, ready)
    )
    background.start()
    try:
        ready.wait(300)
        busy = percentiles_ms(_pick_latencies(catalog, keys))
    finally:
        stop.set()
        background.join(60)
        if background.is_alive():
            background.terminate()
    result["worker_nice"] = QuerySettings().worker_nice
    result["pick_idle_ms"] = idle
    result["pick_during_scan_ms"] = busy
    result["ratio_pick_busy_to_idle"] = round(busy["p50"] / idle["p50"], 2)
    result["ratio_pick_busy_to_idle_p90"] = round(busy["p90"] / idle["p90"], 2)


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
