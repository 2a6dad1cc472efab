"""``eventindex lookup --file EVENTS``: many events at once, from the store or a server."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from eventindex.cli.context import EXIT_NOT_FOUND, print_json, stderr, stdout
from eventindex.cli.pick_cmd import (
    CollectionOption,
    DatasetOption,
    EventOutput,
    EventOutputOption,
    FormatsOption,
    TokenOption,
    UrlOption,
    event_source,
    print_event,
    write_csv,
)

RUN_NUMBER_MAX = 2**32 - 1
EVENT_NUMBER_MAX = 2**64 - 1
HEADER = ("run_number", "event_number")
_SEPARATORS = re.compile(r"[\s,]+")


def parse_events(text: str) -> list[tuple[int, int]]:
    """``(run, event)`` pairs from text with one pair a line, separated by blanks or a comma.

    ``#`` starts a comment; blank lines are skipped; the first line may be the header
    ``run_number,event_number``. ``ValueError`` names the line of the first bad entry.
    """
    keys: list[tuple[int, int]] = []
    first = True
    for number, line in enumerate(text.splitlines(), start=1):
        fields = [f for f in _SEPARATORS.split(line.split("#", 1)[0]) if f]
        if not fields:
            continue
        if first and tuple(f.lower() for f in fields) == HEADER:
            first = False
            continue
        first = False
        if len(fields) != 2:
            raise ValueError(
                f"line {number}: expected 'RUN EVENT', got {len(fields)} fields: {line.strip()!r}"
            )
        keys.append(
            (
                _number(fields[0], "run number", RUN_NUMBER_MAX, number),
                _number(fields[1], "event number", EVENT_NUMBER_MAX, number),
            )
        )
    return keys


def _number(text: str, name: str, maximum: int, line: int) -> int:
    # Plain decimal digits only: int() would also take '+1', '1_000' or '٣'.
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"line {line}: {name} {text!r} is not a non-negative integer")
    value = int(text)
    if value > maximum:
        raise ValueError(f"line {line}: {name} {value} is above {maximum}")
    return value


def _read(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {source}: {exc}", param_hint="--file") from exc


def register(app: typer.Typer) -> None:
    app.command()(lookup)


def lookup(
    ctx: typer.Context,
    events_file: Annotated[
        str,
        typer.Option(
            "--file",
            "-f",
            metavar="EVENTS",
            help="File with one 'RUN EVENT' pair a line (blank- or comma-separated, "
            "'#' comments, optional header run_number,event_number); '-' reads stdin.",
        ),
    ],
    collection: CollectionOption = None,
    formats: FormatsOption = None,
    dataset: DatasetOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    output: EventOutput = EventOutputOption,
) -> None:
    """Find many events at once: each one's locations (dataset, format, processing tag, file
    GUID, position), in the order of the file.

    Exit status: 0 all found, 1 some or all not found, 2 bad input or an error.
    """
    try:
        keys = parse_events(_read(events_file))
    except ValueError as exc:
        raise typer.BadParameter(f"{events_file}: {exc}", param_hint="--file") from exc
    if not keys:
        raise typer.BadParameter(f"{events_file}: no events in it", param_hint="--file")
    with event_source(ctx, collection, url, token) as source:
        results = source.lookup(keys, formats, dataset)
    missing = [key for key, picked in zip(keys, results, strict=True) if picked is None]
    found = len(keys) - len(missing)
    if output is EventOutput.JSON:
        answered = next((p.collection for p in results if p is not None), source.collection)
        print_json(
            {
                "collection": answered,
                "results": [None if p is None else p.to_dict() for p in results],
                "found": found,
                "missing": [list(key) for key in missing],
            }
        )
    elif output is EventOutput.CSV:
        write_csv(results)
    else:
        for key, picked in zip(keys, results, strict=True):
            if picked is None:
                stdout.print(f"[bold]run {key[0]} event {key[1]}[/bold]: not found")
            else:
                print_event(picked, attributes=False)
    if output is not EventOutput.JSON:
        # On stderr, so a CSV on stdout stays a clean table.
        stderr.print(f"found {found} of {len(keys)} events")
    if missing:
        raise typer.Exit(EXIT_NOT_FOUND)
