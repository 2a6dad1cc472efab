"""``eventindex pick RUN EVENT``: every location of one event."""

from __future__ import annotations

from typing import Annotated

import typer

from eventindex.cli.context import (
    EXIT_NOT_FOUND,
    OutputFormat,
    OutputOption,
    catalog_of,
    print_json,
    state,
    stdout,
)
from eventindex.errors import NotFoundError


def register(app: typer.Typer) -> None:
    app.command()(pick)


def pick(
    ctx: typer.Context,
    run_number: Annotated[int, typer.Argument(min=0, max=2**32 - 1, help="Run number.")],
    event_number: Annotated[int, typer.Argument(min=0, max=2**64 - 1, help="Event number.")],
    collection: Annotated[
        str | None, typer.Option(help="Collection (needed when the catalog has several).")
    ] = None,
    formats: Annotated[
        list[str] | None, typer.Option("--format", help="Only these formats (repeatable).")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Only datasets matching this glob pattern.")
    ] = None,
    output: OutputFormat = OutputOption,
) -> None:
    """Find an event in every dataset that holds it: its attributes, and for each format the
    file GUID and the event's position in that file. Exit status 1 if it is not found."""
    from eventindex.query import Reader
    from eventindex.records.schema import RecordKind

    with catalog_of(state(ctx).settings) as catalog:
        if collection is None:
            names = [c.name for c in catalog.list_collections()]
            if len(names) != 1:
                raise NotFoundError(
                    f"--collection is needed: the catalog holds {len(names)} collections "
                    f"({', '.join(names) or 'none'})"
                )
            collection = names[0]
        if catalog.get_collection(collection).kind is not RecordKind.EVENTS:
            raise NotFoundError(f"collection {collection!r} holds objects, not events")
        reader = Reader(catalog)
        try:
            picked = reader.pick(
                collection, run_number, event_number, formats=formats, dataset_pattern=dataset
            )
        finally:
            reader.close()
    if picked is None:
        if output is OutputFormat.JSON:
            print_json(None)
        else:
            stdout.print(f"event {run_number}/{event_number} not found in {collection}")
        raise typer.Exit(EXIT_NOT_FOUND)
    if output is OutputFormat.JSON:
        print_json(picked.to_dict())
        return
    stdout.print(f"[bold]run {run_number} event {event_number}[/bold] in {collection}")
    for key, value in picked.attributes.items():
        stdout.print(f"  {key:14} {value}")
    for loc in picked.locations:
        stdout.print(f"  {loc.format:10} {loc.guid}  entry {loc.position:<8} {loc.dataset}")
