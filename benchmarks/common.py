"""What every benchmark shares: the machine description, timing and JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
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
