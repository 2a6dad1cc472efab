"""Synthetic event generation throughput on one core: events to Arrow tables.

Generates ``--events`` events in runs of ``--events-per-run`` with the default
processings (RAW, two AOD processings, a 30 % DAOD_PHYS skim), so every event
becomes three or four dataset rows with their references. The trigger
template pools are built inside the timed region (cold caches), as a fresh
process would; ``pool_seconds`` says how much of the time they took, and
``warm_generate_events_per_s`` is the rate once they are cached.

    python -m benchmarks.generate [--events N] [--events-per-run N] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.common import emit
from eventindex import generator
from eventindex.generator import GeneratorSpec, generate_run


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__)
    parser.add_argument("--events", type=int, default=4_000_000, help="events to generate")
    parser.add_argument("--events-per-run", type=int, default=1_000_000, help="events per run")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(list(argv))


def _clear_caches() -> None:
    generator._trigger_universe.cache_clear()
    generator._schedule.cache_clear()
    generator._pool.cache_clear()


def _generate_all(spec: GeneratorSpec) -> tuple[int, int, float]:
    """Generate every run; returns (events, dataset rows, seconds)."""
    events = rows = 0
    start = time.perf_counter()
    for run_number in spec.run_numbers:
        tables = generate_run(spec, run_number)
        # The first processing holds every event of the run.
        events += next(iter(tables.values())).num_rows
        rows += sum(table.num_rows for table in tables.values())
        del tables
    return events, rows, time.perf_counter() - start


def run(argv: Sequence[str]) -> dict[str, Any]:
    """Generate the requested events twice (cold, then warm caches) and report rates."""
    args = _parse(argv)
    runs = max(1, round(args.events / args.events_per_run))
    spec = GeneratorSpec(runs=runs, events_per_run=args.events_per_run, exact=True, seed=args.seed)

    _clear_caches()
    pool_start = time.perf_counter()
    for index in range(spec.runs):
        # The pools the runs will need: what a cold run pays before its first event.
        universe = generator._trigger_universe(spec.seed, spec.l1_bits, spec.hlt_bits)
        smk_index = generator._schedule(spec.seed, spec.runs).run_smk_index[index]
        epoch = generator._menu_epoch(universe, smk_index)
        for prescale_set in range(generator.PRESCALE_SETS):
            generator._pool(spec, epoch, prescale_set)
    pool_seconds = time.perf_counter() - pool_start

    _clear_caches()
    events, rows, cold_seconds = _generate_all(spec)
    _, _, warm_seconds = _generate_all(spec)
    return {
        "benchmark": "generate",
        "events": events,
        "runs": spec.runs,
        "events_per_run": spec.events_per_run,
        "dataset_rows": rows,
        "datasets_per_run": len(spec.processings),
        "seconds": round(cold_seconds, 3),
        "generate_events_per_s": round(events / cold_seconds),
        "generate_rows_per_s": round(rows / cold_seconds),
        "pool_seconds": round(pool_seconds, 3),
        "warm_generate_events_per_s": round(events / warm_seconds),
    }


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
