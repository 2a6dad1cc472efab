"""``eventindex demo``: the whole chain on the embedded defaults, in a scratch folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from eventindex.cli.context import EXIT_ERROR, stdout


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Scratch folder (emptied first) for store and catalog.")
    ] = Path("var/demo"),
    runs: Annotated[int, typer.Option(min=1)] = 3,
    events_per_run: Annotated[int, typer.Option(min=1)] = 20_000,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Generate a few runs into a fresh store and SQLite catalog, list and verify the catalog,
    then pick events back by (run, event) and show where every copy of them lives."""
    import numpy as np

    from catalog import SQLiteCatalog
    from catalog.fileset import FilesetWriter
    from catalog.model import FileKind
    from catalog.verify import verify_catalog
    from eventindex.creator import create_generated
    from eventindex.generator import GeneratorSpec
    from eventindex.query import Reader
    from eventindex.storage import MapFileReader

    if directory.exists():
        shutil.rmtree(directory)
    store = directory / "store"
    spec = GeneratorSpec(runs=runs, events_per_run=events_per_run, seed=seed)
    catalog = SQLiteCatalog(str(directory / "catalog.sqlite"))
    try:
        stdout.rule("1. generate → map-files in the store, registered in the catalog")
        start = time.perf_counter()
        summary = create_generated(spec, catalog, FilesetWriter(catalog, str(store)))
        seconds = time.perf_counter() - start
        stdout.print(
            f"{summary.rows:,} event records in {len(summary.datasets_written)} datasets, "
            f"{summary.files} TagFiles, {summary.bytes / 2**20:.1f} MiB, in {seconds:.1f} s"
        )
        stdout.rule("2. catalog ls")
        files = catalog.list_tagfiles(collection=spec.collection)
        for dataset in catalog.list_datasets(spec.collection):
            mine = [f for f in files if f.dataset == dataset.name]
            stdout.print(
                f"  {dataset.name:64} {sum(f.rows for f in mine):>9,} rows {len(mine)} file(s)"
            )
        stdout.rule("3. catalog verify")
        report = verify_catalog(catalog, str(store))
        stdout.print(report.to_text())
        if not report.ok():
            raise typer.Exit(EXIT_ERROR)
        stdout.rule("4. pick events by (run, event)")
        raw = [f for f in files if f.kind is FileKind.MASTER and f.dataset.endswith(".daq.RAW")]
        rng = np.random.default_rng(seed)
        reader = Reader(catalog)
        try:
            for entry in raw:
                with MapFileReader(entry.uri) as source:
                    keys = source.read(["run_number", "event_number"])
                row = int(rng.integers(0, keys.num_rows))
                run_number = keys["run_number"][row].as_py()
                event_number = keys["event_number"][row].as_py()
                start = time.perf_counter()
                picked = reader.pick(spec.collection, run_number, event_number)
                took = (time.perf_counter() - start) * 1000
                if picked is None:
                    stdout.print(f"[red]event {run_number}/{event_number} not found[/red]")
                    raise typer.Exit(EXIT_ERROR)
                stdout.print(
                    f"[bold]run {run_number} event {event_number}[/bold] "
                    f"(lumiblock {picked.attributes['lumi_block']}, {took:.1f} ms)"
                )
                for loc in picked.locations:
                    stdout.print(
                        f"    {loc.format:10} {loc.processing_tag or '-':18} {loc.guid} "
                        f"entry {loc.position}"
                    )
        finally:
            reader.close()
        stdout.rule("done")
        stdout.print(
            f"store: {store}   catalog: {directory / 'catalog.sqlite'}\n"
            f"try: eventindex --store {store} --catalog {directory / 'catalog.sqlite'} "
            "catalog ls"
        )
    finally:
        catalog.close()
