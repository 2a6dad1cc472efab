"""Map-file lookups on one file of 10 million realistic events, with DuckDB as the baseline.

The file is an AOD dataset of the project's generator (``eventindex.generator``:
runs of about two million events, every other one crossing 2**32 in event
number, references to the RAW and AOD files) written with the storage
defaults. It is built once into ``var/bench/mapfile/`` and reused
(``--rebuild`` forces a new one).

Every figure is in-process and single-threaded, over random existing keys.
*Cold* is the first pass after evicting the file from the page cache
(``posix_fadvise``, this file only) with an empty key cache; *warm* passes
repeat the same keys, and each warm figure is the median over ``--repeat``
passes, since the machine is shared and noisy.

* ``get_p50_ms``/``get_p99_ms``: ``MapFileReader.get`` with the event-picking
  projection (run, event, lumiblock, time stamp, references); targets 2 and 10 ms.
* ``get_all_columns_p50_ms``/``_p99_ms``: the same with every column.
* ``get_many_10k_s``: 10,000 other random keys in one ``get_many`` (same
  projection), row groups read on the reader's default ``read_threads``;
  ``get_many_10k_1thread_s`` reads them all in the calling thread.
* ``duckdb_get_p50_ms``: the same picks as one parametrised
  ``SELECT ... FROM read_parquet(?) WHERE run_number=? AND event_number=?``
  on one persistent connection (Parquet metadata cache on), and
  ``ratio_duckdb_to_mapfile``: its p50 over ours, on the same keys.
* ``row_group_rows_side``: warm single-pick p50 for other row-group sizes, on
  files of the first ``--side-events`` events.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from benchmarks.common import emit, percentiles_ms
from eventindex.errors import StorageError
from eventindex.generator import DEFAULT_PROCESSINGS, GeneratorSpec, generate_run
from eventindex.records.schema import EVENT_KEY, EVENT_SCHEMA
from eventindex.storage import KeyCache, MapFileReader, MapFileWriter, WriteOptions

BENCH_DIR = Path(__file__).resolve().parent.parent / "var" / "bench" / "mapfile"
PICK_COLUMNS = ["run_number", "event_number", "lumi_block", "timestamp", "references"]
AOD = "merge.AOD.r9264_p3083"
EVENTS_PER_RUN = 2_000_000
TARGET_P50_MS, TARGET_P99_MS = 2.0, 10.0
Key = tuple[int, int]


def _spec(events: int) -> GeneratorSpec:
    """Runs of about two million events (as physics_Main runs are), RAW and one AOD."""
    processings = tuple(p for p in DEFAULT_PROCESSINGS if p.key in ("daq.RAW", AOD))
    per_run = min(EVENTS_PER_RUN, events)
    # The run size varies by +-30 %, so ask for more runs than the mean needs.
    runs = math.ceil(events / per_run / 0.7) + 1
    return GeneratorSpec(
        runs=runs,
        events_per_run=per_run,
        large_event_numbers=True,
        processings=processings,
    )


def _generated(events: int) -> Iterator[pa.Table]:
    """Exactly ``events`` AOD rows, one generated run at a time, in key order."""
    spec = _spec(events)
    aod = next(p for p in spec.processings if p.key == AOD)
    left = events
    for run_number in spec.run_numbers:
        if left == 0:
            return
        table = generate_run(spec, run_number)[spec.dataset_name(run_number, aod)]
        table = table.slice(0, left)
        left -= table.num_rows
        yield table
    if left:
        raise RuntimeError(f"the generator spec fell {left} events short")


def _description(events: int, row_group_rows: int) -> str:
    return orjson.dumps({"events": events, "row_group_rows": row_group_rows, "spec": "v1"}).decode()


def _reusable(path: Path, description: str) -> bool:
    if not path.exists():
        return False
    try:
        with MapFileReader(str(path), KeyCache()) as reader:
            return reader.metadata.get("bench") == description
    except StorageError:
        return False


def _write(path: Path, tables: Iterator[pa.Table], row_group_rows: int, description: str) -> float:
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    options = WriteOptions(row_group_rows=row_group_rows)
    with MapFileWriter(str(path), EVENT_SCHEMA, EVENT_KEY, options, {"bench": description}) as out:
        for table in tables:
            out.write(table)
    return time.perf_counter() - start


def build(events: int, row_group_rows: int, rebuild: bool) -> tuple[Path, float | None]:
    """The benchmark file (path, build seconds or None when reused)."""
    path = BENCH_DIR / f"events-{events}-rg{row_group_rows}.parquet"
    description = _description(events, row_group_rows)
    if not rebuild and _reusable(path, description):
        return path, None
    return path, _write(path, _generated(events), row_group_rows, description)


def _evict(path: Path) -> None:
    """Drop this file's pages from the page cache (only this file: the machine is shared)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def _sample_keys(reader: MapFileReader, count: int, seed: int) -> list[Key]:
    keys = reader.read(EVENT_KEY)
    rows = np.random.default_rng(seed).choice(keys.num_rows, size=count, replace=False)
    runs = keys.column("run_number").to_numpy()[rows].tolist()
    events = keys.column("event_number").to_numpy()[rows].tolist()
    return list(zip(runs, events, strict=True))


def _timed(call: Callable[[Key], object], keys: Sequence[Key]) -> list[float]:
    durations = []
    for key in keys:
        start = time.perf_counter()
        found = call(key)
        durations.append(time.perf_counter() - start)
        if not found:
            raise RuntimeError(f"{key} was not found")
    return durations


def _median(values: Sequence[float]) -> float:
    return round(float(np.median(values)), 4)


def _warm_passes(
    call: Callable[[Key], object], keys: Sequence[Key], repeat: int
) -> list[list[float]]:
    """``repeat`` timed passes over ``keys`` (the caller has warmed them)."""
    return [_timed(call, keys) for _ in range(repeat)]


def _summary(passes: list[list[float]], subset: int | None = None) -> dict[str, float]:
    """Median over passes of each pass's p50 and p99 (optionally of its first ``subset`` keys)."""
    figures = [percentiles_ms(p[:subset] if subset else p) for p in passes]
    return {name: _median([f[name] for f in figures]) for name in ("p50", "p99")}


def _open_ms(path: Path, repeat: int = 20) -> float:
    durations = []
    for _ in range(repeat):
        start = time.perf_counter()
        reader = MapFileReader(str(path), KeyCache())
        durations.append(time.perf_counter() - start)
        reader.close()
    return _median([d * 1000 for d in durations])


def _duckdb(path: Path, keys: Sequence[Key], repeat: int) -> dict[str, float]:
    import duckdb

    columns = ", ".join(f'"{c}"' for c in PICK_COLUMNS)
    sql = f"SELECT {columns} FROM read_parquet(?) WHERE run_number = ? AND event_number = ?"
    connection = duckdb.connect()
    try:
        connection.execute("SET parquet_metadata_cache = true")
        threads = int(connection.execute("SELECT current_setting('threads')").fetchall()[0][0])

        def pick(key: Key) -> object:
            return connection.execute(sql, [str(path), key[0], key[1]]).fetchall()

        _timed(pick, keys)  # warm: page cache and DuckDB's metadata cache
        summary = _summary(_warm_passes(pick, keys, repeat))
    finally:
        connection.close()
    return {"p50": summary["p50"], "p99": summary["p99"], "threads": threads}


def _get_many_s(reader: MapFileReader, keys: Sequence[Key], repeat: int) -> tuple[float, float]:
    """Seconds for one ``get_many`` of ``keys``: the first call and the median of the next."""
    durations = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        found = reader.get_many(keys, PICK_COLUMNS)
        durations.append(time.perf_counter() - start)
        if found.num_rows < len(keys):
            raise RuntimeError(f"get_many found {found.num_rows} of {len(keys)} keys")
    return round(durations[0], 4), round(float(np.median(durations[1:])), 4)


def _side_experiment(
    source: Path, events: int, sizes: Sequence[int], queries: int, repeat: int, seed: int
) -> dict[str, dict[str, float]]:
    """Warm single-pick p50 for other row-group sizes, on the first ``events`` events."""
    results = {}
    for size in sizes:
        path = BENCH_DIR / f"side-{events}-rg{size}.parquet"
        description = _description(events, size)
        if not _reusable(path, description):
            with MapFileReader(str(source), KeyCache()) as reader:
                scanned = reader.scan(columns=EVENT_SCHEMA.names)
                _write(path, _head(scanned, events), size, description)
        with MapFileReader(str(path), KeyCache()) as reader:
            keys = _sample_keys(reader, queries, seed)

            def pick(key: Key, reader: MapFileReader = reader) -> object:
                return reader.get(key, PICK_COLUMNS)

            _timed(pick, keys)
            summary = _summary(_warm_passes(pick, keys, repeat))
        results[str(size)] = {
            "get_p50_ms": summary["p50"],
            "get_p99_ms": summary["p99"],
            "file_bytes": path.stat().st_size,
        }
    return results


def _head(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    for table in tables:
        if rows <= 0:
            return
        yield table.slice(0, rows)
        rows -= table.num_rows


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.mapfile", description=__doc__)
    parser.add_argument("--events", type=int, default=10_000_000, help="events in the file")
    parser.add_argument("--queries", type=int, default=2000, help="random keys per pass")
    parser.add_argument("--repeat", type=int, default=3, help="warm passes (medians reported)")
    parser.add_argument("--rebuild", action="store_true", help="write the file even if it exists")
    parser.add_argument("--seed", type=int, default=20150603)
    parser.add_argument(
        "--side-events", type=int, default=1_000_000, help="events in the row-group side files"
    )
    parser.add_argument("--no-side", action="store_true", help="skip the row-group experiment")
    args = parser.parse_args(argv)
    row_group_rows = WriteOptions().row_group_rows
    load_before = os.getloadavg()[0]

    path, build_s = build(args.events, row_group_rows, args.rebuild)
    file_bytes = path.stat().st_size
    with MapFileReader(str(path), KeyCache()) as reader:
        keys = _sample_keys(reader, args.queries, args.seed)
        batch = _sample_keys(reader, 10_000, args.seed + 1)
        row_groups = reader.num_row_groups
    open_ms = _open_ms(path)
    # Fewer keys for the slower all-column and DuckDB picks keep the run short.
    subset = min(len(keys), 1000)

    _evict(path)
    reader = MapFileReader(str(path), KeyCache())
    try:

        def pick(key: Key) -> object:
            return reader.get(key, PICK_COLUMNS)

        def pick_all(key: Key) -> object:
            return reader.get(key)

        cold = percentiles_ms(_timed(pick, keys))
        pick_passes = _warm_passes(pick, keys, args.repeat)
        warm = _summary(pick_passes)
        _timed(pick_all, keys[:subset])
        all_columns = _summary(_warm_passes(pick_all, keys[:subset], args.repeat))
        get_many_cold_s, get_many_s = _get_many_s(reader, batch, args.repeat)
        read_threads = reader.read_threads
    finally:
        reader.close()
    with MapFileReader(str(path), KeyCache(), read_threads=1) as single:
        _, get_many_1thread_s = _get_many_s(single, batch, args.repeat)
    duckdb = _duckdb(path, keys[:subset], args.repeat)
    ours_on_subset = _summary(pick_passes, subset)["p50"]

    result: dict[str, Any] = {
        "benchmark": "mapfile",
        "events": args.events,
        "queries": len(keys),
        "repeat": args.repeat,
        "row_group_rows": row_group_rows,
        "row_groups": row_groups,
        "file_bytes": file_bytes,
        "bytes_per_event": round(file_bytes / args.events, 2),
        "build_s": None if build_s is None else round(build_s, 1),
        "open_ms": open_ms,
        "get_p50_ms": warm["p50"],
        "get_p99_ms": warm["p99"],
        "get_cold_p50_ms": cold["p50"],
        "get_cold_p99_ms": cold["p99"],
        "get_all_columns_p50_ms": all_columns["p50"],
        "get_all_columns_p99_ms": all_columns["p99"],
        "get_many_10k_s": get_many_s,
        "get_many_10k_cold_s": get_many_cold_s,
        "get_many_10k_1thread_s": get_many_1thread_s,
        "get_many_read_threads": read_threads,
        "duckdb_queries": subset,
        "duckdb_threads": duckdb["threads"],
        "duckdb_get_p50_ms": duckdb["p50"],
        "duckdb_get_p99_ms": duckdb["p99"],
        "ratio_duckdb_to_mapfile": round(duckdb["p50"] / ours_on_subset, 2),
        "target_get_p50_ms": TARGET_P50_MS,
        "target_get_p99_ms": TARGET_P99_MS,
        "meets_target": warm["p50"] <= TARGET_P50_MS and warm["p99"] <= TARGET_P99_MS,
    }
    if not args.no_side:
        sizes = sorted({8192, row_group_rows, 32768})
        side_events = min(args.side_events, args.events)
        result["row_group_rows_side_events"] = side_events
        result["row_group_rows_side"] = _side_experiment(
            path, side_events, sizes, min(len(keys), 1000), args.repeat, args.seed
        )
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
