"""``eventindex consume``: the consumer daemon (validate, batch, store, register, ack)."""

from __future__ import annotations

from typing import Annotated

import typer

from eventindex.cli.context import OutputFormat, OutputOption, print_json, state, stdout


def register(app: typer.Typer) -> None:
    app.command()(consume)


def consume(
    ctx: typer.Context,
    broker: Annotated[
        str | None, typer.Option(help="Broker URL (broker.url): stomp://host:61613,...")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, max=64, help="Worker processes (consumer.workers).")
    ] = None,
    queue: Annotated[
        str, typer.Option(help="Queue to consume (its DLQ is DLQ.<name>).")
    ] = "/queue/eventindex.events",
    once: Annotated[
        bool, typer.Option(help="Stop once the queue has been idle for 2 s, after a flush.")
    ] = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Consume event messages into map-file TagFiles registered in the catalog.

    Invalid messages go to the dead-letter queue with the reason in a header. Each batch
    is stored and committed before its messages are acknowledged, and redelivered
    messages already stored are skipped. SIGTERM or Ctrl-C flushes and exits cleanly.
    """
    from consumers.daemon import consume as run_consume

    settings = state(ctx).settings
    url = broker or settings.broker.url
    if url.startswith("memory:"):
        raise typer.BadParameter(
            "memory:// lives inside one process: give a real broker (stomp://...), "
            "or use `eventindex demo` for the embedded chain",
            param_hint="--broker",
        )
    report = run_consume(
        settings, url, workers=workers or settings.consumer.workers, once=once, destination=queue
    )
    result: dict[str, object] = {"workers": report.workers, **report.stats}
    if output is OutputFormat.JSON:
        print_json(result)
    else:
        for key, value in result.items():
            stdout.print(
                f"{key:26} {value:,.2f}" if isinstance(value, float) else f"{key:26} {value:,}"
            )
