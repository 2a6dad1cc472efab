"""How soon a running Reader sees a committed file, and what watching the catalog costs.

On a copy of the shared 100 M-event store's catalog (``ensure_event_store``; the
copy is taken with SQLite's backup API, so the shared file is only read):

* ``token_us``: ``Catalog.change_token`` (p50/p99 of ``--token-reads`` reads);
* ``listing_ms``: what the Reader lists per collection (masters, index files,
  datasets, extension files; p50/p99 of ``--listings``), and
  ``ratio_listing_to_token``;
* ``idle``: a Reader (``refresh_seconds`` 1, another connection than the
  writer's) picking for ``--idle-seconds`` while nobody writes: its token checks
  and listings (0 expected), pick p50/p99;
* ``visible_s``: commit → visible, ``--trials`` times: a RAW file of a new run
  is written and committed through the writer's own connection while the
  Reader is picked every 10 ms (so at a random moment of its check cycle), and
  it is picked on until it returns the run's first event (p50/max of the trials);
* the same-run baseline: before the change token the Reader listed at most once
  per 100 times the listing time, so a commit waited up to ``before_visible_bound_s``
  = max(1 s, 100 * ``listing_ms`` p50); ``ratio_before_bound_to_visible_p50``.

``--catalog`` measures another SQLite catalog (of an event collection) instead.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from benchmarks.common import emit, event_store_paths, percentiles_ms, time_each

VISIBLE_TIMEOUT_S = 60.0
OLD_REFRESH_COST_FACTOR = 100.0  # the Reader's rule before the change token
REFRESH_SECONDS = 1.0  # the Reader's default


def _copy(source: str, target: Path) -> None:
    """A consistent copy of a live SQLite file (others may be writing it)."""
    with (
        closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src,
        closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.freshness", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000_000, help="the shared store's size")
    parser.add_argument("--catalog", help="another SQLite catalog to copy and measure")
    parser.add_argument("--token-reads", type=int, default=20_000)
    parser.add_argument("--listings", type=int, default=7)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    from catalog.fileset import FilesetWriter
    from catalog.model import FileKind
    from catalog.sqlite import SQLiteCatalog
    from eventindex.creator import ensure_dataset
    from eventindex.generator import DEFAULT_PROCESSINGS, GeneratorSpec, dataset_specs, generate_run
    from eventindex.query import Reader
    from eventindex.query.extensions import live_extensions
    from eventindex.storage import WriteOptions

    source = args.catalog or event_store_paths(args.events)[1]
    if not Path(source).is_file():
        parser.error(f"no catalog at {source}: run `eventindex bench pick` once to build the store")
    rng = random.Random(args.seed)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="freshness-") as folder:
        copy = Path(folder) / "catalog.sqlite"
        _copy(source, copy)
        watching = SQLiteCatalog(str(copy))  # the Reader's (the service's) connection
        writing = SQLiteCatalog(str(copy))  # the consumers'
        try:
            collection = watching.list_collections()[0].name
            masters = watching.list_tagfiles(collection=collection, kinds=[FileKind.MASTER])
            last_run = max(f.key_max[0] for f in masters)

            token_s = time_each(watching.change_token, args.token_reads)

            def listing() -> None:  # what Reader._load asks the catalog
                watching.list_tagfiles(collection=collection, kinds=[FileKind.MASTER])
                watching.list_tagfiles(collection=collection, kinds=[FileKind.INDEX])
                watching.list_datasets(collection)
                live_extensions(watching, collection)

            listing_s = time_each(listing, args.listings)

            # New runs after the store's last, RAW only, their datasets made before the
            # Reader starts: the trials' commits are the only writes it sees.
            project, stream = collection.split(".", 1)
            spec = GeneratorSpec(
                project=project,
                stream=stream,
                first_run=last_run + 1,
                runs=args.trials,
                events_per_run=500,
                processings=DEFAULT_PROCESSINGS[:1],
            )
            for dataset in dataset_specs(spec):
                ensure_dataset(writing, dataset)
            datasets = {d.name: d for d in dataset_specs(spec)}
            writer = FilesetWriter(writing, str(Path(folder) / "store"), WriteOptions())
            tables = {run: generate_run(spec, run) for run in spec.run_numbers}

            with Reader(watching, refresh_seconds=REFRESH_SECONDS) as reader:
                known = masters[0]
                assert reader.pick(collection, known.key_min[0], known.key_min[1]) is not None
                stats = reader.stats()

                def pick_known() -> None:
                    reader.pick(collection, known.key_min[0], known.key_min[1])

                picks: list[float] = []
                started = time.monotonic()
                while time.monotonic() - started < args.idle_seconds:
                    picks += time_each(pick_known, 1)
                    time.sleep(0.01)
                after = reader.stats()
                idle = {
                    "seconds": args.idle_seconds,
                    "token_checks": after["catalog_checks"] - stats["catalog_checks"],
                    "listings": after["catalog_refreshes"] - stats["catalog_refreshes"],
                    "pick_ms": percentiles_ms(picks),
                }

                visible: list[float] = []
                trial_picks: list[float] = []
                for run_number, run_tables in tables.items():
                    # Picks go on (a service under load asks every 10 ms), and the commit
                    # lands at a random moment of the Reader's check cycle.
                    until = time.monotonic() + rng.uniform(0.5, 2.0)
                    while time.monotonic() < until:
                        trial_picks += time_each(pick_known, 1)
                        time.sleep(0.01)
                    ((name, table),) = run_tables.items()
                    event_number = int(table["event_number"][0].as_py())
                    writer.write(table, datasets[name])
                    committed = time.perf_counter()
                    while True:
                        before = time.perf_counter()
                        found = reader.pick(collection, run_number, event_number)
                        trial_picks.append(time.perf_counter() - before)
                        if found is not None:
                            break
                        if time.perf_counter() - committed > VISIBLE_TIMEOUT_S:
                            raise RuntimeError(f"run {run_number} never became visible")
                        time.sleep(0.01)
                    visible.append(time.perf_counter() - committed)
                reader_stats = reader.stats()
        finally:
            watching.close()
            writing.close()

    listing_p50_s = percentiles_ms(listing_s)["p50"] / 1000.0
    visible_ms = percentiles_ms(visible)
    before_bound_s = max(REFRESH_SECONDS, OLD_REFRESH_COST_FACTOR * listing_p50_s)
    return {
        "catalog": source,
        "master_files": len(masters),
        "token_us": {k: round(v * 1000, 2) for k, v in percentiles_ms(token_s).items()},
        "listing_ms": percentiles_ms(listing_s),
        "ratio_listing_to_token": round(listing_p50_s / sorted(token_s)[len(token_s) // 2]),
        "idle": idle,
        "visible_s": {
            "p50": round(visible_ms["p50"] / 1000, 3),
            "max": round(max(visible), 3),
            "trials": [round(v, 3) for v in visible],
        },
        "pick_ms_while_committing": percentiles_ms(trial_picks),
        "reader_listings_total": reader_stats["catalog_refreshes"],
        "before_visible_bound_s": round(before_bound_s, 1),
        "ratio_before_bound_to_visible_p50": round(before_bound_s / (visible_ms["p50"] / 1000), 1),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
