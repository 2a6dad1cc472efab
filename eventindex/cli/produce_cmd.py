"""``eventindex produce extract|send``: the two steps of a producer on a processing node."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from eventindex.cli.context import (
    EXIT_NOT_FOUND,
    OutputFormat,
    OutputOption,
    print_json,
    state,
    stderr,
    stdout,
)

if TYPE_CHECKING:
    from producers.readers import InputFormat

app = typer.Typer(
    help="Producers: extract event records into an intermediate .ei file, then send it.",
    no_args_is_help=True,
)


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=quiet,
    )


def _print(result: dict[str, object], output: OutputFormat) -> None:
    if output is OutputFormat.JSON:
        print_json(result)
        return
    for key, value in result.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        stdout.print(f"{key:28} {shown}")


@app.command()
def extract(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(help="Input files: .jsonl, .csv or .root.")],
    output_file: Annotated[Path, typer.Option("--output-file", "-o", help="The .ei file.")],
    dataset: Annotated[
        str, typer.Option(help="Dataset name (default: from the input file name).")
    ] = "",
    collection: Annotated[
        str, typer.Option(help="Collection (default: project.stream of the dataset).")
    ] = "",
    guid: Annotated[str, typer.Option(help="GUID of the job's output file (default: new).")] = "",
    task_id: Annotated[str, typer.Option(help="Production task id.")] = "0",
    job_id: Annotated[str, typer.Option(help="Production job id.")] = "0",
    producer: Annotated[str, typer.Option(help="Producer name (default: host name).")] = "",
    input_format: Annotated[
        str | None, typer.Option("--format", help="jsonl, csv or root (default: by suffix).")
    ] = None,
    tree: Annotated[str, typer.Option(help="ROOT: the TTree to read.")] = "EventIndex",
    root_input_format: Annotated[
        str, typer.Option("--input-format", help="ROOT: data format of the input (AOD, ...).")
    ] = "",
    root_input_guid: Annotated[
        str, typer.Option("--input-guid", help="ROOT: GUID of the input file.")
    ] = "",
    message_bytes: Annotated[
        int | None, typer.Option(min=512, help="Target message size (codec.message_bytes).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing .ei file.")] = False,
    # -o names the .ei file here, as processing jobs spell it.
    output: Annotated[
        OutputFormat, typer.Option("--output", help="Output format.")
    ] = OutputFormat.TEXT,
) -> None:
    """Read input files and write one intermediate EventIndex file (SQLite): the header
    (collection, dataset, output GUID, task/job ids), the events as ready-to-send ~10 kB
    messages, and an empty send log."""
    from producers.extract import ExtractOptions
    from producers.extract import extract as run_extract

    settings = state(ctx).settings
    options = ExtractOptions(
        dataset=dataset,
        collection=collection,
        guid=guid,
        task_id=task_id,
        job_id=job_id,
        producer=producer,
        input_format=_input_format(input_format),
        tree=tree,
        root_format=root_input_format,
        root_guid=root_input_guid,
    )
    with _progress(output is OutputFormat.JSON) as progress:
        task = progress.add_task("reading inputs", total=len(inputs))
        header = run_extract(
            inputs,
            output_file,
            options,
            message_bytes=message_bytes or settings.codec.message_bytes,
            overwrite=force,
            progress=lambda _path, _rows: progress.advance(task),
        )
    _print(
        {
            "file": str(output_file),
            "collection": header.collection,
            "dataset": header.dataset,
            "guid": header.guid,
            "events": header.events,
            "messages": header.messages,
            "bytes": output_file.stat().st_size,
        },
        output,
    )


def _input_format(name: str | None) -> InputFormat | None:
    from producers.readers import InputFormat

    if name is None:
        return None
    try:
        return InputFormat(name.lower())
    except ValueError:
        known = ", ".join(f.value for f in InputFormat)
        raise typer.BadParameter(f"unknown format {name!r} (known: {known})") from None


@app.command()
def send(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="The .ei files to send.")],
    broker: Annotated[
        str | None, typer.Option(help="Broker URL (broker.url): stomp://host:61613,...")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait until consumers report every sent message stored.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.1, help="Longest wait with --wait (producer.wait_seconds)."),
    ] = None,
    queue: Annotated[str, typer.Option(help="Queue to send to.")] = "/queue/eventindex.events",
    resend: Annotated[
        bool, typer.Option(help="Forget the send log and send everything again (same ids).")
    ] = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Send .ei files to the broker: persistent messages in confirmed transactions.

    Resumable: the file records what the broker confirmed, so running the same command
    again after a crash sends only the rest, under the same message ids. Exit code 1
    when --wait timed out before every message was reported stored.
    """
    from eventindex.transport import open_transport
    from producers.eifile import EventIndexFile
    from producers.sender import FileSender

    settings = state(ctx).settings
    url = broker or settings.broker.url
    if url.startswith("memory:"):
        raise typer.BadParameter(
            "memory:// lives inside one process: give a real broker (stomp://...), "
            "or use `eventindex demo` for the embedded chain",
            param_hint="--broker",
        )
    reports = []
    totals = []
    for path in files:
        with EventIndexFile(path) as ei:
            totals.append(ei.header.events)
            if resend:
                ei.reset_log()
    with (
        open_transport(url, settings.broker) as transport,
        _progress(output is OutputFormat.JSON) as progress,
    ):
        sender = FileSender(
            transport,
            transaction_messages=settings.producer.transaction_messages,
            destination=queue,
        )
        if wait:
            sender.listen()
        for path, total in zip(files, totals, strict=True):
            task = progress.add_task(f"sending {path.name}", total=total)

            def advance(events: int, task: TaskID = task) -> None:
                progress.advance(task, events)

            reports.append(sender.send(path, progress=advance))
        stored = True
        if wait:
            progress.add_task("waiting for the consumers", total=None)
            stored = sender.wait_stored(reports, timeout or settings.producer.wait_seconds)
        sender.close()
    dicts = [report.as_dict() for report in reports]
    result: dict[str, object] = dicts[0] if len(dicts) == 1 else {"files": dicts}
    _print(result, output)
    if not stored:
        raise typer.Exit(EXIT_NOT_FOUND)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="produce")
