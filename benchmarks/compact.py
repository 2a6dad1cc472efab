"""Compaction throughput: many small TagFiles into large sorted map-files (``spark compact``).

The store: ``--events`` generated RAW events (default 3 M) over runs of about
600 k events, each run its own dataset, written as a consumer flushing every
``--file-rows`` events (default 10 k) would write them: many small map-files,
flushed out of key order, each with its message id. It is built once under
``var/bench/compact-*`` (not timed) and never changed: every measured pass
copies its catalog and compacts into a fresh store folder, reading the same
input files.

Timed in the same run, on the same input files:

* ``local``: ``run_compaction`` in this process (one core): plan, read, merge,
  write, commit superseding the inputs; ``local_events_per_s``;
* ``spark``: the same job on a local[2] Spark session (executors read and write;
  the driver commits); ``spark_events_per_s``;
* ``copy`` baseline: read the same groups with pyarrow and write each as one
  Parquet file, no sort, no catalog: what moving the bytes costs
  (``local_vs_copy_ratio`` = local time / copy time);
* ``spark_sort`` baseline: Spark reads the inputs, range-partitions them into as
  many outputs and sorts within each, writing Parquet: the same rewrite done
  with plain Spark SQL (``spark_vs_spark_sort_ratio`` = sort time / job time:
  above 1 the job is faster).

    python -m benchmarks.compact [--events N] [--file-rows R] [--skip-spark]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import BENCH_ROOT, emit

EVENTS_PER_RUN = 600_000


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def template(events: int, file_rows: int) -> Path:
    """Build (once) the store of small files every pass reads; returns its folder."""
    from catalog.fileset import FilesetWriter
    from catalog.model import FileKind
    from catalog.sqlite import SQLiteCatalog
    from eventindex.creator import ensure_collection, ensure_dataset
    from eventindex.generator import GeneratorSpec, Processing, dataset_specs, generate_run
    from eventindex.records.schema import RecordKind
    from eventindex.storage import WriteOptions

    folder = Path(BENCH_ROOT) / f"compact-{events}-{file_rows}"
    done = folder / "complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    runs = max(1, round(events / EVENTS_PER_RUN))
    spec = GeneratorSpec(
        runs=runs,
        events_per_run=events // runs,
        exact=True,
        processings=(Processing("RAW", "daq", events_per_file=1500),),
    )
    shuffle = random.Random(11)
    with SQLiteCatalog(str(folder / "catalog.sqlite")) as catalog:
        writer = FilesetWriter(catalog, str(folder / "store"), WriteOptions())
        ensure_collection(catalog, spec.collection, RecordKind.EVENTS)
        for dataset in dataset_specs(spec):
            ensure_dataset(catalog, dataset)
        for run_number in spec.run_numbers:
            name, table = next(iter(generate_run(spec, run_number).items()))
            dataset = catalog.get_dataset(name)
            pieces = [table.slice(s, file_rows) for s in range(0, table.num_rows, file_rows)]
            shuffle.shuffle(pieces)  # consumers flush runs interleaved, out of key order
            for number, piece in enumerate(pieces):
                writer.write(piece, dataset, message_ids=[f"{run_number}-{number}"])
        files = catalog.list_tagfiles(kinds=[FileKind.MASTER])
        assert sum(f.rows for f in files) == spec.runs * spec.events_per_run
    done.write_text("ok\n")
    return folder


def _work(name: str, source: Path) -> tuple[Path, str]:
    """A fresh copy of the template catalog and an empty store for one pass."""
    work = Path(BENCH_ROOT) / "compact-work" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copyfile(source / "catalog.sqlite", work / "catalog.sqlite")
    return work, str(work / "store")


def _compact(source: Path, name: str, spark: Any) -> dict[str, Any]:
    from catalog.sqlite import SQLiteCatalog
    from eventindex.config import CompactionSettings
    from eventindex.storage import WriteOptions
    from spark_jobs.compact import plan_compaction, run_compaction

    work, store = _work(name, source)
    with SQLiteCatalog(str(work / "catalog.sqlite")) as catalog:
        start = time.perf_counter()
        tasks = plan_compaction(catalog, store, "*", CompactionSettings(), WriteOptions())
        summary = run_compaction(catalog, tasks, spark=spark)
        seconds = time.perf_counter() - start
        groups = [[i.uri for i in t.inputs] for t in tasks]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "seconds": seconds,
        "events": summary.events,
        "files_in": summary.files_in,
        "files_out": summary.files_out,
        "bytes_in": summary.bytes_in,
        "bytes_out": summary.bytes_out,
        "groups": groups,
    }


def _copy_baseline(groups: Sequence[Sequence[str]]) -> float:
    out = Path(BENCH_ROOT) / "compact-work" / "copy"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    for number, group in enumerate(groups):
        table = pa.concat_tables([pq.read_table(uri) for uri in group])
        pq.write_table(table, out / f"{number}.parquet", compression="zstd")
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def _spark_sort_baseline(spark: Any, groups: Sequence[Sequence[str]]) -> float:
    out = Path(BENCH_ROOT) / "compact-work" / "spark-sort"
    shutil.rmtree(out, ignore_errors=True)
    inputs = [uri for group in groups for uri in group]
    start = time.perf_counter()
    frame = spark.read.parquet(*inputs)
    (
        frame.repartitionByRange(len(groups), "run_number", "event_number")
        .sortWithinPartitions("run_number", "event_number")
        .write.option("compression", "zstd")
        .parquet(str(out))
    )
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def _session() -> Any:
    from eventindex.config import SparkSettings
    from spark_jobs.session import spark_session

    return spark_session(
        SparkSettings(
            master="local[2]",
            app_name="bench-compact",
            conf={
                "spark.ui.enabled": "false",
                "spark.driver.memory": "4g",
                "spark.sql.shuffle.partitions": "4",
            },
        )
    )


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.compact", description=__doc__)
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--file-rows", type=int, default=10_000)
    parser.add_argument("--skip-spark", action="store_true")
    args = parser.parse_args(argv)

    source = template(args.events, args.file_rows)
    load_before = _load()
    local = _compact(source, "local", None)
    copy_seconds = _copy_baseline(local["groups"])
    result: dict[str, Any] = {
        "events": local["events"],
        "files_in": local["files_in"],
        "files_out": local["files_out"],
        "bytes_in": local["bytes_in"],
        "bytes_out": local["bytes_out"],
        "local_seconds": round(local["seconds"], 3),
        "local_events_per_s": round(local["events"] / local["seconds"]),
        "copy_baseline_seconds": round(copy_seconds, 3),
        "local_vs_copy_ratio": round(local["seconds"] / copy_seconds, 2),
    }
    if not args.skip_spark:
        spark = _session()
        try:
            # Warm the session and its Python workers, as a long-lived job's would be.
            spark.sparkContext.parallelize(range(4), 2).map(lambda x: x).collect()
            on_spark = _compact(source, "spark", spark)
            sort_seconds = _spark_sort_baseline(spark, on_spark["groups"])
        finally:
            spark.stop()
        result |= {
            "spark_seconds": round(on_spark["seconds"], 3),
            "spark_events_per_s": round(on_spark["events"] / on_spark["seconds"]),
            "spark_sort_baseline_seconds": round(sort_seconds, 3),
            "spark_vs_spark_sort_ratio": round(sort_seconds / on_spark["seconds"], 2),
        }
    result["loadavg_before"] = load_before
    result["loadavg_after"] = _load()
    result["cpus"] = os.cpu_count()
    return result


if __name__ == "__main__":
    emit(run())
