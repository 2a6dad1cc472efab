"""Batch lookups in-process (``Reader.lookup``) against the same events picked one by one
(``Reader.pick``), in the same run, on the same keys, by batch size.

Keys are random existing events of the shared 100 M-event store of ``bench pick``
(with its locations files), which must exist: this benchmark never builds. For each
size of ``--sizes``, ``--batches`` random batches of that many keys are drawn from one
pool; every batch is looked up and picked once to warm (files opened, pages cached),
then again to measure, a lookup and its picks back to back (a change in the machine's
load falls on both alike). Per size: the median wall and CPU time of a lookup
(``lookup_ms``, ``lookup_cpu_ms``) and of picking the same keys (``picks_ms``,
``picks_cpu_ms``), and ``ratio`` = lookup / picks (wall; ``cpu_ratio`` on CPU time):
below 1, the batch is cheaper than its picks. The answers are checked to be the same.

``--cold N`` adds one lookup of ``N`` fresh random events from a cold page cache, as
``bench pick``'s ``batch_10k_s``: the locations files are dropped from the page cache
first (pages this process maps stay), ``cold_read_mb`` shows what was read from disk.
Use a fresh ``--seed`` for each cold run: the virtual disk's host caches blocks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import event_store_paths
from benchmarks.pick import Key, _local_path, evict, io_counters, sample_keys
from catalog.model import FileKind
from catalog.sqlite import SQLiteCatalog
from eventindex.config import WebServiceSettings
from eventindex.query import PickedEvent, Reader
from eventindex.storage.locations import LOCATIONS_PART


def _batches(
    pool: Sequence[Key], sizes: Sequence[int], count: int, rng: np.random.Generator
) -> dict[int, list[list[Key]]]:
    """``count`` random batches of each size from ``pool`` (one when the size is the pool's)."""
    drawn: dict[int, list[list[Key]]] = {}
    for size in sizes:
        times = 1 if size >= len(pool) else count
        drawn[size] = [
            [pool[i] for i in rng.choice(len(pool), size=size, replace=False).tolist()]
            for _ in range(times)
        ]
    return drawn


def _timed(call: Any) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    answer = call()
    return time.perf_counter() - wall, time.process_time() - cpu, answer


def measure(
    reader: Reader, collection: str, batches: Sequence[list[Key]]
) -> dict[str, float | int]:
    """Median lookup and picks times of the batches, warm (each done once before)."""

    def lookup(keys: list[Key]) -> list[PickedEvent | None]:
        return reader.lookup(collection, keys)

    def picks(keys: list[Key]) -> list[PickedEvent | None]:
        return [reader.pick(collection, *key) for key in keys]

    for keys in batches:  # warm: files opened, pages cached
        if lookup(keys) != picks(keys):
            raise RuntimeError("a lookup and its picks answered differently")
    rows: list[tuple[float, float, float, float]] = []
    for keys in batches:
        lookup_s, lookup_cpu, _ = _timed(lambda keys=keys: lookup(keys))
        picks_s, picks_cpu, _ = _timed(lambda keys=keys: picks(keys))
        rows.append((lookup_s, lookup_cpu, picks_s, picks_cpu))
    lookup_ms, lookup_cpu_ms, picks_ms, picks_cpu_ms = (
        statistics.median(column) * 1000 for column in zip(*rows, strict=True)
    )
    return {
        "batches": len(batches),
        "lookup_ms": round(lookup_ms, 3),
        "picks_ms": round(picks_ms, 3),
        "ratio": round(lookup_ms / picks_ms, 3),
        "lookup_cpu_ms": round(lookup_cpu_ms, 3),
        "picks_cpu_ms": round(picks_cpu_ms, 3),
        "cpu_ratio": round(lookup_cpu_ms / picks_cpu_ms, 3) if picks_cpu_ms else 0.0,
    }


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.batch", description=__doc__)
    parser.add_argument("--catalog", help="SQLite catalog (default: the shared 100 M store)")
    parser.add_argument("--store", help="store root of --catalog")
    parser.add_argument("--sizes", default="10,100,1000,10000", help="batch sizes, comma-separated")
    parser.add_argument("--batches", type=int, default=20, help="batches per size (below the pool)")
    parser.add_argument("--pool", type=int, default=10_000, help="random events batches draw from")
    parser.add_argument("--cold", type=int, default=0, help="events of one cold lookup (0: none)")
    parser.add_argument("--seed", type=int, default=20261202)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or max(sizes) > args.pool:
        parser.error("--sizes must be positive and at most --pool")
    if args.catalog and not args.store:
        parser.error("--catalog needs --store")
    store_root, catalog_path = (
        (args.store, args.catalog) if args.catalog else event_store_paths(100_000_000)
    )
    if not Path(catalog_path).exists():
        parser.error(f"no catalog at {catalog_path}: run `eventindex bench pick` to build it")
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    result: dict[str, Any] = {"store": store_root, "seed": args.seed}
    key_cache_bytes = WebServiceSettings().reader_key_cache_bytes  # as the service has it
    with (
        SQLiteCatalog(catalog_path) as catalog,
        Reader(catalog, key_cache_bytes=key_cache_bytes) as reader,
    ):
        collection = reader.default_collection()
        result["locations_cover_store"] = reader.located(collection)
        formats = {d.name: d.format for d in catalog.list_datasets(collection)}
        raw = [
            f
            for f in catalog.list_tagfiles(collection=collection, kinds=[FileKind.MASTER])
            if formats.get(f.dataset) == "RAW"
        ]
        keys = sample_keys(raw, args.pool + args.cold, rng)
        pool, fresh = keys[: args.pool], keys[args.pool :]
        batches = _batches(pool, sizes, args.batches, rng)
        if fresh:
            # Cold first, before the warm passes map pages of every file.
            evict(
                [
                    _local_path(e.uri)
                    for e in catalog.list_tagfiles(collection=collection, kinds=[FileKind.INDEX])
                    if e.part == LOCATIONS_PART
                ]
            )
            read_before, faults_before = io_counters()
            cold_s, cold_cpu, found = _timed(lambda: reader.lookup(collection, fresh))
            read_after, faults_after = io_counters()
            warm_s, warm_cpu, _ = _timed(lambda: reader.lookup(collection, fresh))
            result["cold"] = {
                "events": len(fresh),
                "found": sum(1 for event in found if event is not None),
                "cold_s": round(cold_s, 3),
                "cold_cpu_s": round(cold_cpu, 3),
                "cold_read_mb": round((read_after - read_before) / 1e6, 1),
                "cold_major_faults": faults_after - faults_before,
                "warm_s": round(warm_s, 3),
                "warm_cpu_s": round(warm_cpu, 3),
            }
        result["sizes"] = {str(size): measure(reader, collection, batches[size]) for size in sizes}
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result
