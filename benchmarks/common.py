"""What every benchmark shares: the machine description, timing and JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def machine_info() -> dict[str, Any]:
    """Enough about the machine to compare figures across runs."""
    try:
        with open("/proc/meminfo") as handle:  # noqa: PTH123 - Linux only, optional
            mem_kb = int(handle.readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
    }


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 of durations given in seconds, in milliseconds."""
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "p50": round(float(np.percentile(values, 50)), 4),
        "p90": round(float(np.percentile(values, 90)), 4),
        "p99": round(float(np.percentile(values, 99)), 4),
    }


def time_each(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall time of each of ``repeat`` calls, in seconds."""
    durations = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - start)
    return durations


def emit(result: dict[str, Any]) -> None:
    """Print the one JSON object a benchmark produces."""
    result.setdefault("machine", machine_info())
    json.dump(result, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


BENCH_ROOT = "var/bench"


def event_store_paths(events: int) -> tuple[str, str]:
    """Store root and SQLite catalog of the shared generated benchmark store of ``events``."""
    base = f"{BENCH_ROOT}/events-{events}"
    return f"{base}/store", f"{base}/catalog.sqlite"


def ensure_event_store(events: int = 100_000_000, runs: int = 50) -> tuple[str, str]:
    """Build (or resume, or reuse) the generated event store shared by the benchmarks.

    ``events`` distinct events over ``runs`` runs, each in RAW, two AOD processings and a
    DAOD skim (several datasets per run). Generation is deterministic and resumable, so
    every benchmark that asks for the same size reads the same files.
    """
    from catalog.fileset import FilesetWriter
    from catalog.model import FileKind
    from catalog.sqlite import SQLiteCatalog
    from eventindex.creator import create_generated
    from eventindex.generator import GeneratorSpec, dataset_specs
    from eventindex.storage import WriteOptions

    root, catalog_path = event_store_paths(events)
    Path(catalog_path).parent.mkdir(parents=True, exist_ok=True)
    spec = GeneratorSpec(runs=runs, events_per_run=max(1, events // runs), exact=True, seed=0)
    with SQLiteCatalog(catalog_path) as catalog:
        # Resuming regenerates every run to compare it with what is stored (minutes on
        # 100 M events): a store whose catalog already lists all of it is read as it is.
        expected = {d.name: d.format for d in dataset_specs(spec)}
        known = {c.name for c in catalog.list_collections()}
        files = (
            catalog.list_tagfiles(collection=spec.collection, kinds=[FileKind.MASTER])
            if spec.collection in known
            else []
        )
        raw_rows = sum(f.rows for f in files if expected.get(f.dataset) == "RAW")
        if {f.dataset for f in files} >= set(expected) and raw_rows == events:
            return root, catalog_path
        create_generated(spec, catalog, FilesetWriter(catalog, root, WriteOptions()))
    return root, catalog_path
