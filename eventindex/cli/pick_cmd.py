"""``eventindex pick RUN EVENT``: every location of one event, from the store or a server.

The output helpers here are shared with ``eventindex lookup``: the same text,
JSON and CSV shapes whether the answer came from the local store or over HTTP.
"""

from __future__ import annotations

import csv
import enum
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer

from eventindex.cli.context import (
    EXIT_NOT_FOUND,
    catalog_of,
    print_json,
    state,
    stdout,
)

if TYPE_CHECKING:
    from eventindex.query import PickedEvent

CSV_HEADER = (
    "run_number",
    "event_number",
    "dataset",
    "format",
    "processing_tag",
    "guid",
    "position",
)


class EventOutput(enum.StrEnum):
    TEXT = "text"
    JSON = "json"
    CSV = "csv"


EventOutputOption = typer.Option(
    EventOutput.TEXT, "--output", "-o", help="Output format (csv: one row per location)."
)
CollectionOption = Annotated[
    str | None,
    typer.Option(help="Collection (needed when the catalog holds several)."),
]
FormatsOption = Annotated[
    list[str] | None, typer.Option("--format", help="Only these formats (repeatable).")
]
DatasetOption = Annotated[
    str | None, typer.Option("--dataset", help="Only datasets matching this glob pattern.")
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        help="Ask the web service at this URL (e.g. http://127.0.0.1:8080) "
        "instead of reading the local store."
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        envvar="EVENTINDEX_TOKEN",
        show_envvar=True,
        help="Bearer token for the web service.",
    ),
]


class EventSource(Protocol):
    """What the commands need of the local Reader or of the HTTP client."""

    collection: str | None

    def pick(
        self,
        run_number: int,
        event_number: int,
        formats: Sequence[str] | None,
        dataset_pattern: str | None,
    ) -> PickedEvent | None: ...

    def lookup(
        self,
        keys: Sequence[tuple[int, int]],
        formats: Sequence[str] | None,
        dataset_pattern: str | None,
    ) -> list[PickedEvent | None]: ...


class _LocalSource:
    def __init__(self, reader: Any, collection: str) -> None:
        self._reader = reader
        self.collection: str | None = collection

    def pick(
        self,
        run_number: int,
        event_number: int,
        formats: Sequence[str] | None,
        dataset_pattern: str | None,
    ) -> PickedEvent | None:
        picked: PickedEvent | None = self._reader.pick(
            self.collection,
            run_number,
            event_number,
            formats=formats,
            dataset_pattern=dataset_pattern,
        )
        return picked

    def lookup(
        self,
        keys: Sequence[tuple[int, int]],
        formats: Sequence[str] | None,
        dataset_pattern: str | None,
    ) -> list[PickedEvent | None]:
        found: list[PickedEvent | None] = self._reader.lookup(
            self.collection, keys, formats=formats, dataset_pattern=dataset_pattern
        )
        return found


class _RemoteSource:
    # Requests stay well below the service's list and body limits.
    batch_size = 10_000

    def __init__(self, client: Any, collection: str | None) -> None:
        self._client = client
        self.collection = collection

    def pick(
        self,
        run_number: int,
        event_number: int,
        formats: Sequence[str] | None,
        dataset_pattern: str | None,
    ) -> PickedEvent | None:
        picked: PickedEvent | None = self._client.pick(
            run_number,
            event_number,
            collection=self.collection,
            formats=formats,
            dataset_pattern=dataset_pattern,
        )
        return picked

    def lookup(
        self,
        keys: Sequence[tuple[int, int]],
        formats: Sequence[str] | None,
        dataset_pattern: str | None,
    ) -> list[PickedEvent | None]:
        found: list[PickedEvent | None] = []
        for start in range(0, len(keys), self.batch_size):
            found.extend(
                self._client.lookup(
                    keys[start : start + self.batch_size],
                    collection=self.collection,
                    formats=formats,
                    dataset_pattern=dataset_pattern,
                )
            )
        return found


@contextmanager
def event_source(
    ctx: typer.Context, collection: str | None, url: str | None, token: str | None
) -> Iterator[EventSource]:
    """The local store (through the catalog), or the web service at ``url``."""
    if url is not None:
        from eventindex.query.client import EventIndexClient

        with EventIndexClient(url, token=token) as client:
            yield _RemoteSource(client, collection)
        return
    from eventindex.query import Reader

    with catalog_of(state(ctx).settings) as catalog, Reader(catalog) as reader:
        yield _LocalSource(reader, collection or reader.default_collection())


def location_rows(picked: PickedEvent) -> list[list[Any]]:
    """CSV rows of one event: one per location."""
    return [
        [
            picked.run_number,
            picked.event_number,
            loc.dataset,
            loc.format,
            loc.processing_tag,
            loc.guid,
            loc.position,
        ]
        for loc in picked.locations
    ]


def write_csv(events: Sequence[PickedEvent | None]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for picked in events:
        if picked is not None:
            writer.writerows(location_rows(picked))


def print_event(picked: PickedEvent, attributes: bool = True) -> None:
    """The event as people read it: attributes, then one line per location."""
    stdout.print(
        f"[bold]run {picked.run_number} event {picked.event_number}[/bold] in {picked.collection}"
    )
    if attributes:
        for key, value in picked.attributes.items():
            stdout.print(f"  {key:14} {value}")
    for loc in picked.locations:
        stdout.print(f"  {loc.format:10} {loc.guid}  entry {loc.position:<8} {loc.dataset}")


def register(app: typer.Typer) -> None:
    app.command()(pick)


def pick(
    ctx: typer.Context,
    run_number: Annotated[int, typer.Argument(min=0, max=2**32 - 1, help="Run number.")],
    event_number: Annotated[int, typer.Argument(min=0, max=2**64 - 1, help="Event number.")],
    collection: CollectionOption = None,
    formats: FormatsOption = None,
    dataset: DatasetOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    output: EventOutput = EventOutputOption,
) -> None:
    """Find an event in every dataset that holds it: its attributes, and for each format the
    file GUID and the event's position in that file.

    Exit status: 0 found, 1 not found, 2 bad input or an error (unknown collection,
    unreachable server).
    """
    with event_source(ctx, collection, url, token) as source:
        picked = source.pick(run_number, event_number, formats, dataset)
    if output is EventOutput.CSV:
        write_csv([picked])
    elif output is EventOutput.JSON:
        print_json(None if picked is None else picked.to_dict())
    elif picked is None:
        where = f" in {source.collection}" if source.collection else ""
        stdout.print(f"event {run_number}/{event_number} not found{where}")
    else:
        print_event(picked)
    if picked is None:
        raise typer.Exit(EXIT_NOT_FOUND)
