"""``eventindex demo``: the whole chain on the embedded defaults, in a scratch folder.

generate (JSON lines) → produce extract (.ei files) → produce send → broker (the
in-process one, or ActiveMQ with ``--broker``) → consume → map-files + catalog,
then list and verify the catalog and pick events back.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from eventindex.cli.context import EXIT_ERROR, state, stdout

if TYPE_CHECKING:
    from catalog.base import Catalog
    from consumers.consumer import ConsumerStats
    from eventindex.config import Settings
    from eventindex.generator import GeneratorSpec


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Option("--dir", help="Scratch folder (emptied first) for store and catalog.")
    ] = Path("var/demo"),
    runs: Annotated[int, typer.Option(min=1)] = 3,
    events_per_run: Annotated[int, typer.Option(min=1)] = 20_000,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    broker: Annotated[
        str | None,
        typer.Option(help="Send through this broker (stomp://host:port) instead of memory://."),
    ] = None,
) -> None:
    """Run the data-collection chain end to end: generate JSON lines, extract them into
    .ei files, send them through a broker, consume them into map-files registered in a
    fresh SQLite catalog; then list and verify the catalog and pick events back by
    (run, event), showing where every copy of them lives."""
    from catalog import SQLiteCatalog
    from catalog.verify import verify_catalog
    from eventindex.generator import GeneratorSpec, generate_menus

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    store = directory / "store"
    catalog_path = directory / "catalog.sqlite"
    spec = GeneratorSpec(runs=runs, events_per_run=events_per_run, seed=seed)
    url = broker or f"memory://demo-{time.time_ns()}"
    settings = state(ctx).settings.model_copy(
        update={
            "store": state(ctx).settings.store.model_copy(update={"root": str(store)}),
            "catalog": state(ctx).settings.catalog.model_copy(
                update={"type": "sqlite", "path": str(catalog_path)}
            ),
        }
    )
    catalog = SQLiteCatalog(str(catalog_path))
    try:
        stdout.rule("1. generate → JSON lines, one file per dataset")
        inputs = _generate(spec, directory / "jsonl")
        for menu in generate_menus(spec):
            catalog.put_trigger_menu(menu)
        stdout.rule("2. produce extract → one .ei file (SQLite) per dataset")
        files = _extract(inputs, directory / "ei", settings.codec.message_bytes)
        stdout.rule(f"3. produce send → {url.split('://')[0]} broker → consume → store")
        _send_and_consume(files, url, settings)
        stdout.rule("4. catalog ls")
        tagfiles = catalog.list_tagfiles(collection=spec.collection)
        for dataset in catalog.list_datasets(spec.collection):
            mine = [f for f in tagfiles if f.dataset == dataset.name]
            stdout.print(
                f"  {dataset.name:64} {sum(f.rows for f in mine):>9,} rows {len(mine)} file(s)"
            )
        stdout.rule("5. catalog verify")
        report = verify_catalog(catalog, str(store))
        stdout.print(report.to_text())
        if not report.ok():
            raise typer.Exit(EXIT_ERROR)
        stdout.rule("6. pick events by (run, event)")
        _pick(catalog, spec, seed)
        stdout.rule("done")
        stdout.print(
            f"store: {store}   catalog: {catalog_path}\n"
            f"try: eventindex --store {store} --catalog {catalog_path} catalog ls"
        )
    finally:
        catalog.close()


def _generate(spec: GeneratorSpec, directory: Path) -> list[Path]:
    from eventindex.generator import iter_runs
    from eventindex.records.jsonl import write_jsonl

    directory.mkdir(parents=True)
    start = time.perf_counter()
    paths = []
    rows = 0
    for _run, tables in iter_runs(spec):
        for name, table in tables.items():
            path = directory / f"{name}.jsonl"
            rows += write_jsonl(table, path)
            paths.append(path)
    stdout.print(
        f"{rows:,} event records in {len(paths)} files under {directory}, "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return paths


def _extract(inputs: list[Path], directory: Path, message_bytes: int) -> list[Path]:
    from producers.extract import ExtractOptions, extract

    start = time.perf_counter()
    files = []
    messages = 0
    size = 0
    for index, path in enumerate(inputs):
        output = directory / f"{path.stem}.ei"
        header = extract(
            [path],
            output,
            ExtractOptions(task_id="1", job_id=str(index), producer="demo"),
            message_bytes=message_bytes,
        )
        files.append(output)
        messages += header.messages
        size += output.stat().st_size
    stdout.print(
        f"{len(files)} .ei files, {messages:,} messages of ~{message_bytes:,} bytes, "
        f"{size / 2**20:.1f} MiB, in {time.perf_counter() - start:.1f} s"
    )
    return files


def _send_and_consume(files: list[Path], url: str, settings: Settings) -> None:
    from consumers.daemon import run_worker
    from eventindex.transport import open_transport
    from producers.sender import FileSender

    # Small batches flush every second: the demo's files are small.
    settings = settings.model_copy(
        update={"consumer": settings.consumer.model_copy(update={"flush_seconds": 1.0})}
    )
    stop = threading.Event()
    results: list[ConsumerStats] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            results.append(run_worker(settings, url, stop, once=False, name="demo"))
        except BaseException as exc:  # raised below, once the producer is done
            errors.append(exc)

    consumer = threading.Thread(target=consume, name="demo-consumer", daemon=True)
    consumer.start()
    start = time.perf_counter()
    stored = True
    try:
        with open_transport(url, settings.broker) as transport:
            sender = FileSender(
                transport, transaction_messages=settings.producer.transaction_messages
            )
            sender.listen()
            reports = []
            for path in files:
                report = sender.send(path)
                reports.append(report)
                stdout.print(
                    f"  sent {report.messages_sent:>4} messages, {report.events_sent:>7,} events "
                    f"of {report.dataset}"
                )
            stored = sender.wait_stored(reports, settings.producer.wait_seconds)
            sender.close()
            stdout.print(
                "  every message reported stored on the status topic"
                if stored
                else "  [red]not every message was reported stored[/red]"
            )
    finally:
        stop.set()
        consumer.join(timeout=60)
    if errors:
        raise errors[0]
    seconds = time.perf_counter() - start
    for stats in results:
        stdout.print(
            f"consumer: {stats.stored_events:,} events from {stats.stored_messages:,} "
            f"messages in {stats.tagfiles} TagFiles, {stats.invalid} invalid, "
            f"{stats.duplicates} duplicates, in {seconds:.1f} s"
        )
    if not stored:
        stdout.print("[red]the consumers did not confirm every message[/red]")
        raise typer.Exit(EXIT_ERROR)


def _pick(catalog: Catalog, spec: GeneratorSpec, seed: int) -> None:
    import numpy as np

    from catalog.model import FileKind
    from eventindex.query import Reader
    from eventindex.storage import MapFileReader

    files = catalog.list_tagfiles(collection=spec.collection)
    raw = [f for f in files if f.kind is FileKind.MASTER and f.dataset.endswith(".daq.RAW")]
    rng = np.random.default_rng(seed)
    reader = Reader(catalog)
    try:
        for entry in raw[: spec.runs]:
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
