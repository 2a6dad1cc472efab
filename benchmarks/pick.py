"""Event picking on the shared generated store (100 M events), with DuckDB and Spark SQL
answering the same picks on the same files in the same run.

With no flags the store of ``benchmarks.common.ensure_event_store()`` is built
(or reused: it is resumable and idempotent), and so are the locations files of
its master files (``eventindex spark locations``, run in this process; files
that have one are skipped); ``--catalog``/``--store`` point at another store
instead and never build. Keys are random existing events, drawn from random
row groups of random RAW files (RAW holds every event).

* ``pick_p50_ms``/``pick_p99_ms``: ``Reader.pick`` in-process, warm: a first
  pass over the same keys opened the files and warmed the key index and the
  page cache (no answer is cached anywhere: every pick searches and gathers in
  the locations files, or decodes row groups of files that have none).
  ``pick_cold_*`` is that first pass. ``mapfile_p50_ms`` is the same picks
  answered from the map-files alone (``Reader(use_locations=False)``, warm the
  same way), and ``ratio_mapfile_to_pick`` its p50 over ours.
* ``http_p50_ms``/``http_p99_ms``: ``GET /v1/events/{run}/{event}`` from one
  keep-alive client to a real ``eventindex serve`` subprocess (uvicorn, one
  worker, loopback), warm the same way.
* ``pick_cpu_ms_per_pick``, ``http_server_cpu_ms_per_pick``, ``batch_10k_cpu_s``:
  the CPU time those took (all threads; the server's from ``/proc``): on a
  machine shared with other jobs, wall times stretch and CPU times hold.
* ``batch_10k_s``: one ``Reader.lookup`` of 10,000 other random events from a
  cold page cache: the store's files are dropped from it first
  (``POSIX_FADV_DONTNEED``; pages this process maps stay), and
  ``batch_10k_read_mb``/``batch_10k_major_faults`` show what the lookup then read
  from the disk (``batch_10k_warm_s``: the same call again).
* ``duckdb_p50_ms``: a parametrised ``read_parquet(files) WHERE run_number=?
  AND event_number=?`` over the files whose catalog key range holds the key
  (the files the Reader considers), metadata cache on; ``spark_p50_ms``: the
  same with Spark SQL (``local[2]``) over the same files; the ratios are their
  p50 over ours on the same keys.
* ``--load-seconds N``: the open-loop load generator of ``benchmarks.loadgen``
  at ``--load-rate`` picks/s against a server with ``--load-workers`` workers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import emit, ensure_event_store, percentiles_ms
from benchmarks.loadgen import run_load
from catalog.base import Catalog
from catalog.model import FileKind, TagFile
from catalog.sqlite import SQLiteCatalog
from eventindex.config import SparkSettings, WebServiceSettings
from eventindex.query import Reader
from eventindex.records.schema import EVENT_KEY
from eventindex.storage import resolve
from eventindex.storage.locations import LOCATIONS_PART
from spark_jobs.locations import plan_locations, run_locations

Key = tuple[int, int]
TARGETS = {
    "pick_p50_ms": 2.0,
    "pick_p99_ms": 10.0,
    "http_p50_ms": 5.0,
    "http_p99_ms": 20.0,
    "batch_10k_s": 1.0,
}
LOAD_TARGET_RATE = 500.0
LOAD_TARGET_P99_MS = 50.0
BASELINE_COLUMNS = (
    "run_number",
    "event_number",
    "lumi_block",
    "timestamp",
    "timestamp_ns",
    "bcid",
    "lvl1_id",
    "smk",
    "l1psk",
    "hltpsk",
    "references",
)
SERVER_START_TIMEOUT_S = 120.0
EVENTINDEX = Path(sys.executable).parent / "eventindex"
LOG_DIR = Path("var/bench")


def _local_path(uri: str) -> str:
    return resolve(uri)[1]


def evict(paths: Sequence[str]) -> None:
    """Drop the page-cache pages of these files that no process maps (POSIX_FADV_DONTNEED,
    per file, so other jobs' caches stay): the next read of them goes to the disk."""
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a retired file, gone since the catalog was read
            continue
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def io_counters() -> tuple[int, int]:
    """Bytes this process has had read from storage (``/proc/self/io``; 0 where the
    kernel does not account them) and its major page faults: a cold read shows in both."""
    read_bytes = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/io").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "read_bytes":
                read_bytes = int(value)
    return read_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def store_figures(files: Sequence[TagFile], formats: dict[str, str]) -> dict[str, Any]:
    """Size of the store: events (rows of RAW datasets), rows, datasets, files, bytes."""
    return {
        "events": sum(f.rows for f in files if formats.get(f.dataset) == "RAW"),
        "rows": sum(f.rows for f in files),
        "datasets": len({f.dataset for f in files}),
        "files": len(files),
        "bytes": sum(f.bytes for f in files),
    }


def sample_keys(files: Sequence[TagFile], count: int, rng: np.random.Generator) -> list[Key]:
    """``count`` distinct random events: a random row of a random row group of a random file."""
    handles: dict[str, pq.ParquetFile] = {}
    keys: set[Key] = set()
    try:
        while len(keys) < count:
            entry = files[int(rng.integers(len(files)))]
            handle = handles.get(entry.file_id)
            if handle is None:
                handle = handles[entry.file_id] = pq.ParquetFile(_local_path(entry.uri))
            group = int(rng.integers(handle.metadata.num_row_groups))
            table = handle.read_row_group(group, columns=list(EVENT_KEY))
            # A few keys per row group read keeps sampling cheap and still spread out.
            for row in rng.choice(table.num_rows, size=min(4, table.num_rows), replace=False):
                keys.add(
                    (
                        int(table.column("run_number")[int(row)].as_py()),
                        int(table.column("event_number")[int(row)].as_py()),
                    )
                )
    finally:
        for handle in handles.values():
            handle.close()
    ordered = sorted(keys)
    rng.shuffle(ordered)
    return ordered[:count]


def _timed(call: Callable[[Key], object], keys: Sequence[Key]) -> list[float]:
    durations = []
    for key in keys:
        start = time.perf_counter()
        call(key)
        durations.append(time.perf_counter() - start)
    return durations


def _figures(prefix: str, durations: Sequence[float]) -> dict[str, float]:
    latency = percentiles_ms(durations)
    return {f"{prefix}_{name}_ms": value for name, value in latency.items()}


# -- the service -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def running_server(store: str, catalog: str, workers: int) -> Iterator[tuple[str, int]]:
    """A real ``eventindex serve`` on loopback for the duration of the block: its URL and
    process id."""
    port = _free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"pick-server-{workers}w.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EVENTINDEX_")}
    command = [
        str(EVENTINDEX),
        "--store",
        store,
        "--catalog",
        catalog,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environ)
    with serving(process, url, log, "server"):
        yield url, process.pid


@contextlib.contextmanager
def serving(process: subprocess.Popen[bytes], url: str, log: Path, name: str) -> Iterator[None]:
    """The block runs once the server ``process`` answers its health check at ``url``;
    the server is stopped after it. ``RuntimeError`` naming ``log`` if it never comes up."""
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {log}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not up after {SERVER_START_TIMEOUT_S} s; see {log}")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _pick_path(collection: str, key: Key) -> str:
    return f"/v1/events/{key[0]}/{key[1]}?collection={collection}"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_http(url: str, server_pid: int, collection: str, keys: Sequence[Key]) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=30) as client:

        def pick(key: Key) -> None:
            response = client.get(_pick_path(collection, key))
            if response.status_code != 200:
                raise RuntimeError(f"GET {key}: {response.status_code} {response.text[:200]}")

        cold = _timed(pick, keys)
        cpu_before = process_cpu_seconds(server_pid)
        warm = _timed(pick, keys)
        server_cpu = process_cpu_seconds(server_pid) - cpu_before
    return {
        **_figures("http", warm),
        **_figures("http_cold", cold),
        "http_server_cpu_ms_per_pick": round(server_cpu / len(keys) * 1000, 3),
    }


# -- baselines -----------------------------------------------------------------------


def measure_mapfiles(
    catalog: Catalog, collection: str, keys: Sequence[Key], key_cache_bytes: int
) -> dict[str, Any]:
    """The same picks from the map-files alone (row groups decoded), warm the same way."""
    with Reader(catalog, key_cache_bytes=key_cache_bytes, use_locations=False) as reader:

        def pick(key: Key) -> None:
            if reader.pick(collection, *key) is None:
                raise RuntimeError(f"event {key} not found in the map-files")

        _timed(pick, keys)
        warm = _timed(pick, keys)
    return {**_figures("mapfile", warm), "mapfile_picks": len(keys)}


def _candidate_files(snapshot_files: Sequence[TagFile], key: Key) -> list[str]:
    return sorted(
        _local_path(f.uri) for f in snapshot_files if tuple(f.key_min) <= key <= tuple(f.key_max)
    )


def measure_duckdb(files: Sequence[TagFile], keys: Sequence[Key]) -> dict[str, Any]:
    import duckdb

    columns = ", ".join(f'"{c}"' for c in BASELINE_COLUMNS)
    sql = (
        f"SELECT filename, {columns} FROM read_parquet(?, filename = true) "
        "WHERE run_number = ? AND event_number = ?"
    )
    connection = duckdb.connect()
    try:
        connection.execute("SET parquet_metadata_cache = true")
        threads = int(connection.execute("SELECT current_setting('threads')").fetchall()[0][0])

        def pick(key: Key) -> None:
            rows = connection.execute(sql, [_candidate_files(files, key), *key]).fetchall()
            if not rows:
                raise RuntimeError(f"DuckDB found no row for {key}")

        _timed(pick, keys)  # warm: metadata cache and page cache
        warm = _timed(pick, keys)
    finally:
        connection.close()
    return {**_figures("duckdb", warm), "duckdb_threads": threads, "duckdb_picks": len(keys)}


def measure_spark(files: Sequence[TagFile], keys: Sequence[Key]) -> dict[str, Any]:
    from pyspark.sql import functions as F  # noqa: N812 - the usual alias

    from spark_jobs.session import spark_session

    settings = SparkSettings(
        master="local[2]",
        app_name="eventindex-bench-pick",
        conf={
            "spark.driver.memory": "2g",
            "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": "2",
            "spark.ui.showConsoleProgress": "false",
        },
    )
    started = time.perf_counter()
    spark = spark_session(settings)
    startup_s = time.perf_counter() - started
    try:

        def pick(key: Key) -> None:
            frame = spark.read.parquet(*_candidate_files(files, key))
            rows = (
                frame.where((F.col("run_number") == key[0]) & (F.col("event_number") == key[1]))
                .select(F.input_file_name().alias("filename"), *BASELINE_COLUMNS)
                .collect()
            )
            if not rows:
                raise RuntimeError(f"Spark found no row for {key}")

        _timed(pick, keys[: max(1, len(keys) // 4)])  # warm the JVM's code paths
        warm = _timed(pick, keys)
    finally:
        spark.stop()
    return {
        **_figures("spark", warm),
        "spark_picks": len(keys),
        "spark_startup_s": round(startup_s, 1),
    }


# -- the benchmark -------------------------------------------------------------------


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.pick", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000_000, help="store size to build")
    parser.add_argument("--runs", type=int, default=50, help="runs of the store to build")
    parser.add_argument("--catalog", help="use this SQLite catalog (no build)")
    parser.add_argument("--store", help="store root of --catalog")
    parser.add_argument("--picks", type=int, default=1000, help="random picks per pass")
    parser.add_argument("--batch", type=int, default=10_000, help="events in the batch lookup")
    parser.add_argument("--duckdb-picks", type=int, default=200)
    parser.add_argument("--spark-picks", type=int, default=24)
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP figures")
    parser.add_argument("--no-duckdb", action="store_true", help="skip the DuckDB baseline")
    parser.add_argument("--no-spark", action="store_true", help="skip the Spark baseline")
    parser.add_argument(
        "--load-seconds", type=float, default=0.0, help="load test length (0: none)"
    )
    parser.add_argument("--load-rate", type=float, default=LOAD_TARGET_RATE, help="picks/s")
    parser.add_argument("--load-connections", type=int, default=32)
    parser.add_argument("--load-workers", type=int, default=2, help="uvicorn workers under load")
    parser.add_argument(
        "--mapfile-picks", type=int, default=200, help="picks from map-files alone (0: none)"
    )
    parser.add_argument(
        "--no-locations", action="store_true", help="neither build nor read locations files"
    )
    parser.add_argument("--seed", type=int, default=20150603)
    args = parser.parse_args(argv)

    if args.catalog:
        if not args.store:
            parser.error("--catalog needs --store")
        store_root, catalog_path = args.store, args.catalog
    else:
        started = time.perf_counter()
        store_root, catalog_path = ensure_event_store(args.events, args.runs)
        build_s = time.perf_counter() - started
    result: dict[str, Any] = {}
    if not args.catalog and not args.no_locations:
        with SQLiteCatalog(catalog_path) as catalog:
            tasks, skipped = plan_locations(catalog, store_root)
            built = run_locations(catalog, tasks)
            built.skipped = skipped
        result["locations_build"] = built.to_dict()
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    key_cache_bytes = WebServiceSettings().reader_key_cache_bytes  # as the service has it
    with (
        SQLiteCatalog(catalog_path) as catalog,
        Reader(
            catalog, key_cache_bytes=key_cache_bytes, use_locations=not args.no_locations
        ) as reader,
    ):
        collection = reader.default_collection()
        files = catalog.list_tagfiles(collection=collection, kinds=[FileKind.MASTER])
        formats = {d.name: d.format for d in catalog.list_datasets(collection)}
        result["store"] = {"collection": collection, **store_figures(files, formats)}
        result["locations_cover_store"] = reader.located(collection)
        result["locations_bytes"] = sum(
            e.bytes
            for e in catalog.list_tagfiles(collection=collection, kinds=[FileKind.INDEX])
            if e.part == LOCATIONS_PART
        )
        if not args.catalog:
            result["store"]["ensure_s"] = round(build_s, 1)
        raw = [f for f in files if formats.get(f.dataset) == "RAW"]
        keys = sample_keys(raw, args.picks + args.batch, rng)
        picks, batch = keys[: args.picks], keys[args.picks :]

        def pick(key: Key) -> None:
            if reader.pick(collection, *key) is None:
                raise RuntimeError(f"event {key} not found")

        cold = _timed(pick, picks)
        cpu_before = time.process_time()
        warm = _timed(pick, picks)
        pick_cpu_s = time.process_time() - cpu_before
        result.update(_figures("pick", warm))
        # CPU per pick (every thread of this process): what a pick costs on a free core,
        # steadier than wall time on a shared machine.
        result["pick_cpu_ms_per_pick"] = round(pick_cpu_s / len(picks) * 1000, 3)
        result.update(_figures("pick_cold", cold))
        result["picks"] = len(picks)
        result["key_cache_bytes"] = key_cache_bytes

        # Cold: the pages of the locations files dropped from the page cache first, but
        # for those this process maps already (the key samples read on opening, the rows
        # the picks above touched); the bytes read show it was cold.
        evict(
            [
                _local_path(e.uri)
                for e in catalog.list_tagfiles(collection=collection, kinds=[FileKind.INDEX])
                if e.part == LOCATIONS_PART
            ]
        )
        read_before, faults_before = io_counters()
        started, cpu_before = time.perf_counter(), time.process_time()
        found = reader.lookup(collection, batch)
        result["batch_10k_s"] = round(time.perf_counter() - started, 3)
        result["batch_10k_cpu_s"] = round(time.process_time() - cpu_before, 3)
        read_after, faults_after = io_counters()
        result["batch_10k_read_mb"] = round((read_after - read_before) / 1e6, 1)
        result["batch_10k_major_faults"] = faults_after - faults_before
        started = time.perf_counter()
        reader.lookup(collection, batch)
        result["batch_10k_warm_s"] = round(time.perf_counter() - started, 3)
        result["batch_events"] = len(batch)
        result["batch_found"] = sum(1 for event in found if event is not None)

        ours = np.asarray(warm) * 1000.0
        if args.mapfile_picks and not args.no_locations:
            subset = picks[: args.mapfile_picks]
            result.update(measure_mapfiles(catalog, collection, subset, key_cache_bytes))
            p50 = float(np.percentile(ours[: len(subset)], 50))
            result["ratio_mapfile_to_pick"] = round(result["mapfile_p50_ms"] / p50, 1)
        if not args.no_duckdb:
            subset = picks[: args.duckdb_picks]
            result.update(measure_duckdb(files, subset))
            p50 = float(np.percentile(ours[: len(subset)], 50))
            result["ratio_duckdb_to_pick"] = round(result["duckdb_p50_ms"] / p50, 1)
        if not args.no_spark:
            subset = picks[: args.spark_picks]
            result.update(measure_spark(files, subset))
            p50 = float(np.percentile(ours[: len(subset)], 50))
            result["ratio_spark_to_pick"] = round(result["spark_p50_ms"] / p50, 1)

    if not args.no_http:
        with running_server(store_root, catalog_path, workers=1) as (url, pid):
            result.update(measure_http(url, pid, collection, picks))
            result["http_workers"] = 1
            if args.load_seconds > 0 and args.load_workers == 1:
                result["load"] = _load(url, collection, picks, args)
        if args.load_seconds > 0 and args.load_workers != 1:
            workers = args.load_workers
            with running_server(store_root, catalog_path, workers=workers) as (url, _):
                result["load"] = _load(url, collection, picks, args)

    result["targets"] = TARGETS
    result["met"] = {
        name: result[name] <= limit for name, limit in TARGETS.items() if name in result
    }
    if "load" in result:
        load = result["load"]
        result["met"]["load"] = (
            load["throughput_per_s"] >= LOAD_TARGET_RATE
            and load.get("p99_ms", float("inf")) <= LOAD_TARGET_P99_MS
            and load["errors"] == 0
        )
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def _load(
    url: str, collection: str, keys: Sequence[Key], args: argparse.Namespace
) -> dict[str, Any]:
    paths = [_pick_path(collection, key) for key in keys]
    # Warm the server's files and caches on these keys first, as for the latency figures.
    with httpx.Client(base_url=url, timeout=30) as client:
        for path in paths:
            client.get(path)
    load = run_load(
        url,
        paths,
        rate=args.load_rate,
        seconds=args.load_seconds,
        connections=args.load_connections,
    )
    return {"workers": args.load_workers, "distinct_events": len(paths), **load.summary()}


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
