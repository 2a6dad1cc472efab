"""The consistency check (``eventindex check``) over the shared 100 M-event store.

The store (``benchmarks.common.ensure_event_store``) holds each of its runs in
RAW, two AOD processings and a 30 % DAOD skim (about 3.3 rows per event). The
check runs on Spark ``local[2]`` over every dataset of the collection (or the
runs given with ``--runs``): counts per run and dataset, duplicates, upstream
events missing downstream and downstream events absent upstream.

* ``wall_s``: plan + Spark job + report, without storing the report;
* ``rows_per_s`` over every row read, ``events_per_s`` over the distinct events
  (the RAW rows), and ``problems`` (0 on the generated store);
* ``load_average``: the 1-minute load before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from benchmarks.common import emit, ensure_event_store


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.check", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000_000, help="events in the store")
    parser.add_argument("--store-runs", type=int, default=50, help="runs in the store")
    parser.add_argument("--runs", default=None, help="only this run range (FIRST-LAST)")
    parser.add_argument("--driver-memory", default="3g")
    args = parser.parse_args(argv)

    from catalog.sqlite import SQLiteCatalog
    from eventindex.config import SparkSettings
    from eventindex.query.triggers import parse_run_range
    from spark_jobs.consistency import plan_check, run_check
    from spark_jobs.session import python_for_workers, spark_session

    _root, catalog_path = ensure_event_store(args.events, args.store_runs)
    run_min, run_max = parse_run_range(args.runs) if args.runs else (None, None)
    python_for_workers()
    spark = spark_session(
        SparkSettings(
            master="local[2]",
            app_name="eventindex-bench-check",
            conf={
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
                "spark.driver.memory": args.driver_memory,
                "spark.sql.shuffle.partitions": "8",
            },
        )
    )
    try:
        with SQLiteCatalog(catalog_path) as catalog:
            collection = catalog.list_collections()[0].name
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            plan = plan_check(catalog, collection, run_min, run_max)
            report = run_check(spark, plan)
            wall = time.perf_counter() - start
    finally:
        spark.stop()
    rows = report["events"]
    raw_events = sum(d["events"] for d in report["datasets"].values() if d["format"] == "RAW")
    return {
        "collection": collection,
        "runs": f"{plan.run_min}-{plan.run_max}",
        "datasets": len(plan.datasets),
        "files": report["files"],
        "rows": rows,
        "events": raw_events,
        "wall_s": round(wall, 1),
        "rows_per_s": round(rows / wall),
        "events_per_s": round(raw_events / wall),
        "problems": report["problems"],
        "spark_master": "local[2]",
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
