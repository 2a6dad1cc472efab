"""Trigger counts and overlaps over 100 million events, against DuckDB and Spark scans.

Data: the RAW datasets of the shared generated store
(``benchmarks.common.ensure_event_store``: 50 runs of 2 M events, several
SMKs, 256-bit L1 and 1024-bit HLT masks). Their trigger index is built by the
Indexer on Spark (``local[2]``) when it is missing, and reused otherwise.

* ``count_p50_ms``: one expression, ``(HLT_a OR HLT_b) AND NOT L1_c``, counted
  by ``TriggerIndex.count`` with its bitmaps loaded (median of ``--repeat``);
  ``count_cold_ms`` is the first query, loading every index file.
* ``overlap32_ms``: the 32 x 32 overlap matrix of 32 HLT chains (median).
* ``duckdb_*``/``spark_*``: the same answers from a scan of the same RAW files:
  the expression decoded per SMK into bit tests on the masks
  (``CASE smk WHEN ... END``); for the overlap a ``GROUP BY smk, hlt_passed``
  whose distinct masks are decoded with numpy into every pair's count (faster
  than 528 per-row pair tests in SQL); Spark groups only the mask bytes that
  hold the 32 triggers' bits, so its groups stay few.
  ``ratio_vs_duckdb``/``ratio_vs_spark`` are their times over ours;
  ``answers_equal`` says all answers agree (the benchmark fails if not).
* ``index_*``: bytes of the index per event; ``index_build_events_per_s_per_core``
  from the pure transform on one 2 M-event file in this process, and the Spark
  job's figures when this run built the index.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from benchmarks.common import emit, ensure_event_store, time_each

RAW_PATTERN = "*.daq.RAW"


def _menus_in_scope(catalog: Any, files: list[Any]) -> dict[int, dict[str, dict[str, int]]]:
    """SMK -> level -> trigger name -> bit, for the SMKs of the files' runs."""
    from eventindex.storage import MapFileReader

    smks: set[int] = set()
    for entry in files:
        with MapFileReader(entry.uri) as reader:
            smks.update(int(v) for v in reader.read(["smk"]).column("smk").unique().to_pylist())
    return {
        smk: {
            level: {name: bit for bit, name in catalog.get_trigger_menu(smk, level).bits.items()}
            for level in ("L1", "HLT")
        }
        for smk in sorted(smks)
    }


def _common(menus: dict[int, dict[str, dict[str, int]]], level: str) -> list[str]:
    """Triggers every menu has, in the first menu's bit order."""
    first = next(iter(menus.values()))[level]
    every = set(first).intersection(*(m[level] for m in menus.values()))
    return [name for name in sorted(first, key=first.__getitem__) if name in every]


def _bit_sql(column: str, bit: int, dialect: str) -> str:
    if dialect == "duckdb":
        # BLOB -> BIT is most significant bit first in each byte; ours is least first.
        return f"(get_bit({column}::BIT, {bit // 8 * 8 + 7 - bit % 8}) = 1)"
    byte = f"substring({column}, {bit // 8 + 1}, 1)"
    return f"((cast(conv(hex({byte}), 16, 10) as int) & {1 << (bit % 8)}) != 0)"


def _trigger_sql(name: str, menus: dict[int, dict[str, dict[str, int]]], dialect: str) -> str:
    """A boolean SQL expression: does the row pass ``name`` under its SMK's menu."""
    level, column = ("L1", "l1_tav") if name.startswith("L1_") else ("HLT", "hlt_passed")
    cases = [
        f"WHEN {smk} THEN {_bit_sql(column, menu[level][name], dialect)}"
        for smk, menu in menus.items()
        if name in menu[level]
    ]
    return f"(CASE smk {' '.join(cases)} ELSE false END)" if cases else "false"


def _expression_sql(
    names: tuple[str, str, str], menus: dict[int, dict[str, dict[str, int]]], dialect: str
) -> str:
    a, b, c = (_trigger_sql(n, menus, dialect) for n in names)
    return f"(({a} OR {b}) AND NOT {c})"


def _matrix_from_masks(
    groups: list[tuple[int, bytes, int]],
    names: list[str],
    menus: dict[int, dict[str, dict[str, int]]],
) -> list[list[int]]:
    """The overlap matrix from (SMK, HLT mask, events) groups: a few hundred thousand
    distinct masks instead of 100 M rows, decoded with numpy."""
    import numpy as np
    import pyarrow as pa

    from eventindex.query.trigger_index import mask_matrix

    size = len(names)
    total = np.zeros((size, size), dtype=np.int64)
    for smk in {smk for smk, _, _ in groups}:
        mine = [(mask, n) for k, mask, n in groups if k == smk]
        masks = mask_matrix(pa.array([m for m, _ in mine], pa.binary()))
        counts = np.array([n for _, n in mine], dtype=np.int64)
        passes = np.zeros((size, len(mine)), dtype=np.int64)
        for i, name in enumerate(names):
            bit = menus[smk]["HLT"].get(name)
            if bit is not None and bit // 8 < masks.shape[1]:
                passes[i] = (masks[:, bit // 8] >> (bit % 8)) & 1
        total += (passes * counts) @ passes.T
    return [[int(v) for v in row] for row in total]


def _duckdb(
    uris: list[str],
    count_sql: str,
    names: list[str],
    menus: dict[int, dict[str, dict[str, int]]],
) -> tuple[int, float, list[list[int]], float]:
    import duckdb

    connection = duckdb.connect()
    connection.execute(f"SET threads TO {os.cpu_count() or 1}")
    source = f"read_parquet({uris!r})"
    start = time.perf_counter()
    row = connection.execute(f"SELECT count(*) FROM {source} WHERE {count_sql}").fetchone()
    count_seconds = time.perf_counter() - start
    start = time.perf_counter()
    groups = connection.execute(
        f"SELECT smk, hlt_passed, count(*) FROM {source} GROUP BY smk, hlt_passed"
    ).fetchall()
    matrix = _matrix_from_masks([(int(k), bytes(m), int(n)) for k, m, n in groups], names, menus)
    overlap_seconds = time.perf_counter() - start
    connection.close()
    assert row is not None
    return int(row[0]), count_seconds, matrix, overlap_seconds


def _spark_scan(
    spark: Any,
    uris: list[str],
    count_sql: str,
    names: list[str],
    menus: dict[int, dict[str, dict[str, int]]],
) -> tuple[int, float, list[list[int]], float]:
    frame = spark.read.parquet(*uris)
    start = time.perf_counter()
    passed = frame.select("smk", "l1_tav", "hlt_passed").where(count_sql).count()
    count_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # Only the mask bytes that hold the triggers' bits (per SMK), so the groups stay few.
    width = max(bit for menu in menus.values() for bit in menu["HLT"].values()) // 8 + 1
    needed = sorted(
        {menu["HLT"][n] // 8 for menu in menus.values() for n in names if n in menu["HLT"]}
    )
    kept = "concat(" + ", ".join(f"substring(hlt_passed, {b + 1}, 1)" for b in needed) + ")"
    rows = frame.selectExpr("smk", f"{kept} AS kept").groupBy("smk", "kept").count().collect()
    groups = []
    for row in rows:
        mask = bytearray(width)
        for position, byte in zip(needed, bytes(row["kept"]), strict=False):
            mask[position] = byte
        groups.append((int(row["smk"]), bytes(mask), int(row["count"])))
    matrix = _matrix_from_masks(groups, names, menus)
    overlap_seconds = time.perf_counter() - start
    return int(passed), count_seconds, matrix, overlap_seconds


def _spark(driver_memory: str) -> Any:
    from eventindex.config import SparkSettings
    from spark_jobs.session import python_for_workers, spark_session

    python_for_workers()
    return spark_session(
        SparkSettings(
            master="local[2]",
            app_name="eventindex-bench-triggers",
            conf={
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
                "spark.driver.memory": driver_memory,
                "spark.sql.shuffle.partitions": "4",
            },
        )
    )


def _transform_rate(uri: str) -> tuple[float, int]:
    """Events/s of the pure index transform on one file, in this process (one core)."""
    from eventindex.query.trigger_index import INDEX_COLUMNS, build_trigger_index
    from eventindex.storage import MapFileReader

    with MapFileReader(uri) as reader:
        table = reader.read(list(INDEX_COLUMNS))
    start = time.perf_counter()
    build_trigger_index(table)
    return table.num_rows / (time.perf_counter() - start), table.num_rows


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.triggers", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000_000, help="events in the store")
    parser.add_argument("--runs", type=int, default=50, help="runs in the store")
    parser.add_argument("--repeat", type=int, default=20, help="warm queries (median)")
    parser.add_argument("--triggers", type=int, default=32, help="triggers in the overlap")
    parser.add_argument("--no-spark", action="store_true", help="skip the Spark scan baseline")
    parser.add_argument("--driver-memory", default="3g")
    args = parser.parse_args(argv)

    from catalog.sqlite import SQLiteCatalog
    from eventindex.query.triggers import TriggerIndex
    from spark_jobs.indexer import plan_index, run_index

    root, catalog_path = ensure_event_store(args.events, args.runs)
    result: dict[str, Any] = {"events_in_store": args.events, "datasets": RAW_PATTERN}
    spark = None
    with SQLiteCatalog(catalog_path) as catalog:
        tasks, _ = plan_index(catalog, root, RAW_PATTERN)
        if tasks:
            spark = _spark(args.driver_memory)
            built = run_index(catalog, tasks, spark=spark)
            result["index_job"] = built.to_dict()
        index = TriggerIndex(catalog, cache_bytes=8 * 2**30)
        scope = index.scope(RAW_PATTERN)
        masters = [master for master, _ in scope.files]
        uris = [master.uri for master in masters]
        indexes = [ix for _, ix in scope.files if ix is not None]
        events = sum(master.rows for master in masters)
        result["events"] = events
        result["files"] = len(masters)
        result["index_bytes"] = sum(ix.bytes for ix in indexes)
        result["index_bytes_per_event"] = round(result["index_bytes"] / events, 3)
        rate, sample_rows = _transform_rate(uris[0])
        result["index_build_events_per_s_per_core"] = round(rate)
        result["index_build_sample_events"] = sample_rows

        menus = _menus_in_scope(catalog, masters)
        hlt, l1 = _common(menus, "HLT"), _common(menus, "L1")
        names = (hlt[0], hlt[1], l1[0])
        expression = f"({names[0]} OR {names[1]}) AND NOT {names[2]}"
        overlap_names = hlt[: args.triggers]
        result["expression"] = expression
        result["overlap_triggers"] = len(overlap_names)

        start = time.perf_counter()
        answer = index.count(expression, dataset=RAW_PATTERN)
        result["count_cold_ms"] = round((time.perf_counter() - start) * 1000, 3)
        warm = time_each(lambda: index.count(expression, dataset=RAW_PATTERN), args.repeat)
        result["count_p50_ms"] = round(statistics.median(warm) * 1000, 3)
        result["passed"] = answer.passed
        overlap = index.overlap(overlap_names, dataset=RAW_PATTERN)
        warm = time_each(
            lambda: index.overlap(overlap_names, dataset=RAW_PATTERN), max(3, args.repeat // 4)
        )
        result["overlap32_ms"] = round(statistics.median(warm) * 1000, 3)

        duck_count, duck_count_s, duck_matrix, duck_overlap_s = _duckdb(
            uris, _expression_sql(names, menus, "duckdb"), overlap_names, menus
        )
        result["duckdb_count_ms"] = round(duck_count_s * 1000, 1)
        result["duckdb_overlap32_ms"] = round(duck_overlap_s * 1000, 1)
        result["ratio_vs_duckdb"] = round(duck_count_s * 1000 / result["count_p50_ms"], 1)
        result["overlap_ratio_vs_duckdb"] = round(duck_overlap_s * 1000 / result["overlap32_ms"], 1)
        equal = duck_count == answer.passed and duck_matrix == overlap.matrix
        if not args.no_spark:
            spark = spark or _spark(args.driver_memory)
            spark_count, spark_count_s, spark_matrix, spark_overlap_s = _spark_scan(
                spark,
                uris,
                _expression_sql(names, menus, "spark"),
                overlap_names,
                menus,
            )
            result["spark_count_ms"] = round(spark_count_s * 1000, 1)
            result["spark_overlap32_ms"] = round(spark_overlap_s * 1000, 1)
            result["ratio_vs_spark"] = round(spark_count_s * 1000 / result["count_p50_ms"], 1)
            result["overlap_ratio_vs_spark"] = round(
                spark_overlap_s * 1000 / result["overlap32_ms"], 1
            )
            equal = equal and spark_count == answer.passed and spark_matrix == overlap.matrix
        result["answers_equal"] = equal
    if spark is not None:
        spark.stop()
    if not equal:
        raise AssertionError(f"answers differ: {result}")
    return result


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
