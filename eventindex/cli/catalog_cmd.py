"""``eventindex catalog ls|show|verify|gc``."""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from eventindex.cli.context import (
    EXIT_NOT_FOUND,
    OutputFormat,
    OutputOption,
    catalog_of,
    print_json,
    print_wide,
    state,
    stderr,
    stdout,
)

app = typer.Typer(help="Inspect and check the fileset catalog.", no_args_is_help=True)


def _totals(files: list[Any]) -> dict[str, int]:
    return {
        "files": len(files),
        "rows": sum(f.rows for f in files),
        "bytes": sum(f.bytes for f in files),
    }


@app.command("ls")
def list_cmd(
    ctx: typer.Context,
    collection: Annotated[
        str | None, typer.Argument(help="List this collection's datasets (else all collections).")
    ] = None,
    output: OutputFormat = OutputOption,
) -> None:
    """List collections, or the datasets of one collection, with file counts and sizes."""
    with catalog_of(state(ctx).settings) as catalog:
        files = catalog.list_tagfiles(collection=collection)
        if collection is None:
            by_collection: dict[str, list[Any]] = defaultdict(list)
            for entry in files:
                by_collection[entry.collection].append(entry)
            rows = [
                {
                    "collection": c.name,
                    "kind": c.kind.value,
                    "datasets": len(catalog.list_datasets(c.name)),
                    **_totals(by_collection[c.name]),
                }
                for c in catalog.list_collections()
            ]
        else:
            by_dataset: dict[str, list[Any]] = defaultdict(list)
            for entry in files:
                by_dataset[entry.dataset].append(entry)
            rows = []
            for dataset in catalog.list_datasets(collection):
                part = by_dataset[dataset.name]
                keys = [f.key_min for f in part] + [f.key_max for f in part]
                rows.append(
                    {
                        "dataset": dataset.name,
                        "format": dataset.format,
                        "processing_tag": dataset.processing_tag,
                        **_totals(part),
                        "key_min": list(min(keys)) if keys else None,
                        "key_max": list(max(keys)) if keys else None,
                    }
                )
    if output is OutputFormat.JSON:
        print_json(rows)
        return
    _print_table(rows)


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        stdout.print("(nothing)")
        return
    table = Table(box=None, pad_edge=False)
    for name in rows[0]:
        table.add_column(name, justify="right" if isinstance(rows[0][name], int) else "left")
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    print_wide(table)


def _cell(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):
        return "/".join(str(v) for v in value)
    return "" if value is None else str(value)


@app.command()
def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A dataset name, collection name or file id.")],
    output: OutputFormat = OutputOption,
) -> None:
    """Show one dataset (with its files), collection, or TagFile."""
    from eventindex.errors import NotFoundError

    with catalog_of(state(ctx).settings) as catalog:
        detail: dict[str, Any]
        try:
            dataset = catalog.get_dataset(name)
            files = catalog.list_tagfiles(dataset=name, states=None)
            detail = {"dataset": _plain(dataset), "files": [_plain(f) for f in files]}
        except NotFoundError:
            try:
                collection = catalog.get_collection(name)
                detail = {
                    "collection": _plain(collection),
                    "key": list(collection.key),
                    "datasets": [d.name for d in catalog.list_datasets(name)],
                }
            except NotFoundError:
                try:
                    detail = {"file": _plain(catalog.get_tagfile(name))}
                except NotFoundError:
                    raise NotFoundError(
                        f"no dataset, collection or file id {name!r} in the catalog"
                    ) from None
    if output is OutputFormat.JSON:
        print_json(detail)
        return
    for section, value in detail.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            stdout.print(f"[bold]{section}[/bold] ({len(value)})")
            _print_table(
                [
                    {
                        k: f[k]
                        for k in ("file_id", "kind", "state", "rows", "bytes", "key_min", "key_max")
                    }
                    for f in value
                ]
            )
        elif isinstance(value, dict):
            stdout.print(f"[bold]{section}[/bold]")
            for key, item in value.items():
                stdout.print(f"  {key:16} {_cell(item)}")
        else:
            stdout.print(f"[bold]{section}[/bold] {_cell(value)}")


def _plain(entity: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(entity).items()}


@app.command()
def verify(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(help="Check only this dataset.")] = None,
    checksums: Annotated[
        bool, typer.Option("--checksums/--no-checksums", help="Re-hash every file.")
    ] = True,
    strict: Annotated[bool, typer.Option(help="Fail on warnings too.")] = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Check that every committed file exists with its size, checksum, rows and key range,
    that extensions match their masters, and that no orphan file lies in the store.

    Exit status 0 when all is well, 1 when problems were found.
    """
    from catalog.verify import verify_catalog

    settings = state(ctx).settings
    quiet = output is OutputFormat.JSON
    with (
        catalog_of(settings) as catalog,
        Progress(console=stderr, transient=True, disable=quiet) as progress,
    ):
        task = progress.add_task("verifying", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        report = verify_catalog(
            catalog,
            settings.store.root,
            dataset=dataset,
            checksums=checksums,
            progress=advance,
        )
    if output is OutputFormat.JSON:
        print_json(report.to_dict())
    else:
        stdout.print(report.to_text())
    if not report.ok(strict):
        raise typer.Exit(EXIT_NOT_FOUND)


@app.command()
def gc(
    ctx: typer.Context,
    grace: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Delete retired files retired this many seconds ago or more "
            "(default: catalog.gc_grace_seconds).",
        ),
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be removed; delete nothing.")
    ] = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Delete the files of retired entries older than the grace time and of stale
    'writing' entries (crash debris), then forget those entries.

    Exit status 0 when all is well, 1 when a file could not be deleted.
    """
    from catalog.gc import collect_garbage

    settings = state(ctx).settings
    with catalog_of(settings) as catalog:
        report = collect_garbage(
            catalog,
            grace_seconds=settings.catalog.gc_grace_seconds if grace is None else grace,
            dataset=dataset,
            dry_run=dry_run,
        )
    if output is OutputFormat.JSON:
        print_json(report.to_dict())
    else:
        stdout.print(report.to_text(), markup=False, highlight=False)
    if not report.ok():
        raise typer.Exit(EXIT_NOT_FOUND)
