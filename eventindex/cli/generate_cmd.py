"""``eventindex generate``: realistic synthetic event records, into the store or JSON lines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress

from eventindex.cli.context import (
    OutputFormat,
    OutputOption,
    catalog_of,
    print_json,
    state,
    stderr,
    stdout,
)

if TYPE_CHECKING:
    from eventindex.generator import GeneratorSpec


def register(app: typer.Typer) -> None:
    app.command()(generate)


def generate(
    ctx: typer.Context,
    runs: Annotated[int, typer.Option(min=1, help="Number of runs.")] = 3,
    events_per_run: Annotated[int, typer.Option(min=1, help="Mean events per run.")] = 20_000,
    first_run: Annotated[int, typer.Option(min=1, help="First run number.")] = 284484,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same data).")] = 0,
    project: Annotated[str, typer.Option(help="Project tag.")] = "data15_13TeV",
    stream: Annotated[str, typer.Option(help="Stream name.")] = "physics_Main",
    large_event_numbers: Annotated[
        bool, typer.Option(help="Give some runs event numbers above 2^32.")
    ] = False,
    exact: Annotated[bool, typer.Option(help="Exactly --events-per-run in every run.")] = False,
    file_rows: Annotated[int, typer.Option(min=1, help="Most rows in one TagFile.")] = 2_000_000,
    jsonl: Annotated[
        Path | None,
        typer.Option(help="Write JSON lines (one file per dataset) here instead of the store."),
    ] = None,
    output: OutputFormat = OutputOption,
) -> None:
    """Generate ATLAS-like event records (runs, lumiblocks, trigger masks and menus, GUIDs
    and positions in RAW, AOD and DAOD files) and store them, registered in the catalog.

    Re-running the same command resumes: datasets already complete are skipped.
    """
    from eventindex.generator import GeneratorSpec

    try:
        spec = GeneratorSpec(
            project=project,
            stream=stream,
            first_run=first_run,
            runs=runs,
            events_per_run=events_per_run,
            seed=seed,
            large_event_numbers=large_event_numbers,
            exact=exact,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if jsonl is not None:
        result = _to_jsonl(spec, jsonl)
    else:
        result = _to_store(ctx, spec, file_rows, quiet=output is OutputFormat.JSON)
    if output is OutputFormat.JSON:
        print_json(result)
    else:
        for key, value in result.items():
            shown = len(value) if isinstance(value, list) else value
            stdout.print(f"{key:18} {shown:,}" if isinstance(shown, int) else f"{key:18} {shown}")


def _to_store(
    ctx: typer.Context, spec: GeneratorSpec, file_rows: int, quiet: bool
) -> dict[str, object]:
    from catalog.fileset import FilesetWriter
    from eventindex.creator import create_generated
    from eventindex.storage import WriteOptions

    settings = state(ctx).settings
    options = WriteOptions(
        row_group_rows=settings.mapfile.row_group_rows,
        compression=settings.mapfile.compression,
        compression_level=settings.mapfile.compression_level,
    )
    with (
        catalog_of(settings) as catalog,
        Progress(console=stderr, transient=True, disable=quiet) as progress,
    ):
        task = progress.add_task("generating runs", total=spec.runs)
        writer = FilesetWriter(catalog, settings.store.root, options)
        summary = create_generated(
            spec,
            catalog,
            writer,
            file_rows=file_rows,
            progress=lambda _run: progress.advance(task),
        )
    return {
        "collection": summary.collection,
        "datasets_written": summary.datasets_written,
        "datasets_skipped": summary.datasets_skipped,
        "files": summary.files,
        "rows": summary.rows,
        "bytes": summary.bytes,
        "store": writer.root,
    }


def _to_jsonl(spec: GeneratorSpec, directory: Path) -> dict[str, object]:
    import json

    from eventindex.generator import generate_menus, iter_runs
    from eventindex.records.jsonl import write_jsonl

    directory.mkdir(parents=True, exist_ok=True)
    files = []
    rows = 0
    for _run, tables in iter_runs(spec):
        for name, table in tables.items():
            path = directory / f"{name}.jsonl"
            rows += write_jsonl(table, path)
            files.append(str(path))
    menus = directory / "menus.json"
    menus.write_text(json.dumps([m.model_dump() for m in generate_menus(spec)], indent=1))
    return {"collection": spec.collection, "files": files, "rows": rows, "menus": str(menus)}
