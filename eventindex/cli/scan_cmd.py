"""``eventindex scan-worker``: run the queued queries of the registry in shared scans."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Annotated, Any

import typer

from eventindex.cli.context import catalog_of, state, stderr


def register(app: typer.Typer) -> None:
    app.command(name="scan-worker")(scan_worker)


def scan_worker(
    ctx: typer.Context,
    once: Annotated[
        bool, typer.Option(help="Run until nothing is queued or running, then exit.")
    ] = False,
    name: Annotated[
        str | None,
        typer.Option(
            help="Worker name (default: the host name); a restarted worker of the same "
            "name resumes its running queries at once."
        ),
    ] = None,
) -> None:
    """Walk tables for queued queries: each unit is read once for every query riding the
    walk; key picks and small cones are answered directly. The walks are evaluated here
    or by Spark (setting queries.executor); the worker runs queries.worker_nice nicer
    than interactive work. SIGTERM or Ctrl-C stops it after the current step; its running
    queries are resumed by the next worker."""
    from eventindex.query.registry import QueryRegistry
    from eventindex.query.scan import ScanEvaluator, ScanWorker, background_worker

    settings = state(ctx).settings
    queries = settings.queries
    niceness = background_worker(queries)
    stop = threading.Event()
    evaluator: ScanEvaluator | None = None
    spark: Any = None
    if queries.executor == "spark":
        from spark_jobs.session import spark_session
        from spark_jobs.shared_scan import SparkScanEvaluator

        spark = spark_session(settings.spark)
        evaluator = SparkScanEvaluator(spark, queries.spark_units_per_step)

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with catalog_of(settings) as catalog, QueryRegistry(settings.queries.registry) as registry:
            worker = ScanWorker(catalog, registry, queries, name=name, evaluator=evaluator)
            stderr.print(
                f"scan worker {worker.name} on {queries.registry} "
                f"({queries.executor}, niceness {niceness})"
            )
            try:
                worker.run(stop, until_idle=once)
            except KeyboardInterrupt:
                stop.set()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if spark is not None:
            spark.stop()
